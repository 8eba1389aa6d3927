"""The rate limiter: a sliding log in Redis (one Lua script per batch), an in-process
sliding log with the same contract, and the failover between them.

``RateLimitStore`` is the port: ``decide(checks)`` decides a batch of checks in order
(an earlier admission in the batch counts against a later check) and returns one
``Outcome`` each. ``RedisRateLimitStore`` does it in one ``EVALSHA`` round trip, with the
time from Redis ``TIME`` and every key written with a TTL of its window, so a crash at any
point cannot leave a key that never expires. ``MemoryRateLimitStore`` does it in a dict,
with an injected clock.

``FailoverLimiter`` uses Redis while it answers within the socket timeout, and the memory
store (or, failing closed, nothing) while it does not, probing Redis again every
``probe_seconds``.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import replace
from typing import Any, Literal, Protocol

import redis.asyncio as aioredis
import structlog
from redis.backoff import NoBackoff
from redis.exceptions import RedisError
from redis.retry import Retry

from aipipe.schemas.limits import Limit
from aipipe.streams.admission.window import Check, Outcome, SlidingLog, decide_one

Backend = Literal["redis", "memory", "none"]
log = structlog.get_logger("aipipe.admission.limiter")


class RateLimitStore(Protocol):
    backend: Backend

    async def decide(self, checks: Sequence[Check]) -> list[Outcome]: ...


# -- in process --------------------------------------------------------------------------


def _wall_us() -> int:
    return time.time_ns() // 1000


class MemoryRateLimitStore:
    """Sliding logs in a dict; time from ``clock`` (microseconds), never moving backwards.

    Logs whose newest admission has left every window are dropped now and then, so idle
    clients do not accumulate.
    """

    backend: Backend = "memory"

    def __init__(self, clock: Callable[[], int] = _wall_us, sweep_every: int = 10_000) -> None:
        self.clock = clock
        self.logs: dict[str, SlidingLog] = {}
        self._windows: dict[str, int] = {}
        self._last_us = 0
        self._sweep_every = sweep_every
        self._since_sweep = 0

    def now_us(self) -> int:
        self._last_us = max(self._last_us, self.clock())
        return self._last_us

    async def decide(self, checks: Sequence[Check]) -> list[Outcome]:
        return self.decide_now(checks)

    def decide_now(self, checks: Sequence[Check]) -> list[Outcome]:
        now = self.now_us()
        out = []
        for check in checks:
            logs: list[SlidingLog | None] = []
            for key, limit in check.pairs():
                if limit is None:
                    logs.append(None)
                    continue
                self._windows[key] = limit.window_us
                logs.append(self.logs.setdefault(key, SlidingLog()))
            out.append(decide_one(logs, check, now))
        self._since_sweep += len(checks)
        if self._since_sweep >= self._sweep_every:
            self.sweep(now)
        return out

    def sweep(self, now_us: int) -> None:
        self._since_sweep = 0
        for key in [k for k, lg in self.logs.items()
                    if (lg.newest_us or 0) <= now_us - self._windows.get(k, 0)]:
            del self.logs[key]
            self._windows.pop(key, None)


# -- Redis -------------------------------------------------------------------------------

# KEYS: per check i (1-based), KEYS[2i-1] the client log and KEYS[2i] the model log.
# ARGV[5(i-1) + 1..5]: member, client count, client window (us), model count, model
# window (us); a count of 0 means no limit of that kind. The time is one ``TIME`` for the
# whole batch, so each key is pruned and counted once per call and its TTL set once, after
# its last write. The reply is one string (cheap to parse): the Redis time in us, then per
# check "admitted,duplicate,limited_by,retry_after_us,client_remaining,model_remaining"
# (remaining -1: no limit), all joined by ",".
DECIDE_LUA = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local size, ttl = {}, {}
local out = {string.format('%d', now)}
for i = 1, #KEYS / 2 do
  local base = (i - 1) * 5
  local member = ARGV[base + 1]
  local keys, counts, windows = {}, {}, {}
  local duplicate = 0
  for j = 1, 2 do
    local key = KEYS[2 * (i - 1) + j]
    keys[j] = key
    counts[j] = tonumber(ARGV[base + 2 * j])
    windows[j] = tonumber(ARGV[base + 2 * j + 1])
    if counts[j] > 0 then
      if size[key] == nil then
        redis.call('ZREMRANGEBYSCORE', key, '-inf', now - windows[j])
        size[key] = redis.call('ZCARD', key)
      end
      if duplicate == 0 and size[key] > 0 and redis.call('ZSCORE', key, member) then
        duplicate = 1
      end
    end
  end
  local limited_by, retry = 0, 0
  if duplicate == 0 then
    for j = 1, 2 do
      local key = keys[j]
      if counts[j] > 0 and size[key] >= counts[j] then
        local rank = size[key] - counts[j]
        local oldest = redis.call('ZRANGE', key, rank, rank, 'WITHSCORES')
        local wait = tonumber(oldest[2]) + windows[j] - now
        if wait > retry or limited_by == 0 then limited_by, retry = j, wait end
      end
    end
  end
  local admitted = 0
  if limited_by == 0 then admitted = 1 end
  if admitted == 1 and duplicate == 0 then
    for j = 1, 2 do
      local key = keys[j]
      if counts[j] > 0 then
        redis.call('ZADD', key, now, member)
        size[key] = size[key] + 1
        ttl[key] = math.max(ttl[key] or 0, math.ceil(windows[j] / 1000))
      end
    end
  end
  local remaining = {-1, -1}
  for j = 1, 2 do
    if counts[j] > 0 then remaining[j] = math.max(counts[j] - size[keys[j]], 0) end
  end
  out[#out + 1] = string.format('%d,%d,%d,%d,%d,%d', admitted, duplicate, limited_by,
                                retry, remaining[1], remaining[2])
end
for key, ms in pairs(ttl) do
  redis.call('PEXPIRE', key, ms)
end
return table.concat(out, ',')
"""


