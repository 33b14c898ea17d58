"""The Label Studio import format: a labeling config listing the taxonomy, and one task per
sample with the model's prediction as a pre-annotation."""

from __future__ import annotations

from typing import Any
from xml.sax.saxutils import quoteattr

from schemas.base import BlobRef
from schemas.events import SampleSelected
from schemas.taxonomy import Taxonomy

FROM_NAME = "label"
TO_NAME = "image"


def label_config_xml(taxonomy: Taxonomy) -> str:
    choices = "\n".join(f"    <Choice value={quoteattr(label)}/>" for label in taxonomy.labels)
    return (
        f"<View>\n"
        f'  <Image name="{TO_NAME}" value="$image"/>\n'
        f'  <Choices name="{FROM_NAME}" toName="{TO_NAME}" choice="single-radio" '
        f'showInline="true">\n'
        f"{choices}\n"
        f"  </Choices>\n"
        f"</View>\n"
    )


def import_task(sample: SampleSelected, frame: BlobRef) -> dict[str, Any]:
    """One task; `data` also carries what the annotation needs on its way back."""
    top = max(sample.predicted, key=lambda score: score.probability)
    return {
        "data": {
            "image": frame.uri,
            "frame_sha256": sample.frame_sha256,
            "frame_key": frame.key,
            "bin_id": sample.bin_id,
            "captured_at": sample.captured_at.isoformat(),
            "strategy": sample.strategy,
            "sampling_score": sample.score,
            "reason": sample.reason,
        },
        "predictions": [
            {
                "model_version": f"{sample.model_name}:v{sample.model_version}",
                "score": top.probability,
                "result": [
                    {
                        "from_name": FROM_NAME,
                        "to_name": TO_NAME,
                        "type": "choices",
                        "value": {"choices": [top.label]},
                    }
                ],
            }
        ],
    }
