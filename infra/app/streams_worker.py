"""The streams role: the faust worker (admission and generation), with the budget store
opened through the program's reader. Loads no chDB: budgets are read from a ClickHouse
server or the owning process's read endpoint (``aipipe.reader``).
"""

from __future__ import annotations

import signal
from contextlib import AbstractContextManager, suppress
from typing import Any

from faust import Worker

from aipipe.infra.logging import stdlib_logging_config
from aipipe.infra.settings import Settings
from aipipe.reader import budget_store_opener
from aipipe.streams.app import create_app, default_deps


def _stop_on_sigterm(*_: Any) -> None:
    raise SystemExit(0)  # until faust installs its own handler: stop, then exit_if_failed


def run_streams(settings: Settings, alongside: AbstractContextManager[Any] | None = None) -> None:
    """Run the faust worker until it stops; with ``alongside`` (the costs role's threads,
    for ``aipipe run all``), inside that context."""
    app = create_app(settings, default_deps(settings, budget_store_opener(settings)))
    # faust (mode) sets logging up again at start: with our handler, so its lines are JSON too
    worker = Worker(app, loglevel=settings.log_level if settings.log_level != "info" else "warning",
                    logging_config=stdlib_logging_config(settings))
    # faust's progress spinner sets the root logger to DEBUG so that it turns on every
    # record: every aiokafka send then builds a debug record (~8 % of a busy worker)
    worker.spinner = None
    if alongside is None:
        worker.execute_from_commandline()
        return
    signal.signal(signal.SIGTERM, _stop_on_sigterm)
    with alongside, suppress(SystemExit):
        worker.execute_from_commandline()
