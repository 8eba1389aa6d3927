"""The embedded read endpoint reads ``multipart/form-data`` queries as ClickHouse does.

clickhouse-connect moves the query and its bind parameters into form fields once the
URL-encoded parameters pass 4096 bytes: admission's budget lookups for a batch of a few
hundred clients do. The endpoint used to refuse every multipart body as external data,
and admission failed open. Here the real path runs: a ``BudgetStore`` over a default
clickhouse-connect client pointed at a running ``QueryServer``; and raw form bodies show
that a write in a form is still refused, and a file part (external data) still is too.

Shares the session's one chDB path (``<basetemp>/chdb``) with the other ClickHouse tests.
"""

from __future__ import annotations

import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from urllib.parse import quote

import clickhouse_connect
import pytest
from clickhouse_connect.driver.binding import MAX_URL_BIND_PARAM_LENGTH
from clickhouse_connect.driver.client import Client
from urllib3 import encode_multipart_formdata

from aipipe.consumers.costs.budgets import Budget, BudgetStore
from aipipe.consumers.costs.migrations import migrate
from aipipe.consumers.costs.store import ClickHouseCostStore
from aipipe.infra.queryserver import Limits, QueryServer
from aipipe.schemas.events import BudgetSet
from tests.support.rows import cost_row

pytestmark = pytest.mark.e2e

START = datetime(2025, 11, 1, tzinfo=UTC)
END = datetime(2025, 12, 1, tzinfo=UTC)
CLIENTS = [f"client-{i:04d}" for i in range(600)]
# every 7th client has a budget (the latest one counts), every 5th has spend in the month
BUDGETS = {c: Budget(Decimal(f"{i}.5").quantize(Decimal("0.000000001")), "month", "table")
           for i, c in enumerate(CLIENTS) if i % 7 == 0}
SPEND = {c: Decimal(f"0.{i:09d}") for i, c in enumerate(CLIENTS) if i % 5 == 0}
# 700 ids of the longest kind (200 characters): one list of them is past a form field's limit
LONG = [f"{i:04d}-" + "l" * 195 for i in range(700)]
LONG_BUDGETS = {c: Budget(Decimal(i).quantize(Decimal("0.000000001")), "month", "table")
                for i, c in enumerate(LONG) if i % 100 == 99}
LONG_SPEND = {c: Decimal(f"1.{i:09d}") for i, c in enumerate(LONG) if i % 70 == 69}


@pytest.fixture(scope="module")
def database(chdb_client: Client) -> str:
    name = f"form_{uuid.uuid4().hex[:12]}"
    migrate(chdb_client, name)
    budgets = BudgetStore(chdb_client, name)
    budgets.write([
        BudgetSet(client_id=c, request_id=f"budget-{c[:12]}-{n}", amount_usd=amount, period=period,
                  occurred_at=START + timedelta(hours=n))
        for c, b in {**BUDGETS, **LONG_BUDGETS}.items()
        for n, (amount, period) in enumerate([(Decimal(999), "day"), (b.amount_usd, "month")])])
    rows = [cost_row(f"op-{i}", cost, client_id=c,
                     created_at=START + timedelta(minutes=i))
            for i, (c, cost) in enumerate({**SPEND, **LONG_SPEND}.items())]
    # outside [START, END): not spend of the month
    rows += [cost_row(f"late-{c}", "7", client_id=c, created_at=END) for c in CLIENTS[:50]]
    ClickHouseCostStore(chdb_client, name).write(rows, dedup_token="form-rows")
    return name


@pytest.fixture(scope="module")
def server(chdb_client: Client) -> Iterator[QueryServer]:
    with QueryServer(chdb_client) as running:
        yield running


@pytest.fixture
def http(server: QueryServer) -> Iterator[Client]:
    host, port = server.url.removeprefix("http://").split(":")
    client = clickhouse_connect.get_client(host=host, port=int(port), username=server.user,
                                           password=server.password)
    yield client
    client.close()


def post_form(server: QueryServer, fields: list[tuple[str, object]],
              url_query: str = "") -> tuple[int, dict[str, str], bytes]:
    body, content_type = encode_multipart_formdata(fields)
    request = urllib.request.Request(
        f"{server.url}/{url_query}", data=body,
        headers={"Content-Type": content_type, "X-ClickHouse-User": server.user,
                 "X-ClickHouse-Key": server.password})
    try:
        with urllib.request.urlopen(request, timeout=30) as r:
            return r.status, dict(r.headers), r.read()
    except urllib.error.HTTPError as err:
        return err.code, dict(err.headers), err.read()


