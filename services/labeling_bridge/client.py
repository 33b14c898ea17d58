"""The Label Studio server behind `label-studio-sdk` (2.x): the project, its webhook and ML
backend, tasks in, annotated tasks out. Blocking calls: run them in a worker thread.

Errors are translated to binloop's tree, so the bus does the right thing with a sample:
- Label Studio unreachable, timing out, redirecting in a loop, answering a body that cannot
  be decoded, or answering 5xx, 401, 403 or 429 -> NotReadyError: the sample waits in
  JetStream (the backlog), retried after a delay without limit, until Label Studio is back;
  none is dropped or dead-lettered for it;
- another 4xx -> PermanentError (a request Label Studio will never accept): dead-lettered;
- except a 400 or 404 because the project itself is gone (deleted in Label Studio):
  ProjectGoneError (a NotReadyError), and the cached project is forgotten, so the next call
  finds the project again or creates it.
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, TypeVar

import httpx
from label_studio_sdk import ImportApiRequest, LabelStudio
from label_studio_sdk.core.api_error import ApiError
from label_studio_sdk.core.pagination import SyncPager

from binloop.errors import NotReadyError, PermanentError, TransientError
from binloop.observability import metrics
from services.labeling_bridge.paging import Page, list_changed

log = logging.getLogger(__name__)

T = TypeVar("T")
WAIT_STATUSES = frozenset({401, 403, 429})
"""4xx that a person fixes (a token, a permission) or that pass (rate limit): samples wait."""
GONE_STATUSES = frozenset({400, 404})
"""What Label Studio answers a call naming a deleted project (400: a webhook or ML backend
list validates the project id): the project is then looked up to tell."""
WEBHOOK_ACTIONS = ["ANNOTATION_CREATED", "ANNOTATION_UPDATED"]
PAGE_SIZE = 100
LS_DATETIME = "%Y-%m-%dT%H:%M:%S.%fZ"
"""The only datetime format Label Studio's task filters accept (UTC, 'Z')."""


@dataclass(frozen=True)
class ProjectSpec:
    title: str
    label_config: str
    description: str


@dataclass(frozen=True)
class ProjectRef:
    """One project on one server. The creation time tells a project made again apart from
    the one it replaces even when it gets the same id (Label Studio's database was lost, and
    ids started again from 1)."""

    label_studio_url: str
    id: int
    created_at: datetime | None


class ProjectGoneError(NotReadyError):
    """The project a call named no longer exists; the next call finds or makes it again."""


@dataclass(frozen=True)
class ProjectCounts:
    tasks: int
    annotated: int


@contextmanager
def translated_errors(operation: str) -> Iterator[None]:
    """Maps SDK and transport errors to Permanent/Transient/NotReady, counting each."""
    try:
        yield
    except ApiError as exc:
        status = exc.status_code or 0
        metrics.LABEL_STUDIO_ERRORS.labels(operation, str(status)).inc()
        detail = f"Label Studio {operation}: HTTP {status}: {str(exc.body)[:500]}"
        if 400 <= status < 500 and status not in WAIT_STATUSES:
            raise PermanentError(detail) from exc
        raise NotReadyError(detail) from exc
    except httpx.RequestError as exc:
        # Transport failures, and answers that never become one: a redirect loop (a proxy
        # bouncing http and https), a body that does not decode. Label Studio is away either way.
        metrics.LABEL_STUDIO_ERRORS.labels(operation, type(exc).__name__).inc()
        raise NotReadyError(f"Label Studio {operation}: {type(exc).__name__}: {exc}") from exc


