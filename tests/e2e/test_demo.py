"""`make demo`'s command, run as a user runs it, twice in a row on the same home."""

from __future__ import annotations

import subprocess
import sys

import pytest

from aipipe.infra.settings import Settings

pytestmark = pytest.mark.e2e


def test_the_demo_records_every_operation_and_runs_again(settings: Settings) -> None:
    env = {**settings.to_env(), "PATH": "/usr/bin:/bin"}
    for _ in range(2):
        out = subprocess.run(
            [sys.executable, "-m", "aipipe", "demo", "--operations", "40", "--clients", "3"],
            env=env, capture_output=True, text=True, timeout=300,
        )
        assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
        assert "totals equal the produced sum exactly" in out.stdout
        assert "│ all clients │         40 │" in out.stdout
