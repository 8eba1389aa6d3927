"""The embedded read endpoint: ClickHouse's HTTP interface, one read-only user, over chDB.

chDB locks its path to one process. That process (the cost sink, or ``aipipe run``)
serves read queries to the others on loopback, speaking ClickHouse's HTTP interface so
that clickhouse-connect, curl and the ClickHouse JDBC driver work unchanged.

- **Who**: one user (``reader``) with a password generated at start and published with
  the URL in ``$AIPIPE_HOME/query-endpoint.json`` (mode 0600). Credentials are taken as
  ClickHouse takes them: HTTP basic auth, ``X-ClickHouse-User``/``X-ClickHouse-Key``, or
  ``user``/``password`` parameters; anything else gets ClickHouse's code 516, decided
  before any of the body is kept or decompressed. A request whose ``Host`` (or ``Origin``)
  is not a loopback name is refused (code 195), so a web page cannot reach the endpoint
  through DNS rebinding.
- **What**: ``aipipe.infra.readonly`` decides with the engine's own parser; what runs is the
  engine's rendering of the checked tree, on a chDB connection whose limits are set
  before ``readonly = 1`` (which then forbids every write and settings change).
- **How much**: execution time, memory, rows read, result rows and bytes, threads,
  request body size (compressed and decompressed) and concurrent queries are bounded by
  ``Limits``; a client may lower a limit in its URL, never raise it. A query's time
  includes sending its result: a client that reads too slowly is cut off at
  ``max_execution_time`` and its slot freed. Row formats stream to the socket as the
  engine produces blocks; a client that disconnects has its query killed. Open
  connections are capped (``max_connections``; the next is answered 503, code 202).
  Budget lookups from admission (``quota_key=aipipe-admission`` with the server's
  ``admission_key`` in ``X-Aipipe-Admission-Key``) have their own slots, so an analyst's
  queries never hold them up; the quota key alone gets an analyst's slot.
- **Settings**: output settings by name (``_OUTPUT_SETTINGS``: plain values, never a file,
  URL or schema) and lowered limits; anything else is code 164 unless it asks for the
  value in force. The default database is never ``system`` (in any case), and its name
  reaches the engine as a query parameter, quoted by the engine.
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
import http.client
import io
import json
import os
import re
import secrets
import selectors
import socket
import struct
import threading
import time
import uuid
import zlib
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, cast
from urllib.parse import parse_qsl, urlencode, urlsplit

import cramjam
import structlog

from aipipe.infra.chcompress import TooLarge, compress_blocks, decompress_blocks
from aipipe.infra.endpoint import (
    ADMISSION_KEY_HEADER,
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
_TIMEOUT, _CORRUPTED = 159, 246
# As ClickHouse maps them (src/Server/HTTP/exceptionCodeToHTTPStatus.cpp), except that a
# refused write is 403 and a malformed body 400 here; everything else is 500.
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
    _TIMEOUT: 408,
    _CORRUPTED: 400,
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
# Settings a client may change: the shape of the output, by name, each a plain value. Never
# a name that takes a path, a URL or a schema (``format_template_row``, ``format_schema``,
# ``output_format_schema``, ``format_avro_schema_registry_url``): the engine would read or
# write that file, or reach that host, for the client.
_OUTPUT_SETTINGS = frozenset({
    # text of values
    "date_time_output_format", "session_timezone", "use_client_time_zone",
    "output_format_decimal_trailing_zeros", "output_format_trim_fixed_string",
    "output_format_values_escape_quote_with_quote", "output_format_write_statistics",
    "output_format_markdown_escape_special_characters",
    # JSON
    "output_format_json_quote_64bit_integers", "output_format_json_quote_64bit_floats",
    "output_format_json_quote_denormals", "output_format_json_quote_decimals",
    "output_format_json_escape_forward_slashes", "output_format_json_named_tuples_as_objects",
    "output_format_json_array_of_rows", "output_format_json_validate_utf8",
    "output_format_json_pretty_print", "output_format_json_map_as_array_of_tuples",
    "output_format_json_skip_null_value_in_named_tuples",
    # CSV, TSV, CustomSeparated, Template (inline strings, not the files)
    "output_format_csv_crlf_end_of_line", "output_format_tsv_crlf_end_of_line",
    "format_csv_delimiter", "format_csv_null_representation", "format_tsv_null_representation",
    "format_custom_escaping_rule", "format_custom_field_delimiter",
    "format_custom_row_before_delimiter", "format_custom_row_after_delimiter",
    "format_custom_row_between_delimiter", "format_custom_result_before_delimiter",
    "format_custom_result_after_delimiter", "format_template_row_format",
    "format_template_resultset_format", "format_template_rows_between_delimiter",
    # Pretty
    "output_format_pretty_max_rows", "output_format_pretty_max_column_pad_width",
    "output_format_pretty_max_value_width", "output_format_pretty_color",
    "output_format_pretty_grid_charset", "output_format_pretty_row_numbers",
    "output_format_pretty_display_footer_column_names",
    # binary formats
    "output_format_arrow_string_as_string", "output_format_arrow_low_cardinality_as_dictionary",
    "output_format_arrow_fixed_string_as_fixed_byte_array",
    "output_format_arrow_compression_method", "output_format_parquet_string_as_string",
    "output_format_parquet_compression_method", "output_format_orc_string_as_string",
    "output_format_native_encode_types_in_binary_format",
    "output_format_native_write_json_as_string",
    "output_format_binary_encode_types_in_binary_format",
    "output_format_binary_write_json_as_string",
    # SQLInsert
    "output_format_sql_insert_max_batch_size", "output_format_sql_insert_table_name",
    "output_format_sql_insert_include_column_names", "output_format_sql_insert_use_replace",
    "output_format_sql_insert_quote_names",
    # shape of the result
    "join_use_nulls", "max_block_size", "totals_mode", "union_default_mode",
})
_CHUNK = 64 * 1024
_MAX_LINE, _MAX_TRAILERS = 4096, 64  # of a chunked request body's framing
_MAX_HEAD = 64 * 1024  # a request's header lines, all together
_HEX_SIZE, _LENGTH = re.compile(rb"[0-9A-Fa-f]{1,16}"), re.compile(r"[0-9]{1,18}")
_ERROR_SECONDS = 1.0  # to write an error into a stream whose query ran out of time
_BOOLS = {"true": "1", "false": "0"}


class QueryServerError(AipipeError):
    """The read endpoint could not start; the message says why and what to change."""


@dataclass(frozen=True)
class Deadline:
    """When a query's time is up: ``max_execution_time`` after it got its slot, whatever it
    waits on. The engine's own limit does not see a client that reads slowly: chDB pauses
    a stream while the socket is full, and the query sits in its slot."""

    seconds: float
    at: float  # on time.monotonic()

    @classmethod
    def after(cls, seconds: float) -> Deadline | None:
        return cls(seconds, time.monotonic() + seconds) if seconds > 0 else None

    def left(self) -> float:
        return self.at - time.monotonic()

    def check(self) -> None:
        if self.left() <= 0:
            raise QueryError(_TIMEOUT, f"Timeout exceeded: elapsed "
                             f"{self.seconds - self.left():.3f} seconds, maximum: "
                             f"{self.seconds:g}, the time the client took to read the result "
                             "included.")


def _malformed(message: str) -> QueryError:
    return QueryError(_CORRUPTED, message)


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
    # open connections, idle or not (a thread each); more are answered 503 and closed
    max_connections: int = 64
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
    client, and the output settings (``_OUTPUT_SETTINGS``, by name) the client asked for.
    Anything else is refused as ClickHouse refuses it in readonly mode, unless it asks for
    the value already in force (what drivers send by default, e.g. ``async_insert=0``); an
    unknown name is code 115."""
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
        elif current is not None and name not in current:
            raise QueryError(115, f"Unknown setting '{name}'.")
        elif name in _OUTPUT_SETTINGS:
            out[name] = value
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
    deadline: Deadline | None = None
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
            limits = self.limits
            who = (f"admission's budget lookups run {limits.admission_concurrent} at once, in "
                   "slots of their own," if admission else f"the read endpoint runs "
                   f"{limits.max_concurrent} at once (besides admission's budget lookups),")
            raise QueryError(_TOO_MANY, f"Too many simultaneous queries: {who} and none ended "
                             f"within {limits.queue_seconds:g} s; retry shortly.")
        try:
            yield
        finally:
            slots.release()

    @contextlib.contextmanager
    def connection(self, settings: Mapping[str, str], database: str) -> Iterator[tuple[Any, str]]:
        """A connection whose default database is ``database``: never ``system`` (its
        unqualified names would skip the check of ``system.<table>``)."""
        if database.lower() in SYSTEM_DATABASES:
            raise _system_default(database)
        key = json.dumps([sorted(settings.items()), database])
        with self._lock:
            if self._closed:
                raise QueryError(ABORTED, "The read endpoint is shutting down.")
            idle = self._idle.get(key)
            pooled = idle.pop() if idle else None
        if pooled is None:
            tag = f"aipipe-read-{uuid.uuid4().hex}"
            conn = self._connect(settings, tag)
            try:  # the engine quotes the name (a parameter), and says where it went
                conn.query("USE {db:Identifier}", "TabSeparated", params={"db": database})
                current = conn.query("SELECT currentDatabase()", "TabSeparatedRaw").bytes()
            except Exception as exc:
                conn.close()
                raise QueryError(_UNKNOWN_DB, f"Database {database} does not exist.") from exc
            if current.decode().strip().lower() in SYSTEM_DATABASES:
                conn.close()
                raise _system_default(database)
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
              params: Mapping[str, str], max_bytes: int,
              deadline: Deadline | None = None) -> _Running:
        try:
            stream = conn.send_query(verdict.sql, fmt, params=dict(params))
        except Exception as exc:
            raise QueryError.from_engine(exc) from exc
        return _Running(stream, tag, max_bytes, deadline)

    def chunks(self, running: _Running) -> Iterator[bytes]:
        """The result's blocks as the engine produces them; engine errors as QueryError."""
        while True:
            if running.deadline is not None:
                running.deadline.check()
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


