"""Events of a faust stream handed to the pipeline's own tasks, acknowledged only when done.

faust acknowledges an event when its agent asks for the next one, and ``take_events``
acknowledges a whole batch when the agent's body leaves it, raised or not: an error in
the middle of a batch moves the committed offset past requests that never got a
decision. Here the agent only moves events into a bounded queue (its ``feed``), with
acknowledgements off; the pipeline's task takes them in batches and acknowledges each
event itself once the events it caused are sent (faust flushes the producer before it
commits). A task that fails takes the process down (``aipipe.streams.fatal``) with nothing
acknowledged, so after the restart the same events are decided again, idempotently.

Table writes name the changelog partition themselves (``aipipe.streams.app.remember``): the
partition of the event being handled.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any

from aipipe.infra.metrics import HEALTH


class Intake:
    """A bounded queue between a faust agent and the task that handles its events."""

    def __init__(self, maxsize: int, clock: Callable[[], float] = time.monotonic,
                 name: str = "intake") -> None:
        self.name = name  # the agent's part in /healthz: stalled while a put waits too long
        self.queue: asyncio.Queue[Any] = asyncio.Queue(maxsize)
        self.clock = clock
        self.fed_at = clock()  # when the agent last handed over an event

    async def feed(self, stream: Any) -> None:
        """The agent's body: every event into the queue, none acknowledged here."""
        HEALTH.idle(self.name)
        async for event in stream.noack().events():
            with HEALTH.working(self.name):
                await self.queue.put(event)
            self.fed_at = self.clock()

    async def batch(self, size: int, within: float) -> list[Any]:
        """Wait for one event, then take up to ``size`` arriving within ``within`` seconds."""
        events = [await self.queue.get()]
        deadline = self.clock() + within
        while len(events) < size:
            if not self.queue.empty():
                events.append(self.queue.get_nowait())
                continue
            left = deadline - self.clock()
            if left <= 0:
                break
            try:
                events.append(await asyncio.wait_for(self.queue.get(), left))
            except TimeoutError:
                break
        return events

    async def one(self) -> Any:
        return await self.queue.get()


def acknowledge(event: Any) -> None:
    """Mark ``event`` handled: faust may commit past it once everything before it is too."""
    event.ack()
