"""JSON Schema export: one file per event type, so any language can produce events.

Each schema is exactly what ``decode`` accepts (tests/unit/test_json_schemas.py feeds
both the same inputs): the envelope fields are required although the Python
constructors default them, and free-form objects (``params``, ``metadata``, ``job``)
nest no deeper than ``decode`` allows. Two rules sit outside JSON Schema: a message is
at most ``MAX_EVENT_BYTES`` bytes, and a validator must assert ``format: date-time``
(RFC 3339) to refuse impossible dates such as February 30 that the pattern lets through.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from aipipe.schemas.events import DEPTH_MARKER, EVENT_TYPES, WIRE_REQUIRED

_SCALARS = ["string", "number", "boolean", "null"]


def _json_values(depth: int) -> dict[str, Any]:
    """``JsonValue0`` … ``JsonValue<depth>``: any JSON value nested at most that deep."""
    defs: dict[str, Any] = {"JsonValue0": {"type": _SCALARS}}
    for level in range(1, depth + 1):
        inner = {"$ref": f"#/$defs/JsonValue{level - 1}"}
        defs[f"JsonValue{level}"] = {
            "type": [*_SCALARS, "array", "object"],
            "items": inner,
            "additionalProperties": inner,
        }
    return defs


def _bound_depth(node: Any, defs: dict[str, Any]) -> None:
    """Replace each depth marker by ``additionalProperties`` one level shallower."""
    if isinstance(node, dict):
        depth = node.pop(DEPTH_MARKER, None)
        if depth is not None:
            node["additionalProperties"] = {"$ref": f"#/$defs/JsonValue{depth - 1}"}
            defs.update(_json_values(depth - 1))
        for value in node.values():
            _bound_depth(value, defs)
    elif isinstance(node, list):
        for value in node:
            _bound_depth(value, defs)


def _no_last_newline(node: Any) -> None:
    """Add ``"not": {"pattern": "\\n"}`` beside each pattern anchored with ``$``.

    In JSON Schema (ECMA-262) ``$`` is the end of the string, but Python's ``re``, which
    Python validators use, also matches it before a last newline: ``"acme\\n"`` passed
    the id pattern there and was refused by ``decode``. None of these patterns allows a
    newline anywhere, and a newline class means the same in every regex dialect."""
    if isinstance(node, dict):
        pattern = node.get("pattern")
        if isinstance(pattern, str) and pattern.endswith("$") and "not" not in node:
            node["not"] = {"pattern": "\n"}
        for value in node.values():
            _no_last_newline(value)
    elif isinstance(node, list):
        for value in node:
            _no_last_newline(value)


def json_schemas() -> dict[str, dict[str, Any]]:
    """The JSON Schema of each event type: what ``decode`` accepts for that type."""
    schemas: dict[str, dict[str, Any]] = {}
    for event_type, model in EVENT_TYPES.items():
        schema = model.model_json_schema(mode="validation")
        schema["required"] = [*WIRE_REQUIRED,
                              *(f for f in schema.get("required", []) if f not in WIRE_REQUIRED)]
        defs: dict[str, Any] = {}
        _bound_depth(schema, defs)
        _no_last_newline(schema)
        if defs:
            schema.setdefault("$defs", {}).update(defs)
        schema["$id"] = f"https://aipipe.dev/schemas/{event_type}.json"
        schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
        schemas[event_type] = schema
    return schemas


def export_json_schemas(directory: Path) -> list[Path]:
    directory.mkdir(parents=True, exist_ok=True)
    written = []
    for event_type, schema in json_schemas().items():
        path = directory / f"{event_type}.schema.json"
        path.write_text(json.dumps(schema, indent=2, sort_keys=True) + "\n")
        written.append(path)
    return written
