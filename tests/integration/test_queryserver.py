"""The embedded read endpoint, driven by clients that know only ClickHouse's HTTP interface:
clickhouse-connect's ``HttpClient`` and plain ``urllib``.

Shares the session's one chDB path (``<basetemp>/chdb``) with the other ClickHouse tests.
"""

from __future__ import annotations

import json
import threading
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from urllib.parse import quote

import clickhouse_connect
import pytest
from clickhouse_connect.driver.client import Client
from clickhouse_connect.driver.exceptions import DatabaseError

from aipipe.consumers.costs.connect import open_clickhouse
from aipipe.consumers.costs.migrations import migrate
from aipipe.consumers.costs.rows import CostRow
from aipipe.consumers.costs.store import ClickHouseCostStore, StoreError
from aipipe.infra.endpoint import ENDPOINT_FILE, find_endpoint
from aipipe.infra.queryserver import QueryError, QueryServer, QueryServerError
from tests.support.rows import cost_row as row

pytestmark = pytest.mark.e2e

T0 = datetime(2025, 11, 1, 9, 30, 0, 250_000, tzinfo=UTC)


def cost_row(i: int, cost: str) -> CostRow:
    return row(
        f"op-{i}", cost, client_id=f"client-{i % 3}", event_id=f"evt-{i}", offset=i,
        requested_at=T0 + timedelta(seconds=i),
        created_at=T0 + timedelta(seconds=i, milliseconds=7),
    )


ROWS = [cost_row(i, f"{i}.{i:09d}") for i in range(1, 31)]


@pytest.fixture(scope="module")
def database(chdb_client: Client) -> str:
    name = f"reads_{uuid.uuid4().hex[:12]}"
    migrate(chdb_client, name)
    ClickHouseCostStore(chdb_client, name).write(ROWS, dedup_token="rows")
    return name


@pytest.fixture(scope="module")
def server(chdb_client: Client) -> Iterator[QueryServer]:
    with QueryServer(chdb_client) as running:
        yield running


@pytest.fixture
def http(server: QueryServer, database: str) -> Iterator[Client]:
    client = connect(server, database)
    yield client
    client.close()


def connect(server: QueryServer, database: str = "") -> Client:
    host, port = server.url.removeprefix("http://").split(":")
    return clickhouse_connect.get_client(host=host, port=int(port), database=database,
                                         username=server.user, password=server.password)


def get(url: str, body: bytes | None = None,
        server: QueryServer | None = None) -> tuple[int, dict[str, str], bytes]:
    headers = {} if server is None else {"X-ClickHouse-User": server.user,
                                         "X-ClickHouse-Key": server.password}
    try:
        request = urllib.request.Request(url, data=body, headers=headers)
        with urllib.request.urlopen(request, timeout=10) as r:
            return r.status, dict(r.headers), r.read()
    except urllib.error.HTTPError as err:
        return err.code, dict(err.headers), err.read()


def test_clickhouse_connect_reads_decimals_and_times_exactly(http: Client) -> None:
    result = http.query(
        "SELECT operation_id, cost_usd, created_at, client_id FROM ai_cost_tracking FINAL "
        "WHERE client_id = {c:String} ORDER BY kafka_offset",
        parameters={"c": "client-1"},
    )

    expected = [r for r in ROWS if r.client_id == "client-1"]
    assert [(op, cost) for op, cost, _, _ in result.result_rows] == [
        (r.operation_id, r.cost_usd) for r in expected
    ]
    assert [t.replace(tzinfo=UTC) for _, _, t, _ in result.result_rows] == [
        r.created_at for r in expected
    ]
    assert result.result_rows[0][1] == Decimal("1.000000001")
    assert result.query_id  # from X-ClickHouse-Query-Id


def test_the_cost_store_reads_the_same_over_http_as_in_process(
    http: Client, chdb_client: Client, database: str
) -> None:
    over_http = ClickHouseCostStore(http, database)
    in_process = ClickHouseCostStore(chdb_client, database)

    assert over_http.totals() == in_process.totals()
    assert sum(cost for _, cost in over_http.totals().values()) == sum(r.cost_usd for r in ROWS)
    assert over_http.summary("client-2") == in_process.summary("client-2")
    window = (T0, T0 + timedelta(seconds=10))
    assert over_http.spend("client-0", *window) == in_process.spend("client-0", *window)


def test_a_plain_get_answers_like_clickhouse(server: QueryServer) -> None:
    status, headers, body = get(f"{server.url}/?query={quote('SELECT 1')}", server=server)

    assert (status, body) == (200, b"1\n")
    assert headers["X-ClickHouse-Format"] == "TabSeparated"
    assert headers["X-ClickHouse-Timezone"]
    assert json.loads(headers["X-ClickHouse-Summary"])["read_rows"] == "1"
    assert get(f"{server.url}/ping")[2] == b"Ok.\n"


