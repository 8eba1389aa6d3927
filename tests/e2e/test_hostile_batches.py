"""A record batch written to the requests topic by another Kafka client (librdkafka
here) that decompresses to more than any producer builds: a decompression bomb.

One record of 1 GB of zeros, compressed with zstd, is about 30 kilobytes on the wire, and
the broker takes it. aiokafka decompressed the whole batch in memory (twice over) before
anything could look at it: this one took the worker's peak memory from 0.13 to 2.1 GB. A
batch of 1 MB on the wire is tens of gigabytes: more than the machine has, for the worker
that fetches it and for each worker after it. The streams now decompress within
``MAX_BATCH_BYTES`` and hand on a stand-in for the batch, which admission dead-letters
with the reason; the request after it is decided, the committed offset passes both, and
the worker's peak memory grows by less than 300 MB (81 MB here).
"""

from __future__ import annotations

from pathlib import Path

import orjson
import pytest
from confluent_kafka import Producer

from aipipe.infra.settings import Settings
from aipipe.processes import WorkerProcess, wait_for
from aipipe.runner import prepare_topics
from aipipe.schemas.deadletter import REASON, STAGE, read_headers
from aipipe.schemas.events import OperationRequested
from tests.e2e.test_dedup_horizon import uncommitted
from tests.support.pipeline import consume, produce

pytestmark = pytest.mark.e2e

CLIENT = "client-bomb"  # one partition: before, the bomb, after


def peak_memory(pid: int) -> int:
    """The process's peak resident memory so far, in bytes (Linux ``VmHWM``)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise AssertionError(f"no VmHWM for {pid}")


def test_a_decompression_bomb_is_dead_lettered_and_the_next_request_is_decided(
    settings: Settings,
) -> None:
    prepare_topics(settings)
    topic = settings.topics.requested
    before, after = (OperationRequested(
        request_id=name, client_id=CLIENT, operation_type="image_generation",
        provider="simulated", model="gemini-2.5-flash-image", params={"prompt": "p"})
        for name in ("before", "after-the-bomb"))
    worker = WorkerProcess(settings, "streams").start()
    try:
        produce(settings, topic, [before])
        consume(settings, settings.topics.admitted, expected=1, timeout=120)  # started
        peak = peak_memory(worker.pid)
        bomb = Producer({"bootstrap.servers": settings.kafka_bootstrap,
                         "compression.type": "zstd", "message.max.bytes": 1_000_000_000,
                         "batch.size": 1_000_000_000})
        bomb.produce(topic, bytes(1_000_000_000 - 1_000), key=CLIENT)
        assert bomb.flush(60) == 0
        del bomb
        produce(settings, topic, [after])
        [letter] = consume(settings, settings.topics.deadletter, expected=1, timeout=120)
        decisions = consume(settings, settings.topics.admitted, expected=2, timeout=60)
        assert [orjson.loads(m.value())["request_id"] for m in decisions] == [
            "before", after.request_id]
        assert peak_memory(worker.pid) - peak < 300 << 20  # bytes

        def passed() -> bool:
            assert worker.alive(), worker.log_tail()
            return uncommitted(settings, topic) == 0

        wait_for(passed, 60, "the committed offset past the bomb and the request")
        assert worker.alive(), worker.log_tail()
    finally:
        worker.stop()
    headers = read_headers(letter.headers())
    assert headers[STAGE] == "admission"
    assert headers[REASON].startswith(
        "The record batch at offsets 1 to 1 of this partition was skipped unread: it "
        "decompresses (zstd) past 64 MB;")
    assert letter.value() in (None, b"")
