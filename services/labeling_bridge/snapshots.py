"""When and how a new dataset version is cut from the label records.

Everything is derived from the store (the latest manifest and the label records), so a restart
picks up exactly where the last process stopped. A version may also have been written by
someone else (a seed import): the next one builds on whatever the latest is.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime

from binloop.datasets import (
    DatasetManifest,
    ManifestItem,
    latest_version,
    split_for,
    write_manifest,
)
from binloop.storage import BlobStore, dataset_key, sha256_hex
from schemas.base import BlobRef, utc_now
from schemas.taxonomy import Taxonomy
from services.labeling_bridge.records import LabelRecord, load_labels

MANIFEST_CONTENT_TYPE = "application/json"


@dataclass(frozen=True)
class Snapshot:
    manifest: DatasetManifest
    ref: BlobRef


class DatasetBook:
    """The latest manifest of one dataset and the label records that are not in it yet."""

    def __init__(
        self,
        store: BlobStore,
        name: str,
        taxonomy: Taxonomy,
        snapshot_every: int,
        now: Callable[[], datetime] = utc_now,
    ) -> None:
        self.store = store
        self.name = name
        self.taxonomy = taxonomy
        self.snapshot_every = snapshot_every
        self.now = now
        self._latest: Snapshot | None = None
        self._in_latest: dict[str, str] = {}
        self._pending: dict[str, LabelRecord] = {}
        self._loaded = False

    @property
    def latest(self) -> Snapshot | None:
        """The newest version, as last read or written (None: the dataset has none yet)."""
        self._ensure_loaded()
        return self._latest

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
        return Snapshot(DatasetManifest.model_validate_json(data), ref)

    def load(self) -> None:
        """(Re)reads the latest manifest and every label record from the store."""
        version = latest_version(self.store, self.name)
        self._latest = self._read_snapshot(version) if version else None
        items = self._latest.manifest.items if self._latest else []
        self._in_latest = {item.sha256: item.label for item in items}
        self._pending = {}
        for record in load_labels(self.store, self.name):
            self._note(record)
        self._loaded = True

    def _ensure_loaded(self) -> None:
        if not self._loaded:
            self.load()

    def _note(self, record: LabelRecord) -> None:
        if self._in_latest.get(record.frame_sha256) == record.label:
            self._pending.pop(record.frame_sha256, None)
        else:
            self._pending[record.frame_sha256] = record

    def contains(self, frame_sha256: str) -> bool:
        self._ensure_loaded()
        return frame_sha256 in self._in_latest

    def add(self, record: LabelRecord) -> Snapshot | None:
        """Notes a stored label record; writes and returns a new version when one is due."""
        self._ensure_loaded()
        self._note(record)
        if len(self._pending) < self.snapshot_every:
            return None
        if latest_version(self.store, self.name) != self.version:
            # Someone else wrote a version since we read ours: count against theirs.
            self.load()
            if len(self._pending) < self.snapshot_every:
                return None
        return self._write_next()

    def _write_next(self) -> Snapshot:
        fresh = self.pending
        fresh_shas = {record.frame_sha256 for record in fresh}
        previous = self._latest.manifest.items if self._latest else []
        # A frame labeled again replaces its old item instead of appearing twice.
        items = [item for item in previous if item.sha256 not in fresh_shas]
        items += [
            ManifestItem(
                key=record.frame.key,
                sha256=record.frame_sha256,
                label=record.label,
                split=split_for(record.frame_sha256),
            )
            for record in fresh
        ]
        manifest = DatasetManifest(
            name=self.name,
            version=self.version + 1,
            created_at=self.now(),
            taxonomy_version=self.taxonomy.version,
            classes=self.taxonomy.labels,
            items=items,
        )
        ref = write_manifest(self.store, manifest)
        self._latest = Snapshot(manifest, ref)
        self._in_latest = {item.sha256: item.label for item in items}
        self._pending = {}
        return self._latest
