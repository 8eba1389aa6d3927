"""Stability AI's Stable Image REST API (v2beta) through httpx: one image per call.

- ``stable-image-ultra``: ``POST /v2beta/stable-image/generate/ultra``
- ``stable-image-core``: ``POST /v2beta/stable-image/generate/core``
- ``sd3.5-large``, ``sd3.5-large-turbo``, ``sd3.5-medium``:
  ``POST /v2beta/stable-image/generate/sd3`` with the model as a form field

Requests are ``multipart/form-data`` with ``Authorization: Bearer <key>`` and
``Accept: image/*``, so the answer's body is the image itself, with its ``finish-reason``
and ``seed`` in headers. Stability bills a fixed number of credits per image by model, so
usage is the image count, priced per image in ``schemas/prices.py``. An image the
moderation filter replaced (``finish-reason: CONTENT_FILTERED``) is a failed operation.
Errors are JSON (``{"name", "errors": [...]}``), wrapped in ``ProviderError``: 429, 5xx
and timeouts are retryable; 400, 401, 403 (moderation), 404, 413, 422 are not.
https://platform.stability.ai/docs/api-reference
"""

from __future__ import annotations

import asyncio
from typing import Any

import httpx2 as httpx
import orjson
from pydantic import SecretStr

from aipipe.schemas.events import OperationAdmitted, Usage
from aipipe.streams.generation.provider import (
    ProviderError,
    ProviderOutput,
    ProviderResult,
    VideoJob,
    VideoStatus,
)

DEFAULT_BASE_URL = "https://api.stability.ai"
ENDPOINTS = {
    "stable-image-ultra": "ultra",
    "stable-image-core": "core",
    "sd3.5-large": "sd3",
    "sd3.5-large-turbo": "sd3",
    "sd3.5-medium": "sd3",
}
ASPECT_RATIOS = ("16:9", "1:1", "21:9", "2:3", "3:2", "4:5", "5:4", "9:16", "9:21")
OUTPUT_FORMATS = ("png", "jpeg", "webp")
FORM_FIELDS = ("prompt", "negative_prompt", "aspect_ratio", "seed", "output_format")
MAX_IMAGE_BYTES = 64 * 1024 * 1024  # an image's answer (Stable Image answers a few MB)
MAX_ERROR_BYTES = 64 * 1024  # an error's JSON


class StabilityProvider:
    name = "stability"

    def __init__(
        self,
        *,
        api_key: SecretStr | None = None,
        base_url: str | None = None,
        timeout_seconds: float = 120.0,
    ) -> None:
        self._api_key = api_key
        self._base_url = (base_url or DEFAULT_BASE_URL).rstrip("/")
        self._timeout = timeout_seconds
        self._client: tuple[asyncio.AbstractEventLoop, httpx.AsyncClient] | None = None

    def __repr__(self) -> str:  # never the key
        return f"StabilityProvider(base_url={self._base_url!r})"

    @property
    def client(self) -> httpx.AsyncClient:
        """One client per event loop (its connection pool belongs to the loop)."""
        loop = asyncio.get_running_loop()
        if self._client is None or self._client[0] is not loop:
            if self._api_key is None:
                raise ProviderError(
                    "AIPIPE_STABILITY_API_KEY is not set; set it to call Stability.",
                    retryable=False,
                )
            self._client = (loop, httpx.AsyncClient(
                base_url=self._base_url, timeout=self._timeout,
                headers={"Authorization": f"Bearer {self._api_key.get_secret_value()}"},
            ))
        return self._client[1]

    async def generate_image(self, operation: OperationAdmitted) -> ProviderResult:
        endpoint = ENDPOINTS.get(operation.model)
        if endpoint is None:
            raise ProviderError(
                f"stability: model {operation.model!r} is not offered; use one of "
                f"{', '.join(ENDPOINTS)}", status=404, retryable=False,
            )
        form: dict[str, Any] = {k: str(operation.params[k]) for k in FORM_FIELDS
                                if k in operation.params}
        if endpoint == "sd3":
            form["model"] = operation.model
        try:  # the timeout for the whole answer, not for each read of it
            async with asyncio.timeout(self._timeout), self.client.stream(
                "POST", f"/v2beta/stable-image/generate/{endpoint}", data=form,
                files={"none": ("", b"")}, headers={"Accept": "image/*"},
            ) as response:
                ok = response.status_code == 200
                body = await _read_capped(response, MAX_IMAGE_BYTES if ok else MAX_ERROR_BYTES,
                                          endpoint, refuse=ok)
        except TimeoutError as exc:
            raise ProviderError(f"stability {endpoint}: timeout", retryable=True) from exc
        except (httpx.HTTPError, OSError) as exc:  # transport, or an answer HTTP cannot read
            raise ProviderError(f"stability {endpoint}: {type(exc).__name__}",
                                retryable=True) from exc
        if not ok:
            raise ProviderError.from_status(
                response.status_code,
                f"stability {endpoint}: {response.status_code} {_error_name(body)}".rstrip(),
            )
        finish = response.headers.get("finish-reason", "SUCCESS")[:100]
        metadata = {"finish_reason": finish, "seed": response.headers.get("seed", "")[:100]}
        if finish != "SUCCESS":
            return ProviderResult(success=False, usage=Usage(image_count=0), metadata=metadata,
                                  error_message=f"no image returned (finish reason {finish})")
        mime = response.headers.get("content-type", "image/png").split(";")[0].strip().lower()
        if not mime.startswith("image/") or not body:
            # (a proxy's or a wrong base URL's page is no image, and is not billed as one)
            raise ProviderError(f"stability {endpoint}: 200 with {mime or 'no type'} of "
                                f"{len(body)} bytes, not an image", retryable=True)
        return ProviderResult(success=True, usage=Usage(image_count=1), metadata=metadata,
                              outputs=(ProviderOutput(mime, data=body),))

    async def generate_text(self, operation: OperationAdmitted) -> ProviderResult:
        raise ProviderError("stability: text generation is not offered", status=400,
                            retryable=False)

    async def start_video(self, operation: OperationAdmitted) -> VideoJob:
        raise ProviderError("stability: video generation is not offered", status=400,
                            retryable=False)

    async def poll_video(self, model: str, job: VideoJob, attempt: int) -> VideoStatus:
        raise ProviderError("stability: video generation is not offered", status=400,
                            retryable=False)


async def _read_capped(response: httpx.Response, limit: int, endpoint: str,
                       refuse: bool = True) -> bytes:
    """The answer's body, at most ``limit`` bytes. Past it, an image answer is refused (not
    retried: the same request gets the same answer), before reading it when its
    Content-Length says so; an error answer (``refuse=False``) is cut there, and its status
    decides (a proxy's large 502 page is retried like any 502)."""
    def over(size: int) -> ProviderError:
        return ProviderError(f"stability {endpoint}: an answer of over {size} bytes, past the "
                             f"{limit}-byte limit", retryable=False)

    declared = response.headers.get("content-length", "")
    if refuse and declared.isascii() and declared.isdigit() and int(declared) > limit:
        raise over(int(declared))
    body = bytearray()
    async for chunk in response.aiter_bytes():
        body += chunk
        if len(body) > limit:
            if not refuse:
                return bytes(body[:limit])
            raise over(len(body))
    return bytes(body)


def _error_name(body: bytes) -> str:
    try:
        parsed = orjson.loads(body)
    except orjson.JSONDecodeError:
        return ""
    return str(parsed.get("name", ""))[:200] if isinstance(parsed, dict) else ""
