"""The embedded read endpoint: ClickHouse's HTTP interface, one read-only user, over chDB.

chDB locks its path to one process. That process (the cost sink, or ``aipipe run``)
serves read queries to the others on loopback, speaking ClickHouse's HTTP interface so
that clickhouse-connect, curl and the ClickHouse JDBC driver work unchanged.

- **Who**: one user (``reader``) with a password generated at start and published with
  the URL in ``$AIPIPE_HOME/query-endpoint.json`` (mode 0600). Credentials are taken as
  ClickHouse takes them: HTTP basic auth, ``X-ClickHouse-User``/``X-ClickHouse-Key``, or
  ``user``/``password`` parameters; anything else gets ClickHouse's code 516. A request
  whose ``Host`` (or ``Origin``) is not a loopback name is refused (code 195), so a web
  page cannot reach the endpoint through DNS rebinding.
- **What**: ``aipipe.infra.readonly`` decides with the engine's own parser; what runs is the
  engine's rendering of the checked tree, on a chDB connection whose limits are set
  before ``readonly = 1`` (which then forbids every write and settings change).
- **How much**: execution time, memory, rows read, result rows and bytes, threads,
  request body size and concurrent queries are bounded by ``Limits``; a client may lower
  a limit in its URL, never raise it. Row formats stream to the socket as the engine
  produces blocks; a client that disconnects has its query killed. Budget lookups from
  admission (``quota_key=aipipe-admission``) have their own slots, so an analyst's
  queries never hold them up.
- **Protocol**: ``query`` parameter and body (gzip/deflate ``Content-Encoding``), or a
  ``multipart/form-data`` body of fields as ClickHouse reads one (``aipipe.infra.formdata``):
  the URL's ``query`` followed by each ``query`` field, ``param_*`` fields after the URL's
  (the first value wins), other fields ignored (settings come from the URL only); a part
  with a filename (external data) is refused. ``database``/``X-ClickHouse-Database``,
  ``default_format``/``X-ClickHouse-Format``, ``param_*``, ``query_id``,
  ``enable_http_compression`` with ``Accept-Encoding: gzip`` or ``deflate``,
  ``wait_end_of_query``, ``/ping``; replies carry ``X-ClickHouse-Format``, ``-Query-Id``,
  ``-Timezone``, ``-Summary``, ``-Server-Display-Name``, and errors are
  ``Code: N. DB::Exception: ...`` with ``X-ClickHouse-Exception-Code``. Sessions
  (``session_id``) and ``client_protocol_version`` are accepted and ignored: every
  request is stateless, and Native output is chDB's own. ``compress=1`` sends the reply
  as ClickHouse's native LZ4 blocks with CityHash128 checksums (the JDBC driver's
  default; ``aipipe.infra.chcompress``), a streamed reply one block per engine block, inside any
  HTTP compression; ``decompress=1`` reads the request body as such blocks (after its
  ``Content-Encoding``), and a block whose checksum does not match is code 40.
"""

from __future__ import annotations

import base64
import contextlib
import hmac
import json
import os
import secrets
import select
import socket
import threading
import uuid
import zlib
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit

import cramjam
import structlog

from aipipe.infra.chcompress import TooLarge, compress_blocks, decompress_blocks
from aipipe.infra.endpoint import (
    ADMISSION_QUOTA_KEY,
    Endpoint,
    publish_endpoint,
    withdraw_endpoint,
)
from aipipe.infra.formdata import LIMIT_EXCEEDED, parse_form
from aipipe.infra.readonly import (
    ABORTED,
    ACCESS_DENIED,
    NOT_IMPLEMENTED,
    READONLY,
    SYNTAX_ERROR,
    SYSTEM_DATABASES,
    UNKNOWN_FORMAT,
    Classifier,
    QueryError,
    Verdict,
)
from aipipe.schemas.errors import AipipeError

__all__ = ["READ_STATEMENTS", "Limits", "QueryError", "QueryServer", "QueryServerError",
           "ReadEngine"]

log = structlog.get_logger("aipipe.queryserver")