def _system_default(database: str) -> QueryError:
    return QueryError(ACCESS_DENIED, f"Database {database} is not readable as the default "
                      "database here; name the allowed system tables in the query.")


# -- HTTP --------------------------------------------------------------------------------


def _loopback(value: str) -> bool:
    host = urlsplit(value if "//" in value else f"//{value}").hostname or ""
    return host in LOOPBACK_HOSTS or host == "::1"


class _Gone(Exception):
    """The client closed its connection."""


class _HeadBudget:
    """The request's ``rfile`` while its headers are read: ``left`` bytes in all."""

    def __init__(self, rfile: Any, left: int) -> None:
        self._rfile, self._left = rfile, left

    def readline(self, size: int = -1) -> bytes:
        if self._left <= 0:
            raise http.client.LineTooLong(f"headers past {_MAX_HEAD} bytes")
        line: bytes = self._rfile.readline(self._left if size < 0 else min(size, self._left))
        self._left -= len(line)
        return line


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "aipipe-queryserver"
    timeout = 60  # an idle keep-alive connection ends after this
    # TCP_NODELAY: a reply's headers and first block are separate writes, and Nagle would
    # hold the second until the client's delayed ACK (40 ms a query)
    disable_nagle_algorithm = True
    engine: ReadEngine
    password: str
    admission_key: str
    _pending_body = False
    _deadline: Deadline | None = None

    def handle(self) -> None:
        with contextlib.suppress(ConnectionError):  # a client that hung up between requests
            super().handle()

    def parse_request(self) -> bool:
        # http.server alone takes 100 header lines of 64 KiB, from anyone, per connection
        rfile = self.rfile
        self.rfile = cast(io.BufferedIOBase, _HeadBudget(rfile, _MAX_HEAD))
        try:
            return super().parse_request()
        finally:
            self.rfile = rfile

    def do_GET(self) -> None:
        self._handle(get=True)

    def do_POST(self) -> None:
        self._handle(get=False)

    def _body(self, native: bool = False) -> bytes:
        """The request body, decoded, never more than ``max_body_bytes`` at any step."""
        limit = self.engine.limits.max_body_bytes
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            body = self._chunked(limit)
        else:
            length = self.headers.get("Content-Length", "").strip() or "0"
            if not _LENGTH.fullmatch(length):
                raise _malformed(f"Content-Length {length[:40]!r} is not a number of bytes.")
            if int(length) > limit:
                raise self._too_big(int(length))
            body = self.rfile.read(int(length))
            if len(body) < int(length):
                raise _Gone()
        self._pending_body = False
        encoding = self.headers.get("Content-Encoding", "").strip().lower()
        if encoding in ("gzip", "deflate", "x-gzip"):
            inflater = zlib.decompressobj(47)  # gzip or zlib, by the header
            try:
                body = inflater.decompress(body, limit + 1)
            except zlib.error as exc:
                raise QueryError(354, f"Cannot decompress the request body ({exc}).") from None
            if len(body) > limit or inflater.unconsumed_tail:
                raise self._too_big()
        elif encoding == "lz4":  # what clickhouse-connect sends (an LZ4 frame: at most ~255x)
            out = bytearray(limit + 1)  # where it stops: never more than this is written
            try:
                size = cramjam.lz4.decompress_into(body, out)
            except cramjam.DecompressionError as exc:
                if "whole buffer" in str(exc):  # it did not fit in limit + 1 bytes
                    raise self._too_big() from None
                raise QueryError(354, f"Cannot decompress the request body ({exc}).") from None
            if size > limit:
                raise self._too_big()
            body = bytes(out[:size])
        elif encoding not in ("", "identity"):
            raise QueryError(NOT_IMPLEMENTED, f"Content-Encoding {encoding} is not supported; "
                             "send gzip, deflate or lz4.")
        if native:  # decompress=1: ClickHouse's own blocks, inside any Content-Encoding
            try:
                body = decompress_blocks(body, limit)
            except TooLarge as exc:
                raise self._too_big(exc.size) from None
        return body

    def _chunked(self, limit: int) -> bytes:
        """A ``Transfer-Encoding: chunked`` body of at most ``limit`` bytes; every line of
        its framing at most ``_MAX_LINE`` bytes, and at most ``_MAX_TRAILERS`` trailers."""
        chunks, total = [], 0
        while size := self._chunk_size():
            total += size
            if total > limit:
                raise self._too_big(total)
            data = self.rfile.read(size)
            if len(data) < size:
                raise _Gone()
            chunks.append(data)
            if self.rfile.read(2) != b"\r\n":
                raise _malformed("A chunk of the chunked body does not end with CRLF.")
        for _ in range(_MAX_TRAILERS):
            if not self._line().strip():
                return b"".join(chunks)
        raise _malformed(f"The chunked body has more than {_MAX_TRAILERS} trailer lines.")

    def _chunk_size(self) -> int:
        size = self._line().split(b";", 1)[0].strip()
        if not _HEX_SIZE.fullmatch(size):
            raise _malformed("Unexpected data instead of HTTP chunk header.")
        return int(size, 16)

    def _line(self) -> bytes:
        line = self.rfile.readline(_MAX_LINE + 1)
        if not line:
            raise _Gone()
        if not line.endswith(b"\n"):
            raise _malformed(f"A line of the chunked body's framing is longer than {_MAX_LINE} "
                             "bytes.")
        return line

    def _skip_body(self) -> None:
        """Read and drop a body that was not read, up to the limit and never kept, so that a
        refusal reaches the client (closing on unread data resets the connection); a larger
        or chunked one closes the connection after the reply instead."""
        if not self._pending_body:
            return
        length = self.headers.get("Content-Length", "").strip()
        closing, self.close_connection = self.close_connection, True
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower() or not (
                _LENGTH.fullmatch(length) and int(length) <= self.engine.limits.max_body_bytes):
            return
        left = int(length)
        with contextlib.suppress(OSError):
            while left > 0 and (piece := self.rfile.read(min(left, _CHUNK))):
                left -= len(piece)
        if left == 0:
            self._pending_body, self.close_connection = False, closing

    def _too_big(self, size: int | None = None) -> QueryError:
        what = f"The request body ({size} bytes)" if size is not None else (
            "The request body, decompressed,")
        return QueryError(_TOO_MANY_BYTES, f"{what} is larger than the read endpoint's limit of "
                          f"{self.engine.limits.max_body_bytes} bytes.")

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
        # a body left unread would be taken for the next request: such a reply closes
        self._pending_body = "chunked" in self.headers.get("Transfer-Encoding", "").lower() or (
            self.headers.get("Content-Length", "0").strip() not in ("", "0"))
        self._deadline = None
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
            # who asks comes from the URL and the headers: nothing of the body is read, let
            # alone decompressed, for a client without the password
            user, key = self._user(params)
            if user != USER or not hmac.compare_digest(key.encode(), self.password.encode()):
                raise QueryError(_AUTH, f"{user or 'default'}: Authentication failed: password "
                                 "is incorrect, or there is no user with such name.")
            body = b"" if get else self._body(_flag(params, "decompress"))
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
        lookup = params.get("quota_key") == ADMISSION_QUOTA_KEY
        if lookup:  # budget lookups: short
            settings["max_execution_time"] = str(min(float(settings["max_execution_time"]), 10))
        # and never queued behind analysts, when they carry the key only this process and
        # the workers it tells have (the quota key alone is anyone's to send)
        admission = lookup and hmac.compare_digest(
            self.headers.get(ADMISSION_KEY_HEADER, "").encode(), self.admission_key.encode())
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
            # the slot is held until the client has the result: its time counts too
            self._deadline = Deadline.after(float(settings["max_execution_time"]))
            try:
                streamed = fmt.lower() in _STREAMED and params.get("wait_end_of_query") != "1"
                if not streamed:
                    data, summary, elapsed = self.engine.whole(conn, verdict, fmt, binds)
                    if self._deadline is not None:
                        self._deadline.check()
                    headers["X-ClickHouse-Summary"] = _summary(summary, elapsed)
                    self._reply(200, compress_blocks(data) if native else data, headers, gzip)
                    return
                running = self.engine.start(conn, tag, verdict, fmt, binds,
                                            int(float(settings["max_result_bytes"])),
                                            self._deadline)
                with _watch(self.connection, lambda: self.engine.kill(tag)) as gone:
                    self._stream(running, headers, gzip, gone, native)
            finally:
                self._deadline = None
                with contextlib.suppress(OSError):
                    self.connection.settimeout(self.timeout)

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
        except QueryError as exc:
            if gone.is_set():
                raise _Gone() from None
            if exc.code == _TIMEOUT:
                self.engine.kill(running.tag)
            with contextlib.suppress(Exception):
                running.stream.cancel()
            raise
        headers["X-ClickHouse-Summary"] = _summary(running.summary, running.elapsed)
        http = _packer(encoding)

        def packer(data: bytes | None) -> bytes:  # each engine block one native block
            return http(compress_blocks(data) if native and data else data)

        try:
            self.send_response(200)
            for name, value in headers.items():
                self.send_header(name, value)
            if encoding:
                self.send_header("Content-Encoding", encoding)
            self.send_header("Transfer-Encoding", "chunked")
            self._arm()
            self.end_headers()
            self._write_chunk(packer(b"".join(first)))
            for data in blocks:
                self._write_chunk(packer(data))
            self._write_chunk(packer(None))
            self._send(b"0\r\n\r\n")
        except QueryError as exc:  # headers are gone: the error ends the body, unterminated
            self.close_connection = True
            if exc.code == _TIMEOUT:  # out of time: the engine may be paused on a full socket
                self.engine.kill(running.tag)
            if not gone.is_set():
                error = b"\n" + exc.body(self.engine.version)
                error = compress_blocks(error) if native else error
                with contextlib.suppress(OSError):  # in the stream's blocks, as ClickHouse does
                    self.connection.settimeout(_ERROR_SECONDS)  # to a slow reader, if it fits
                    self.wfile.write(f"{len(error):x}\r\n".encode() + error + b"\r\n")
            with contextlib.suppress(Exception):
                running.stream.cancel()
        except OSError as exc:  # gone, or so slow that the query's time ran out in a write
            self._abandon(exc)
            self.close_connection = True
            gone.set()
            self.engine.kill(running.tag)
            with contextlib.suppress(Exception):
                running.stream.cancel()
            raise _Gone() from None

    def _write_chunk(self, data: bytes) -> None:
        if data:
            self._send(f"{len(data):x}\r\n".encode() + data + b"\r\n")

    def _send(self, data: bytes) -> None:
        self._arm()
        self.wfile.write(data)

    def _abandon(self, exc: OSError) -> None:
        """After a write timed out, close with a reset: what the kernel still holds for a
        client that does not read is dropped, not sent on for minutes after the query."""
        if isinstance(exc, TimeoutError):
            with contextlib.suppress(OSError):
                self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER,
                                           struct.pack("ii", 1, 0))

    def _arm(self) -> None:
        """Bound the next write by the running query's time left (``TimeoutError`` when
        there is none): a client that reads slowly does not keep its slot past it."""
        if self._deadline is not None:
            left = self._deadline.left()
            if left <= 0:
                raise TimeoutError("the query's time ran out while its result was sent")
            self.connection.settimeout(min(left, self.timeout))

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
        self._skip_body()
        try:
            self.send_response(status)
            for name, value in headers.items():
                self.send_header(name, value)
            if encoding:
                self.send_header("Content-Encoding", encoding)
            self.send_header("Content-Length", str(len(data)))
            if self.close_connection:
                self.send_header("Connection", "close")
            self._arm()
            self.end_headers()
            self._send(data)
        except OSError as exc:
            self._abandon(exc)
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
        # a selector, not select(): that refuses a descriptor past 1023 (ValueError)
        with selectors.DefaultSelector() as selector:
            try:
                selector.register(sock, selectors.EVENT_READ)
                while not done.is_set():
                    readable = selector.select(0.2)
                    if readable and sock.recv(1, socket.MSG_PEEK) == b"":
                        raise ConnectionResetError
                    if readable:  # the client sent its next request early: it is still there
                        done.wait(0.2)
            except OSError:
                if not done.is_set():
                    gone.set()
                    on_gone()

    thread = threading.Thread(target=watch, name="query-watch", daemon=True)
    thread.start()
    try:
        yield gone
    finally:
        done.set()
        thread.join(timeout=1)


