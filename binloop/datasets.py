"""Dataset snapshots: a versioned manifest of labeled frames in the object store.

The labeling bridge writes them, the trainer reads them. Items are split train/val/test by a
hash of the frame's sha256, so an item never changes split between versions.
"""

from __future__ import annotations

import hashlib
from collections import Counter
from datetime import datetime
from pathlib import Path
from typing import Literal

from pydantic import AwareDatetime, Field, ValidationError

from binloop.errors import PermanentError
from binloop.storage import BlobStore, dataset_key, sha256_hex
from schemas.base import BlobRef, Frozen, read_json, utc_now

Split = Literal["train", "val", "test"]
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".webp"}


def split_for(sha256: str, val_fraction: float = 0.15, test_fraction: float = 0.0) -> Split:
    """Deterministic split from content: the same frame always lands in the same split."""
    bucket = int(hashlib.sha256(f"split:{sha256}".encode()).hexdigest()[:8], 16) / 0xFFFFFFFF
    if bucket < test_fraction:
        return "test"
    if bucket < test_fraction + val_fraction:
        return "val"
    return "train"


class ManifestItem(Frozen):
    key: str
    sha256: str
    label: str
    split: Split


class DatasetManifest(Frozen):
    name: str
    version: int = Field(ge=1)
    created_at: AwareDatetime
    taxonomy_version: str
    classes: list[str]
    items: list[ManifestItem]
    needs_relabel: list[ManifestItem] = Field(
        default_factory=list,
        description="Items of earlier versions that a taxonomy change left out (their class was "
        "split or dropped), with their old labels: they come back once labeled again.",
    )
    migrated_from: str | None = Field(
        default=None,
        description="The taxonomy version of the version before, when a taxonomy change cut "
        "this one",
    )

    def class_counts(self) -> dict[str, int]:
        return dict(sorted(Counter(item.label for item in self.items).items()))

    def content_id(self) -> str:
        """sha256 over (frame sha256, label) pairs: the identity of an evaluation set."""
        lines = sorted(f"{i.sha256}:{i.label}" for i in self.items)
        return sha256_hex("\n".join(lines).encode())


def write_manifest(store: BlobStore, manifest: DatasetManifest) -> BlobRef:
    key = dataset_key(manifest.name, manifest.version)
    return store.put(key, manifest.model_dump_json(indent=1).encode(), "application/json")


def parse_manifest(data: bytes, key: str) -> DatasetManifest:
    """The manifest stored under `key`; PermanentError when it is not one (reading it again
    cannot help)."""
    try:
        return read_json(DatasetManifest, data)
    except ValidationError as exc:
        raise PermanentError(f"{key} is not a valid dataset manifest: {exc}") from exc


def read_manifest(store: BlobStore, key: str) -> DatasetManifest:
    return parse_manifest(store.get(key), key)


def latest_version(store: BlobStore, name: str) -> int:
    versions = [
        int(key.split("/")[2].lstrip("v"))
        for key in store.list(f"datasets/{name}/")
        if key.endswith("/manifest.json")
    ]
    return max(versions, default=0)


def _is_image(path: Path) -> bool:
    return path.suffix.lower() in IMAGE_SUFFIXES and path.is_file()


def scan_image_folder(folder: Path) -> list[tuple[Path, str]]:
    """ImageFolder layout: <folder>/<label>/<image>. The label is the (lower-cased) class
    folder right under `folder`, torchvision's ImageFolder rule: an image in a sub-folder of a
    class belongs to that class. Images directly under `folder` have no class and are left
    out (unclassified_images lists them); other files are ignored. Returns (path, label)
    sorted."""
    items = []
    for path in sorted(folder.rglob("*")):
        parts = path.relative_to(folder).parts
        if len(parts) > 1 and _is_image(path):
            items.append((path, parts[0].lower()))
    return items


def unclassified_images(folder: Path) -> list[Path]:
    """Images directly under an ImageFolder's `folder`, which scan_image_folder leaves out:
    no class folder names their label."""
    return sorted(path for path in folder.iterdir() if _is_image(path))


def import_image_folder(
    store: BlobStore,
    folder: Path,
    name: str,
    *,
    taxonomy_version: str,
    classes: list[str],
    version: int | None = None,
    created_at: datetime | None = None,
    val_fraction: float = 0.15,
) -> tuple[DatasetManifest, BlobRef]:
    """Copies an ImageFolder into the store (content-addressed) and writes a manifest."""
    items = []
    for path, label in scan_image_folder(folder):
        data = path.read_bytes()
        digest = sha256_hex(data)
        key = f"imports/{name}/{digest}{path.suffix.lower()}"
        store.put(key, data, "image/jpeg")
        items.append(
            ManifestItem(key=key, sha256=digest, label=label, split=split_for(digest, val_fraction))
        )
    manifest = DatasetManifest(
        name=name,
        version=version or latest_version(store, name) + 1,
        created_at=created_at or utc_now(),
        taxonomy_version=taxonomy_version,
        classes=classes,
        items=items,
    )
    return manifest, write_manifest(store, manifest)
