"""The wire contract: JSON Schema files match the models, garbage is rejected, routes agree."""

from __future__ import annotations

import json
from datetime import datetime

import pytest
from pydantic import ValidationError

from schemas import ROUTES, STREAMS, FrameCaptured, InferenceResult
from schemas.base import read_json
from schemas.export import JSONSCHEMA_DIR, render_json_schemas
from schemas.routes import route_for_subject
from schemas.taxonomy import Compartment, Taxonomy

SHA = "a" * 64


def test_committed_json_schemas_match_the_models() -> None:
    rendered = render_json_schemas()
    committed = {p.name: p.read_text() for p in JSONSCHEMA_DIR.glob("*.json")}
    assert set(committed) == set(rendered), "run `binloop export-schemas`"
    stale = [name for name, text in rendered.items() if committed[name] != text]
    assert not stale, f"out of date, run `binloop export-schemas`: {stale}"


def test_every_route_is_in_exactly_one_declared_stream() -> None:
    for route in ROUTES.values():
        stream = STREAMS[route.stream]
        prefix = route.template.split(".")[0]
        assert f"{prefix}.>" in stream.subjects
        other = [s.name for s in STREAMS.values() if f"{prefix}.>" in s.subjects]
        assert other == [route.stream]


def test_subjects_resolve_back_to_their_route() -> None:
    for route in ROUTES.values():
        subject = route.subject("bin-7") if route.per_bin else route.subject()
        resolved = route_for_subject(subject)
        assert resolved is not None
        assert resolved.name == route.name
    assert route_for_subject("frames.captured.v2.bin-1") is None


def _frame(**overrides: object) -> dict[str, object]:
    base: dict[str, object] = {
        "producer": "t",
        "bin_id": "bin-1",
        "frame_sha256": SHA,
        "spool": {"key": "k", "uri": "file:///k", "sha256": SHA, "size": 1},
        "captured_at": "2026-11-22T10:00:00+00:00",
        "width": 4,
        "height": 3,
        "source": "test",
        "sequence": 0,
    }
    base.update(overrides)
    return base


def test_garbage_is_rejected_with_a_clear_message() -> None:
    FrameCaptured.model_validate(_frame())
    cases = {
        "schema_version": _frame(schema_version=2),
        "captured_at": _frame(captured_at="2026-11-22T10:00:00"),
        "bin_id": _frame(bin_id="bin.1"),
        "frame_sha256": _frame(frame_sha256="xyz"),
        "extra": _frame(extra=1),
    }
    for field, payload in cases.items():
        with pytest.raises(ValidationError) as info:
            FrameCaptured.model_validate(payload)
        assert field in str(info.value)


@pytest.mark.parametrize("literal", ["NaN", "Infinity", "-Infinity"])
def test_an_embedding_that_is_not_finite_is_rejected(literal: str) -> None:
    # pydantic's JSON parser reads these literals as floats; one of them in an embedding would
    # poison the sampler's distances, so the result is refused (and dead-lettered) instead.
    from tests.test_sampler import make_result

    good = make_result(1, 0.3).model_copy(update={"embedding": [0.5, 0.25, 0.125]})
    text = good.model_dump_json()
    assert InferenceResult.model_validate_json(text) == good
    with pytest.raises(ValidationError) as info:
        InferenceResult.model_validate_json(text.replace("[0.5,0.25,", f"[0.5,{literal},"))
    assert "embedding.1\n  Input should be a finite number" in str(info.value)


@pytest.mark.parametrize("literal", ["NaN", "Infinity", "-Infinity"])
@pytest.mark.parametrize(
    "field",
    [
        "entropy",
        "latency.read_ms",
        "latency.decode_ms",
        "latency.preprocess_ms",
        "latency.infer_ms",
        "latency.postprocess_ms",
    ],
)
def test_entropy_and_stage_latencies_must_be_finite(field: str, literal: str) -> None:
    # An infinite entropy would top every entropy ranking, an infinite stage time every latency
    # average; JSON's NaN and Infinity literals parse as floats, so the schema turns them away.
    from tests.test_sampler import make_result

    payload = make_result(1, 0.3).model_dump(mode="json")
    *parents, key = field.split(".")
    target = payload[parents[0]] if parents else payload
    target[key] = float(literal)
    text = json.dumps(payload)
    assert f'"{key}": {literal}' in text
    with pytest.raises(ValidationError) as info:
        InferenceResult.model_validate_json(text)
    assert f"{field}\n  Input should be a finite number" in str(info.value)


