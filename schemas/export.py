"""Writes one JSON Schema file per route, so other languages and reviewers see the contract."""

from __future__ import annotations

import json
from pathlib import Path

from schemas.routes import ROUTES

JSONSCHEMA_DIR = Path(__file__).parent / "jsonschema" / "v1"


def render_json_schemas() -> dict[str, str]:
    """File name -> JSON text, for every route's payload model."""
    files: dict[str, str] = {}
    for route in ROUTES.values():
        schema = route.model.model_json_schema(mode="validation")
        schema["$id"] = f"https://binloop.dev/schemas/v1/{route.name}.json"
        schema["x-subject"] = route.template
        schema["x-stream"] = route.stream
        files[f"{route.name}.json"] = json.dumps(schema, indent=2, sort_keys=True) + "\n"
    return files


def write_json_schemas(directory: Path = JSONSCHEMA_DIR) -> list[Path]:
    directory.mkdir(parents=True, exist_ok=True)
    written = []
    for name, text in render_json_schemas().items():
        path = directory / name
        path.write_text(text)
        written.append(path)
    return written
