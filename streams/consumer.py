"""faust's Kafka consumer, made to never commit past a message no agent has handled.

faust-streaming (0.15) commits, per partition, the end of the first unbroken run of
acknowledged offsets, and loses events at rebalances on a partition that has no
committed offset yet, which is every partition when a pipeline starts:

1. A fetch that returns while the consumer's flow is stopped (a rebalance or a table
   recovery in progress) is dropped, and faust "seeks back to committed offsets". For a
   partition without a committed offset, aiokafka's ``seek_to_committed`` does not seek
   (it seeks only to offsets above 0), so the fetch position stays after the dropped
   records: they are never delivered.
2. faust then commits the end of the first run of acknowledgements it has. With no
   committed offset it does not check where that run starts, so the first commit jumps
   over the dropped records, and the next owner of the partition starts there.
3. A message taken from an agent's queue while the flow is stopped, or fetched under an
   earlier generation of the group, is skipped and acknowledged all the same, so its
   offset counts as handled; acknowledgements that arrive after a revocation outlive
   it into the next generation.

With two workers started on a backlog this lost the first hundreds to thousands of
offsets of some partitions (``tests/e2e/test_scaling.py``), with committed offsets at the
high watermark and no error. ``SafeSeekConsumer`` closes each path:

* a seek back to committed offsets seeks a partition without one to its beginning (the
  pipeline consumes with ``auto_offset_reset=earliest``), so dropped records come again;
* a message that no stream took in (never tracked) or that was fetched under an earlier
  generation is never counted as acknowledged: it is fetched again after the seek, and
  every effect is idempotent by ``event_id``;
* the acknowledgement state of the partitions of a new assignment starts empty.
"""

from __future__ import annotations

from collections.abc import Mapping, Set
from typing import Any

import structlog
from faust.transport.drivers import aiokafka as faust_aiokafka

log = structlog.get_logger("aipipe.streams.consumer")


class SafeSeekConsumer(faust_aiokafka.Consumer):
    """faust's aiokafka consumer without the three ways to commit past unhandled events."""

    dropped_acks = 0  # for tests and metrics: acknowledgements that were not counted

    def ack(self, message: Any) -> bool:
        acking = self.app.topics.acks_enabled_for(message.topic)
        stale = message.generation_id != self.app.consumer_generation_id
        if acking and (stale or not message.tracked):
            message.acked = True  # settled here: it is fetched again after the seek
            self._unacked_messages.discard(message)
            type(self).dropped_acks += 1
            return False
        return bool(super().ack(message))

    async def seek_to_committed(self) -> Mapping[Any, int]:
        committed: Mapping[Any, int] = await super().seek_to_committed()
        unsought = [tp for tp, offset in committed.items()
                    if (offset is None or offset <= 0) and not self._is_changelog_tp(tp)]
        if unsought:
            await self._thread.seek_to_beginning(*unsought)
        return committed

    async def on_partitions_assigned(self, assigned: Set[Any], generation_id: int = 0) -> None:
        stale = 0
        for tp in assigned:
            stale += len(self._acked.pop(tp, ()))
            self._acked_index.pop(tp, None)
            self._gap.pop(tp, None)
            self._read_offset.pop(tp, None)
            self._committed_offset.pop(tp, None)
        if stale:
            log.info("stale_acks_cleared", offsets=stale, generation=generation_id)
        await super().on_partitions_assigned(assigned, generation_id)


def use_safe_seek_consumer(app: Any) -> None:
    """Make ``app`` build its consumer from ``SafeSeekConsumer``."""
    app.transport.Consumer = SafeSeekConsumer
