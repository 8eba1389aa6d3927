"""The webhook consumer: completions and rejections with a ``callback_url``, POSTed to it.

Reads ``operations.completed`` and ``operations.rejected`` through the batching sink
(``aipipe.consumers.sink.BatchingSink``), whose "write" here is: make the next attempt of
every delivery of the batch at once (asyncio, one ``httpx2`` client and its connection
pool), then settle each: delivered; retried later; or, after its last try (or an answer a
retry cannot change), dead-lettered (stage ``webhooks``, with the reason).

A delivery to retry goes to the retry topic (``Topics.webhook_retries``), the event's bytes
and headers as they were, with three headers of its own: the attempts made so far
(``aipipe.webhook.attempts``), when the next is due (``aipipe.webhook.due_ms``, unix
milliseconds: now plus the policy's backoff, or the receiver's ``Retry-After``), and the
event's own topic, partition and offset (``aipipe.webhook.origin``, which its dead letter
names). A second
consumer of the same kind (``webhooks-retry``) reads that topic, waits until each is due
(never longer than the backoff cap), and makes the next attempt. Only then does a sink
commit its batch's offsets, after the retries and dead letters it produced are
acknowledged: each event is delivered at least once, or is in the dead-letter topic.

A receiver that keeps failing therefore holds back other receivers' retries for at most
one wait at the cap plus an attempt's timeout (``AIPIPE_WEBHOOK_TIMEOUT_SECONDS``), never
for its whole retry schedule. A receiver that is slow to answer holds back others' first
tries less still: a first try has ``AIPIPE_WEBHOOK_SLOW_SECONDS`` (at most the timeout;
a first try cut short is a failed attempt, retried from the retry topic with the whole
timeout), and a receiver whose last attempt took that long (``SlowHosts``) gets its first
tries handed to the retry topic untried, with no attempt counted, until one of its
attempts answers sooner or a minute has passed. So a receiver that never answers (a
tarpit), named in one request of every batch, holds each batch of first tries once for
that short time, not for the timeout. A batch is at most ``AIPIPE_WEBHOOK_CONCURRENCY``
messages; the consumers' ``max.poll.interval.ms`` is set above a batch's longest wait.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import httpx2 as httpx
import structlog
from confluent_kafka import Message

from aipipe.consumers.sink import BatchAbandoned, BatchingSink, Entry, coordinates
from aipipe.consumers.webhooks.delivery import (
    Outcome,
    RetryPolicy,
    SlowHosts,
    deliver,
    receiver_of,
    shown_url,
)
from aipipe.infra.metrics import WEBHOOK_DELIVERIES
from aipipe.producers.webhooks import callback_allowed
from aipipe.schemas.deadletter import Headers
from aipipe.schemas.errors import EventDecodeError
from aipipe.schemas.events import OperationCompleted, OperationRejected, decode

log = structlog.get_logger("aipipe.webhooks")
STAGE = "webhooks"
ATTEMPTS_HEADER = "aipipe.webhook.attempts"  # on the retry topic: attempts made so far
DUE_HEADER = "aipipe.webhook.due_ms"  # on the retry topic: when the next is due (unix ms)
# on the retry topic: the event's own topic:partition:offset, which its dead letter names
ORIGIN_HEADER = "aipipe.webhook.origin"
RETRY_HEADERS = (ATTEMPTS_HEADER, DUE_HEADER, ORIGIN_HEADER)


class WebhookDeliveryError(Exception):
    """The error name a dead-lettered delivery carries (``aipipe.dlq.error``)."""


@dataclass(frozen=True)
class Delivery:
    """One event to POST: the message (to dead-letter it), its id, URL and wire bytes."""

    message: Any
    event_id: str
    url: str
    body: bytes
    request_id: str
    client_id: str
    attempts: int = 0  # made before this message (read on the retry topic)
    due: float = 0.0  # unix seconds the next attempt is due at (0: at once)
    first_try: bool = True  # read on the event's own topic, not on the retry topic


def _no_dead_letters(message: Message, reason: str, error: str) -> None:
    raise RuntimeError("the webhook projection is not attached to a sink")


def _no_retries(delivery: Delivery, attempts: int, due: float) -> None:
    raise RuntimeError("the webhook projection is not attached to a sink")


def retry_state(message: Message) -> tuple[int, float]:
    """The attempts made and the next one's due time (unix seconds) a retry record carries.

    Raises ``EventDecodeError`` (the message is dead-lettered) when either is missing or
    not a whole number: only this consumer writes the retry topic.
    """
    found = dict(_pairs(message))
    try:
        attempts = int(_text(found[ATTEMPTS_HEADER]))
        due_ms = int(_text(found[DUE_HEADER]))
    except (KeyError, TypeError, ValueError) as exc:
        raise EventDecodeError(
            f"Headers '{ATTEMPTS_HEADER}' and '{DUE_HEADER}' must be whole numbers on a "
            "webhook retry record; re-send the event to its own topic instead.") from exc
    return max(attempts, 0), due_ms / 1000


def _pairs(message: Message) -> Headers:
    """``message``'s headers as a list of pairs (confluent-kafka gives a list or None)."""
    headers = message.headers()
    return list(headers.items()) if isinstance(headers, dict) else list(headers or [])


