"""``aipipe ui``: a cost analytics page on loopback, and the JSON API behind it.

The page (``static/index.html`` with ``static/ui.js``, plain SVG drawn by that script, no
CDN) asks two endpoints and redraws without reloading:

- ``GET /api/summary?from=&to=&client=``: spend per day by client, model and operation
  type (``ai_cost_daily_between``, days of ``requested_at``), totals, budgets with their
  thresholds (the current period, by ``created_at``, as admission counts), rejections by
  reason (``events_archive``) and provider errors (failed operations by provider, model
  and message);
- ``GET /api/operations?client=&from=&to=``: one client's operations (request id, model,
  cost, usage and the outputs of its ``operation.completed``).

The API answers the page only: a request a browser marks as from another site or origin
(``Sec-Fetch-Site``), or one without the ``X-Aipipe-UI`` header that the page's script
sends, gets a 403 before anything is read (another site's page cannot send that header
without a CORS preflight, which this app never grants). Every query is parameterized;
parameters are checked first and a bad one gets a 400 with one sentence. Reads go where
``aipipe sql`` reads (``aipipe.sqlcmd.analyst_session``): the running pipeline's
authenticated read endpoint, or the ClickHouse server. When no pipeline serves the
configured chDB path, each refresh opens it in a child process that exits after answering:
a process that has opened a chDB path keeps it until it exits, and a pipeline started while
the page is up must be able to take the path. One child runs at a time; a request that
waits longer than ``CHILD_WAIT_SECONDS`` for it gets a 503. Money is sent as exact decimal
text.
"""

from __future__ import annotations

import contextlib
import json
import multiprocessing
import signal
import socket
import sys
import threading
from collections.abc import Callable, Iterator, Mapping
from contextlib import AbstractContextManager
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from decimal import ROUND_FLOOR, Decimal, localcontext
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import structlog
import uvicorn
from starlette.applications import Starlette
from starlette.datastructures import Headers
from starlette.middleware import Middleware
from starlette.middleware.trustedhost import TrustedHostMiddleware
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles
from starlette.types import ASGIApp, Receive, Scope, Send

from aipipe.consumers.costs.budgets import THRESHOLDS, period_bounds, thresholds_reached
from aipipe.consumers.costs.store import database_name
from aipipe.infra.leave import leave
from aipipe.infra.logging import configure_logging
from aipipe.infra.settings import Settings
from aipipe.reader import endpoint_client, serving_endpoint
from aipipe.schemas.errors import AipipeError
from aipipe.sqlcmd import analyst_client, analyst_session

log = structlog.get_logger("aipipe.ui")
STATIC = Path(__file__).parent / "static"
LOOPBACK = ("127.0.0.1", "::1", "localhost")
MAX_DAYS = 366
CHILD_EXIT_SECONDS = 30.0  # a reading child's end, once it has answered or been killed
# a reading child's start (a fresh interpreter, chDB opened) on top of its queries' own limit
CHILD_START_SECONDS = 60.0
# a request's wait for the reading child of another: room for one or two reads ahead of it
# (15 to 20 s each on 2 busy cores), then a 503 rather than an ever longer queue
CHILD_WAIT_SECONDS = 45.0
#: the header the page's script sends on every API call (``static/ui.js``)
API_HEADER = "X-Aipipe-UI"
MAX_OPERATIONS = 1000
Session = Callable[[], AbstractContextManager[Any]]


class UiError(AipipeError):
    """The UI cannot start or serve; one sentence."""


class Busy(UiError):
    """Another read holds the chDB path for longer than a request waits; answered with 503."""


class BadParam(ValueError):
    """A request parameter the API refuses; the message is the sentence the caller sees."""


@dataclass(frozen=True)
class Query:
    start: date  # first day, inclusive
    end: date  # last day, inclusive
    client: str | None

    @property
    def params(self) -> dict[str, Any]:
        after = self.end + timedelta(days=1)
        out: dict[str, Any] = {
            "start": self.start.isoformat(), "end": after.isoformat(),
            "t0": f"{self.start.isoformat()} 00:00:00", "t1": f"{after.isoformat()} 00:00:00"}
        if self.client is not None:
            out["client"] = self.client
        return out


