"""The settings every benchmark starts from: the environment's, with no metrics port.

Workers a benchmark starts would otherwise all serve ``/metrics`` on the default port,
and fail at start when a worker already running on this machine holds it.
"""

from __future__ import annotations

from aipipe.infra.settings import Settings, load_settings


def bench_settings() -> Settings:
    return load_settings().model_copy(update={"metrics_port": 0})