def redis_client(url: str, timeout_ms: int) -> aioredis.Redis:
    """An asyncio client that gives up after ``timeout_ms`` and never retries by itself.

    redis-py retries failed commands by default; here a failure must surface at once so
    the limiter can fail over instead of holding the batch.
    """
    timeout = timeout_ms / 1000
    return aioredis.Redis.from_url(
        url,
        socket_timeout=timeout,
        socket_connect_timeout=timeout,
        retry=Retry(NoBackoff(), 0),
        retry_on_error=[],
        health_check_interval=0,
    )


class RedisRateLimitStore:
    """Sliding logs as sorted sets (score: Redis time in us; member: the client and the
    request's event id)."""

    backend: Backend = "redis"

    def __init__(self, client: aioredis.Redis) -> None:
        self.client = client
        self._script: Any = client.register_script(DECIDE_LUA)

    async def decide(self, checks: Sequence[Check]) -> list[Outcome]:
        if not checks:
            return []
        keys: list[str] = []
        args: list[str | int] = []
        for check in checks:
            keys += (check.client_key, check.model_key)
            args.append(check.member)
            for _, limit in check.pairs():
                args += (limit.count, limit.window_us) if limit is not None else (0, 0)
        reply: bytes = await self._script(keys=keys, args=args)
        values = [int(v) for v in reply.split(b",")]
        now = values[0]
        out = []
        for i in range(len(checks)):
            admitted, dup, limited_by, retry, rem_c, rem_m = values[1 + 6 * i: 7 + 6 * i]
            out.append(Outcome(
                admitted=bool(admitted), at_us=now, limited_by=limited_by, retry_after_us=retry,
                remaining=(None if rem_c < 0 else rem_c, None if rem_m < 0 else rem_m),
                duplicate=bool(dup),
            ))
        return out

    async def ping(self) -> None:
        await self.client.ping()


# -- failover ----------------------------------------------------------------------------

FailureMode = Literal["open", "closed"]
_FAILURES = (RedisError, OSError, TimeoutError)