def _day(value: str | None, name: str, default: date) -> date:
    if value is None or value == "":
        return default
    try:
        return date.fromisoformat(value)
    except ValueError:
        raise BadParam(f"'{name}' must be a day as YYYY-MM-DD, such as 2026-11-01; "
                       f"got {value!r}.") from None


def _client(value: str | None, required: bool) -> str | None:
    if value is None or value == "":
        if required:
            raise BadParam("'client' is required: the client whose operations to list.")
        return None
    if len(value) > 200 or any(ord(c) < 0x20 or ord(c) == 0x7F for c in value):
        raise BadParam("'client' must be a client id: 1 to 200 characters, no control "
                       "characters.")
    return value


def parse_query(args: Mapping[str, str], today: date, *, client_required: bool = False,
                allowed: tuple[str, ...] = ("from", "to", "client")) -> Query:
    """The checked parameters of an API call (``from``/``to`` days, inclusive; a client)."""
    unknown = sorted(set(args) - set(allowed))
    if unknown:
        raise BadParam(f"Unknown parameter '{unknown[0]}'; use {', '.join(allowed)}.")
    end = _day(args.get("to"), "to", today)
    start = _day(args.get("from"), "from", end - timedelta(days=29))
    if start > end:
        raise BadParam(f"'from' ({start}) is after 'to' ({end}); the range is from..to, "
                       "both days included.")
    if (end - start).days + 1 > MAX_DAYS:
        raise BadParam(f"The range from {start} to {end} is longer than {MAX_DAYS} days; "
                       "choose a shorter one.")
    return Query(start, end, _client(args.get("client"), client_required))


def used_percent(spent: Decimal, amount: Decimal) -> Decimal | None:
    """The share of ``amount`` spent, in percent to one decimal, rounded down: the shown
    share reaches 80.0, 90.0 or 100.0 exactly when ``thresholds_reached`` says so."""
    if not amount:
        return None
    with localcontext() as floor:
        floor.rounding = ROUND_FLOOR  # the division too: never rounded up past a threshold
        return (spent * 100 / amount).quantize(Decimal("0.1"))


def usd(value: Any) -> str:
    """Exact decimal text of a money value (no exponent, trailing zeros kept as stored)."""
    return format(Decimal(value if value is not None else 0), "f")


