"""End to end on a three-broker cluster vs the one local broker, same run.

A three-node KRaft cluster (``aipipe.services.start_kafka_cluster``, the same jars as
``aipipe up``; topics get replication factor 3 and ``min.insync.replicas=2`` there, as
``aipipe`` decides from the cluster's metadata) is started on free loopback ports in a
temporary directory, and stopped and removed afterwards. The burst's pipeline run
(``tests.bench.burst.pipeline_burst``: ``N`` pre-produced requests, one ``aipipe run all``
worker, 0 ms simulated provider, chDB, exact row count checked) runs once on the cluster
and once on the local broker; the figure is the cluster's end-to-end rate against the
single broker's. Both brokers' JVMs share the machine's cores with the worker.

Run alone: ``python -m tests.bench.cluster --count 5000``.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

from aipipe import services
from aipipe.infra.settings import Settings
from tests.bench.burst import pipeline_burst
from tests.bench.report import Figure
from tests.bench.settings import bench_settings
from tests.support.ports import free_base_port

Say = Callable[[str], None]
BROKERS = 3


def bench_cluster(settings: Settings, say: Say, count: int = 10_000) -> list[Figure]:
    home = Path(tempfile.mkdtemp(prefix="aipipe-bench-cluster-"))
    nodes = services.cluster_nodes("127.0.0.1", free_base_port(count=2 * BROKERS), BROKERS, home)
    say(f"[bold]cluster[/bold]: starting a {BROKERS}-broker KRaft cluster in {home}")
    try:
        services.start_kafka_cluster("127.0.0.1", nodes[0].port, BROKERS, home,
                                     settings.cache_dir)
        say(f"  {count:,} requests end to end on {BROKERS} brokers")
        on_cluster = pipeline_burst(
            settings.model_copy(update={"kafka_bootstrap": services.cluster_bootstrap(nodes)}),
            count, say)
    finally:
        services.stop_kafka_cluster(home)
        shutil.rmtree(home, ignore_errors=True)
    say(f"  {count:,} requests end to end on the local broker")
    single = pipeline_burst(settings, count, say)
    for name, rates in ((f"{BROKERS} brokers", on_cluster), ("1 broker", single)):
        say(f"    {name:<10} end to end {rates['end_to_end']:>8,.0f} /s  admission "
            f"{rates['admission']:>8,.0f} /s  generation {rates['generation']:>8,.0f} /s  "
            f"costs {rates['costs']:>8,.0f} /s")
    method = (f"{count:,} requests produced before one `aipipe run all` worker starts (the "
              "burst's run: every request admitted, 0 ms provider, chDB, exact rows "
              f"checked): on a {BROKERS}-broker local KRaft cluster (replication 3, "
              "min.insync.replicas=2, acks=all) vs the one local broker, same run; "
              f"{settings.partitions} partitions")
    notes = {"count": count,
             **{f"cluster_{k}_per_second": round(v) for k, v in on_cluster.items()
                if k in ("admission", "generation", "costs", "end_to_end")},
             **{f"single_{k}_per_second": round(v) for k, v in single.items()
                if k in ("admission", "generation", "costs", "end_to_end")}}
    return [Figure(f"end to end operations/s, {BROKERS} brokers vs 1", "ops/s",
                   on_cluster["end_to_end"], single["end_to_end"], None, method,
                   notes=notes)]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.bench.cluster")
    parser.add_argument("--count", type=int, default=10_000)
    args = parser.parse_args(argv)
    for f in bench_cluster(bench_settings(), print, args.count):
        print(f"{f.metric}: {f.ours:,.0f} {f.unit} vs {f.baseline:,.0f} ({f.ratio:.2f}x)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
