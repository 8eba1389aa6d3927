"""The garbage collector of a worker and of ``aipipe replay``: young collections every
``GC_YOUNG_THRESHOLD`` net allocations (README, Benchmarks: what the interpreter's default
cost a burst), the older generations' thresholds left as the interpreter has them."""

from __future__ import annotations

import subprocess
import sys

from aipipe.infra.gc_tuning import GC_YOUNG_THRESHOLD


def test_a_worker_collects_young_objects_less_often_and_keeps_the_other_thresholds() -> None:
    # in a process of its own: the test process's collector stays as it is
    out = subprocess.run(
        [sys.executable, "-c",
         "import gc; gc.set_threshold(700, 12, 13); from aipipe.infra.gc_tuning import tune_gc; "
         "tune_gc(); print(*gc.get_threshold())"],
        capture_output=True, text=True, check=True, timeout=120).stdout.split()
    assert [int(n) for n in out] == [GC_YOUNG_THRESHOLD, 12, 13]
    assert GC_YOUNG_THRESHOLD > 700
