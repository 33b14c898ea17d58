"""Annotations from Label Studio into labels.annotated, whichever way they arrive.

A webhook brings an annotation as it is made; reconciliation lists the tasks changed since the
last pass, so annotations made while the bridge was down (or whose webhook failed) arrive too.
Both go through `take`, under one lock with the sample handler, and publish before storing: a
stored label record means its event went out, so the other path finds it and stays quiet.
The event id is derived from (frame, annotation, label, the annotation's updated_at), so a
retry that publishes again is dropped by JetStream.
"""

from __future__ import annotations

import asyncio
import logging
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Literal

from pydantic import ValidationError

from binloop.bus import Publisher
from binloop.errors import BinloopError, PermanentError
from binloop.observability import metrics
from schemas.events import DatasetSnapshot
from schemas.routes import DATASETS_SNAPSHOT, LABELS_ANNOTATED
from services.labeling_bridge.client import LabelStudioClient
from services.labeling_bridge.core import LabelingBridge
from services.labeling_bridge.cursor import SavedCursor
from services.labeling_bridge.imports import ImportLog
from services.labeling_bridge.intake import SeenAnnotation, changed_at, parse_tasks

log = logging.getLogger(__name__)

Source = Literal["webhook", "reconcile"]
DEAD_LETTERS_REMEMBERED = 1024
DeadLetterSink = Callable[[str, bytes, Exception], Awaitable[None]]
"""(where it came from, the payload, why) -> a dlq.v1.labeling-bridge entry."""


@dataclass(frozen=True)
class Taken:
    """What became of one annotation."""

    source: Source
    annotation_key: str
    published: bool
    """A labels.annotated went out now (False: it had gone out before, or only object or
    condition changed)."""
    sent_back: bool = False
    """Stored in an older taxonomy that it cannot be carried out of: its frame now waits to
    be labeled again (a task has to be asked for)."""


@dataclass(frozen=True)
class ReconcilePass:
    listed: int
    published: int
    rejected: list[str]
    """Why each listed task that can never become a label was dead-lettered (or had been)."""