USER = "reader"
READ_STATEMENTS = frozenset({"SELECT", "WITH", "SHOW", "DESCRIBE", "DESC", "EXISTS", "EXPLAIN"})
LOOPBACK_HOSTS = frozenset({"127.0.0.1", "localhost", "::1", "[::1]"})

_AUTH, _IP_NOT_ALLOWED, _TOO_MANY, _TOO_MANY_BYTES, _UNKNOWN_DB = 516, 195, 202, 307, 81
# As ClickHouse maps them (src/Server/HTTP/exceptionCodeToHTTPStatus.cpp), except that a
# refused write is 403 here; everything else is 500.
_HTTP_STATUS = {
    _AUTH: 401,
    _IP_NOT_ALLOWED: 403,
    ACCESS_DENIED: 403,
    READONLY: 403,
    SYNTAX_ERROR: 400,
    UNKNOWN_FORMAT: 404,
    46: 404,
    47: 404,
    60: 404,
    _UNKNOWN_DB: 404,
    NOT_IMPLEMENTED: 501,
    _TOO_MANY: 503,
    _TOO_MANY_BYTES: 413,
    LIMIT_EXCEEDED: 413,
    159: 408,  # TIMEOUT_EXCEEDED
}
# Names chDB's Python layer turns into Python objects instead of engine output.
_PYTHON_FORMATS = frozenset({"dataframe", "datastore", "arrowtable"})
# Formats whose blocks concatenate into one valid stream; the others (with a header or a
# document around the rows) are sent whole, within the result-bytes limit.
_STREAMED = frozenset({
    "tabseparated", "tsv", "tabseparatedraw", "tsvraw", "csv", "jsoneachrow", "jsonlines",
    "ndjson", "jsoncompacteachrow", "jsonstringseachrow", "jsoncompactstringseachrow",
    "native", "rowbinary",
})
_CONTENT_TYPES = {
    "TabSeparated": "text/tab-separated-values; charset=UTF-8",
    "TSV": "text/tab-separated-values; charset=UTF-8",
    "CSV": "text/csv; charset=UTF-8; header=absent",
    "JSON": "application/json; charset=UTF-8",
    "JSONCompact": "application/json; charset=UTF-8",
    "JSONEachRow": "application/x-ndjson; charset=UTF-8",
}
# URL parameters of the HTTP interface itself (not settings).
_PROTOCOL_PARAMS = frozenset({
    "query", "database", "default_format", "query_id", "user", "password", "quota_key",
    "session_id", "session_timeout", "session_check", "compress", "decompress",
    "enable_http_compression", "http_zlib_compression_level", "client_protocol_version",
    "wait_end_of_query", "buffer_size", "send_progress_in_http_headers",
    "http_headers_progress_interval_ms", "cancel_http_readonly_queries_on_client_close",
    "http_response_buffer_size", "role",
    "http_native_compression_disable_checksumming_on_decompress",
    "add_http_cors_header", "extremes", "readonly",
})
# Settings a client may change: output shape only.
_SAFE_SETTING_PREFIXES = ("output_format_", "format_", "date_time_output_format",
                          "session_timezone", "join_use_nulls", "max_block_size",
                          "totals_mode", "use_client_time_zone", "allow_experimental_",
                          "enable_analyzer", "allow_suspicious_", "union_default_mode")
_CHUNK = 64 * 1024
_BOOLS = {"true": "1", "false": "0"}


class QueryServerError(AipipeError):
    """The read endpoint could not start; the message says why and what to change."""


