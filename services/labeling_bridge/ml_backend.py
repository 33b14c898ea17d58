"""The Label Studio ML backend: predictions from the current champion model, so annotators see
live pre-annotations. Which model is the champion follows models.promoted and
models.rolled_back (see app.py), in the registry's order of its decisions as the edge does
(services.edge_inferencer.models.update_verdict). No bus and no HTTP here.

Label Studio's protocol: POST /setup answers {"model_version"}; POST /predict gets
{"tasks": [...]} and answers {"results": [...]}, one prediction per task, in order.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from binloop.errors import CorruptFrameError, NotReadyError, PermanentError
from binloop.ml.decisions import ModelUpdate
from binloop.storage import BlobStore, sha256_hex
from schemas.base import BlobRef
from services.edge_inferencer.models import LoadedModel, ModelCache, acknowledged, update_verdict
from services.labeling_bridge.intake import TaskData
from services.labeling_bridge.label_studio import choice_result, model_version_of

NO_MODEL = "none"


class Champion:
    """The model the ML backend predicts with: the promotion (or rollback) the registry
    decided last wins, whatever the order they arrive in."""

    def __init__(self, cache: ModelCache) -> None:
        self.cache = cache
        self._current: LoadedModel | None = None
        self._lock = threading.Lock()
        self._listeners: list[Callable[[LoadedModel], None]] = []

    def add_listener(self, listener: Callable[[LoadedModel], None]) -> None:
        """Called (in the worker thread) with each model installed."""
        self._listeners.append(listener)

    @property
    def current(self) -> LoadedModel | None:
        return self._current

    @property
    def model_version(self) -> str:
        current = self._current
        if current is None:
            return NO_MODEL
        return model_version_of(current.card.name, current.card.version)

    def install(self, update: ModelUpdate, artifact: BlobRef, card: BlobRef) -> str | None:
        """Downloads and loads the model unless it is stale or already served. Blocking.
        Returns why it was skipped, or None. A rollback to the model served is recorded as
        the decision behind it (see acknowledged), so the promotion it overtook is stale."""
        skipped = update_verdict(self._current, update)
        if skipped is not None:
            with self._lock:
                recorded = acknowledged(self._current, update)
                if recorded is not None:
                    self._current = recorded
            return skipped
        model = self.cache.fetch(update, artifact, card)
        with self._lock:
            # Another update may have landed while this one downloaded.
            skipped = update_verdict(self._current, update)
            if skipped is None:
                self._current = model
        if skipped is None:
            for listener in self._listeners:
                listener(model)
        return skipped

    def predict(self, store: BlobStore, tasks: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
        """One Label Studio prediction per task, in order. Blocking (store reads, inference).

        A task that is not one of ours (no frame reference) or whose frame is gone (also one
        deleted while the request runs), damaged, or under a key the store refuses gets an
        empty prediction, so the others still get theirs; so does a task asking for a label
        again after a taxonomy change (the champion knows only the classes it replaced)."""
        model = self._current
        if model is None:
            raise NotReadyError("no champion model yet: waiting for models.promoted")
        version = model_version_of(model.card.name, model.card.version)
        images = []
        positions = []
        for position, task in enumerate(tasks):
            if _asks_for_a_new_label(task):
                continue
            frame = _frame_bytes(store, task)
            if frame is None:
                continue
            try:
                images.append(model.preprocessor.load(frame))
            except CorruptFrameError:
                continue
            positions.append(position)
        results: list[dict[str, Any]] = [
            {"result": [], "score": 0.0, "model_version": version} for _ in tasks
        ]
        if images:
            probabilities = model.backend.predict(np.stack(images))
            for position, row in zip(positions, probabilities, strict=True):
                best = int(np.argmax(row))
                results[position] = {
                    "result": choice_result(model.card.classes[best]),
                    "score": float(row[best]),
                    "model_version": version,
                }
        return results


def _asks_for_a_new_label(task: dict[str, Any]) -> bool:
    data = task.get("data")
    return isinstance(data, dict) and bool(data.get("relabel_for"))


def _frame_bytes(store: BlobStore, task: dict[str, Any]) -> bytes | None:
    data = task.get("data")
    if not isinstance(data, dict):
        return None
    try:
        ref = TaskData.model_validate(data)
    except ValueError:
        return None
    try:
        # Read, not checked first: a frame deleted between a check and the read would fail
        # the whole batch.
        frame = store.get(ref.frame_key)
    except PermanentError:
        # Gone, damaged at rest (S3), or a key the store refuses (outside its root, denied by
        # the bucket's policy): this task gets no prediction, the others theirs.
        return None
    return frame if sha256_hex(frame) == ref.frame_sha256 else None
