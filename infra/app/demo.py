"""``aipipe demo``: the whole pipeline on simulated traffic, checked against what was sent.

Each run uses its own topics and database, so runs never mix; the per-client cost table
is read back from ClickHouse and compared with the sum of the costs produced.
"""

from __future__ import annotations

import random
import time
import uuid
from collections import defaultdict
from decimal import Decimal
from typing import Any

from rich.progress import Progress

from aipipe.infra.kafka_auth import kafka_config
from aipipe.infra.settings import Settings
from aipipe.processes import WorkerProcess, wait_for
from aipipe.producers import EventProducer
from aipipe.reader import pipeline_store
from aipipe.runner import prepare_topics
from aipipe.schemas.events import OperationRequested
from aipipe.schemas.prices import price_table_at
from aipipe.streams.generation.simulated import simulated_usage
from aipipe.tables import console, table

MODELS = {
    "image_generation": ["gemini-2.5-flash-image"],
    "video_generation": ["veo-3.0-generate-001", "veo-3.0-fast-generate-001"],
    "text_generation": ["gemini-2.5-flash"],
}


def simulated_traffic(operations: int, clients: int, seed: int = 7) -> list[OperationRequested]:
    """A reproducible mix: mostly images, some videos and texts, a few failures."""
    rng = random.Random(seed)
    events = []
    for i in range(operations):
        kind = rng.choices(list(MODELS), weights=[70, 15, 15])[0]
        params: dict[str, Any] = {"prompt": "a product photo " * rng.randint(1, 20)}
        if kind == "image_generation":
            params["n"] = rng.randint(1, 4)
        elif kind == "video_generation":
            params["duration_seconds"] = rng.choice([4, 6, 8])
        else:
            params["max_output_tokens"] = rng.randint(50, 2000)
        if rng.random() < 0.03:
            params["simulate"] = {"fail": True}
        events.append(
            OperationRequested(
                request_id=f"req-{i}",
                client_id=f"client-{rng.randint(1, clients)}",
                user_id=f"user-{rng.randint(1, 20)}",
                operation_type=kind,  # type: ignore[arg-type]
                model=rng.choice(MODELS[kind]),
                params=params,
            )
        )
    return events


def expected_costs(events: list[OperationRequested]) -> dict[str, tuple[int, Decimal]]:
    totals: dict[str, tuple[int, Decimal]] = defaultdict(lambda: (0, Decimal(0)))
    for e in events:
        failed = bool((e.params.get("simulate") or {}).get("fail"))
        cost = Decimal(0) if failed else price_table_at(e.occurred_at).cost(
            e.model, simulated_usage(e.operation_type, e.params)
        )
        count, total = totals[e.client_id]
        totals[e.client_id] = (count + 1, total + cost)
    return dict(totals)


def run_demo(base: Settings, operations: int, clients: int) -> None:
    stamp = time.strftime("%Y%m%d%H%M%S") + uuid.uuid4().hex[:4]
    settings = base.model_copy(
        update={
            "topic_prefix": f"demo-{stamp}",
            "clickhouse_database": f"demo_{stamp}",
            "query_port": 0,
            "simulated_enabled": True,  # the demo's traffic is simulated
        }
    )
    console.print(f"[bold]aipipe demo[/bold]: topics demo-{stamp}.*, database demo_{stamp}")
    prepare_topics(settings)
    worker = WorkerProcess(settings, "all").start()
    events = simulated_traffic(operations, clients)
    try:
        with Progress(console=console, transient=False) as progress:
            sent = progress.add_task("produce operation.requested", total=len(events))
            with EventProducer(settings.kafka_bootstrap, **kafka_config(settings)) as producer:
                for event in events:
                    producer.send(settings.topics.requested, event)
                    progress.advance(sent)
            recorded = progress.add_task("recorded in ClickHouse", total=len(events))
            store = pipeline_store(settings, worker.alive)

            def all_recorded() -> bool:
                if not worker.alive():
                    raise RuntimeError(f"the pipeline worker exited:\n{worker.log_tail()}")
                done = sum(n for n, _ in store.totals().values())
                progress.update(recorded, completed=done)
                return bool(done >= len(events))

            wait_for(all_recorded, timeout=300, what="every operation to be recorded", interval=0.5)
        report(store, expected_costs(events))
    finally:
        worker.stop()


def report(store: Any, expected: dict[str, tuple[int, Decimal]]) -> None:
    actual = store.totals()
    rows = []
    for client in sorted(set(actual) | set(expected)):
        s = store.summary(client)
        kinds = [s.by_operation_type.get(k) for k in MODELS]
        same = actual.get(client) == expected.get(client)
        rows.append(
            (client, s.operation_count, *(k.count if k else 0 for k in kinds),
             s.failure_count, f"{s.total_cost_usd:.6f}", "yes" if same else "NO")
        )
    total = sum((c for _, c in actual.values()), Decimal(0))
    count = sum(n for n, _ in actual.values())
    rows.append(("all clients", count, "", "", "", "", f"{total:.6f}", ""))
    console.print(
        table(
            "cost per client, read back from ClickHouse",
            ["client", "operations", "images", "videos", "texts", "failed", "cost USD",
             "matches produced"],
            rows,
        )
    )
    if actual != expected:
        raise SystemExit("The ClickHouse totals differ from what was produced.")
    console.print("[green]Every operation recorded once; totals equal the produced sum exactly.")
