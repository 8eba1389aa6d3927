"""Dedup state: a streams worker's memory and restart-recovery time with N requests' worth
of dedup keys, before and after the dedup horizon (``AIPIPE_DEDUP_HORIZON_HOURS``).

Producing N requests through the whole pipeline is too slow here, so the keys are
written straight into the three dedup changelogs as faust writes them (key: the
operation id as a JSON string; value: JSON), N keys in each of ``seen-requests``,
``done-operations`` and ``started-operations`` (one admitted request marks all three),
over the partitions in turn. Then ``aipipe run streams`` starts on the otherwise empty
pipeline. Recovery time: from the process's start to ``/readyz`` answering 200 (partitions
assigned, tables recovered), less the same for empty changelogs; memory: the process's
``VmRSS`` at that moment (and ``VmHWM``, its peak).

Scenarios, each on its own topics:

- ``before``: the code before the horizon (``--before`` revision, run from a ``git
  archive`` of it), values ``true`` / a bare attempt, as it wrote them: every key is
  replayed and kept, however old;
- ``after, inside the horizon``: values stamped two hours ago, horizon 7 days: every key
  is replayed and kept (the worst case: N requests within the horizon);
- ``after, past the horizon, recovered``: the same topics, horizon 1 hour: the keys come
  back from the changelog (their records are younger than the retention) and the purge
  (every 5 minutes) drops them; RSS after that purge too;
- ``after, past the horizon``: records and values 8 days old, horizon 7 days, once the
  broker's retention (``retention.ms`` = the horizon; it checks every
  ``log.retention.check.interval.ms``, 5 min by default) has deleted them: nothing is
  replayed.

Run alone: ``python -m tests.bench.dedup_state --keys 1000000``; in the bench:
``python -m tests.bench --only dedup``.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable
from pathlib import Path

import orjson
from confluent_kafka import Consumer, Producer, TopicPartition

from aipipe.infra.settings import Settings, load_settings
from aipipe.infra.topics import ensure_topics
from aipipe.runner import DEDUP_TABLES, changelog_topic, prepare_topics
from tests.bench.latency import delete_topics
from tests.bench.report import Figure

Say = Callable[[str], None]
#: the last commit before the dedup horizon
BEFORE = "5e99d86"
DAY = 86_400.0
MB = 1024 * 1024

#: run ``aipipe run streams`` from another source tree: the editable install's finder
#: maps ``aipipe.*`` to folders; point it at the tree before anything is imported
_FROM_TREE = """
import runpy, sys
import __editable___aipipe_0_1_0_finder as finder
tree = sys.argv.pop(1)
finder.MAPPING.update({k: v.replace("/work/main", tree, 1) for k, v in finder.MAPPING.items()})
sys.argv = ["aipipe", "run", "streams"]
runpy.run_module("aipipe", run_name="__main__", alter_sys=True)
"""


def write_keys(settings: Settings, keys: int, stamp: float | None, record_ms: int | None) -> float:
    """``keys`` operations' dedup records in the three changelogs; seconds it took.

    ``stamp`` None writes the values of before the horizon (``true``, a bare attempt).
    """
    producer = Producer({"bootstrap.servers": settings.kafka_bootstrap, "linger.ms": 50,
                         "batch.size": 1_000_000, "queue.buffering.max.messages": 1_000_000,
                         "acks": "all"})
    seen = b"true" if stamp is None else orjson.dumps(round(stamp, 3))
    started = b"1" if stamp is None else orjson.dumps([1, round(stamp, 3)])
    topics = [(changelog_topic(settings, "seen-requests"), seen),
              (changelog_topic(settings, "done-operations"), seen),
              (changelog_topic(settings, "started-operations"), started)]
    extra = {} if record_ms is None else {"timestamp": record_ms}
    began = time.monotonic()
    for i in range(keys):
        key = orjson.dumps(str(uuid.uuid4()))
        partition = i % settings.partitions
        for topic, value in topics:
            while True:
                try:
                    producer.produce(topic, value, key, partition=partition, **extra)
                    break
                except BufferError:
                    producer.poll(0.05)
        if i % 10_000 == 0:
            producer.poll(0)
    producer.flush(300)
    return time.monotonic() - began


def records_left(settings: Settings) -> int:
    """Records still on the broker in the three changelogs (high minus low watermark)."""
    consumer = Consumer({"bootstrap.servers": settings.kafka_bootstrap,
                         "group.id": f"bench-dedup-{uuid.uuid4().hex[:8]}"})
    try:
        left = 0
        for table in DEDUP_TABLES:
            for p in range(settings.partitions):
                low, high = consumer.get_watermark_offsets(
                    TopicPartition(changelog_topic(settings, table), p), timeout=10)
                left += high - low
        return left
    finally:
        consumer.close()


def _get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return int(response.status), response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()
    except OSError:
        return 0, ""


def _status(pid: int) -> dict[str, int]:
    """VmRSS and VmHWM of ``pid``, in bytes."""
    text = Path(f"/proc/{pid}/status").read_text()
    return {m[1]: int(m[2]) * 1024 for m in re.finditer(r"^(VmRSS|VmHWM):\s+(\d+) kB", text, re.M)}


def _free_port() -> int:
    import socket  # deferred: only the worker's metrics port needs it

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def run_worker(
    settings: Settings, tree: Path | None, wait_purge: int = 0, timeout: float = 1200,
) -> dict[str, float]:
    """Start ``aipipe run streams`` (from ``tree`` when given), measure, stop it; with
    ``wait_purge``, also once the purge has dropped that many keys."""
    port = _free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("AIPIPE_")}
    env.update(settings.to_env())
    env.update({"AIPIPE_METRICS_PORT": str(port), "AIPIPE_ENV": "production"})
    if tree is not None:  # a setting the older tree does not know
        env.pop("AIPIPE_DEDUP_HORIZON_HOURS", None)
    command = [sys.executable, "-m", "aipipe", "run", "streams"] if tree is None else \
        [sys.executable, "-c", _FROM_TREE, str(tree)]
    log_path = settings.home / f"streams-{time.monotonic_ns()}.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    began = time.monotonic()
    with log_path.open("ab") as out:
        proc = subprocess.Popen(command, env=env, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)
    try:
        while _get(f"http://127.0.0.1:{port}/readyz")[0] != 200:
            if proc.poll() is not None:
                tail = log_path.read_text(errors="replace").splitlines()[-20:]
                raise RuntimeError("the streams worker exited:\n" + "\n".join(tail))
            if time.monotonic() - began > timeout:  # a figure too: not ready within it
                return {"not_ready_after_seconds": timeout,
                        **{k.lower(): v / MB for k, v in _status(proc.pid).items()}}
            time.sleep(0.1)
        ready = time.monotonic() - began
        out_figures = {"ready_seconds": ready, **{k.lower(): v / MB
                                                  for k, v in _status(proc.pid).items()}}
        if wait_purge:  # until the purge dropped every key (the first may run mid-recovery)
            def expired() -> float:
                return sum(float(m[1]) for m in re.finditer(
                    r"^aipipe_dedup_keys_expired_total\{[^}]*\} (\S+)$",
                    _get(f"http://127.0.0.1:{port}/metrics")[1], re.M))

            while expired() < wait_purge:
                if proc.poll() is not None or time.monotonic() - began > timeout:
                    raise RuntimeError(f"the purge dropped {expired()} of {wait_purge} keys")
                time.sleep(0.5)
            out_figures["purged_after_seconds"] = time.monotonic() - began
            out_figures["rss_after_purge_mb"] = _status(proc.pid)["VmRSS"] / MB
            out_figures["expired"] = expired()
        return out_figures
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, 9)
            proc.wait(10)


def before_tree(revision: str, into: Path) -> Path:
    """The source tree of ``revision`` (``git archive``: the repository is not touched)."""
    repo = Path(__file__).resolve().parents[2]
    archive = subprocess.run(["git", "archive", revision], cwd=repo, capture_output=True,
                             check=True).stdout
    with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
        tar.extractall(into, filter="data")
    return into


SCENARIOS = ("before", "inside", "recovered", "aged")


def bench_dedup_state(
    base: Settings, say: Say, keys: int = 1_000_000, before: str = BEFORE,
    scenarios: tuple[str, ...] = SCENARIOS, timeout: float = 3600,
) -> list[Figure]:
    work = Path(tempfile.mkdtemp(prefix="aipipe-bench-dedup-"))
    now = time.time()

    def scenario(name: str, horizon_hours: float) -> Settings:
        prefix = f"benchdedup{uuid.uuid4().hex[:6]}{name}"
        return base.model_copy(update={
            "topic_prefix": prefix, "home": work / prefix, "env": "production",
            "simulated_enabled": True, "dedup_horizon_hours": horizon_hours})

    empty, legacy = scenario("empty", 168), scenario("before", 168)
    inside, aged = scenario("inside", 168), scenario("aged", 168)
    results: dict[str, dict[str, float]] = {}
    try:
        say(f"[bold]dedup state[/bold]: {keys:,} requests' keys x 3 changelogs per scenario")
        if "aged" in scenarios:
            prepare_topics(aged)  # retention = 7 days: the broker drops 8-day-old records
            took = write_keys(aged, keys, now - 8 * DAY, int((now - 8 * DAY) * 1000))
            say(f"  past the horizon: written in {took:.0f}s; the broker's retention runs")
        results["empty"] = run_worker(empty, None)
        say(f"  empty changelogs: {results['empty']}")
        if "aged" in scenarios:
            deadline = time.monotonic() + 900
            while (left := records_left(aged)) and time.monotonic() < deadline:
                time.sleep(5)
            say(f"  past the horizon: {left} records left on the broker")
            results["aged"] = {**run_worker(aged, None, timeout=timeout), "records_left": left}
            say(f"  after, past the horizon: {results['aged']}")
        if "before" in scenarios:
            tree = before_tree(before, work / "before")
            ensure_topics(legacy.kafka_bootstrap,
                          [changelog_topic(legacy, t) for t in DEDUP_TABLES],
                          partitions=legacy.partitions, config={"cleanup.policy": "compact"})
            write_keys(legacy, keys, None, None)
            results["before"] = run_worker(legacy, tree, timeout=timeout)
            say(f"  before ({before}): {results['before']}")
        if "inside" in scenarios or "recovered" in scenarios:
            prepare_topics(inside)
            write_keys(inside, keys, now - 2 * 3600, None)
        if "inside" in scenarios:
            results["inside"] = run_worker(inside, None, timeout=timeout)
            say(f"  after, inside the horizon: {results['inside']}")
        if "recovered" in scenarios:
            # horizon 1 h: the keys (2 h old) are past it, their records (written now) stay
            # on the broker for that hour; the purge runs after 5 minutes
            recovered = inside.model_copy(update={"dedup_horizon_hours": 1.0})
            results["recovered"] = run_worker(recovered, None, wait_purge=3 * keys,
                                            timeout=timeout)
            say(f"  after, past the horizon, recovered then purged: {results['recovered']}")
    finally:
        for settings in (empty, legacy, inside, aged):
            with contextlib.suppress(Exception):
                delete_topics(settings.kafka_bootstrap, settings.topic_prefix)
        shutil.rmtree(work, ignore_errors=True)
    return figures(results, keys, before)


def figures(results: dict[str, dict[str, float]], keys: int, before: str) -> list[Figure]:
    startup = results["empty"]["ready_seconds"]
    base = results.get("before", {}).get("ready_seconds", startup) - startup
    method = (f"{keys:,} requests' keys in each of the three dedup changelogs; `aipipe run "
              f"streams` from start to /readyz 200, less {startup:.1f}s for empty changelogs; "
              "VmRSS at ready (tests/bench/dedup_state.py)")
    out = []
    for name, label in (("before", f"before ({before})"), ("inside", "after, inside the horizon"),
                        ("recovered", "after, past the horizon, before the broker drops it"),
                        ("aged", "after, past the horizon")):
        if name not in results:
            continue
        r = results[name]
        out.append(Figure(
            metric=f"dedup recovery: {label}", unit="s",
            ours=r.get("ready_seconds", r.get("not_ready_after_seconds", 0)) - startup,
            baseline=base, goal=None, method=method,
            notes={**{k: round(v, 1) for k, v in r.items()},
                   "rss_empty_mb": round(results["empty"]["vmrss"], 1)}))
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.bench.dedup_state")
    parser.add_argument("--keys", type=int, default=1_000_000)
    parser.add_argument("--before", default=BEFORE, help="revision of the code before")
    parser.add_argument("--scenarios", nargs="+", choices=SCENARIOS, default=list(SCENARIOS))
    parser.add_argument("--timeout", type=float, default=3600,
                        help="seconds a worker may take to get ready (past it: a figure too)")
    args = parser.parse_args(argv)
    for figure in bench_dedup_state(load_settings(), print, args.keys, args.before,
                                    tuple(args.scenarios), args.timeout):
        print(f"{figure.metric}: {figure.ours:.1f}s {figure.notes}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
