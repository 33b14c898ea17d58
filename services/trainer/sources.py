"""Where training images come from, for the `binloop train` pipeline: an ImageFolder, a dataset
snapshot the labeling bridge wrote to the object store, or a Label Studio JSON export; and the
deterministic train/val/test split by a hash of each image's content or name.

Images are decoded once; one that cannot be read (corrupt, missing, wrong checksum) is skipped
with a warning and counted, never fatal."""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal
from urllib.parse import parse_qs, unquote, urlparse

import numpy as np

from binloop.datasets import (
    DatasetManifest,
    Split,
    latest_version,
    read_manifest,
    scan_image_folder,
    unclassified_images,
)
from binloop.datasets import split_for as split_by_hash
from binloop.errors import ChecksumMismatchError, CorruptFrameError, MissingBlobError
from binloop.ml.preprocess import FloatArray, Preprocessor
from binloop.storage import BlobStore, dataset_key, sha256_hex
from binloop.storage.blobstore import check_digest
from services.trainer.data import LoadedItems

log = logging.getLogger(__name__)

SplitBy = Literal["content", "name"]
SPLITS: tuple[Split, ...] = ("train", "val", "test")
UNREADABLE = (CorruptFrameError, ChecksumMismatchError, MissingBlobError, OSError)


@dataclass(frozen=True)
class SourceImage:
    """One labeled image, not yet read."""

    name: str
    """Identity inside the source (relative path, blob key, task): messages and name splits."""
    label: str
    read: Callable[[], bytes]
    split_name: str | None = None
    """What a split by name hashes when `name` is not stable across machines (a Label Studio
    task's name holds where --image-root put its image); None: `name`."""

    @property
    def name_for_split(self) -> str:
        return self.name if self.split_name is None else self.split_name


@dataclass
class SourceImages:
    images: list[SourceImage]
    description: str
    skipped: dict[str, str] = field(default_factory=dict)
    """Entries left out before reading (no usable label, not a local file), with the reason."""
    dataset_name: str | None = None
    """Short, for the model card's dataset_name (a folder's or export's name, a snapshot's
    name); `description` says in full where the images came from."""
    dataset_version: int | None = None
    """A snapshot's version."""


@dataclass(frozen=True)
class SplitRule:
    """Deterministic split: sha256 of the content (or of the name) picks the split, so an image
    keeps its split across runs and dataset versions (binloop.datasets.split_for)."""

    split_by: SplitBy = "content"
    val_fraction: float = 0.15
    test_fraction: float = 0.15

    def describe(self) -> str:
        return (
            f"split by sha256 of the image {self.split_by} (binloop.datasets.split_for): "
            f"test {self.test_fraction:g}, val {self.val_fraction:g}, train the rest"
        )

    def split_of(self, name: str, content_sha256: str) -> Split:
        key = content_sha256 if self.split_by == "content" else sha256_hex(name.encode())
        return split_by_hash(key, self.val_fraction, self.test_fraction)


@dataclass
class SplitData:
    classes: list[str]
    splits: dict[Split, LoadedItems]
    hashes: dict[Split, list[str]]
    skipped: dict[str, str]
    rule: SplitRule

    def content_id(self, split: Split) -> str:
        """Identity of one split: sha256 over its (content sha256, label) pairs."""
        lines = sorted(
            f"{digest}:{label}"
            for digest, label in zip(self.hashes[split], self.splits[split].labels, strict=True)
        )
        return sha256_hex("\n".join(lines).encode())

    def counts(self) -> dict[str, int]:
        return {split: len(items) for split, items in self.splits.items()}


def _file_reader(path: Path) -> Callable[[], bytes]:
    return path.read_bytes


