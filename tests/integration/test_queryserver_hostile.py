"""Hostile queries against the embedded read endpoint and ``aipipe sql``.

Every query here is refused with ClickHouse's error (a code and ``DB::Exception``), or
bounded by a server-side limit; the canary file is never read, no target file is ever
written, the owner's data is unchanged and its memory stays bounded. The same list runs
through raw HTTP (exact bytes, no client rewriting) and through ``aipipe sql``'s own
path (``checked`` then ``run_query`` on the chDB path, which serves itself).

Then what a request can cost the endpoint before it knows who asks (bodies, compressed
bodies, headers, connections), settings and database names that would reach past the
check, and clients that would hold a query's slot past its time.
"""

from __future__ import annotations

import base64
import contextlib
import gzip
import http.client
import os
import select
import socket
import threading
import time
import tracemalloc
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TypeVar
from urllib.parse import quote, urlencode

import cramjam
import pytest
from clickhouse_connect.driver.client import Client

from aipipe.consumers.costs.migrations import migrate
from aipipe.infra.endpoint import ADMISSION_QUOTA_KEY
from aipipe.infra.queryserver import ADMISSION_KEY_HEADER, Limits, QueryServer
from aipipe.infra.settings import Settings
from aipipe.processes import wait_for
from aipipe.sqlcmd import SqlError, checked, run_query

pytestmark = pytest.mark.e2e
T = TypeVar("T")

SECRET = f"canary-{uuid.uuid4().hex}"
LIMITS = Limits(max_execution_time=20, max_memory_usage=300_000_000,
                max_rows_to_read=1_000_000_000_000, max_result_rows=0,
                max_result_bytes=50_000_000, max_body_bytes=65_536)


