"""Every worker's /metrics, scraped by a real Prometheus, and its /healthz and /readyz.

A streams worker and a costs worker run as ``aipipe run`` processes on a fresh topic
prefix, each with its own metrics port; a Prometheus server (Debian's ``prometheus``,
``make tools``) scrapes both every second, and the test asks it through its HTTP query API
for totals that must equal what was produced. Every expression of the docker-compose
dashboard (``infra/grafana``) must select only metrics the two workers' ``/metrics`` have,
and parse in that Prometheus. A fault point that stalls the admission task makes
``/healthz`` fail, naming the part, while ``/readyz`` stays ready.
"""

from __future__ import annotations

import json
import re
import shutil
import socket
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from aipipe.infra.settings import Settings
from aipipe.processes import WorkerProcess, wait_for
from aipipe.runner import prepare_topics
from aipipe.schemas.events import OperationRequested
from tests.support.pipeline import consume, produce, produce_raw, store_of, wait_recorded

pytestmark = pytest.mark.e2e

COUNT = 40
INFRA = Path(__file__).resolve().parents[2] / "infra"
DASHBOARD = INFRA / "grafana" / "dashboards" / "aipipe.json"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def get(url: str, timeout: float = 5.0) -> tuple[int, bytes]:
    """Status and body of a GET, a 5xx answer included."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return int(response.status), response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def answers(url: str) -> bool:
    try:
        return get(url)[0] == 200
    except OSError:
        return False


class Prometheus:
    """A Prometheus server scraping ``targets`` every second, its data under ``home``."""

    def __init__(self, home: Path, targets: dict[str, int]) -> None:
        binary = shutil.which("prometheus")
        assert binary, "the prometheus server is missing: `make tools` installs it"
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        home.mkdir(parents=True, exist_ok=True)
        jobs = [{"job_name": role, "static_configs": [{"targets": [f"127.0.0.1:{port}"]}]}
                for role, port in targets.items()]
        config = home / "prometheus.yml"  # YAML is a superset of JSON
        config.write_text(json.dumps({
            "global": {"scrape_interval": "1s", "scrape_timeout": "900ms",
                       "evaluation_interval": "1s"},
            "scrape_configs": jobs,
        }))
        self.log = (home / "prometheus.log").open("ab")
        self.proc = subprocess.Popen(
            [binary, f"--config.file={config}", f"--storage.tsdb.path={home / 'data'}",
             f"--web.listen-address=127.0.0.1:{self.port}"],
            stdout=self.log, stderr=subprocess.STDOUT,
        )
        wait_for(lambda: answers(f"{self.url}/-/ready"), 60, "Prometheus to be ready")

    def query(self, promql: str) -> list[dict[str, Any]]:
        status, body = get(f"{self.url}/api/v1/query?" + urllib.parse.urlencode({"query": promql}))
        assert status == 200, body
        answer = json.loads(body)
        assert answer["status"] == "success", answer
        return answer["data"]["result"]  # type: ignore[no-any-return]

    def value(self, promql: str) -> float | None:
        """The single value of ``promql`` now, None while it has no series."""
        result = self.query(promql)
        assert len(result) <= 1, result
        return float(result[0]["value"][1]) if result else None

    def wait_value(self, promql: str, expected: float, timeout: float = 60) -> None:
        """Wait until ``promql`` is ``expected``, then assert it exactly."""
        wait_for(lambda: self.value(promql) == expected, timeout,
                 f"{promql} to be {expected}", interval=0.5)
        assert self.value(promql) == expected

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)
        self.log.close()


def requests(count: int) -> list[OperationRequested]:
    events = []
    for i in range(count):
        text = i % 4 == 3
        params: dict[str, object] = {"prompt": f"a lamp, take {i}"}
        if text:
            params["max_output_tokens"] = 64
        if i % 10 == 0:
            params["simulate"] = {"fail": True}
        events.append(OperationRequested(
            request_id=f"req-{i}", client_id=f"client-{i % 5}",
            operation_type="text_generation" if text else "image_generation",
            model="gemini-2.5-flash" if text else "gemini-2.5-flash-image", params=params))
    return events


@dataclass(frozen=True)
class Scraped:
    worker: WorkerProcess
    port: int  # its /metrics, /healthz and /readyz


@pytest.fixture
def workers(settings: Settings) -> Iterator[dict[str, Scraped]]:
    """A costs and a streams worker, each serving its metrics on its own port."""
    prepare_topics(settings)
    ports = {"costs": free_port(), "streams": free_port()}
    started = []
    try:
        for role in ("costs", "streams"):
            worker = WorkerProcess(settings, role).start(metrics_port=str(ports[role]))
            started.append(worker)
        for role, worker in zip(("costs", "streams"), started, strict=True):
            ready = f"http://127.0.0.1:{ports[role]}/readyz"

            def up(worker: WorkerProcess = worker, ready: str = ready) -> bool:
                assert worker.alive(), worker.log_tail()
                return answers(ready)

            wait_for(up, 120, f"the {role} worker's /readyz")
        yield {role: Scraped(worker, ports[role])
               for role, worker in zip(("costs", "streams"), started, strict=True)}
    finally:
        for worker in reversed(started):
            worker.stop()


@pytest.fixture
def prometheus(tmp_path: Path, workers: dict[str, Scraped]) -> Iterator[Prometheus]:
    server = Prometheus(tmp_path / "prometheus",
                        {role: scraped.port for role, scraped in workers.items()})
    yield server
    server.stop()


def test_prometheus_scrapes_exact_totals_from_both_workers(
    settings: Settings, workers: dict[str, Scraped], prometheus: Prometheus
) -> None:
    events = requests(COUNT)
    failed = sum(1 for e in events if e.params.get("simulate"))
    produce(settings, settings.topics.requested, events)
    produce_raw(settings, settings.topics.requested, [(b"client-x", b"{not json"),
                                                       (b"client-x", b"[]")])
    costs = workers["costs"].worker
    store = store_of(settings, costs)
    wait_recorded(store, COUNT, timeout=120, worker=costs)

    prometheus.wait_value('sum(up{job=~"costs|streams"})', 2)
    prometheus.wait_value('sum(aipipe_events_consumed_total{stage="admission"})', COUNT + 2)
    prometheus.wait_value('sum(aipipe_dead_letters_total{stage="admission"})', 2)
    prometheus.wait_value(
        'sum(aipipe_admission_decisions_total{decision="admitted",reason="admitted"})', COUNT)
    prometheus.wait_value('sum(aipipe_admission_decisions_total{decision="rejected"}) or vector(0)',
                          0)
    prometheus.wait_value(
        'sum(aipipe_events_produced_total{stage="admission",event_type="operation.admitted"})',
        COUNT)
    prometheus.wait_value('sum(aipipe_events_consumed_total{stage="generation"})', COUNT)
    prometheus.wait_value('sum(aipipe_operations_completed_total)', COUNT)
    prometheus.wait_value('sum(aipipe_operations_completed_total{success="false"})', failed)
    # the dashboard's spend: what ClickHouse holds, to a millionth of a dollar
    spend = float(sum(cost for _, cost in store.totals().values()))
    assert spend > 0
    wait_for(lambda: abs((prometheus.value("sum(aipipe_cost_usd_total)") or 0) - spend) < 1e-6,
             60, f"aipipe_cost_usd_total to be {spend}", interval=0.5)
    prometheus.wait_value('sum(aipipe_provider_calls_total{outcome="ok"})', COUNT)
    prometheus.wait_value('sum(aipipe_provider_call_duration_seconds_count)', COUNT)
    prometheus.wait_value('sum(aipipe_operations_in_flight)', 0)
    prometheus.wait_value('max(aipipe_circuit_state)', 0)
    prometheus.wait_value('sum(aipipe_events_consumed_total{stage="costs"})', COUNT)
    prometheus.wait_value('sum(aipipe_sink_rows_total{stage="costs"})', COUNT)
    assert prometheus.value('sum(aipipe_sink_batches_total{stage="costs"})') == \
        prometheus.value('sum(aipipe_sink_batch_duration_seconds_count{stage="costs"})')
    prometheus.wait_value('sum(aipipe_sink_write_retries_total) or vector(0)', 0)
    # every partition of both stages' topics is held by one worker and caught up
    streams_group = f"{settings.topic_prefix}-streams"
    prometheus.wait_value(
        f'count(aipipe_consumer_lag_messages{{group="{streams_group}",'
        f'topic="{settings.topics.requested}"}})', settings.partitions)
    prometheus.wait_value(f'sum(aipipe_consumer_lag_messages{{group="{streams_group}"}})', 0)
    prometheus.wait_value(
        f'count(aipipe_consumer_lag_messages{{group="{settings.topic_prefix}-costs"}})',
        settings.partitions)
    prometheus.wait_value(
        f'sum(aipipe_consumer_lag_messages{{group="{settings.topic_prefix}-costs"}})', 0)

    for scraped in workers.values():
        for path in ("/healthz", "/readyz"):
            status, body = get(f"http://127.0.0.1:{scraped.port}{path}")
            assert status == 200, body

    # the same workers serve the docker-compose dashboard's check (no second start-up)
    assert_dashboard_queries_only_exported_metrics(workers, prometheus)


def test_a_stalled_admission_task_fails_healthz_naming_it(settings: Settings) -> None:
    prepare_topics(settings)
    port, stall = free_port(), 3.0
    base = f"http://127.0.0.1:{port}"
    worker = WorkerProcess(settings, "streams").start(
        metrics_port=str(port), health_stall_seconds=str(stall), fault="admission_stall@2")
    try:
        def ready() -> bool:
            assert worker.alive(), worker.log_tail()
            return answers(f"{base}/readyz")

        wait_for(ready, 120, "the streams worker's /readyz")
        first, second = requests(2)
        produce(settings, settings.topics.requested, [first])
        assert len(consume(settings, settings.topics.admitted, 1)) == 1
        status, body = get(f"{base}/healthz")
        assert status == 200, body
        assert json.loads(body)["parts"]["admission"]["state"] == "idle"

        produce(settings, settings.topics.requested, [second])  # its batch never ends
        produced = time.monotonic()
        wait_for(lambda: get(f"{base}/healthz")[0] == 503, stall + 20,
                 "/healthz to fail while admission is stalled")
        # not before the stated time: the batch began after the request was produced
        assert time.monotonic() - produced >= stall
        status, body = get(f"{base}/healthz")
        answer = json.loads(body)
        assert (status, answer["status"], answer["stalled"]) == (503, "stalled", ["admission"])
        assert answer["parts"]["admission"]["seconds"] > stall
        assert answer["parts"]["generation"]["state"] in ("idle", "ok")
        status, body = get(f"{base}/readyz")  # alive is what failed; it is still ready
        assert status == 200, body
        assert worker.alive()
    finally:
        worker.stop()


# -- the docker-compose dashboard (infra/grafana) against what the workers export ------------

#: Grafana's own variables, as Grafana would expand them, so that Prometheus can parse them
GRAFANA_VARIABLES = {"$__rate_interval": "1m", "$__interval": "1m", "$__range": "1h"}
#: what is not a metric name in PromQL: strings, label matchers, ranges, grouping label lists
_NOT_NAMES = re.compile(r'"(?:\\.|[^"\\])*"|\{[^}]*\}|\[[^\]]*\]'
                        r"|\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)")
_IDENTIFIER = re.compile(r"\b([a-zA-Z_:][a-zA-Z0-9_:]*)\b(?!\s*\()")  # not a function's
_KEYWORDS = {"and", "or", "unless", "bool", "offset", "inf", "nan", "by", "without", "on",
             "ignoring", "group_left", "group_right"}
#: the sample names of each metric type, from the name its TYPE line gives
_SUFFIXES = {"counter": ("_total",), "histogram": ("_bucket", "_sum", "_count"),
             "summary": ("", "_sum", "_count"), "gauge": ("",), "untyped": ("",)}


def dashboard_expressions(dashboard: dict[str, Any]) -> list[str]:
    """Every PromQL expression of the dashboard's panels (rows' nested panels included)."""
    found = []
    for panel in dashboard["panels"]:
        found += [target["expr"] for target in panel.get("targets", [])]
        found += dashboard_expressions({"panels": panel.get("panels", [])})
    return found


def metric_names(promql: str) -> set[str]:
    """The metric names ``promql`` selects."""
    bare = _NOT_NAMES.sub(" ", promql)
    return {name for name in _IDENTIFIER.findall(bare) if name.lower() not in _KEYWORDS}


def exported_names(ports: list[int]) -> set[str]:
    """The sample names each metric family of these workers' /metrics may have (a family
    with labels shows its TYPE line before its first sample)."""
    names = set()
    for port in ports:
        status, body = get(f"http://127.0.0.1:{port}/metrics")
        assert status == 200, body
        for line in body.decode().splitlines():
            if line.startswith("# TYPE "):
                _, _, name, kind = line.split()
                base = name.removesuffix("_total") if kind == "counter" else name
                names |= {base + suffix for suffix in _SUFFIXES[kind]}
    return names


def test_metric_names_are_parsed_from_promql() -> None:
    assert metric_names(
        'histogram_quantile(0.95, sum by (le, model) (rate(a_seconds_bucket{x="y(z)"}[5m])))'
        " / on (model) group_left b_total offset 5m or vector(0)") == {"a_seconds_bucket",
                                                                        "b_total"}


def assert_dashboard_queries_only_exported_metrics(
    workers: dict[str, Scraped], prometheus: Prometheus
) -> None:
    """Every expression of infra/grafana's dashboard selects only metrics these workers'
    /metrics have, and Prometheus parses it."""
    expressions = dashboard_expressions(json.loads(DASHBOARD.read_text()))
    assert len(expressions) == 20
    exported = exported_names([scraped.port for scraped in workers.values()])
    assert "aipipe_cost_usd_total" in exported and "aipipe_consumer_lag_messages" in exported
    for expr in expressions:
        names = metric_names(expr)
        assert names, expr
        assert names <= exported, (expr, names - exported)
        for variable, value in GRAFANA_VARIABLES.items():
            expr = expr.replace(variable, value)
        assert "$" not in expr, expr
        prometheus.query(expr)  # asserts HTTP 200 and status "success": Prometheus parses it
    # the scrape config docker-compose mounts is one Prometheus accepts
    check = subprocess.run(["promtool", "check", "config", str(INFRA / "prometheus" /
                                                                "prometheus.yml")],
                           capture_output=True, text=True, timeout=60)
    assert check.returncode == 0, check.stdout + check.stderr
