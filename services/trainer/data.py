"""Training data: manifest items read from the object store, decoded and preprocessed exactly
as the model card describes, wrapped in a torch Dataset.

Datasets here are small (hundreds to a few thousand frames at 64x64), so every item is decoded
once up front; augmentation then runs on whole batches in train.py.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from binloop.datasets import (
    DatasetManifest,
    ManifestItem,
    Split,
    import_image_folder,
    latest_version,
    read_manifest,
    scan_image_folder,
    unclassified_images,
)
from binloop.errors import ChecksumMismatchError, ConfigError, CorruptFrameError, MissingBlobError
from binloop.ml.preprocess import FloatArray, Preprocessor
from binloop.storage import BlobStore, dataset_key, sha256_hex
from binloop.storage.blobstore import check_digest

log = logging.getLogger(__name__)

# What makes one item unusable without making the whole snapshot unusable.
UNUSABLE_ITEM_ERRORS = (CorruptFrameError, ChecksumMismatchError, MissingBlobError)


@dataclass
class LoadedItems:
    """Preprocessed inputs (N x 3 x H x W float32) with their labels; what could not be read."""

    inputs: FloatArray
    labels: list[str]
    keys: list[str]
    skipped: dict[str, str] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.labels)


def items_in(manifest: DatasetManifest, splits: Iterable[Split]) -> list[ManifestItem]:
    wanted = set(splits)
    return [item for item in manifest.items if item.split in wanted]


def model_classes(manifest: DatasetManifest) -> list[str]:
    """Output order of a model trained on `manifest`: its declared classes, then any label the
    items use that the declaration forgot (sorted, so the order is reproducible)."""
    declared = list(dict.fromkeys(manifest.classes))
    extra = sorted({item.label for item in manifest.items} - set(declared))
    return declared + extra


def _read_item(store: BlobStore, item: ManifestItem, preprocessor: Preprocessor) -> FloatArray:
    data = check_digest(store.get(item.key), item.sha256, item.key)
    return preprocessor.load(data)


def load_items(
    store: BlobStore, items: Sequence[ManifestItem], preprocessor: Preprocessor
) -> LoadedItems:
    """Decodes every item; an unreadable one is skipped and counted, not fatal."""
    inputs: list[FloatArray] = []
    labels: list[str] = []
    keys: list[str] = []
    skipped: dict[str, str] = {}
    for item in items:
        try:
            inputs.append(_read_item(store, item, preprocessor))
        except UNUSABLE_ITEM_ERRORS as exc:
            skipped[item.key] = f"{type(exc).__name__}: {exc}"
            continue
        labels.append(item.label)
        keys.append(item.key)
    if skipped:
        examples = "; ".join(f"{k} ({why})" for k, why in list(skipped.items())[:3])
        log.warning(
            "skipped %d of %d items that could not be read: %s", len(skipped), len(items), examples
        )
    shape = (0, 3, preprocessor.height, preprocessor.width)
    stacked = np.stack(inputs) if inputs else np.zeros(shape, dtype=np.float32)
    return LoadedItems(inputs=stacked, labels=labels, keys=keys, skipped=skipped)


class ManifestDataset(Dataset[tuple[torch.Tensor, torch.Tensor]]):
    """(input tensor, class index) pairs over decoded manifest items."""

    def __init__(self, loaded: LoadedItems, classes: Sequence[str]) -> None:
        index = {name: i for i, name in enumerate(classes)}
        unknown = sorted(set(loaded.labels) - set(index))
        if unknown:
            raise ValueError(f"labels {unknown} are not among the model classes {list(classes)}")
        self.inputs = torch.from_numpy(loaded.inputs)
        self.targets = torch.tensor([index[label] for label in loaded.labels], dtype=torch.long)
        self.num_classes = len(classes)

    def __len__(self) -> int:
        return int(self.targets.shape[0])

    def __getitem__(self, position: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.inputs[position], self.targets[position]

    def class_counts(self) -> torch.Tensor:
        return torch.bincount(self.targets, minlength=self.num_classes)


def folder_content_id(folder: Path) -> str:
    """The content id import_image_folder's manifest would have, without copying anything."""
    lines = sorted(
        f"{sha256_hex(path.read_bytes())}:{label}" for path, label in scan_image_folder(folder)
    )
    return sha256_hex("\n".join(lines).encode())


def ensure_eval_set(
    store: BlobStore, folder: Path, name: str, *, taxonomy_version: str
) -> DatasetManifest:
    """The fixed evaluation set as a manifest in the store, imported once per distinct content.

    Its content id is what ModelMetrics.eval_set_id carries, so the registry only compares
    candidates measured on exactly the same items and labels.
    """
    if not folder.is_dir() or not scan_image_folder(folder):
        raise ConfigError(f"evaluation folder {folder} has no images in ImageFolder layout")
    unclassified = unclassified_images(folder)
    if unclassified:
        log.warning(
            "the evaluation folder %s has %d images outside a class folder, left out: %s",
            folder,
            len(unclassified),
            ", ".join(path.name for path in unclassified[:3]),
        )
    wanted = folder_content_id(folder)
    latest = latest_version(store, name)
    if latest:
        existing = read_manifest(store, dataset_key(name, latest))
        if existing.content_id() == wanted:
            return existing
    labels = sorted({label for _, label in scan_image_folder(folder)})
    manifest, _ = import_image_folder(
        store, folder, name, taxonomy_version=taxonomy_version, classes=labels
    )
    return manifest