@pytest.fixture(scope="module")
def canary(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("canary") / "secret.txt"
    path.write_text(SECRET)
    return path


@pytest.fixture(scope="module")
def outdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("outfiles")


@pytest.fixture(scope="module")
def database(chdb_client: Client) -> str:
    name = f"hostile_{uuid.uuid4().hex[:10]}"
    migrate(chdb_client, name)
    chdb_client.command(f"INSERT INTO `{name}`.events_archive (event_id) VALUES ('keep')")
    return name


@pytest.fixture(scope="module")
def server(chdb_client: Client) -> Iterator[QueryServer]:
    with QueryServer(chdb_client, limits=LIMITS) as running:
        yield running


def hostile(canary: Path, out: Path) -> list[str]:
    f, c = f"{out}/x.tsv", str(canary)
    return [
        # writes and DDL
        "INSERT INTO events_archive (event_id) VALUES ('x')",
        "INSERT INTO events_archive (event_id) SELECT 'x'",
        "ALTER TABLE events_archive DELETE WHERE 1",
        "ALTER TABLE events_archive UPDATE event_id = 'x' WHERE 1",
        "DELETE FROM events_archive WHERE 1",
        "TRUNCATE TABLE events_archive",
        "DROP TABLE events_archive",
        "RENAME TABLE events_archive TO gone",
        "CREATE TABLE evil (a String) ENGINE = Memory",
        f"CREATE TABLE evil ENGINE = File(TSV, '{f}') AS SELECT 1",
        "OPTIMIZE TABLE events_archive FINAL",
        "DETACH TABLE events_archive",
        "CREATE USER evil IDENTIFIED BY 'x'",
        "GRANT ALL ON *.* TO default",
        f"BACKUP TABLE events_archive TO File('{f}')",
        # SYSTEM, SET, KILL, USE
        "SYSTEM SHUTDOWN",
        "SYSTEM RELOAD CONFIG",
        "SYSTEM FLUSH LOGS",
        "SET readonly = 0",
        "SET max_execution_time = 0",
        "KILL QUERY WHERE 1",
        "USE system",
        # several statements, hidden by every comment and string form the lexer knows
        "SELECT 1; DROP TABLE events_archive",
        "SELECT 1 -- comment\n; DROP TABLE events_archive",
        "SELECT 1 # hash comment\n; DROP TABLE events_archive",
        "#!/bin/sh shebang comment\nSELECT 1; DROP TABLE events_archive",
        "SELECT 1 /* outer /* nested */ still comment */; DROP TABLE events_archive",
        "SELECT 'a\\'; DROP TABLE events_archive; --'; DROP TABLE events_archive",
        "SELECT 'it''s'; DROP TABLE events_archive",
        'SELECT "col;umn" FROM events_archive; DROP TABLE events_archive',
        "SELECT `a;b` FROM events_archive; DROP TABLE events_archive",
        "SELECT $$ ; DROP TABLE x $$; DROP TABLE events_archive",
        "SELECT $tag$ ' $tag$; DROP TABLE events_archive",
        "SELECT \u2018quoted\u2019; DROP TABLE events_archive",
        "SELECT 1;\nINSERT INTO events_archive (event_id) VALUES ('x')",
        # INTO OUTFILE in every position and spelling
        f"SELECT 1 INTO OUTFILE '{f}'",
        f"select 1 into outfile '{f}' TRUNCATE",
        f"SELECT 1 INTO OUTFILE '{f}' APPEND",
        f"SELECT 1 INTO OUTFILE '{f}' AND STDOUT",
        f"SELECT 1 INTO OUTFILE '{f}' COMPRESSION 'gzip' FORMAT CSV",
        f"SELECT 1 INTO /* hidden */ OUTFILE '{f}'",
        f"SELECT 1 INTO -- hidden\n OUTFILE '{f}'",
        f"SELECT 1 UNION ALL SELECT 2 INTO OUTFILE '{f}'",
        f"WITH 1 AS x SELECT x INTO OUTFILE '{f}'",
        f"SHOW TABLES INTO OUTFILE '{f}'",
        f"DESCRIBE TABLE events_archive INTO OUTFILE '{f}'",
        f"EXISTS TABLE events_archive INTO OUTFILE '{f}'",
        f"EXPLAIN SELECT 1 INTO OUTFILE '{f}'",
        f"SELECT 1 INTO OUTFILE $${f}$$",
        # functions that reach files, URLs, S3, other databases, processes or the server
        f"SELECT file('{c}')",
        f"SELECT FILE('{c}')",
        f"SELECT `file`('{c}')",
        f"SELECT * FROM file('{c}', 'LineAsString')",
        f"DESCRIBE file('{c}', 'LineAsString')",
        f"SELECT * FROM (SELECT * FROM file('{c}', 'LineAsString'))",
        f"SELECT 1 WHERE 1 IN (SELECT length(line) FROM file('{c}', 'LineAsString'))",
        "SELECT * FROM url('http://127.0.0.1:9/x', 'CSV', 'a String')",
        "SELECT * FROM s3('http://127.0.0.1:9/b/k.csv', 'CSV', 'a String')",
        "SELECT * FROM remote('127.0.0.1:9000', system.one)",
        "SELECT * FROM cluster('default', system.one)",
        "SELECT * FROM mysql('127.0.0.1:3306', 'db', 't', 'u', 'p')",
        "SELECT * FROM postgresql('127.0.0.1:5432', 'db', 't', 'u', 'p')",
        f"SELECT * FROM sqlite('{c}', 't')",
        "SELECT * FROM executable('id', 'TSV', 'a String')",
        "SELECT * FROM input('a String')",
        "SELECT * FROM merge('system', '.*')",
        "SELECT * FROM hdfs('hdfs://127.0.0.1:9/x', 'CSV', 'a String')",
        "SELECT * FROM jdbc('jdbc:x', 't')",
        "SELECT * FROM system.processes",
        "SELECT query FROM system.query_log",
        "SELECT * FROM system.users",
        "SELECT 1 IN system.processes",
        "SELECT getServerSetting('path')",
        "SELECT hostName(), filesystemAvailable()",
        "SELECT dictGet('d', 'a', 1)",
        "SELECT joinGet('events_archive', 'payload', 'x')",
        "SELECT sleep(3)",
        "SELECT * FROM {t:Identifier}",
    ]


def _auth(server: QueryServer) -> dict[str, str]:
    token = base64.b64encode(f"{server.user}:{server.password}".encode()).decode()
    return {"Authorization": f"Basic {token}"}


def post(server: QueryServer, body: bytes, params: dict[str, str] | None = None,
         headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], bytes]:
    url = f"{server.url}/?{urlencode(params or {})}"
    request = urllib.request.Request(url, data=body, headers={**_auth(server), **(headers or {})})
    try:
        with urllib.request.urlopen(request, timeout=60) as reply:
            return reply.status, dict(reply.headers), reply.read()
    except urllib.error.HTTPError as err:
        return err.code, dict(err.headers), err.read()