class LabelStudioClient:
    """One project on one Label Studio server, found by title (created when missing)."""

    def __init__(self, url: str, token: str, spec: ProjectSpec, timeout_s: float) -> None:
        self.url = url.rstrip("/")
        self.spec = spec
        self._http = httpx.Client(timeout=timeout_s, follow_redirects=True)
        # The SDK's LabelStudio subclass does not annotate its __init__. Its own retries
        # (sleeping in our worker thread) are off: the bus retries, with its delay and counts.
        self._sdk = LabelStudio(  # type: ignore[no-untyped-call]
            base_url=self.url, api_key=token, httpx_client=self._http, max_retries=0
        )
        self._project: ProjectRef | None = None
        self.page_size = PAGE_SIZE
        """Tasks per listing request (tests make pages small to see paging at work)."""
        # The sample handler, the webhook and reconciliation all call in from worker threads.
        self._project_lock = threading.Lock()

    @property
    def sdk(self) -> LabelStudio:
        return self._sdk

    def close(self) -> None:
        self._http.close()

    def _call(self, operation: str, call: Callable[[], T], project: int | None = None) -> T:
        """`project`: the project id the call used, checked when Label Studio answers 404."""
        try:
            with translated_errors(operation):
                return call()
        except PermanentError as exc:
            if (
                project is not None
                and _http_status(exc) in GONE_STATUSES
                and self._forget_if_gone(project)
            ):
                raise ProjectGoneError(
                    f"Label Studio {operation}: project {project} is gone; the next call finds "
                    f"{self.spec.title!r} again or creates it"
                ) from exc
            raise

    def _forget_if_gone(self, project: int) -> bool:
        """Whether the project no longer exists (its cached id is then forgotten)."""
        try:
            with translated_errors("check_project"):
                self._sdk.projects.get(id=project)
        except PermanentError as exc:
            if _http_status(exc) != 404:
                raise
            with self._project_lock:
                if self._project is not None and self._project.id == project:
                    self._project = None
            log.warning("Label Studio project %d is gone: it will be found or created", project)
            return True
        return False

    def project_id(self) -> int:
        """The project's id, creating the project (or updating its config) the first time."""
        return self.project().id

    def project(self) -> ProjectRef:
        """The project, found by title or created (its config updated) the first time."""
        with self._project_lock:
            if self._project is None:
                self._project = self._call("ensure_project", self._ensure_project)
            return self._project

    def _ensure_project(self) -> ProjectRef:
        spec = self.spec
        # `title` filters by "contains": keep exact matches, the oldest if there are several.
        listed: Iterable[Any] = self._sdk.projects.list(title=spec.title, page_size=PAGE_SIZE)
        ids = sorted(int(p.id) for p in listed if p.title == spec.title and p.id is not None)
        if ids:
            project = self._sdk.projects.get(id=ids[0])
            # Label Studio strips the config it stores.
            if (project.label_config or "").strip() != spec.label_config.strip():
                # The taxonomy or vocabularies changed: annotators see the new choices.
                self._sdk.projects.update(id=ids[0], label_config=spec.label_config)
                log.info("updated the label config of Label Studio project %d", ids[0])
            return ProjectRef(self.url, ids[0], project.created_at)
        created = self._sdk.projects.create(
            title=spec.title, label_config=spec.label_config, description=spec.description
        )
        if created.id is None:
            raise TransientError("Label Studio created a project without an id")
        log.info("created Label Studio project %r (id %d)", spec.title, created.id)
        return ProjectRef(self.url, created.id, created.created_at)

    def ensure_webhook(self, url: str, headers: dict[str, str], path: str) -> int:
        """The project's webhook to `url` with `headers`; returns its id. A webhook of ours
        from an earlier run (same `path`, another host or port) is moved instead of kept."""
        project = self.project_id()
        wanted: dict[str, Any] = {
            "url": url,
            "headers": headers,
            "is_active": True,
            "send_payload": True,
            "send_for_all_actions": False,
            "actions": WEBHOOK_ACTIONS,
        }

        def ensure() -> int:
            hooks = [
                h
                for h in self._sdk.webhooks.list(project=str(project))
                if h.url.endswith(path) and h.id is not None
            ]
            hooks.sort(key=lambda h: (h.url != url, h.id or 0))
            if hooks and hooks[0].id is not None:
                hook = hooks[0]
                current = (hook.url, hook.headers, hook.is_active, hook.send_payload)
                if current != (url, headers, True, True):
                    self._sdk.webhooks.update(id=hooks[0].id, **wanted)
                return int(hooks[0].id)
            created = self._sdk.webhooks.create(project=project, **wanted)
            if created.id is None:
                raise TransientError("Label Studio created a webhook without an id")
            return int(created.id)

        return self._call("ensure_webhook", ensure, project)

    def ensure_ml_backend(self, url: str, title: str) -> int:
        """Connects `url` as the project's ML backend `title` (Label Studio checks its /health
        and /setup before it accepts it)."""
        project = self.project_id()

        def ensure() -> int:
            for backend in self._sdk.ml.list(project=project):
                if backend.title == title and backend.id is not None:
                    if backend.url != url:
                        # Label Studio 1.23 re-validates the backend and fails without project.
                        self._sdk.ml.update(id=backend.id, url=url, project=project)
                    return int(backend.id)
            created = self._sdk.ml.create(project=project, url=url, title=title)
            if created.id is None:
                raise TransientError("Label Studio created an ML backend without an id")
            return int(created.id)

        return self._call("ensure_ml_backend", ensure, project)

    def find_task(self, frame_sha256: str, relabel_for: str | None = None) -> int | None:
        """The task already made for this frame (a redelivered sample), if any; with
        `relabel_for`, the one asking for its label again in that taxonomy version."""
        project = self.project_id()
        query = _filters(
            [
                {
                    "filter": "filter:tasks:data.frame_sha256",
                    "operator": "equal",
                    "type": "String",
                    "value": frame_sha256,
                }
            ]
        )

        def find() -> int | None:
            pager: Iterable[Any] = self._sdk.tasks.list(
                project=project, query=query, page_size=10, fields="task_only"
            )
            for task in pager:
                data = task.data
                if (data.get("frame_sha256"), data.get("relabel_for")) == (
                    frame_sha256,
                    relabel_for,
                ):
                    return int(task.id)
            return None

        return self._call("find_task", find, project)

    def import_task(self, task: dict[str, Any]) -> int:
        project = self.project_id()

        def create() -> int:
            response = self._sdk.projects.import_tasks(
                id=project,
                # Not validated: the SDK's PredictionRequest wants a task id, which a task's
                # own predictions get from Label Studio on import.
                request=[ImportApiRequest.model_construct(**task)],
                return_task_ids=True,
                commit_to_project=True,
            )
            # Community edition imports synchronously and lists the new ids (not in the SDK type).
            ids = getattr(response, "task_ids", None) or []
            if len(ids) != 1:
                raise TransientError(f"Label Studio imported {len(ids)} tasks, expected 1")
            return int(ids[0])

        return self._call("import_task", create, project)

    def ensure_prediction(self, task_id: int, prediction: dict[str, Any]) -> bool:
        """Adds `prediction` to the task when it has none; True if it had to. A task imported
        with its prediction has come out without one (once in about 20 test imports, under
        load; the cause is not known), and annotators would then start from nothing instead of
        correcting the model."""

        def ensure() -> bool:
            # Not tasks.get: for a task without predictions that asks the project's ML backend
            # (the champion) for one, which is not the prediction the sample carries.
            if self._sdk.predictions.list(task=task_id):
                return False
            self._sdk.predictions.create(
                task=task_id,
                result=prediction["result"],
                score=prediction["score"],
                model_version=prediction["model_version"],
            )
            return True

        added: bool = self._call("ensure_prediction", ensure)
        if added:
            log.warning("task %d had no prediction after its import; added it", task_id)
        return added

    def annotated_tasks(self, changed_after: datetime | None) -> list[dict[str, Any]]:
        """Every annotated task, or those changed after `changed_after` (Label Studio's clock),
        oldest change first, as plain dicts: id, updated_at, data, annotations. Paged by the
        last change, not by page number (see paging.py): a task edited during the listing is
        listed (once, as it is now) and makes no other task drop out."""
        project = self.project_id()
        pages = _AnnotatedTaskPages(self._sdk, project, self.page_size)
        return self._call("list_tasks", lambda: list_changed(pages, changed_after), project)

    def counts(self) -> ProjectCounts:
        project = self.project_id()

        def read() -> ProjectCounts:
            found = self._sdk.projects.get(id=project)
            return ProjectCounts(
                tasks=found.task_number or 0, annotated=found.num_tasks_with_annotations or 0
            )

        return self._call("project_counts", read, project)


