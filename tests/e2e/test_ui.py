"""``aipipe ui`` in a real browser (Debian's headless chromium, driven by Playwright).

Known cost rows, budgets and archived events are written into a fresh database of the
session's chDB path, which this process owns and serves on loopback as the pipeline does
(``QueryServer`` publishing ``query-endpoint.json``); ``aipipe ui`` runs as its own process
and reads through that authenticated endpoint. The page's numbers are checked against the
sums of the seeded rows and against the same questions asked in SQL, before and after the
client and date filters change, and the drill-down against one client's rows.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import selectors
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, replace
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
from clickhouse_connect.driver.client import Client
from playwright.sync_api import Page, sync_playwright

from aipipe.consumers.costs.budgets import BudgetStore, period_bounds
from aipipe.consumers.costs.migrations import migrate
from aipipe.consumers.costs.rows import CostRow
from aipipe.consumers.costs.store import ClickHouseCostStore
from aipipe.infra.queryserver import QueryServer
from aipipe.schemas.events import BudgetSet
from tests.support.rows import cost_row

pytestmark = pytest.mark.e2e
CHROMIUM = "/usr/bin/chromium"
SCREENSHOT = Path(__file__).parents[2] / "infra" / "ui-screenshot.png"
# The day the rows are seeded on, set by the ``seeded_day`` fixture before anything is seeded.
# The page's "today" is the UI process's own clock, so a run that crossed UTC midnight between
# seeding and checking would find today's budget spend on the day before.
NOW = datetime.now(UTC)
D = NOW.date()
DAY_LEFT = timedelta(minutes=3)  # far longer than this module takes


@dataclass(frozen=True)
class Op:
    id: str
    client: str
    days_ago: int
    kind: str
    model: str
    cost: str
    success: bool = True

    @property
    def created_at(self) -> datetime:
        day = D - timedelta(days=self.days_ago)
        return datetime(day.year, day.month, day.day, 0, 30, tzinfo=UTC) + timedelta(
            minutes=int(self.id[3:]))


OPS = [
    Op("op-01", "acme", 2, "image_generation", "gemini-2.5-flash-image", "0.039"),
    Op("op-02", "acme", 1, "text_generation", "gemini-2.5-flash", "0.001234567"),
    Op("op-03", "acme", 0, "video_generation", "veo-3.0-fast-generate-001", "0.85"),
    Op("op-04", "acme", 0, "image_generation", "gemini-2.5-flash-image", "0", success=False),
    Op("op-05", "globex", 1, "video_generation", "veo-3.0-generate-001", "3.2"),
    Op("op-06", "globex", 0, "video_generation", "veo-3.0-generate-001", "2.0"),
    Op("op-07", "initech", 2, "text_generation", "gemini-2.5-flash", "0.000415"),
    Op("op-08", "initech", 0, "image_generation", "gemini-2.5-flash-image", "0", success=False),
    Op("op-09", "acme", 40, "image_generation", "gemini-2.5-flash-image", "5.0"),  # too old
]
ERRORS = {"op-04": "quota exhausted", "op-08": "provider timeout"}
REJECTED = [("acme", "rate_limited", 0), ("acme", "rate_limited", 1), ("globex", "over_budget", 0),
            ("initech", "invalid", 5)]
OUTPUTS = {"op-03": [{"uri": "file:///artifacts/op-03/video.mp4", "mime_type": "video/mp4"}]}
BUDGETS = {"acme": "1.00", "globex": "2.0"}  # per day: acme at 85 %, globex at 100 %


def rows() -> list[CostRow]:
    out = []
    for i, op in enumerate(OPS):
        row = cost_row(op.id, op.cost, client_id=op.client, created_at=op.created_at,
                       operation_type=op.kind, model=op.model, success=op.success, offset=i)
        out.append(row if op.success else replace(row, error_message=ERRORS[op.id]))
    return out


def archive(database: str, client: Client) -> None:
    columns = ["event_id", "event_type", "client_id", "request_id", "operation_id",
               "occurred_at", "payload", "deadletter_reason", "kafka_topic", "kafka_partition",
               "kafka_offset", "kafka_timestamp"]
    data = []
    for i, (who, reason, days_ago) in enumerate(REJECTED):
        at = datetime.combine(D - timedelta(days=days_ago), datetime.min.time(), UTC) \
            + timedelta(hours=1, minutes=i)
        data.append([f"rej-{i}", "operation.rejected", who, f"req-rej-{i}", f"rej-{i}", at,
                     json.dumps({"reason": reason}), "", "t.rejected", 0, i, at])
    for op_id, outputs in OUTPUTS.items():
        op = next(o for o in OPS if o.id == op_id)
        data.append([f"done-{op_id}", "operation.completed", op.client, f"req-{op_id}", op_id,
                     op.created_at, json.dumps({"outputs": outputs}), "", "t.completed", 0,
                     100, op.created_at])
    client.insert("events_archive", data, column_names=columns, database=database)


@pytest.fixture(scope="module")
def seeded_day() -> date:
    """Today, with at least ``DAY_LEFT`` of it to go: in a day's last minutes, the next day."""
    global NOW, D
    now = datetime.now(UTC)
    midnight = datetime.combine(now.date() + timedelta(days=1), datetime.min.time(), UTC)
    if midnight - now < DAY_LEFT:
        while datetime.now(UTC) < midnight:  # the condition is the clock's; bounded by DAY_LEFT
            time.sleep(min(1.0, max((midnight - datetime.now(UTC)).total_seconds(), 0.0)))
    NOW = datetime.now(UTC)
    D = NOW.date()
    return D