def assert_clickhouse_error(status: int, headers: dict[str, str], body: bytes) -> None:
    assert status >= 400, body[:300]
    code = headers["X-ClickHouse-Exception-Code"]
    assert body.startswith(f"Code: {code}. DB::Exception: ".encode()), body[:300]


def assert_untouched(chdb_client: Client, database: str, outdir: Path) -> None:
    assert list(outdir.iterdir()) == []
    assert chdb_client.command(f"SELECT count() FROM `{database}`.events_archive") == 1


def test_the_list_is_long_enough(canary: Path, outdir: Path) -> None:
    assert len(hostile(canary, outdir)) >= 40


def test_every_hostile_query_is_refused_by_the_endpoint(
    server: QueryServer, chdb_client: Client, database: str, canary: Path, outdir: Path
) -> None:
    for sql in hostile(canary, outdir):
        status, headers, body = post(server, sql.encode(), {"database": database})
        assert_clickhouse_error(status, headers, body)
        assert SECRET.encode() not in body, sql
    assert_untouched(chdb_client, database, outdir)


def test_every_hostile_query_is_refused_by_aipipe_sql(
    chdb_client: Client, database: str, canary: Path, outdir: Path, tmp_path: Path
) -> None:
    """``aipipe sql`` without a pipeline: it opens the chDB path and serves itself."""
    settings = Settings(home=tmp_path, clickhouse_url=f"chdb://{chdb_client.path}",
                        clickhouse_database=database)
    for sql in hostile(canary, outdir):
        with pytest.raises(SqlError) as refused:
            checked(sql)
            run_query(settings, sql, {})
        assert SECRET not in str(refused.value)
    assert_untouched(chdb_client, database, outdir)


@pytest.mark.parametrize("params", [
    {"readonly": "0"},
    {"allow_ddl": "0"},
    {"user_files_path": "/"},
    {"max_execution_time": "0", "query": "SELECT getSetting('max_execution_time')"},
    {"max_execution_time": "100000", "query": "SELECT getSetting('max_execution_time')"},
    {"max_memory_usage": "0", "query": "SELECT getSetting('max_memory_usage')"},
    {"max_result_bytes": "99999999999", "query": "SELECT getSetting('max_result_bytes')"},
])
def test_settings_in_the_url_never_raise_a_limit_or_leave_read_only(
    server: QueryServer, params: dict[str, str]
) -> None:
    query = params.get("query")
    status, headers, body = post(server, b"" if query else b"SELECT 1", params)
    if query is None:  # READONLY, or UNKNOWN_SETTING for a name chDB does not have
        assert_clickhouse_error(status, headers, body)
        assert headers["X-ClickHouse-Exception-Code"] in ("164", "115")
        return
    name = query.split("'")[1]
    server_value = LIMITS.engine_settings()[name]
    assert (status, float(body)) == (200, server_value)


