"""Producers that are not aipipe's: the Java and Go examples produce, and it is costed.

``producers/examples/java`` (kafka-clients, networknt json-schema-validator) and
``producers/examples/go`` (franz-go, santhosh-tekuri/jsonschema) are built here as a user
would build them, pointed at the schemas ``aipipe schemas export`` writes, and run against
the local Kafka with a fresh topic prefix. Every event each one reports as acknowledged
must arrive keyed by its client with the README's headers, be admitted, and come back as
one cost row with the cost the price list gives, by hand; an invalid event must be
refused before anything is sent, in one sentence that names the field.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from decimal import Decimal
from pathlib import Path

import pytest

from aipipe.infra.settings import Settings
from aipipe.processes import WorkerProcess, wait_for
from aipipe.runner import prepare_topics
from aipipe.schemas.events import OperationAdmitted, decode
from tests.support.pipeline import consume, store_of

# the first test pays for both builds (minutes on a machine without ~/.m2 and ~/go)
pytestmark = [pytest.mark.e2e, pytest.mark.timeout(1500)]

EXAMPLES = Path(__file__).resolve().parents[2] / "producers" / "examples"
PROMPT = "a red chair on a white floor"
PARAMS = json.dumps({"prompt": PROMPT, "n": 2})
MODEL = "gemini-2.5-flash-image"
COUNT = 5
# 28 characters of prompt -> 7 input tokens at $0.30/M; 2 images x 1290 tokens at $30/M
COST_EACH = (7 * Decimal("0.30") + 2 * 1290 * Decimal(30)) / Decimal(1_000_000)


def _tool(name: str, hint: str, also_in: str = "") -> str:
    path = shutil.which(name) or (also_in and shutil.which(name, path=also_in))
    assert path, f"{name} is missing: {hint}"
    return path


def _build(command: list[str], cwd: Path, env: dict[str, str], what: str) -> None:
    done = subprocess.run(
        command, cwd=cwd, env=env, capture_output=True, text=True, timeout=900, check=False
    )
    output = done.stdout[-4000:] + done.stderr[-4000:]
    assert done.returncode == 0, f"{what} failed to build:\n{output}"


@pytest.fixture(scope="module")
def schemas_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """What a user in another language starts from: the exported JSON Schemas."""
    out = tmp_path_factory.mktemp("schemas")
    subprocess.run(
        [sys.executable, "-m", "aipipe", "schemas", "export", str(out)],
        check=True, capture_output=True, timeout=120,
    )
    assert (out / "operation.requested.schema.json").is_file()
    return out


@pytest.fixture(scope="module")
def java_producer(tmp_path_factory: pytest.TempPathFactory) -> list[str]:
    java = _tool("java", "install Java 17 (`make tools` does it: openjdk-17-jdk-headless)")
    mvn = _tool("mvn", "install Maven (`make tools` does: apt-get install maven)")
    build = tmp_path_factory.mktemp("java-build")
    # C1 only: Maven's own start-up is most of this build, and it runs once
    env = {**os.environ, "MAVEN_OPTS": "-XX:TieredStopAtLevel=1 -Xshare:auto"}
    _build([mvn, "-B", "-q", "package", f"-Daipipe.build.dir={build}"],
           EXAMPLES / "java", env, "the Java producer")
    return [java, "-jar", str(build / "aipipe-producer.jar")]


@pytest.fixture(scope="module")
def go_producer(tmp_path_factory: pytest.TempPathFactory) -> list[str]:
    go = _tool("go", "Go 1.26 is needed (`make tools` checks for it)", "/usr/local/go/bin")
    binary = tmp_path_factory.mktemp("go-build") / "producer"
    env = {**os.environ, "GOFLAGS": "-mod=mod"}
    _build([go, "build", "-o", str(binary), "."], EXAMPLES / "go", env, "the Go producer")
    return [str(binary)]


def _run(producer: list[str], settings: Settings, schemas: Path, client: str,
         **overrides: str) -> subprocess.CompletedProcess[str]:
    """The same command line for both (Go's flag package takes ``--name value`` too)."""
    options = {
        "client-id": client, "model": MODEL, "count": str(COUNT), "params": PARAMS,
        "topic": settings.topics.requested, "bootstrap": settings.kafka_bootstrap,
        "schemas": str(schemas), **overrides,
    }
    return subprocess.run(
        [*producer, *(arg for name, value in options.items() for arg in (f"--{name}", value))],
        capture_output=True, text=True, timeout=180, check=False,
    )


@pytest.fixture
def producers(java_producer: list[str], go_producer: list[str]) -> dict[str, list[str]]:
    return {"java": java_producer, "go": go_producer}


@pytest.fixture
def pipeline_workers(settings: Settings) -> Iterator[tuple[WorkerProcess, WorkerProcess]]:
    prepare_topics(settings)
    streams = WorkerProcess(settings, "streams").start()
    costs = WorkerProcess(settings, "costs").start()
    try:
        yield streams, costs
    finally:
        costs.stop()
        streams.stop()


def test_events_from_java_and_go_are_admitted_and_costed(
    settings: Settings, schemas_dir: Path, producers: dict[str, list[str]],
    pipeline_workers: tuple[WorkerProcess, WorkerProcess],
) -> None:
    streams, costs = pipeline_workers
    sent: dict[str, dict[str, str]] = {}  # client -> {event_id: request_id}
    for language, producer in producers.items():
        client = f"{language}-client"
        done = _run(producer, settings, schemas_dir, client)
        assert done.returncode == 0, f"the {language} producer failed:\n{done.stderr}"
        acks = [json.loads(line) for line in done.stdout.splitlines()]
        assert len(acks) == COUNT, done.stdout
        sent[client] = {ack["event_id"]: ack["request_id"] for ack in acks}
        assert len(sent[client]) == COUNT, "event_ids must be unique"
    total = COUNT * len(sent)

    # on the wire: keyed by client_id, with the request_id and event_type headers
    for message in consume(settings, settings.topics.requested, total):
        event = json.loads(message.value() or b"")
        client = event["client_id"]
        assert message.key() == client.encode()
        assert dict(message.headers() or []) == {
            "request_id": sent[client][event["event_id"]].encode(),
            "event_type": b"operation.requested",
        }

    admitted = [decode(m.value()) for m in consume(settings, settings.topics.admitted, total)]
    assert len(admitted) == total, f"{len(admitted)} of {total} decided:\n{streams.log_tail()}"
    assert sorted(
        (e.client_id, e.operation_id, e.request_id)
        for e in admitted if isinstance(e, OperationAdmitted)
    ) == sorted(
        (client, event_id, request_id)
        for client, ids in sent.items() for event_id, request_id in ids.items()
    )

    store = store_of(settings, costs)

    def all_costed() -> bool:
        assert costs.alive(), costs.log_tail()
        totals = store.totals()
        return all(totals.get(client, (0, 0))[0] >= COUNT for client in sent)

    wait_for(all_costed, 180, f"{total} cost rows from the Java and Go producers", interval=0.3)
    for client, ids in sent.items():
        assert store.totals()[client] == (COUNT, COUNT * COST_EACH)
        rows = store.client.query(
            f"SELECT operation_id, request_id, toString(cost_usd) FROM {store.table} FINAL "
            f"WHERE client_id = '{client}'"
        ).result_rows
        assert sorted((op, req, Decimal(cost)) for op, req, cost in rows) == sorted(
            (event_id, request_id, COST_EACH) for event_id, request_id in ids.items()
        )


INVALID = [
    pytest.param(
        {"model": ""},
        {"java": "field 'model': must be at least 1 characters long",
         "go": "field 'model': minLength: got 0, want 1"},
        id="empty-model",
    ),
    pytest.param(
        {"params": json.dumps([PROMPT])},
        {"java": "field 'params': array found, object expected",
         "go": "field 'params': got array, want object"},
        id="params-not-an-object",
    ),
    pytest.param(  # the pattern lets it through: format: date-time must be asserted
        {"occurred-at": "2026-02-30T12:00:00Z"},
        {"java": "field 'occurred_at': does not match the date-time pattern "
                 "must be a valid RFC 3339 date-time",
         "go": "field 'occurred_at': '2026-02-30T12:00:00Z' is not valid date-time: invalid "
               'date element: parsing time "2026-02-30": day out of range'},
        id="february-30",
    ),
]


@pytest.mark.parametrize(("bad", "reason"), INVALID)
@pytest.mark.parametrize("language", ["java", "go"])
def test_an_invalid_event_is_refused_before_anything_is_sent(
    settings: Settings, schemas_dir: Path, producers: dict[str, list[str]],
    language: str, bad: dict[str, str], reason: dict[str, str],
) -> None:
    # no topic and no broker are needed: validation comes before the producer exists
    done = _run(producers[language], settings, schemas_dir, "bad-client",
                bootstrap="127.0.0.1:1", **bad)
    assert (done.returncode, done.stdout) == (2, "")
    assert done.stderr.strip() == (
        "error: the operation.requested event does not match operation.requested.schema.json, "
        f"nothing was sent: {reason[language]}"
    )