@dataclass(frozen=True)
class Limits:
    """Server-side bounds of every query (0 = unlimited, as in ClickHouse)."""

    max_execution_time: float = 60.0
    max_memory_usage: int = 2_000_000_000
    max_rows_to_read: int = 2_000_000_000
    max_result_rows: int = 50_000_000
    max_result_bytes: int = 1_000_000_000
    max_threads: int = 2
    max_body_bytes: int = 1_048_576
    max_concurrent: int = 4
    admission_concurrent: int = 2
    queue_seconds: float = 2.0
    # a multipart/form-data body: ClickHouse's http_max_field_value_size (128 KiB, one byte
    # more let through, which clickhouse-connect sizes its form query to); fields far fewer
    max_form_fields: int = 1000
    max_form_field_bytes: int = 128 * 1024 + 1

    @classmethod
    def from_settings(cls, settings: Any) -> Limits:
        return cls(
            max_execution_time=settings.query_max_execution_seconds,
            max_memory_usage=settings.query_max_memory_bytes,
            max_rows_to_read=settings.query_max_rows_to_read,
            max_result_rows=settings.query_max_result_rows,
            max_result_bytes=settings.query_max_result_bytes,
            max_threads=settings.query_max_threads,
            max_body_bytes=settings.query_max_body_bytes,
            max_concurrent=settings.query_max_concurrent,
        )

    def engine_settings(self) -> dict[str, float | int]:
        return {
            "max_execution_time": self.max_execution_time,
            "max_memory_usage": self.max_memory_usage,
            "max_rows_to_read": self.max_rows_to_read,
            "max_result_rows": self.max_result_rows,
            "max_result_bytes": self.max_result_bytes,
            "max_threads": self.max_threads,
        }


def effective_settings(limits: Limits, asked: Mapping[str, str],
                       current: Mapping[str, str] | None = None) -> dict[str, str]:
    """The settings a query runs with: the server's limits, lowered (never raised) by the
    client, and the output settings the client asked for. Anything else is refused as
    ClickHouse refuses it in readonly mode, unless it asks for the value already in force
    (what drivers send by default, e.g. ``async_insert=0``); an unknown name is code 115."""
    out: dict[str, str] = {}
    bounds = limits.engine_settings()
    for name, value in asked.items():
        if name in bounds:
            try:
                number = float(value)
            except ValueError:
                raise QueryError(SYNTAX_ERROR, f"Cannot parse {value!r} as a number for "
                                 f"setting {name}.") from None
            server = float(bounds[name])
            if number < 0:
                raise QueryError(SYNTAX_ERROR, f"Setting {name} cannot be negative.")
            if number and (not server or number < server):
                bounds[name] = number
        elif name == "readonly":
            if value not in ("1", "2"):
                raise QueryError(READONLY, "Cannot modify 'readonly' setting in readonly mode.")
        elif name in _PROTOCOL_PARAMS or name.startswith(("param_", "async_insert",
                                                            "wait_for_async_insert")):
            continue  # protocol, or insert-only settings drivers send: no effect on reads
        elif name.startswith(_SAFE_SETTING_PREFIXES) and "file" not in name and (
                "schema" not in name):
            out[name] = value
        elif current is not None and name not in current:
            raise QueryError(115, f"Unknown setting '{name}'.")
        elif current is None or _BOOLS.get(value.lower(), value) != current[name]:
            raise QueryError(READONLY, f"Cannot modify '{name}' setting in readonly mode.")
    for name, bound in bounds.items():
        out[name] = str(int(bound)) if float(bound).is_integer() else str(bound)
    out["result_overflow_mode"] = "throw"
    out["read_overflow_mode"] = "throw"
    return out


@dataclass
class _Running:
    """One query on its own connection, streamed block by block."""

    stream: Any
    tag: str
    max_bytes: int = 0
    summary: dict[str, int] = field(default_factory=lambda: {"read_rows": 0, "read_bytes": 0,
                                                               "result_bytes": 0})
    elapsed: float = 0.0


