"""The model the edge serves: loading it from files or from a promotion, the on-disk cache, and
the slot that swaps it between frames. No bus here."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import re
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from pydantic import BaseModel, ConfigDict, ValidationError

from binloop.errors import ConfigError, ModelLoadError, NotReadyError
from binloop.ml.backend import InferenceBackend, OnnxBackend
from binloop.ml.card import ModelCard
from binloop.ml.decisions import ModelUpdate, is_older
from binloop.ml.preprocess import Preprocessor
from binloop.observability import metrics
from binloop.storage import sha256_hex
from binloop.storage.blobstore import read_verified
from binloop.storage.files import write_atomically
from schemas.base import BlobRef, fits, read_json
from schemas.events import LABEL_PATTERN, Label

log = logging.getLogger(__name__)

_PATH_SAFE_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9._-]{0,127}$")
ONNX_FILE = "model.onnx"
CURRENT_FILE = "current.json"


MODEL_ACK_WAIT_S = 30.0
"""Ack wait of the consumers that install models (the edge's and the ML backend's): downloading
a model and building its session takes longer than the bus's default ack wait (10 s)."""


def card_beside(onnx_path: Path) -> Path:
    """`<dir>/<stem>.card.json` for `<dir>/<stem>.onnx`: where the cache keeps a card."""
    return onnx_path.with_name(f"{onnx_path.stem}.card.json")


def card_path_for(onnx_path: Path) -> Path:
    """The card of `<dir>/<stem>.onnx` is `<dir>/<stem>.card.json`, else `<dir>/card.json`."""
    beside = card_beside(onnx_path)
    if beside.exists():
        return beside
    shared = onnx_path.with_name("card.json")
    if shared.exists():
        return shared
    raise ConfigError(f"no model card for {onnx_path}: looked for {beside.name} and card.json")


@dataclass(frozen=True)
class LoadedModel:
    card: ModelCard
    backend: InferenceBackend
    preprocessor: Preprocessor
    installed_by: ModelUpdate | None = None
    """The registry decision behind it: the event that installed it (recalled from the cache
    after a restart), or a later one naming it (see acknowledged). None for a model loaded
    from a file of the settings (default_model) until a registry decision names its bytes."""
    onnx_sha256: str | None = None
    card_sha256: str | None = None
    onnx_path: Path | None = None
    card_path: Path | None = None
    """The files it was loaded from (the cache's, or default_model's)."""


def _parse_card(data: bytes, where: str) -> ModelCard:
    try:
        card = read_json(ModelCard, data)
    except ValidationError as exc:
        raise ModelLoadError(f"{where}: not a valid model card: {exc}") from exc
    bad = [c for c in card.classes if not fits(Label, c)]
    if bad:
        raise ModelLoadError(f"{where}: class names must match {LABEL_PATTERN}, got {bad}")
    return card


def load_model(
    onnx_path: Path,
    card_path: Path,
    *,
    intra_op_threads: int = 1,
    installed_by: ModelUpdate | None = None,
) -> LoadedModel:
    """Blocking (session creation takes a while): run it in a worker thread."""
    card_bytes = card_path.read_bytes()
    card = _parse_card(card_bytes, str(card_path))
    backend = OnnxBackend(onnx_path, card, intra_op_threads=intra_op_threads)
    onnx_sha256 = sha256_hex(onnx_path.read_bytes())
    return LoadedModel(
        card,
        backend,
        Preprocessor.from_card(card),
        installed_by,
        onnx_sha256,
        sha256_hex(card_bytes),
        onnx_path,
        card_path,
    )