class FailoverLimiter:
    """Redis while it answers; the in-process window (fail open) or refusal (fail closed)
    while it does not; back to Redis after the first successful probe.

    Logs ``rate_limiter_failover`` once per outage with the reason, and
    ``rate_limiter_recovered`` when Redis answers again.
    """

    def __init__(
        self,
        primary: RedisRateLimitStore | None,
        fallback: MemoryRateLimitStore,
        *,
        failure_mode: FailureMode = "open",
        probe_seconds: float = 1.0,
        clock: Callable[[], float] = time.monotonic,
        probe: Callable[[], Awaitable[None]] | None = None,
    ) -> None:
        self.primary = primary
        self.fallback = fallback
        self.failure_mode = failure_mode
        self.probe_seconds = probe_seconds
        self.clock = clock
        self._probe = probe or (primary.ping if primary is not None else None)
        self.healthy = primary is not None
        self._next_probe = 0.0
        self._swept_us = 0

    @property
    def backend(self) -> Backend:
        if self.healthy:
            return "redis"
        return "memory" if self.failure_mode == "open" else "none"

    async def decide(self, checks: Sequence[Check]) -> tuple[Backend, list[Outcome] | None]:
        """The backend that decided, and its outcomes (``None``: failed closed, refuse all)."""
        if not self.healthy and self.primary is not None and self.clock() >= self._next_probe:
            await self._try_recover()
        if self.healthy and self.primary is not None:
            try:
                return "redis", await self._decide_with_redis(checks)
            except _FAILURES as exc:
                self._fail(exc)
        if self.failure_mode == "closed":
            return "none", None
        return "memory", await self.fallback.decide(checks)

    async def _decide_with_redis(self, checks: Sequence[Check]) -> list[Outcome]:
        """Redis's outcomes, counting the admissions the memory store made during an outage
        that are still in their windows: Redis never saw them, and without them a client
        got its whole limit again from Redis right after the outage.

        A check whose memory log is full is decided by the memory store (refused, or a
        duplicate of an admission made there); the others go to Redis with each limit
        less what memory holds of it."""
        assert self.primary is not None
        memory = self.fallback
        if not memory.logs:
            return await self.primary.decide(checks)
        now = memory.now_us()
        if now - self._swept_us >= 1_000_000:  # (so the memory logs end once they age out)
            memory.sweep(now)
            self._swept_us = now
        to_redis: list[Check] = []
        held: dict[int, Check] = {}
        for index, check in enumerate(checks):
            limits: list[Limit | None] = []
            for key, limit in check.pairs():
                past = memory.logs.get(key)
                if past is not None and limit is not None:
                    past.prune(now, limit.window_us)
                    if check.member in past.members or len(past.entries) >= limit.count:
                        held[index] = check
                    elif past.entries:
                        limit = Limit(limit.count - len(past.entries), limit.window_ms)
                limits.append(limit)
            if index not in held:
                to_redis.append(replace(check, client_limit=limits[0], model_limit=limits[1]))
        decided = iter(await self.primary.decide(to_redis) if to_redis else [])
        from_memory = iter(memory.decide_now(list(held.values())))
        return [next(from_memory) if index in held else next(decided)
                for index in range(len(checks))]

    def _fail(self, exc: BaseException) -> None:
        self.healthy = False
        self._next_probe = self.clock() + self.probe_seconds
        log.warning(
            "rate_limiter_failover",
            reason=f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__,
            fallback="memory (per worker, fail open)" if self.failure_mode == "open"
            else "none (fail closed: requests are rejected)",
            probe_seconds=self.probe_seconds,
        )

    async def _try_recover(self) -> None:
        assert self._probe is not None
        self._next_probe = self.clock() + self.probe_seconds
        try:
            await self._probe()
        except _FAILURES:
            return
        self.healthy = True
        log.warning("rate_limiter_recovered", backend="redis")

    async def close(self) -> None:
        if self.primary is not None:
            await self.primary.client.aclose()