def test_asking_for_a_setting_already_in_force_changes_nothing(server: QueryServer) -> None:
    """Drivers send defaults such as ``allow_ddl=1``: accepted, and DDL is still refused."""
    status, _, body = post(server, b"SELECT 1", {"allow_ddl": "1"})
    assert (status, body) == (200, b"1\n")
    status, headers, body = post(server, b"CREATE TABLE t (a Int8) ENGINE = Memory",
                                 {"allow_ddl": "1"})
    assert_clickhouse_error(status, headers, body)


def test_a_client_may_lower_a_limit(server: QueryServer) -> None:
    status, _, body = post(server, b"SELECT getSetting('max_execution_time')",
                           {"max_execution_time": "3"})
    assert (status, body) == (200, b"3\n")
    status, headers, body = post(server, b"SELECT count() FROM numbers(10000000)",
                                 {"max_rows_to_read": "1000"})
    assert_clickhouse_error(status, headers, body)
    assert headers["X-ClickHouse-Exception-Code"] == "158"  # TOO_MANY_ROWS


@pytest.mark.parametrize("headers", [{}, {"Content-Encoding": "gzip"}])
def test_an_oversized_body_is_refused_before_it_is_read(
    server: QueryServer, headers: dict[str, str]
) -> None:
    sql = b"SELECT '" + b"x" * 200_000 + b"'"
    body = gzip.compress(sql) if headers else sql  # a small gzip that inflates past the limit
    status, reply_headers, reply = post(server, body, headers=headers)
    assert status == 413
    assert reply_headers["X-ClickHouse-Exception-Code"] == "307"
    assert b"larger than the read endpoint's limit of 65536 bytes" in reply


def _rss() -> int:
    return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def test_huge_results_are_bounded_and_streamed_without_growing_the_owner(
    server: QueryServer,
) -> None:
    before = _rss()
    status, headers, body = post(server, b"SELECT groupArray(number) FROM numbers(1000000000)")
    assert_clickhouse_error(status, headers, body)
    assert headers["X-ClickHouse-Exception-Code"] == "241"  # MEMORY_LIMIT_EXCEEDED

    request = urllib.request.Request(f"{server.url}/", headers=_auth(server),
                                     data=b"SELECT number, repeat('x', 100) FROM numbers(1e10)")
    received = 0
    with urllib.request.urlopen(request, timeout=60) as reply:  # headers come at once
        assert reply.headers["Transfer-Encoding"] == "chunked"
        with pytest.raises((http.client.HTTPException, OSError)):  # cut off by the limit
            while chunk := reply.read(1 << 20):
                received += len(chunk)
            raise OSError("the stream ended without its error")
    assert 1_000_000 < received < LIMITS.max_result_bytes * 1.5
    assert _rss() - before < 400_000_000


def _running(chdb_client: Client, marker: str) -> int:
    return int(chdb_client.command(
        "SELECT count() FROM system.processes WHERE query LIKE {m:String} "
        "AND query NOT LIKE '%system.processes%'", parameters={"m": f"%{marker}%"}))


