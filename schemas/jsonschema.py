"""JSON Schema export: one file per event type, so any language can produce events."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from schemas.events import EVENT_TYPES


def json_schemas() -> dict[str, dict[str, Any]]:
    """The JSON Schema of each event type, in serialization mode (what goes on the wire)."""
    schemas: dict[str, dict[str, Any]] = {}
    for event_type, model in EVENT_TYPES.items():
        schema = model.model_json_schema(mode="serialization")
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
