"""Free loopback ports for services a test or benchmark starts itself."""

from __future__ import annotations

import random
import socket
from contextlib import ExitStack


def free_base_port(host: str = "127.0.0.1", count: int = 6) -> int:
    """A port such that it and the ``count - 1`` after it are free now."""
    for _ in range(200):
        base = random.randrange(20_000, 60_000, 2)
        with ExitStack() as stack:
            try:
                for port in range(base, base + count):
                    stack.enter_context(socket.socket()).bind((host, port))
            except OSError:
                continue
            return base
    raise RuntimeError("no free run of loopback ports found")