def _text(value: str | bytes | None) -> str:
    return value.decode() if isinstance(value, bytes) else value or ""


def retry_headers(message: Message, attempts: int, due: float) -> Headers:
    """``message``'s headers (the trace context with them) with the retry's: the attempts
    made, the next one's due time, and where the event came from (kept from a retry)."""
    headers = _pairs(message)
    origin = dict(headers).get(ORIGIN_HEADER) or ":".join(map(str, coordinates(message)))
    return [*((k, v) for k, v in headers if k not in RETRY_HEADERS),
            (ATTEMPTS_HEADER, str(attempts).encode()),
            (DUE_HEADER, str(round(due * 1000)).encode()), (ORIGIN_HEADER, origin)]


class FromOrigin:
    """A retry record as its event's own message, for its dead letter: the topic, partition
    and offset it came from, its headers without the retry's."""

    def __init__(self, message: Message) -> None:
        self.message = message
        headers = _pairs(message)
        topic, partition, offset = _text(dict(headers)[ORIGIN_HEADER]).rsplit(":", 2)
        self._coordinates = topic, int(partition), int(offset)
        self._headers = [(k, v) for k, v in headers if k not in RETRY_HEADERS]

    def topic(self) -> str:
        return self._coordinates[0]

    def partition(self) -> int:
        return self._coordinates[1]

    def offset(self) -> int:
        return self._coordinates[2]

    def key(self) -> str | bytes | None:
        return self.message.key()

    def value(self) -> str | bytes | None:
        return self.message.value()

    def headers(self) -> Headers:
        return self._headers