@pytest.fixture(scope="module")
def database(chdb_client: Client, seeded_day: date) -> str:
    name = f"ui_{uuid.uuid4().hex[:12]}"
    migrate(chdb_client, name)
    store = ClickHouseCostStore(chdb_client, name)
    seeded = rows()
    store.write(seeded, dedup_token="ui-rows")
    # a re-delivery of op-05 (another Kafka offset): counted once on the page, as in SQL
    store.write([replace(seeded[4], kafka_offset=99)], dedup_token="ui-redelivery")
    BudgetStore(chdb_client, name).write([
        BudgetSet(client_id=who, request_id=f"budget-{who}", amount_usd=Decimal(amount),
                  period="day", occurred_at=NOW - timedelta(minutes=5))
        for who, amount in BUDGETS.items()])
    archive(name, chdb_client)
    return name


@pytest.fixture(scope="module")
def ui_url(chdb_client: Client, database: str,
           tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    home = tmp_path_factory.mktemp("ui-home")
    with QueryServer(chdb_client, home=home) as owner:  # the pipeline's read endpoint
        env = {**os.environ, "AIPIPE_HOME": str(home), "AIPIPE_CLICKHOUSE_DATABASE": database,
               "AIPIPE_CLICKHOUSE_URL": f"chdb://{owner.engine.path}"}
        with running_ui(env) as url:
            yield url


@contextlib.contextmanager
def running_ui(env: dict[str, str]) -> Iterator[str]:
    """``aipipe ui --port 0`` in its own process; its URL once it listens."""
    env.pop("AIPIPE_BUDGET_USD", None)
    process = subprocess.Popen([sys.executable, "-m", "aipipe", "ui", "--port", "0"],
                               env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               text=True)
    try:
        yield _announced_url(process, timeout=60)
    finally:
        process.terminate()
        process.wait(timeout=30)


def _announced_url(process: subprocess.Popen[str], timeout: float) -> str:
    assert process.stdout is not None
    selector = selectors.DefaultSelector()
    selector.register(process.stdout, selectors.EVENT_READ)
    deadline, seen = time.monotonic() + timeout, []
    while time.monotonic() < deadline:
        if selector.select(timeout=max(0.0, deadline - time.monotonic())):
            line = process.stdout.readline()
            if not line:
                break
            seen.append(line)
            found = re.search(r"on (http://127\.0\.0\.1:\d+/)", line)
            if found:
                return found.group(1)
    raise AssertionError(f"aipipe ui did not announce its URL:\n{''.join(seen)}")


def api(url: str, **headers: str) -> urllib.request.Request:
    """A request to the UI's API with the header the page's own fetch sends."""
    return urllib.request.Request(url, headers={"X-Aipipe-UI": "1", **headers})


def money(text: str) -> Decimal:
    """The page's "$1,234.50" as a Decimal."""
    assert re.fullmatch(r"\$[\d,]+\.\d{2,9}", text), text
    return Decimal(text[1:].replace(",", ""))


def expected(client: str | None = None, first: int = 29, last: int = 0) -> dict[str, Any]:
    """Hand sums over the seeded rows: days ``D-first .. D-last`` of ``requested_at``."""
    chosen = [o for o in OPS if last <= o.days_ago <= first and client in (None, o.client)]
    by_client: dict[str, Decimal] = {}
    for o in chosen:
        by_client[o.client] = by_client.get(o.client, Decimal(0)) + Decimal(o.cost)
    rejected: dict[str, int] = {}
    for who, reason, days_ago in REJECTED:
        if last <= days_ago <= first and client in (None, who):
            rejected[reason] = rejected.get(reason, 0) + 1
    return {"total": sum(by_client.values(), Decimal(0)), "operations": len(chosen),
            "by_client": by_client, "rejected": rejected,
            "failures": sum(1 for o in chosen if not o.success),
            "ops": {f"req-{o.id}": Decimal(o.cost) for o in chosen}}


def sql_totals(chdb_client: Client, database: str, start: date, end: date,
               client: str | None = None) -> dict[str, tuple[int, Decimal]]:
    """What the analyst's SQL says per client (ANALYSTS.md, question 1, over a range)."""
    where = " WHERE client_id = {client:String}" if client else ""
    result = chdb_client.query(
        f"SELECT client_id, sum(operations), sum(cost_usd) FROM `{database}`."
        "ai_cost_daily_between(start = {start:Date}, end = {end:Date})" + where +
        " GROUP BY client_id ORDER BY client_id",
        parameters={"start": start, "end": end + timedelta(days=1), "client": client})
    return {str(c): (int(n), Decimal(s)) for c, n, s in result.result_rows}


def wait_loaded(page: Page, loads: int) -> None:
    page.wait_for_function(f"Number(document.body.dataset.loads || 0) >= {loads}",
                           timeout=30_000)
    assert page.locator("#error").is_hidden(), page.locator("#error").text_content()


def shown(page: Page) -> dict[str, Any]:
    legend = page.locator("#chart-by_client tr[data-name]")
    clients = {}
    for i in range(legend.count()):
        row = legend.nth(i)
        clients[str(row.get_attribute("data-name"))] = (
            int(row.locator(".ops").inner_text().replace(",", "")),
            money(row.locator(".total").inner_text()))
    reasons = page.locator("#rejections tr[data-reason]")
    return {
        "total": money(page.locator("#total-usd").inner_text()),
        "operations": int(page.locator("#total-ops").inner_text().replace(",", "")),
        "by_client": clients,
        "rejected": {str(reasons.nth(i).get_attribute("data-reason")):
                     int(reasons.nth(i).locator("td").nth(1).inner_text())
                     for i in range(reasons.count())},
        "failures": int(page.locator("#total-errors").inner_text()),
    }


def check(page: Page, chdb_client: Client, database: str, want: dict[str, Any],
          start: date, end: date, client: str | None = None) -> None:
    got = shown(page)
    assert got["total"] == want["total"]
    assert got["operations"] == want["operations"]
    assert {c: s for c, (_, s) in got["by_client"].items()} == want["by_client"]
    assert got["by_client"] == sql_totals(chdb_client, database, start, end, client)
    assert got["rejected"] == want["rejected"]
    assert got["failures"] == want["failures"]


def test_the_page_shows_the_databases_numbers_and_follows_the_filters(
        ui_url: str, chdb_client: Client, database: str, tmp_path: Path) -> None:
    assert Path(CHROMIUM).exists(), "chromium is missing: run `make tools`"
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, headless=True)
        # the page's CSP forbids eval, which Playwright's wait_for_function uses
        page = browser.new_page(viewport={"width": 1280, "height": 900}, bypass_csp=True)
        console: list[str] = []
        page.on("console", lambda m: console.append(m.text) if m.type == "error" else None)
        page.goto(ui_url)
        wait_loaded(page, 1)

        # the default range: the last 30 days (op-09, 40 days ago, is outside)
        check(page, chdb_client, database, expected(), D - timedelta(days=29), D)
        assert money(page.locator("#total-usd").inner_text()) == Decimal("6.090649567")
        budgets = page.locator("#budgets tbody tr")
        assert budgets.count() == 2
        for who, (spent, used, reached, status) in {
            "acme": ("0.85", "85.0 %", ["80 %"], "within budget"),
            "globex": ("2.0", "100.0 %", ["80 %", "90 %", "100 %"], "over budget: rejecting"),
        }.items():
            row = page.locator(f"#budgets tr[data-client='{who}']")
            assert money(row.locator(".budget").inner_text()) == Decimal(BUDGETS[who])
            assert money(row.locator(".spent").inner_text()) == Decimal(spent)
            assert row.locator(".used").inner_text() == used
            assert row.locator(".thresholds .badge").all_inner_texts() == reached
            assert row.locator("td").last.inner_text() == status
        # the budget spend is what admission counts: created_at in today's period
        start, end = period_bounds("day", NOW)
        assert BudgetStore(chdb_client, database).spend(["acme", "globex"], start, end) == {
            "acme": Decimal("0.850000000"), "globex": Decimal("2.000000000")}
        errors = page.locator("#provider-errors tbody tr").all_inner_texts()
        assert sorted(e.split("\t")[:4] for e in errors) == [
            ["simulated", "gemini-2.5-flash-image", "provider timeout", "1"],
            ["simulated", "gemini-2.5-flash-image", "quota exhausted", "1"]]
        page.screenshot(path=str(tmp_path / "ui.png"), full_page=True)

        # narrow the range to yesterday and today: the totals follow
        page.fill("#from", (D - timedelta(days=1)).isoformat())
        page.click("#refresh")
        wait_loaded(page, 2)
        check(page, chdb_client, database, expected(first=1), D - timedelta(days=1), D)
        assert money(page.locator("#total-usd").inner_text()) == Decimal("6.051234567")

        # one client: acme, over the last 30 days again
        page.fill("#from", (D - timedelta(days=29)).isoformat())
        page.select_option("#client", "acme")  # a change reloads
        wait_loaded(page, 3)
        acme = expected("acme")
        check(page, chdb_client, database, acme, D - timedelta(days=29), D, "acme")
        assert page.locator("#drilldown").get_attribute("data-client") == "acme"
        listed = page.locator("#operations tbody tr[data-request]")
        assert {str(listed.nth(i).get_attribute("data-request")):
                money(listed.nth(i).locator(".cost").inner_text())
                for i in range(listed.count())} == acme["ops"]
        video = page.locator("#operations tr[data-request='req-op-03']")
        assert video.locator(".outputs").inner_text() == \
            "file:///artifacts/op-03/video.mp4 (video/mp4)"
        assert "veo-3.0-fast-generate-001" in video.inner_text()
        assert page.locator("#drilldown-title").inner_text() == \
            "Operations of acme: 4, $0.890234567"
        page.screenshot(path=str(tmp_path / "ui-acme.png"), full_page=True)

        # the drill-down from the chart's legend, with all clients
        page.select_option("#client", "")
        wait_loaded(page, 4)
        page.click("#chart-by_client tr[data-name='globex'] button")
        page.wait_for_function(
            "document.getElementById('drilldown').dataset.client === 'globex'", timeout=30_000)
        listed = page.locator("#operations tbody tr[data-request]")
        assert listed.all_inner_texts() and sorted(
            str(listed.nth(i).get_attribute("data-request")) for i in range(listed.count())
        ) == ["req-op-05", "req-op-06"]  # the re-delivered op-05 once
        if os.environ.get("AIPIPE_UI_SCREENSHOT"):  # where the README's picture is made
            page.screenshot(path=os.environ["AIPIPE_UI_SCREENSHOT"], full_page=True)

        # a range that ends before it starts: the API's sentence, and the numbers stay
        page.fill("#from", (D + timedelta(days=1)).isoformat())
        page.click("#refresh")
        page.wait_for_function("Number(document.body.dataset.loads) >= 5", timeout=30_000)
        assert page.locator("#error").inner_text() == (
            f"'from' ({D + timedelta(days=1)}) is after 'to' ({D}); the range is from..to, "
            "both days included.")
        assert page.locator("#status").inner_text() == "Not updated"
        assert money(page.locator("#total-usd").inner_text()) == Decimal("6.090649567")
        browser.close()
    # the only error in the console: the refused range's answer
    assert console == ["Failed to load resource: the server responded with a status of 400 "
                       "(Bad Request)"]
    assert (tmp_path / "ui.png").stat().st_size > 10_000


