"""How a command's process ends once chDB has run in it.

chDB's teardown at exit sometimes waits forever on a mutex of its own, even after every
client was closed: ``aipipe sql`` on an embedded path hung at exit in 2 of 25 runs
(chdb 4.4.0, chdb-core 26.9.0; the main thread in ``exit()``'s handlers, inside
``_chdb.abi3.so``). So a process that loaded chDB flushes what it must (its output,
Sentry's queue, the tracer's spans) and ends with ``os._exit``, as a worker does
(``aipipe.infra.supervise.end_process``). Callers close what they opened first.
"""

from __future__ import annotations

import contextlib
import os
import sys
from typing import NoReturn


def leave(code: int) -> NoReturn:
    """End the process with ``code``: through ``sys.exit`` unless chDB is loaded, else at
    once after the flushes (no interpreter or C exit handlers)."""
    if "chdb" not in sys.modules:
        sys.exit(code)
    if "sentry_sdk" in sys.modules:
        import sentry_sdk

        sentry_sdk.flush(timeout=5.0)
    tracing = sys.modules.get("aipipe.infra.tracing")
    if tracing is not None:
        tracing.flush_traces(5.0)
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(OSError, ValueError):  # a closed pipe: nothing more to say
            stream.flush()
    os._exit(code)


def exit_code(exc: SystemExit) -> int:
    """The status ``sys.exit(...)`` asked for; a message (``sys.exit("...")``) is printed,
    as the interpreter would, and ends with 1."""
    if exc.code is None:
        return 0
    if isinstance(exc.code, int):
        return exc.code
    print(exc.code, file=sys.stderr)
    return 1