@pytest.mark.parametrize("sql", [
    # streams: the disconnect shows as a failed write
    "SELECT number, repeat('{m}', 100) FROM numbers(1e12)",
    # one row at the very end: the disconnect shows only on the socket
    "SELECT count() FROM numbers(1e12) WHERE NOT startsWith(toString(number), '{m}')",
])
def test_a_client_that_disconnects_cancels_its_query(
    server: QueryServer, chdb_client: Client, sql: str
) -> None:
    marker = f"gone{uuid.uuid4().hex[:8]}"
    body = sql.format(m=marker).encode()
    host, port = server.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        auth = _auth(server)["Authorization"]
        sock.sendall(f"POST / HTTP/1.1\r\nHost: {host}\r\nAuthorization: {auth}\r\n"
                     f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
        wait_for(lambda: _running(chdb_client, marker) == 1, 10, "the query to start")
        if "repeat" in sql:
            assert sock.recv(65536)
    started = time.monotonic()
    wait_for(lambda: _running(chdb_client, marker) == 0, 10, "the query to be cancelled")
    assert time.monotonic() - started < LIMITS.max_execution_time / 2


def test_without_the_password_or_from_another_host_nothing_runs(server: QueryServer) -> None:
    url = f"{server.url}/?query={quote('SELECT 1')}"
    for headers in ({}, {"X-ClickHouse-User": server.user, "X-ClickHouse-Key": "wrong"},
                    {"Authorization": "Basic " + base64.b64encode(b"default:").decode()}):
        try:
            urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=10)
            raise AssertionError("answered without the password")
        except urllib.error.HTTPError as err:
            assert err.code == 401
            assert err.headers["X-ClickHouse-Exception-Code"] == "516"
            assert err.read().startswith(b"Code: 516. DB::Exception: ")
    for host in ("evil.example", "192.168.1.10", "localhost.evil.example"):
        request = urllib.request.Request(url, headers={**_auth(server), "Host": host})
        try:
            urllib.request.urlopen(request, timeout=10)
            raise AssertionError(f"answered Host {host}")
        except urllib.error.HTTPError as err:
            assert (err.code, err.headers["X-ClickHouse-Exception-Code"]) == (403, "195")
    request = urllib.request.Request(url, headers={**_auth(server),
                                                   "Origin": "http://evil.example"})
    with pytest.raises(urllib.error.HTTPError, match="403"):
        urllib.request.urlopen(request, timeout=10)
    for params in ({"user": server.user, "password": server.password}, {}):
        request = urllib.request.Request(f"{url}&{urlencode(params)}",
                                         headers={} if params else _auth(server))
        with urllib.request.urlopen(request, timeout=10) as reply:
            assert reply.read() == b"1\n"


# -- settings that name a file ------------------------------------------------------------


@pytest.mark.parametrize("name", ["format_template_resultset", "format_template_row",
                                  "format_schema", "output_format_schema"])
def test_a_setting_that_names_a_file_is_refused_and_the_file_never_read(
    server: QueryServer, canary: Path, name: str
) -> None:
    status, headers, body = post(server, b"SELECT 1 FORMAT Template", {name: str(canary)})

    assert_clickhouse_error(status, headers, body)
    assert (status, headers["X-ClickHouse-Exception-Code"]) == (403, "164")
    assert f"Cannot modify '{name}' setting in readonly mode".encode() in body
    assert SECRET.encode() not in body


def test_output_settings_still_shape_the_result(server: QueryServer) -> None:
    status, _, body = post(server, b"SELECT 1, toUInt64(2) FORMAT CSV",
                           {"format_csv_delimiter": ";"})
    assert (status, body) == (200, b"1;2\n")
    status, _, body = post(server, b"SELECT toUInt64(2) AS n FORMAT JSONEachRow",
                           {"output_format_json_quote_64bit_integers": "1"})
    assert (status, body) == (200, b'{"n":"2"}\n')


def test_every_output_setting_allowed_is_one_the_engine_has(server: QueryServer) -> None:
    from aipipe.infra.queryserver import _OUTPUT_SETTINGS

    assert sorted(_OUTPUT_SETTINGS - server.engine.settings.keys()) == []


# -- the default database ----------------------------------------------------------------


SYSTEM_NAMES = ["system", "SYSTEM", "System", "system`--", "system` --", "system` /*"]


