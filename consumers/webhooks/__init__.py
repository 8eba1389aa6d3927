"""Webhooks: each completion or rejection that names a ``callback_url`` is POSTed to it,
signed (``aipipe.producers.webhooks``), retried with capped backoff, dead-lettered after the
last try."""

from aipipe.consumers.webhooks.delivery import Outcome, RetryPolicy, SlowHosts, deliver
from aipipe.consumers.webhooks.sink import STAGE, WebhookProjection, WebhookSink

__all__ = [
    "STAGE", "Outcome", "RetryPolicy", "SlowHosts", "WebhookProjection", "WebhookSink", "deliver",
]