def test_a_bad_parameter_gets_one_sentence(ui_url: str) -> None:
    for query, sentence in (
        ("from=yesterday", "'from' must be a day as YYYY-MM-DD, such as 2026-11-01; "
                           "got 'yesterday'."),
        ("from=2026-11-05&to=2026-11-01", "'from' (2026-11-05) is after 'to' (2026-11-01); "
                                          "the range is from..to, both days included."),
        ("day=1", "Unknown parameter 'day'; use from, to, client."),
    ):
        with pytest.raises(urllib.error.HTTPError) as caught:
            urllib.request.urlopen(api(f"{ui_url}api/summary?{query}"), timeout=30)
        assert caught.value.code == 400
        assert json.loads(caught.value.read()) == {"error": sentence}
    with pytest.raises(urllib.error.HTTPError) as caught:
        urllib.request.urlopen(api(f"{ui_url}api/operations"), timeout=30)
    assert json.loads(caught.value.read()) == {
        "error": "'client' is required: the client whose operations to list."}


def test_the_api_answers_only_its_own_page(ui_url: str) -> None:
    """A request a browser marks as from another site, and one without the page's header
    (what an ``<img>`` or a form on another page can send), get a 403 and one sentence."""
    summary = f"{ui_url}api/summary"
    for request, sentence in (
        (api(summary, **{"Sec-Fetch-Site": "cross-site"}),
         "This API answers only the cost page it serves, not a page from another site or "
         "origin (Sec-Fetch-Site: cross-site)."),
        (urllib.request.Request(summary),
         "API requests must carry the header 'X-Aipipe-UI: 1', as the cost page's own "
         "requests do (with curl: -H 'X-Aipipe-UI: 1')."),
    ):
        with pytest.raises(urllib.error.HTTPError) as caught:
            urllib.request.urlopen(request, timeout=30)
        assert (caught.value.code, json.loads(caught.value.read())) == (403, {"error": sentence})
    with urllib.request.urlopen(api(summary, **{"Sec-Fetch-Site": "same-origin"}),
                                timeout=300) as response:
        assert json.loads(response.read())["total_usd"] == "6.090649567"


