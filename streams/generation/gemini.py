"""Gemini through google-genai: images and text with the Gemini API, Veo video on Vertex.

- images and text: ``models.generate_content``; usage from ``usage_metadata`` (prompt
  tokens in; candidate plus thinking tokens out), images counted from the inline parts.
- video: ``models.generate_videos``, which google-genai allows only in Vertex mode
  (``vertexai=True``, a project and location), then ``operations.get`` on the operation
  name, rebuilt from the name alone so a restarted worker polls the same operation.
  Billed seconds are the requested duration times the videos returned.

Outputs: the images' inline bytes and the answer's text are returned for the artifact
store, at most ``MAX_IMAGES`` of them; a video Veo wrote to Cloud Storage
(``output_gcs_uri``) is referenced by its ``gs://`` URI, not copied, and one returned as
bytes is stored. A request may name only a bucket in ``video_output_buckets``
(``AIPIPE_VIDEO_OUTPUT_BUCKETS``), and a poll's answer is believed only for a video under
the folder the request named (kept in the job), in such a bucket.

Keys come from settings as ``SecretStr`` and go only into the SDK's clients. The SDK's
own retries are off (one attempt in its retry options); retries and the circuit breaker
are ``guard.py``'s. SDK and transport errors are wrapped in ``ProviderError`` with the
cause kept; a 2xx answer that is not the API's (a body that does not parse, usage no count
can hold) is a retryable one, which the breaker counts.
"""

from __future__ import annotations

from collections.abc import Awaitable
from decimal import Decimal
from typing import Any, TypeVar

from google import genai
from google.genai import errors as genai_errors
from google.genai import types
from pydantic import SecretStr

from aipipe.schemas.events import OperationAdmitted, Usage, shown
from aipipe.streams.generation.complete import MAX_PROVIDER_TEXT
from aipipe.streams.generation.provider import (
    ProviderError,
    ProviderOutput,
    ProviderResult,
    VideoJob,
    VideoStatus,
)

T = TypeVar("T")
DEFAULT_VIDEO_SECONDS = 8
#: the images kept of one answer: as many outputs as an ``operation.completed`` carries
#: (``schemas/events.py``). A request names no image count for Gemini; past this many the
#: rest are neither stored nor counted (the tokens are billed as the answer reports them)
MAX_IMAGES = 64
#: the longest video URI a completion's ``Output`` carries (``schemas/events.py``)
MAX_VIDEO_URI = 2048


def _parts(response: types.GenerateContentResponse) -> list[types.Part]:
    return [part for candidate in response.candidates or []
            for part in (candidate.content.parts if candidate.content else None) or []]


def _images(response: types.GenerateContentResponse) -> list[types.Blob]:
    """The answer's images (an image without bytes is none)."""
    return [part.inline_data for part in _parts(response)
            if part.inline_data is not None and part.inline_data.data
            and (part.inline_data.mime_type or "").startswith("image/")]


def usage_from_response(response: types.GenerateContentResponse) -> Usage:
    """The answer's usage, images counted up to ``MAX_IMAGES``. A count no ``Usage`` can
    hold (negative, past 2^53 - 1) raises ``ValueError``: the answer is not the API's."""
    meta = response.usage_metadata
    images = min(len(_images(response)), MAX_IMAGES)
    if meta is None:
        return Usage(image_count=images)
    output = (meta.candidates_token_count or 0) + (meta.thoughts_token_count or 0)
    return Usage(
        input_tokens=meta.prompt_token_count or 0, output_tokens=output, image_count=images
    )


def outputs_from_response(
    response: types.GenerateContentResponse, image: bool
) -> tuple[ProviderOutput, ...]:
    """The images (inline bytes, at most ``MAX_IMAGES``) of an image answer, or the text of
    a text answer."""
    if image:
        return tuple(ProviderOutput(blob.mime_type or "image/png", data=blob.data)
                     for blob in _images(response)[:MAX_IMAGES] if blob.data)
    text = "".join(part.text for part in _parts(response) if part.text and not part.thought)
    return (ProviderOutput("text/plain", data=text.encode()),)


