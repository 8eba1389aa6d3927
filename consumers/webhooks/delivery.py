"""One webhook delivery: a signed POST, retried with capped exponential backoff.

Pure policy (``retry_after``, ``worst_seconds``) plus ``deliver``, which takes its HTTP
client, clock and sleep as arguments. A delivery ends ``delivered`` (a 2xx answer) or not,
with one sentence that says why: the dead-letter reason. Connection errors, timeouts, 5xx
and 429 are retried (a ``Retry-After`` in seconds is honoured up to the cap); any other
answer (3xx, 4xx) is final, because repeating the same request cannot change it.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from urllib.parse import urlsplit

import httpx2 as httpx

from aipipe.consumers.sink import backoff_delay
from aipipe.producers.webhooks import signed_headers

USER_AGENT = "aipipe-webhooks/1"


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

    def worst_seconds(self) -> float:
        """The longest one delivery can take: every attempt timing out, every wait at cap."""
        waits = sum(min(self.cap_seconds, self.delay(a)) for a in range(1, self.max_attempts))
        return self.max_attempts * self.timeout_seconds + waits


@dataclass(frozen=True)
class Outcome:
    delivered: bool
    attempts: int
    status: int | None  # the last HTTP status, None when no answer came
    reason: str  # why it was not delivered ("" when it was)


def retryable(status: int) -> bool:
    """Whether an HTTP answer may change on a retry: 429 and 5xx."""
    return status == 429 or status >= 500


def retry_after(response: httpx.Response, policy: RetryPolicy, attempt: int) -> float:
    """The wait before the next attempt: the backoff, or the receiver's ``Retry-After``
    (seconds) when it asks for longer, never past the cap."""
    delay = policy.delay(attempt)
    asked = response.headers.get("retry-after", "")
    if asked.strip().isdigit():
        delay = max(delay, min(float(asked), policy.cap_seconds))
    return delay


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
) -> Outcome:
    """POST ``body`` to ``url`` until it is accepted or the attempts are used up.

    Every attempt carries the same ``webhook-id`` (the event's id) and its own timestamp
    and signature. ``sleep`` waits between attempts (``asyncio.sleep`` by default).
    """
    sleep = sleep or asyncio.sleep
    last = "no attempt was made"
    status: int | None = None
    for attempt in range(1, policy.max_attempts + 1):
        headers = signed_headers(secret, event_id, body, int(clock()))
        headers.update({"content-type": "application/json", "user-agent": USER_AGENT})
        try:
            response = await client.post(url, content=body, headers=headers,
                                         timeout=policy.timeout_seconds)
        except httpx.TransportError as exc:  # connection refused or reset, timeouts
            status, last = None, f"{type(exc).__name__}: {str(exc) or 'no detail'}"
            wait = policy.delay(attempt)
        else:
            status = response.status_code
            if 200 <= status < 300:
                return Outcome(True, attempt, status, "")
            last = f"HTTP {status}"
            if not retryable(status):
                return Outcome(False, attempt, status, (
                    f"The webhook receiver at {shown_url(url)} answered {last}, which a retry "
                    "cannot change (only 2xx is a delivery; redirects are not followed); fix "
                    "the receiver or the callback_url and re-send this event."))
            wait = retry_after(response, policy, attempt)
        if attempt < policy.max_attempts:
            await sleep(wait)
    return Outcome(False, policy.max_attempts, status, (
        f"The webhook to {shown_url(url)} failed {policy.max_attempts} times (last: {last}); "
        "once the receiver answers 2xx, re-send this event from the dead-letter topic."))