def test_budget_lookups_for_600_clients_answer_exactly_through_the_endpoint(
    http: Client, chdb_client: Client, database: str
) -> None:
    over_http = BudgetStore(http, database)
    # the client ids alone are past clickhouse-connect's URL budget: the query goes as a form
    assert len(str(CLIENTS)) > MAX_URL_BIND_PARAM_LENGTH

    budgets = over_http.budgets(CLIENTS)
    spend = over_http.spend(CLIENTS, START, END)

    assert budgets == BUDGETS
    assert spend == {c: SPEND.get(c, Decimal(0)).quantize(Decimal("0.000000001"))
                     for c in CLIENTS}
    assert sum(spend.values()) == sum(SPEND.values())
    in_process = BudgetStore(chdb_client, database)
    assert (budgets, spend) == (in_process.budgets(CLIENTS),
                                in_process.spend(CLIENTS, START, END))


def test_lookups_past_a_form_fields_limit_are_asked_in_parts(
    http: Client, database: str
) -> None:
    assert len(str(LONG)) > Limits().max_form_field_bytes

    store = BudgetStore(http, database)

    assert store.budgets(LONG) == LONG_BUDGETS
    assert store.spend(LONG, START, END) == {
        c: LONG_SPEND.get(c, Decimal(0)).quantize(Decimal("0.000000001")) for c in LONG}


def test_form_fields_are_read_as_clickhouse_reads_them(
    server: QueryServer, database: str
) -> None:
    status, _, body = post_form(server, [
        ("query", "SELECT client_id FROM client_budgets FINAL "),
        ("query", "WHERE client_id IN {ids:Array(String)} AND {n:UInt8} = one "),
        ("query", "ORDER BY client_id"),
        ("param_ids", str(CLIENTS[:15])),
        ("param_n", "2"),  # the URL's value wins, as in ClickHouse
        ("max_result_rows", "1"),  # settings come from the URL only: ignored
        ("readonly", "0"),
    ], f"?database={database}&param_n=1&query={quote('WITH 1 AS one ')}")

    assert (status, body.decode().split()) == (200, ["client-0000", "client-0007",
                                                     "client-0014"])


@pytest.mark.parametrize(("url_query", "fields"), [
    ("", [("query", "INSERT INTO client_budgets (client_id) VALUES ('smuggled')")]),
    ("", [("query", "ALTER TABLE client_budgets DELETE WHERE 1"), ("readonly", "0")]),
    ("", [("query", "DROP TABLE client_budgets"), ("param_x", "1")]),
    # the URL's query and the form's are one statement: checked whole
    ("?query=" + quote("INSERT INTO client_budgets (client_id) "),
     [("query", "VALUES ('smuggled')")]),
])
def test_a_write_in_a_form_query_field_is_refused(
    server: QueryServer, chdb_client: Client, database: str, url_query: str,
    fields: list[tuple[str, object]]
) -> None:
    separator = "&" if url_query else "?"
    status, headers, body = post_form(server, fields,
                                      f"{url_query}{separator}database={database}")

    assert (status, headers["X-ClickHouse-Exception-Code"]) == (403, "164")
    assert body.startswith(b"Code: 164. DB::Exception: Cannot execute ")
    assert b"in readonly mode" in body
    assert chdb_client.query(
        "SELECT countIf(client_id = 'smuggled'), uniqExact(client_id) "
        f"FROM `{database}`.client_budgets").result_rows == [(0, len(BUDGETS) + len(LONG_BUDGETS))]


def test_a_file_part_is_external_data_and_refused(server: QueryServer, database: str) -> None:
    status, headers, body = post_form(server, [
        ("query", "SELECT * FROM ids"),
        ("ids", ("ids.tsv", b"client-0000\n", "text/tab-separated-values")),
    ], f"?database={database}&ids_structure={quote('id String')}")

    assert (status, headers["X-ClickHouse-Exception-Code"]) == (501, "48")
    assert body.startswith(b"Code: 48. DB::Exception: External data (multipart) is not "
                           b"supported. (NOT_IMPLEMENTED)")


def test_a_form_over_the_field_limit_is_refused_and_the_endpoint_answers_on(
    server: QueryServer, http: Client
) -> None:
    status, headers, body = post_form(
        server, [("query", "SELECT 1")] + [(f"param_{i}", "1") for i in range(1000)])

    assert (status, headers["X-ClickHouse-Exception-Code"]) == (413, "290")
    assert body.startswith(b"Code: 290. DB::Exception: The form has more than 1000 fields")
    assert http.command("SELECT 1") == 1
