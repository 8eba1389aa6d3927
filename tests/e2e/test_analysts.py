"""The analyst page's ten questions, run against a known run and checked by hand.

The known run is produced straight onto the pipeline's topics (requests, admission
decisions, video polls, completions, with duplicate deliveries), so the numbers do not
depend on the streams stages; a real ``aipipe run costs`` worker projects it (cost sink,
rollups, event archive) and the queries go through its read endpoint, as ``aipipe sql``'s do.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from collections import Counter, defaultdict
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest

from aipipe.infra.settings import Settings
from aipipe.processes import WorkerProcess, wait_for
from aipipe.runner import prepare_topics
from aipipe.schemas.events import (
    Event,
    OperationAdmitted,
    OperationCompleted,
    OperationRejected,
    OperationRequested,
    Usage,
    VideoPolled,
    VideoStarted,
)
from aipipe.schemas.prices import PRICE_TABLES
from tests.support.pipeline import produce, store_of, wait_recorded

pytestmark = pytest.mark.e2e
PAGE = Path(__file__).parents[2] / "infra" / "migrations" / "ANALYSTS.md"
CLIENTS = ("acme", "globex", "initech")
SHAPES = (
    ("image_generation", "gemini-2.5-flash-image"),
    ("text_generation", "gemini-2.5-flash"),
    ("video_generation", "veo-3.0-generate-001"),
    ("video_generation", "veo-3.0-fast-generate-001"),
)


def questions() -> dict[int, str]:
    text = PAGE.read_text()
    found = re.findall(r"^### (\d+)\. .*?\n+```sql\n(.*?)```", text, flags=re.S | re.M)
    return {int(n): sql.strip() for n, sql in found}


@dataclass
class KnownRun:
    events: dict[str, list[Event]] = field(default_factory=lambda: defaultdict(list))
    requested: list[OperationRequested] = field(default_factory=list)
    rejected: list[OperationRejected] = field(default_factory=list)
    completed: list[OperationCompleted] = field(default_factory=list)
    polls: dict[str, list[float]] = field(default_factory=dict)


def known_run(settings: Settings, count: int = 36) -> KnownRun:
    now = datetime.now(UTC)
    # within today (UTC), so that today's buckets hold every operation and none is sealed
    # (the sealer seals closed days); in the first minutes of a day some lie ahead of now
    start = max(now - timedelta(hours=1), now.replace(hour=0, minute=0, second=0,
                                                        microsecond=0))
    topics, run, table = settings.topics, KnownRun(), PRICE_TABLES[0]
    for i in range(count):
        operation_type, model = SHAPES[i % len(SHAPES)]
        at = start + timedelta(seconds=30 * i)
        req = OperationRequested(event_id=f"op-{i:03d}", request_id=f"req-{i}",
                                 client_id=CLIENTS[i % 3], user_id=f"user-{i % 2}",
                                 occurred_at=at, operation_type=operation_type,  # type: ignore[arg-type]
                                 model=model, params={"prompt": "x"})
        run.requested.append(req)
        run.events[topics.requested].append(req)
        spec = {"operation_type": req.operation_type, "model": model, "operation_id": req.event_id,
                "requested_at": at}
        if i % 9 in (4, 7):
            rejected = OperationRejected(**req.envelope(f"rej-{i}"), **spec,
                                         reason="rate_limited" if i % 9 == 4 else "over_budget")
            run.rejected.append(rejected)
            run.events[topics.rejected].append(rejected)
            continue
        run.events[topics.admitted].append(OperationAdmitted(**req.envelope(f"adm-{i}"), **spec))
        success = i % 10 != 3
        if operation_type == "image_generation":
            usage = Usage(input_tokens=10 + i, output_tokens=1290 * (1 + i % 2), image_count=1)
        elif operation_type == "text_generation":
            usage = Usage(input_tokens=200 + i, output_tokens=50 * i)
        else:
            usage = Usage(video_seconds=Decimal(4 + i % 5))
            elapsed = [2.0, 5.0, 9.5, 16.25][: 1 + i % 4]
            run.polls[req.event_id] = elapsed
            run.events[topics.video_polls].append(VideoStarted(
                **req.envelope(f"vs-{i}"), operation_id=req.event_id, requested_at=at,
                provider="simulated", model=model, provider_operation=f"ops/{i}"))
            run.events[topics.video_polls] += [
                VideoPolled(**req.envelope(f"poll-{i}-{n}"), operation_id=req.event_id,
                            provider_operation=f"ops/{i}", attempt=n + 1, elapsed_seconds=e,
                            done=n == len(elapsed) - 1, final=n == len(elapsed) - 1)
                for n, e in enumerate(elapsed)]
        done = OperationCompleted(
            **req.envelope(f"done-{i}"), occurred_at=at + timedelta(seconds=5),
            operation_id=req.event_id, requested_at=at, operation_type=operation_type,  # type: ignore[arg-type]
            provider="simulated", model=model, success=success,
            usage=usage if success else Usage(),
            cost_usd=table.cost(model, usage) if success else Decimal(0),
            price_version=table.version, duration_ms=700 + 250 * i,
            error_message=None if success else "simulated failure",
            poll_count=len(run.polls.get(req.event_id, [])))
        run.completed.append(done)
        run.events[topics.completed].append(done)
    # duplicate deliveries: a re-sent request and a re-delivered completion
    run.events[topics.requested].append(run.requested[0])
    run.events[topics.completed].append(run.completed[0])
    return run


def expected(run: KnownRun) -> dict[int, list[tuple[Any, ...]]]:
    done = run.completed
    client_of = {e.operation_id: e.client_id for e in done}
    by_client: dict[str, list[Decimal]] = defaultdict(list)
    by_model: dict[str, list[Decimal]] = defaultdict(list)
    failures: dict[str, list[bool]] = defaultdict(list)
    by_type: dict[tuple[Any, str], list[Decimal]] = defaultdict(list)
    for e in done:
        by_client[e.client_id].append(e.cost_usd)
        by_model[e.model].append(e.cost_usd)
        failures[e.model].append(not e.success)
        by_type[(e.requested_at.date(), e.operation_type)].append(e.cost_usd)
    videos: dict[str, list[int]] = defaultdict(list)
    for e in done:
        if e.operation_type == "video_generation" and e.success:
            videos[e.model].append(e.duration_ms)

    def p95(values: list[int]) -> float:
        ordered = sorted(values)
        return ordered[min(int(0.95 * len(ordered)), len(ordered) - 1)] / 1000

    reasons = Counter(r.reason for r in run.rejected)
    requested = Counter(r.client_id for r in run.requested)
    rejected = Counter(r.client_id for r in run.rejected)
    users: dict[str, list[Decimal]] = defaultdict(list)
    for e in done:
        if e.client_id == "acme":
            users[e.user_id or ""].append(e.cost_usd)
    return {
        1: sorted(((c, len(v), sum(v)) for c, v in by_client.items()),
                  key=lambda r: (-r[2], r[0])),
        2: sorted(((m, len(v), sum(v)) for m, v in by_model.items()),
                  key=lambda r: (-r[2], r[0]))[:10],
        3: sorted((d, t, len(v), sum(v)) for (d, t), v in by_type.items()),
        4: sorted(((m, len(v), sum(v), round(sum(v) / len(v), 4)) for m, v in failures.items()),
                  key=lambda r: (-r[3], r[0])),
        5: sorted((m, len(v), p95(v)) for m, v in videos.items()),
        6: sorted(reasons.items(), key=lambda r: (-r[1], r[0])),
        7: [(c, requested[c], rejected[c], round(rejected[c] / requested[c], 4))
            for c in sorted(requested)],
        8: sorted(((client_of[op], op, len(e), max(e)) for op, e in run.polls.items()),
                  key=lambda r: (-r[2], r[0], r[1])),
        9: sorted(((e.operation_id, e.client_id, e.model, e.cost_usd) for e in done),
                  key=lambda r: (-r[3], r[0]))[:5],
        10: sorted(((u, len(v), sum(v)) for u, v in users.items()), key=lambda r: (-r[2], r[0])),
    }


@pytest.fixture
def projected(settings: Settings) -> Iterator[tuple[Settings, WorkerProcess, KnownRun]]:
    prepare_topics(settings)
    run = known_run(settings)
    worker = WorkerProcess(settings, "costs").start()
    try:
        for topic, events in run.events.items():
            produce(settings, topic, events)
        store = store_of(settings, worker)
        wait_recorded(store, len(run.completed), timeout=120, worker=worker)
        distinct = sum(len(v) for v in run.events.values()) - 2  # the two re-deliveries
        archived = f"SELECT count() FROM {settings.clickhouse_database}.events_archive FINAL"
        wait_for(lambda: store.client.query(archived).result_rows[0][0] >= distinct, 120,
                 f"{distinct} events in the archive")
        yield settings, worker, run
    finally:
        worker.stop()


def test_the_ten_documented_questions_answer_exactly(
    projected: tuple[Settings, WorkerProcess, KnownRun],
) -> None:
    settings, worker, run = projected
    client = store_of(settings, worker).client
    asked = questions()
    assert sorted(asked) == list(range(1, 11))
    want = expected(run)
    for n, sql in asked.items():
        rows = client.query(sql, parameters={"client": "acme"}).result_rows
        got = [tuple(float(v) if isinstance(v, float) else v for v in row) for row in rows]
        assert got == want[n], f"question {n}:\n{sql}"
    assert sum(r[1] for r in want[1]) == len(run.completed)  # the duplicate counted once
    sources = client.query("SELECT DISTINCT source FROM ai_cost_daily").result_rows
    assert sources == [("raw",)]  # today is not sealed yet: answered from the raw table

    env = {**settings.to_env(), "PATH": "/usr/bin:/bin"}
    out = subprocess.run([sys.executable, "-m", "aipipe", "sql", asked[10], "--param",
                          "client=acme", "--format", "json"], env=env, capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert [(r["user_id"], r["operations"], Decimal(r["cost_usd"]))
            for r in json.loads(out.stdout)] == want[10]
    refused = subprocess.run([sys.executable, "-m", "aipipe", "sql",
                              "ALTER TABLE ai_cost_tracking DELETE WHERE 1"], env=env,
                             capture_output=True, text=True, timeout=120)
    assert refused.returncode == 2
    assert "read-only queries" in refused.stderr and "ALTER would change data" in refused.stderr


def test_chdb_refuses_writes_under_the_readonly_setting(tmp_path: Path) -> None:
    """What the analyst profile and the read endpoint rely on, in a process of its own."""
    code = (
        "import sys, chdb\n"
        "conn = chdb.connect(sys.argv[1])\n"
        "conn.query('CREATE TABLE t (x UInt8) ENGINE = MergeTree ORDER BY x')\n"
        "conn.query('SET readonly = 1')\n"
        "for sql in ('INSERT INTO t VALUES (1)', 'DROP TABLE t', 'SET readonly = 0'):\n"
        "    try:\n"
        "        conn.query(sql)\n"
        "        print('allowed', sql)\n"
        "    except Exception as exc:\n"
        "        print('refused', 'READONLY' in str(exc) or 'Code: 164' in str(exc), sql)\n"
        "conn.close()\n"
        "from aipipe.infra.leave import leave\n"
        "leave(0)\n"  # not through chDB's exit handlers, which can hang
    )
    out = subprocess.run([sys.executable, "-c", code, str(tmp_path / "ro")],
                         capture_output=True, text=True, timeout=120, check=True)
    assert out.stdout.splitlines() == [
        "refused True INSERT INTO t VALUES (1)",
        "refused True DROP TABLE t",
        "refused True SET readonly = 0",
    ]


def test_the_report_plots_the_expected_series(
    projected: tuple[Settings, WorkerProcess, KnownRun], tmp_path: Path,
) -> None:
    from PIL import Image

    settings, _, run = projected
    day = run.requested[0].occurred_at.date()
    env = {**settings.to_env(), "PATH": "/usr/bin:/bin"}
    out = subprocess.run(
        [sys.executable, "-m", "aipipe", "report", "--from", day.isoformat(), "--to",
         (day + timedelta(days=2)).isoformat(), "--out", str(tmp_path / "r.html"), "--png",
         str(tmp_path / "r.png")], env=env, capture_output=True, text=True, timeout=180)
    assert out.returncode == 0, out.stderr
    page = (tmp_path / "r.html").read_text()
    found = re.search(r'<script type="application/json" id="aipipe-report-data">(.*?)</script>',
                      page, flags=re.S)
    assert found is not None
    data = json.loads(found.group(1))
    image = Image.open(tmp_path / "r.png")
    assert image.format == "PNG" and image.size[0] > 800
    assert json.loads(image.text["aipipe-report-data"]) == data  # type: ignore[attr-defined]
    assert 'src="data:image/png;base64,' in page

    def series(key: Any) -> dict[str, dict[str, str]]:
        out: dict[str, dict[str, Decimal]] = defaultdict(lambda: defaultdict(Decimal))
        for e in run.completed:
            out[key(e)][e.requested_at.date().isoformat()] += e.cost_usd
        return {k: {d: format(v, "f") for d, v in sorted(days.items())}
                for k, days in sorted(out.items())}

    assert data["by_model"] == series(lambda e: e.model)
    assert data["by_client"] == series(lambda e: e.client_id)
    assert data["by_operation_type"] == series(lambda e: e.operation_type)
    assert data["rejections"] == dict(sorted(Counter(r.reason for r in run.rejected).items()))
    assert Decimal(data["total_usd"]) == sum(e.cost_usd for e in run.completed)
    assert data["operations"] == len(run.completed)
    assert "Spend per day by model" in page and "over_budget" in page


def test_sealed_rollups_stay_exact_when_a_duplicate_arrives_after_the_seal(
    settings: Settings,
) -> None:
    """Closed days are sealed by the worker; a re-delivery after the seal sends its bucket
    back to the raw table at once, and the next seal takes it in again."""
    settings = settings.model_copy(update={"rollup_seal_seconds": 0.5})
    prepare_topics(settings)
    table = PRICE_TABLES[0]
    day = datetime.now(UTC).replace(hour=10, minute=0, second=0, microsecond=0)

    def done(n: int, duration_ms: int = 1000) -> OperationCompleted:
        at = day - timedelta(days=1 + n % 3)
        usage = Usage(video_seconds=Decimal(4 + n % 4))
        return OperationCompleted(
            request_id=f"r{n}", client_id=CLIENTS[n % 2], operation_id=f"op-{n}",
            requested_at=at, occurred_at=at + timedelta(minutes=1),
            operation_type="video_generation", provider="simulated",
            model="veo-3.0-generate-001", success=True, usage=usage,
            cost_usd=table.cost("veo-3.0-generate-001", usage), price_version=table.version,
            duration_ms=duration_ms + n)

    events = [done(n) for n in range(24)]
    worker = WorkerProcess(settings, "costs").start()
    try:
        produce(settings, settings.topics.completed, events)
        store = store_of(settings, worker)
        wait_recorded(store, len(events), timeout=120, worker=worker)
        client = store.client
        view = ("SELECT source, sum(operations), sum(cost_usd), sum(duration_ms) "
                "FROM ai_cost_daily GROUP BY source ORDER BY source")
        raw = ("SELECT count(), sum(cost_usd), sum(duration_ms) "
               "FROM ai_cost_tracking FINAL")

        def sources() -> dict[str, tuple[int, Decimal, int]]:
            return {s: (int(n), c, int(d)) for s, n, c, d in client.query(view).result_rows}

        wait_for(lambda: set(sources()) == {"sealed"}, 60, "every closed day sealed")
        assert sources()["sealed"] == tuple(client.query(raw).result_rows[0])

        produce(settings, settings.topics.completed, [done(5, duration_ms=90_000)])
        # (no wait on the bucket turning "raw": with a 0.5 s seal it may already be sealed
        # again when looked at; exactness is what must hold at every moment)
        wait_for(lambda: client.query(
            "SELECT sum(duration_ms) FROM ai_cost_tracking FINAL").result_rows[0][0]
            == sum(e.duration_ms for e in events) - 1005 + 90_005, 60, "the copy recorded")
        # exact at every moment: before the next seal (raw for the bucket) and after it
        for _ in range(2):
            got = sources()
            total = tuple(map(sum, zip(*got.values(), strict=True)))
            assert total == tuple(client.query(raw).result_rows[0])
        wait_for(lambda: set(sources()) == {"sealed"}, 60, "the bucket sealed again")
        assert sources()["sealed"] == tuple(client.query(raw).result_rows[0])
        between = client.query(
            "SELECT sum(operations), sum(cost_usd) FROM ai_cost_daily_between("
            "start = {s:Date}, end = {e:Date})",
            parameters={"s": (day - timedelta(days=5)).date().isoformat(),
                        "e": day.date().isoformat()}).result_rows
        assert between == [tuple(client.query(raw).result_rows[0][:2])]
    finally:
        worker.stop()
