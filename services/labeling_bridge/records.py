"""Label records in the object store: one JSON per (dataset, frame), written idempotently."""

from __future__ import annotations

import logging
import posixpath
from collections.abc import Sequence

from pydantic import AwareDatetime, Field, ValidationError

from binloop.storage import BlobStore, label_key
from schemas.base import BinId, BlobRef, Frozen, Name, Sha256
from schemas.events import Label
from schemas.taxonomy import Compartment

log = logging.getLogger(__name__)


class LabelRecord(Frozen):
    dataset: Name
    frame_sha256: Sha256
    bin_id: BinId
    frame: BlobRef
    label: Label
    compartment: Compartment
    backend: Name
    annotator: Name
    annotation_id: Name
    taxonomy_version: Name
    labeled_at: AwareDatetime
    object_type: Label | None = Field(
        default=None, description="What the item is (cup, bottle, ...), when the annotator said"
    )
    conditions: list[Label] = Field(
        default_factory=list, description="The item's condition (soiled, crushed, ...)"
    )

    def same_annotation(self, other: LabelRecord) -> bool:
        """Whether `other` says the same as this record (who, and every answer)."""
        return self.says(other.label, other.annotation_id, other.object_type, other.conditions)

    def says(
        self,
        label: str,
        annotation_id: str,
        object_type: str | None,
        conditions: Sequence[str],
    ) -> bool:
        """Whether this record holds exactly these answers of this annotation."""
        return (self.label, self.annotation_id, self.object_type, self.conditions) == (
            label,
            annotation_id,
            object_type,
            list(conditions),
        )


def label_prefix(dataset: str) -> str:
    """The folder of a dataset's label records, derived so the layout stays in keys.py."""
    return posixpath.dirname(label_key(dataset, "0" * 64)) + "/"


def stored_label(store: BlobStore, dataset: str, frame_sha256: str) -> LabelRecord | None:
    key = label_key(dataset, frame_sha256)
    if not store.exists(key):
        return None
    return LabelRecord.model_validate_json(store.get(key))


def save_label(store: BlobStore, record: LabelRecord) -> tuple[LabelRecord, bool]:
    """Stores `record` unless the same annotation is already there. Returns the stored record
    and whether it was written now.

    Keeping the stored record (and its labeled_at) makes a redelivered sample produce exactly
    the same record and event as the first time.
    """
    stored = stored_label(store, record.dataset, record.frame_sha256)
    if stored is not None and stored.same_annotation(record):
        return stored, False
    key = label_key(record.dataset, record.frame_sha256)
    store.put(key, record.model_dump_json(indent=1).encode(), "application/json")
    return record, True


def load_labels(store: BlobStore, dataset: str) -> list[LabelRecord]:
    """Every readable record of the dataset. One that cannot be read is left out with an
    error naming it (its frame waits for a new annotation), so it cannot stop every version."""
    records = []
    for key in store.list(label_prefix(dataset)):
        if not key.endswith(".json"):
            continue
        try:
            records.append(LabelRecord.model_validate_json(store.get(key)))
        except ValidationError as exc:
            log.error("label record %s is unreadable and left out: %s", key, exc)
    return records
