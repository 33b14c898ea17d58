"""The Label Studio formats: a labeling config for the taxonomy (material, object, condition,
with the compartment each material goes to), one task per sample with the model's prediction
as a pre-annotation, one per frame a taxonomy change sends back, and reading an annotation's
answers back."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any
from xml.sax.saxutils import quoteattr

from binloop.errors import PermanentError
from schemas.base import BlobRef
from schemas.events import SampleSelected
from schemas.taxonomy import Taxonomy
from services.labeling_bridge.relabel import RelabelRequest

FROM_NAME = "material"
"""The control annotators answer with the material: a taxonomy label."""
OBJECT_NAME = "object"
CONDITION_NAME = "condition"
TO_NAME = "image"


def _choices(values: Sequence[str], hints: dict[str, str] | None = None) -> str:
    lines = []
    for value in values:
        hint = f" hint={quoteattr(hints[value])}" if hints and value in hints else ""
        lines.append(f"    <Choice value={quoteattr(value)}{hint}/>")
    return "\n".join(lines)


def label_config_xml(
    taxonomy: Taxonomy, objects: Sequence[str] = (), conditions: Sequence[str] = ()
) -> str:
    """Material is required (single choice); object and condition are optional."""
    hints = {label: f"goes to {taxonomy.compartment_for(label).value}" for label in taxonomy.labels}
    parts = [
        "<View>",
        f'  <Image name="{TO_NAME}" value="$image"/>',
        f'  <Header value="Material (taxonomy {taxonomy.version})"/>',
        f'  <Choices name="{FROM_NAME}" toName="{TO_NAME}" choice="single-radio" '
        f'showInline="true" required="true">',
        _choices(taxonomy.labels, hints),
        "  </Choices>",
    ]
    if objects:
        parts += [
            '  <Header value="Object"/>',
            f'  <Choices name="{OBJECT_NAME}" toName="{TO_NAME}" choice="single" '
            f'showInline="true">',
            _choices(objects),
            "  </Choices>",
        ]
    if conditions:
        parts += [
            '  <Header value="Condition"/>',
            f'  <Choices name="{CONDITION_NAME}" toName="{TO_NAME}" choice="multiple" '
            f'showInline="true">',
            _choices(conditions),
            "  </Choices>",
        ]
    parts.append("</View>")
    return "\n".join(parts) + "\n"


def model_version_of(model_name: str, model_version: int) -> str:
    return f"{model_name}:v{model_version}"


def choice_result(label: str) -> list[dict[str, Any]]:
    """A prediction's `result`: the material choice."""
    return [
        {
            "from_name": FROM_NAME,
            "to_name": TO_NAME,
            "type": "choices",
            "value": {"choices": [label]},
        }
    ]


def import_task(
    sample: SampleSelected, frame: BlobRef, taxonomy_version: str, image_url: str | None = None
) -> dict[str, Any]:
    """One task; `data` also carries what the annotation needs on its way back, including the
    taxonomy its choices come from: an annotation that arrives after a taxonomy change is
    carried into the new one by the configured migrations.

    `image_url` is what annotators' browsers load; by default the frame's store URI (which
    Label Studio resolves itself when the project has a storage connection for it)."""
    top = max(sample.predicted, key=lambda score: score.probability)
    return {
        "data": {
            "image": image_url or frame.uri,
            "frame_sha256": sample.frame_sha256,
            "frame_key": frame.key,
            "frame_uri": frame.uri,
            "bin_id": sample.bin_id,
            "captured_at": sample.captured_at.isoformat(),
            "selected_at": sample.occurred_at.isoformat(),
            "strategy": sample.strategy,
            "sampling_score": sample.score,
            "reason": sample.reason,
            "taxonomy_version": taxonomy_version,
        },
        "predictions": [
            {
                "model_version": model_version_of(sample.model_name, sample.model_version),
                "score": top.probability,
                "result": choice_result(top.label),
            }
        ],
    }


def relabel_task(request: RelabelRequest, image_url: str, asked_at: datetime) -> dict[str, Any]:
    """A task asking for a frame's label again after a taxonomy change. No pre-annotation:
    the champion was trained on the old classes, and the old label is the one that no longer
    fits. `relabel_for` tells it from the frame's first task."""
    frame = request.frame
    return {
        "data": {
            "image": image_url,
            "frame_sha256": frame.sha256,
            "frame_key": frame.key,
            "frame_uri": frame.uri,
            "bin_id": request.bin_id,
            "selected_at": asked_at.isoformat(),
            "relabel_for": request.taxonomy_version,
            "previous_label": request.old_label,
            "reason": request.reason,
        },
        "predictions": [],
    }


@dataclass(frozen=True)
class Answers:
    """What an annotator chose: the material (a taxonomy label), and optionally more."""

    material: str
    object_type: str | None = None
    conditions: tuple[str, ...] = ()


def read_answers(result: Sequence[Any]) -> Answers:
    """An annotation's `result` -> its answers. PermanentError when it names no material."""
    chosen: dict[str, list[str]] = {}
    for region in result:
        if not isinstance(region, dict) or region.get("type") != "choices":
            continue
        value = region.get("value")
        choices = value.get("choices") if isinstance(value, dict) else None
        if isinstance(choices, list) and all(isinstance(c, str) for c in choices):
            chosen[str(region.get("from_name"))] = choices
    materials = chosen.get(FROM_NAME, [])
    if len(materials) != 1:
        raise PermanentError(
            f"an annotation must choose exactly one {FROM_NAME!r}, this one chose {materials}"
        )
    objects = chosen.get(OBJECT_NAME, [])
    return Answers(
        material=materials[0],
        object_type=objects[0] if objects else None,
        conditions=tuple(sorted(chosen.get(CONDITION_NAME, []))),
    )
