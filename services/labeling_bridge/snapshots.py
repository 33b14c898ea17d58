"""When and how a new dataset version is cut from the label records, and how a version made
under an older taxonomy is carried into a newer one (classes merged or split).

Everything is derived from the store (the latest manifest and the label records), so a restart
picks up exactly where the last process stopped. A version may also have been written by
someone else (a seed import): the next one builds on whatever the latest is.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime

from pydantic import Field, model_validator

from binloop.datasets import (
    DatasetManifest,
    ManifestItem,
    latest_version,
    split_for,
    write_manifest,
)
from binloop.errors import PermanentError
from binloop.storage import BlobStore, dataset_key, sha256_hex
from schemas.base import BlobRef, Frozen, read_json, utc_now
from schemas.taxonomy import Taxonomy
from services.labeling_bridge.records import LabelRecord, load_labels

MANIFEST_CONTENT_TYPE = "application/json"


@dataclass(frozen=True)
class Snapshot:
    manifest: DatasetManifest
    ref: BlobRef


class TaxonomyMigration(Frozen):
    """How the labels of taxonomy version `source` become labels of version `target`.

    A label in neither map keeps its name. `renames` also expresses merges (several old labels
    to one new). A split class cannot be decided from the old label alone: its items leave the
    dataset until someone labels them again under the new taxonomy.
    """

    source: str = Field(min_length=1, description="Taxonomy version the labels come from")
    target: str = Field(min_length=1, description="Taxonomy version they are carried into")
    renames: dict[str, str] = Field(
        default_factory=dict, description="old label -> new label (a rename or a merge)"
    )
    splits: dict[str, list[str]] = Field(
        default_factory=dict, description="old label -> the new labels it was split into"
    )

    @model_validator(mode="after")
    def _consistent(self) -> TaxonomyMigration:
        if self.source == self.target:
            raise ValueError(f"a migration needs two versions, got {self.source!r} twice")
        both = sorted(set(self.renames) & set(self.splits))
        if both:
            raise ValueError(f"labels both renamed and split: {both}")
        narrow = sorted(old for old, new in self.splits.items() if len(new) < 2)
        if narrow:
            raise ValueError(f"a split needs at least two new labels: {narrow}")
        return self

    def map_label(self, label: str) -> str | None:
        """The label under `target`, or None when the item must be labeled again."""
        if label in self.splits:
            return None
        return self.renames.get(label, label)


@dataclass(frozen=True)
class Migrated:
    items: list[ManifestItem]
    needs_relabel: list[ManifestItem]
    """Items of split classes, or whose label the target taxonomy lacks (old labels kept)."""


def migration_path(
    migrations: Sequence[TaxonomyMigration], source: str, target: str
) -> list[TaxonomyMigration]:
    """The chain of migrations from `source` to `target` (empty when they are equal)."""
    by_source = {m.source: m for m in migrations}
    path: list[TaxonomyMigration] = []
    version = source
    while version != target:
        step = by_source.get(version)
        if step is None or step in path:
            raise PermanentError(
                f"no taxonomy migration leads from {source!r} to {target!r} "
                f"(configured: {', '.join(f'{m.source}->{m.target}' for m in migrations)})"
            )
        path.append(step)
        version = step.target
    return path


def carried_label(label: str, path: Sequence[TaxonomyMigration], taxonomy: Taxonomy) -> str | None:
    """`label` after the migrations of `path`, or None when it must be labeled again (its
    class was split, or `taxonomy` lacks what it became)."""
    current: str | None = label
    for step in path:
        current = step.map_label(current) if current is not None else None
    return current if current in taxonomy.label_to_compartment else None


def migrate_items(
    items: Sequence[ManifestItem],
    source: str,
    taxonomy: Taxonomy,
    migrations: Sequence[TaxonomyMigration],
) -> Migrated:
    """Carries items labeled under taxonomy `source` into `taxonomy`."""
    path = migration_path(migrations, source, taxonomy.version)
    kept: list[ManifestItem] = []
    relabel: list[ManifestItem] = []
    for item in items:
        label = carried_label(item.label, path, taxonomy)
        if label is None:
            relabel.append(item)
        else:
            kept.append(item if label == item.label else item.model_copy(update={"label": label}))
    return Migrated(kept, relabel)


class DatasetBook:
    """The latest manifest of one dataset and the label records that are not in it yet."""

    def __init__(
        self,
        store: BlobStore,
        name: str,
        taxonomy: Taxonomy,
        snapshot_every: int,
        now: Callable[[], datetime] = utc_now,
        migrations: Sequence[TaxonomyMigration] = (),
    ) -> None:
        self.store = store
        self.name = name
        self.taxonomy = taxonomy
        self.snapshot_every = snapshot_every
        self.now = now
        self.migrations = list(migrations)
        self._latest: Snapshot | None = None
        self._in_latest: dict[str, str] = {}
        self._relabel: dict[str, str] = {}
        """sha256 -> the old label of each item the latest version lists as needs_relabel."""
        self._pending: dict[str, LabelRecord] = {}
        self._loaded = False

    @property
    def latest(self) -> Snapshot | None:
        """The newest version, as last read or written (None: the dataset has none yet)."""
        self._ensure_loaded()
        return self._latest

    @property
    def needs_relabel(self) -> list[ManifestItem]:
        """Items a taxonomy change took out of the dataset until they are labeled again: those
        the latest version lists, then labels given under an older taxonomy since (an
        annotation that arrived after the change) that cannot be carried into this one, which
        the next version lists."""
        latest = self.latest
        waiting = list(latest.manifest.needs_relabel) if latest else []
        listed = {item.sha256 for item in waiting}
        for record in self.pending:
            if record.frame_sha256 not in listed and self._waits_for_relabel(record):
                waiting.append(_item(record))
        return waiting

    @property
    def version(self) -> int:
        latest = self.latest
        return latest.manifest.version if latest else 0

    @property
    def pending(self) -> list[LabelRecord]:
        """Records whose (frame, label) the latest manifest lacks, oldest first."""
        self._ensure_loaded()
        return sorted(self._pending.values(), key=lambda r: (r.labeled_at, r.frame_sha256))

    def _read_snapshot(self, version: int) -> Snapshot:
        key = dataset_key(self.name, version)
        data = self.store.get(key)
        ref = BlobRef(
            key=key,
            uri=self.store.uri(key),
            sha256=sha256_hex(data),
            size=len(data),
            content_type=MANIFEST_CONTENT_TYPE,
        )
        return Snapshot(read_json(DatasetManifest, data), ref)

    def load(self) -> None:
        """(Re)reads the latest manifest and every label record from the store."""
        version = latest_version(self.store, self.name)
        self._latest = self._read_snapshot(version) if version else None
        self._remember(self._latest.manifest if self._latest else None)
        self._pending = {}
        for record in load_labels(self.store, self.name):
            self._note(record)
        self._loaded = True

    def _ensure_loaded(self) -> None:
        if not self._loaded:
            self.load()

    def _remember(self, manifest: DatasetManifest | None) -> None:
        self._in_latest = {item.sha256: item.label for item in manifest.items} if manifest else {}
        self._relabel = (
            {item.sha256: item.label for item in manifest.needs_relabel} if manifest else {}
        )

    def _note(self, record: LabelRecord) -> None:
        """Pending unless the latest version already says what `record` says (in the book's
        taxonomy: a label given before a taxonomy change counts as what it became)."""
        sha = record.frame_sha256
        if record.taxonomy_version == self.taxonomy.version:
            in_latest = self._in_latest.get(sha) == record.label
        elif self._relabel.get(sha) == record.label:
            in_latest = True  # its old label, which the latest version lists as needs_relabel
        else:
            # One that cannot be carried over is pending too: the next version lists it as
            # needs_relabel (or names the missing migration).
            carried = self._carried(record)
            in_latest = carried is not None and self._in_latest.get(sha) == carried
        if in_latest:
            self._pending.pop(sha, None)
        else:
            self._pending[sha] = record

    def _carried(self, record: LabelRecord) -> str | None:
        try:
            path = migration_path(self.migrations, record.taxonomy_version, self.taxonomy.version)
        except PermanentError:
            return None  # pending: cutting the next version names the missing migration
        return carried_label(record.label, path, self.taxonomy)

    def _waits_for_relabel(self, record: LabelRecord) -> bool:
        if record.taxonomy_version == self.taxonomy.version:
            return False
        try:
            path = migration_path(self.migrations, record.taxonomy_version, self.taxonomy.version)
        except PermanentError:
            return False  # nobody can label it again before the migrations are fixed
        return carried_label(record.label, path, self.taxonomy) is None

    def contains(self, frame_sha256: str) -> bool:
        self._ensure_loaded()
        return frame_sha256 in self._in_latest

    def add(
        self, record: LabelRecord, before_write: Callable[[int], None] | None = None
    ) -> Snapshot | None:
        """Notes a stored label record; writes and returns a new version when one is due.
        `before_write` is called with the version's number before its manifest is written."""
        self._ensure_loaded()
        self._note(record)
        if len(self._pending) < self.snapshot_every:
            return None
        if latest_version(self.store, self.name) != self.version:
            # Someone else wrote a version since we read ours: count against theirs.
            self.load()
            if len(self._pending) < self.snapshot_every:
                return None
        if before_write is not None:
            before_write(self.version + 1)
        return self._write_next()

    def migrate(self) -> Snapshot | None:
        """Writes a version in the current taxonomy now if the latest one is in another."""
        latest = self.latest
        if latest is None or latest.manifest.taxonomy_version == self.taxonomy.version:
            return None
        return self._write_next()

    def _write_next(self) -> Snapshot:
        fresh = self.pending
        fresh_shas = {record.frame_sha256 for record in fresh}
        previous = self._latest.manifest if self._latest else None
        # A frame labeled again replaces its old item instead of appearing twice.
        kept = (
            [item for item in previous.items if item.sha256 not in fresh_shas] if previous else []
        )
        carried = migrate_items(
            kept,
            previous.taxonomy_version if previous else self.taxonomy.version,
            self.taxonomy,
            self.migrations,
        )
        items = list(carried.items)
        # Still waiting from earlier versions (unless labeled again now), then the new ones.
        waiting = previous.needs_relabel if previous else []
        relabel = [item for item in waiting if item.sha256 not in fresh_shas]
        relabel += carried.needs_relabel
        for record in fresh:
            item = _item(record)
            # Labels given under an older taxonomy (before a restart with a new one) move too.
            moved = migrate_items([item], record.taxonomy_version, self.taxonomy, self.migrations)
            items += moved.items
            relabel += moved.needs_relabel
        manifest = DatasetManifest(
            name=self.name,
            version=self.version + 1,
            created_at=self.now(),
            taxonomy_version=self.taxonomy.version,
            classes=self.taxonomy.labels,
            items=items,
            needs_relabel=list({item.sha256: item for item in relabel}.values()),
            migrated_from=(
                previous.taxonomy_version
                if previous is not None and previous.taxonomy_version != self.taxonomy.version
                else None
            ),
        )
        ref = write_manifest(self.store, manifest)
        self._latest = Snapshot(manifest, ref)
        self._remember(manifest)
        self._pending = {}
        return self._latest


def _item(record: LabelRecord) -> ManifestItem:
    return ManifestItem(
        key=record.frame.key,
        sha256=record.frame_sha256,
        label=record.label,
        split=split_for(record.frame_sha256),
    )
