"""The cost sink: completed operations from Kafka, in batches, into ``ai_cost_tracking``.

The loop, batching, commit order and error policy are ``aipipe.consumers.sink.BatchingSink``'s;
this module says how a message becomes a cost row. Exactness after redeliveries comes from
the store: the batch's deduplication token and ``ReplacingMergeTree`` read with ``FINAL``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import orjson
from confluent_kafka import Message

from aipipe.consumers.costs.rows import CostRow, row_from_completed
from aipipe.consumers.costs.store import CostStore
from aipipe.consumers.sink import BatchingSink, coordinates
from aipipe.schemas.errors import EventDecodeError
from aipipe.schemas.events import OperationCompleted, decode


class CostProjection:
    stage = "costs"
    traced = True  # a span per cost row: where a request's trace ends

    def __init__(self, store: CostStore) -> None:
        self.store = store

    def rows(self, message: Message) -> list[CostRow]:
        topic, partition, offset = coordinates(message)
        event = decode(message.value())
        if not isinstance(event, OperationCompleted):
            raise EventDecodeError(
                f"Field 'event_type' is {event.event_type!r} on {topic}, which carries "
                "only operation.completed events; send it to its own topic."
            )
        try:
            return [row_from_completed(event, topic, partition, offset)]
        except orjson.JSONEncodeError as exc:  # the only JSON the row makes is its metadata
            raise EventDecodeError(
                f"Field 'metadata' of this operation.completed event cannot be stored as "
                f"JSON ({exc}); keep it under 255 levels of nesting, its integers within 64 bits."
            ) from exc

    def write(self, rows: Sequence[CostRow], dedup_token: str) -> None:
        self.store.write(rows, dedup_token=dedup_token)


class CostSink(BatchingSink[CostRow]):
    def __init__(self, *, topic: str, store: CostStore, **options: Any) -> None:
        super().__init__(topics=[topic], projection=CostProjection(store), **options)
