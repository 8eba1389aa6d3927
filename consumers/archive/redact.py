"""Prompts are not analytics: what of a message's payload ``events_archive`` keeps.

By default every prompt-like value inside an event's ``params`` (any key naming a prompt,
and the free-text keys ``messages``, ``contents``, ``system_instruction``,
``instructions``, ``input``, ``text``) is replaced by its SHA-256 and its length, so an
analyst can still count, group and match identical prompts without reading them. An
operator who wants the text keeps it with ``AIPIPE_ARCHIVE_PROMPTS=true``. A payload
that is not JSON (an undecodable message) is kept as it came: there are no params to find.
"""

from __future__ import annotations

import hashlib
from typing import Any

import orjson

TEXT_KEYS = frozenset({"messages", "contents", "system_instruction", "instructions", "input",
                       "text"})


def is_prompt(key: str) -> bool:
    return "prompt" in key.lower() or key.lower() in TEXT_KEYS


def fingerprint(value: Any) -> dict[str, Any]:
    text = value if isinstance(value, str) else orjson.dumps(value).decode()
    return {"redacted": True, "sha256": hashlib.sha256(text.encode()).hexdigest(),
            "length": len(text)}


def _redact(node: Any) -> Any:
    if isinstance(node, dict):
        out: dict[str, Any] = {}
        for key, value in node.items():
            if key == "params" and isinstance(value, dict):
                out[key] = {k: fingerprint(v) if is_prompt(str(k)) else _redact(v)
                            for k, v in value.items()}
            else:
                out[key] = _redact(value)
        return out
    if isinstance(node, list):
        return [_redact(v) for v in node]
    return node


def archive_payload(value: bytes | None, keep_prompts: bool = False) -> str:
    """The payload column for one message: the message, prompts hashed unless kept."""
    text = value or b""
    if keep_prompts:
        return text.decode("utf-8", "replace")
    try:
        data = orjson.loads(text)
    except orjson.JSONDecodeError:
        return text.decode("utf-8", "replace")
    return parsed_payload(text, data)


def parsed_payload(value: bytes, data: Any, keep_prompts: bool = False) -> str:
    """``archive_payload`` of a message whose JSON value (``data``) is already parsed."""
    raw = value.decode("utf-8", "replace")
    # no "params" key can be in a message whose text has neither the word nor a \u escape
    if keep_prompts or (b"params" not in value and b"\\u" not in value):
        return raw
    redacted = _redact(data)
    return raw if redacted == data else orjson.dumps(redacted).decode()
