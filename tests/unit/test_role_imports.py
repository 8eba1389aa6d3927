"""Each role loads only what it uses, checked in a fresh interpreter's ``sys.modules``.

``aipipe run streams`` builds its faust app without chDB, pandas, pyarrow or matplotlib
(budgets are read through a ClickHouse server or the owner's read endpoint); ``aipipe run
costs`` loads no faust or matplotlib; an emitter (``aipipe.producers``, ``aipipe.schemas``)
loads none of faust, chDB, clickhouse-connect, redis, matplotlib, pandas or prometheus-client.
An emitter loads no OpenTelemetry while tracing is off (a worker's redis client imports it).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

HEAVY = ("faust", "chdb", "clickhouse_connect", "redis", "matplotlib", "pandas", "pyarrow",
         "prometheus_client", "opentelemetry")  # OpenTelemetry: only when OTEL_* asks for traces

# what `aipipe run ROLE` imports before its worker runs, and for streams the app it builds
# (and a budget lookup's store opening: with no endpoint under the home, it opens none)
STREAMS = """
import aipipe.cli, aipipe.runner, aipipe.infra.logging
from aipipe.infra.settings import load_settings
from aipipe.reader import budget_store_opener
from aipipe.streams.app import create_app, default_deps
from aipipe.streams_worker import run_streams
settings = load_settings()
opener = budget_store_opener(settings)
create_app(settings, default_deps(settings, opener))
assert opener() is None
"""
COSTS = """
import aipipe.cli, aipipe.runner, aipipe.infra.logging
from aipipe.costs_worker import cost_sink_thread
"""
EMITTER = """
import aipipe.producers, aipipe.producers.results, aipipe.producers.webhooks
import aipipe.schemas, aipipe.schemas.deadletter, aipipe.schemas.jsonschema
"""


def loaded(code: str, home: Path) -> set[str]:
    """The heavy top-level packages in ``sys.modules`` after running ``code`` afresh."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("AIPIPE_")}
    env["AIPIPE_HOME"] = str(home)
    probe = (f"{code}\nimport sys, json\n"
             f"print(json.dumps(sorted(set(sys.modules) & {set(HEAVY)!r})))")
    done = subprocess.run([sys.executable, "-c", probe], cwd=home, env=env,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return set(json.loads(done.stdout.splitlines()[-1]))


@pytest.mark.parametrize(("code", "allowed"), [
    # redis (8.x) imports OpenTelemetry's SDK for its own observability when it is installed
    (STREAMS, {"faust", "redis", "clickhouse_connect", "prometheus_client", "opentelemetry"}),
    (COSTS, {"chdb", "clickhouse_connect", "redis", "pandas", "pyarrow", "prometheus_client",
             "opentelemetry"}),
    (EMITTER, set()),
], ids=["streams", "costs", "emitter"])
def test_a_role_loads_only_what_it_uses(code: str, allowed: set[str], tmp_path: Path) -> None:
    assert loaded(code, tmp_path) - allowed == set()


def test_the_probe_sees_what_a_role_loads(tmp_path: Path) -> None:
    """The check itself: a role that did load chDB and faust would be caught."""
    # chDB 26.x imports pyarrow itself; the probe must see both packages asked for
    assert loaded("import chdb, faust", tmp_path) - {"pyarrow"} == {"chdb", "faust"}
