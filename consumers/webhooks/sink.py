"""The webhook consumer: completions and rejections with a ``callback_url``, POSTed to it.

Reads ``operations.completed`` and ``operations.rejected`` through the batching sink
(``aipipe.consumers.sink.BatchingSink``), whose "write" here is: deliver every webhook of the
batch at once (asyncio, one ``httpx2`` client and its connection pool), each retried as
``delivery.deliver`` says, and dead-letter (stage ``webhooks``, with the reason) every one
that was not delivered after its last try. Only then does the sink commit the batch's
offsets, so each event is delivered at least once, or is in the dead-letter topic.

A batch is at most ``AIPIPE_WEBHOOK_CONCURRENCY`` messages, so a batch lasts at most one
delivery's worst case (``RetryPolicy.worst_seconds``); a receiver that keeps failing holds
back the next batch that long, no longer. The consumer's ``max.poll.interval.ms`` is set
above it.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import httpx2 as httpx
import structlog
from confluent_kafka import Message

from aipipe.consumers.sink import BatchingSink, Entry, coordinates
from aipipe.consumers.webhooks.delivery import Outcome, RetryPolicy, deliver, shown_url
from aipipe.producers.webhooks import callback_allowed
from aipipe.schemas.errors import EventDecodeError
from aipipe.schemas.events import OperationCompleted, OperationRejected, decode

log = structlog.get_logger("aipipe.webhooks")
STAGE = "webhooks"


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


def _no_dead_letters(message: Message, reason: str, error: str) -> None:
    raise RuntimeError("the webhook projection is not attached to a sink")


class WebhookProjection:
    stage = STAGE
    traced = True  # a span per delivery, in the completion's trace

    def __init__(
        self,
        *,
        secret: str,
        allowed: Sequence[str],
        policy: RetryPolicy,
        transport: httpx.AsyncBaseTransport | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        """``transport`` replaces the network (unit tests: ``httpx2.MockTransport``)."""
        self.secret = secret
        self.allowed = tuple(allowed)
        self.policy = policy
        self.clock = clock
        self.dead_letter: Callable[[Message, str, str], None] = _no_dead_letters
        self.loop = asyncio.new_event_loop()
        self.client = httpx.AsyncClient(transport=transport, follow_redirects=False,
                                        timeout=policy.timeout_seconds)

    def rows(self, message: Message) -> list[Delivery]:
        """The delivery this message asks for, if any.

        A message that does not decode is the cost sink's or the archive's to dead-letter
        (they read these topics too): here it is skipped with a warning, not sent twice.
        """
        topic, partition, offset = coordinates(message)
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
                         event.request_id, event.client_id)]

    def write(self, rows: Sequence[Delivery], dedup_token: str) -> None:
        """Deliver ``rows`` at once; return when each is delivered or dead-lettered."""
        outcomes = self.loop.run_until_complete(self._deliver_all(rows))
        for delivery, outcome in zip(rows, outcomes, strict=True):
            log.info("webhook_delivery", event_id=delivery.event_id,
                     request_id=delivery.request_id, client_id=delivery.client_id,
                     url=shown_url(delivery.url), delivered=outcome.delivered,
                     attempts=outcome.attempts, status=outcome.status)
            if not outcome.delivered:
                self.dead_letter(delivery.message, outcome.reason, WebhookDeliveryError.__name__)

    async def _deliver_all(self, rows: Sequence[Delivery]) -> list[Outcome]:
        return list(await asyncio.gather(*(
            deliver(self.client, d.url, d.event_id, d.body, self.secret, self.policy, self.clock)
            for d in rows)))

    def close(self) -> None:
        self.loop.run_until_complete(self.client.aclose())
        self.loop.close()


class WebhookSink(BatchingSink[Delivery]):
    def __init__(self, *, topics: Sequence[str], projection: WebhookProjection,
                 **options: Any) -> None:
        super().__init__(topics=topics, projection=projection, **options)
        projection.dead_letter = self.dead_letter
        self.webhooks = projection

    def _write_isolating(self, entries: Sequence[Entry[Delivery]], token: str,
                         can_poll: bool) -> None:
        """Deliver the batch. ``write`` settles every delivery itself (delivered or
        dead-lettered), so nothing here is a store's failure to classify, retry or split:
        whatever it raises is a bug, and ends the thread (its supervisor, the process)."""
        self.webhooks.write([row for entry in entries for row in entry.rows], token)

    def run(self, stop: Any) -> None:
        try:
            super().run(stop)
        finally:
            self.webhooks.close()
