"""How a command's process ends once chDB has run in it.

chDB's teardown at exit sometimes waits forever on a mutex of its own, even after every
client was closed: ``aipipe sql`` on an embedded path hung at exit in 2 of 25 runs
(chdb 4.4.0, chdb-core 26.9.0; the main thread in ``exit()``'s handlers, inside
``_chdb.abi3.so``). So a process that loaded chDB flushes what it must (its output,
Sentry's queue, the tracer's spans) and ends with ``os._exit``, as a worker does
(``end_now``, as the workers end). Callers close what they opened first.
"""

from __future__ import annotations

import contextlib
import os
import sys
from typing import NoReturn


def flush_reports(timeout: float = 5.0) -> None:
    """Send what Sentry and the tracer have queued (when loaded) and flush the output."""
    if "sentry_sdk" in sys.modules:
        import sentry_sdk

        sentry_sdk.flush(timeout=timeout)
    tracing = sys.modules.get("aipipe.infra.tracing")
    if tracing is not None:
        tracing.flush_traces(timeout)
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(OSError, ValueError):  # a closed pipe: nothing more to say
            stream.flush()


def end_now(code: int) -> NoReturn:
    """Flush the reports, then end the process with ``code`` at once.

    No interpreter or C exit handlers run: they could wait on a thread stuck in a broken
    engine, and chDB's own handlers at exit sometimes hang or crash even after a clean
    stop. Call it only when every consumer, producer and server has been closed.
    """
    flush_reports()
    os._exit(code)


def leave(code: int) -> NoReturn:
    """End the process with ``code``: through ``sys.exit`` unless chDB is loaded, else
    through ``end_now``."""
    if "chdb" not in sys.modules:
        sys.exit(code)
    end_now(code)


def exit_code(exc: SystemExit) -> int:
    """The status ``sys.exit(...)`` asked for; a message (``sys.exit("...")``) is printed,
    as the interpreter would, and ends with 1."""
    if exc.code is None:
        return 0
    if isinstance(exc.code, int):
        return exc.code
    print(exc.code, file=sys.stderr)
    return 1