class GeminiProvider:
    name = "gemini"

    def __init__(
        self,
        *,
        api_key: SecretStr | None = None,
        base_url: str | None = None,
        vertex_project: str | None = None,
        vertex_location: str = "us-central1",
        vertex_access_token: SecretStr | None = None,
        timeout_seconds: float = 120.0,
        video_output_buckets: tuple[str, ...] = (),
    ) -> None:
        self._api_key = api_key
        self._buckets = video_output_buckets
        self._vertex_project = vertex_project
        self._vertex_location = vertex_location
        self._vertex_token = vertex_access_token
        # one HTTP request per attempt: the guard retries, behind the breaker. Without retry
        # options the SDK's aiohttp path silently sent a request again when the server hung
        # up (two calls, each possibly billed, for one attempt)
        self._http = types.HttpOptions(base_url=base_url, timeout=int(timeout_seconds * 1000),
                                       retry_options=types.HttpRetryOptions(attempts=1))
        self._api_client: genai.Client | None = None
        self._vertex_client: genai.Client | None = None

    def __repr__(self) -> str:  # never the key
        return f"GeminiProvider(vertex_project={self._vertex_project!r})"

    @property
    def api(self) -> genai.Client:
        if self._api_client is None:
            if self._api_key is None:
                raise ProviderError(
                    "AIPIPE_GEMINI_API_KEY is not set; set it to call the Gemini API.",
                    retryable=False,
                )
            self._api_client = genai.Client(
                api_key=self._api_key.get_secret_value(), http_options=self._http
            )
        return self._api_client

    @property
    def vertex(self) -> genai.Client:
        if self._vertex_client is None:
            if not self._vertex_project:
                raise ProviderError(
                    "AIPIPE_VERTEX_PROJECT is not set; Veo video runs on Vertex AI, set the "
                    "project (and AIPIPE_VERTEX_LOCATION) to generate videos.",
                    retryable=False,
                )
            credentials = None
            if self._vertex_token is not None:
                from google.oauth2.credentials import Credentials

                credentials = Credentials(  # type: ignore[no-untyped-call]
                    token=self._vertex_token.get_secret_value()
                )
            self._vertex_client = genai.Client(
                vertexai=True,
                project=self._vertex_project,
                location=self._vertex_location,
                credentials=credentials,
                http_options=self._http,
            )
        return self._vertex_client

    async def _call(self, what: str, call: Awaitable[T]) -> T:
        try:
            return await call
        except genai_errors.APIError as exc:
            raise ProviderError.from_status(
                exc.code, f"gemini {what}: {exc.code} {exc.status or ''}".rstrip()
            ) from exc
        except (TimeoutError, OSError) as exc:
            raise ProviderError(f"gemini {what}: {type(exc).__name__}", retryable=True) from exc
        except ValueError as exc:  # a 2xx the SDK cannot read
            raise _garbled(what, exc) from exc
        except Exception as exc:  # the transports' own errors (aiohttp, httpx)
            if type(exc).__module__.split(".")[0] in ("aiohttp", "httpx", "httpcore"):
                raise ProviderError(
                    f"gemini {what}: {type(exc).__name__}", retryable=True
                ) from exc
            raise

    async def _content(self, operation: OperationAdmitted, image: bool) -> ProviderResult:
        params = operation.params
        config: dict[str, Any] = {}
        if image:
            config["response_modalities"] = ["IMAGE"]
        elif "max_output_tokens" in params:
            config["max_output_tokens"] = int(params["max_output_tokens"])
        response = await self._call(
            "generate_content",
            self.api.aio.models.generate_content(
                model=operation.model,
                contents=str(params.get("prompt", "")),
                config=types.GenerateContentConfig(**config),
            ),
        )
        try:
            return _result(response, image)
        except (AttributeError, TypeError, ValueError) as exc:  # pydantic's errors included
            raise _garbled("generate_content", exc) from exc

    async def generate_image(self, operation: OperationAdmitted) -> ProviderResult:
        return await self._content(operation, image=True)

    async def generate_text(self, operation: OperationAdmitted) -> ProviderResult:
        return await self._content(operation, image=False)

    async def start_video(self, operation: OperationAdmitted) -> VideoJob:
        params = operation.params
        seconds = int(params.get("duration_seconds", DEFAULT_VIDEO_SECONDS))
        config: dict[str, Any] = {"duration_seconds": seconds, "number_of_videos": 1}
        if params.get("output_gcs_uri"):
            uri = str(params["output_gcs_uri"])
            bucket = uri.removeprefix("gs://").split("/", 1)[0]
            if not uri.startswith("gs://") or bucket not in self._buckets:
                raise ProviderError(
                    f"gemini generate_videos: bucket {bucket!r} is not one this pipeline may "
                    "write to (AIPIPE_VIDEO_OUTPUT_BUCKETS)", status=400, retryable=False,
                )
            if len(uri) > MAX_PROVIDER_TEXT:  # (the job keeps it to check the answer with)
                raise ProviderError(
                    f"gemini generate_videos: output_gcs_uri has {len(uri)} characters, more "
                    f"than the {MAX_PROVIDER_TEXT} a video's job keeps; name a shorter folder",
                    status=400, retryable=False,
                )
            config["output_gcs_uri"] = uri
        started = await self._call(
            "generate_videos",
            self.vertex.aio.models.generate_videos(
                model=operation.model,
                source=types.GenerateVideosSource(prompt=str(params.get("prompt", ""))),
                config=types.GenerateVideosConfig(**config),
            ),
        )
        if not started.name:
            raise ProviderError("gemini generate_videos: no operation name", retryable=False)
        return VideoJob(name=started.name, metadata={
            "duration_seconds": seconds, "output_gcs_uri": config.get("output_gcs_uri")})

    async def poll_video(self, model: str, job: VideoJob, attempt: int) -> VideoStatus:
        operation = types.GenerateVideosOperation.model_validate({"name": job.name})
        polled = await self._call("operations.get", self.vertex.aio.operations.get(operation))
        if not polled.done:
            return VideoStatus(done=False)
        if polled.error:
            message = polled.error.get("message") or str(polled.error)
            return VideoStatus(done=True, error_message=f"video failed: {message}")
        videos = (polled.result.generated_videos if polled.result else None) or []
        if not videos:
            filtered = polled.result.rai_media_filtered_reasons if polled.result else None
            return VideoStatus(done=True, error_message=f"no video returned ({filtered})")
        seconds = Decimal(int(job.metadata.get("duration_seconds", DEFAULT_VIDEO_SECONDS)))
        # the videos that exist, at most the one asked for (number_of_videos): an answer
        # listing 50 entries, empty or not, is not 50 videos' seconds
        made = [v for v in videos if v.video and (v.video.uri or v.video.video_bytes)][:1]
        if not made:
            return VideoStatus(done=True, error_message="no video returned (empty entries)")
        for v in made:
            if v.video and v.video.uri and (problem := self._uri_problem(v.video.uri, job)):
                return VideoStatus(done=True, error_message=problem)
        outputs = tuple(
            ProviderOutput(v.video.mime_type or "video/mp4", uri=v.video.uri)
            if v.video.uri else
            ProviderOutput(v.video.mime_type or "video/mp4", data=v.video.video_bytes)
            for v in made if v.video
        )
        return VideoStatus(
            done=True,
            usage=Usage(video_seconds=seconds * len(made)),
            metadata={"videos": [v.video.uri for v in made if v.video and v.video.uri]},
            outputs=outputs,
        )

    def _uri_problem(self, uri: str, job: VideoJob) -> str | None:
        """Why a polled video's URI is not where this job's video may be, or None.

        Veo writes under the request's ``output_gcs_uri`` and answers with the bytes when
        none was named: a URI elsewhere (another folder or bucket, ``file://``,
        ``https://``) is an answer that is not the API's, and recording it would point the
        completion's readers at whatever it names. A job started before the folder was kept
        in it (no key) is held to the buckets alone."""
        said = f"video not recorded: the provider answered it at {shown(uri, 200)}, "
        if "output_gcs_uri" not in job.metadata:
            folder, where = "gs://", "a gs:// URI"
        elif isinstance(requested := job.metadata["output_gcs_uri"], str):
            folder = requested.rstrip("/") + "/"
            where = f"under the requested output_gcs_uri {shown(requested, 200)}"
        else:
            return said + "but the request named no output_gcs_uri (Veo answers with bytes then)"
        path = uri.removeprefix(folder)
        bucket = uri.removeprefix("gs://").split("/", 1)[0]
        if (uri.startswith(folder) and path and bucket in self._buckets
                and len(uri) <= MAX_VIDEO_URI and uri.isprintable()
                and not {".", ".."} & set(path.split("/"))):
            return None
        return said + f"not {where} in a bucket of AIPIPE_VIDEO_OUTPUT_BUCKETS"


def _result(response: types.GenerateContentResponse, image: bool) -> ProviderResult:
    usage = usage_from_response(response)
    if image and not usage.image_count:
        reason = response.candidates[0].finish_reason if response.candidates else None
        return ProviderResult(success=False, usage=usage,
                              error_message=f"no image returned (finish reason {reason})")
    metadata: dict[str, Any] = {"response_id": response.response_id or ""}
    if image and (extra := len(_images(response)) - MAX_IMAGES) > 0:
        metadata["images_not_kept"] = extra
    return ProviderResult(success=True, usage=usage, metadata=metadata,
                          outputs=outputs_from_response(response, image))


def _garbled(what: str, exc: Exception) -> ProviderError:
    """A 2xx answer that is not the API's (a wrong base URL's page, a proxy's, a broken
    body, usage no count can hold): a failed attempt, which the breaker counts, not an
    error of aipipe's."""
    return ProviderError(f"gemini {what}: an answer that is not the API's "
                         f"({type(exc).__name__})", retryable=True)
