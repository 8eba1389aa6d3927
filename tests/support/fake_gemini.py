"""A local fake of the Gemini API and Vertex AI REST endpoints that google-genai calls.

The real SDK talks to it through ``HttpOptions(base_url=...)`` (``AIPIPE_GEMINI_BASE_URL``
for workers), so request shapes are the SDK's own. It records every request and can be
scripted: statuses to return next per endpoint, an endpoint that is down until it
recovers, and how many polls a video needs.

Endpoints (``kind`` in the scripts):
- ``generateContent``: ``POST /v1beta/models/{model}:generateContent`` (Gemini API)
- ``predictLongRunning``: ``POST /v1beta1/projects/{p}/locations/{l}/publishers/google/
  models/{model}:predictLongRunning`` (Vertex, ``generate_videos``)
- ``fetchPredictOperation``: ``POST .../models/{model}:fetchPredictOperation`` with
  ``{"operationName": ...}`` (Vertex, ``operations.get`` for videos)
"""

from __future__ import annotations

import base64
import math
import threading
import time
import uuid
from collections import Counter, defaultdict, deque
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler
from typing import Any

import orjson

from tests.support.loopback import LoopbackServer

STATUS_NAMES = {
    400: "INVALID_ARGUMENT", 403: "PERMISSION_DENIED", 404: "NOT_FOUND",
    429: "RESOURCE_EXHAUSTED", 500: "INTERNAL", 503: "UNAVAILABLE",
}
PNG = base64.b64encode(b"\x89PNG\r\n\x1a\nfake").decode()
IMAGE_TOKENS = 1290


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
    """What the fake reports as ``promptTokenCount``: ceil(len / 4), stated for tests."""
    return math.ceil(len(text) / 4)


class FakeGemini(LoopbackServer):
    """Start with ``with FakeGemini() as fake:``; ``fake.base_url`` goes to the SDK."""

    def __init__(self, video_polls: int = 1, text_tokens: int = 321) -> None:
        self.video_polls = video_polls
        self.text_tokens = text_tokens
        self.requests: list[Recorded] = []
        self.scripts: dict[str, deque[int]] = defaultdict(deque)
        self.down: dict[str, int] = {}
        self.operations: dict[str, int] = {}  # operation name -> polls so far
        self.storage: dict[str, str] = {}  # operation name -> the storageUri it was asked
        self._lock = threading.Lock()
        super().__init__(self._handler())

    @property
    def base_url(self) -> str:
        return f"http://{self.address}"

    # -- scripting -------------------------------------------------------------------

    def fail_next(self, kind: str, *statuses: int) -> None:
        """The next calls of ``kind`` answer these statuses, in order, then succeed."""
        with self._lock:
            self.scripts[kind].extend(statuses)

    def take_down(self, kind: str, status: int = 503, model: str | None = None) -> None:
        """Calls of ``kind`` (of ``model`` only, when given) answer ``status`` until
        ``recover``."""
        with self._lock:
            self.down[kind if model is None else f"{kind}@{model}"] = status

    def recover(self, kind: str, model: str | None = None) -> None:
        with self._lock:
            self.down.pop(kind if model is None else f"{kind}@{model}", None)

    def calls(self, kind: str) -> list[Recorded]:
        with self._lock:
            return [r for r in self.requests if r.kind == kind]

    def counts(self) -> Counter[str]:
        with self._lock:
            return Counter(r.kind for r in self.requests)

    # -- serving ---------------------------------------------------------------------

    def _answer(self, kind: str, path: str, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        with self._lock:
            model = path.split(":")[0].rsplit("/models/", 1)[-1]
            status = (self.down.get(f"{kind}@{model}") or self.down.get(kind)
                      or (self.scripts[kind].popleft() if self.scripts[kind] else 200))
        if status != 200:
            return status, {"error": {"code": status, "status": STATUS_NAMES.get(status, ""),
                                      "message": f"fake {kind} answered {status}"}}
        if kind == "generateContent":
            return 200, self._content(path, body)
        if kind == "predictLongRunning":
            name = f"{path.split(':')[0].split('/', 2)[2]}/operations/{uuid.uuid4()}"
            with self._lock:
                self.operations[name] = 0
                self.storage[name] = str((body.get("parameters") or {}).get("storageUri", ""))
            return 200, {"name": name}
        if kind == "fetchPredictOperation":
            name = str(body.get("operationName", ""))
            with self._lock:
                if name not in self.operations:
                    return 404, {"error": {"code": 404, "status": "NOT_FOUND",
                                           "message": f"operation {name} not found"}}
                self.operations[name] += 1
                done = self.operations[name] >= self.video_polls
            if not done:
                return 200, {"name": name}
            return 200, {"name": name, "done": True, "response": {
                "@type": "type.googleapis.com/cloud.ai.large_models.vision.GenerateVideoResponse",
                "raiMediaFilteredCount": 0,
                # as Veo: under the storageUri asked for, else the bytes themselves
                "videos": [{"gcsUri": f"{storage.rstrip('/')}/{name.rsplit('/', 1)[-1]}/"
                                      "sample_0.mp4", "mimeType": "video/mp4"}
                           if (storage := self.storage.get(name)) else
                           {"bytesBase64Encoded": base64.b64encode(b"fake mp4").decode(),
                            "mimeType": "video/mp4"}],
            }}
        return 404, {"error": {"code": 404, "status": "NOT_FOUND", "message": path}}

    def _content(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        model = path.rsplit("/", 1)[-1].split(":")[0]
        text = "".join(
            str(part.get("text", ""))
            for content in body.get("contents", []) for part in content.get("parts", [])
        )
        wants_image = "IMAGE" in (body.get("generationConfig") or {}).get("responseModalities", [])
        part: dict[str, Any] = (
            {"inlineData": {"mimeType": "image/png", "data": PNG}} if wants_image
            else {"text": "fake answer"}
        )
        out_tokens = IMAGE_TOKENS if wants_image else self.text_tokens
        tokens_in = prompt_tokens(text)
        return {
            "candidates": [{"content": {"role": "model", "parts": [part]},
                            "finishReason": "STOP", "index": 0}],
            "usageMetadata": {"promptTokenCount": tokens_in, "candidatesTokenCount": out_tokens,
                              "totalTokenCount": tokens_in + out_tokens},
            "modelVersion": model,
            "responseId": uuid.uuid4().hex,
        }

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def _serve(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                raw = self.rfile.read(length) if length else b""
                body = orjson.loads(raw) if raw else {}
                path = self.path.split("?")[0]
                kind = path.rsplit(":", 1)[-1] if ":" in path else "other"
                status, answer = fake._answer(kind, path, body)
                with fake._lock:
                    fake.requests.append(Recorded(
                        self.command, path, kind, dict(self.headers.items()), body, status,
                        time.monotonic(),
                    ))
                data = orjson.dumps(answer)
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            do_POST = _serve
            do_GET = _serve

            def log_message(self, *_: Any) -> None:
                pass

        return Handler