@pytest.mark.parametrize(("params", "headers"), [
    *[({"database": name}, {}) for name in [*SYSTEM_NAMES, "system`\n--"]],
    *[({}, {"X-ClickHouse-Database": name}) for name in SYSTEM_NAMES],
])
def test_the_default_database_is_never_system(server: QueryServer, params: dict[str, str],
                                              headers: dict[str, str]) -> None:
    """Unqualified names (``processes``) would skip the check of ``system.<table>``."""
    for sql in (b"SELECT currentDatabase()", b"SELECT count() FROM processes"):
        status, reply_headers, body = post(server, sql, params, headers)
        assert_clickhouse_error(status, reply_headers, body)
        assert reply_headers["X-ClickHouse-Exception-Code"] in ("497", "81"), body


def test_any_database_name_reaches_the_engine_quoted(
    server: QueryServer, chdb_client: Client
) -> None:
    name = f"odd-name `{uuid.uuid4().hex[:6]}"
    chdb_client.command(f"CREATE DATABASE `{name.replace('`', '``')}`")
    status, _, body = post(server, b"SELECT currentDatabase()", {"database": name})
    assert (status, body) == (200, name.encode() + b"\n")


# -- what an unauthenticated or malformed request costs ----------------------------------


@pytest.fixture(scope="module")
def roomy(chdb_client: Client) -> Iterator[QueryServer]:
    """An endpoint with the default body limit (1 MiB), as the pipeline runs it."""
    with QueryServer(chdb_client) as running:
        yield running


def _peak_bytes(call: Callable[[], T]) -> tuple[T, int]:
    """What ``call`` returned, and the peak of Python's allocations in the meantime (the
    endpoint's threads run in this process)."""
    tracemalloc.start()
    try:
        return call(), tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


@pytest.mark.parametrize("authenticated", [False, True])
def test_an_lz4_bomb_is_refused_without_being_inflated(roomy: QueryServer,
                                                       authenticated: bool) -> None:
    bomb = bytes(cramjam.lz4.compress(b"\0" * (200 << 20)))  # < 1 MiB, 200 MiB inside
    assert len(bomb) < roomy.limits.max_body_bytes
    url = f"{roomy.url}/?query={quote('SELECT 1')}"
    headers = {"Content-Encoding": "lz4", **(_auth(roomy) if authenticated else {})}

    def send() -> tuple[int, dict[str, str], bytes]:
        try:
            request = urllib.request.Request(url, data=bomb, headers=headers)
            with urllib.request.urlopen(request, timeout=30) as reply:
                return reply.status, dict(reply.headers), reply.read()
        except urllib.error.HTTPError as err:
            return err.code, dict(err.headers), err.read()

    (status, reply_headers, body), peak = _peak_bytes(send)

    assert_clickhouse_error(status, reply_headers, body)
    if authenticated:
        assert (status, reply_headers["X-ClickHouse-Exception-Code"]) == (413, "307")
        assert b"decompressed, is larger than the read endpoint's limit of 1048576" in body
    else:
        assert (status, reply_headers["X-ClickHouse-Exception-Code"]) == (401, "516")
    assert peak < 16 << 20  # not the 200 MiB inside


def _raw(server: QueryServer, head: str, body: bytes, timeout: float = 10) -> bytes:
    """Send ``head`` (request line and headers, credentials added) and ``body``; what comes
    back before the endpoint closes, or within ``timeout``."""
    host, port = server.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=timeout) as sock:
        auth = _auth(server)["Authorization"]
        sock.sendall(f"{head}\r\nHost: {host}\r\nAuthorization: {auth}\r\n\r\n".encode())
        with contextlib.suppress(OSError):  # the endpoint may refuse before it is all sent
            sock.sendall(body)
        reply = b""
        with contextlib.suppress(ConnectionResetError):
            while chunk := sock.recv(65536):
                reply += chunk
        return reply


