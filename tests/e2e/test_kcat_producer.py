"""A client that is not aipipe's: kcat produces a hand-written event, and it is costed.

The event below is typed out the way an upstream team in any language would write it from
the published JSON Schema (``aipipe schemas export``): it is checked against that schema
here, produced with Debian's ``kcat`` (librdkafka's command-line client) with the key and
headers the README documents, and must come back as one cost row with the cost the price
list gives, by hand.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import uuid
from datetime import UTC, datetime
from decimal import Decimal

import jsonschema
import pytest

from aipipe.infra.settings import Settings
from aipipe.processes import WorkerProcess, wait_for
from aipipe.runner import prepare_topics
from aipipe.schemas.jsonschema import json_schemas
from tests.support.pipeline import store_of

pytestmark = pytest.mark.e2e


def test_an_event_produced_by_kcat_is_decided_and_costed(settings: Settings) -> None:
    kcat = shutil.which("kcat")
    assert kcat, "kcat is missing: `make test` installs it (apt-get install -y kcat)"
    prepare_topics(settings)
    event_id = str(uuid.uuid4())
    event = {
        "event_id": event_id,
        "event_type": "operation.requested",
        "schema_version": 1,
        "occurred_at": datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "request_id": "kcat-1",
        "client_id": "kcat-client",
        "operation_type": "image_generation",
        "provider": "simulated",
        "model": "gemini-2.5-flash-image",
        "params": {"prompt": "a red chair on a white floor", "n": 2},
    }
    jsonschema.validate(event, json_schemas()["operation.requested"])
    worker = WorkerProcess(settings, "all").start()
    line = json.dumps(event)
    subprocess.run(
        [kcat, "-P", "-b", settings.kafka_bootstrap, "-t", settings.topics.requested,
         "-k", "kcat-client", "-H", "event_type=operation.requested",
         "-H", "request_id=kcat-1", "-c", "1"],
        input=line.encode(), check=True, timeout=60,
    )
    store = store_of(settings, worker)
    wait_for(lambda: "kcat-client" in store.totals(), 120, "the kcat event's cost row")
    count, total = store.totals()["kcat-client"]
    # 28 characters of prompt -> 7 input tokens at $0.30/M; 2 images x 1290 tokens at $30/M
    expected = (7 * Decimal("0.30") + 2 * 1290 * Decimal(30)) / Decimal(1_000_000)
    assert (count, total) == (1, expected)
    rows = store.client.query(
        f"SELECT operation_id, request_id FROM {store.table} FINAL WHERE client_id = 'kcat-client'"
    ).result_rows
    assert rows == [(event_id, "kcat-1")]
    worker.stop()
