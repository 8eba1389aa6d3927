"""One contract for both rate-limit stores: the Lua script on the real Redis and the
in-process sliding log (injected clock). Time moves by ``advance_to``: the memory store's
clock is set; for Redis the test waits until Redis ``TIME`` has passed that moment.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass

import pytest
import redis as sync_redis

from aipipe.schemas.limits import Limit
from aipipe.streams.admission.limiter import (
    FailoverLimiter,
    MemoryRateLimitStore,
    RateLimitStore,
    RedisRateLimitStore,
    redis_client,
)
from aipipe.streams.admission.window import CLIENT, MODEL, Check
from tests.conftest import Services

pytestmark = pytest.mark.e2e

WINDOW = Limit(3, 400)  # short, so the Redis side waits well under a second per step


@dataclass
class Harness:
    store: RateLimitStore
    prefix: str
    advance_to: Callable[[int], Awaitable[None]]

    def check(self, member: str, client: str = "c", model: str = "m",
              client_limit: Limit | None = WINDOW, model_limit: Limit | None = None) -> Check:
        return Check(member, f"{self.prefix}:client:{client}", client_limit,
                     f"{self.prefix}:model:{model}", model_limit)


def run(coro: Awaitable[object]) -> object:
    return asyncio.run(coro)  # type: ignore[arg-type]


@pytest.fixture(params=["memory", "redis"])
def harness(request: pytest.FixtureRequest) -> Iterator[Harness]:
    prefix = f"t{uuid.uuid4().hex[:10]}"
    if request.param == "memory":
        clock = [1_000_000_000]
        store = MemoryRateLimitStore(lambda: clock[0])

        async def set_clock(at_us: int) -> None:
            clock[0] = max(clock[0], at_us)

        yield Harness(store, prefix, set_clock)
        return
    services: Services = request.getfixturevalue("services")
    client = redis_client(services.redis_url, timeout_ms=2000)
    sync = sync_redis.Redis.from_url(services.redis_url)

    async def wait_redis(at_us: int) -> None:
        deadline = time.monotonic() + 5
        while True:
            seconds, micros = sync.time()
            if seconds * 1_000_000 + micros >= at_us:
                return
            assert time.monotonic() < deadline, "Redis TIME did not reach the moment"
            await asyncio.sleep(0.005)

    yield Harness(RedisRateLimitStore(client), prefix, wait_redis)
    for key in sync.scan_iter(f"{prefix}:*"):
        sync.delete(key)
    sync.close()


def test_admits_up_to_the_limit_and_refuses_with_when_to_retry(harness: Harness) -> None:
    async def scenario() -> None:
        outcomes = await harness.store.decide([harness.check(f"r{n}") for n in range(3)])
        assert all(o.admitted for o in outcomes)
        start = outcomes[0].at_us
        await harness.advance_to(start + 100_000)
        refused = (await harness.store.decide([harness.check("r3")]))[0]
        assert not refused.admitted and refused.limited_by == CLIENT
        assert refused.retry_after_us == start + WINDOW.window_us - refused.at_us
        assert 0 < refused.retry_after_us <= 300_000
        await harness.advance_to(start + WINDOW.window_us)
        again = (await harness.store.decide([harness.check("r4")]))[0]
        assert again.admitted, "a retry at retry_after must succeed"
        assert again.remaining == (2, None)  # all three left together (one batch, one time)

    run(scenario())


def test_the_model_limit_is_shared_across_clients(harness: Harness) -> None:
    model = Limit(2, 60_000)
    checks = [harness.check(f"{c}1", client=c, model_limit=model) for c in "abc"]
    outcomes = run(harness.store.decide(checks))
    assert [o.admitted for o in outcomes] == [True, True, False]  # type: ignore[attr-defined]
    refused = outcomes[2]  # type: ignore[index]
    assert refused.limited_by == MODEL and refused.remaining == (3, 0)
    assert 59_000_000 < refused.retry_after_us <= 60_000_000


def test_a_refused_request_is_recorded_nowhere(harness: Harness) -> None:
    model = Limit(1, 60_000)
    first = harness.check("x", client="a", model_limit=model)
    refused = harness.check("y", client="b", model_limit=model)
    other_model = harness.check("z", client="b", model="n", model_limit=model)
    outcomes = run(harness.store.decide([first, refused, other_model]))
    assert [o.admitted for o in outcomes] == [True, False, True]  # type: ignore[attr-defined]
    assert outcomes[2].remaining == (2, 0)  # type: ignore[index]  # b's refused one not counted


def test_a_duplicate_is_admitted_again_without_a_slot(harness: Harness) -> None:
    outcomes = run(harness.store.decide([harness.check("same"), harness.check("same")]))
    assert [(o.admitted, o.duplicate) for o in outcomes] == [  # type: ignore[attr-defined]
        (True, False), (True, True)]
    assert outcomes[1].remaining == (2, None)  # type: ignore[index]


def test_no_model_limit_means_no_model_log(harness: Harness) -> None:
    outcomes = run(harness.store.decide([harness.check(f"r{n}", client=f"c{n}")
                                         for n in range(10)]))
    assert all(o.admitted and o.remaining[1] is None for o in outcomes)  # type: ignore[attr-defined]


def test_every_redis_key_has_a_ttl_within_its_window(services: Services) -> None:
    prefix = f"t{uuid.uuid4().hex[:10]}"
    store = RedisRateLimitStore(redis_client(services.redis_url, timeout_ms=2000))
    checks = [Check(f"r{n}", f"{prefix}:client:c{n % 3}", Limit(5, 30_000),
                    f"{prefix}:model:m", Limit(100, 90_000)) for n in range(20)]
    run(store.decide(checks))
    sync = sync_redis.Redis.from_url(services.redis_url)
    ttls = {key.decode(): sync.pttl(key) for key in sync.scan_iter(f"{prefix}:*")}
    assert len(ttls) == 4
    for key, ttl in ttls.items():
        window = 90_000 if ":model:" in key else 30_000
        assert 0 < ttl <= window, (key, ttl)
    sync.delete(*ttls)
    sync.close()


def test_admissions_made_in_memory_during_an_outage_count_after_redis_returns(
    services: Services,
) -> None:
    """The real Lua script, Redis made to stop answering (``CLIENT PAUSE``): what the
    in-process log admitted meanwhile still counts once Redis answers again, so a client
    does not get its limit twice in one window."""
    prefix = f"t{uuid.uuid4().hex[:10]}"
    limit = Limit(5, 60_000)
    store = RedisRateLimitStore(redis_client(services.redis_url, timeout_ms=200))
    probe = [0.0]
    limiter = FailoverLimiter(store, MemoryRateLimitStore(), probe_seconds=1.0,
                              clock=lambda: probe[0])
    sync = sync_redis.Redis.from_url(services.redis_url)

    def check(member: str, client: str) -> Check:
        return Check(member, f"{prefix}:client:{client}", limit, f"{prefix}:model:m", None)

    async def decide(*checks: Check) -> tuple[str, list[bool]]:
        backend, outcomes = await limiter.decide(checks)
        assert outcomes is not None
        return backend, [o.admitted for o in outcomes]

    async def scenario() -> None:
        sync.execute_command("CLIENT", "PAUSE", 1000, "ALL")
        assert await decide(*(check(f"a{n}", "a") for n in range(6)),
                            *(check(f"b{n}", "b") for n in range(3))) == \
            ("memory", [True] * 5 + [False] + [True] * 3)
        deadline = time.monotonic() + 10
        while sync.ping() is not True:  # (answers once the pause is over)
            assert time.monotonic() < deadline
        probe[0] = 2.0  # the next decision probes Redis, which answers
        assert await decide(check("a9", "a"), check("a0", "a"),
                            *(check(f"b{n}", "b") for n in range(3, 7))) == \
            ("redis", [False, True, True, True, False, False])
        # a: full in memory (a0 again is the same request: admitted without a slot);
        # b: 3 in memory, so Redis gives the 2 left of its 5

    try:
        run(scenario())
    finally:
        for key in sync.scan_iter(f"{prefix}:*"):
            sync.delete(key)
        sync.close()