class WebhookProjection:
    stage = STAGE
    traced = True  # a span per delivery, in the completion's trace

    def __init__(
        self,
        *,
        secret: str,
        allowed: Sequence[str],
        policy: RetryPolicy,
        retry_topic: str = "",
        slow_hosts: SlowHosts | None = None,
        transport: httpx.AsyncBaseTransport | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        """``retry_topic``: where retries wait (``rows`` reads their state on it);
        ``slow_hosts``: the receivers to try from the retry topic only, shared with the
        process's other webhook consumer (by default, those whose attempt timed out);
        ``transport`` replaces the network (unit tests: ``httpx2.MockTransport``)."""
        self.secret = secret
        self.allowed = tuple(allowed)
        self.policy = policy
        self.slow_hosts = slow_hosts or SlowHosts(policy.timeout_seconds)
        # a first try has only the slow time when a retry can follow it
        self.first_try_policy = policy if policy.max_attempts == 1 else dataclasses.replace(
            policy, timeout_seconds=min(policy.timeout_seconds, self.slow_hosts.seconds))
        self.retry_topic = retry_topic
        self.clock = clock
        self.dead_letter: Callable[[Message, str, str], None] = _no_dead_letters
        self.retry_later: Callable[[Delivery, int, float], None] = _no_retries
        self.stopping: Callable[[], bool] = lambda: False  # the sink's stop event, when run
        self.loop = asyncio.new_event_loop()
        self.client = httpx.AsyncClient(transport=transport, follow_redirects=False,
                                        timeout=policy.timeout_seconds)

    def rows(self, message: Message) -> list[Delivery]:
        """The delivery this message asks for, if any.

        A message that does not decode is the cost sink's or the archive's to dead-letter
        (they read these topics too): here it is skipped with a warning, not sent twice.
        """
        topic, partition, offset = coordinates(message)
        attempts, due = retry_state(message) if topic == self.retry_topic else (0, 0.0)
        try:
            event = decode(message.value())
        except EventDecodeError as exc:
            log.warning("webhook_event_unreadable", reason=exc.reason, topic=topic,
                        partition=partition, offset=offset)
            return []
        if not isinstance(event, OperationCompleted | OperationRejected):
            return []
        url = event.callback_url
        if url is None:
            return []
        if not any(callback_allowed(url, prefix) for prefix in self.allowed):
            raise EventDecodeError(
                f"Field 'callback_url' ({shown_url(url)}) is not under an allowed webhook URL "
                "(AIPIPE_WEBHOOK_ALLOWED_URLS) any more; allow it and re-send this event.")
        return [Delivery(message, event.event_id, url, message.value() or b"",
                         event.request_id, event.client_id, attempts, due,
                         first_try=topic != self.retry_topic)]

    def write(self, rows: Sequence[Delivery], dedup_token: str) -> None:
        """Make the next attempt of every delivery of ``rows`` at once; return when each is
        delivered, handed to the retry topic or dead-lettered. Raises ``BatchAbandoned`` (no
        commit: the batch comes again after a restart) when the sink began to stop while
        some retries were not yet due."""
        outcomes = self.loop.run_until_complete(self._deliver_all(rows))
        for delivery, outcome in zip(rows, outcomes, strict=True):
            if outcome is None:
                continue
            log.info("webhook_delivery", event_id=delivery.event_id,
                     request_id=delivery.request_id, client_id=delivery.client_id,
                     url=shown_url(delivery.url), delivered=outcome.delivered,
                     attempts=outcome.attempts, status=outcome.status,
                     retry_in=outcome.retry_in, deferred=outcome.deferred)
            if outcome.delivered:
                WEBHOOK_DELIVERIES.labels("delivered").inc()
            elif outcome.deferred:
                WEBHOOK_DELIVERIES.labels("deferred").inc()
                self.retry_later(delivery, outcome.attempts, self.clock())
            elif outcome.retry_in is not None:
                WEBHOOK_DELIVERIES.labels("retried").inc()
                self.retry_later(delivery, outcome.attempts, self.clock() + outcome.retry_in)
            else:
                WEBHOOK_DELIVERIES.labels("dead_lettered").inc()
                self.dead_letter(delivery.message, outcome.reason, WebhookDeliveryError.__name__)
        waiting = sum(1 for outcome in outcomes if outcome is None)
        if waiting:
            raise BatchAbandoned(f"the sink is stopping: {waiting} retries not yet due are "
                                 "left to the next start")

    async def _deliver_all(self, rows: Sequence[Delivery]) -> list[Outcome | None]:
        return list(await asyncio.gather(*(self._attempt(d) for d in rows)))

    async def _attempt(self, d: Delivery) -> Outcome | None:
        """Make ``d``'s next attempt; None when the sink began to stop first.

        A first try to a slow receiver is not made here: the outcome says to defer it to
        the retry topic. A retry is made once due (waiting at most the backoff cap: a retry
        written by a host whose clock runs ahead is not held longer)."""
        policy = self.policy
        if d.first_try and policy.max_attempts > 1:
            if self.slow_hosts.slow(d.url):
                return Outcome(False, d.attempts, None, f"{receiver_of(d.url)} is slow to "
                               "answer: tried from the retry topic", retry_in=0.0,
                               deferred=True)
            policy = self.first_try_policy
        end = time.monotonic() + min(d.due - self.clock(), policy.cap_seconds)
        while (left := end - time.monotonic()) > 0:
            if self.stopping():
                return None
            await asyncio.sleep(min(left, 0.5))
        attempt = min(d.attempts + 1, policy.max_attempts)
        started = time.monotonic()
        outcome = await deliver(self.client, d.url, d.event_id, d.body, self.secret, policy,
                                self.clock, first=attempt, last=attempt)
        self.slow_hosts.observe(d.url, time.monotonic() - started)
        return outcome

    def close(self) -> None:
        self.loop.run_until_complete(self.client.aclose())
        self.loop.close()


class WebhookSink(BatchingSink[Delivery]):
    """Reads ``topics`` (the event topics, or the retry topic), delivers, and hands
    retries to ``projection.retry_topic``."""

    def __init__(self, *, topics: Sequence[str], projection: WebhookProjection,
                 **options: Any) -> None:
        super().__init__(topics=topics, projection=projection, **options)
        projection.dead_letter = self.dead_letter
        projection.retry_later = self.retry_later
        self.webhooks = projection

    def retry_later(self, delivery: Delivery, attempts: int, due: float) -> None:
        """Put ``delivery`` on the retry topic: its event's bytes and headers, the attempts
        made and when the next is due. The sink's flush waits for the broker to have it
        before the offsets move, as for a dead letter."""
        message = delivery.message
        self.deadletters.send_raw(self.webhooks.retry_topic, message.key(), message.value(),
                                  retry_headers(message, attempts, due))

    def dead_letter(self, message: Message, reason: str, error: str) -> None:
        """A retry record's dead letter names its event's own topic, partition and offset."""
        if message.topic() == self.webhooks.retry_topic:
            with contextlib.suppress(KeyError, ValueError):  # no origin: as it is
                message = FromOrigin(message)  # type: ignore[assignment]
        super().dead_letter(message, reason, error)

    def _write_isolating(self, entries: Sequence[Entry[Delivery]], token: str,
                         can_poll: bool) -> None:
        """Deliver the batch. ``write`` settles every delivery itself (delivered or
        dead-lettered), so nothing here is a store's failure to classify, retry or split:
        whatever it raises is a bug, and ends the thread (its supervisor, the process)."""
        self.webhooks.write([row for entry in entries for row in entry.rows], token)

    def run(self, stop: Any) -> None:
        self.webhooks.stopping = stop.is_set
        try:
            super().run(stop)
        finally:
            self.webhooks.close()
