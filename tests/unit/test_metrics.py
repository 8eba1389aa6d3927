"""Health's arithmetic (stalled, idle, ready) and the endpoint's three paths, in-process."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from collections.abc import Iterator

import pytest

from aipipe.infra.metrics import CONSUMER_LAG, Health, LagGauge, MetricsServer


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_a_busy_part_is_stalled_past_the_limit_and_an_idle_one_never() -> None:
    clock = Clock()
    health = Health(clock)
    health.idle("admission")
    with health.working("generation"):
        clock.now += 10
        assert health.alive(10.0)[0]  # exactly the limit is still alive
        clock.now += 0.5
        ok, body = health.alive(10.0)
        assert (ok, body["stalled"]) == (False, ["generation"])
        assert body["parts"]["generation"] == {"state": "stalled", "seconds": 10.5}
        assert body["parts"]["admission"] == {"state": "idle", "seconds": 10.5}
    assert health.alive(10.0) == (True, {
        "status": "ok", "stalled": [], "stall_seconds": 10.0,
        "parts": {"admission": {"state": "idle", "seconds": 10.5},
                  "generation": {"state": "idle", "seconds": 0.0}}})


def test_a_part_that_stops_beating_is_stalled() -> None:
    clock = Clock()
    health = Health(clock)
    health.beat("sink-costs")
    clock.now += 3
    assert health.alive(2.0)[1]["stalled"] == ["sink-costs"]
    health.forget("sink-costs")  # stopped on purpose
    assert health.alive(2.0)[0]


def test_a_dead_part_fails_at_once() -> None:
    health = Health(Clock())
    health.idle("rollup-sealer")
    health.died("rollup-sealer")
    ok, body = health.alive(60.0)
    assert (ok, body["stalled"], body["parts"]["rollup-sealer"]["state"]) == \
        (False, ["rollup-sealer"], "dead")


def test_ready_only_when_every_fact_holds() -> None:
    health = Health(Clock())
    assert health.ready() == (False, {"status": "not_ready",
                                      "not_ready": ["nothing registered yet"], "checks": {}})
    health.set_ready("partitions_assigned", True)

    def broken() -> bool:
        raise RuntimeError("no consumer yet")

    health.ready_when("tables_recovered", broken)
    assert health.ready() == (False, {
        "status": "not_ready", "not_ready": ["tables_recovered"],
        "checks": {"partitions_assigned": True, "tables_recovered": False}})
    health.set_ready("tables_recovered", True)
    assert health.ready()[0]


def test_lag_shows_only_the_partitions_held_now() -> None:
    lag = LagGauge("unit-group")
    lag.update({("t", 0): 5, ("t", 1): -1})
    assert CONSUMER_LAG.labels("unit-group", "t", "0")._value.get() == 5
    assert CONSUMER_LAG.labels("unit-group", "t", "1")._value.get() == 0
    lag.update({("t", 1): 2})
    series = {s.labels["partition"]: s.value for m in CONSUMER_LAG.collect() for s in m.samples
              if s.labels.get("group") == "unit-group"}
    assert series == {"1": 2.0}


def get(url: str) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return int(response.status), response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


@pytest.fixture
def served() -> Iterator[tuple[str, Health, Clock]]:
    clock = Clock()
    health = Health(clock)
    server = MetricsServer(0, stall_seconds=5.0, host="127.0.0.1", health=health).start()
    yield f"http://127.0.0.1:{server.port}", health, clock
    server.stop()


def test_the_endpoint_answers_200_or_503_with_json(served: tuple[str, Health, Clock]) -> None:
    url, health, clock = served
    health.beat("admission")
    health.set_ready("partitions_assigned", True)
    assert get(f"{url}/healthz")[0] == 200
    assert get(f"{url}/readyz") == (200, b'{"status":"ready","not_ready":[],'
                                         b'"checks":{"partitions_assigned":true}}')
    clock.now += 6
    status, body = get(f"{url}/healthz")
    assert (status, json.loads(body)["stalled"]) == (503, ["admission"])
    status, body = get(f"{url}/metrics")
    assert status == 200
    assert b"# TYPE aipipe_events_consumed_total counter" in body
    assert get(f"{url}/nothing")[0] == 404