def image_folder(folder: Path) -> SourceImages:
    """<folder>/<label>/<image>; labels are the lower-cased names of the class folders right
    under `folder` (binloop.datasets.scan_image_folder). An image directly under `folder` has
    no class: it is skipped and counted."""
    if not folder.is_dir():
        raise FileNotFoundError(f"image folder {folder} does not exist")
    images = [
        SourceImage(path.relative_to(folder).as_posix(), label, _file_reader(path))
        for path, label in scan_image_folder(folder)
    ]
    skipped = {
        path.relative_to(folder).as_posix(): "not in a class folder (<folder>/<class>/<image>)"
        for path in unclassified_images(folder)
    }
    return SourceImages(images, f"ImageFolder {folder}", skipped, folder.resolve().name)


def _verified_blob(store: BlobStore, key: str, sha256: str) -> Callable[[], bytes]:
    def read() -> bytes:
        return check_digest(store.get(key), sha256, key)

    return read


def snapshot(store: BlobStore, name: str, version: int | None = None) -> SourceImages:
    """Every labeled item of a dataset snapshot (the latest when `version` is None). The
    snapshot's own train/val split is replaced by the pipeline's split rule, which also
    holds out a test split."""
    if version is None:
        version = latest_version(store, name)
        if version == 0:
            raise FileNotFoundError(f"dataset {name!r} has no snapshot in the store")
    elif version < 1:
        raise ValueError(f"dataset versions start at 1, not {version}")
    manifest: DatasetManifest = read_manifest(store, dataset_key(name, version))
    images = [
        SourceImage(item.key, item.label, _verified_blob(store, item.key, item.sha256))
        for item in manifest.items
    ]
    return SourceImages(
        images,
        f"dataset snapshot {name} v{version}",
        dataset_name=name,
        dataset_version=version,
    )


# --- Label Studio ------------------------------------------------------------------------------

LABEL_STUDIO_LOCAL_FILES = "/data/local-files/"
LABEL_STUDIO_UPLOADS = "/data/upload/"


@dataclass(frozen=True)
class LabeledTask:
    task_id: str
    image: str
    label: str


def _annotation_label(annotation: dict[str, Any], control: str | None) -> str | None:
    """The single choice an annotation made, from `control` (or the first choices control)."""
    for region in annotation.get("result") or []:
        if not isinstance(region, dict) or region.get("type") != "choices":
            continue
        if control is not None and region.get("from_name") != control:
            continue
        choices = (region.get("value") or {}).get("choices")
        if isinstance(choices, list) and len(choices) == 1 and isinstance(choices[0], str):
            return choices[0].strip().lower()
        return None
    return None


def parse_label_studio_export(
    document: Any, *, image_key: str = "image", control: str | None = "material"
) -> tuple[list[LabeledTask], dict[str, str]]:
    """Label Studio's JSON export (a list of tasks) -> one (image, label) per task, from the
    task's most recent annotation that was not cancelled. `control` names the Choices control
    that holds the class (binloop's labeling config calls it "material"); when a task has no
    such control, its first single-choice control is used. Tasks without a usable label are
    returned with the reason, not raised."""
    if not isinstance(document, list):
        raise ValueError("a Label Studio JSON export is a list of tasks")
    tasks: list[LabeledTask] = []
    skipped: dict[str, str] = {}
    for position, task in enumerate(document):
        task_id = str(task.get("id", f"#{position}")) if isinstance(task, dict) else f"#{position}"
        if not isinstance(task, dict):
            skipped[f"task {task_id}"] = "not a JSON object"
            continue
        image = (task.get("data") or {}).get(image_key)
        if not isinstance(image, str) or not image:
            skipped[f"task {task_id}"] = f"no data.{image_key}"
            continue
        annotations = [
            a
            for a in task.get("annotations") or []
            if isinstance(a, dict) and not a.get("was_cancelled")
        ]
        # Most recent first: a reviewer's correction wins over the first answer.
        annotations.sort(key=lambda a: (str(a.get("updated_at", "")), a.get("id", 0)), reverse=True)
        label = None
        for annotation in annotations:
            label = _annotation_label(annotation, control) or _annotation_label(annotation, None)
            if label:
                break
        if not label:
            skipped[f"task {task_id}"] = "no annotation with exactly one choice"
            continue
        tasks.append(LabeledTask(task_id, image, label))
    return tasks, skipped