class CostReader:
    """The page's questions, each one parameterized query through an analyst session."""

    def __init__(self, session: Session, database: str, settings: Settings) -> None:
        self.session = session
        self.db = f"`{database_name(database)}`"
        self.settings = settings
        # one session at a time: embedded without a pipeline, each opens the chDB path
        self._lock = threading.Lock()

    def _rows(self, client: Any, sql: str, params: dict[str, Any]) -> list[tuple[Any, ...]]:
        return [tuple(r) for r in client.query(sql, parameters=params).result_rows]

    def summary(self, q: Query, now: datetime) -> dict[str, Any]:
        p = q.params
        daily = f"{self.db}.ai_cost_daily_between(start = {{start:Date}}, end = {{end:Date}})"
        only = " WHERE client_id = {client:String}" if q.client else ""
        also = " AND client_id = {client:String}" if q.client else ""
        with self._lock, self.session() as client:
            series = {
                name: self._rows(client, (
                    f"SELECT day, {column}, sum(operations), sum(cost_usd) FROM {daily}{only} "
                    f"GROUP BY day, {column} ORDER BY day, {column}"), p)
                for name, column in (("by_client", "client_id"), ("by_model", "model"),
                                     ("by_operation_type", "operation_type"))}
            [(cost, operations)] = self._rows(
                client, f"SELECT sum(cost_usd), sum(operations) FROM {daily}{only}", p)
            rejections = self._rows(client, (
                "SELECT JSONExtractString(payload, 'reason') AS reason, count() "
                f"FROM {self.db}.events_archive FINAL "
                "WHERE event_type = 'operation.rejected' "
                "AND occurred_at >= {t0:DateTime64(3, 'UTC')} "
                f"AND occurred_at < {{t1:DateTime64(3, 'UTC')}}{also} "
                "GROUP BY reason ORDER BY count() DESC, reason"), p)
            errors = self._rows(client, (
                "SELECT provider, model, ifNull(error_message, '') AS error, count(), "
                f"max(created_at) FROM {self.db}.ai_cost_tracking FINAL WHERE NOT success "
                "AND requested_at >= {t0:DateTime64(3, 'UTC')} "
                f"AND requested_at < {{t1:DateTime64(3, 'UTC')}}{also} "
                "GROUP BY provider, model, error ORDER BY count() DESC, provider, model, error"),
                p)
            clients = [str(c) for (c,) in self._rows(
                client, f"SELECT DISTINCT client_id FROM {self.db}.ai_cost_tracking "
                "ORDER BY client_id LIMIT 10000", {})]
            budgets = self._budgets(client, q.client, clients, now)
        days = sorted({_iso(row[0]) for rows in series.values() for row in rows})
        return {
            "from": q.start.isoformat(), "to": q.end.isoformat(), "client": q.client,
            "days": days, "total_usd": usd(cost), "operations": int(operations or 0),
            **{name: _series(rows) for name, rows in series.items()},
            "rejections": [{"reason": str(r), "count": int(n)} for r, n in rejections],
            "provider_errors": [
                {"provider": str(pr), "model": str(m), "error": str(e), "count": int(n),
                 "last_at": _iso(at)} for pr, m, e, n, at in errors],
            "budgets": budgets, "clients": clients, "thresholds": list(THRESHOLDS),
        }

    def _budgets(self, client: Any, only: str | None, known: list[str],
                 now: datetime) -> list[dict[str, Any]]:
        """Each budget (``client_budgets``, else the settings' default for a known client)
        with the spend of its current period (``created_at``) and the thresholds reached."""
        where = " WHERE client_id = {client:String}" if only else ""
        stored = {str(c): (Decimal(a), str(p), "table") for c, a, p in self._rows(
            client, "SELECT client_id, argMax(amount_usd, set_at), argMax(period, set_at) "
            f"FROM {self.db}.client_budgets FINAL{where} GROUP BY client_id ORDER BY client_id",
            {"client": only} if only else {})}
        default = self.settings.budget_usd
        if default is not None:
            for name in ([only] if only else known):
                stored.setdefault(name, (default, self.settings.budget_period, "settings"))
        out = []
        for name, (amount, period, source) in sorted(stored.items()):
            start, end = period_bounds(period, now)  # type: ignore[arg-type]
            [(spend,)] = self._rows(
                client, f"SELECT sum(cost_usd) FROM {self.db}.ai_cost_tracking FINAL "
                "WHERE client_id = {client:String} AND created_at >= {t0:DateTime64(3, 'UTC')} "
                "AND created_at < {t1:DateTime64(3, 'UTC')}",
                {"client": name, "t0": _moment(start), "t1": _moment(end)})
            spent = Decimal(spend or 0)
            share = used_percent(spent, amount)
            out.append({
                "client_id": name, "period": period, "period_start": start.isoformat(),
                "period_end": end.isoformat(), "budget_usd": usd(amount),
                "spend_usd": usd(spent), "remaining_usd": usd(amount - spent),
                "used_percent": None if share is None else usd(share),
                "thresholds_reached": thresholds_reached(spent, amount),
                "over_budget": spent >= amount, "source": source})
        return out

    def operations(self, q: Query) -> dict[str, Any]:
        p = {**q.params, "limit": MAX_OPERATIONS + 1}
        with self._lock, self.session() as client:
            rows = self._rows(client, (
                "SELECT c.requested_at, c.request_id, c.operation_id, c.operation_type, "
                "c.provider, c.model, c.success, c.cost_usd, c.input_tokens, c.output_tokens, "
                "c.image_count, c.video_duration_seconds, ifNull(c.error_message, ''), "
                "ifNull(o.outputs, '[]') "
                f"FROM {self.db}.ai_cost_tracking AS c FINAL "
                "LEFT JOIN (SELECT operation_id, argMax(JSONExtractRaw(payload, 'outputs'), "
                f"occurred_at) AS outputs FROM {self.db}.events_archive FINAL "
                "WHERE event_type = 'operation.completed' AND client_id = {client:String} "
                "GROUP BY operation_id) AS o ON o.operation_id = c.operation_id "
                "WHERE c.client_id = {client:String} "
                "AND c.requested_at >= {t0:DateTime64(3, 'UTC')} "
                "AND c.requested_at < {t1:DateTime64(3, 'UTC')} "
                "ORDER BY c.requested_at DESC, c.operation_id LIMIT {limit:UInt32}"), p)
            [(count, cost)] = self._rows(client, (
                f"SELECT count(), sum(cost_usd) FROM {self.db}.ai_cost_tracking FINAL "
                "WHERE client_id = {client:String} "
                "AND requested_at >= {t0:DateTime64(3, 'UTC')} "
                "AND requested_at < {t1:DateTime64(3, 'UTC')}"), p)
        return {
            "client": q.client, "from": q.start.isoformat(), "to": q.end.isoformat(),
            "count": int(count), "total_usd": usd(cost),
            "truncated": len(rows) > MAX_OPERATIONS,
            "operations": [_operation(r) for r in rows[:MAX_OPERATIONS]],
        }


