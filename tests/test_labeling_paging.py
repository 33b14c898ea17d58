"""Reconciliation's listing of changed tasks: keyset paging over `updated_at`, against an
in-memory task list that a test edits between two page requests. A real Label Studio cannot be
made to take an edit at an exact page boundary on demand; tests/test_label_studio.py runs the
same listing (and an edit between pages) against the real server."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from types import SimpleNamespace
from typing import Any

import pytest
from label_studio_sdk.core.pagination import SyncPager

from binloop.errors import PermanentError
from services.labeling_bridge import client as client_module
from services.labeling_bridge.client import LS_DATETIME, LabelStudioClient, ProjectSpec
from services.labeling_bridge.paging import Page, list_changed

T0 = datetime(2025, 3, 14, 12, 0, tzinfo=UTC)


def at(seconds: float) -> datetime:
    return T0 + timedelta(seconds=seconds)


@dataclass
class TaskList:
    """Label Studio's `GET /api/tasks` over one project's annotated tasks, as far as the
    bridge's queries go: the filters on total_annotations, updated_at and id, ordering by one
    field (ties in the order the tasks were made, as a database may return them), page
    numbers. `before_request` runs before each request is answered (a test edits tasks there)."""

    changed: dict[int, datetime]
    before_request: Callable[[int], None] = lambda number: None
    requests: list[dict[str, Any]] = field(default_factory=list)

    def edit(self, task_id: int, when: datetime) -> None:
        self.changed[task_id] = when

    def list(self, **kwargs: Any) -> SyncPager[Any, Any]:
        self.before_request(len(self.requests) + 1)
        self.requests.append(kwargs)
        query = json.loads(kwargs["query"])
        ids = [i for i in self.changed if all(self._keeps(f, i) for f in query["filters"]["items"])]
        (ordering,) = query["ordering"]
        if ordering == "tasks:updated_at":
            ids.sort(key=lambda i: self.changed[i])  # stable: ties stay in id order
        else:
            assert ordering == "tasks:id"
            ids.sort()
        page, size = kwargs.get("page") or 1, kwargs["page_size"]
        items = [
            SimpleNamespace(id=i, updated_at=self.changed[i], data={"n": i}, annotations=[])
            for i in ids[(page - 1) * size : page * size]
        ]
        more = {**kwargs, "page": page + 1}
        return SyncPager(
            has_next=bool(items),
            items=items,
            get_next=lambda: self.list(**more),
            response=SimpleNamespace(total=len(ids)),
        )

    def _keeps(self, item: dict[str, Any], task_id: int) -> bool:
        name, operator, value = item["filter"], item["operator"], item["value"]
        if name == "filter:tasks:total_annotations":
            assert (operator, value) == ("greater", 0)
            return True
        if name == "filter:tasks:id":
            assert operator == "greater"
            return bool(task_id > value)
        assert name == "filter:tasks:updated_at"
        wanted = datetime.strptime(value, LS_DATETIME).replace(tzinfo=UTC)
        actual = self.changed[task_id]
        return {
            "greater": actual > wanted,
            "greater_or_equal": actual >= wanted,
            "equal": actual == wanted,
        }[operator]


def listing_client(
    monkeypatch: pytest.MonkeyPatch, tasks: TaskList, page_size: int
) -> LabelStudioClient:
    monkeypatch.setattr(client_module, "PAGE_SIZE", page_size)
    client = LabelStudioClient("http://127.0.0.1:9", "token", ProjectSpec("p", "<View/>", "d"), 1)
    monkeypatch.setattr(client, "project_id", lambda: 3)
    monkeypatch.setattr(client.sdk.tasks, "list", tasks.list)
    return client


def test_a_task_edited_while_later_pages_are_read_makes_no_other_task_drop_out(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    tasks = TaskList({i: at(i) for i in range(1, 6)})

    def edit_after_the_first_page(number: int) -> None:
        if number == 2:  # an annotator corrects task 1 while the pass reads on
            tasks.edit(1, at(60))

    tasks.before_request = edit_after_the_first_page
    client = listing_client(monkeypatch, tasks, page_size=2)
    try:
        listed = client.annotated_tasks(None)
    finally:
        client.close()

    # Page numbers would have read [1, 2], then [4, 5] (task 1 moved to the end, the rest up
    # one), then [1]: task 3 never listed, and the cursor past it.
    assert [(t["id"], t["updated_at"]) for t in listed] == [
        (2, at(2)),
        (3, at(3)),
        (4, at(4)),
        (5, at(5)),
        (1, at(60)),  # once, as it is now
    ]


def test_the_listing_starts_after_the_cursor_not_at_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    tasks = TaskList({i: at(i) for i in range(1, 6)})
    client = listing_client(monkeypatch, tasks, page_size=2)
    try:
        listed = client.annotated_tasks(at(2))
    finally:
        client.close()
    assert [t["id"] for t in listed] == [3, 4, 5]
    # An idle project's newest change, at the cursor, is not listed again on every pass.
    first = json.loads(tasks.requests[0]["query"])["filters"]["items"][-1]
    assert first["operator"] == "greater"


@dataclass
class Pages:
    """`ChangedTasks` over a TaskList, for list_changed alone."""

    tasks: TaskList
    size: int
    asked: list[str] = field(default_factory=list)

    def _page(self, ids: list[int]) -> Page:
        return Page(
            [{"id": i, "updated_at": self.tasks.changed[i]} for i in ids], len(ids) >= self.size
        )

    def changed_since(self, since: datetime | None, inclusive: bool) -> Page:
        self.tasks.before_request(len(self.asked) + 1)
        self.asked.append(f"{'>=' if inclusive else '>'} {since}")
        changed = self.tasks.changed
        ids = sorted(
            (
                i
                for i in changed
                if since is None or changed[i] > since or (inclusive and changed[i] == since)
            ),
            key=lambda i: changed[i],
        )
        return self._page(ids[: self.size])

    def changed_at(self, instant: datetime, after_id: int | None) -> Page:
        self.tasks.before_request(len(self.asked) + 1)
        self.asked.append(f"= {instant} id > {after_id}")
        changed = self.tasks.changed
        ids = sorted(i for i in changed if changed[i] == instant and i > (after_id or 0))
        return self._page(ids[: self.size])


def test_more_tasks_changed_at_one_instant_than_a_page_holds_are_walked_by_id() -> None:
    # A bulk action in Label Studio stamps every task it touches with one time.
    tasks = TaskList({1: at(1), **{i: at(5) for i in range(2, 9)}, 9: at(7)})

    def edit_in_the_group(number: int) -> None:
        if number == 4:  # inside the walk of the group at at(5)
            tasks.edit(3, at(9))

    tasks.before_request = edit_in_the_group
    pages = Pages(tasks, size=3)
    listed = list_changed(pages, None)

    assert [(t["id"], t["updated_at"]) for t in listed] == [
        (1, at(1)),
        (2, at(5)),
        (4, at(5)),
        (5, at(5)),
        (6, at(5)),
        (7, at(5)),
        (8, at(5)),
        (9, at(7)),
        (3, at(9)),
    ]
    assert any(asked.startswith("= ") for asked in pages.asked)


def test_a_listing_that_does_not_move_fails_instead_of_looping() -> None:
    class Stuck:
        def changed_since(self, since: datetime | None, inclusive: bool) -> Page:
            return Page([{"id": 1, "updated_at": at(1)}, {"id": 2, "updated_at": at(1)}], True)

        def changed_at(self, instant: datetime, after_id: int | None) -> Page:
            return self.changed_since(None, True)  # a server ignoring the id filter

    with pytest.raises(PermanentError, match="cannot page past them"):
        list_changed(Stuck(), None)
