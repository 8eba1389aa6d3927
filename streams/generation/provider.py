"""The provider port: what generation needs from an AI provider, and how a provider fails.

A provider generates images and text in one call, and video in two steps: ``start_video``
returns a ``VideoJob`` (the provider's operation name plus what later polls need), and
``poll_video`` asks about that job, as often as the poll schedule says. The job travels
in the ``video.started`` event and the pending-videos table, so any worker can poll it
after a restart without starting the video again.

Results carry their outputs as ``ProviderOutput``: the bytes the provider returned, or the
URI of what it wrote to its own storage (Veo's ``gs://``). Generation stores the bytes in
the artifact store (``streams/artifacts``) and records them on ``operation.completed``.

Providers raise ``ProviderError`` for what the provider said or failed to say
(``retryable`` for 429, 5xx and timeouts, not for 400, 403, 404); anything else is a bug.
"""

from __future__ import annotations

import asyncio
import base64
from dataclasses import dataclass, field
from typing import Any, Protocol

from aipipe.schemas.errors import AipipeError
from aipipe.schemas.events import OperationAdmitted, Usage

RETRYABLE_STATUSES = frozenset({408, 429, 500, 502, 503, 504})
#: base64 is decoded in slices of this many characters (a multiple of 4): binascii keeps the
#: GIL for a whole call, so even in a thread one call on a 4 MB image held the event loop
#: (every operation in flight) for about 15 ms; between slices the loop gets its turn
B64_SLICE = 256 * 1024


def decode_b64(text: str) -> bytes:
    """``base64.b64decode(text)``, slice by slice (``B64_SLICE``)."""
    if any(space in text for space in "\n\r\t "):  # (line-wrapped base64)
        text = "".join(text.split())
    return b"".join([base64.b64decode(text[start:start + B64_SLICE])
                     for start in range(0, len(text), B64_SLICE)])


async def decoded_b64(text: str) -> bytes:
    """A provider's base64 output as bytes: at once when small, else in a thread in slices."""
    if len(text) <= B64_SLICE:
        return base64.b64decode(text)
    return await asyncio.to_thread(decode_b64, text)


class ProviderError(AipipeError):
    """A provider call failed; ``status`` is the HTTP status when there was one."""

    def __init__(self, message: str, *, status: int | None = None, retryable: bool) -> None:
        super().__init__(message)
        self.status = status
        self.retryable = retryable

    @classmethod
    def from_status(cls, status: int, message: str) -> ProviderError:
        return cls(message, status=status, retryable=status in RETRYABLE_STATUSES)


@dataclass(frozen=True)
class ProviderOutput:
    """One output: ``data`` (bytes to store), or a ``uri`` where it is already stored.

    A provider returns bytes, or the URI of what it wrote to its own storage (then
    ``size`` and ``sha256`` are unknown). Once stored in the artifact store, the output
    carries the store's ``uri``, ``size`` and ``sha256``, and keeps ``data`` for text
    that travels inline.
    """

    mime_type: str
    data: bytes | None = None
    uri: str | None = None
    size: int | None = None
    sha256: str | None = None

    def __post_init__(self) -> None:
        if self.data is None and self.uri is None:
            raise ValueError("a ProviderOutput has data or a uri")

    def __repr__(self) -> str:  # never the bytes
        what = f"{len(self.data)} bytes" if self.data is not None else self.uri
        return f"ProviderOutput({self.mime_type}, {what})"


@dataclass(frozen=True)
class ProviderResult:
    success: bool
    usage: Usage
    error_message: str | None = None
    metadata: dict[str, Any] = field(default_factory=dict)
    outputs: tuple[ProviderOutput, ...] = ()


@dataclass(frozen=True)
class VideoJob:
    """A started video: the provider's operation name and what polls need (JSON values)."""

    name: str
    metadata: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class VideoStatus:
    """One poll's answer. ``done`` with an ``error_message`` is a video that failed."""

    done: bool
    usage: Usage = field(default_factory=Usage)
    error_message: str | None = None
    metadata: dict[str, Any] = field(default_factory=dict)
    outputs: tuple[ProviderOutput, ...] = ()


class AIProvider(Protocol):
    name: str

    async def generate_image(self, operation: OperationAdmitted) -> ProviderResult: ...

    async def generate_text(self, operation: OperationAdmitted) -> ProviderResult: ...

    async def start_video(self, operation: OperationAdmitted) -> VideoJob: ...

    async def poll_video(self, model: str, job: VideoJob, attempt: int) -> VideoStatus:
        """Ask about ``job``; ``attempt`` is the 1-based poll number (simulations use it)."""
        ...
