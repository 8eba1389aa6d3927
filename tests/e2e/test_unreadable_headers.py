"""A record whose header name is not UTF-8 (the broker takes any bytes; kcat sends them):
neither worker stops on it, and nothing behind it waits.

The streams' client (aiokafka) cannot parse such a record: admission dead-letters it with
the reason and its coordinates, and decides the requests after it. The sinks' client
(confluent-kafka) can read all but its headers: its event is costed, without them.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import uuid
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

import pytest

from aipipe.infra.settings import Settings
from aipipe.processes import WorkerProcess, wait_for
from aipipe.runner import prepare_topics
from aipipe.schemas.deadletter import OFFSET, PARTITION, REASON, STAGE, TOPIC, read_headers
from aipipe.streams.consumer import UNREADABLE_REASON
from tests.support.ledger import read_topic
from tests.support.pipeline import store_of

pytestmark = pytest.mark.e2e
NOW = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
BAD_HEADER = b"\xff\xfeX=1"  # a header named b"\xff\xfeX"


def requested(client: str) -> dict[str, Any]:
    return {"event_id": str(uuid.uuid4()), "event_type": "operation.requested",
            "schema_version": 1, "occurred_at": NOW, "request_id": f"req-{client}",
            "client_id": client, "operation_type": "image_generation",
            "provider": "simulated", "model": "gemini-2.5-flash-image",
            "params": {"prompt": "a red chair"}}


def completed(client: str) -> dict[str, Any]:
    return {"event_id": str(uuid.uuid4()), "event_type": "operation.completed",
            "schema_version": 1, "occurred_at": NOW, "request_id": f"req-{client}",
            "client_id": client, "operation_id": str(uuid.uuid4()), "requested_at": NOW,
            "operation_type": "image_generation", "provider": "simulated",
            "model": "gemini-2.5-flash-image", "success": True, "usage": {},
            "cost_usd": "0.25", "price_version": "2025-10-01", "duration_ms": 1}


def kcat(settings: Settings, topic: str, key: str, event: dict[str, Any],
         *headers: bytes) -> None:
    tool = shutil.which("kcat")
    assert tool, "kcat is missing: `make test` installs it (apt-get install -y kcat)"
    args = [tool.encode(), b"-P", b"-b", settings.kafka_bootstrap.encode(), b"-t",
            topic.encode(), b"-k", key.encode(), b"-c", b"1"]
    for header in headers:
        args += [b"-H", header]
    subprocess.run(args, input=json.dumps(event).encode(), check=True, timeout=60)


def test_a_header_name_that_is_not_utf8_stops_no_worker_and_holds_back_nothing(
    settings: Settings,
) -> None:
    settings = settings.model_copy(update={"partitions": 1})
    prepare_topics(settings)
    unreadable, after = requested("hdr-a"), requested("hdr-b")
    kcat(settings, settings.topics.requested, "hdr", unreadable, BAD_HEADER)
    kcat(settings, settings.topics.requested, "hdr", after)
    kcat(settings, settings.topics.completed, "hdr-c", completed("hdr-c"), BAD_HEADER)
    worker = WorkerProcess(settings, "all").start()
    try:
        store = store_of(settings, worker)

        def settled() -> bool:
            assert worker.alive(), worker.log_tail()
            return {"hdr-b", "hdr-c"} <= set(store.totals())

        wait_for(settled, 180, "the request after the unreadable one costed, and the "
                 "completion with the unreadable header costed")
        assert store.totals()["hdr-c"] == (1, Decimal("0.25"))
        assert "hdr-a" not in store.totals()
        letters = [read_headers(m.headers()) for m in read_topic(
            settings, settings.topics.deadletter)]
        [letter] = [h for h in letters if h[REASON] == UNREADABLE_REASON]
        assert (letter[TOPIC], letter[STAGE]) == (settings.topics.requested, "admission")
        [original] = [m for m in read_topic(settings, settings.topics.requested, 1.0)
                      if m.partition() == int(letter[PARTITION])
                      and m.offset() == int(letter[OFFSET])]
        assert json.loads(original.value())["event_id"] == unreadable["event_id"]
        assert worker.alive(), worker.log_tail()
    finally:
        worker.stop()