def test_query_parameter_and_body_are_one_query(server: QueryServer, database: str) -> None:
    status, headers, body = get(
        f"{server.url}/?database={database}&query={quote('SELECT count()')}",
        b"FROM ai_cost_tracking FINAL FORMAT JSONEachRow", server,
    )

    assert (status, json.loads(body)) == (200, {"count()": len(ROWS)})
    assert headers["X-ClickHouse-Format"] == "JSONEachRow"


@pytest.mark.parametrize(
    "sql",
    [
        "INSERT INTO ai_cost_tracking (operation_id) VALUES ('x')",
        "DROP TABLE ai_cost_tracking",
        "TRUNCATE TABLE ai_cost_tracking",
        "ALTER TABLE ai_cost_tracking DELETE WHERE 1",
        "CREATE TABLE evil (a Int32) ENGINE = Memory",
        "KILL QUERY WHERE 1",
        "SET readonly = 0",
        "/* looks harmless */ OPTIMIZE TABLE ai_cost_tracking FINAL",
    ],
)
def test_writes_are_refused(http: Client, chdb_client: Client, database: str, sql: str) -> None:
    with pytest.raises(DatabaseError, match="readonly") as caught:
        http.command(sql)

    assert "Code: 164" in str(caught.value)
    assert chdb_client.command(f"SELECT count() FROM `{database}`.ai_cost_tracking") == len(ROWS)


def test_the_engine_refuses_what_the_statement_check_lets_through(http: Client) -> None:
    with pytest.raises(DatabaseError, match="Function 'file' is not allowed"):
        http.query("SELECT * FROM file('/etc/hostname', 'LineAsString')")
    with pytest.raises(DatabaseError, match="readonly"):
        http.query("SELECT 1 SETTINGS readonly = 0")


def test_insert_through_the_client_is_refused(http: Client) -> None:
    with pytest.raises(DatabaseError, match="readonly"):
        http.insert("ai_cost_tracking", [["op-x"]], column_names=["operation_id"])


def test_a_refused_write_over_plain_http_is_403_with_the_code(
    server: QueryServer, database: str
) -> None:
    status, headers, body = get(
        f"{server.url}/?database={database}", b"DROP TABLE ai_cost_tracking", server
    )

    assert status == 403
    assert headers["X-ClickHouse-Exception-Code"] == "164"
    assert body.startswith(b"Code: 164. DB::Exception: Cannot execute DROP query in readonly mode")


def test_into_outfile_and_multi_statements_are_refused(http: Client, tmp_path: Path) -> None:
    target = tmp_path / "out.tsv"
    with pytest.raises(DatabaseError, match="INTO OUTFILE"):
        http.command(f"SELECT 1 INTO OUTFILE '{target}'")
    with pytest.raises(DatabaseError, match="Multi-statements"):
        http.command("SELECT 1; SELECT 2")

    assert not target.exists()


def test_a_bad_query_raises_the_servers_message(http: Client) -> None:
    with pytest.raises(DatabaseError, match="Unknown expression identifier `no_such_column`") as e:
        http.query("SELECT no_such_column FROM ai_cost_tracking")

    assert "Code: 47" in str(e.value)


def test_an_unknown_database_is_an_error(server: QueryServer) -> None:
    status, headers, body = get(f"{server.url}/?database=no_such_db&query=SELECT+1",
                                server=server)

    assert (status, headers["X-ClickHouse-Exception-Code"]) == (404, "81")
    assert b"no_such_db" in body
    assert get(f"{server.url}/?database={quote('x`; DROP')}&query=SELECT+1",
               server=server)[0] == 404


def test_a_port_in_use_is_one_clear_error(server: QueryServer, chdb_client: Client) -> None:
    port = int(server.url.rsplit(":", 1)[1])

    with pytest.raises(QueryServerError, match="AIPIPE_QUERY_PORT"):
        QueryServer(chdb_client, port=port).start()


def test_migrating_through_the_read_endpoint_is_a_store_error(server: QueryServer) -> None:
    url = server.url.replace("http://", f"http://{server.user}:{server.password}@")
    with pytest.raises(StoreError, match="readonly"):
        open_clickhouse(url, "anything")


def test_readers_run_while_the_owner_writes(server: QueryServer, chdb_client: Client) -> None:
    database = f"busy_{uuid.uuid4().hex[:12]}"
    migrate(chdb_client, database)
    owner = ClickHouseCostStore(chdb_client, database)
    batches = [[cost_row(b * 100 + i, "0.001000001") for i in range(100)] for b in range(20)]
    errors: list[BaseException] = []
    reads: list[int] = []
    done = threading.Event()

    def read() -> None:
        client = connect(server)
        reader = ClickHouseCostStore(client, database)
        try:
            while not done.is_set():
                assert sum(n for n, _ in reader.totals().values()) <= 2000
                reads.append(1)
        except BaseException as exc:  # surfaced below
            errors.append(exc)
        finally:
            client.close()

    readers = [threading.Thread(target=read) for _ in range(3)]
    for t in readers:
        t.start()
    for n, batch in enumerate(batches):
        owner.write(batch, dedup_token=f"busy:{n}")
    done.set()
    for t in readers:
        t.join(timeout=30)

    assert errors == [] and len(reads) > 3
    assert sum(cost for _, cost in owner.totals().values()) == Decimal("2.000002000")


