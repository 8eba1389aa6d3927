"""Params held to what each provider reads, at admission: one sentence per problem."""

from __future__ import annotations

from typing import Any

import pytest

from aipipe.streams.admission.params import ParamLimits, params_problem

LIMITS = ParamLimits()
P = {"prompt": "a lighthouse at dawn"}


def deep(levels: int) -> dict[str, Any]:
    value: dict[str, Any] = {}
    for _ in range(levels - 1):
        value = {"a": value}
    return value


@pytest.mark.parametrize(("provider", "kind", "params"), [
    ("simulated", "image_generation", {**P, "n": 4, "aspect_ratio": "16:9"}),
    ("simulated", "image_generation", {**P, "simulate": {"latency_ms": 5000, "polls": 20,
                                                         "fail": True}}),
    ("simulated", "text_generation", {**P, "max_output_tokens": 65_536}),
    ("simulated", "video_generation", {**P, "duration_seconds": 8, "simulate": {"polls": 3}}),
    ("gemini", "image_generation", P),
    ("gemini", "text_generation", {**P, "max_output_tokens": 1}),
    ("gemini", "video_generation", {**P, "duration_seconds": 6,
                                    "output_gcs_uri": "gs://bucket/videos/"}),
    ("simulated", "image_generation", {"prompt": "x" * 8_000}),
])
def test_what_the_provider_reads_is_accepted(provider: str, kind: str,
                                             params: dict[str, Any]) -> None:
    assert params_problem(provider, kind, params, LIMITS) is None


@pytest.mark.parametrize(("provider", "kind", "params", "sentence"), [
    ("simulated", "image_generation", {**P, "n": 1e30},
     "Field 'params.n' must be a whole number from 1 to 4 (AIPIPE_IMAGE_MAX_COUNT), not 1e+30"),
    ("simulated", "image_generation", {**P, "n": 0}, "Field 'params.n' must be a whole number"),
    ("simulated", "image_generation", {**P, "n": True}, "not true"),
    ("simulated", "image_generation", {**P, "n": "2"}, "not '2'"),
    ("simulated", "image_generation", {**P, "n": 2.0}, "not 2.0"),
    ("gemini", "image_generation", {**P, "n": 2},
     "Field 'params.n' is not taken by gemini image_generation; use only: prompt."),
    ("simulated", "image_generation", {"n": 1}, "Field 'params.prompt' is missing"),
    ("simulated", "image_generation", {"prompt": ""}, "1 to 8000 characters, not ''"),
    ("simulated", "image_generation", {"prompt": "x" * 8_001},
     "not a string of 8001 characters"),
    ("simulated", "image_generation", {"prompt": ["a"]}, "not a list"),
    ("simulated", "image_generation", {**P, "aspect_ratio": "7:3"},
     "Field 'params.aspect_ratio' must be one of 1:1, 2:3"),
    ("simulated", "image_generation", {**P, "seed": 7},
     "Field 'params.seed' is not taken by simulated image_generation; use only: prompt, n, "
     "aspect_ratio, simulate."),
    ("simulated", "text_generation", {**P, "max_output_tokens": 10**9},
     "'params.max_output_tokens' must be a whole number from 1 to 65536"),
    ("gemini", "video_generation", {**P, "duration_seconds": 5},
     "Field 'params.duration_seconds' must be one of 4, 6, 8, not 5"),
    ("simulated", "video_generation", {**P, "duration_seconds": 9},
     "from 1 to 8 (AIPIPE_VIDEO_MAX_SECONDS), not 9"),
    ("simulated", "video_generation", {**P, "duration_seconds": 8.5}, "not 8.5"),
    ("gemini", "video_generation", {**P, "output_gcs_uri": "s3://b/k"}, "gs://bucket/path URI"),
    # longer than a started video's job keeps to check the answer against
    ("gemini", "video_generation", {**P, "output_gcs_uri": "gs://bucket/" + "v" * 989},
     "gs://bucket/path URI of at most 1000 characters, not a string of 1001 characters"),
    ("simulated", "image_generation", {**P, "simulate": {"latency_ms": 3_600_000}},
     "'params.simulate.latency_ms' must be a whole number from 0 to 5000 "
     "(AIPIPE_SIMULATED_MAX_LATENCY_MS)"),
    ("simulated", "video_generation", {**P, "simulate": {"polls": 10_000}},
     "'params.simulate.polls' must be a whole number from 1 to 20 (AIPIPE_SIMULATED_MAX_POLLS)"),
    ("simulated", "image_generation", {**P, "simulate": {"fail": "yes"}},
     "'params.simulate.fail' must be true or false"),
    ("simulated", "image_generation", {**P, "simulate": {"sleep": 1}},
     "'params.simulate.sleep' is not taken by the simulated provider's script"),
    ("simulated", "image_generation", {**P, "simulate": 5}, "must be an object"),
    ("gemini", "image_generation", {**P, "simulate": {"fail": True}},
     "'params.simulate' is not taken by gemini image_generation"),
    ("simulated", "image_generation", {**P, "x": deep(5)},
     "Field 'params' nests more than 4 levels deep (AIPIPE_PARAMS_MAX_DEPTH)"),
    ("simulated", "image_generation", {**P, "x": deep(100_000)}, "nests more than 4 levels"),
    ("simulated", "image_generation", {**P, "x": "y" * 70_000},
     "over the 65536-byte limit (AIPIPE_PARAMS_MAX_BYTES)"),
    ("stability", "text_generation", P, "Provider 'stability' does not do text_generation"),
])
def test_what_the_provider_cannot_read_is_refused_in_one_sentence(
    provider: str, kind: str, params: dict[str, Any], sentence: str,
) -> None:
    problem = params_problem(provider, kind, params, LIMITS)
    assert problem is not None and sentence in problem
    assert problem.count(". ") == 0 and problem.endswith(".")  # one sentence
    assert len(problem) < 300


def test_limits_come_from_settings() -> None:
    from aipipe.infra.settings import Settings
    from aipipe.streams.admission.gate import rules_from_settings

    rules = rules_from_settings(Settings(image_max_count=8, simulated_enabled=True,
                                         providers=""))
    assert rules.providers == frozenset({"simulated"})
    assert params_problem("simulated", "image_generation", {**P, "n": 8}, rules.params) is None