def _operation(row: tuple[Any, ...]) -> dict[str, Any]:
    (at, request_id, operation_id, kind, provider, model, success, cost, tokens_in,
     tokens_out, images, video_seconds, error, outputs) = row
    try:
        listed = json.loads(outputs) or []
    except ValueError:
        listed = []
    return {
        "requested_at": _iso(at), "request_id": request_id, "operation_id": operation_id,
        "operation_type": kind, "provider": provider, "model": model, "success": bool(success),
        "cost_usd": usd(cost), "input_tokens": tokens_in, "output_tokens": tokens_out,
        "image_count": images,
        "video_seconds": None if video_seconds is None else usd(video_seconds),
        "error": error,
        "outputs": [{"uri": str(o.get("uri", "")), "mime_type": str(o.get("mime_type", ""))}
                    for o in listed if isinstance(o, dict)],
    }


def _series(rows: list[tuple[Any, ...]]) -> list[dict[str, Any]]:
    """``[{name, total_usd, operations, days: {day: usd}}]``, most spent first."""
    out: dict[str, dict[str, Any]] = {}
    for day, name, operations, cost in rows:
        entry = out.setdefault(str(name), {"name": str(name), "total": Decimal(0),
                                           "operations": 0, "days": {}})
        entry["total"] += Decimal(cost)
        entry["operations"] += int(operations)
        entry["days"][_iso(day)] = usd(cost)
    ordered = sorted(out.values(), key=lambda e: (-e["total"], e["name"]))
    return [{"name": e["name"], "total_usd": usd(e.pop("total")),
             "operations": e["operations"], "days": e["days"]} for e in ordered]


def _iso(value: Any) -> str:
    if isinstance(value, datetime):
        return (value if value.tzinfo else value.replace(tzinfo=UTC)).isoformat()
    return value.isoformat() if isinstance(value, date) else str(value)


def _moment(value: datetime) -> str:
    return value.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S.%f")[:-3]


def refusal(headers: Headers) -> str | None:
    """Why an API request is refused (the sentence of its 403), or ``None``: a browser marks
    a request from another site or origin in ``Sec-Fetch-Site``, and a page elsewhere cannot
    send ``API_HEADER`` without a CORS preflight, which this app never grants."""
    site = headers.get("sec-fetch-site")
    if site is not None and site not in ("same-origin", "none"):
        return (f"This API answers only the cost page it serves, not a page from another "
                f"site or origin (Sec-Fetch-Site: {site}).")
    if API_HEADER not in headers:
        return (f"API requests must carry the header '{API_HEADER}: 1', as the cost page's "
                f"own requests do (with curl: -H '{API_HEADER}: 1').")
    return None