class _Server(ThreadingHTTPServer):
    """A thread per connection, ``max_connections`` at most: the next one is answered 503
    (code 202) from the accepting thread and closed, so idle sockets cannot pile up threads."""

    daemon_threads = True

    def __init__(self, address: tuple[str, int], handler: type[_Handler],
                 max_connections: int) -> None:
        self._open = threading.BoundedSemaphore(max_connections)
        busy = QueryError(_TOO_MANY, f"Too many connections: the read endpoint keeps "
                          f"{max_connections} open at most; close idle ones, or retry shortly.")
        text = busy.body(handler.engine.version)
        self._busy = (
            "HTTP/1.1 503 Service Unavailable\r\nContent-Type: text/plain; charset=UTF-8\r\n"
            f"X-ClickHouse-Exception-Code: {_TOO_MANY}\r\nContent-Length: {len(text)}\r\n"
            "Connection: close\r\n\r\n").encode() + text
        super().__init__(address, handler)

    def process_request(self, request: Any, client_address: Any) -> None:
        if not self._open.acquire(blocking=False):
            self._refuse(request)
            return
        try:
            super().process_request(request, client_address)
        except BaseException:
            self._open.release()
            raise

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._open.release()

    def _refuse(self, request: socket.socket) -> None:
        """Answer without waiting: the reply fits an empty send buffer; what the client
        sent already is read (a little), so that closing does not reset the connection
        under the reply."""
        with contextlib.suppress(OSError):
            request.setblocking(False)
            request.sendall(self._busy)
            request.shutdown(socket.SHUT_WR)
            for _ in range(4):
                if not request.recv(_CHUNK):
                    break
        request.close()


class QueryServer:
    """Serve read queries on ``host:port`` (0: any free port) from a daemon thread.

    With ``home``, ``start`` publishes ``<home>/query-endpoint.json`` (0600: URL, user,
    password, served chDB path) for other processes and ``stop`` removes it.
    ``admission_key`` (``ADMISSION_KEY_HEADER``) puts admission's budget lookups in their
    own slots; the reader password alone does not.
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
        self.admission_key = secrets.token_urlsafe(24)
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
        return Endpoint(self.url, self.user, self.password, self._engine.path,
                        self.admission_key)

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
        handler = type("Handler", (_Handler,), {"engine": engine, "password": self.password,
                                                 "admission_key": self.admission_key})
        try:
            server = _Server((self.host, self.port), handler, self.limits.max_connections)
        except OSError as exc:
            engine.close()
            raise QueryServerError(
                f"The read endpoint cannot listen on {self.host}:{self.port} ({exc.strerror}); "
                "set AIPIPE_QUERY_PORT to a free port, or 0 for any."
            ) from exc
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
