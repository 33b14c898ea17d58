"""The samples the bridge handed to Label Studio as tasks and that wait for a label, kept in the
object store, so the tasks lost with their project (deleted in Label Studio, or gone with its
database) are made again in the project that replaces it.

One record per frame, `labeling/<dataset>/imported/<sha256>.json`: the sample as the sampler
sent it (the task and its pre-annotation are made again from it) and the project its task is
in. A record is removed once the frame's label is stored, so the records are the labeling
backlog, not every frame ever selected. A record that cannot be read is logged and left alone:
it stops nothing else.
"""

from __future__ import annotations

import enum
import logging
import posixpath
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING

from pydantic import ValidationError

from binloop.errors import ChecksumMismatchError, MissingBlobError, PermanentError
from binloop.storage import BlobStore, label_key, reconcile_cursor_key
from schemas.base import Frozen
from schemas.events import SampleSelected
from services.labeling_bridge.client import ProjectRef

if TYPE_CHECKING:  # the backends note imports; core imports the backends
    from services.labeling_bridge.backends import LabelStudioBackend
    from services.labeling_bridge.core import LabelingBridge

log = logging.getLogger(__name__)


class ImportRecord(Frozen):
    """A sample whose task is in one project, not labeled yet."""

    label_studio_url: str
    project_id: int
    project_created_at: datetime | None
    task_id: int
    sample: SampleSelected
    """The sample that made (or found) the task in that project: the task's pre-annotation."""

    def in_project(self, project: ProjectRef) -> bool:
        return (self.label_studio_url, self.project_id, self.project_created_at) == (
            project.label_studio_url,
            project.id,
            project.created_at,
        )


def imported_prefix(dataset: str) -> str:
    """Next to the reconciliation cursor: derived, so the layout stays in keys.py."""
    return posixpath.dirname(reconcile_cursor_key(dataset)) + "/imported/"


class ImportLog:
    """The import records of one dataset."""

    def __init__(self, store: BlobStore, dataset: str) -> None:
        self.store = store
        self.dataset = dataset
        self.prefix = imported_prefix(dataset)

    def key(self, frame_sha256: str) -> str:
        return f"{self.prefix}{frame_sha256}.json"

    def read(self, frame_sha256: str) -> ImportRecord | None:
        """None when there is no record or it cannot be read (logged)."""
        key = self.key(frame_sha256)
        try:
            return ImportRecord.model_validate_json(self.store.get(key))
        except MissingBlobError:
            return None
        except (ValidationError, ChecksumMismatchError) as exc:
            log.error("import record %s is unreadable and left alone: %s", key, exc)
            return None

    def note(self, sample: SampleSelected, project: ProjectRef, task_id: int) -> None:
        """The frame's task is `task_id` in `project`. A record already naming that project is
        kept: it holds the sample the task was made from (a later sample of the frame found
        the task and added nothing to it)."""
        stored = self.read(sample.frame_sha256)
        if stored is not None and stored.in_project(project):
            return
        record = ImportRecord(
            label_studio_url=project.label_studio_url,
            project_id=project.id,
            project_created_at=project.created_at,
            task_id=task_id,
            sample=sample,
        )
        self.store.put(
            self.key(sample.frame_sha256), record.model_dump_json().encode(), "application/json"
        )

    def forget(self, frame_sha256: str) -> None:
        self.store.delete(self.key(frame_sha256))

    def frames(self) -> list[str]:
        """The frames that have a record, readable or not."""
        names = (posixpath.basename(key) for key in self.store.list(self.prefix))
        return sorted(name.removesuffix(".json") for name in names if name.endswith(".json"))


class Restore(enum.Enum):
    KEEP = "keep"
    """Its task is in the project, or the record cannot be read."""
    FORGET = "forget"
    """Labeled: the task's work is done (a taxonomy change that sends the frame back makes a
    relabel task of its own)."""
    IMPORT = "import"
    """Not labeled, and its task was in another project: make it again in this one."""


def restore_action(record: ImportRecord | None, project: ProjectRef, labeled: bool) -> Restore:
    """What a record asks for once the bridge works in `project`."""
    if labeled:
        return Restore.FORGET
    if record is None or record.in_project(project):
        return Restore.KEEP
    return Restore.IMPORT


@dataclass(frozen=True)
class Restored:
    frame_sha256: str
    action: Restore
    task_id: int | None = None
    """The frame's task in the project now (IMPORT only; None when it could not be made)."""


def restore_task(
    bridge: LabelingBridge,
    backend: LabelStudioBackend,
    imports: ImportLog,
    frame_sha256: str,
    project: ProjectRef,
) -> Restored:
    """Makes the frame's task again in `project` when its record asks for it; finds the task
    instead when one is there already (a restart after the task was made). TransientError
    when the store or Label Studio cannot be reached; a task Label Studio refuses is logged
    and its record kept (the next project setup asks again)."""
    labeled = bridge.store.exists(label_key(bridge.book.name, frame_sha256))
    record = None if labeled else imports.read(frame_sha256)
    action = restore_action(record, project, labeled)
    if action is Restore.FORGET:
        imports.forget(frame_sha256)
    if action is not Restore.IMPORT or record is None:
        return Restored(frame_sha256, action)
    sample = record.sample
    try:
        if not bridge.store.exists(sample.frame_key):
            raise PermanentError(f"{sample.frame_key} is gone from the store")
        frame = bridge.frame(sample.frame_key, frame_sha256)
    except PermanentError as exc:  # nobody can label it: no task, and no record to try again
        log.error("cannot make the task of frame %s again: %s", frame_sha256, exc)
        imports.forget(frame_sha256)
        return Restored(frame_sha256, Restore.FORGET)
    try:
        task_id = backend.make_task(sample, frame)
    except PermanentError as exc:
        log.error("Label Studio refused the task of frame %s made again: %s", frame_sha256, exc)
        return Restored(frame_sha256, action)
    return Restored(frame_sha256, action, task_id)