def test_the_endpoint_is_published_and_found(chdb_client: Client, tmp_path: Path) -> None:
    assert find_endpoint(tmp_path) is None
    with QueryServer(chdb_client, home=tmp_path) as running:
        published = json.loads((tmp_path / ENDPOINT_FILE).read_text())
        assert published["url"] == running.url
        assert (published["user"], published["password"]) == (running.user, running.password)
        assert published["chdb_path"] == running.engine.path
        assert (tmp_path / ENDPOINT_FILE).stat().st_mode & 0o777 == 0o600
        assert find_endpoint(tmp_path) == running.url
    assert not (tmp_path / ENDPOINT_FILE).exists()
    assert find_endpoint(tmp_path) is None


def test_a_stale_endpoint_file_is_not_found(tmp_path: Path) -> None:
    (tmp_path / ENDPOINT_FILE).write_text(json.dumps({"url": "http://127.0.0.1:9", "pid": 1}))

    assert find_endpoint(tmp_path, timeout=0.5) is None


@pytest.mark.parametrize(
    ("sql", "fmt"),
    [
        ("SELECT 1", None),
        ("select 1 FORMAT Native", "Native"),
        ("SELECT ';' AS x -- ; trailing\n FORMAT JSONEachRow;", "JSONEachRow"),
        ("(SELECT 1) UNION ALL (SELECT 2)", None),
        ("WITH 1 AS x SELECT x /* ; */", None),
        ("SHOW TABLES", None),
        ("DESCRIBE TABLE ai_cost_tracking", None),
        ("EXISTS TABLE ai_cost_tracking FORMAT JSON", "JSON"),
        ("EXPLAIN SELECT 1", None),
    ],
)
def test_read_statements_pass_the_check(server: QueryServer, sql: str, fmt: str | None) -> None:
    assert server.engine.classify(sql).format == fmt


@pytest.mark.parametrize(
    ("sql", "code"),
    [
        ("", 62),
        ("  -- only a comment", 62),
        ("SELECT 1; DROP TABLE t", 62),
        ("SELECT 1 into /* x */ outfile 'f'", 497),
        ("'SELECT' ; DROP TABLE t", 62),
        ("SYSTEM SHUTDOWN", 164),
        ("USE other", 164),
    ],
)
def test_other_statements_fail_the_check(server: QueryServer, sql: str, code: int) -> None:
    with pytest.raises(QueryError) as caught:
        server.engine.classify(sql)
    assert caught.value.code == code


def test_headers_and_gzip_both_ways_as_clickhouse_takes_them(
    server: QueryServer, database: str
) -> None:
    import gzip

    body = gzip.compress(b"SELECT count() FROM ai_cost_tracking FINAL")
    request = urllib.request.Request(
        f"{server.url}/?enable_http_compression=1", data=body,
        headers={"X-ClickHouse-User": server.user, "X-ClickHouse-Key": server.password,
                 "X-ClickHouse-Database": database, "X-ClickHouse-Format": "JSONEachRow",
                 "Content-Encoding": "gzip", "Accept-Encoding": "gzip"})
    with urllib.request.urlopen(request, timeout=10) as reply:
        assert reply.headers["Content-Encoding"] == "gzip"
        assert reply.headers["X-ClickHouse-Format"] == "JSONEachRow"
        assert json.loads(gzip.decompress(reply.read())) == {"count()": len(ROWS)}


def test_a_default_clickhouse_connect_client_works(server: QueryServer, database: str) -> None:
    """compress=True: clickhouse-connect asks for HTTP compression and gets gzip."""
    client = connect(server, database)
    assert client.compression
    assert client.command("SELECT count() FROM ai_cost_tracking FINAL") == len(ROWS)
    assert client.query("SELECT number FROM numbers(300000)").row_count == 300_000  # streamed


def test_a_reader_reads_the_path_its_url_names(
    chdb_client: Client, tmp_path: Path, database: str
) -> None:
    from aipipe.consumers.costs.store import StoreError
    from aipipe.infra.settings import Settings
    from aipipe.reader import pipeline_store, serving_endpoint

    with QueryServer(chdb_client, home=tmp_path):
        same = Settings(home=tmp_path, clickhouse_url=f"chdb://{chdb_client.path}",
                        clickhouse_database=database)
        other = Settings(home=tmp_path, clickhouse_url=f"chdb://{tmp_path / 'other'}",
                         clickhouse_database=database)
        assert serving_endpoint(same) is not None
        assert serving_endpoint(other) is None  # open_reader opens /other itself
        with pytest.raises(StoreError, match=r"serves .* not .*other"):
            pipeline_store(other, lambda: True, timeout=5)
