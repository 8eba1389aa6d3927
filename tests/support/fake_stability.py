"""A local fake of Stability's Stable Image REST endpoints (v2beta generate).

``StabilityProvider`` talks to it through ``base_url`` (``AIPIPE_STABILITY_BASE_URL``). It
parses the multipart form the client sends, records it, and answers the image bytes
(a real PNG, ``image_bytes(prompt)``) with ``finish-reason`` and ``seed`` headers, or a
scripted error as Stability writes them (``{"id", "name", "errors"}``).

Endpoints (``kind``): ``ultra``, ``core``, ``sd3`` under ``/v2beta/stable-image/generate/``.
"""

from __future__ import annotations

import time
import uuid
from email.parser import BytesParser
from email.policy import HTTP
from http.server import BaseHTTPRequestHandler
from typing import Any

import orjson

from aipipe.streams.generation.png import solid_png
from tests.support.fake_openai import Recorded, Scripted

ERROR_NAMES = {400: "bad_request", 401: "unauthorized", 403: "content_moderation",
               404: "not_found", 429: "rate_limit_exceeded", 500: "internal_error",
               503: "service_unavailable"}


def image_bytes(prompt: str) -> bytes:
    return solid_png(f"stability/{prompt}".encode())


def form_fields(content_type: str, raw: bytes) -> dict[str, str]:
    """The fields of a multipart/form-data body (files as their text)."""
    message = BytesParser(policy=HTTP).parsebytes(
        f"Content-Type: {content_type}\r\n\r\n".encode() + raw)
    fields: dict[str, str] = {}
    for part in message.iter_parts():
        name = part.get_param("name", header="content-disposition")
        payload = part.get_payload(decode=True)
        if isinstance(name, str):
            fields[name] = payload.decode() if isinstance(payload, bytes) else ""
    return fields


class FakeStability(Scripted):
    """Start with ``with FakeStability() as fake:``; ``fake.base_url`` goes to the provider."""

    def __init__(self) -> None:
        self.filtered: set[str] = set()  # prompts answered CONTENT_FILTERED
        super().__init__(self._handler())

    @property
    def base_url(self) -> str:
        return f"http://{self.address}"

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                raw = self.rfile.read(length) if length else b""
                path = self.path.split("?")[0]
                prefix = "/v2beta/stable-image/generate/"
                kind = path.removeprefix(prefix) if path.startswith(prefix) else "other"
                form = form_fields(self.headers.get("Content-Type", ""), raw)
                status = fake.status_for(kind) if kind in ("ultra", "core", "sd3") else 404
                headers = {k.lower(): v for k, v in self.headers.items()}
                fake.record(Recorded(self.command, path, kind, headers,
                                     form, status, time.monotonic()))
                if status != 200:
                    body = orjson.dumps({"id": uuid.uuid4().hex,
                                         "name": ERROR_NAMES.get(status, "error"),
                                         "errors": [f"fake {kind} answered {status}"]})
                    self.send_response(status)
                    self.send_header("Content-Type", "application/json")
                else:
                    prompt = form.get("prompt", "")
                    body = image_bytes(prompt)
                    self.send_response(200)
                    self.send_header("Content-Type", "image/png")
                    self.send_header("finish-reason", "CONTENT_FILTERED"
                                     if prompt in fake.filtered else "SUCCESS")
                    self.send_header("seed", "1234")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *_: Any) -> None:
                pass

        return Handler