class ReadEngine:
    """Read-only chDB connections to the engine a client already opened.

    Every query gets a connection of its own (pooled), so queries run in parallel and a
    slow one holds up nobody; a separate connection classifies queries, and the owner's
    own connection kills queries whose client went away.
    """

    def __init__(self, client: Any, limits: Limits | None = None) -> None:
        path = getattr(client, "path", None)
        if not isinstance(path, str):
            raise TypeError("QueryServer serves an embedded chDB client (chdb:///path) only.")
        self.path = path if path.startswith((":memory:", "file:")) else os.path.realpath(path)
        self.limits = limits or Limits()
        self._base = f"file:{self.path}" if not self.path.startswith("file:") else self.path
        self._lock = threading.Lock()
        self._idle: dict[str, list[Any]] = {}
        self._closed = False
        import chdb  # the embedded engine's extra (aipipe[embedded]); a server needs none

        self._owner: Any = chdb.connect(self.path)
        self._classifier = Classifier(self._connect(
            {"max_execution_time": "10", "max_memory_usage": "200000000", "max_threads": "1"}))
        self.version, self.timezone = (
            self._owner.query("SELECT version(), timezone()", "TabSeparated")
            .bytes().decode().strip().split("\t"))
        self.settings = dict(
            line.split("\t", 1) for line in self._owner.query(
                "SELECT name, value FROM system.settings", "TabSeparatedRaw",
            ).bytes().decode().splitlines() if "\t" in line)
        self._slots = threading.BoundedSemaphore(self.limits.max_concurrent)
        self._admission = threading.BoundedSemaphore(self.limits.admission_concurrent)

    def _connect(self, settings: Mapping[str, str], tag: str = "") -> Any:
        params = dict(settings)
        if tag:
            params["log_comment"] = tag
        params["readonly"] = "1"  # last: after it, nothing can be changed
        import chdb

        return chdb.connect(f"{self._base}?{urlencode(params)}")

    def classify(self, sql: str, params: Mapping[str, str] | None = None) -> Verdict:
        return self._classifier.classify(sql, params)

    @contextlib.contextmanager
    def slot(self, admission: bool) -> Iterator[None]:
        """A place to run: analysts share ``max_concurrent``, admission has its own."""
        slots = self._admission if admission else self._slots
        if not slots.acquire(timeout=self.limits.queue_seconds):
            raise QueryError(_TOO_MANY, f"Too many simultaneous queries: the read endpoint runs "
                             f"{self.limits.max_concurrent} at once; retry shortly.")
        try:
            yield
        finally:
            slots.release()

    @contextlib.contextmanager
    def connection(self, settings: Mapping[str, str], database: str) -> Iterator[tuple[Any, str]]:
        if database in SYSTEM_DATABASES:
            raise QueryError(ACCESS_DENIED, f"Database {database} is not readable as the default "
                             "database here; name the allowed system tables in the query.")
        key = json.dumps([sorted(settings.items()), database])
        with self._lock:
            if self._closed:
                raise QueryError(ABORTED, "The read endpoint is shutting down.")
            idle = self._idle.get(key)
            pooled = idle.pop() if idle else None
        if pooled is None:
            tag = f"aipipe-read-{uuid.uuid4().hex}"
            conn = self._connect(settings, tag)
            try:
                conn.query(f"USE `{database}`", "TabSeparated")
            except Exception as exc:
                conn.close()
                raise QueryError(_UNKNOWN_DB, f"Database {database} does not exist.") from exc
            pooled = (conn, tag)
        keep = False
        try:
            yield pooled
            keep = True
        finally:
            with self._lock:
                if keep and not self._closed and sum(map(len, self._idle.values())) < 16:
                    self._idle.setdefault(key, []).append(pooled)
                else:
                    pooled[0].close()

    def start(self, conn: Any, tag: str, verdict: Verdict, fmt: str,
              params: Mapping[str, str], max_bytes: int) -> _Running:
        try:
            stream = conn.send_query(verdict.sql, fmt, params=dict(params))
        except Exception as exc:
            raise QueryError.from_engine(exc) from exc
        return _Running(stream, tag, max_bytes)

    def chunks(self, running: _Running) -> Iterator[bytes]:
        """The result's blocks as the engine produces them; engine errors as QueryError."""
        while True:
            try:
                chunk = running.stream.fetch()
            except Exception as exc:
                raise QueryError.from_engine(exc) from exc
            if chunk is None:
                return
            data = chunk.bytes() or b""
            running.summary["read_rows"] += int(chunk.rows_read())
            running.summary["read_bytes"] += int(chunk.bytes_read())
            running.summary["result_bytes"] += len(data)
            running.elapsed += float(chunk.elapsed())
            if running.max_bytes and running.summary["result_bytes"] > running.max_bytes:
                # chDB's streaming does not apply max_result_bytes itself
                raise QueryError(396, f"Limit for result exceeded, max bytes: "
                                 f"{running.max_bytes}, current bytes: "
                                 f"{running.summary['result_bytes']}. (TOO_MANY_ROWS_OR_BYTES)")
            if data:
                yield data

    def whole(self, conn: Any, verdict: Verdict, fmt: str,
              params: Mapping[str, str]) -> tuple[bytes, dict[str, int], float]:
        """The whole result at once, for formats that cannot be streamed block by block."""
        try:
            result = conn.query(verdict.sql, fmt, params=dict(params))
        except Exception as exc:
            raise QueryError.from_engine(exc) from exc
        data = result.bytes() or b""
        summary = {"read_rows": int(result.rows_read()), "read_bytes": int(result.bytes_read()),
                   "result_bytes": len(data)}
        return data, summary, float(result.elapsed())

    def kill(self, tag: str) -> None:
        """Stop the query running on the connection tagged ``tag`` (its client went away)."""
        with contextlib.suppress(Exception):
            self._owner.query(f"KILL QUERY WHERE Settings['log_comment'] = '{tag}' ASYNC",
                              "TabSeparated")

    def close(self) -> None:
        with self._lock:
            self._closed = True
            idle, self._idle = self._idle, {}
        for conns in idle.values():
            for conn, _ in conns:
                conn.close()
        self._owner.close()


