"""Named points where a streams worker stalls on purpose, for fault tests (``AIPIPE_FAULT``).

``admission_stall@N``: the N-th admission batch waits forever, as a hung call would, with
the worker otherwise running: what ``/healthz`` must notice (``aipipe.infra.metrics``).
"""

from __future__ import annotations

import asyncio

import structlog

log = structlog.get_logger("aipipe.streams.faults")


class StallPoints:
    def __init__(self, spec: str) -> None:
        point, _, nth = spec.partition("@")
        self.point, self.seen = point, 0
        self.nth = int(nth.partition(":")[0] or 1)  # a sink point may carry :SECONDS

    async def reached(self, point: str) -> None:
        if point != self.point:
            return
        self.seen += 1
        if self.seen == self.nth:
            log.warning("fault_injected", point=point, nth=self.nth)
            await asyncio.Event().wait()  # never set
