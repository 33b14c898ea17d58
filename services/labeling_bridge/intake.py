"""Annotations coming back from Label Studio, by webhook or by listing tasks: parsed, checked,
and reduced to what the bridge needs. No I/O here.

Label Studio's payloads are large and change between versions, so only the fields we use are
validated and everything else is ignored; a payload missing one of them is rejected.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from pydantic import AwareDatetime, BaseModel, ConfigDict, Field, ValidationError

from binloop.errors import PermanentError
from schemas.base import BinId, Sha256
from services.labeling_bridge.label_studio import Answers, read_answers

ANNOTATION_ACTIONS = frozenset({"ANNOTATION_CREATED", "ANNOTATION_UPDATED"})
"""Webhook actions that carry one annotation; every other action is acknowledged and ignored."""


class _Lenient(BaseModel):
    model_config = ConfigDict(extra="ignore", frozen=True)


class TaskData(_Lenient):
    """The fields of a task's data the bridge wrote when it imported the sample."""

    frame_sha256: Sha256
    frame_key: str = Field(min_length=1, max_length=1024)
    bin_id: BinId
    selected_at: AwareDatetime | None = None
    taxonomy_version: str | None = Field(default=None, max_length=128)
    """The taxonomy the task's choices came from (None: a task made before tasks said)."""
    relabel_for: str | None = Field(default=None, max_length=128)
    """Set on a task asking for a frame's label again: the taxonomy it is asked in."""

    @property
    def asked_in(self) -> str | None:
        """The taxonomy version the annotator chose from, when the task says."""
        return self.relabel_for or self.taxonomy_version


class RawAnnotation(_Lenient):
    id: int
    result: list[Any]
    was_cancelled: bool = False
    updated_at: AwareDatetime
    completed_by: int | dict[str, Any] | None = None


class RawTask(_Lenient):
    id: int
    data: dict[str, Any]
    annotations: list[RawAnnotation] = Field(default_factory=list)


class RawProject(_Lenient):
    id: int


class WebhookBody(_Lenient):
    action: str = Field(min_length=1, max_length=64)
    annotation: RawAnnotation | None = None
    task: RawTask | None = None
    project: RawProject | None = None


@dataclass(frozen=True)
class SeenAnnotation:
    """One annotation of one of our tasks, as Label Studio holds it now."""

    project_id: int
    task_id: int
    task: TaskData
    annotation_id: int
    updated_at: datetime
    annotator: str
    answers: Answers

    @property
    def key(self) -> str:
        """Names the annotation across Label Studio projects (a label record's annotation_id)."""
        return annotation_key(self.project_id, self.annotation_id)


def annotation_key(project_id: int, annotation_id: int) -> str:
    return f"label-studio:{project_id}:{annotation_id}"


def _annotator(completed_by: int | dict[str, Any] | None) -> str:
    if isinstance(completed_by, dict):
        email = completed_by.get("email")
        if isinstance(email, str) and email:
            return email[:128]
        completed_by = completed_by.get("id")
    return f"label-studio-user-{completed_by}" if completed_by is not None else "label-studio"


def _task_data(task: RawTask) -> TaskData:
    try:
        return TaskData.model_validate(task.data)
    except ValidationError as exc:
        raise PermanentError(
            f"task {task.id} was not imported by the bridge (its data lacks "
            f"frame_sha256/frame_key/bin_id): {exc.error_count()} errors"
        ) from exc


def seen(project_id: int, task: RawTask, annotation: RawAnnotation) -> SeenAnnotation:
    return SeenAnnotation(
        project_id=project_id,
        task_id=task.id,
        task=_task_data(task),
        annotation_id=annotation.id,
        updated_at=annotation.updated_at,
        annotator=_annotator(annotation.completed_by),
        answers=read_answers(annotation.result),
    )


def current_annotation(task: RawTask) -> RawAnnotation | None:
    """The annotation that stands for the task: the newest one not skipped."""
    standing = [a for a in task.annotations if not a.was_cancelled]
    return max(standing, key=lambda a: (a.updated_at, a.id), default=None)


def parse_webhook(body: bytes) -> SeenAnnotation | None:
    """A webhook body -> the annotation it announces, or None for actions the bridge ignores.

    PermanentError for a body that is not a Label Studio annotation payload of one of our
    tasks (the caller answers 4xx and dead-letters it)."""
    try:
        payload = WebhookBody.model_validate_json(body)
    except ValidationError as exc:
        raise PermanentError(f"not a Label Studio webhook payload: {_first_error(exc)}") from exc
    if payload.action not in ANNOTATION_ACTIONS:
        return None
    if payload.annotation is None or payload.task is None or payload.project is None:
        raise PermanentError(
            f"{payload.action} without annotation, task and project: was the webhook created "
            "with send_payload=true?"
        )
    if payload.annotation.was_cancelled:
        return None
    return seen(payload.project.id, payload.task, payload.annotation)


@dataclass(frozen=True)
class RejectedTask:
    """A listed task whose current annotation can never become a label: not a task the bridge
    made, an annotation that names no material, or a task Label Studio lists in a shape the
    bridge cannot read."""

    task_id: str
    key: str
    """The annotation's key, or the task's when no annotation could be read."""
    updated_at: datetime | None
    """The annotation's (else the task's) last change: with `key`, the version that is
    dead-lettered once."""
    error: PermanentError


@dataclass(frozen=True)
class ListedAnnotations:
    found: list[SeenAnnotation]
    rejected: list[RejectedTask]
    """Tasks that could not be read (one bad task must not stop the rest)."""


def parse_tasks(project_id: int, tasks: Sequence[dict[str, Any]]) -> ListedAnnotations:
    """Listed tasks -> the current annotation of each."""
    found: list[SeenAnnotation] = []
    rejected: list[RejectedTask] = []
    for raw in tasks:
        task_id = str(raw.get("id"))
        try:
            task = RawTask.model_validate(raw)
        except ValidationError as exc:
            error = PermanentError(f"task {task_id} is not readable: {_first_error(exc)}")
            task_key = f"label-studio:{project_id}:task:{task_id}"
            rejected.append(RejectedTask(task_id, task_key, changed_at(raw), error))
            continue
        annotation = current_annotation(task)
        if annotation is None:
            continue
        try:
            found.append(seen(project_id, task, annotation))
        except PermanentError as exc:
            key = annotation_key(project_id, annotation.id)
            rejected.append(RejectedTask(task_id, key, annotation.updated_at, exc))
    return ListedAnnotations(found, rejected)


def changed_at(task: dict[str, Any]) -> datetime | None:
    """A listed task's last change (Label Studio's clock), if it can be read."""
    value = task.get("updated_at")
    if isinstance(value, datetime):
        return value
    if isinstance(value, str):
        try:
            return datetime.fromisoformat(value)
        except ValueError:
            return None
    return None


def _first_error(exc: ValidationError) -> str:
    error = exc.errors()[0]
    where = ".".join(str(part) for part in error["loc"]) or "body"
    return f"{where}: {error['msg']} ({exc.error_count()} errors)"


def preview(body: bytes, limit: int = 4096) -> str:
    """The start of a body for a dead letter; JSON re-serialised compactly when it parses."""
    try:
        text = json.dumps(json.loads(body), separators=(",", ":"))
    except ValueError:
        text = body.decode("utf-8", errors="replace")
    return text[:limit]