# -- HTTP --------------------------------------------------------------------------------


def _loopback(value: str) -> bool:
    host = urlsplit(value if "//" in value else f"//{value}").hostname or ""
    return host in LOOPBACK_HOSTS or host == "::1"


class _Gone(Exception):
    """The client closed its connection."""


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "aipipe-queryserver"
    timeout = 60  # an idle keep-alive connection ends after this
    # TCP_NODELAY: a reply's headers and first block are separate writes, and Nagle would
    # hold the second until the client's delayed ACK (40 ms a query)
    disable_nagle_algorithm = True
    engine: ReadEngine
    password: str

    def handle(self) -> None:
        with contextlib.suppress(ConnectionError):  # a client that hung up between requests
            super().handle()

    def do_GET(self) -> None:
        self._handle(get=True)

    def do_POST(self) -> None:
        self._handle(get=False)

    def _body(self, native: bool = False) -> bytes:
        limit = self.engine.limits.max_body_bytes
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            chunks, total = [], 0
            while size := int(self.rfile.readline().split(b";")[0].strip() or b"0", 16):
                total += size
                if total > limit:
                    self.close_connection = True
                    raise self._too_big(total)
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
            while self.rfile.readline().strip():  # trailers
                pass
            body = b"".join(chunks)
        else:
            length = int(self.headers.get("Content-Length") or 0)
            if length > limit:
                self.close_connection = True  # the unread body would be read as a request
                raise self._too_big(length)
            body = self.rfile.read(length)
        encoding = self.headers.get("Content-Encoding", "").strip().lower()
        if encoding in ("gzip", "deflate", "x-gzip"):
            inflater = zlib.decompressobj(47)  # gzip or zlib, by the header
            try:
                body = inflater.decompress(body, limit + 1)
            except zlib.error as exc:
                raise QueryError(354, f"Cannot decompress the request body ({exc}).") from None
            if len(body) > limit or inflater.unconsumed_tail:
                raise self._too_big(len(body))
        elif encoding == "lz4":  # what clickhouse-connect sends (an LZ4 frame: at most ~255x)
            try:
                body = bytes(cramjam.lz4.decompress(body))
            except cramjam.DecompressionError as exc:
                raise QueryError(354, f"Cannot decompress the request body ({exc}).") from None
            if len(body) > limit:
                raise self._too_big(len(body))
        elif encoding not in ("", "identity"):
            raise QueryError(NOT_IMPLEMENTED, f"Content-Encoding {encoding} is not supported; "
                             "send gzip, deflate or lz4.")
        if native:  # decompress=1: ClickHouse's own blocks, inside any Content-Encoding
            try:
                body = decompress_blocks(body, limit)
            except TooLarge as exc:
                raise self._too_big(exc.size) from None
        return body

    def _too_big(self, size: int) -> QueryError:
        return QueryError(_TOO_MANY_BYTES, f"The request body ({size} bytes) is larger than the "
                          f"read endpoint's limit of {self.engine.limits.max_body_bytes} bytes.")

    def _user(self, params: Mapping[str, str]) -> tuple[str, str]:
        auth = self.headers.get("Authorization", "")
        if auth.lower().startswith("basic "):
            try:
                user, _, key = base64.b64decode(auth[6:].strip()).decode().partition(":")
            except (ValueError, UnicodeDecodeError):
                return "", ""
            return user, key
        if "X-ClickHouse-User" in self.headers or "X-ClickHouse-Key" in self.headers:
            return self.headers.get("X-ClickHouse-User", "default"), self.headers.get(
                "X-ClickHouse-Key", "")
        return params.get("user", "default"), params.get("password", "")

    def _handle(self, get: bool) -> None:
        url = urlsplit(self.path)
        params = dict(parse_qsl(url.query, keep_blank_values=True))
        query_id = params.get("query_id") or str(uuid.uuid4())
        try:
            if not _loopback(self.headers.get("Host", "")) or (
                    "Origin" in self.headers and not _loopback(self.headers["Origin"])):
                self.close_connection = True
                raise QueryError(_IP_NOT_ALLOWED, "The aipipe read endpoint answers loopback "
                                 "names only (Host and Origin must be 127.0.0.1, localhost or "
                                 "[::1]).")
            if url.path == "/ping" or (get and url.path in ("", "/") and "query" not in params):
                self._reply(200, b"Ok.\n", {})
                return
            if url.path not in ("", "/"):
                raise QueryError(NOT_IMPLEMENTED, f"No handler for {url.path}.")
            body = b"" if get else self._body(_flag(params, "decompress"))
            user, key = self._user(params)
            if user != USER or not hmac.compare_digest(key.encode(), self.password.encode()):
                raise QueryError(_AUTH, f"{user or 'default'}: Authentication failed: password "
                                 "is incorrect, or there is no user with such name.")
            self._query(params, body, query_id)
        except QueryError as exc:
            self._error(exc, query_id)
        except _Gone:
            self.close_connection = True

    def _query(self, params: dict[str, str], body: bytes, query_id: str) -> None:
        binds = {k[6:]: v for k, v in params.items() if k.startswith("param_")}
        if self.headers.get_content_type().startswith("multipart/"):
            sql = self._form(params.get("query", ""), body, binds)
        else:
            if params.get("query") and body:  # INSERT ... FORMAT X in the URL, data in the body
                try:
                    self.engine.classify(params["query"])
                except QueryError as exc:
                    if exc.code == READONLY:
                        raise
            sql = "\n".join(
                part for part in (params.get("query", ""), body.decode("utf-8", "replace"))
                if part)
        settings = effective_settings(self.engine.limits, params, self.engine.settings)
        verdict = self.engine.classify(sql, binds)
        fmt = (verdict.format or self.headers.get("X-ClickHouse-Format")
               or params.get("default_format") or "TabSeparated")
        if fmt.lower() in _PYTHON_FORMATS:
            raise QueryError(UNKNOWN_FORMAT, f"Unknown output format {fmt}.")
        database = (self.headers.get("X-ClickHouse-Database") or params.get("database")
                    or "default")
        admission = params.get("quota_key") == ADMISSION_QUOTA_KEY
        if admission:  # budget lookups: short, and never queued behind analysts
            settings["max_execution_time"] = str(min(float(settings["max_execution_time"]), 10))
        headers = {
            "Content-Type": _CONTENT_TYPES.get(fmt, "application/octet-stream"),
            "X-ClickHouse-Format": fmt,
            "X-ClickHouse-Query-Id": query_id,
            "X-ClickHouse-Timezone": self.engine.timezone,
            "X-ClickHouse-Server-Display-Name": "aipipe",
        }
        gzip = self._compression(params)
        native = _flag(params, "compress")
        with self.engine.slot(admission), self.engine.connection(settings, database) as (conn, tag):
            streamed = fmt.lower() in _STREAMED and params.get("wait_end_of_query") != "1"
            if not streamed:
                data, summary, elapsed = self.engine.whole(conn, verdict, fmt, binds)
                headers["X-ClickHouse-Summary"] = _summary(summary, elapsed)
                self._reply(200, compress_blocks(data) if native else data, headers, gzip)
                return
            running = self.engine.start(conn, tag, verdict, fmt, binds,
                                        int(float(settings["max_result_bytes"])))
            with _watch(self.connection, lambda: self.engine.kill(tag)) as gone:
                self._stream(running, headers, gzip, gone, native)

    def _form(self, query: str, body: bytes, binds: dict[str, str]) -> str:
        """The query of a ``multipart/form-data`` body, as ClickHouse reads one: the URL's
        ``query`` and each ``query`` field, joined as they are; ``param_*`` fields go into
        ``binds`` after the URL's (the first value of a name wins); other fields are ignored."""
        content_type = self.headers.get("Content-Type", "")
        if self.headers.get_content_type() != "multipart/form-data":
            raise QueryError(NOT_IMPLEMENTED, f"A {self.headers.get_content_type()} body is not "
                             "supported; send the query as the body, or multipart/form-data "
                             "fields.")
        limits = self.engine.limits
        form = parse_form(content_type, body, max_fields=limits.max_form_fields,
                          max_field_bytes=limits.max_form_field_bytes)
        if form.files:
            raise QueryError(NOT_IMPLEMENTED, "External data (multipart) is not supported.")
        for name, value in form.fields:
            text = value.decode("utf-8", "replace")
            if name == "query":
                query += text
            elif name.startswith("param_"):
                binds.setdefault(name[6:], text)
        return query

    def _stream(self, running: _Running, headers: dict[str, str], encoding: str | None,
                gone: threading.Event, native: bool = False) -> None:
        """Send the first blocks with the headers (whole if that is all), then the rest."""
        blocks = self.engine.chunks(running)
        first: list[bytes] = []
        size = 0
        try:
            for data in blocks:
                first.append(data)
                size += len(data)
                if size >= _CHUNK:
                    break
            else:
                headers["X-ClickHouse-Summary"] = _summary(running.summary, running.elapsed)
                whole = b"".join(first)
                self._reply(200, compress_blocks(whole) if native else whole, headers, encoding)
                return
        except QueryError:
            if gone.is_set():
                raise _Gone() from None
            with contextlib.suppress(Exception):
                running.stream.cancel()
            raise
        headers["X-ClickHouse-Summary"] = _summary(running.summary, running.elapsed)
        self.send_response(200)
        for name, value in headers.items():
            self.send_header(name, value)
        if encoding:
            self.send_header("Content-Encoding", encoding)
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        http = _packer(encoding)

        def packer(data: bytes | None) -> bytes:  # each engine block one native block
            return http(compress_blocks(data) if native and data else data)

        try:
            self._write_chunk(packer(b"".join(first)))
            for data in blocks:
                self._write_chunk(packer(data))
            self._write_chunk(packer(None))
            self.wfile.write(b"0\r\n\r\n")
        except QueryError as exc:  # headers are gone: the error ends the body, unterminated
            self.close_connection = True
            if not gone.is_set():
                error = b"\n" + exc.body(self.engine.version)
                with contextlib.suppress(OSError):  # in the stream's blocks, as ClickHouse does
                    self._write_chunk(compress_blocks(error) if native else error)
            with contextlib.suppress(Exception):
                running.stream.cancel()
        except OSError:
            self.close_connection = True
            gone.set()
            self.engine.kill(running.tag)
            with contextlib.suppress(Exception):
                running.stream.cancel()
            raise _Gone() from None

    def _write_chunk(self, data: bytes) -> None:
        if data:
            self.wfile.write(f"{len(data):x}\r\n".encode() + data + b"\r\n")

    def _compression(self, params: Mapping[str, str]) -> str | None:
        if params.get("enable_http_compression") != "1":
            return None
        accepted = {e.split(";")[0].strip().lower()
                    for e in self.headers.get("Accept-Encoding", "").split(",")}
        return next((e for e in ("gzip", "deflate") if e in accepted), None)

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

    def _reply(self, status: int, data: bytes, headers: Mapping[str, str],
               encoding: str | None = None) -> None:
        if encoding:
            data = _compress(data, encoding)
        try:
            self.send_response(status)
            for name, value in headers.items():
                self.send_header(name, value)
            if encoding:
                self.send_header("Content-Encoding", encoding)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)
        except OSError:
            raise _Gone() from None

    def log_message(self, format: str, *args: Any) -> None:
        pass  # one structlog line per refusal is enough; no access log


