"""The streams' error policy, in process: batching, undecidable requests, supervised tasks."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime
from typing import Any

import pytest

from aipipe.schemas.events import OperationRejected, OperationRequested
from aipipe.streams import app as streams_app
from aipipe.streams.admission.decide import admitted
from aipipe.streams.admission.gate import Decided
from aipipe.streams.intake import Intake

NOW = datetime(2026, 12, 1, tzinfo=UTC)


def request(i: int, **changes: Any) -> OperationRequested:
    fields: dict[str, Any] = {
        "request_id": f"r{i}", "client_id": "acme", "operation_type": "image_generation",
        "provider": "simulated", "model": "gemini-2.5-flash-image", "params": {"prompt": "p"},
    }
    fields.update(changes)
    return OperationRequested(**fields)


def test_a_batch_is_what_arrives_within_the_wait_up_to_its_size() -> None:
    async def scenario() -> tuple[list[int], list[int], list[int]]:
        intake = Intake(maxsize=100)
        for i in range(7):
            intake.queue.put_nowait(i)
        first = await intake.batch(5, within=0.01)
        second = await intake.batch(5, within=0.01)

        waiting = asyncio.ensure_future(intake.batch(5, within=0.2))
        # an event that arrives while the batch is waiting for its first one
        asyncio.get_running_loop().call_later(0.01, intake.queue.put_nowait, 99)
        third = await waiting
        return first, second, third

    first, second, third = asyncio.run(scenario())
    assert first == [0, 1, 2, 3, 4]
    assert second == [5, 6]
    assert third == [99]


class RaisingGate:
    """Raises for the whole batch, and again for the one request named ``bad``."""

    def __init__(self, bad: str) -> None:
        self.bad = bad
        self.calls: list[int] = []

    async def decide(
        self, requests: list[OperationRequested], now: datetime | None = None
    ) -> Decided:
        self.calls.append(len(requests))
        if any(r.request_id == self.bad for r in requests):
            raise RecursionError("maximum recursion depth exceeded")
        return Decided(decisions=[admitted(r, NOW) for r in requests])


def test_one_undecidable_request_costs_its_neighbours_nothing() -> None:
    batch = [request(i) for i in range(5)]
    gate = RaisingGate(bad="r2")
    out = asyncio.run(streams_app.decide_each_once(gate, batch, lambda: NOW))  # type: ignore[arg-type]
    assert gate.calls == [5, 1, 1, 1, 1, 1]
    assert [d.operation_id for d in out.decisions] == [r.event_id for r in batch]
    bad = out.decisions[2]
    assert isinstance(bad, OperationRejected)
    assert bad.reason == "invalid"
    assert "RecursionError" in bad.detail
    assert all(d.event_type == "operation.admitted" for i, d in enumerate(out.decisions) if i != 2)


def test_a_supervised_task_that_fails_takes_the_process_down(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    exits: list[tuple[str, BaseException]] = []
    monkeypatch.setattr(streams_app, "exit_process",
                        lambda part, exc: exits.append((part, exc)))

    async def broken() -> None:
        raise ConnectionError("the broker went away")

    async def cancelled() -> None:
        raise asyncio.CancelledError

    asyncio.run(streams_app.supervised("generation", broken)())
    assert [(part, type(exc)) for part, exc in exits] == [("generation", ConnectionError)]
    with pytest.raises(asyncio.CancelledError):  # a worker stopping is not a failure
        asyncio.run(streams_app.supervised("generation", cancelled)())
    assert len(exits) == 1
