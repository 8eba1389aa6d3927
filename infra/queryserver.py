"""The embedded read endpoint: ClickHouse's HTTP interface, reads only, over chDB.

chDB locks its path to one process. That process (the cost sink, or ``aipipe run``)
serves read queries to the others on loopback, speaking enough of ClickHouse's HTTP
interface that clickhouse-connect's ``HttpClient`` and ``curl`` work unchanged:
``query`` parameter followed by the request body, ``database``, ``default_format``,
``query_id`` and ``param_*`` parameters, the ``X-ClickHouse-*`` response headers, and
errors as ``Code: N. DB::Exception: ...`` with ``X-ClickHouse-Exception-Code``.

Queries run on a chDB connection of the server's own, set to ``readonly = 1``: the engine
refuses every write, DDL and settings change. Before that, a statement that is not a
SELECT, WITH, SHOW, DESCRIBE, EXISTS or EXPLAIN, several statements in one request, and
``INTO OUTFILE`` (which chDB would write on this machine) are refused here. Other
parameters (settings, ``session_id``, compression) are ignored: every request is
stateless and the reply uncompressed. No authentication: bind it to loopback only.
"""

from __future__ import annotations

import json
import os
import re
import threading
import urllib.request
import uuid
from collections.abc import Mapping
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from itertools import pairwise
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, quote, urlsplit

import chdb
import structlog

from schemas.errors import AipipeError

log = structlog.get_logger("aipipe.queryserver")

ENDPOINT_FILE = "query-endpoint.json"
READ_STATEMENTS = frozenset({"SELECT", "WITH", "SHOW", "DESCRIBE", "DESC", "EXISTS", "EXPLAIN"})

_SYNTAX_ERROR, _UNKNOWN_FORMAT, _READONLY, _ABORTED, _NOT_IMPLEMENTED = 62, 73, 164, 236, 48
_ERROR_NAMES = {
    _SYNTAX_ERROR: "SYNTAX_ERROR",
    _UNKNOWN_FORMAT: "UNKNOWN_FORMAT",
    _ABORTED: "ABORTED",
    _READONLY: "READONLY",
    _NOT_IMPLEMENTED: "NOT_IMPLEMENTED",
}
# As ClickHouse maps them (src/Server/HTTP/exceptionCodeToHTTPStatus.cpp), except that a
# refused write is 403 here; everything else is 500.
_HTTP_STATUS = {
    _READONLY: 403,
    _SYNTAX_ERROR: 400,
    _UNKNOWN_FORMAT: 404,
    46: 404,
    47: 404,
    60: 404,
    81: 404,
    _NOT_IMPLEMENTED: 501,
}
# Names chDB's Python layer turns into Python objects instead of engine output.
_PYTHON_FORMATS = frozenset({"dataframe", "datastore", "arrowtable"})
_CONTENT_TYPES = {
    "TabSeparated": "text/tab-separated-values; charset=UTF-8",
    "TSV": "text/tab-separated-values; charset=UTF-8",
    "CSV": "text/csv; charset=UTF-8; header=absent",
    "JSON": "application/json; charset=UTF-8",
    "JSONCompact": "application/json; charset=UTF-8",
    "JSONEachRow": "application/x-ndjson; charset=UTF-8",
}
_CODE = re.compile(r"Code: (\d+)\.")
_PLAIN_NAME = re.compile(r"^[A-Za-z0-9_.-]+$")
_TOKEN = re.compile(
    r"""\s+|--[^\n]*|/\*.*?\*/"""  # space and comments: skipped
    r"""|'(?:[^'\\]|\\.|'')*'"""  # string literal
    r"""|"(?:[^"\\]|\\.|"")*"|`(?:[^`\\]|\\.|``)*`"""  # quoted identifiers
    r"""|[A-Za-z_][A-Za-z0-9_]*|.""",
    re.DOTALL,
)


class QueryServerError(AipipeError):
    """The read endpoint could not start; the message says why and what to change."""


