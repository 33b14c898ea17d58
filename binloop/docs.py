"""AsyncAPI documents for every service, generated from the code by FastStream's generator.

Our consumers take raw JetStream messages (so a malformed one can be dead-lettered instead of
failing inside the framework), which FastStream documents as an empty payload; the payload
model of each subscribed route is filled in from the routes table.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from binloop.embedded import DEMO_DIR
from schemas.routes import ROUTES
from services.registry import SERVICES

REF_PREFIX = "#/components/schemas/"
# Settings whose defaults are relative to the working directory.
DOC_OVERRIDES: dict[str, dict[str, Any]] = {
    "frame-ingestor": {"source": str(DEMO_DIR / "stream")},
    "trainer": {"eval_dir": DEMO_DIR / "eval"},
}


def _fill_subscriber_payloads(document: dict[str, Any]) -> None:
    components = document.setdefault("components", {})
    schemas: dict[str, Any] = components.setdefault("schemas", {})
    for title, message in components.get("messages", {}).items():
        if message.get("payload", {}).get("$ref") != REF_PREFIX + "EmptyPayload":
            continue
        route_name = title.split(":")[-2] if title.count(":") >= 2 else ""
        route = ROUTES.get(route_name)
        if route is None:
            continue
        schema = route.model.model_json_schema(ref_template=REF_PREFIX + "{model}")
        schemas.update(schema.pop("$defs", {}))
        schemas[route.model.__name__] = schema
        message["payload"] = {"$ref": REF_PREFIX + route.model.__name__}
    if not any(
        m.get("payload", {}).get("$ref") == REF_PREFIX + "EmptyPayload"
        for m in components.get("messages", {}).values()
    ):
        schemas.pop("EmptyPayload", None)


def _sort_sections(document: dict[str, Any]) -> None:
    """FastStream's order of channels varies between runs; a stable order keeps the committed
    documents diffable and their drift check meaningful."""
    for section in ("channels", "operations"):
        document[section] = dict(sorted(document.get(section, {}).items()))
    components = document.get("components", {})
    for section in ("messages", "schemas"):
        components[section] = dict(sorted(components.get(section, {}).items()))


def render_asyncapi() -> dict[str, str]:
    """File name -> AsyncAPI YAML for every service."""
    documents = {}
    for name, spec in SERVICES.items():
        settings_cls, factory = spec.load()
        overrides = DOC_OVERRIDES.get(name, {})
        service = factory(settings_cls(http_port=0, **overrides))
        document = service.faststream_app().schema.to_specification().to_jsonable()
        _fill_subscriber_payloads(document)
        _sort_sections(document)
        documents[f"{name}.yaml"] = yaml.safe_dump(document, sort_keys=False, allow_unicode=True)
    return documents


def write_asyncapi(out: Path) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for name, text in render_asyncapi().items():
        path = out / name
        path.write_text(text)
        written.append(path)
    return written