class PageOnly:
    """ASGI middleware: an API request ``refusal`` names gets a 403 before anything is read."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        refused = refusal(Headers(scope=scope)) if scope["type"] == "http" else None
        if refused is None:
            await self.app(scope, receive, send)
        else:
            await JSONResponse({"error": refused}, status_code=403)(scope, receive, send)


def create_app(reads: Callable[..., dict[str, Any]],
               clock: Callable[[], datetime] = lambda: datetime.now(UTC),
               allowed_hosts: list[str] | None = None) -> Starlette:
    """The page, its script and the JSON API; ``reads(method, *args)`` answers with a
    ``CostReader`` method."""

    def answer(call: Callable[[], dict[str, Any]]) -> Response:
        try:
            return JSONResponse(call())
        except BadParam as exc:
            return JSONResponse({"error": str(exc)}, status_code=400)
        except Busy as exc:
            return JSONResponse({"error": str(exc)}, status_code=503)
        except Exception as exc:  # ClickHouse or the read path: one sentence, 502
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            return JSONResponse({"error": f"ClickHouse could not answer: {first}"},
                                status_code=502)

    def summary(request: Request) -> Response:
        return answer(lambda: reads(
            "summary", parse_query(request.query_params, clock().date()), clock()))

    def operations(request: Request) -> Response:
        return answer(lambda: reads(
            "operations", parse_query(request.query_params, clock().date(),
                                      client_required=True)))

    def index(request: Request) -> Response:
        return FileResponse(STATIC / "index.html", headers=_HEADERS)

    middleware = [Middleware(TrustedHostMiddleware, allowed_hosts=allowed_hosts)] \
        if allowed_hosts else []
    return Starlette(routes=[
        Route("/", index),
        Mount("/api", routes=[Route("/summary", summary), Route("/operations", operations)],
              middleware=[Middleware(PageOnly)]),
        Mount("/static", StaticFiles(directory=STATIC), name="static"),
    ], middleware=middleware)


#: the page runs only its own script and styles: nothing from elsewhere
_HEADERS = {"Content-Security-Policy": "default-src 'self'; img-src 'self' data:",
            "X-Content-Type-Options": "nosniff", "Referrer-Policy": "no-referrer"}


def reader_for(settings: Settings) -> CostReader:
    return CostReader(lambda: analyst_session(settings), settings.clickhouse_database, settings)


@contextlib.contextmanager
def _served(settings: Settings) -> Iterator[Any]:
    """A client on the server or the pipeline's endpoint, as ``aipipe sql`` gets it; never
    the chDB path itself (this process would keep it)."""
    if not settings.embedded:
        yield analyst_client(settings)
        return
    endpoint = serving_endpoint(settings)
    if endpoint is None:
        raise UiError("The pipeline's read endpoint stopped while answering; refresh to "
                      "read the chDB path directly.")
    yield endpoint_client(endpoint, settings.clickhouse_database)


class Reads:
    """Where each request is answered: here, through the pipeline's endpoint or the server;
    in a one-shot child process when the chDB path is not served (see the module's note)."""

    def __init__(self, settings: Settings, wait: float = CHILD_WAIT_SECONDS) -> None:
        self.settings = settings
        self.reader = CostReader(lambda: _served(settings), settings.clickhouse_database,
                                 settings)
        self._child = threading.Lock()  # one child (one opener of the path) at a time
        self.wait = wait

    def __call__(self, method: str, *args: Any) -> dict[str, Any]:
        if self.settings.embedded and serving_endpoint(self.settings) is None:
            if not self._child.acquire(timeout=self.wait):
                raise Busy(f"Another read of the chDB path is still running after "
                           f"{self.wait:g} s (one runs at a time while no pipeline serves "
                           "the path); refresh once it ends.")
            try:
                return _read_in_child(self.settings, method, args,
                                      self.settings.query_max_execution_seconds
                                      + CHILD_START_SECONDS)
            finally:
                self._child.release()
        result: dict[str, Any] = getattr(self.reader, method)(*args)
        return result


def _read_in_child(settings: Settings, method: str, args: tuple[Any, ...], limit: float,
                   target: Callable[..., None] | None = None) -> dict[str, Any]:
    """One read in a fresh (spawned) process that opens the chDB path, sends its answer and
    ends at once: through ``aipipe.infra.leave``, since chDB's exit handlers can hang. A
    child with no answer after ``limit`` seconds is killed (a page waits no longer, and the
    path is let go of); ``target`` stands in for the child's part in tests."""
    context = multiprocessing.get_context("spawn")
    answers, sender = context.Pipe(duplex=False)
    child = context.Process(target=target or _in_child, args=(sender, settings, method, args),
                            name="aipipe-ui-read", daemon=True)
    child.start()
    sender.close()  # the child's copy is the only one: its end is the answer's end
    try:
        if not answers.poll(limit):
            child.kill()
            log.warning("ui_read_timed_out", method=method, seconds=limit)
            raise UiError(
                f"Reading the chDB path took longer than {limit:.0f} s, so it was stopped; "
                "narrow the date range or the client, or raise "
                "AIPIPE_QUERY_MAX_EXECUTION_SECONDS.")
        kind, value = answers.recv()
    except EOFError:
        kind, value = "error", None
    finally:
        answers.close()
        child.join(timeout=CHILD_EXIT_SECONDS)
        if child.is_alive():  # it is ending, or stuck; either way it must not keep the path
            child.kill()
            child.join()
    if kind == "error":
        raise UiError(value or f"The read of the chDB path ended without an answer (exit "
                               f"code {child.exitcode}); the UI's log has its reason.")
    answer: dict[str, Any] = value
    return answer


def _in_child(sender: Connection, settings: Settings, method: str,
              args: tuple[Any, ...]) -> None:
    """The child's part: the read, its answer (or the error's sentence, not an unpicklable
    error) to the parent, then the end of the process, whatever happened."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent decides when a read ends
    code = 1
    try:
        configure_logging(settings.model_copy(update={"log_level": "warning"}))
        try:
            answer: tuple[str, Any] = ("ok", getattr(reader_for(settings), method)(*args))
        except Exception as exc:
            answer = ("error", str(exc).strip().splitlines()[0] if str(exc).strip()
                      else type(exc).__name__)
        sender.send(answer)
        sender.close()
        code = 0
    except BaseException:
        sys.excepthook(*sys.exc_info())  # the reason, in the UI's log; the parent sees EOF
    finally:
        leave(code)


def bind(host: str, port: int) -> socket.socket:
    """A listening socket on ``host:port`` (0: any free port), or ``UiError``."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise UiError(f"The cost page cannot listen on {host}:{port} ({exc.strerror}); choose "
                      "another --port, or 0 for any free one.") from exc
    sock.listen(128)
    sock.set_inheritable(True)
    return sock


def serve(settings: Settings, host: str, port: int,
          announce: Callable[[str], None]) -> None:
    """Serve the UI until interrupted; ``announce`` gets its URL once it listens."""
    sock = bind(host, port)
    bound = sock.getsockname()[1]
    shown = f"[{host}]" if ":" in host else host
    url = f"http://{shown}:{bound}/"
    hosts = None
    if host in LOOPBACK:  # a page on loopback answers loopback names only (DNS rebinding)
        hosts = ["127.0.0.1", "localhost", "[::1]", "::1"]
    else:
        log.warning("ui_not_on_loopback", host=host,
                    hint="the page has no login: whoever reaches this address reads the costs")
    app = create_app(Reads(settings), allowed_hosts=hosts)
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", access_log=False,
                                           lifespan="off"))
    announce(url)
    server.run(sockets=[sock])

