"""The labeling bridge's work for one selected sample, and for one annotation that comes back
from Label Studio. No bus here.

frame in the store? -> backend -> label record -> labels.annotated, and a dataset snapshot
whenever enough new labels have gathered.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import UTC, datetime

from pydantic import ValidationError

from binloop.errors import PermanentError, TransientError
from binloop.storage import BlobStore
from binloop.storage.blobstore import check_digest
from schemas.base import BlobRef
from schemas.events import DatasetSnapshot, LabelAnnotated, SampleSelected
from schemas.taxonomy import Taxonomy
from services.labeling_bridge.announcements import UnannouncedVersion
from services.labeling_bridge.backends import Annotation, LabelingBackend
from services.labeling_bridge.intake import SeenAnnotation, TaskData
from services.labeling_bridge.records import LabelRecord, save_label, stored_label
from services.labeling_bridge.snapshots import (
    DatasetBook,
    Snapshot,
    carried_label,
    migration_path,
)

LABEL_NAMESPACE = uuid.uuid5(uuid.NAMESPACE_URL, "binloop:labels.annotated")
SNAPSHOT_NAMESPACE = uuid.uuid5(uuid.NAMESPACE_URL, "binloop:datasets.snapshot")


def annotation_event_id(
    dataset: str, frame_sha256: str, annotation_id: str, label: str, labeled_at: datetime
) -> uuid.UUID:
    """One per (frame, annotation, label, when it was labeled): the same annotation version
    seen again (a redelivery, its webhook and then reconciliation, which both carry Label
    Studio's updated_at of that version) is the same event, which JetStream drops; a corrected
    label is a new one, also a label corrected back to an earlier value within JetStream's
    duplicate window."""
    when = labeled_at.astimezone(UTC).isoformat(timespec="microseconds")
    return uuid.uuid5(LABEL_NAMESPACE, f"{dataset}:{frame_sha256}:{annotation_id}:{label}:{when}")


def snapshot_event_id(dataset: str, version: int) -> uuid.UUID:
    return uuid.uuid5(SNAPSHOT_NAMESPACE, f"{dataset}:v{version}")


@dataclass(frozen=True)
class BridgeOutcome:
    annotated: LabelAnnotated | None = None
    new_label: bool = False
    """False when the same annotation was already stored (a redelivered sample)."""
    snapshot: DatasetSnapshot | None = None
    snapshot_written: bool = False
    """False when `snapshot` announces again a version written for an earlier delivery."""


@dataclass(frozen=True)
class Migration:
    announced: DatasetSnapshot
    written: bool
    """False when `announced` is a version an earlier start wrote (announced again)."""


@dataclass(frozen=True)
class PreparedLabel:
    """An annotation from Label Studio, checked, not stored yet. Publish `annotated` first,
    then `commit` the record: a stored record means its event went out."""

    record: LabelRecord
    annotated: LabelAnnotated | None
    """None when only object or condition changed: the label event would say the same."""


class LabelingBridge:
    def __init__(
        self,
        store: BlobStore,
        backend: LabelingBackend,
        book: DatasetBook,
        taxonomy: Taxonomy,
        producer: str,
    ) -> None:
        self.store = store
        self.backend = backend
        self.book = book
        self.taxonomy = taxonomy
        self.producer = producer
        self.unannounced = UnannouncedVersion(store, book.name)

    def frame_ref(self, sample: SampleSelected) -> BlobRef:
        return self.frame(sample.frame_key, sample.frame_sha256)

    def frame(self, key: str, frame_sha256: str, *, has_task: bool = False) -> BlobRef:
        """The stored frame, its checksum verified. A frame not in the store is a
        TransientError, unless `has_task`: the bridge makes a task only once its frame is
        stored, so that frame was deleted since (retention, a privacy request) and is a
        PermanentError."""
        if not self.store.exists(key):
            if has_task:
                raise PermanentError(f"frame {key} of the annotated task is gone from the store")
            # The uploader stores frames on its own schedule (and later when a bin is offline).
            raise TransientError(f"frame {key} is not in the object store yet")
        uri = self.store.uri(key)
        data = check_digest(self.store.get(key), frame_sha256, uri)
        return BlobRef(
            key=key, uri=uri, sha256=frame_sha256, size=len(data), content_type="image/jpeg"
        )

    def handle(self, sample: SampleSelected, attempt: int = 1) -> BridgeOutcome:
        frame = self.frame_ref(sample)
        annotation = self.backend.submit(sample, frame)
        if annotation is None:
            return BridgeOutcome()
        record, new_label = save_label(self.store, self._record(sample, frame, annotation))
        annotated = self._annotated(record)
        written = self.book.add(record)
        if written is not None:
            return BridgeOutcome(annotated, new_label, self._announce(written), True)
        latest = self.book.latest
        if attempt > 1 and latest and self.book.contains(record.frame_sha256):
            # An earlier delivery may have written the version and then failed to publish it;
            # the same event_id again is dropped by JetStream if it did get out.
            return BridgeOutcome(annotated, new_label, self._announce(latest))
        return BridgeOutcome(annotated, new_label)

    def migrate(self) -> Migration | None:
        """Cuts a version in the bridge's taxonomy now when the latest is in an older one (the
        bridge runs with a new taxonomy), so training moves to the new classes without waiting
        for `snapshot_every` new labels. A latest version that a taxonomy change cut is
        announced again (same event id): the bridge may have stopped before announcing it."""
        written = self.book.migrate()
        if written is not None:
            return Migration(self._announce(written), written=True)
        latest = self.book.latest
        if latest is not None and latest.manifest.migrated_from is not None:
            return Migration(self._announce(latest), written=False)
        return None

    def unannounced_latest(self) -> DatasetSnapshot | None:
        """The latest version again (same event id) when an annotation cut it and JetStream
        has not acked its announcement (`commit` notes it before writing the manifest): the
        bridge stopped before announcing it. A version someone else wrote, or one a sample
        cut (its redelivery announces it), is not noted."""
        latest = self.book.latest
        if latest is not None and self.unannounced.owed() == latest.manifest.version:
            return self._announce(latest)
        return None

    def announced(self, snapshot: DatasetSnapshot) -> None:
        """JetStream acked `snapshot`: no start needs to announce it again."""
        self.unannounced.settle(snapshot.version)

    def prepare(self, annotation: SeenAnnotation) -> PreparedLabel | None:
        """An annotation from Label Studio -> its label record and event; None when the stored
        record already says exactly this (the webhook and reconciliation both saw it), comes
        from a newer annotation of the frame, or is this one under an older taxonomy.

        An annotation made under an older taxonomy (its task was made before a taxonomy
        change, and it was not stored before the change) is carried into the bridge's
        taxonomy by the configured migrations; one whose class was split (or that the new
        taxonomy lacks) is stored as it is, in its own taxonomy, and its frame waits to be
        labeled again (`DatasetBook.needs_relabel`)."""
        task = annotation.task
        stored = stored_label(self.store, self.book.name, task.frame_sha256)
        if stored is not None and stored.labeled_at > annotation.updated_at:
            return None  # a newer annotation of the frame (its task for a new taxonomy)
        answers = annotation.answers
        if (
            stored is not None
            and (stored.annotation_id, stored.label) == (annotation.key, answers.material)
            and answers.material not in self.taxonomy.label_to_compartment
        ):
            # Stored under an older taxonomy, listed again after the change: the dataset
            # carries the label over, or asks for the frame's label again.
            return None
        label, taxonomy_version = self._label_of(task, answers.material)
        if stored is not None and stored.says(
            label, annotation.key, answers.object_type, answers.conditions
        ):
            # Known before the frame is read: every pass lists the tasks within the overlap
            # again, and a pass without a cursor lists them all.
            return None
        try:
            record = LabelRecord(
                dataset=self.book.name,
                frame_sha256=task.frame_sha256,
                bin_id=task.bin_id,
                frame=self.frame(task.frame_key, task.frame_sha256, has_task=True),
                label=label,
                # A label waiting to be given again gets the taxonomy's fallback compartment:
                # the bridge does not know older taxonomies' compartments.
                compartment=self.taxonomy.compartment_for(label),
                backend=self.backend.name,
                annotator=annotation.annotator,
                annotation_id=annotation.key,
                taxonomy_version=taxonomy_version,
                # Label Studio's time, not ours: the same annotation is the same record.
                labeled_at=annotation.updated_at,
                object_type=answers.object_type,
                conditions=list(answers.conditions),
            )
        except ValidationError as exc:
            raise PermanentError(f"annotation {annotation.key}: {exc}") from exc
        same_label = stored is not None and (stored.label, stored.annotation_id) == (
            record.label,
            record.annotation_id,
        )
        return PreparedLabel(record, None if same_label else self._annotated(record))

    def commit(self, record: LabelRecord) -> DatasetSnapshot | None:
        """Stores a prepared record; announces the dataset version it completed, if any (call
        `announced` once JetStream acked it: until then every start announces it again)."""
        saved, _ = save_label(self.store, record)
        written = self.book.add(saved, before_write=self.unannounced.owe)
        return self._announce(written) if written is not None else None

    def _label_of(self, task: TaskData, material: str) -> tuple[str, str]:
        """(label, taxonomy version) of a label record for `material` chosen in `task`:
        in the bridge's taxonomy, or in the task's own one when it cannot be carried over."""
        current = self.taxonomy.version
        asked_in = task.asked_in
        if asked_in is None and material not in self.taxonomy.label_to_compartment:
            # A task made before tasks recorded their taxonomy: the migrations may tell.
            asked_in = self._taxonomy_naming(material)
        if asked_in is None or asked_in == current:
            self._check_label(material)
            return material, current
        path = migration_path(self.book.migrations, asked_in, current)
        carried = carried_label(material, path, self.taxonomy)
        return (carried, current) if carried is not None else (material, asked_in)

    def _taxonomy_naming(self, material: str) -> str | None:
        """The older taxonomy `material` comes from, going by the configured migrations that
        rename or split it; None when none does, or they disagree on what it becomes."""
        outcomes: dict[str, str | None] = {}
        for migration in self.book.migrations:
            if material not in migration.renames and material not in migration.splits:
                continue
            try:
                path = migration_path(self.book.migrations, migration.source, self.taxonomy.version)
            except PermanentError:
                continue  # a migration that does not lead to this taxonomy
            outcomes[migration.source] = carried_label(material, path, self.taxonomy)
        if len(set(outcomes.values())) != 1:
            return None
        return min(outcomes)

    def _check_label(self, label: str) -> None:
        if label not in self.taxonomy.label_to_compartment:
            raise PermanentError(
                f"label {label!r} is not in taxonomy {self.taxonomy.version} "
                f"({', '.join(self.taxonomy.labels)})"
            )

    def _record(
        self, sample: SampleSelected, frame: BlobRef, annotation: Annotation
    ) -> LabelRecord:
        self._check_label(annotation.label)
        return LabelRecord(
            dataset=self.book.name,
            frame_sha256=sample.frame_sha256,
            bin_id=sample.bin_id,
            frame=frame,
            label=annotation.label,
            compartment=self.taxonomy.compartment_for(annotation.label),
            backend=self.backend.name,
            annotator=annotation.annotator,
            annotation_id=annotation.annotation_id,
            taxonomy_version=self.taxonomy.version,
            labeled_at=self.book.now(),
        )

    def _annotated(self, record: LabelRecord) -> LabelAnnotated:
        return LabelAnnotated(
            event_id=annotation_event_id(
                record.dataset,
                record.frame_sha256,
                record.annotation_id,
                record.label,
                record.labeled_at,
            ),
            occurred_at=record.labeled_at,
            producer=self.producer,
            frame_sha256=record.frame_sha256,
            bin_id=record.bin_id,
            frame=record.frame,
            label=record.label,
            compartment=record.compartment,
            backend=record.backend,
            annotator=record.annotator,
            annotation_id=record.annotation_id,
            taxonomy_version=record.taxonomy_version,
        )

    def _announce(self, snapshot: Snapshot) -> DatasetSnapshot:
        manifest = snapshot.manifest
        return DatasetSnapshot(
            event_id=snapshot_event_id(manifest.name, manifest.version),
            occurred_at=manifest.created_at,
            producer=self.producer,
            name=manifest.name,
            version=manifest.version,
            manifest=snapshot.ref,
            num_items=len(manifest.items),
            class_counts=manifest.class_counts(),
            taxonomy_version=manifest.taxonomy_version,
        )
