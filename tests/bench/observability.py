"""The cost of observability: the burst end to end with traces and metrics on vs off.

The burst's pipeline run (``tests.bench.burst.pipeline_burst``: ``N`` pre-produced
requests, one ``aipipe run all`` worker, 0 ms simulated provider, chDB, exact row count
checked) once per side per round, in the orders of ``tests.bench.report.round_order``
(over six rounds each side runs first twice and right after each other side twice):

- **on**: ``OTEL_TRACES_EXPORTER=otlp`` to an OTLP/HTTP receiver in this process (a span
  per hop of every request, batched and exported as in production), and Prometheus
  metrics served on a port (``AIPIPE_METRICS_PORT``);
- **off**: no ``OTEL_*`` and ``AIPIPE_METRICS_PORT=0``.

- **on, sampled**: as on, with ``OTEL_TRACES_SAMPLER=parentbased_traceidratio`` and
  ``OTEL_TRACES_SAMPLER_ARG`` (``--ratio``, 0.1 by default): what a busy deployment
  would run; every request still carries its trace context, a tenth are recorded.

The figures are end-to-end operations/s on (and on, sampled) against off (goal at least
0.9 times); the receiver's span count shows that tracing was on (the worker exports the
spans of every stage).

Run alone: ``python -m tests.bench.observability --count 10000 --rounds 6``; with
``--no-every`` the sampled side and off only (two sides alternate, so a pair of rounds
is two runs back to back).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from aipipe.infra.settings import Settings
from tests.bench.burst import pipeline_burst
from tests.bench.report import Figure, Sample, best_of, compare
from tests.bench.settings import bench_settings
from tests.e2e.test_metrics import free_port
from tests.support.otlp import OtlpReceiver

Say = Callable[[str], None]


def observed(settings: Settings, endpoint: str) -> Settings:
    """Traces exported over OTLP/HTTP to ``endpoint`` and metrics served on a free port."""
    return settings.model_copy(update={
        "otel_traces_exporter": "otlp", "otel_exporter_otlp_endpoint": endpoint,
        "otel_sdk_disabled": False, "metrics_port": free_port()})


def unobserved(settings: Settings) -> Settings:
    return settings.model_copy(update={
        "otel_traces_exporter": "none", "otel_exporter_otlp_endpoint": "",
        "otel_exporter_otlp_traces_endpoint": "", "metrics_port": 0})


@contextmanager
def sampled(ratio: float | None) -> Iterator[None]:
    """The workers started in the block sample ``ratio`` of new traces (the SDK's variables,
    which the workers inherit from this process's environment)."""
    names = ("OTEL_TRACES_SAMPLER", "OTEL_TRACES_SAMPLER_ARG")
    saved = {name: os.environ.get(name) for name in names}
    if ratio is not None:
        os.environ.update({names[0]: "parentbased_traceidratio", names[1]: str(ratio)})
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def bench_observability(settings: Settings, say: Say, count: int = 10_000,
                        rounds: int = 2, ratio: float = 0.1, every: bool = True) -> list[Figure]:
    """``every``: also the side that records every trace (False: the sampled side and off
    only, so that more rounds fit in the same time and each pair of them runs back to
    back)."""
    say(f"[bold]observability[/bold]: {count:,} requests end to end, traces and metrics "
        f"on ({'every trace, and ' if every else ''}{ratio:g} of them) vs off, {rounds} "
        "round(s) each")
    counter = OtlpReceiver(keep=False)  # counts the spans it is sent
    on_sides = ("on", "on, sampled") if every else ("on, sampled",)
    spans: dict[str, list[int]] = {side: [] for side in on_sides}
    cpu: dict[str, list[float]] = {side: [] for side in (*on_sides, "off")}

    def run(side: str, target: Settings, sampling: float | None = None) -> Sample:
        before = counter.count
        with sampled(sampling):
            rates = pipeline_burst(target, count, say)
        cpu[side].append(rates["cpu_ms_per_operation"])
        if side in spans:
            spans[side].append(counter.count - before)
        say(f"    {side:<11} end to end {rates['end_to_end']:>8,.0f} /s, worker CPU "
            f"{rates['cpu_ms_per_operation']:.2f} ms per operation")
        # per CPU-second of the worker and its span export helper
        return Sample(rates["end_to_end"], 1000 / rates["cpu_ms_per_operation"])

    sides: dict[str, Callable[[int], Sample]] = {
        "on": lambda r: run("on", observed(settings, counter.endpoint)),
        "on, sampled": lambda r: run("on, sampled", observed(settings, counter.endpoint),
                                     ratio),
        "off": lambda r: run("off", unobserved(settings)),
    }
    with counter:
        samples = best_of(rounds, {side: sides[side] for side in (*on_sides, "off")}, say,
                          "ops/s")
    # a span per hop of every request when every trace is recorded; about the ratio of
    # them when sampled (the exporter may still hold the last batch when the worker stops)
    if (every and min(spans["on"]) < count) or min(spans["on, sampled"]) < 1:
        raise AssertionError(f"tracing was not on: spans received per round {spans} for "
                             f"{count:,} requests")
    say(f"    spans received per traced round: {spans}")
    # each round's sides ran minutes apart, not hours: their ratio cancels the machine's
    # slow drifts, and the median of them is steadier than the best rounds' ratio
    paired = {side: [round(on.per_second / off.per_second, 3)
                     for on, off in zip(samples[side], samples["off"], strict=True)]
              for side in on_sides}
    for side, ratios in paired.items():
        say(f"    {side:<11} vs off, round by round: {', '.join(f'{r:.2f}x' for r in ratios)}"
            f" (median {statistics.median(ratios):.2f}x)")
    method = (f"{count:,} requests produced before one `aipipe run all` worker starts (the "
              "burst's run: every request admitted, 0 ms provider, chDB, exact rows "
              "checked); on: OTEL_TRACES_EXPORTER=otlp to an OTLP/HTTP receiver in the bench "
              "process and /metrics served; off: no exporter, AIPIPE_METRICS_PORT=0; same "
              "run, rotating order, best round of each")
    notes = {"count": count, "sampler_ratio": ratio, "spans_per_traced_round": spans,
             **{f"round_ratios_{side.replace(', ', '_')}": ratios
                for side, ratios in paired.items()},
             **{f"median_round_ratio_{side.replace(', ', '_')}": statistics.median(ratios)
                for side, ratios in paired.items()},
             **{f"worker_cpu_ms_per_operation_{side.replace(', ', '_')}":
                [round(c, 2) for c in values] for side, values in cpu.items()}}
    figures = [
        compare("end to end operations/s, traces (every one) + metrics on vs off", "ops/s",
                0.9, method, samples["on"], samples["off"], notes),
    ] if every else []
    figures.append(compare(
        f"end to end operations/s, traces ({ratio:g} sampled) + metrics on vs off", "ops/s",
        0.9, method + f"; on, sampled: OTEL_TRACES_SAMPLER=parentbased_traceidratio, "
        f"OTEL_TRACES_SAMPLER_ARG={ratio:g}", samples["on, sampled"], samples["off"], notes))
    return figures


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.bench.observability")
    parser.add_argument("--count", type=int, default=10_000)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--ratio", type=float, default=0.1)
    parser.add_argument("--no-every", dest="every", action="store_false",
                        help="skip the side that records every trace")
    args = parser.parse_args(argv)
    for f in bench_observability(bench_settings(), print, args.count, args.rounds, args.ratio,
                                 args.every):
        print(f"{f.metric}: {f.ours:,.0f} {f.unit} vs {f.baseline:,.0f} ({f.ratio:.2f}x)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