class _ServedRecord(BaseModel):
    """The cache's `current.json`: the registry model the bin served last, and the decision
    behind it (so the verdict on the registry's events is the same after a restart)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str
    version: int
    issued_at: datetime
    rollback: bool
    onnx_sha256: str
    card_sha256: str
    champion_revision: int | None = None
    champion_epoch: datetime | None = None


def _store(onnx_path: Path, onnx_bytes: bytes, card_bytes: bytes) -> None:
    onnx_path.parent.mkdir(parents=True, exist_ok=True)
    write_atomically(onnx_path, onnx_bytes)
    write_atomically(card_beside(onnx_path), card_bytes)


class ModelCache:
    """Promoted models on local disk, as <root>/<name>/v<version>/model.onnx + model.card.json,
    and <root>/current.json naming the one served last, so a restarted bin serves it again
    without the network (`remember`, `recall`). A served model this cache did not fetch (the
    default_model a registry decision names, see acknowledged) is copied in by `remember`:
    `recall` loads only what the cache holds and verifies."""

    def __init__(self, root: Path, intra_op_threads: int = 1) -> None:
        self.root = root
        self.intra_op_threads = intra_op_threads

    def fetch(self, update: ModelUpdate, artifact: BlobRef, card_ref: BlobRef) -> LoadedModel:
        """Download (sha256 checked), cache and load one model. Blocking: use a worker thread."""
        onnx_path = self._onnx_path(update.name, update.version)
        if self._holds(onnx_path, artifact.sha256, card_ref.sha256):
            return load_model(
                onnx_path,
                card_path_for(onnx_path),
                intra_op_threads=self.intra_op_threads,
                installed_by=update,
            )
        card_bytes = read_verified(card_ref)
        card = _parse_card(card_bytes, card_ref.uri)
        if (card.name, card.version) != (update.name, update.version):
            raise ModelLoadError(
                f"the card at {card_ref.uri} describes {card.name} v{card.version}, "
                f"the event promised {update.name} v{update.version}"
            )
        _store(onnx_path, read_verified(artifact), card_bytes)
        return load_model(
            onnx_path,
            card_path_for(onnx_path),
            intra_op_threads=self.intra_op_threads,
            installed_by=update,
        )

    def remember(self, model: LoadedModel) -> None:
        """Record `model` as the one served, replacing the record atomically; its files are
        copied into the cache first unless it holds them already (a default_model that a
        registry decision names). ModelLoadError when they cannot be copied as loaded.
        Blocking (file reads, fsync): use a worker thread."""
        update = model.installed_by
        if update is None or model.onnx_sha256 is None or model.card_sha256 is None:
            raise ValueError("only a model installed from a registry event can be remembered")
        onnx_path = self._onnx_path(update.name, update.version)
        if not self._holds(onnx_path, model.onnx_sha256, model.card_sha256):
            self._copy_in(model, onnx_path)
        record = _ServedRecord(
            name=update.name,
            version=update.version,
            issued_at=update.issued_at,
            rollback=update.rollback,
            onnx_sha256=model.onnx_sha256,
            card_sha256=model.card_sha256,
            champion_revision=update.champion_revision,
            champion_epoch=update.champion_epoch,
        )
        write_atomically(self.root / CURRENT_FILE, record.model_dump_json(indent=1).encode())

    def recall(self) -> LoadedModel | None:
        """The model `remember` recorded last, loaded, if the cache still holds its exact
        bytes; else None (nothing recorded, or a record or files that do not check out, which
        is logged). Blocking: use a worker thread."""
        path = self.root / CURRENT_FILE
        try:
            record = _ServedRecord.model_validate_json(path.read_bytes())
        except FileNotFoundError:
            return None
        except (OSError, ValidationError) as exc:
            log.warning("model cache %s: cannot read the served model's record: %s", path, exc)
            return None
        if not _PATH_SAFE_NAME.match(record.name):
            log.warning("model cache %s: %r is not a safe folder name", path, record.name)
            return None
        onnx_path = self._onnx_path(record.name, record.version)
        served = f"{record.name} v{record.version}"
        try:
            if not self._holds(onnx_path, record.onnx_sha256, record.card_sha256):
                log.warning("model cache %s: %s is gone or its bytes changed", self.root, served)
                return None
            update = ModelUpdate(
                record.name,
                record.version,
                record.issued_at,
                rollback=record.rollback,
                artifact_sha256=record.onnx_sha256,
                champion_revision=record.champion_revision,
                champion_epoch=record.champion_epoch,
            )
            return load_model(
                onnx_path,
                card_beside(onnx_path),
                intra_op_threads=self.intra_op_threads,
                installed_by=update,
            )
        except (ModelLoadError, OSError) as exc:
            log.warning("model cache %s: %s cannot be loaded: %s", self.root, served, exc)
            return None

    @staticmethod
    def _copy_in(model: LoadedModel, onnx_path: Path) -> None:
        """Copies the files `model` was loaded from to where fetch would have put them,
        checked against the hashes taken at load (a file replaced since then is not the
        model served)."""
        served = f"{model.card.name} v{model.card.version}"
        if model.onnx_path is None or model.card_path is None:
            raise ModelLoadError(f"{served} is not in the cache and its files are unknown")
        onnx_bytes = model.onnx_path.read_bytes()
        card_bytes = model.card_path.read_bytes()
        if (sha256_hex(onnx_bytes), sha256_hex(card_bytes)) != (
            model.onnx_sha256,
            model.card_sha256,
        ):
            raise ModelLoadError(
                f"{served}: {model.onnx_path} or {model.card_path} changed since it was loaded"
            )
        _store(onnx_path, onnx_bytes, card_bytes)

    def _onnx_path(self, name: str, version: int) -> Path:
        """Where the cache keeps a model; ModelLoadError for a name unsafe as a folder name."""
        if not _PATH_SAFE_NAME.match(name):
            raise ModelLoadError(f"model name {name!r} is not safe as a folder name")
        return self.root / name / f"v{version}" / ONNX_FILE

    @staticmethod
    def _holds(onnx_path: Path, onnx_sha256: str, card_sha256: str) -> bool:
        """Whether an earlier fetch left exactly these bytes (a restart, maybe offline)."""
        card_path = card_beside(onnx_path)
        return (
            onnx_path.is_file()
            and card_path.is_file()
            and sha256_hex(onnx_path.read_bytes()) == onnx_sha256
            and sha256_hex(card_path.read_bytes()) == card_sha256
        )


def _registry_order(update: ModelUpdate) -> str:
    """Where the registry put `update` in its order (see is_older), for a verdict."""
    epoch = update.champion_epoch
    bucket = f" of the bucket created {epoch.isoformat()}" if epoch is not None else ""
    return f"champion revision {update.champion_revision}{bucket}"


def update_verdict(current: LoadedModel | None, update: ModelUpdate) -> str | None:
    """None when `update` should replace `current`; otherwise why it is skipped.

    Promotions and rollbacks arrive on two consumers, so their relative order is not
    guaranteed, nor is it on the stream (a rollback between the registry's champion write
    and its publish lands first): an update the registry decided before the event that
    installed the current model is stale (see is_older). A promotion must also bring a newer
    version; a rollback may go to any other one.
    A model loaded from disk at start is the same as the registry's only with the same bytes.
    """
    if current is None:
        return None
    card, installed_by = current.card, current.installed_by
    if installed_by is not None and is_older(update, installed_by):
        return (
            f"stale: issued at {update.issued_at.isoformat()} ({_registry_order(update)}), "
            "the served model was installed by an event of "
            f"{installed_by.issued_at.isoformat()} ({_registry_order(installed_by)})"
        )
    same_model = card.name == update.name
    if same_model and update.version == card.version:
        if installed_by is None and update.artifact_sha256 not in (None, current.onnx_sha256):
            # E.g. the shipped model (v1) and the registry's first trained model (also v1).
            return None
        return f"already serving {card.name} v{card.version}"
    if same_model and not update.rollback and update.version < card.version:
        return f"v{update.version} is not newer than the served v{card.version}"
    return None


def acknowledged(current: LoadedModel | None, update: ModelUpdate) -> LoadedModel | None:
    """`current` with `update` as the decision behind it, when `update` names that very model
    and is newer than the decision on record: typically a rollback to the version served
    (nothing to install). Without it, a decision the registry made before that rollback but
    published after it (a promotion whose publish the rollback overtook) would be newer than
    the one on record and replace the rolled-back-to model. A model from default_model has
    no decision on record; `update` names it only with its very bytes (the shipped v1 is not
    the registry's first trained v1), so a hash that differs or is unknown changes nothing.
    None when nothing changes."""
    if current is None:
        return None
    if (current.card.name, current.card.version) != (update.name, update.version):
        return None
    if current.installed_by is None:
        if update.artifact_sha256 is None or update.artifact_sha256 != current.onnx_sha256:
            return None
    elif is_older(update, current.installed_by):
        return None
    return dataclasses.replace(current, installed_by=update)


SwapListener = Callable[[LoadedModel], None]


class ModelSlot:
    """Holds the served model. Frames use it under a lock and swaps take the same lock, so
    a swap lands between two frames: none is dropped, none sees two models."""

    def __init__(self, bin_id: str) -> None:
        self.bin_id = bin_id
        self._lock = asyncio.Lock()
        self._current: LoadedModel | None = None
        self._listeners: list[SwapListener] = []

    @property
    def current(self) -> LoadedModel | None:
        return self._current

    @property
    def served(self) -> tuple[str, int] | None:
        """(model name, version) being served, or None before the first model is loaded."""
        current = self._current
        return None if current is None else (current.card.name, current.card.version)

    def add_listener(self, listener: SwapListener) -> None:
        """Called (on the event loop) with each newly installed model."""
        self._listeners.append(listener)

    @asynccontextmanager
    async def use(self) -> AsyncIterator[LoadedModel]:
        """The served model, held for one frame. NotReadyError (retried later) when none."""
        async with self._lock:
            if self._current is None:
                raise NotReadyError(
                    "no model loaded yet: waiting for models.promoted or default_model"
                )
            yield self._current

    async def install(self, model: LoadedModel) -> str | None:
        """Serve `model` from the next frame on. Returns why it was skipped, or None."""
        async with self._lock:
            previous = self._current
            if model.installed_by is not None:
                skipped = update_verdict(previous, model.installed_by)
                if skipped is not None:
                    return skipped
            self._current = model
        self._record_swap(previous, model)
        return None

    async def acknowledge(self, update: ModelUpdate) -> bool:
        """Records `update` as the decision behind the served model (see acknowledged).
        Returns whether it recorded it (the caller then remembers the served model)."""
        async with self._lock:
            recorded = acknowledged(self._current, update)
            if recorded is None:
                return False
            self._current = recorded
        return True

    def _record_swap(self, previous: LoadedModel | None, model: LoadedModel) -> None:
        card = model.card
        if previous is not None:
            metrics.MODEL_SWAPS.labels(self.bin_id).inc()
            if previous.card.name != card.name:
                metrics.MODEL_VERSION_SERVED.remove(self.bin_id, previous.card.name)
        metrics.MODEL_VERSION_SERVED.labels(self.bin_id, card.name).set(card.version)
        log.info(
            "bin %s now serves %s v%d (was %s)",
            self.bin_id,
            card.name,
            card.version,
            "nothing" if previous is None else f"{previous.card.name} v{previous.card.version}",
        )
        for listener in self._listeners:
            listener(model)
