"""The AsyncAPI documents in docs/asyncapi are what FastStream generates from the code now."""

from __future__ import annotations

from pathlib import Path

import yaml

from binloop.docs import render_asyncapi
from schemas.routes import DLQ, FRAMES_CAPTURED, INFERENCE_RESULT

DOCS = Path(__file__).resolve().parent.parent / "docs" / "asyncapi"


def test_asyncapi_documents_are_up_to_date() -> None:
    rendered = render_asyncapi()
    committed = {p.name: p.read_text() for p in DOCS.glob("*.yaml")}
    assert set(committed) == set(rendered), "run `make docs`"
    stale = [name for name, text in rendered.items() if committed[name] != text]
    assert not stale, f"out of date, run `make docs`: {stale}"


def test_documents_carry_payload_schemas_for_what_a_service_consumes_and_publishes() -> None:
    edge = yaml.safe_load(render_asyncapi()["edge-inferencer.yaml"])
    addresses = {channel["address"] for channel in edge["channels"].values()}
    assert FRAMES_CAPTURED.subject("bin-1") in addresses
    assert INFERENCE_RESULT.subject("bin-1") in addresses
    assert DLQ.subject("edge-inferencer") in addresses
    schemas = edge["components"]["schemas"]
    assert {"FrameCaptured", "InferenceResult", "ActuationCommand", "DeadLetter"} <= set(schemas)
    assert "EmptyPayload" not in schemas
