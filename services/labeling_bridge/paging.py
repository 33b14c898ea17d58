"""Keyset paging over Label Studio tasks ordered by their last change. No I/O here.

Page numbers over that order are not stable: a task edited while a pass reads later pages
moves to the end, every later task moves up one place, and the one that crosses the page
boundary is never returned (and the cursor moves past it). So each page starts where the
last one ended instead: at the newest change it held, again (tasks changed at that same
instant may not all have fit), skipping the tasks already seen at that instant. A group of
tasks changed at one instant that fills a whole page (Label Studio's bulk actions stamp many
tasks with one time) is walked by task id, which no edit moves.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Protocol

from binloop.errors import PermanentError
from services.labeling_bridge.intake import changed_at


@dataclass(frozen=True)
class Page:
    tasks: list[dict[str, Any]]
    """Listed tasks as plain dicts (id, updated_at, data, annotations)."""
    full: bool
    """Whether the page is full, so more tasks may follow it."""


class ChangedTasks(Protocol):
    """First pages of two queries over one project's annotated tasks."""

    def changed_since(self, since: datetime | None, inclusive: bool) -> Page:
        """Tasks changed after `since` (at or after it when `inclusive`; all for None),
        oldest change first."""
        ...

    def changed_at(self, instant: datetime, after_id: int | None) -> Page:
        """Tasks whose last change is exactly `instant`, with an id above `after_id`, by id."""
        ...


class _Collected:
    """Tasks in the order their current version was first seen: a task seen again with
    another change (edited during the pass) keeps only that newer version."""

    def __init__(self) -> None:
        self._tasks: dict[object, dict[str, Any]] = {}

    def add(self, tasks: Iterable[dict[str, Any]]) -> None:
        for task in tasks:
            task_id = task.get("id")
            seen = self._tasks.get(task_id)
            if seen is not None and changed_at(seen) == changed_at(task):
                continue
            self._tasks.pop(task_id, None)
            self._tasks[task_id] = task

    def listed(self) -> list[dict[str, Any]]:
        return list(self._tasks.values())


def list_changed(pages: ChangedTasks, changed_after: datetime | None) -> list[dict[str, Any]]:
    """Every task changed after `changed_after`, each once (its newest version), oldest change
    first, including tasks changed while the listing ran."""
    collected = _Collected()
    boundary, inclusive = changed_after, False
    while True:
        page = pages.changed_since(boundary, inclusive)
        collected.add(page.tasks)
        if not page.full:
            return collected.listed()
        newest = max((c for c in map(changed_at, page.tasks) if c is not None), default=None)
        if newest is None:
            raise PermanentError(
                f"Label Studio listed {len(page.tasks)} tasks without a readable updated_at: "
                "cannot page past them"
            )
        if boundary is None or newest > boundary:
            boundary, inclusive = newest, True
            continue
        # A whole page changed at `boundary`, so moving the boundary cannot get past it.
        _walk_instant(pages, boundary, collected)
        inclusive = False


def _walk_instant(pages: ChangedTasks, instant: datetime, collected: _Collected) -> None:
    after_id: int | None = None
    while True:
        page = pages.changed_at(instant, after_id)
        collected.add(page.tasks)
        ids = [task["id"] for task in page.tasks if isinstance(task.get("id"), int)]
        if not page.full or not ids:
            return
        if after_id is not None and max(ids) <= after_id:
            raise PermanentError(
                f"Label Studio listed tasks changed at {instant.isoformat()} with ids up to "
                f"{max(ids)} for ids above {after_id}: cannot page past them"
            )
        after_id = max(ids)