def test_the_page_loads_nothing_from_elsewhere(ui_url: str) -> None:
    with urllib.request.urlopen(ui_url, timeout=30) as response:
        page = response.read().decode()
        assert response.headers["Content-Security-Policy"] == \
            "default-src 'self'; img-src 'self' data:"
    assert re.findall(r'(?:src|href)="([^"]+)"', page) == [
        "data:,", "/static/ui.css", "/static/ui.js"]


SEED = """
import sys
from datetime import UTC, datetime
import clickhouse_connect
from aipipe.consumers.costs.migrations import migrate
from aipipe.consumers.costs.store import ClickHouseCostStore
from tests.support.rows import cost_row
client = clickhouse_connect.get_client(dsn="chdb://" + sys.argv[1])
migrate(client, "aipipe")
row = cost_row(sys.argv[2], sys.argv[3], created_at=datetime.now(UTC))
ClickHouseCostStore(client, "aipipe").write([row], dedup_token=sys.argv[2])
client.close()
from aipipe.infra.leave import leave
leave(0)  # not through chDB's exit handlers, which can hang
"""


def write_row(path: Path, operation_id: str, cost: str) -> None:
    """One cost row into the chDB path, by a process of its own (as the pipeline would)."""
    done = subprocess.run([sys.executable, "-c", SEED, str(path), operation_id, cost],
                          cwd=Path(__file__).parents[2], capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]


def summary(url: str) -> dict[str, Any]:
    with urllib.request.urlopen(api(f"{url}api/summary"), timeout=300) as response:
        answer: dict[str, Any] = json.loads(response.read())
    return answer


def test_without_a_pipeline_the_page_reads_the_path_and_lets_go_of_it(tmp_path: Path) -> None:
    """No endpoint serves the path: each refresh opens it in a child process that exits, so
    another process (a pipeline starting) can open it while the page is up."""
    path = tmp_path / "chdb"
    write_row(path, "alone-1", "1.5")
    env = {**os.environ, "AIPIPE_HOME": str(tmp_path / "home"),
           "AIPIPE_CLICKHOUSE_URL": f"chdb://{path}", "AIPIPE_CLICKHOUSE_DATABASE": "aipipe"}
    with running_ui(env) as url:
        first = summary(url)
        assert (Decimal(first["total_usd"]), first["operations"]) == (Decimal("1.5"), 1)
        write_row(path, "alone-2", "2.25")  # fails if the page's process kept the path
        second = summary(url)
        assert (Decimal(second["total_usd"]), second["operations"]) == (Decimal("3.75"), 2)
        assert [(c["name"], c["total_usd"]) for c in second["by_client"]] == [
            ("acme", "3.750000000")]
