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
        return f"label-studio:{self.project_id}:{self.annotation_id}"


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
class ListedAnnotations:
    found: list[SeenAnnotation]
    rejected: list[str]
    """Why each task that could not be read was left out (one bad task must not stop the rest)."""


def parse_tasks(project_id: int, tasks: Sequence[dict[str, Any]]) -> ListedAnnotations:
    """Listed tasks -> the current annotation of each."""
    found: list[SeenAnnotation] = []
    rejected: list[str] = []
    for raw in tasks:
        try:
            task = RawTask.model_validate(raw)
            annotation = current_annotation(task)
            if annotation is not None:
                found.append(seen(project_id, task, annotation))
        except ValidationError as exc:
            rejected.append(f"task {raw.get('id')}: {_first_error(exc)}")
        except PermanentError as exc:
            rejected.append(f"task {raw.get('id')}: {exc}")
    return ListedAnnotations(found, rejected)


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
