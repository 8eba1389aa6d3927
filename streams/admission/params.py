"""Params checked at admission, per provider and operation type: a pure function.

A request's ``params`` are the client's; generation reads them as it finds them. So
admission holds them to what the provider reads (``streams/generation/simulated.py``,
``gemini.py``, ``openai_provider.py``, ``stability.py``) before anything runs: a size and a
nesting limit first (counted without recursion, so no input can exhaust the stack), then
each key. A key the provider does not
take is refused rather than ignored, so a client never pays for something it did not
get. ``params_problem`` returns one sentence naming the field and the fix, or ``None``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import orjson

from aipipe.producers.webhooks import callback_allowed
from aipipe.schemas.events import json_depth, shown
from aipipe.schemas.providers import KNOWN_PROVIDERS, SIMULATED

# https://ai.google.dev/gemini-api/docs/image-generation (gemini-2.5-flash-image)
GEMINI_IMAGE_RATIOS = ("1:1", "2:3", "3:2", "3:4", "4:3", "4:5", "5:4", "9:16", "16:9", "21:9")
# https://cloud.google.com/vertex-ai/generative-ai/docs/models/veo/3-0-generate-001
VEO_RATIOS = ("16:9", "9:16")
VEO_SECONDS = (4, 6, 8)
# https://platform.openai.com/docs/api-reference/images/create (gpt-image-1 and dall-e-3;
# which sizes and qualities go with which model is checked by the provider)
OPENAI_SIZES = ("1024x1024", "1536x1024", "1024x1536", "1024x1792", "1792x1024", "auto")
OPENAI_QUALITIES = ("low", "medium", "high", "auto", "standard", "hd")
# https://platform.stability.ai/docs/api-reference (Stable Image generate: ultra, core, sd3)
STABILITY_RATIOS = ("16:9", "1:1", "21:9", "2:3", "3:2", "4:5", "5:4", "9:16", "9:21")
STABILITY_FORMATS = ("png", "jpeg", "webp")
STABILITY_MAX_SEED = 4_294_967_294


@dataclass(frozen=True)
class ParamLimits:
    """The bounds, from settings (``AIPIPE_PARAMS_*`` and the like)."""

    max_bytes: int = 65_536
    max_depth: int = 4
    prompt_max_chars: int = 8_000
    image_max_count: int = 4
    text_max_output_tokens: int = 65_536
    video_max_seconds: int = 8
    simulated_max_latency_ms: int = 5_000
    simulated_max_polls: int = 20
    # the Cloud Storage buckets a video request may name (None: not checked here; the
    # Gemini provider refuses a bucket outside AIPIPE_VIDEO_OUTPUT_BUCKETS in any case)
    video_output_buckets: tuple[str, ...] | None = None


Check = Callable[[str, Any, ParamLimits], str | None]


def _int(value: Any, low: int, high: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and low <= value <= high


def prompt(field: str, value: Any, limits: ParamLimits) -> str | None:
    if isinstance(value, str) and 0 < len(value) <= limits.prompt_max_chars:
        return None
    return (f"Field '{field}' must be a string of 1 to {limits.prompt_max_chars} characters, "
            f"not {_what(value)}; send the prompt as text.")


def whole(low: int, high: Callable[[ParamLimits], int], unit: str = "") -> Check:
    def check(field: str, value: Any, limits: ParamLimits) -> str | None:
        top = high(limits)
        if _int(value, low, top):
            return None
        return f"Field '{field}' must be a whole number from {low} to {top}{unit}, not " \
               f"{_what(value)}; send a value in that range."
    return check


def one_of(*choices: Any) -> Check:
    def check(field: str, value: Any, limits: ParamLimits) -> str | None:
        if any(value == c and type(value) is type(c) for c in choices):
            return None
        listed = ", ".join(map(str, choices))
        return f"Field '{field}' must be one of {listed}, not {_what(value)}; pick one of those."
    return check


def seconds_choice(field: str, value: Any, limits: ParamLimits) -> str | None:
    allowed = [s for s in VEO_SECONDS if s <= limits.video_max_seconds]
    return one_of(*allowed)(field, value, limits)


# what a started video's job keeps of it, to check the provider's answer against
# (``streams.generation.complete.MAX_PROVIDER_TEXT``): longer, Gemini refuses it at the call
GCS_URI_MAX_CHARS = 1000


def gcs_uri(field: str, value: Any, limits: ParamLimits) -> str | None:
    if isinstance(value, str) and value.startswith("gs://") and \
            5 < len(value) <= GCS_URI_MAX_CHARS:
        allowed = limits.video_output_buckets
        bucket = value[5:].split("/", 1)[0]
        if allowed is None or bucket in allowed:
            return None
        listed = ", ".join(allowed) or "none"
        return (f"Field '{field}' names bucket {shown(bucket, 60)}, which this pipeline may "
                f"not write to (AIPIPE_VIDEO_OUTPUT_BUCKETS: {listed}); leave it out.")
    return (f"Field '{field}' must be a gs://bucket/path URI of at most {GCS_URI_MAX_CHARS} "
            f"characters, not "
            f"{_what(value)}; name a Cloud Storage folder or leave it out.")


def flag(field: str, value: Any, limits: ParamLimits) -> str | None:
    if isinstance(value, bool):
        return None
    return f"Field '{field}' must be true or false, not {_what(value)}."


SIMULATE: Mapping[str, Check] = {
    "latency_ms": whole(0, lambda lim: lim.simulated_max_latency_ms,
                        " (AIPIPE_SIMULATED_MAX_LATENCY_MS)"),
    "polls": whole(1, lambda lim: lim.simulated_max_polls, " (AIPIPE_SIMULATED_MAX_POLLS)"),
    "fail": flag,
}


def simulate(field: str, value: Any, limits: ParamLimits) -> str | None:
    if not isinstance(value, dict):
        return f"Field '{field}' must be an object such as {{\"polls\": 3}}, not {_what(value)}."
    return _keys(field, value, SIMULATE, limits, "the simulated provider's script")


_COUNT = whole(1, lambda lim: lim.image_max_count, " (AIPIPE_IMAGE_MAX_COUNT)")
_TOKENS = whole(1, lambda lim: lim.text_max_output_tokens, " (AIPIPE_TEXT_MAX_OUTPUT_TOKENS)")
_SECONDS = whole(1, lambda lim: lim.video_max_seconds, " (AIPIPE_VIDEO_MAX_SECONDS)")

# provider -> operation type -> the keys it reads; "prompt" is required everywhere. The
# simulated provider also takes the aspect ratios of the models it stands in for.
RULES: Mapping[str, Mapping[str, Mapping[str, Check]]] = {
    "gemini": {
        "image_generation": {"prompt": prompt},
        "text_generation": {"prompt": prompt, "max_output_tokens": _TOKENS},
        "video_generation": {"prompt": prompt, "duration_seconds": seconds_choice,
                             "output_gcs_uri": gcs_uri},
    },
    "openai": {
        "image_generation": {"prompt": prompt, "n": _COUNT, "size": one_of(*OPENAI_SIZES),
                             "quality": one_of(*OPENAI_QUALITIES)},
        "text_generation": {"prompt": prompt, "max_output_tokens": _TOKENS},
    },
    "stability": {
        "image_generation": {"prompt": prompt, "negative_prompt": prompt,
                             "aspect_ratio": one_of(*STABILITY_RATIOS),
                             "output_format": one_of(*STABILITY_FORMATS),
                             "seed": whole(0, lambda lim: STABILITY_MAX_SEED)},
    },
    SIMULATED: {
        "image_generation": {"prompt": prompt, "n": _COUNT,
                             "aspect_ratio": one_of(*GEMINI_IMAGE_RATIOS), "simulate": simulate},
        "text_generation": {"prompt": prompt, "max_output_tokens": _TOKENS, "simulate": simulate},
        "video_generation": {"prompt": prompt, "duration_seconds": _SECONDS,
                             "aspect_ratio": one_of(*VEO_RATIOS), "simulate": simulate},
    },
}
assert set(RULES) == set(KNOWN_PROVIDERS)


def params_problem(
    provider: str, operation_type: str, params: Mapping[str, Any], limits: ParamLimits
) -> str | None:
    """Why ``params`` cannot go to ``provider`` for ``operation_type``, or ``None``."""
    try:  # first: C speed, where the walk below is not
        size = len(orjson.dumps(params))
    except orjson.JSONEncodeError:  # over 255 levels: the walk below says so
        size = 0
    if size > limits.max_bytes:
        return (f"Field 'params' is {size} bytes of JSON, over the {limits.max_bytes}-byte "
                "limit (AIPIPE_PARAMS_MAX_BYTES); send large inputs by reference.")
    depth = json_depth(params, limits.max_depth)
    if depth > limits.max_depth:
        return (f"Field 'params' nests more than {limits.max_depth} levels deep "
                "(AIPIPE_PARAMS_MAX_DEPTH); send flat params.")
    rules = RULES.get(provider, {}).get(operation_type)
    if rules is None:
        return (f"Provider {provider!r} does not do {operation_type}; pick a provider that "
                "does.")
    if "prompt" not in params:
        return "Field 'params.prompt' is missing; add the prompt as a non-empty string."
    return _keys("params", params, rules, limits, f"{provider} {operation_type}")


def callback_problem(url: str | None, allowed: Sequence[str]) -> str | None:
    """Why the request's ``callback_url`` may not be called, or ``None``."""
    if url is None or any(callback_allowed(url, prefix) for prefix in allowed):
        return None
    if not allowed:
        return ("Field 'callback_url' is set but this pipeline sends no webhooks "
                "(AIPIPE_WEBHOOK_ALLOWED_URLS is empty); leave it out and read the result "
                "from the completed topic.")
    return (f"Field 'callback_url' {shown(url, 80)} is not under an allowed webhook URL "
            "(AIPIPE_WEBHOOK_ALLOWED_URLS); use an https URL the operator allowed.")


def _keys(
    where: str, params: Mapping[str, Any], rules: Mapping[str, Check], limits: ParamLimits,
    what: str,
) -> str | None:
    for key, value in params.items():
        check = rules.get(key)
        if check is None:
            name = key if key.isprintable() and len(key) <= 40 else shown(key, 40)
            return (f"Field '{where}.{name}' is not taken by {what}; use only: "
                    f"{', '.join(rules)}.")
        problem = check(f"{where}.{key}", value, limits)
        if problem is not None:
            return problem
    return None


def _what(value: Any) -> str:
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, str):
        return f"a string of {len(value)} characters" if len(value) > 40 else repr(value)
    if isinstance(value, int | float):
        return shown(value, 30)
    return {dict: "an object", list: "a list", type(None): "null"}.get(type(value), "that")