def resolve_image(reference: str, *, export_dir: Path, image_root: Path | None) -> Path | None:
    """A task's image reference -> a local path, or None when it is remote (http, s3).

    /data/local-files/?d=rel and /data/upload/... resolve against `image_root` (Label Studio's
    LOCAL_FILES_DOCUMENT_ROOT and data directory); file:// URIs and absolute paths are used as
    they are; a relative path is relative to the export file's folder."""
    root = image_root or export_dir
    if reference.startswith(LABEL_STUDIO_LOCAL_FILES):
        # parse_qs decodes the query already; decoding again would turn a '%41' that is part
        # of the file's name into an 'A'.
        wanted = parse_qs(urlparse(reference).query).get("d")
        return root / wanted[0] if wanted else None
    if reference.startswith(LABEL_STUDIO_UPLOADS):
        return root / "media" / "upload" / unquote(reference.removeprefix(LABEL_STUDIO_UPLOADS))
    parsed = urlparse(reference)
    if parsed.scheme == "file":
        return Path(unquote(parsed.path))
    if parsed.scheme:  # http(s), s3, gs: not something to read from disk
        return None
    path = Path(reference)
    return path if path.is_absolute() else export_dir / path


def label_studio_export(path: Path, *, image_root: Path | None = None) -> SourceImages:
    tasks, skipped = parse_label_studio_export(json.loads(path.read_text()))
    images = []
    for task in tasks:
        local = resolve_image(task.image, export_dir=path.parent, image_root=image_root)
        if local is None:
            skipped[f"task {task.task_id}"] = f"image {task.image} is not a local file"
            continue
        # Split by the reference the export holds, not by where this machine mounts the image.
        images.append(
            SourceImage(
                f"task {task.task_id}: {local}", task.label, _file_reader(local), task.image
            )
        )
    return SourceImages(images, f"Label Studio export {path}", skipped, path.resolve().stem)


# --- reading and splitting ---------------------------------------------------------------------


def load_and_split(source: SourceImages, preprocessor: Preprocessor, rule: SplitRule) -> SplitData:
    """Reads and preprocesses every image once, puts it in its split, and counts (with one
    warning) the images that could not be read."""
    inputs: dict[Split, list[FloatArray]] = {split: [] for split in SPLITS}
    labels: dict[Split, list[str]] = {split: [] for split in SPLITS}
    names: dict[Split, list[str]] = {split: [] for split in SPLITS}
    hashes: dict[Split, list[str]] = {split: [] for split in SPLITS}
    skipped = dict(source.skipped)
    for image in source.images:
        try:
            data = image.read()
            array = preprocessor.load(data)
        except UNREADABLE as exc:
            skipped[image.name] = f"{type(exc).__name__}: {exc}"
            continue
        digest = sha256_hex(data)
        split = rule.split_of(image.name_for_split, digest)
        inputs[split].append(array)
        labels[split].append(image.label)
        names[split].append(image.name)
        hashes[split].append(digest)
    if skipped:
        examples = "; ".join(f"{name} ({why})" for name, why in list(skipped.items())[:3])
        log.warning(
            "skipped %d of %d entries of %s: %s",
            len(skipped),
            len(source.images) + len(source.skipped),
            source.description,
            examples,
        )
    shape = (0, 3, preprocessor.height, preprocessor.width)
    splits = {
        split: LoadedItems(
            inputs=np.stack(inputs[split]) if inputs[split] else np.zeros(shape, np.float32),
            labels=labels[split],
            keys=names[split],
        )
        for split in SPLITS
    }
    classes = sorted({label for split in SPLITS for label in labels[split]})
    return SplitData(classes, splits, hashes, skipped, rule)


def class_counts(labels: Iterable[str], classes: Sequence[str]) -> dict[str, int]:
    counted = {name: 0 for name in classes}
    for label in labels:
        counted[label] += 1
    return counted
