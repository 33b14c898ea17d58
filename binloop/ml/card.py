"""The model card: a JSON file beside the ONNX file that lets anyone run the model without our
code (class order, input size, normalisation, preprocessing) and records where it came from."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import AwareDatetime, Field

from schemas.base import Frozen, read_json
from schemas.events import ModelMetrics


class ModelCard(Frozen):
    name: str = Field(min_length=1)
    version: int = Field(ge=1)
    architecture: str
    classes: list[str] = Field(min_length=2, description="Class names in output order")
    input_size: tuple[int, int] = Field(description="[height, width] of the network input")
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    color_order: Literal["RGB"] = "RGB"
    preprocessing: str = Field(
        default=(
            "Decode to RGB. Resize the whole frame to input_size (no crop, aspect ratio not "
            "kept) with an antialiased filter: area averaging when shrinking (OpenCV "
            "INTER_AREA; PIL Image.resize with BILINEAR is equivalent), bilinear when "
            "enlarging. Scale to [0, 1], subtract mean and divide by std per channel, "
            "layout NCHW float32, batch of one."
        )
    )
    output: Literal["logits", "probabilities"] = "logits"
    parameters: int = Field(ge=0)
    dataset_name: str | None = None
    dataset_version: int | None = None
    parent_version: int | None = None
    metrics: ModelMetrics | None = None
    onnx_parity_max_abs_diff: float | None = None
    created_at: AwareDatetime
    notes: str = ""

    def write(self, path: Path) -> None:
        path.write_text(self.model_dump_json(indent=2) + "\n")

    @classmethod
    def read(cls, path: Path) -> ModelCard:
        return read_json(cls, path.read_bytes())