@pytest.mark.parametrize(("head", "body"), [
    # a chunk-size line that never ends: read by a bounded readline, not into memory
    ("POST / HTTP/1.1\r\nTransfer-Encoding: chunked", b"0" * 300_000),
    # a negative size read to the end of the stream before
    ("POST / HTTP/1.1\r\nTransfer-Encoding: chunked", b"-5\r\nSELECT 1"),
    ("POST / HTTP/1.1\r\nTransfer-Encoding: chunked", b"8\r\nSELECT 1XX0\r\n\r\n"),
    ("POST / HTTP/1.1\r\nContent-Length: -1", b"SELECT 1"),
])
def test_a_malformed_body_framing_is_refused_at_once(server: QueryServer, head: str,
                                                     body: bytes) -> None:
    reply = _raw(server, head, body)

    status_line, _, rest = reply.partition(b"\r\n")
    assert status_line == b"HTTP/1.1 400 Bad Request", reply[:300]
    assert b"X-ClickHouse-Exception-Code: 246" in rest
    assert b"Code: 246. DB::Exception: " in rest


def test_headers_past_64_kib_in_all_are_refused_before_anything_else(
    server: QueryServer,
) -> None:
    """http.server alone would hold 100 lines of 64 KiB from anyone, on every connection."""
    host, port = server.url.removeprefix("http://").split(":")
    padding = "".join(f"X-Pad-{i}: {'x' * 8000}\r\n" for i in range(9))
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        sock.sendall(f"GET /?query=SELECT+1 HTTP/1.1\r\nHost: {host}\r\n{padding}\r\n".encode())
        assert sock.recv(4096).startswith(b"HTTP/1.1 431 ")
    padding = "".join(f"X-Pad-{i}: {'x' * 8000}\r\n" for i in range(7))
    status, _, body = post(server, b"SELECT 1", headers={"X-Pad": padding.replace("\r\n", " ")})
    assert (status, body) == (200, b"1\n")


def test_a_chunked_body_still_works(server: QueryServer) -> None:
    reply = _raw(server, "POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\nConnection: close",
                 b"4;ext=1\r\nSELE\r\n4\r\nCT 7\r\n0\r\nX-Trailer: 1\r\n\r\n")
    assert reply.startswith(b"HTTP/1.1 200 OK") and reply.endswith(b"\r\n\r\n7\n"), reply


def _answered(sock: socket.socket) -> bool:
    return bool(select.select([sock], [], [], 0)[0])


def test_connections_past_the_cap_are_answered_at_once_and_queries_are_not_lost(
    chdb_client: Client,
) -> None:
    cap = 6
    with QueryServer(chdb_client, limits=Limits(max_connections=cap)) as small:
        host, port = small.url.removeprefix("http://").split(":")
        idle = [socket.create_connection((host, int(port)), timeout=10) for _ in range(cap + 4)]
        try:
            wait_for(lambda: sum(map(_answered, idle)) == 4, 10,
                     "the connections past the cap to be answered")
            answers = [s.recv(4096) for s in idle if _answered(s)]
            assert all(a.startswith(b"HTTP/1.1 503 Service Unavailable") for a in answers)
            assert all(b"Code: 202. DB::Exception: Too many connections: the read endpoint "
                       b"keeps 6 open at most" in a for a in answers)
            status, headers, body = post(small, b"SELECT 1")  # refused, and told so
            assert (status, headers["X-ClickHouse-Exception-Code"]) == (503, "202"), body
        finally:
            for s in idle:
                s.close()
        wait_for(lambda: post(small, b"SELECT 1")[0] == 200, 10, "room for a query again")
        assert post(small, b"SELECT 1")[2] == b"1\n"


# -- slow readers and admission's slots --------------------------------------------------


def _read_slowly(sock: socket.socket, until: float, received: list[int]) -> None:
    """A client that reads 1 KiB a second (its receive buffer small), until the endpoint
    ends the connection or ``until``."""
    with contextlib.suppress(OSError):
        while time.monotonic() < until and (data := sock.recv(256)):
            received.append(len(data))
            time.sleep(0.25)