class QueryError(AipipeError):
    """A query the endpoint refused or the engine failed; ``code`` is ClickHouse's."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code

    def body(self, version: str) -> bytes:
        text = str(self)
        if not text.startswith("Code: "):
            name = _ERROR_NAMES.get(self.code, "")
            text = f"Code: {self.code}. DB::Exception: {text}" + (f" ({name})" if name else "")
        if "(version " not in text:
            text = f"{text} (version {version})"
        return f"{text}\n".encode()


def check_read_only(sql: str) -> str | None:
    """Refuse what readonly mode lets through; return the trailing ``FORMAT`` name, if any.

    Tokenizes as ClickHouse does where it matters (comments, quoted strings) and errs on
    the side of refusing; what it lets through still meets the engine's readonly mode.
    """
    tokens: list[str] = [t for t in _TOKEN.findall(sql) if t.strip() and t[:2] not in ("--", "/*")]
    while tokens and tokens[-1] == ";":
        tokens.pop()
    words = [t.upper() for t in tokens]
    if not words:
        raise QueryError(_SYNTAX_ERROR, "Empty query.")
    first = next((w for w in words if w != "("), "")
    if first not in READ_STATEMENTS:
        kind = first if first.isidentifier() else "this"
        raise QueryError(
            _READONLY,
            f"Cannot execute {kind} query in readonly mode: the aipipe read endpoint runs "
            "only SELECT, WITH, SHOW, DESCRIBE, EXISTS and EXPLAIN.",
        )
    if ";" in words:
        raise QueryError(_SYNTAX_ERROR, "Multi-statements are not allowed.")
    if any(a == "INTO" and b == "OUTFILE" for a, b in pairwise(words)):
        raise QueryError(_READONLY, "INTO OUTFILE is not allowed on the read endpoint.")
    if len(words) >= 2 and words[-2] == "FORMAT":
        return tokens[-1]
    return None


class ReadEngine:
    """A read-only chDB connection to the engine a client already opened, one call at a time."""

    def __init__(self, client: Any) -> None:
        path = getattr(client, "path", None)
        if not isinstance(path, str):
            raise TypeError("QueryServer serves an embedded chDB client (chdb:///path) only.")
        target = path if path.startswith((":memory:", "file:")) else os.path.realpath(path)
        self._lock = threading.Lock()
        self._conn: Any = chdb.connect(target)  # type: ignore[no-untyped-call]
        self._conn.query("SET readonly = 1", "TabSeparated")
        self._database = ""
        self.version, self.timezone = (
            self._conn.query("SELECT version(), timezone()", "TabSeparated")
            .bytes()
            .decode()
            .strip()
            .split("\t")
        )

    def run(
        self, sql: str, fmt: str, database: str, params: Mapping[str, str]
    ) -> tuple[bytes, dict[str, str]]:
        with self._lock:
            if self._conn is None:
                raise QueryError(_ABORTED, "The read endpoint is shutting down.")
            try:
                if database != self._database:
                    if not _PLAIN_NAME.match(database):
                        raise QueryError(81, f"Database {database!r} does not exist.")
                    self._conn.query(f"USE `{database}`", "TabSeparated")
                    self._database = database
                result = self._conn.query(sql, fmt, params=dict(params))
                data = result.bytes() or b""
                summary = {
                    "read_rows": str(result.rows_read()),
                    "read_bytes": str(result.bytes_read()),
                    "written_rows": "0",
                    "written_bytes": "0",
                    "result_bytes": str(len(data)),
                    "elapsed_ns": str(int(result.elapsed() * 1e9)),
                }
            except QueryError:
                raise
            except Exception as exc:  # chDB raises its own error type with ClickHouse's text
                message = str(exc).strip()
                match = _CODE.search(message)
                raise QueryError(int(match.group(1)) if match else 1001, message) from exc
        return data, summary

    def close(self) -> None:
        with self._lock:
            if self._conn is not None:
                self._conn.close()
                self._conn = None


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "aipipe-queryserver"
    timeout = 60  # an idle keep-alive connection ends after this
    engine: ReadEngine

    def do_GET(self) -> None:
        self._handle(b"")

    def do_POST(self) -> None:
        self._handle(self._body())

    def _body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            chunks = []
            while size := int(self.rfile.readline().split(b";")[0].strip() or b"0", 16):
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
            while self.rfile.readline().strip():  # trailers
                pass
            return b"".join(chunks)
        return self.rfile.read(int(self.headers.get("Content-Length") or 0))

    def _handle(self, body: bytes) -> None:
        url = urlsplit(self.path)
        params = dict(parse_qsl(url.query, keep_blank_values=True))
        query_id = params.get("query_id") or str(uuid.uuid4())
        if url.path not in ("", "/"):
            if url.path == "/ping":
                self._reply(200, b"Ok.\n", {})
            else:
                self._error(QueryError(_NOT_IMPLEMENTED, f"No handler for {url.path}."), query_id)
            return
        sql = "\n".join(
            part for part in (params.get("query", ""), body.decode("utf-8", "replace")) if part
        )
        if not sql.strip() and self.command == "GET":
            self._reply(200, b"Ok.\n", {})
            return
        try:
            if self.headers.get_content_type().startswith("multipart/"):
                raise QueryError(_NOT_IMPLEMENTED, "External data (multipart) is not supported.")
            fmt = check_read_only(sql) or params.get("default_format") or "TabSeparated"
            if fmt.lower() in _PYTHON_FORMATS:
                raise QueryError(_UNKNOWN_FORMAT, f"Unknown output format {fmt}.")
            binds = {k[6:]: v for k, v in params.items() if k.startswith("param_")}
            data, summary = self.engine.run(sql, fmt, params.get("database") or "default", binds)
        except QueryError as exc:
            self._error(exc, query_id)
            return
        self._reply(
            200,
            data,
            {
                "Content-Type": _CONTENT_TYPES.get(fmt, "application/octet-stream"),
                "X-ClickHouse-Format": fmt,
                "X-ClickHouse-Query-Id": query_id,
                "X-ClickHouse-Timezone": self.engine.timezone,
                "X-ClickHouse-Summary": json.dumps(summary),
            },
        )

    def _error(self, exc: QueryError, query_id: str) -> None:
        log.debug("query_refused", code=exc.code, error=str(exc), query_id=query_id)
        self._reply(
            _HTTP_STATUS.get(exc.code, 500),
            exc.body(self.engine.version),
            {
                "Content-Type": "text/plain; charset=UTF-8",
                "X-ClickHouse-Exception-Code": str(exc.code),
                "X-ClickHouse-Query-Id": query_id,
                "X-ClickHouse-Timezone": self.engine.timezone,
            },
        )

    def _reply(self, status: int, data: bytes, headers: Mapping[str, str]) -> None:
        self.send_response(status)
        for name, value in headers.items():
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, format: str, *args: Any) -> None:
        pass  # one structlog line per refusal is enough; no access log


class QueryServer:
    """Serve read queries on ``host:port`` (0: any free port) from a daemon thread.

    With ``home``, ``start`` publishes ``<home>/query-endpoint.json`` for other processes
    (see ``find_endpoint``) and ``stop`` removes it.
    """

    def __init__(
        self, client: Any, host: str = "127.0.0.1", port: int = 0, home: Path | None = None
    ) -> None:
        self.client = client
        self.host = host
        self.port = port
        self.home = home
        self._engine: ReadEngine | None = None
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        if self._server is None:
            raise RuntimeError("The query server is not started.")
        return f"http://{self.host}:{self._server.server_address[1]}"

    def start(self) -> int:
        engine = ReadEngine(self.client)
        handler = type("Handler", (_Handler,), {"engine": engine})
        try:
            server = ThreadingHTTPServer((self.host, self.port), handler)
        except OSError as exc:
            engine.close()
            raise QueryServerError(
                f"The read endpoint cannot listen on {self.host}:{self.port} ({exc.strerror}); "
                "set AIPIPE_QUERY_PORT to a free port, or 0 for any."
            ) from exc
        server.daemon_threads = True
        self._engine, self._server = engine, server
        self._thread = threading.Thread(
            target=server.serve_forever, name="query-server", daemon=True
        )
        self._thread.start()
        if self.home is not None:
            publish_endpoint(self.home, self.url)
        log.info("query_server_started", url=self.url)
        return int(server.server_address[1])

    def stop(self) -> None:
        if self._server is None:
            return
        if self.home is not None:
            withdraw_endpoint(self.home, self.url)
        self._server.shutdown()
        self._server.server_close()
        if self._thread is not None:
            self._thread.join(timeout=10)
        if self._engine is not None:
            self._engine.close()
        self._server = self._engine = self._thread = None
        log.info("query_server_stopped")

    def __enter__(self) -> QueryServer:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


# -- discovery ---------------------------------------------------------------------------


def publish_endpoint(home: Path, url: str) -> None:
    home.mkdir(parents=True, exist_ok=True)
    tmp = home / f".{ENDPOINT_FILE}.{os.getpid()}"
    tmp.write_text(json.dumps({"url": url, "pid": os.getpid()}))
    tmp.replace(home / ENDPOINT_FILE)


def withdraw_endpoint(home: Path, url: str) -> None:
    """Remove the endpoint file if it is still ours (another owner may have replaced it)."""
    path = home / ENDPOINT_FILE
    try:
        if json.loads(path.read_text()).get("url") == url:
            path.unlink()
    except (OSError, ValueError):
        pass


def find_endpoint(home: Path, timeout: float = 2.0) -> str | None:
    """The URL of the running read endpoint under ``home``, if one answers ``SELECT 1``."""
    try:
        url = str(json.loads((home / ENDPOINT_FILE).read_text())["url"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
    try:
        with urllib.request.urlopen(f"{url}/?query={quote('SELECT 1')}", timeout=timeout) as reply:
            return url if reply.status == 200 and reply.read() == b"1\n" else None
    except OSError:
        return None
