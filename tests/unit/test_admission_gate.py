"""Failover between limiter backends, and the gate's order: invalid, over budget, rate."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterable, Sequence
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

import pytest
from redis.exceptions import ConnectionError as RedisConnectionError

from aipipe.consumers.costs.budgets import Budget, period_bounds
from aipipe.schemas.events import OperationAdmitted, OperationRejected, OperationRequested
from aipipe.schemas.limits import Limit
from aipipe.streams.admission.budgets import (
    BudgetGate,
    BudgetState,
    RedisLatch,
    budget_report,
    thresholds_reached,
)
from aipipe.streams.admission.gate import AdmissionGate, usd
from aipipe.streams.admission.limiter import FailoverLimiter, MemoryRateLimitStore
from aipipe.streams.admission.limits import Limits, LimitsSource
from aipipe.streams.admission.window import Check, Outcome

NOW = datetime(2026, 11, 26, 12, tzinfo=UTC)


class Clock:
    now = 0.0

    def __call__(self) -> float:
        return self.now


class FlakyRedis:
    """A primary store that fails while ``down`` is set."""

    backend = "redis"

    def __init__(self) -> None:
        self.down = False
        self.calls = 0
        self.memory = MemoryRateLimitStore()

    async def decide(self, checks: Sequence[Check]) -> list[Outcome]:
        self.calls += 1
        if self.down:
            raise RedisConnectionError("Error 111 connecting to 127.0.0.1:1. Connection refused.")
        return self.memory.decide_now(checks)

    async def ping(self) -> None:
        if self.down:
            raise TimeoutError("Timeout reading from socket")


CHECK = Check("r", "client:c", Limit(5, 1000), "model:m", None)


def test_failover_to_memory_and_back_after_a_probe(capsys: pytest.CaptureFixture[str]) -> None:
    primary, clock = FlakyRedis(), Clock()
    limiter = FailoverLimiter(primary, MemoryRateLimitStore(), probe_seconds=1.0,  # type: ignore[arg-type]
                              clock=clock)

    async def scenario() -> list[str]:
        backends = [(await limiter.decide([CHECK]))[0]]
        primary.down = True
        backends.append((await limiter.decide([CHECK]))[0])
        calls = primary.calls
        clock.now = 0.5
        backends.append((await limiter.decide([CHECK]))[0])  # no probe yet
        assert primary.calls == calls
        clock.now = 1.0
        backends.append((await limiter.decide([CHECK]))[0])  # probe fails: still memory
        primary.down = False
        clock.now = 1.5
        backends.append((await limiter.decide([CHECK]))[0])
        clock.now = 2.0
        backends.append((await limiter.decide([CHECK]))[0])  # probe answers: back to Redis
        return backends

    assert asyncio.run(scenario()) == ["redis", "memory", "memory", "memory", "memory", "redis"]
    out = capsys.readouterr().out
    assert out.count("rate_limiter_failover") == 1 and "Connection refused" in out
    assert out.count("rate_limiter_recovered") == 1


def test_failing_closed_refuses_without_redis() -> None:
    primary = FlakyRedis()
    primary.down = True
    limiter = FailoverLimiter(primary, MemoryRateLimitStore(), failure_mode="closed")  # type: ignore[arg-type]
    assert asyncio.run(limiter.decide([CHECK])) == ("none", None)


# -- the gate ----------------------------------------------------------------------------


class FakeStore:
    def __init__(self, budgets: dict[str, Budget], spend: dict[str, Decimal]) -> None:
        self._budgets, self._spend = budgets, spend
        self.queries = 0

    def budgets(self, client_ids: Iterable[str] | None = None) -> dict[str, Budget]:
        self.queries += 1
        return {c: b for c, b in self._budgets.items() if client_ids is None or c in client_ids}

    def spend(self, client_ids: Iterable[str], start: datetime, end: datetime) -> dict[str, Any]:
        assert (start, end) == period_bounds("month", NOW)
        return {c: self._spend.get(c, Decimal(0)) for c in client_ids}


class LocalRedis:
    """Enough of ``redis.asyncio.Redis`` for the latch: SET NX."""

    def __init__(self) -> None:
        self.keys: set[str] = set()

    async def set(self, key: str, value: object, nx: bool, px: int) -> bool | None:
        assert nx and px > 0
        if key in self.keys:
            return None
        self.keys.add(key)
        return True


def request(client: str, n: int, model: str = "gemini-2.5-flash-image") -> OperationRequested:
    return OperationRequested(request_id=f"{client}-{n}", client_id=client,
                              operation_type="image_generation", model=model, occurred_at=NOW,
                              params={"prompt": "a chair"})


def gate_with(store: FakeStore, clock: Clock, redis: LocalRedis) -> AdmissionGate:
    limiter = FailoverLimiter(None, MemoryRateLimitStore())
    budgets = BudgetGate(lambda: store, RedisLatch(redis, "p:budget"),  # type: ignore[arg-type, return-value]
                         default_usd=Decimal("50"), cache_seconds=5.0, clock=clock,
                         now=lambda: NOW)
    return AdmissionGate(limiter, LimitsSource(Limit(2, 60_000)), budgets, "p")


def test_the_gate_checks_price_then_budget_then_rate() -> None:
    store = FakeStore({"rich": Budget(Decimal("100"), "month", "table")},
                      {"rich": Decimal("10"), "broke": Decimal("50")})
    gate = gate_with(store, Clock(), LocalRedis())
    batch = [request("rich", 1, model="dall-e-9"), request("broke", 1),
             *(request("rich", n) for n in range(2, 5))]
    decided = asyncio.run(gate.decide(batch, now=NOW)).decisions
    assert [type(d).__name__ for d in decided] == [
        "OperationRejected", "OperationRejected", "OperationAdmitted", "OperationAdmitted",
        "OperationRejected"]
    invalid, broke, first, _, limited = decided
    assert isinstance(invalid, OperationRejected) and invalid.reason == "invalid"
    assert isinstance(broke, OperationRejected) and broke.reason == "over_budget"
    assert "$50.00 of its $50.00 monthly budget" in broke.detail
    assert broke.backend == "none"
    assert isinstance(first, OperationAdmitted)
    assert (first.backend, first.limited_by, first.limit, first.window_ms, first.remaining) == (
        "memory", "client", 2, 60_000, 1)
    assert isinstance(limited, OperationRejected) and limited.reason == "rate_limited"
    assert limited.retry_after_ms is not None and 59_000 < limited.retry_after_ms <= 60_000
    assert limited.decided_at is not None


def test_thresholds_fire_once_each_per_period() -> None:
    spend = {"c": Decimal("40")}
    store = FakeStore({}, spend)
    clock, redis = Clock(), LocalRedis()
    gate = gate_with(store, clock, redis)

    def notices_at(amount: str, at: float) -> list[int]:
        spend["c"], clock.now = Decimal(amount), at
        return [n.threshold_percent
                for n in asyncio.run(gate.decide([request("c", int(at))], now=NOW)).notices]

    assert notices_at("39", 0) == []  # 80 % of the $50 default is 40
    assert notices_at("41", 1) == []  # cached for 5 s: not asked again
    assert store.queries == 1
    assert notices_at("41", 5) == [80]
    assert notices_at("46", 10) == [90]
    assert notices_at("46", 15) == []
    assert notices_at("60", 20) == [100]
    assert notices_at("70", 25) == []
    assert len(redis.keys) == 3
    assert thresholds_reached(Decimal("80"), Decimal("100")) == [80]
    assert thresholds_reached(Decimal("0"), Decimal("0")) == [80, 90, 100]


def test_budgets_fail_open_when_clickhouse_cannot_be_asked() -> None:
    def broken() -> None:
        raise ConnectionError("no endpoint")

    gate = AdmissionGate(FailoverLimiter(None, MemoryRateLimitStore()),
                         LimitsSource(Limit(5, 1000)),
                         BudgetGate(broken, RedisLatch(LocalRedis(), "p"), default_usd=Decimal(1)),  # type: ignore[arg-type]
                         "p")
    decided = asyncio.run(gate.decide([request("c", 1)], now=NOW)).decisions
    assert isinstance(decided[0], OperationAdmitted)


def test_periods() -> None:
    assert period_bounds("month", datetime(2026, 12, 31, 23, tzinfo=UTC)) == (
        datetime(2026, 12, 1, tzinfo=UTC), datetime(2027, 1, 1, tzinfo=UTC))
    assert period_bounds("week", NOW) == (datetime(2026, 11, 23, tzinfo=UTC),
                                          datetime(2026, 11, 30, tzinfo=UTC))
    assert period_bounds("day", NOW)[1] == datetime(2026, 11, 27, tzinfo=UTC)


def test_failing_closed_rejects_with_the_reason() -> None:
    primary = FlakyRedis()
    primary.down = True
    limiter = FailoverLimiter(primary, MemoryRateLimitStore(), failure_mode="closed")  # type: ignore[arg-type]
    gate = AdmissionGate(limiter, LimitsSource(Limit(5, 1000)), None, "p")
    decided = asyncio.run(gate.decide([request("c", 1)], now=NOW)).decisions[0]
    assert isinstance(decided, OperationRejected)
    assert (decided.reason, decided.backend) == ("rate_limited", "none")
    assert "fails closed" in decided.detail


def test_budget_report_for_the_cli() -> None:
    store = FakeStore({"c": Budget(Decimal("10"), "month", "table")}, {"c": Decimal("9.5")})
    report = budget_report(store, "c", NOW, None, "month")  # type: ignore[arg-type]
    assert report["budget_source"] == "table" and report["over_budget"] is False
    assert report["thresholds_reached"] == [80, 90] and report["decision"] == "admit"
    assert report["remaining_usd"] == "0.5"
    assert budget_report(store, "c", NOW, None, "month", Decimal("9"))["over_budget"]  # type: ignore[arg-type]
    none = budget_report(store, "d", NOW, None, "month")  # type: ignore[arg-type]
    assert none["budget_usd"] is None and none["decision"] == "admit"


@pytest.mark.parametrize(("amount", "text"), [("50", "50.00"), ("0.0387006", "0.0387006"),
                                              ("1.5", "1.50"), ("50.000000000", "50.00")])
def test_dollars_show_cents_and_no_more_than_needed(amount: str, text: str) -> None:
    assert usd(Decimal(amount)) == text


# -- one request never takes its batch with it ---------------------------------------------


class ExplodingLimits:
    """Limits that raise for one client, as a bug or a bad override file might."""

    def current(self) -> ExplodingLimits:
        return self

    def for_client(self, client_id: str) -> Limit | None:
        if client_id == "boom":
            raise KeyError("no limits for 'boom'")
        return Limit(100, 60_000)

    def for_model(self, model: str) -> Limit | None:
        return None


def deep(levels: int) -> dict[str, Any]:
    value: dict[str, Any] = {}
    for _ in range(levels - 1):
        value = {"a": value}
    return value


def test_each_request_gets_one_decision_whatever_its_neighbours_hold(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import aipipe.streams.admission.gate as gate_module
    from aipipe.schemas.events import decode, encode

    real_invalid = gate_module.invalid

    def flaky_invalid(request: OperationRequested, *args: Any) -> OperationRejected | None:
        if request.request_id == "rec":
            raise RecursionError("maximum recursion depth exceeded")
        return real_invalid(request, *args)

    monkeypatch.setattr(gate_module, "invalid", flaky_invalid)

    def req(client: str, request_id: str, **changes: Any) -> OperationRequested:
        fields: dict[str, Any] = {"params": {"prompt": "a chair"}, "occurred_at": NOW}
        fields.update(changes)
        return OperationRequested(request_id=request_id, client_id=client,
                                  operation_type="image_generation",
                                  model="gemini-2.5-flash-image", **fields)

    batch = [
        req("a", "good-1"),
        req("b", "old", occurred_at=datetime(1990, 1, 1, tzinfo=UTC)),
        req("c", "huge-n", params={"prompt": "a chair", "n": 1e30}),
        req("d", "deep", params=deep(300)),
        req("boom", "boom"),
        req("e", "rec"),
        req("f", "slow", params={"prompt": "p", "simulate": {"latency_ms": 3_600_000}}),
        req("g", "good-2"),
    ]
    gate = AdmissionGate(FailoverLimiter(None, MemoryRateLimitStore()), ExplodingLimits(),  # type: ignore[arg-type]
                         None, "p")
    decided = asyncio.run(gate.decide(batch, now=NOW)).decisions
    assert [d.request_id for d in decided] == [r.request_id for r in batch]
    verdicts = {d.request_id: (d.reason if isinstance(d, OperationRejected) else "admitted")
                for d in decided}
    assert verdicts == {"good-1": "admitted", "old": "invalid", "huge-n": "invalid",
                        "deep": "invalid", "boom": "invalid", "rec": "invalid",
                        "slow": "invalid", "good-2": "admitted"}
    details = {d.request_id: d.detail for d in decided if isinstance(d, OperationRejected)}
    assert "before 2000-01-01" in details["old"]
    assert "'params.n' must be a whole number from 1 to 4" in details["huge-n"]
    assert "nests more than 4 levels deep" in details["deep"]
    assert details["boom"].startswith("Admission could not decide this request (KeyError")
    assert details["rec"].startswith("Admission could not decide this request (RecursionError")
    assert "'params.simulate.latency_ms' must be a whole number from 0 to 5000" in details["slow"]
    for decision in decided:  # every decision can go on the wire and come back
        assert decode(encode(decision)) == decision
        assert decision.requested_at == NOW


def test_the_price_table_is_chosen_at_the_pipelines_clock() -> None:
    asked: list[datetime] = []

    def prices_at(when: datetime) -> Any:
        from aipipe.schemas.prices import price_table_at

        asked.append(when)
        return price_table_at(when)

    gate = AdmissionGate(FailoverLimiter(None, MemoryRateLimitStore()),
                         LimitsSource(Limit(5, 1000)), None, "p", prices_at=prices_at)
    backdated = request("c", 1).model_copy(update={"occurred_at": datetime(2001, 1, 1, tzinfo=UTC)})
    decided = asyncio.run(gate.decide([backdated], now=NOW)).decisions[0]
    assert isinstance(decided, OperationAdmitted)
    assert asked == [NOW] and decided.requested_at == NOW
    assert decided.client_occurred_at == datetime(2001, 1, 1, tzinfo=UTC)


def test_a_batch_that_meets_a_slow_lookup_of_other_clients_asks_about_its_own_next() -> None:
    """A lookup runs one at a time: a batch that finds one in flight for other clients
    takes no answer of theirs (a KeyError failed its whole batch) and leaves its own clients
    to be asked about by the next batch, not cached as unknown."""
    release = threading.Event()
    asked: list[set[str]] = []

    class SlowStore(FakeStore):
        def budgets(self, client_ids: Iterable[str] | None = None) -> dict[str, Budget]:
            asked.append(set(client_ids or ()))
            release.wait(30)
            return super().budgets(client_ids)

    store = SlowStore({}, {"alice": Decimal("45"), "bob": Decimal("49")})
    budgets = BudgetGate(lambda: store, RedisLatch(LocalRedis(), "p:budget"),  # type: ignore[arg-type, return-value]
                         default_usd=Decimal("50"), wait_seconds=0.2, now=lambda: NOW)

    async def go() -> tuple[Any, ...]:
        first = await budgets.states([request("alice", 1)])  # its lookup outlives the wait
        second = await budgets.states([request("bob", 1)])  # meets it in flight
        release.set()
        deadline = asyncio.get_running_loop().time() + 10
        while budgets._lookup is not None:  # (the lookup in flight ends)
            assert asyncio.get_running_loop().time() < deadline
            await asyncio.sleep(0.01)
        third = await budgets.states([request("alice", 2), request("bob", 2)])
        return first, second, third

    first, second, third = asyncio.run(go())
    assert first == ({"alice": None}, []) and second == ({"bob": None}, [])
    assert asked == [{"alice"}, {"bob"}]  # bob asked about by the next batch
    states, notices = third
    assert states["alice"] is not None and states["bob"] is not None  # alice: the late answer
    assert sorted((n.client_id, n.threshold_percent) for n in notices) == [
        ("bob", 80), ("bob", 90)]  # (alice's comes with her next lookup, as before)


def test_an_answer_for_other_clients_that_comes_while_a_batch_waits_is_not_its_own() -> None:
    release = threading.Event()

    class SlowStore(FakeStore):
        def budgets(self, client_ids: Iterable[str] | None = None) -> dict[str, Budget]:
            release.wait(30)
            return super().budgets(client_ids)

    store = SlowStore({}, {"alice": Decimal("45")})
    budgets = BudgetGate(lambda: store, RedisLatch(LocalRedis(), "p:budget"),  # type: ignore[arg-type, return-value]
                         default_usd=Decimal("50"), wait_seconds=0.5, now=lambda: NOW)

    async def go() -> tuple[Any, ...]:
        await budgets.states([request("alice", 1)])  # outlives its wait

        async def answer_soon() -> None:
            await asyncio.sleep(0.05)
            release.set()

        answering = asyncio.ensure_future(answer_soon())
        second = await budgets.states([request("bob", 1)])  # alice's answer comes meanwhile
        await answering
        return second

    assert asyncio.run(go()) == ({"bob": None}, [])  # (a KeyError for alice before)


def test_another_clients_request_reusing_an_admitted_event_id_needs_a_slot_of_its_own() -> None:
    """A duplicate is admitted again without a slot: only the same client's same request.
    Another client reusing an admitted id (ids are the emitter's) took the model's quota
    for free, once per client that reused it."""
    source = LimitsSource(Limit(100, 60_000))
    source.limits = Limits(Limit(100, 60_000),
                           models={"gemini-2.5-flash-image": Limit(1, 60_000)})
    gate = AdmissionGate(FailoverLimiter(None, MemoryRateLimitStore()), source, None, "p")
    first = request("alice", 1)
    reused = [first.model_copy(update={"client_id": client}) for client in ("bob", "carol")]
    decided = asyncio.run(gate.decide([first, first, *reused], now=NOW)).decisions
    assert [type(d).__name__ for d in decided] == [
        "OperationAdmitted", "OperationAdmitted", "OperationRejected", "OperationRejected"]
    assert all(isinstance(d, OperationRejected) and d.reason == "rate_limited"
               for d in decided[2:])


def test_the_budget_cache_forgets_clients_not_seen_for_ten_minutes() -> None:
    """A client_id is whatever a sender writes: one per request kept an entry each."""
    clock = Clock()
    store = FakeStore({}, {})
    budgets = BudgetGate(lambda: store, RedisLatch(LocalRedis(), "p:budget"),  # type: ignore[arg-type, return-value]
                         default_usd=Decimal("50"), clock=clock, now=lambda: NOW)

    async def ask(*clients: str) -> None:
        await budgets.states([request(c, 1) for c in clients])

    asyncio.run(ask(*(f"rotating-{i}" for i in range(1000))))
    clock.now = 300.0
    asyncio.run(ask("steady"))
    assert len(budgets._cache) == 1001
    clock.now = 650.0  # the rotating ids were last asked about 650 s ago, steady 350 s
    asyncio.run(ask("steady"))
    assert set(budgets._cache) == {"steady"}


# -- zero budgets, and the latch while Redis does not answer -------------------------------


class CountingLatch:
    """A ``ThresholdLatch`` that keeps every key it is asked about."""

    def __init__(self) -> None:
        self.asked: list[str] = []

    async def first(self, key: str, ttl_ms: int) -> bool:
        self.asked.append(key)
        return self.asked.count(key) == 1


class DownRedis:
    """``redis.asyncio.Redis`` that never answers."""

    def __init__(self) -> None:
        self.calls = 0

    async def set(self, key: str, value: object, nx: bool, px: int) -> bool | None:
        self.calls += 1
        raise RedisConnectionError("Error 111 connecting to 127.0.0.1:6379. Connection refused.")


def test_a_zero_budget_rejects_fresh_clients_without_notices_or_latch_calls() -> None:
    """``AIPIPE_BUDGET_USD=0`` denies every client without a row. Each fresh client_id (the
    sender's choice) reached 80, 90 and 100 % of $0 at $0: three Redis keys for the period
    and three notices each, for free (a budget rejection takes no rate-limit slot)."""
    store = FakeStore({"real": Budget(Decimal("10"), "month", "table")}, {"real": Decimal("8")})
    latch = CountingLatch()
    budgets = BudgetGate(lambda: store, latch, default_usd=Decimal(0), now=lambda: NOW)
    gate = AdmissionGate(FailoverLimiter(None, MemoryRateLimitStore()),
                         LimitsSource(Limit(2, 60_000)), budgets, "p")
    fresh = [request(f"rotating-{i}", 1) for i in range(1000)]
    out = asyncio.run(gate.decide([*fresh, request("real", 1)], now=NOW))
    *denied, real = out.decisions
    assert all(isinstance(d, OperationRejected) and d.reason == "over_budget"
               and d.backend == "none" for d in denied)
    assert isinstance(denied[0], OperationRejected) and denied[0].detail == (
        "Client 'rotating-0' has spent $0.00 of its $0.00 monthly budget since 2026-11-01; "
        "raise it with `aipipe budget set` or wait for the next period.")
    assert isinstance(real, OperationAdmitted)  # $8 of $10: one notice, as before
    assert [(n.client_id, n.threshold_percent) for n in out.notices] == [("real", 80)]
    assert latch.asked == ["real:20261101:month:80"]


def test_thresholds_are_announced_only_for_a_budget_and_a_spend() -> None:
    def crossed(spend: str, budget: str) -> list[int]:
        start, end = period_bounds("month", NOW)
        return BudgetState("c", Budget(Decimal(budget), "month", "settings"), Decimal(spend),
                           start, end).crossed

    assert crossed("0", "0") == crossed("5", "0") == crossed("0", "10") == []
    assert crossed("8", "10") == [80] and crossed("12", "10") == [80, 90, 100]


def test_the_latch_held_in_process_while_redis_is_down_stays_bounded() -> None:
    """While Redis errors the latch falls back to the worker's memory: a set that kept every
    key it was asked about, for good."""
    store = FakeStore({}, {f"spender-{i}": Decimal("45") for i in range(1000)})
    redis = DownRedis()
    latch = RedisLatch(redis, "p:budget", local_max=500)
    budgets = BudgetGate(lambda: store, latch, default_usd=Decimal("50"), now=lambda: NOW)
    _, notices = asyncio.run(budgets.states([request(f"spender-{i}", 1) for i in range(1000)]))
    assert len(notices) == 2000 and redis.calls == 2000  # 80 and 90 % each, announced here
    assert len(latch.local) == 500


def test_the_in_process_latch_forgets_keys_past_their_ttl_and_the_oldest_past_its_size() -> None:
    clock = Clock()
    latch = RedisLatch(DownRedis(), "p", local_max=3, clock=clock)

    def first(key: str, ttl_ms: int = 10_000) -> bool:
        return asyncio.run(latch.first(key, ttl_ms))

    assert first("a", 1000) and not first("a", 1000)
    clock.now = 1.0  # a's TTL has run out
    assert first("b") and list(latch.local) == ["b"]  # (a, expired, dropped)
    assert first("a", 1000) and not first("a")
    assert first("c") and first("d") and list(latch.local) == ["a", "c", "d"]
    assert first("e") and list(latch.local) == ["c", "d", "e"]  # the oldest went
    assert not first("e") and not first("c")
    assert first("b")  # forgotten: its notice may come once more