def _flag(params: Mapping[str, str], name: str) -> bool:
    """A boolean URL parameter as ClickHouse reads one (``1`` or ``true``)."""
    return params.get(name, "").strip().lower() in ("1", "true")


def _summary(summary: Mapping[str, int], elapsed: float) -> str:
    return json.dumps({
        "read_rows": str(summary["read_rows"]), "read_bytes": str(summary["read_bytes"]),
        "written_rows": "0", "written_bytes": "0", "total_rows_to_read": "0",
        "result_rows": "0", "result_bytes": str(summary["result_bytes"]),
        "elapsed_ns": str(int(elapsed * 1e9)),
    })


def _compress(data: bytes, encoding: str) -> bytes:
    packer = _packer(encoding)
    return packer(data) + packer(None)


def _packer(encoding: str | None) -> Callable[[bytes | None], bytes]:
    """A function compressing successive pieces (``None``: flush the end) for ``encoding``."""
    if encoding is None:
        return lambda data: data or b""
    compressor = zlib.compressobj(6, zlib.DEFLATED, 31 if encoding == "gzip" else 15)

    def pack(data: bytes | None) -> bytes:
        if data is None:
            return compressor.flush()
        return compressor.compress(data) + compressor.flush(zlib.Z_SYNC_FLUSH)

    return pack


