"""Webhooks: each completion or rejection that names a ``callback_url`` is POSTed to it,
signed (``producers.webhooks``), retried with capped backoff, dead-lettered after the
last try."""

from consumers.webhooks.delivery import Outcome, RetryPolicy, deliver
from consumers.webhooks.sink import STAGE, WebhookProjection, WebhookSink

__all__ = ["STAGE", "Outcome", "RetryPolicy", "WebhookProjection", "WebhookSink", "deliver"]
