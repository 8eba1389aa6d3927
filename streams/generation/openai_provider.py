"""OpenAI through the official ``openai`` SDK: images (``images.generate``) and text (chat).

- ``gpt-image-1``: priced by tokens; usage is the response's ``usage`` (input tokens of
  the prompt, output image tokens), the images come back as base64 (``b64_json``).
- ``dall-e-3``: priced per image by quality and size; usage is the image count and the
  variant (``"hd 1024x1792"``), the price table's key. One image per call (OpenAI's rule),
  asked for as ``b64_json`` so the bytes come with the answer.
- text: ``chat.completions.create``; usage is ``prompt_tokens`` in and
  ``completion_tokens`` out (reasoning tokens are part of them and billed as output).

The key comes from settings as ``SecretStr`` and goes only into the SDK's client; the
base URL is a setting (tests: a local fake). The SDK's own retries are off
(``max_retries=0``): retries and the circuit breaker are ``guard.py``'s. SDK errors are
wrapped in ``ProviderError`` with the cause kept: 429, 5xx and timeouts are retryable,
400, 401, 403, 404 are not.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable
from typing import Any, TypeVar

import openai
from pydantic import SecretStr

from aipipe.schemas.events import OperationAdmitted, Usage
from aipipe.streams.generation.provider import (
    ProviderError,
    ProviderOutput,
    ProviderResult,
    VideoJob,
    VideoStatus,
    decoded_b64,
)

T = TypeVar("T")
DALL_E_3 = "dall-e-3"
# https://platform.openai.com/docs/api-reference/images/create
DALL_E_3_SIZES = ("1024x1024", "1024x1792", "1792x1024")
DALL_E_3_QUALITIES = ("standard", "hd")
GPT_IMAGE_SIZES = ("1024x1024", "1536x1024", "1024x1536", "auto")
GPT_IMAGE_QUALITIES = ("low", "medium", "high", "auto")
MIME = {"png": "image/png", "jpeg": "image/jpeg", "webp": "image/webp"}


def _bad_request(message: str) -> ProviderError:
    return ProviderError(message, status=400, retryable=False)


class OpenAIProvider:
    name = "openai"

    def __init__(
        self,
        *,
        api_key: SecretStr | None = None,
        base_url: str | None = None,
        timeout_seconds: float = 120.0,
    ) -> None:
        self._api_key = api_key
        self._base_url = base_url
        self._timeout = timeout_seconds
        self._client: tuple[asyncio.AbstractEventLoop, openai.AsyncOpenAI] | None = None

    def __repr__(self) -> str:  # never the key
        return f"OpenAIProvider(base_url={self._base_url!r})"

    @property
    def client(self) -> openai.AsyncOpenAI:
        """One client per event loop (its connection pool belongs to the loop)."""
        loop = asyncio.get_running_loop()
        if self._client is None or self._client[0] is not loop:
            if self._api_key is None:
                raise ProviderError(
                    "AIPIPE_OPENAI_API_KEY is not set; set it to call OpenAI.", retryable=False
                )
            self._client = (loop, openai.AsyncOpenAI(
                api_key=self._api_key.get_secret_value(), base_url=self._base_url,
                timeout=self._timeout, max_retries=0,
            ))
        return self._client[1]

    async def _call(self, what: str, call: Awaitable[T]) -> T:
        try:  # the timeout for the whole answer (the SDK's is for each read of it)
            async with asyncio.timeout(self._timeout):
                return await call
        except openai.APIStatusError as exc:
            raise ProviderError.from_status(
                exc.status_code, f"openai {what}: {exc.status_code} {_code(exc)}".rstrip()
            ) from exc
        except openai.APIConnectionError as exc:  # timeouts included
            raise ProviderError(f"openai {what}: {type(exc).__name__}", retryable=True) from exc
        except (TimeoutError, OSError) as exc:
            raise ProviderError(f"openai {what}: {type(exc).__name__}", retryable=True) from exc
        except (json.JSONDecodeError, UnicodeDecodeError,
                openai.APIResponseValidationError) as exc:  # a 2xx body the SDK cannot parse
            raise _garbled(what, exc) from exc

    async def generate_image(self, operation: OperationAdmitted) -> ProviderResult:
        params = operation.params
        dalle = operation.model == DALL_E_3
        n = int(params.get("n", 1))
        size = str(params.get("size", "1024x1024"))
        args: dict[str, Any] = {"model": operation.model, "prompt": str(params["prompt"]),
                                "n": n, "size": size}
        if dalle:
            quality = str(params.get("quality", "standard"))
            if n != 1 or size not in DALL_E_3_SIZES or quality not in DALL_E_3_QUALITIES:
                raise _bad_request(
                    f"openai dall-e-3 takes n=1, size {'/'.join(DALL_E_3_SIZES)} and quality "
                    f"{'/'.join(DALL_E_3_QUALITIES)}; the request asked n={n}, {size}, {quality}"
                )
            args.update(quality=quality, response_format="b64_json")
        else:
            quality = str(params.get("quality", "auto"))
            if size not in GPT_IMAGE_SIZES or quality not in GPT_IMAGE_QUALITIES:
                raise _bad_request(
                    f"openai {operation.model} takes size {'/'.join(GPT_IMAGE_SIZES)} and "
                    f"quality {'/'.join(GPT_IMAGE_QUALITIES)}; the request asked {size}, "
                    f"{quality}"
                )
            args["quality"] = quality
        response = await self._call("images.generate", self.client.images.generate(**args))
        try:
            return await self._images(response, n, dalle, f"{quality} {size}")
        except (AttributeError, TypeError, ValueError, KeyError) as exc:
            raise _garbled("images.generate", exc) from exc

    async def _images(self, response: Any, n: int, dalle: bool,
                      variant: str) -> ProviderResult:
        mime = MIME.get(response.output_format or "png", "image/png")
        # (at most the n images asked for: more are not kept, nor billed)
        outputs = tuple([ProviderOutput(mime, data=await decoded_b64(image.b64_json))
                         for image in (response.data or [])[:n] if image.b64_json])
        if dalle:
            usage = Usage(image_count=len(outputs), image_variant=variant)
        else:
            tokens = response.usage
            usage = Usage(
                input_tokens=tokens.input_tokens if tokens else None,
                output_tokens=tokens.output_tokens if tokens else None,
                image_count=len(outputs),
            )
        if not outputs:
            return ProviderResult(success=False, usage=usage, error_message="no image returned")
        return ProviderResult(success=True, usage=usage, outputs=outputs,
                              metadata={"created": response.created})

    async def generate_text(self, operation: OperationAdmitted) -> ProviderResult:
        params = operation.params
        args: dict[str, Any] = {
            "model": operation.model,
            "messages": [{"role": "user", "content": str(params["prompt"])}],
        }
        if "max_output_tokens" in params:
            args["max_completion_tokens"] = int(params["max_output_tokens"])
        response = await self._call("chat.completions.create",
                                    self.client.chat.completions.create(**args))
        try:
            return self._text(response)
        except (AttributeError, TypeError, ValueError, KeyError) as exc:
            raise _garbled("chat.completions.create", exc) from exc

    @staticmethod
    def _text(response: Any) -> ProviderResult:
        tokens = response.usage
        usage = Usage(
            input_tokens=tokens.prompt_tokens if tokens else None,
            output_tokens=tokens.completion_tokens if tokens else None,
        )
        choice = response.choices[0] if response.choices else None
        text = (choice.message.content if choice else None) or ""
        metadata = {"response_id": response.id,
                    "finish_reason": (choice.finish_reason if choice else None) or ""}
        if choice is None:
            return ProviderResult(success=False, usage=usage, metadata=metadata,
                                  error_message="no answer returned")
        return ProviderResult(success=True, usage=usage, metadata=metadata,
                              outputs=(ProviderOutput("text/plain", data=text.encode()),))

    async def start_video(self, operation: OperationAdmitted) -> VideoJob:
        raise _bad_request("openai: video generation is not offered through aipipe")

    async def poll_video(self, model: str, job: VideoJob, attempt: int) -> VideoStatus:
        raise _bad_request("openai: video generation is not offered through aipipe")


def _garbled(what: str, exc: Exception) -> ProviderError:
    """A 2xx answer that is not the API's (a wrong base URL's page, a proxy's, a broken
    body): a failed attempt, which the breaker counts, not an error of aipipe's."""
    return ProviderError(f"openai {what}: an answer that is not the API's "
                         f"({type(exc).__name__})", retryable=True)


def _code(exc: openai.APIStatusError) -> str:
    body = exc.body
    if isinstance(body, dict):
        error = body.get("error", body)
        if isinstance(error, dict):
            return str(error.get("code") or error.get("type") or "")
    return ""
