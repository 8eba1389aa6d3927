"""The span export helper a traced worker runs beside itself (``aipipe.infra.span_export``).

``python -m aipipe.span_helper EXPORTERS ANSWERS_FD``: reads the spans the worker hands
over on stdin and exports them, logging as the worker does (JSON lines in production). It
ignores ``SIGINT`` and ``SIGTERM`` (a terminal's ^C, a process group's TERM reach it with
the worker, whose last spans it must still export) and ends when its stdin closes.
"""

from __future__ import annotations

import logging
import signal
import sys
from collections.abc import Sequence
from typing import Any

from aipipe.infra.logging import configure_logging
from aipipe.infra.settings import load_settings
from aipipe.infra.span_export import HandOff, serve


def hand_off(resource: Any, exporters: str) -> HandOff:
    """The worker's span processor, running this module as its helper."""
    return HandOff(resource, exporters, [sys.executable, "-m", __name__])


def main(argv: Sequence[str]) -> int:
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, signal.SIG_IGN)
    try:
        configure_logging(load_settings())
    except Exception:  # settings the worker accepted; never lose the spans over a log format
        logging.basicConfig()
    exporters, answers = argv
    serve(exporters, int(answers), sys.stdin.buffer)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