class _AnnotatedTaskPages:
    """The first pages of a project's annotated tasks that keyset paging asks for."""

    def __init__(self, sdk: LabelStudio, project: int, page_size: int) -> None:
        self._sdk = sdk
        self._project = project
        self._page_size = page_size

    def changed_since(self, since: datetime | None, inclusive: bool) -> Page:
        items = [_ANNOTATED]
        if since is not None:
            operator = "greater_or_equal" if inclusive else "greater"
            items.append(_changed(operator, since))
        return self._first_page(_filters(items, ordering=["tasks:updated_at"]))

    def changed_at(self, instant: datetime, after_id: int | None) -> Page:
        items = [_ANNOTATED, _changed("equal", instant)]
        if after_id is not None:
            items.append(
                {
                    "filter": "filter:tasks:id",
                    "operator": "greater",
                    "type": "Number",
                    "value": after_id,
                }
            )
        return self._first_page(_filters(items, ordering=["tasks:id"]))

    def _first_page(self, query: str) -> Page:
        # Always the first page: the filters move, not the page number.
        pager: SyncPager[Any, Any] = self._sdk.tasks.list(
            project=self._project,
            query=query,
            only_annotated=True,
            page=1,
            page_size=self._page_size,
            fields="all",
        )
        tasks = [
            {
                "id": task.id,
                "updated_at": task.updated_at,
                "data": task.data,
                "annotations": task.annotations or [],
            }
            for task in pager.items or []
        ]
        return Page(tasks, full=len(tasks) >= self._page_size)


_ANNOTATED: dict[str, Any] = {
    # `only_annotated` alone does not narrow the list once a query is given.
    "filter": "filter:tasks:total_annotations",
    "operator": "greater",
    "type": "Number",
    "value": 0,
}


def _changed(operator: str, moment: datetime) -> dict[str, Any]:
    return {
        "filter": "filter:tasks:updated_at",
        "operator": operator,
        "type": "Datetime",
        "value": moment.astimezone(UTC).strftime(LS_DATETIME),
    }


def _http_status(error: BaseException) -> int | None:
    """The HTTP status behind an error `translated_errors` raised, if Label Studio answered."""
    cause = error.__cause__
    return cause.status_code if isinstance(cause, ApiError) else None


def _filters(items: list[dict[str, Any]], ordering: list[str] | None = None) -> str:
    query: dict[str, Any] = {"filters": {"conjunction": "and", "items": items}}
    if ordering:
        query["ordering"] = ordering
    return json.dumps(query)