@contextlib.contextmanager
def _watch(sock: socket.socket, on_gone: Any) -> Iterator[threading.Event]:
    """Watch ``sock`` while a query runs; if the client closes it, call ``on_gone`` once."""
    done, gone = threading.Event(), threading.Event()

    def watch() -> None:
        while not done.is_set():
            try:
                readable, _, _ = select.select([sock], [], [], 0.2)
                if readable and sock.recv(1, socket.MSG_PEEK) == b"":
                    raise ConnectionResetError
            except (OSError, ValueError):
                if not done.is_set():
                    gone.set()
                    on_gone()
                return
            if readable:  # the client sent its next request early: it is still there
                done.wait(0.2)

    thread = threading.Thread(target=watch, name="query-watch", daemon=True)
    thread.start()
    try:
        yield gone
    finally:
        done.set()
        thread.join(timeout=1)


class QueryServer:
    """Serve read queries on ``host:port`` (0: any free port) from a daemon thread.

    With ``home``, ``start`` publishes ``<home>/query-endpoint.json`` (0600: URL, user,
    password, served chDB path) for other processes and ``stop`` removes it.
    """

    def __init__(self, client: Any, host: str = "127.0.0.1", port: int = 0,
                 home: Path | None = None, limits: Limits | None = None) -> None:
        self.client = client
        self.host = host
        self.port = port
        self.home = home
        self.limits = limits or Limits()
        self.user = USER
        self.password = secrets.token_urlsafe(24)
        self._engine: ReadEngine | None = None
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        if self._server is None:
            raise RuntimeError("The query server is not started.")
        return f"http://{self.host}:{self._server.server_address[1]}"

    @property
    def endpoint(self) -> Endpoint:
        if self._engine is None:
            raise RuntimeError("The query server is not started.")
        return Endpoint(self.url, self.user, self.password, self._engine.path)

    @property
    def engine(self) -> ReadEngine:
        if self._engine is None:
            raise RuntimeError("The query server is not started.")
        return self._engine

    def start(self) -> int:
        if self.host not in LOOPBACK_HOSTS:
            raise QueryServerError(f"The read endpoint listens on loopback only, not "
                                   f"{self.host}; use a ClickHouse server to serve others.")
        engine = ReadEngine(self.client, self.limits)
        handler = type("Handler", (_Handler,), {"engine": engine, "password": self.password})
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
            publish_endpoint(self.home, self.endpoint)
        log.info("query_server_started", url=self.url, chdb_path=engine.path)
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
