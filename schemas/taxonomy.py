"""Bin compartments and the configurable mapping from (richer) labels to compartments."""

from __future__ import annotations

from enum import StrEnum
from pathlib import Path

import yaml
from pydantic import Field, model_validator

from schemas.base import Frozen


class Compartment(StrEnum):
    PLASTIC_METAL = "plastic_metal"
    PAPER_CARDBOARD = "paper_cardboard"
    GLASS = "glass"
    TRASH = "trash"


COMPARTMENTS: tuple[Compartment, ...] = tuple(Compartment)

TRASHNET_TO_COMPARTMENT: dict[str, Compartment] = {
    "cardboard": Compartment.PAPER_CARDBOARD,
    "paper": Compartment.PAPER_CARDBOARD,
    "glass": Compartment.GLASS,
    "plastic": Compartment.PLASTIC_METAL,
    "metal": Compartment.PLASTIC_METAL,
    "trash": Compartment.TRASH,
}


class Taxonomy(Frozen):
    """Labels a model may emit, and where each one goes. Versioned because it changes."""

    version: str = Field(default="trashnet-6", min_length=1)
    label_to_compartment: dict[str, Compartment] = Field(
        default_factory=lambda: dict(TRASHNET_TO_COMPARTMENT)
    )
    fallback: Compartment = Field(
        default=Compartment.TRASH,
        description="Where unknown labels and abstentions go: trash is the safe choice.",
    )

    @model_validator(mode="after")
    def _labels_are_lower_case(self) -> Taxonomy:
        bad = [label for label in self.label_to_compartment if label != label.lower()]
        if bad:
            raise ValueError(f"labels must be lower-case, got {bad}")
        return self

    @property
    def labels(self) -> list[str]:
        return sorted(self.label_to_compartment)

    def compartment_for(self, label: str) -> Compartment:
        return self.label_to_compartment.get(label, self.fallback)

    @classmethod
    def from_yaml(cls, path: Path) -> Taxonomy:
        return cls.model_validate(yaml.safe_load(path.read_text()))
