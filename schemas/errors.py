"""The root of aipipe's exception tree; every package names its own errors under it.

    AipipeError
    ├── schemas.EventDecodeError     bytes that are not a valid event
    ├── schemas.PricingError         usage the price table cannot price
    ├── infra.settings.ConfigError   a bad AIPIPE_ variable
    ├── infra.services.ServiceError  a local Kafka or Redis that would not start
    ├── producers.DeliveryError      Kafka did not acknowledge a produced event
    ├── streams.admission.window.LimitError  a malformed rate limit (names the entry)
    └── consumers.costs.StoreError   ClickHouse refused a write or a query
"""

from __future__ import annotations


class AipipeError(Exception):
    """Base of every error aipipe raises on purpose."""


class EventDecodeError(AipipeError):
    """Bytes that do not decode to a valid aipipe event; ``reason`` is one sentence."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class PricingError(AipipeError):
    """The price table has no price for a model, or the usage cannot be priced."""


class StaleOperationError(AipipeError):
    """An admitted operation older than the dedup horizon: it may have run already, so it is
    dead-lettered with the reason instead of run (``streams.dedup.stale_operation``)."""
