"""Outputs of operations: stored in the artifact store and recorded on the completion.

``store_output`` puts an output's bytes into the store (content-addressed, so a re-run
finds them there and records the same URI); an output the provider already wrote to its
own storage (a Veo video in ``gs://``) is referenced as it is, not copied. ``record`` turns
a stored output into the ``Output`` that ``operation.completed`` carries: text up to
``INLINE_TEXT_BYTES`` also travels inline.

``StoringProvider`` wraps a provider so that its results come back stored: the registry
wraps every provider it builds, so the agents need no store of their own.
"""

from __future__ import annotations

import re
from dataclasses import replace
from typing import TypeVar

import structlog

from aipipe.schemas.events import INLINE_TEXT_BYTES, OperationAdmitted, Output
from aipipe.streams.artifacts.store import ArtifactError, ArtifactStore
from aipipe.streams.generation.provider import (
    AIProvider,
    ProviderOutput,
    ProviderResult,
    VideoJob,
    VideoStatus,
)

log = structlog.get_logger("aipipe.generation.outputs")
R = TypeVar("R", ProviderResult, VideoStatus)

_MIME = re.compile(r"^[a-z]+/[a-z0-9.+-]+$")


def _mime(value: str) -> str:
    """``value`` without parameters, or ``application/octet-stream`` if it is not a type."""
    mime = value.split(";")[0].strip().lower()
    return mime if _MIME.fullmatch(mime) and len(mime) <= 100 else "application/octet-stream"


async def store_output(output: ProviderOutput, store: ArtifactStore) -> ProviderOutput:
    """``output`` with the store's URI, size and SHA-256 (bytes kept for inline text)."""
    if output.uri is not None or output.data is None:
        return output
    artifact = await store.put(output.data, _mime(output.mime_type))
    keep = output.data if _inline(output.mime_type, artifact.size) else None
    return ProviderOutput(artifact.mime_type, data=keep, uri=artifact.uri,
                          size=artifact.size, sha256=artifact.sha256)


async def store_outputs(
    outputs: tuple[ProviderOutput, ...], store: ArtifactStore
) -> tuple[ProviderOutput, ...]:
    return tuple([await store_output(o, store) for o in outputs])


def _inline(mime_type: str, size: int) -> bool:
    return mime_type.startswith("text/") and size <= INLINE_TEXT_BYTES


def record(output: ProviderOutput) -> Output | None:
    """The completion's record of a stored or referenced output; ``None`` if not stored."""
    if output.uri is None:
        return None
    text = None
    if output.data is not None and output.size is not None and _inline(output.mime_type,
                                                                       output.size):
        text = output.data.decode("utf-8", errors="replace")
    return Output(uri=output.uri, mime_type=_mime(output.mime_type), size=output.size,
                  sha256=output.sha256, text=text)


async def store_result(result: R, store: ArtifactStore, provider: str) -> R:
    """``result`` with its outputs stored. A store that fails does not fail the operation
    (the provider has billed it): the completion says why it has no outputs."""
    if not any(o.uri is None for o in result.outputs):
        return result
    try:
        return replace(result, outputs=await store_outputs(result.outputs, store))
    except ArtifactError as exc:
        log.error("outputs_not_stored", provider=provider, error=str(exc))
        return replace(result, metadata={**result.metadata, "outputs_error": str(exc)})


class StoringProvider:
    """``inner`` with every output it returns stored in ``store``."""

    def __init__(self, inner: AIProvider, store: ArtifactStore) -> None:
        self.inner = inner
        self.store = store
        self.name = inner.name

    def __repr__(self) -> str:
        return f"StoringProvider({self.inner!r}, {self.store!r})"

    async def generate_image(self, operation: OperationAdmitted) -> ProviderResult:
        return await store_result(await self.inner.generate_image(operation), self.store,
                                  self.name)

    async def generate_text(self, operation: OperationAdmitted) -> ProviderResult:
        return await store_result(await self.inner.generate_text(operation), self.store,
                                  self.name)

    async def start_video(self, operation: OperationAdmitted) -> VideoJob:
        return await self.inner.start_video(operation)

    async def poll_video(self, model: str, job: VideoJob, attempt: int) -> VideoStatus:
        return await store_result(await self.inner.poll_video(model, job, attempt), self.store,
                                  self.name)