class LabelStudioLink:
    def __init__(
        self,
        bridge: LabelingBridge,
        client: LabelStudioClient,
        publisher: Publisher,
        lock: asyncio.Lock,
        overlap_s: float,
        saved_cursor: SavedCursor | None = None,
        imports: ImportLog | None = None,
    ) -> None:
        self.bridge = bridge
        self.client = client
        self.publisher = publisher
        self.lock = lock
        self.overlap = timedelta(seconds=overlap_s)
        self.cursor: datetime | None = None
        """Newest task change seen by reconciliation (Label Studio's clock); None: none yet,
        so the first pass lists every annotated task."""
        self._saved_cursor = saved_cursor
        self._imports = imports
        self._cursor_loaded = saved_cursor is None
        self._dead_lettered: OrderedDict[tuple[str, datetime | None], None] = OrderedDict()
        """Annotation versions reconciliation has dead-lettered: an idle project keeps listing
        the newest change on every pass (it is within the overlap), and one entry is enough."""
        self._one_pass = asyncio.Lock()
        self._unannounced: DatasetSnapshot | None = None
        self._listeners: list[Callable[[Taken], None]] = []

    def add_listener(self, listener: Callable[[Taken], None]) -> None:
        """Called on the event loop after each annotation is taken."""
        self._listeners.append(listener)

    async def take(self, annotation: SeenAnnotation, source: Source) -> Taken:
        """PermanentError for an annotation that can never become a label (unknown material,
        a task whose frame is gone or does not match, a stored label record of the frame that
        cannot be read); TransientError when the store is not reachable."""
        async with self.lock:
            try:
                prepared = await asyncio.to_thread(self.bridge.prepare, annotation)
            except ValidationError as exc:  # left as it is, for someone to look at
                raise PermanentError(
                    f"the stored label record of frame {annotation.task.frame_sha256} cannot "
                    f"be read: {exc.error_count()} errors, e.g. {exc.errors()[0]['msg']}"
                ) from exc
            published = sent_back = False
            if prepared is not None:
                sent_back = prepared.record.taxonomy_version != self.bridge.taxonomy.version
                if prepared.annotated is not None:
                    await self.publisher.publish(LABELS_ANNOTATED, prepared.annotated)
                    published = True
                snapshot = await asyncio.to_thread(self.bridge.commit, prepared.record)
                self._observe(annotation, published)
                await self._forget_import(annotation.task.frame_sha256)
                if snapshot is not None:
                    metrics.DATASET_SNAPSHOTS.inc()
                    await self._announce(snapshot)
        taken = Taken(source, annotation.key, published, sent_back)
        for listener in self._listeners:
            listener(taken)
        return taken

    def _observe(self, annotation: SeenAnnotation, published: bool) -> None:
        if not published:
            return
        metrics.LABELS.labels(self.bridge.backend.name).inc()
        selected_at = annotation.task.selected_at
        if selected_at is not None:
            lead_time = (annotation.updated_at - selected_at).total_seconds()
            metrics.LABELING_LEAD_TIME.labels(self.bridge.backend.name).observe(max(lead_time, 0))

    async def _announce(self, snapshot: DatasetSnapshot) -> None:
        """Called holding `self.lock`, so a version cut meanwhile cannot be forgotten."""
        # Kept until it is out: the label that completed the version is stored already, so
        # nothing else would announce it again (the next pass does; after a restart, the
        # start does, from the note in the store).
        self._unannounced = snapshot
        await self.publisher.publish(DATASETS_SNAPSHOT, snapshot)
        if self._unannounced is snapshot:
            self._unannounced = None
        try:
            await asyncio.to_thread(self.bridge.announced, snapshot)
        except BinloopError as exc:  # only costs announcing it again (same id) at the next start
            log.warning(
                "could not note that dataset version %d went out: %s", snapshot.version, exc
            )

    async def reconcile(self, dead_letter: DeadLetterSink) -> ReconcilePass:
        """One pass: every task changed since the cursor (minus the overlap), oldest first.
        An annotation that can never become a label is dead-lettered and the pass goes on;
        a transient failure ends the pass without moving the cursor. Passes run one at a
        time (the periodic one and one asked for, e.g. by a test or an operator)."""
        async with self._one_pass:
            return await self._reconcile(dead_letter)

    async def _reconcile(self, dead_letter: DeadLetterSink) -> ReconcilePass:
        async with self.lock:
            if self._unannounced is not None:
                await self._announce(self._unannounced)
        if not self._cursor_loaded and self._saved_cursor is not None:
            self.cursor = await asyncio.to_thread(self._saved_cursor.load)
            self._cursor_loaded = True
        since = self.cursor - self.overlap if self.cursor is not None else None
        tasks = await asyncio.to_thread(self.client.annotated_tasks, since)
        project_id = await asyncio.to_thread(self.client.project_id)
        listed = parse_tasks(project_id, tasks)
        published = 0
        for rejected in listed.rejected:
            await self._dead_letter_once(
                dead_letter, rejected.task_id, rejected.key, rejected.updated_at, rejected.error
            )
        for annotation in listed.found:
            if (annotation.key, annotation.updated_at) in self._dead_lettered:
                continue
            try:
                taken = await self.take(annotation, "reconcile")
            except PermanentError as exc:
                await self._dead_letter_once(
                    dead_letter, str(annotation.task_id), annotation.key, annotation.updated_at, exc
                )
                continue
            if taken.published:
                metrics.LABEL_STUDIO_RECONCILED.inc()
                published += 1
        changes = [changed_at(task) for task in tasks]
        newest = max((c for c in changes if c is not None), default=None)
        if newest is not None and (self.cursor is None or newest > self.cursor):
            self.cursor = newest
            await self._save_cursor(newest)
        counts = await asyncio.to_thread(self.client.counts)
        metrics.LABELING_BACKLOG.labels(self.bridge.backend.name).set(
            max(counts.tasks - counts.annotated, 0)
        )
        return ReconcilePass(len(tasks), published, [str(r.error) for r in listed.rejected])

    async def _dead_letter_once(
        self,
        dead_letter: DeadLetterSink,
        task_id: str,
        key: str,
        updated_at: datetime | None,
        error: PermanentError,
    ) -> None:
        version = (key, updated_at)
        if version in self._dead_lettered:
            return
        # The annotation's version as the payload: a later, still bad edit of the same
        # annotation is a new entry, a repeat of this one is not.
        when = updated_at.isoformat() if updated_at is not None else "at an unknown time"
        await dead_letter(f"task {task_id}", f"{key} updated {when}".encode(), error)
        self._remember_dead_letter(version)

    def _remember_dead_letter(self, version: tuple[str, datetime | None]) -> None:
        self._dead_lettered[version] = None
        while len(self._dead_lettered) > DEAD_LETTERS_REMEMBERED:
            self._dead_lettered.popitem(last=False)

    async def _forget_import(self, frame_sha256: str) -> None:
        """The frame is labeled: its task need not be made again should the project go."""
        if self._imports is None:
            return
        try:
            await asyncio.to_thread(self._imports.forget, frame_sha256)
        except BinloopError as exc:  # only costs a stale record, dropped at the next setup
            log.warning("could not remove the import record of frame %s: %s", frame_sha256, exc)

    async def _save_cursor(self, cursor: datetime) -> None:
        if self._saved_cursor is None:
            return
        try:
            await asyncio.to_thread(self._saved_cursor.save, cursor)
        except BinloopError as exc:  # only costs a longer first pass after a restart
            log.warning("could not save the reconciliation cursor: %s", exc)