@pytest.mark.parametrize("fmt", ["TabSeparated", "JSON"])  # streamed, sent whole
def test_a_slow_reader_loses_its_slot_when_the_querys_time_is_up(
    chdb_client: Client, fmt: str
) -> None:
    seconds = 2
    marker = f"slow{uuid.uuid4().hex[:8]}"
    rows = "1e9" if fmt == "TabSeparated" else "150000"  # JSON: ~25 MB, sent whole
    sql = f"SELECT number, repeat('{marker}', 10) FROM numbers({rows}) FORMAT {fmt}".encode()
    limits = Limits(max_execution_time=seconds, max_concurrent=1, queue_seconds=20)
    with QueryServer(chdb_client, limits=limits) as small:
        host, port = small.url.removeprefix("http://").split(":")
        slow = socket.socket()
        slow.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        slow.connect((host, int(port)))
        started = time.monotonic()
        slow.sendall(f"POST / HTTP/1.1\r\nHost: {host}\r\nAuthorization: "
                     f"{_auth(small)['Authorization']}\r\nContent-Length: {len(sql)}\r\n\r\n"
                     .encode() + sql)
        received: list[int] = []
        reader = threading.Thread(target=_read_slowly, args=(slow, started + 30, received))
        reader.start()
        try:
            wait_for(lambda: bool(received), 10, "the first bytes of the result")
            status, _, body = post(small, b"SELECT 1")  # waits for the one slot
            waited = time.monotonic() - started
            assert (status, body) == (200, b"1\n")
            assert waited < seconds + 4, f"the slot came free after {waited:.1f} s"
            wait_for(lambda: _running(chdb_client, marker) == 0, 5, "the query to end")
        finally:
            slow.close()
            reader.join(timeout=35)


def test_admissions_slots_take_the_key_not_just_the_quota_key(chdb_client: Client) -> None:
    limits = Limits(max_concurrent=1, admission_concurrent=1, queue_seconds=0.3)
    with QueryServer(chdb_client, limits=limits) as small:
        lookup = {"quota_key": ADMISSION_QUOTA_KEY}
        key = {ADMISSION_KEY_HEADER: small.admission_key}
        with small.engine.slot(admission=False):  # an analyst's query holds the one slot
            status, headers, body = post(small, b"SELECT 1", lookup)  # anyone can send that
            assert (status, headers["X-ClickHouse-Exception-Code"]) == (503, "202")
            assert b"the read endpoint runs 1 at once (besides admission's budget lookups)" \
                in body
            assert post(small, b"SELECT 1", lookup, {ADMISSION_KEY_HEADER: "guess"})[0] == 503
            status, _, body = post(small, b"SELECT 1", lookup, key)
            assert (status, body) == (200, b"1\n")
            with small.engine.slot(admission=True):
                status, _, body = post(small, b"SELECT 1", lookup, key)
                assert status == 503
                assert b"admission's budget lookups run 1 at once, in slots of their own" in body


def test_admissions_lookups_carry_the_published_key_into_their_slots(
    chdb_client: Client, tmp_path: Path,
) -> None:
    """The key goes to admission through the endpoint file (0600), and the budget store's
    client sends it: its lookups get a slot while the analysts' one is taken."""
    from aipipe.infra.app.reader import budget_store_opener
    from aipipe.infra.endpoint import read_endpoint
    from aipipe.infra.settings import Settings

    limits = Limits(max_concurrent=1, admission_concurrent=1, queue_seconds=0.3)
    home = tmp_path / "home"
    with QueryServer(chdb_client, limits=limits, home=home) as small:
        published = read_endpoint(home)
        assert published is not None and published.admission_key == small.admission_key
        assert "admission_key" not in repr(published)
        settings = Settings(home=home, clickhouse_url=f"chdb://{small.engine.path}",
                            clickhouse_database=chdb_client.database or "default")
        store = budget_store_opener(settings)()
        assert store is not None
        with small.engine.slot(admission=False):  # an analyst's query holds the one slot
            assert store.client.command("SELECT 1") == 1
