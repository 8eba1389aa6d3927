"""Event models, topic names, JSON Schema export and the price table. No I/O."""

from aipipe.schemas.errors import AipipeError, EventDecodeError, PricingError
from aipipe.schemas.events import (
    EVENT_TYPES,
    AnyEvent,
    Event,
    OperationAdmitted,
    OperationCompleted,
    OperationRejected,
    OperationRequested,
    OperationType,
    Usage,
    VideoPolled,
    VideoPollScheduled,
    decode,
    derived_event_id,
    encode,
    operation_event_id,
)
from aipipe.schemas.prices import PriceTable, compute_cost, price_table_at
from aipipe.schemas.topics import Topics

__all__ = [
    "EVENT_TYPES",
    "AipipeError",
    "AnyEvent",
    "Event",
    "EventDecodeError",
    "OperationAdmitted",
    "OperationCompleted",
    "OperationRejected",
    "OperationRequested",
    "OperationType",
    "PriceTable",
    "PricingError",
    "Topics",
    "Usage",
    "VideoPollScheduled",
    "VideoPolled",
    "compute_cost",
    "decode",
    "derived_event_id",
    "encode",
    "operation_event_id",
    "price_table_at",
]
