"""A local HTTP endpoint that receives Sentry envelopes, for tests of error reporting.

Point ``SENTRY_DSN`` at ``fake.dsn``; every envelope the SDK posts is decoded (gzip or
plain) and its error events are kept in ``fake.events``.
"""

from __future__ import annotations

import gzip
import threading
import zlib
from http.server import BaseHTTPRequestHandler
from typing import Any

import orjson

from tests.support.loopback import LoopbackServer


def parse_envelope(data: bytes) -> list[tuple[dict[str, Any], Any]]:
    """The items of one envelope: (item header, payload), payloads JSON where they parse."""
    lines = data.split(b"\n")
    items: list[tuple[dict[str, Any], Any]] = []
    i = 1  # line 0 is the envelope header
    while i < len(lines):
        if not lines[i].strip():
            i += 1
            continue
        header = orjson.loads(lines[i])
        length = header.get("length")
        if length is not None:
            rest = b"\n".join(lines[i + 1:])
            payload_bytes, remainder = rest[:length], rest[length + 1:]
            lines = [b"", *remainder.split(b"\n")]
            i = 1
        else:
            payload_bytes = lines[i + 1] if i + 1 < len(lines) else b""
            i += 2
        try:
            payload: Any = orjson.loads(payload_bytes)
        except orjson.JSONDecodeError:
            payload = payload_bytes
        items.append((header, payload))
    return items


class FakeSentry(LoopbackServer):
    def __init__(self) -> None:
        self.events: list[dict[str, Any]] = []
        self._lock = threading.Lock()
        super().__init__(self._handler())

    @property
    def dsn(self) -> str:
        return f"http://publickey@{self.address}/42"

    def received(self) -> list[dict[str, Any]]:
        with self._lock:
            return list(self.events)

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                raw = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                encoding = (self.headers.get("Content-Encoding") or "").lower()
                if encoding == "gzip":
                    raw = gzip.decompress(raw)
                elif encoding == "deflate":
                    raw = zlib.decompress(raw)
                events = [p for h, p in parse_envelope(raw)
                          if h.get("type") == "event" and isinstance(p, dict)]
                with fake._lock:
                    fake.events.extend(events)
                self.send_response(200)
                self.send_header("Content-Length", "2")
                self.end_headers()
                self.wfile.write(b"{}")

            def log_message(self, *_: Any) -> None:
                pass

        return Handler
