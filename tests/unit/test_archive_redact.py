"""Prompts are not analytics: the archive keeps a hash and a length unless told otherwise."""

from __future__ import annotations

import hashlib
import json

from aipipe.consumers.archive.redact import archive_payload
from aipipe.consumers.archive.sink import archive_row
from aipipe.schemas import OperationRequested, encode

PROMPT = "a portrait of my neighbour, secret-7f3a"


def requested() -> OperationRequested:
    return OperationRequested(
        request_id="r-1", client_id="acme", operation_type="image_generation",
        model="gemini-2.5-flash-image",
        params={"prompt": PROMPT, "negative_prompt": "blurry", "n": 2, "size": "1024x1024"},
    )


def test_the_archive_keeps_params_without_prompt_text_by_default() -> None:
    row = archive_row(encode(requested()), None, "p.operations.requested", 0, 1, 0,
                      "p.deadletter")

    params = json.loads(row.payload)["params"]
    assert PROMPT not in row.payload and "blurry" not in row.payload
    assert params["prompt"] == {"redacted": True, "length": len(PROMPT),
                                "sha256": hashlib.sha256(PROMPT.encode()).hexdigest()}
    assert params["negative_prompt"]["length"] == len("blurry")
    assert (params["n"], params["size"]) == (2, "1024x1024")  # what analysts group by stays
    assert row.event_type == "operation.requested" and row.client_id == "acme"


def test_an_operator_may_keep_prompts_knowingly() -> None:
    raw = encode(requested())
    assert archive_payload(raw, keep_prompts=True) == raw.decode()
    row = archive_row(raw, None, "p.operations.requested", 0, 1, 0, "p.deadletter",
                      keep_prompts=True)
    assert json.loads(row.payload)["params"]["prompt"] == PROMPT


def test_invalid_and_dead_lettered_payloads_are_redacted_too() -> None:
    bad = json.dumps({"client_id": "acme", "params": {"prompt": PROMPT}}).encode()
    for topic in ("p.operations.requested", "p.deadletter"):
        row = archive_row(bad, [], topic, 0, 1, 0, "p.deadletter")
        assert PROMPT not in row.payload
    assert archive_payload(b"not json at all") == "not json at all"


def test_a_params_key_spelled_with_escapes_is_redacted_too() -> None:
    # the archive skips the walk for messages that cannot hold a "params" key; one spelled
    # with \u escapes still names it once parsed
    raw = encode(requested()).replace(b'"params"', b'"par\\u0061ms"')
    assert b'"params"' not in raw
    row = archive_row(raw, None, "p.operations.requested", 0, 1, 0, "p.deadletter")
    assert PROMPT not in row.payload and row.event_type == "operation.requested"
    nested = json.dumps({"metadata": {"inner": {"params": {"prompt": PROMPT}}}}).encode()
    assert PROMPT not in archive_payload(nested)
    plain = json.dumps({"event_type": "operation.completed", "usage": {"images": 1}}).encode()
    assert archive_payload(plain) == plain.decode()
