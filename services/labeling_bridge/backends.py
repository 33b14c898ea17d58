"""Labeling backends: who gives a selected sample its label, now (oracle) or later (people)."""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from binloop.errors import PermanentError
from binloop.storage.files import write_atomically
from schemas.base import BlobRef, utc_now
from schemas.events import SampleSelected
from schemas.taxonomy import Taxonomy
from services.labeling_bridge.client import LabelStudioClient
from services.labeling_bridge.imports import ImportLog
from services.labeling_bridge.label_studio import import_task, label_config_xml, relabel_task
from services.labeling_bridge.relabel import RelabelRequest

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Annotation:
    label: str
    annotator: str
    annotation_id: str


class LabelingBackend(Protocol):
    @property
    def name(self) -> str: ...

    def submit(self, sample: SampleSelected, frame: BlobRef) -> Annotation | None:
        """The annotation, or None when it arrives later (people label asynchronously)."""
        ...


class OracleBackend:
    """Simulation: the replayed stream knows each frame's true label."""

    name = "oracle"

    def submit(self, sample: SampleSelected, frame: BlobRef) -> Annotation | None:
        if sample.ground_truth is None:
            raise PermanentError("oracle backend needs ground truth")
        return Annotation(
            label=sample.ground_truth,
            annotator="oracle",
            annotation_id=f"oracle-{sample.frame_sha256}",
        )


def write_text_atomically(path: Path, text: str) -> None:
    """Label Studio may import the folder at any time: it must never see half a file."""
    write_atomically(path, text.encode("utf-8"), durable=False)


class LabelStudioExportBackend:
    """Writes one import task per sample (named by frame sha256, so a repeat overwrites) and
    the labeling config once. Annotations come back through Label Studio, not from here."""

    name = "label-studio-export"
    CONFIG_FILE = "label_config.xml"

    def __init__(self, export_dir: Path, taxonomy: Taxonomy) -> None:
        self.export_dir = export_dir
        self.taxonomy = taxonomy
        self._config_written = False

    def task_path(self, frame_sha256: str) -> Path:
        return self.export_dir / f"{frame_sha256}.json"

    def _write_config(self) -> None:
        config = label_config_xml(self.taxonomy)
        path = self.export_dir / self.CONFIG_FILE
        if not (path.is_file() and path.read_text(encoding="utf-8") == config):
            write_text_atomically(path, config)
        self._config_written = True

    def submit(self, sample: SampleSelected, frame: BlobRef) -> Annotation | None:
        if not self._config_written:
            self._write_config()
        task = import_task(sample, frame, self.taxonomy.version)
        write_text_atomically(self.task_path(sample.frame_sha256), json.dumps(task, indent=1))
        return None


class LabelStudioBackend:
    """Makes one Label Studio task per sample (the model's prediction as a pre-annotation).
    A redelivered sample finds its task instead of making a second one. With `imports`, each
    sample is noted with the project its task is in, so a task lost with its project can be
    made again. Annotations come back by webhook and reconciliation, not from here."""

    name = "label-studio"

    def __init__(
        self,
        client: LabelStudioClient,
        image_url: Callable[[BlobRef], str],
        taxonomy_version: str,
        imports: ImportLog | None = None,
    ) -> None:
        self.client = client
        self.image_url = image_url
        self.taxonomy_version = taxonomy_version
        self.imports = imports
        self._listeners: list[Callable[[str, int], None]] = []

    def add_listener(self, listener: Callable[[str, int], None]) -> None:
        """Called (in the worker thread) with (frame sha256, task id) after each sample."""
        self._listeners.append(listener)

    def submit(self, sample: SampleSelected, frame: BlobRef) -> Annotation | None:
        self.make_task(sample, frame)
        return None

    def make_task(self, sample: SampleSelected, frame: BlobRef) -> int:
        """The frame's task in the project, found or made; returns its id."""
        # Taken before the task is found or made: should the project change in between, the
        # note names the old one, and the new project's setup finds the task (none is lost).
        project = self.client.project() if self.imports is not None else None
        task = import_task(sample, frame, self.taxonomy_version, self.image_url(frame))
        task_id = self.client.find_task(sample.frame_sha256)
        if task_id is None:
            task_id = self.client.import_task(task)
        # Also for a task found: an earlier try may have died between the import and this.
        (prediction,) = task["predictions"]
        try:
            self.client.ensure_prediction(task_id, prediction)
        except PermanentError as exc:  # the task is there and can be labeled without it
            log.error("Label Studio refused the prediction for task %d: %s", task_id, exc)
        if self.imports is not None and project is not None:
            self.imports.note(sample, project, task_id)
        for listener in self._listeners:
            listener(sample.frame_sha256, task_id)
        return task_id

    def request_relabel(self, request: RelabelRequest) -> int:
        """The task asking for this frame's label in the new taxonomy, made once."""
        frame = request.frame
        task_id = self.client.find_task(frame.sha256, relabel_for=request.taxonomy_version)
        if task_id is None:
            task = relabel_task(request, self.image_url(frame), utc_now())
            task_id = self.client.import_task(task)
        for listener in self._listeners:
            listener(frame.sha256, task_id)
        return task_id
