"""AsyncAPI documents for every service, generated from the code by FastStream's generator.

Our consumers take raw JetStream messages (so a malformed one can be dead-lettered instead of
failing inside the framework), which FastStream documents as an empty payload; the payload
model of each subscribed route is filled in from the routes table.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from schemas.routes import ROUTES
from services.registry import SERVICES

REF_PREFIX = "#/components/schemas/"


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


def write_asyncapi(out: Path) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for name, spec in SERVICES.items():
        settings_cls, factory = spec.load()
        service = factory(settings_cls(http_port=0))
        document = service.faststream_app().schema.to_specification().to_jsonable()
        _fill_subscriber_payloads(document)
        path = out / f"{name}.yaml"
        path.write_text(yaml.safe_dump(document, sort_keys=False, allow_unicode=True))
        written.append(path)
    return written
