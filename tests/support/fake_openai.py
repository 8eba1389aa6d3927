"""A local fake of the OpenAI REST endpoints the ``openai`` SDK calls for aipipe.

The real SDK talks to it through ``base_url`` (``AIPIPE_OPENAI_BASE_URL`` for workers), so
request shapes are the SDK's own. It records every request and can be scripted: statuses
to return next per endpoint, or an endpoint that is down until it recovers.

Endpoints (``kind`` in the scripts):
- ``images``: ``POST /v1/images/generations``, answering real PNG bytes as ``b64_json``
  and, for GPT Image models, ``usage`` (``prompt_tokens(prompt)`` in, ``IMAGE_TOKENS`` per
  image out)
- ``chat``: ``POST /v1/chat/completions``, answering ``ANSWER`` with ``prompt_tokens`` and
  ``text_tokens`` as usage
"""

from __future__ import annotations

import base64
import math
import threading
import time
import uuid
from collections import defaultdict, deque
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler
from typing import Any

import orjson

from aipipe.streams.generation.png import solid_png
from tests.support.loopback import LoopbackServer

IMAGE_TOKENS = 1056  # gpt-image-1, 1024x1024 at medium quality
ANSWER = "A lighthouse keeps its light by night."


@dataclass(frozen=True)
class Recorded:
    method: str
    path: str
    kind: str
    headers: dict[str, str]
    body: dict[str, Any]
    status: int
    at: float


def prompt_tokens(text: str) -> int:
    """What the fake reports for a prompt: ceil(len / 4), stated for tests."""
    return math.ceil(len(text) / 4)


def image_bytes(prompt: str, index: int) -> bytes:
    """The PNG the fake returns for ``prompt``'s image ``index`` (tests compare hashes)."""
    return solid_png(f"{prompt}/{index}".encode())


class Scripted(LoopbackServer):
    """Scripting shared by the REST fakes: statuses per endpoint kind, requests recorded."""

    def __init__(self, handler: type[BaseHTTPRequestHandler]) -> None:
        self.requests: list[Recorded] = []
        self.scripts: dict[str, deque[int]] = defaultdict(deque)
        self.down: dict[str, int] = {}
        self.poisoned: dict[str, int] = {}  # a prompt containing the key answers the status
        self._lock = threading.Lock()
        super().__init__(handler)

    def fail_next(self, kind: str, *statuses: int) -> None:
        """The next calls of ``kind`` answer these statuses, in order, then succeed."""
        with self._lock:
            self.scripts[kind].extend(statuses)

    def take_down(self, kind: str, status: int = 503) -> None:
        with self._lock:
            self.down[kind] = status

    def poison(self, marker: str, status: int = 503) -> None:
        """Every request whose prompt contains ``marker`` answers ``status``: one client's
        requests that the provider fails on, while it serves everyone else."""
        with self._lock:
            self.poisoned[marker] = status

    def status_for_prompt(self, kind: str, prompt: str) -> int:
        with self._lock:
            hit = next((st for m, st in self.poisoned.items() if m in prompt), None)
        return hit or self.status_for(kind)

    def recover(self, kind: str) -> None:
        with self._lock:
            self.down.pop(kind, None)

    def calls(self, kind: str) -> list[Recorded]:
        with self._lock:
            return [r for r in self.requests if r.kind == kind]

    def status_for(self, kind: str) -> int:
        with self._lock:
            return self.down.get(kind) or (self.scripts[kind].popleft()
                                           if self.scripts[kind] else 200)

    def record(self, recorded: Recorded) -> None:
        with self._lock:
            self.requests.append(recorded)


class FakeOpenAI(Scripted):
    """Start with ``with FakeOpenAI() as fake:``; ``fake.base_url`` goes to the SDK."""

    def __init__(self, text_tokens: int = 42) -> None:
        self.text_tokens = text_tokens
        super().__init__(self._handler())

    @property
    def base_url(self) -> str:
        return f"http://{self.address}/v1"

    def _answer(self, kind: str, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        status = self.status_for_prompt(kind, str(body.get("prompt", "")))
        if status != 200:
            return status, {"error": {"message": f"fake {kind} answered {status}",
                                      "type": "server_error", "code": f"fake_{status}"}}
        if kind == "images":
            prompt, n = str(body.get("prompt", "")), int(body.get("n", 1))
            data = [{"b64_json": base64.b64encode(image_bytes(prompt, i)).decode()}
                    for i in range(n)]
            answer: dict[str, Any] = {"created": 1_700_000_000, "data": data}
            if str(body.get("model", "")).startswith("gpt-image"):
                tokens_in = prompt_tokens(prompt)
                answer["output_format"] = "png"
                answer["usage"] = {
                    "input_tokens": tokens_in, "output_tokens": IMAGE_TOKENS * n,
                    "total_tokens": tokens_in + IMAGE_TOKENS * n,
                    "input_tokens_details": {"text_tokens": tokens_in, "image_tokens": 0},
                }
            return 200, answer
        if kind == "chat":
            text = "".join(str(m.get("content", "")) for m in body.get("messages", []))
            tokens_in = prompt_tokens(text)
            return 200, {
                "id": f"chatcmpl-{uuid.uuid4().hex}", "object": "chat.completion",
                "created": 1_700_000_000, "model": body.get("model"),
                "choices": [{"index": 0, "finish_reason": "stop",
                             "message": {"role": "assistant", "content": ANSWER}}],
                "usage": {"prompt_tokens": tokens_in, "completion_tokens": self.text_tokens,
                          "total_tokens": tokens_in + self.text_tokens},
            }
        return 404, {"error": {"message": "not found", "type": "invalid_request_error"}}

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                raw = self.rfile.read(length) if length else b""
                body = orjson.loads(raw) if raw else {}
                path = self.path.split("?")[0]
                kind = {"/v1/images/generations": "images",
                        "/v1/chat/completions": "chat"}.get(path, "other")
                status, answer = fake._answer(kind, body)
                headers = {k.lower(): v for k, v in self.headers.items()}
                fake.record(Recorded(self.command, path, kind, headers,
                                     body, status, time.monotonic()))
                data = orjson.dumps(answer)
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *_: Any) -> None:
                pass

        return Handler
