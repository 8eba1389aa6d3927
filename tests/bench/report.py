"""What a benchmark returns, how it is compared (best of N, alternating order) and shown."""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

TIMES = "\N{MULTIPLICATION SIGN}"


@dataclass
class Figure:
    """One line of the report: our path against a raw baseline measured in the same run."""

    metric: str
    unit: str
    ours: float
    baseline: float
    goal: float | None  # the minimum ratio; None for an informational line
    method: str
    rounds_ours: list[float] = field(default_factory=list)
    rounds_baseline: list[float] = field(default_factory=list)
    # per process-CPU-second (this process's threads, chDB and librdkafka included):
    # steadier than wall time when other processes share the cores
    cpu_ours: float | None = None
    cpu_baseline: float | None = None
    notes: dict[str, Any] = field(default_factory=dict)

    @property
    def ratio(self) -> float:
        return self.ours / self.baseline if self.baseline else 0.0

    @property
    def cpu_ratio(self) -> float | None:
        if self.cpu_ours is None or not self.cpu_baseline:
            return None
        return self.cpu_ours / self.cpu_baseline

    @property
    def passed(self) -> bool | None:
        return None if self.goal is None else self.ratio >= self.goal

    def to_json(self) -> dict[str, Any]:
        cpu_ratio = self.cpu_ratio
        return {
            **asdict(self),
            "ratio": round(self.ratio, 4),
            "cpu_ratio": None if cpu_ratio is None else round(cpu_ratio, 4),
            "passed": self.passed,
        }


def rate(count: int, seconds: float) -> float:
    return count / seconds if seconds > 0 else 0.0


@dataclass(frozen=True)
class Sample:
    """One measured round: items per wall second and per process-CPU second."""

    per_second: float
    per_cpu_second: float


class Stopwatch:
    """Wall and process-CPU time of a block: ``with Stopwatch() as sw: ...; sw.sample(n)``."""

    def __enter__(self) -> Stopwatch:
        self.wall, self.cpu = time.perf_counter(), time.process_time()
        return self

    def __exit__(self, *exc: object) -> None:
        self.wall = time.perf_counter() - self.wall
        self.cpu = time.process_time() - self.cpu

    def sample(self, count: int) -> Sample:
        return Sample(rate(count, self.wall), rate(count, self.cpu))


def round_order(names: list[str], r: int) -> list[str]:
    """The order of the sides in round ``r``: over ``2 * len(names)`` rounds each goes first
    as often as the others, and (with two or three sides, as the benches have) each
    follows each other side as often.

    The first ``len(names)`` rounds rotate the list, the next rotate it reversed. Rotation
    alone puts the same side after the same other side in every round (with three sides,
    the second always after the first): a side that leaves work behind it (a broker
    deleting its topics, spans still arriving at a receiver) then slows down the same
    neighbour every time.
    """
    cycle, shift = divmod(r % (2 * len(names)), len(names))
    base = names if cycle == 0 else names[::-1]
    return base[shift:] + base[:shift]


def best_of(
    rounds: int,
    sides: dict[str, Callable[[int], Sample]],
    say: Callable[[str], None],
    unit: str,
) -> dict[str, list[Sample]]:
    """Run every side ``rounds`` times, in the orders of ``round_order``.

    Each side is a function of the round number returning its sample; the best round of
    each side is what the report compares (the one least disturbed by the other
    processes sharing the cores).
    """
    names = list(sides)
    samples: dict[str, list[Sample]] = {name: [] for name in names}
    for r in range(rounds):
        for name in round_order(names, r):
            sample = sides[name](r)
            samples[name].append(sample)
            say(
                f"    round {r + 1}/{rounds} {name:<16} {sample.per_second:>12,.0f} {unit}"
                f"  [dim]({sample.per_cpu_second:,.0f} per CPU-second)[/dim]"
            )
    return samples


def compare(
    metric: str,
    unit: str,
    goal: float | None,
    method: str,
    ours: list[Sample],
    baseline: list[Sample],
    notes: dict[str, Any],
) -> Figure:
    """The figure from both sides' rounds: the best wall rate of each, and best CPU rate."""
    return Figure(
        metric=metric,
        unit=unit,
        ours=max(s.per_second for s in ours),
        baseline=max(s.per_second for s in baseline),
        goal=goal,
        method=method,
        rounds_ours=[round(s.per_second, 1) for s in ours],
        rounds_baseline=[round(s.per_second, 1) for s in baseline],
        cpu_ours=max(s.per_cpu_second for s in ours),
        cpu_baseline=max(s.per_cpu_second for s in baseline),
        notes=notes,
    )


class Steps:
    """One console line per step, with its duration, so a slow step is visible as it runs."""

    def __init__(self, console: Console) -> None:
        self.console = console
        self.started = time.monotonic()

    def say(self, text: str) -> None:
        elapsed = time.monotonic() - self.started
        self.console.print(f"[dim]{elapsed:6.1f}s[/dim] {text}", highlight=False, soft_wrap=True)


def render(figures: Sequence[Figure], console: Console, title: str) -> None:
    table = Table(title=title)
    for name, justify in (
        ("metric", "left"), ("ours", "right"), ("baseline", "right"),
        ("ratio", "right"), ("goal", "right"), ("result", "center"), ("CPU ratio", "right"),
    ):
        table.add_column(name, justify=justify)  # type: ignore[arg-type]
    for f in figures:
        verdict = {True: "[green]PASS[/green]", False: "[red]FAIL[/red]", None: "[dim]info[/dim]"}
        table.add_row(
            f.metric,
            f"{f.ours:,.0f} {f.unit}",
            f"{f.baseline:,.0f} {f.unit}",
            f"{f.ratio:.2f}{TIMES}",
            f"≥ {f.goal:g}{TIMES}" if f.goal is not None else "—",
            verdict[f.passed],
            f"[dim]{f.cpu_ratio:.2f}{TIMES}[/dim]" if f.cpu_ratio is not None else "—",
        )
    console.print(table)


def write_json(path: Path, figures: Sequence[Figure], meta: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    body = {**meta, "results": [f.to_json() for f in figures]}
    path.write_text(json.dumps(body, indent=2, default=str) + "\n")
