"""A raw HTTP server on a real local socket, for clients that meet a broken or hostile peer:
answers that drip, never end, lie about their size, or hang up."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

T = TypeVar("T")
#: what the server does with one connection, given the request's head (the body is read)
Handler = Callable[[bytes, asyncio.StreamWriter], Awaitable[None]]


def canned(answer: bytes, drip: bytes = b"", every: float = 0.1, hold: float = 30.0) -> Handler:
    """Write ``answer``, then ``drip`` one byte every ``every`` seconds, then keep the
    connection open for ``hold`` seconds (a body that never comes)."""
    async def handle(head: bytes, writer: asyncio.StreamWriter) -> None:
        writer.write(answer)
        for byte in drip:
            await writer.drain()
            writer.write(bytes([byte]))
            await asyncio.sleep(every)
        await writer.drain()
        await asyncio.sleep(hold)

    return handle


def run_against(handle: Handler, call: Callable[[str], Awaitable[T]],
                catch: tuple[type[Exception], ...] = ()) -> tuple[T | Any, float]:
    """``call(base_url)`` against a server on 127.0.0.1 whose every connection is read
    (the request's head, and its body by Content-Length) and then ``handle``d: what the
    call returned, or the exception of ``catch`` it raised, and how long it took."""
    async def go() -> tuple[T | Any, float]:
        async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            try:
                head = await reader.readuntil(b"\r\n\r\n")
                length = next((int(line.split(b":")[1]) for line in head.split(b"\r\n")
                               if line.lower().startswith(b"content-length:")), 0)
                await reader.readexactly(length)
                await handle(head, writer)
            except (ConnectionError, asyncio.IncompleteReadError, asyncio.CancelledError):
                pass  # the client hung up: what it should do with a peer like this
            finally:
                writer.close()

        server = await asyncio.start_server(serve, "127.0.0.1", 0)
        loop = asyncio.get_running_loop()
        started = loop.time()
        try:
            return await call(f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"), \
                loop.time() - started
        except catch as exc:
            return exc, loop.time() - started
        finally:
            server.close()

    return asyncio.run(go())