def test_a_result_must_agree_with_the_class_count_and_threshold_it_carries() -> None:
    from tests.test_sampler import make_result

    fields = make_result(1, 0.45, threshold=0.5).model_dump()
    assert fields["abstained"] is True
    lower = {**fields, "confidence_threshold": 0.4, "abstained": False}
    assert InferenceResult.model_validate(lower).confidence_threshold == 0.4
    cases: dict[str, dict[str, object]] = {
        "abstained is true but confidence 0.45 is not below confidence_threshold 0.4": {
            "confidence_threshold": 0.4,
            "abstained": True,
        },
        "abstained is false but confidence 0.45 is below confidence_threshold 0.5": {
            "abstained": False
        },
        "top_k lists 6 classes, more than num_classes (5)": {"num_classes": 5},
        "num_classes\n  Input should be greater than or equal to 2": {"num_classes": 1},
        "confidence_threshold\n  Input should be less than or equal to 1": {
            "confidence_threshold": 1.5
        },
    }
    for message, changes in cases.items():
        with pytest.raises(ValidationError) as info:
            InferenceResult.model_validate({**fields, **changes})
        assert message in str(info.value)
    # A result from an edge older than both fields is still valid.
    older = {**fields, "num_classes": None, "confidence_threshold": None}
    assert InferenceResult.model_validate(older).confidence_threshold is None


def test_what_another_release_wrote_is_read_without_the_keys_this_one_does_not_know() -> None:
    # A newer producer may add optional fields within v1, at any depth; a consumer on this
    # release reads its events (read_json), while building one with an unknown key still
    # fails, and what the model knows is checked as strictly as ever.
    from tests.test_sampler import make_result

    payload = make_result(1, 0.3).model_dump(mode="json")
    newer = {**payload, "added_later": 1, "top_k": [{**payload["top_k"][0], "rank": 1}]}
    result = read_json(InferenceResult, json.dumps(newer))
    assert result.top_k[0] == make_result(1, 0.3).top_k[0]
    with pytest.raises(ValidationError, match="added_later"):
        InferenceResult.model_validate_json(json.dumps(newer))
    with pytest.raises(ValidationError, match="confidence"):
        read_json(InferenceResult, json.dumps({**newer, "confidence": "high"}))
    with pytest.raises(ValidationError, match="bin_id"):
        read_json(FrameCaptured, json.dumps(_frame(bin_id="bin.1", added_later=1)))


def test_events_are_frozen_and_timezone_aware() -> None:
    frame = FrameCaptured.model_validate(_frame())
    assert isinstance(frame.occurred_at, datetime)
    assert frame.occurred_at.tzinfo is not None
    with pytest.raises(ValidationError):
        frame.bin_id = "other"  # type: ignore[misc]


def test_taxonomy_maps_labels_and_falls_back_to_trash() -> None:
    taxonomy = Taxonomy()
    assert taxonomy.compartment_for("metal") is Compartment.PLASTIC_METAL
    assert taxonomy.compartment_for("cardboard") is Compartment.PAPER_CARDBOARD
    assert taxonomy.compartment_for("banana_peel") is Compartment.TRASH
    with pytest.raises(ValidationError):
        Taxonomy(label_to_compartment={"Glass": Compartment.GLASS})


def test_no_schema_model_accepts_nan_or_infinity() -> None:
    """Every wire and stored model (events, cards, manifests, registry records) derives from
    Frozen, which refuses non-finite floats: a score, duration or metric of NaN or Infinity
    would poison every ranking, average and comparison it enters."""
    import importlib

    from schemas.base import Frozen

    for module in (  # models that subclass Frozen outside schemas/
        "binloop.datasets",
        "binloop.ml.card",
        "services.labeling_bridge.records",
        "services.labeling_bridge.snapshots",
        "services.model_registry.core",
    ):
        importlib.import_module(module)
    from schemas.events import SampleSelected

    def subclasses(cls: type[Frozen]) -> list[type[Frozen]]:
        return [cls, *(s for sub in cls.__subclasses__() for s in subclasses(sub))]

    models = subclasses(Frozen)
    assert len(models) > 20
    lenient = [m.__name__ for m in models if m.model_config.get("allow_inf_nan", True)]
    assert not lenient
    with pytest.raises(ValidationError, match="finite number"):
        SampleSelected.model_validate_json('{"score": Infinity}')
