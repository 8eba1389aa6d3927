"""One webhook delivery: a signed POST, retried with capped exponential backoff.

Pure policy (``RetryPolicy.delay``, ``retry_after``) plus ``deliver``, which takes its HTTP
client, clock and sleep as arguments. A delivery ends ``delivered`` (a 2xx answer) or not,
with one sentence that says why: the dead-letter reason. Connection errors, timeouts (an
attempt has ``timeout_seconds`` in all, from connecting to the answer's headers; the body of
an answer is never read), answers HTTP cannot read, 5xx and 429 are retried (a
``Retry-After`` in seconds is honoured up to the cap); any other answer (3xx, 4xx) is final,
because repeating the same request cannot change it.

``deliver`` may make only some of the attempts (``first`` to ``last``): the webhook
consumer makes one per pass and hands a retry to its retry topic (``sink.py``), so that a
failing receiver's waits do not hold back other receivers' deliveries.
"""

from __future__ import annotations

import asyncio
import re
import threading
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from urllib.parse import urlsplit

import httpx2 as httpx

from aipipe.consumers.sink import backoff_delay
from aipipe.producers.webhooks import signed_headers

USER_AGENT = "aipipe-webhooks/1"
_SECONDS = re.compile(r"[0-9]{1,9}")  # (str.isdigit takes "²", which float() refuses)


@dataclass(frozen=True)
class RetryPolicy:
    """From settings: ``AIPIPE_WEBHOOK_MAX_ATTEMPTS``, ``…_RETRY_BASE_SECONDS``,
    ``…_RETRY_CAP_SECONDS``, ``…_TIMEOUT_SECONDS``."""

    max_attempts: int = 5
    base_seconds: float = 1.0
    cap_seconds: float = 30.0
    timeout_seconds: float = 10.0

    def delay(self, attempt: int) -> float:
        """The wait after failed attempt ``attempt`` (1, 2, …): base, doubling, at most cap."""
        return backoff_delay(attempt, self.base_seconds, self.cap_seconds)


@dataclass(frozen=True)
class Outcome:
    delivered: bool
    attempts: int
    status: int | None  # the last HTTP status, None when no answer came
    reason: str  # why it was not delivered ("" when it was; the last error when retry_in is set)
    retry_in: float | None = None  # attempts are left: the wait before the next one
    deferred: bool = False  # not tried here: its receiver is slow (``SlowHosts``)


def retryable(status: int) -> bool:
    """Whether an HTTP answer may change on a retry: 429 and 5xx."""
    return status == 429 or status >= 500


def retry_after(response: httpx.Response, policy: RetryPolicy, attempt: int) -> float:
    """The wait before the next attempt: the backoff, or the receiver's ``Retry-After``
    (seconds, ASCII digits) when it asks for longer, never past the cap."""
    delay = policy.delay(attempt)
    asked = _SECONDS.fullmatch(response.headers.get("retry-after", "").strip())
    if asked is not None:
        delay = max(delay, min(float(asked.group()), policy.cap_seconds))
    return delay


async def _post(client: httpx.AsyncClient, url: str, body: bytes, headers: dict[str, str],
                seconds: float) -> httpx.Response:
    """One attempt, within ``seconds`` from connecting to the answer's status and headers;
    its body is never read (a receiver that drips or inflates it holds nothing here)."""
    async with asyncio.timeout(seconds):
        async with client.stream("POST", url, content=body, headers=headers,
                                 timeout=seconds) as response:
            return response


def receiver_of(url: str) -> str:
    """The receiver a URL names: its scheme, host and port (no user, path or query)."""
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.netloc.rpartition('@')[2].lower()}"


class SlowHosts:
    """Receivers (``receiver_of``) whose last attempt took ``seconds`` or more, remembered
    for ``window`` seconds after it; an attempt that took less forgets the receiver.

    The webhook consumer hands a remembered receiver's first tries straight to the retry
    topic, so that a receiver that holds its connections open (a tarpit) holds no batch of
    other receivers' first tries. Shared by a process's two webhook consumers (thread-safe);
    at most ``MAX_RECEIVERS`` are remembered, the oldest forgotten first."""

    WINDOW_SECONDS = 60.0
    MAX_RECEIVERS = 10_000

    def __init__(self, seconds: float, window: float = WINDOW_SECONDS,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.seconds = seconds
        self.window = window
        self.clock = clock
        self._until: dict[str, float] = {}  # receiver: remembered until (clock), oldest first
        self._lock = threading.Lock()

    def slow(self, url: str) -> bool:
        with self._lock:
            return self._until.get(receiver_of(url), 0.0) > self.clock()

    def observe(self, url: str, took: float) -> None:
        """Record that an attempt to ``url`` took ``took`` seconds."""
        receiver = receiver_of(url)
        with self._lock:
            self._until.pop(receiver, None)
            if took < self.seconds:
                return
            self._until[receiver] = self.clock() + self.window
            while len(self._until) > self.MAX_RECEIVERS:
                del self._until[next(iter(self._until))]


def shown_url(url: str) -> str:
    """The URL without its query string (which may carry a token), for logs and reasons."""
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.netloc}{parts.path}"


async def deliver(
    client: httpx.AsyncClient,
    url: str,
    event_id: str,
    body: bytes,
    secret: str,
    policy: RetryPolicy,
    clock: Callable[[], float] = time.time,
    sleep: Callable[[float], Awaitable[None]] | None = None,
    first: int = 1,
    last: int | None = None,
) -> Outcome:
    """POST ``body`` to ``url`` until it is accepted or attempts ``first`` to ``last`` (all
    of the policy's by default) are used up.

    Every attempt carries the same ``webhook-id`` (the event's id) and its own timestamp
    and signature. ``sleep`` waits between attempts (``asyncio.sleep`` by default). When
    ``last`` is reached with attempts of the policy left, the outcome says how long to wait
    before the next (``retry_in``); after the policy's last attempt it gives the reason.
    """
    sleep = sleep or asyncio.sleep
    last = policy.max_attempts if last is None else min(last, policy.max_attempts)
    error = "no attempt was made"
    status: int | None = None
    for attempt in range(first, last + 1):
        headers = signed_headers(secret, event_id, body, int(clock()))
        headers.update({"content-type": "application/json", "user-agent": USER_AGENT,
                        "accept-encoding": "identity"})
        try:
            response = await _post(client, url, body, headers, policy.timeout_seconds)
        # refused, reset, timed out, or an answer HTTP cannot read (anything else is a bug,
        # which ends the sink: see WebhookSink._write_isolating)
        except (httpx.HTTPError, TimeoutError, OSError) as exc:
            status, error = None, f"{type(exc).__name__}: {str(exc) or 'no detail'}"
            wait = policy.delay(attempt)
        else:
            status = response.status_code
            if 200 <= status < 300:
                return Outcome(True, attempt, status, "")
            error = f"HTTP {status}"
            if not retryable(status):
                return Outcome(False, attempt, status, (
                    f"The webhook receiver at {shown_url(url)} answered {error}, which a retry "
                    "cannot change (only 2xx is a delivery; redirects are not followed); fix "
                    "the receiver or the callback_url and re-send this event."))
            wait = retry_after(response, policy, attempt)
        if attempt < last:
            await sleep(wait)
        elif attempt < policy.max_attempts:
            return Outcome(False, attempt, status, error, retry_in=wait)
    return Outcome(False, policy.max_attempts, status, (
        f"The webhook to {shown_url(url)} failed {policy.max_attempts} times (last: {error}); "
        "once the receiver answers 2xx, re-send this event from the dead-letter topic."))
