"""Store-and-forward on the edge: frames enter a durable queue as they are captured, and one
forwarder drains it into the object store, selected frames first, backing off while the store
does not answer and setting aside a frame that keeps failing on its own (see schedule.py).
No bus here: announcing and dead-lettering are callables the app passes in.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections.abc import Awaitable, Callable
from typing import Literal

from binloop.errors import (
    ChecksumMismatchError,
    MissingBlobError,
    PermanentError,
    TransientError,
)
from binloop.observability import metrics
from binloop.storage import spool_key
from schemas.events import FrameCaptured, FrameStored
from services.uploader.backoff import Backoff
from services.uploader.core import FrameUploader, StoreRefusedError, stored_event
from services.uploader.limits import (
    UNREAD_BY_INFERENCER,
    Drop,
    DropPlan,
    SpoolLimits,
    plan_drops,
)
from services.uploader.queue import QueuedFrame, UploadQueue
from services.uploader.schedule import UploadSchedule
from services.uploader.spool import (
    UPLOADED_UNREAD_BY_INFERENCER,
    Spool,
    SpoolIOError,
    SpoolScan,
    UnreadBudget,
)

log = logging.getLogger(__name__)

Progress = Literal[
    "queued", "prioritized", "stored", "retry", "set_aside", "dropped", "dead_lettered"
]
ProgressHook = Callable[[Progress, str], None]
"""Told (kind, frame sha256) after each step, on the event loop; tests wait on it."""
Announce = Callable[[FrameStored], Awaitable[None]]
DeadLetterSink = Callable[[QueuedFrame, PermanentError], Awaitable[None]]

# While the spool stays full every new frame drops one: the metric counts each, the log sums up.
DROP_WARNING_INTERVAL_S = 60.0


class Forwarder:
    """Intake (bus handlers call accept/prioritize) and the one loop that drains the queue."""

    def __init__(
        self,
        *,
        spool: Spool,
        queue: UploadQueue,
        uploader: FrameUploader,
        limits: SpoolLimits,
        backoff: Backoff,
        announce: Announce,
        dead_letter: DeadLetterSink,
        producer: str,
        set_aside_after: int,
        clock: Callable[[], float] = time.time,
        on_progress: ProgressHook | None = None,
    ) -> None:
        self.spool = spool
        self.queue = queue
        self.uploader = uploader
        self.limits = limits
        self.backoff = backoff
        # Per-frame retries follow the store's backoff schedule and clock (monotonic).
        self.schedule = UploadSchedule(
            queue,
            set_aside_after=set_aside_after,
            retry_delay_s=backoff.delay_s,
            clock=backoff.clock,
        )
        self.announce = announce
        self.dead_letter = dead_letter
        self.producer = producer
        self.clock = clock
        self.on_progress = on_progress
        self.bin_id = spool.bin_id
        self.running = False
        self.unread_since: float | None = None
        """From when the edge-inferencer has frames left to read (readers.unread_since), as the
        app's sweep loop last asked JetStream; the spool-full policy drops those last. None: it
        has read them all, or does not read this bin."""
        self._wake = asyncio.Event()
        self._report_lock = threading.Lock()  # intake threads and the sweep both report
        self._drops_unreported = 0
        self._unread_drops_unreported = 0
        self._given_up_unreported = 0  # uploaded frames the sweep deleted before they were read
        self._last_drop_warning: float | None = None
        self._over_limit_warned = False
        # The frame being uploaded right now is not the spool-full policy's to drop.
        self._claim_lock = threading.Lock()
        self._in_flight: str | None = None
        self._attempt_task: asyncio.Task[None] | None = None
        self._uploaded_bytes = metrics.UPLOADED_BYTES.labels(self.bin_id)
        self._backlog_frames = metrics.UPLOADER_BACKLOG.labels(self.bin_id)
        self._backlog_bytes = metrics.UPLOADER_BACKLOG_BYTES.labels(self.bin_id)
        for _ in queue.unreadable:
            metrics.UPLOADER_DROPPED.labels(self.bin_id, "unreadable_entry").inc()
        self.measure()

    # -- intake ----------------------------------------------------------------------------

    async def accept(self, event: FrameCaptured) -> DropPlan:
        """Queue a captured frame durably (the bus acks it afterwards), then hold the backlog
        to its limits. A spooled frame that does not match its event's sha256 raises
        ChecksumMismatchError, a permanent error the bus dead-letters."""
        plan = await asyncio.to_thread(self._accept, event)
        self._notify("queued", event.frame_sha256)
        for drop in plan.drops:
            self._notify("dropped", drop.frame.sha256)
        self.wake()
        return plan

    def _accept(self, event: FrameCaptured) -> DropPlan:
        # Gone from the spool is no error yet: a redelivery after the sweep, when the store
        # may well hold the frame. The forwarder asks the store (or dead-letters) once it can.
        # Unreadable for now: queued all the same, so the forwarder's retries (not the bus's,
        # which give up after max_deliveries) decide; it verifies the bytes before uploading.
        try:
            self.spool.read(event.spool.key, event.frame_sha256)
        except (MissingBlobError, SpoolIOError):
            pass
        except ChecksumMismatchError as exc:
            self._mark_dead_lettered(event, exc)  # the bus dead-letters it; the sweep reclaims
            raise
        self.queue.add(QueuedFrame(event, self.clock()))
        plan = self.enforce_limits()
        self.measure()
        return plan

    def enforce_limits(self) -> DropPlan:
        with self._claim_lock:
            if (
                self.queue.pending_frames <= self.limits.max_frames
                and self.queue.pending_bytes <= self.limits.max_bytes
            ):
                plan = DropPlan([], still_over=False)
            else:
                plan = plan_drops(
                    self.queue.snapshot(),
                    self.queue.wanted(),
                    self.limits,
                    self.clock(),
                    busy={self._in_flight} if self._in_flight else set(),
                    unread_since=self.unread_since,
                )
            for drop in plan.drops:
                self._drop(drop)
        self._report(plan)
        return plan

    def _drop(self, drop: Drop) -> None:
        if self.queue.remove(drop.frame):
            self.spool.discard(drop.frame.event.spool.key)
        metrics.UPLOADER_DROPPED.labels(self.bin_id, drop.reason).inc()
        with self._report_lock:
            self._drops_unreported += 1
            if drop.reason == UNREAD_BY_INFERENCER:
                self._unread_drops_unreported += 1

    def _report(self, plan: DropPlan) -> None:
        self.report_drops()
        if plan.still_over and not self._over_limit_warned:
            log.warning(
                "uploader %s: spool over its limits (%d frames, %d bytes waiting; limits %d, "
                "%d) and only frames selected for labeling or younger than %.0f s are left: "
                "none of those is dropped",
                self.bin_id,
                self.queue.pending_frames,
                self.queue.pending_bytes,
                self.limits.max_frames,
                self.limits.max_bytes,
                self.limits.min_age_s,
            )
        self._over_limit_warned = plan.still_over

    def report_drops(self) -> None:
        """Warn about drops not reported yet: the first at once, then at most once a minute."""
        with self._report_lock:
            now = self.clock()
            last = self._last_drop_warning
            if not (self._drops_unreported or self._given_up_unreported) or (
                last is not None and now - last < DROP_WARNING_INTERVAL_S
            ):
                return
            dropped, unread = self._drops_unreported, self._unread_drops_unreported
            given_up = self._given_up_unreported
            self._drops_unreported = self._unread_drops_unreported = 0
            self._given_up_unreported = 0
            self._last_drop_warning = now
        if given_up:
            log.warning(
                "uploader %s: deleted %d uploaded frames the edge-inferencer has not read yet, "
                "the oldest it kept for it: the spool limits (%d frames, %d bytes) are full "
                "with those and the %d frames, %d bytes waiting for the store. Is the "
                "edge-inferencer reading?",
                self.bin_id,
                given_up,
                self.limits.max_frames,
                self.limits.max_bytes,
                self.queue.pending_frames,
                self.queue.pending_bytes,
            )
        if not dropped:
            return
        log.warning(
            "uploader %s: spool full, dropped %d frames not selected for labeling, %d of them "
            "not read by the edge-inferencer yet (policy %s; limits %d frames, %d bytes; %d "
            "frames, %d bytes waiting)",
            self.bin_id,
            dropped,
            unread,
            self.limits.policy,
            self.limits.max_frames,
            self.limits.max_bytes,
            self.queue.pending_frames,
            self.queue.pending_bytes,
        )

    async def prioritize(self, sha256: str) -> bool:
        """The sampler wants this frame: upload it before the others. False when this bin has
        nothing left to upload for it (stored already, or never spooled here)."""
        wanted = await asyncio.to_thread(self._prioritize, sha256)
        if wanted:
            self._notify("prioritized", sha256)
            # The forwarder may be waiting out the old head's own retry: the new head need not.
            self.wake()
        return wanted

    def _prioritize(self, sha256: str) -> bool:
        key = spool_key(self.bin_id, sha256)
        if not (self.queue.is_queued(sha256) or self.spool.is_pending(key)):
            return False
        if self.queue.want(sha256):
            metrics.UPLOADER_PRIORITIZED.labels(self.bin_id).inc()
        return True

    def sweep(self, now: float, retention_s: float) -> SpoolScan:
        """Sweep the spool (Spool.sweep), keeping what the edge-inferencer has not read as of
        `unread_since`, within what the spool limits leave after the frames waiting for the
        store; the oldest beyond that are deleted and counted (disk: call it in a thread)."""
        budget = UnreadBudget(
            frames=max(0, self.limits.max_frames - self.queue.pending_frames),
            bytes=max(0, self.limits.max_bytes - self.queue.pending_bytes),
        )
        scan = self.spool.sweep(now, retention_s, self.unread_since, budget)
        if scan.given_up:
            dropped = metrics.UPLOADER_DROPPED.labels(self.bin_id, UPLOADED_UNREAD_BY_INFERENCER)
            dropped.inc(scan.given_up)
            with self._report_lock:
                self._given_up_unreported += scan.given_up
        return scan

    def prune_wanted(self) -> None:
        """Forget requests for frames that are neither queued nor waiting in the spool."""
        for sha256 in self.queue.wanted():
            if not self.queue.is_queued(sha256) and not self.spool.is_pending(
                spool_key(self.bin_id, sha256)
            ):
                self.queue.unwant(sha256)

    def measure(self) -> None:
        self._backlog_frames.set(self.queue.pending_frames)
        self._backlog_bytes.set(self.queue.pending_bytes)

    # -- the forwarding loop ---------------------------------------------------------------

    def wake(self) -> None:
        """New work; call from the event loop."""
        self._wake.set()

    async def run(self) -> None:
        self.running = True
        try:
            while True:
                if self.queue.peek() is None:
                    self._wake.clear()
                    await self._wake.wait()
                    continue
                wait_s = self.backoff.wait_s()
                if wait_s > 0:
                    # The store is known to be down: new frames wait too, rather than hammer it.
                    await asyncio.sleep(wait_s)
                    continue  # pick again: a selected frame may have come in meanwhile
                frame, due_in_s = self._claim_next()
                if frame is None:
                    # Only frames that failed on their own wait, each for its own retry time.
                    await self._wait_for_work(due_in_s)
                    continue
                self._attempt_task = asyncio.create_task(self._attempt(frame))
                # Shielded: a service that stops lets the frame in flight finish (see drain),
                # rather than leave it stored but not yet announced or dequeued.
                await asyncio.shield(self._attempt_task)
        finally:
            self.running = False

    async def _wait_for_work(self, timeout_s: float | None) -> None:
        self._wake.clear()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._wake.wait(), timeout_s)

    async def drain(self, timeout_s: float) -> None:
        """Wait for the attempt in flight, if any (the service is stopping)."""
        task = self._attempt_task
        if task is None or task.done():
            return
        done, _ = await asyncio.wait({task}, timeout=timeout_s)
        if not done:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)

    def _claim_next(self) -> tuple[QueuedFrame | None, float | None]:
        with self._claim_lock:
            frame, due_in_s = self.schedule.next()
            self._in_flight = frame.event_id if frame else None
            return frame, due_in_s

    def _release(self) -> None:
        with self._claim_lock:
            self._in_flight = None

    async def _attempt(self, frame: QueuedFrame) -> None:
        try:
            await self._attempt_claimed(frame)
        finally:
            self._release()  # only now may the spool-full policy consider this frame again

    async def _attempt_claimed(self, frame: QueuedFrame) -> None:
        try:
            outcome = await self._forward(frame)
            # Off the event loop, as every disk write here: a failing eMMC takes seconds.
            await asyncio.to_thread(self._finish, frame)
        except SpoolIOError as exc:  # before TransientError: it is one, but about this frame
            await self._frame_failed(frame, exc)
            return
        except TransientError as exc:  # the store (refusing, too: StoreRefusedError) or the bus
            self._retry_later(frame, exc)
            return
        except Exception as exc:  # a bug, or an error nobody mapped: it must not end the loop
            await self._frame_failed(frame, exc)
            return
        self.schedule.done(frame)
        self._notify(outcome, frame.sha256)

    async def _forward(self, frame: QueuedFrame) -> Progress:
        """Store, then announce; a TransientError leaves the frame queued for the next try.
        Only a frame that is itself lost is dead-lettered: its spool file gone (and the store
        without it) or its bytes not the ones its event promised. The uploader reports a store
        that refuses the frame as StoreRefusedError, a TransientError: the store's trouble."""
        try:
            upload = await asyncio.to_thread(self.uploader.upload, frame.event)
        except (ChecksumMismatchError, MissingBlobError) as exc:
            await asyncio.to_thread(self._mark_dead_lettered, frame.event, exc)
            await self.dead_letter(frame, exc)
            return "dead_lettered"
        # Counted once written: a retry after a failed announcement finds the frame stored
        # and writes (and counts) nothing.
        self._uploaded_bytes.inc(upload.written_bytes)
        await self.announce(stored_event(frame.event, upload.blob, self.producer))
        if self.backoff.failures:
            log.warning(
                "uploader %s: uploads go through again after %d failed attempts; %d frames waiting",
                self.bin_id,
                self.backoff.failures,
                self.queue.pending_frames,
            )
        self.backoff.succeeded()
        return "stored"

    def _mark_dead_lettered(self, event: FrameCaptured, error: PermanentError) -> None:
        """Let the sweep reclaim a spooled frame that can never be uploaded. The dead letter
        keeps the event and both hashes; the file stays for the retention, for a look."""
        try:
            self.spool.mark_dead_lettered(event.spool.key, error, self.clock())
        except SpoolIOError as exc:
            log.warning(
                "uploader %s: frame %s is dead-lettered but its spool marker is not written "
                "(%s); the sweep keeps the file until someone deletes it",
                self.bin_id,
                event.spool.key,
                exc,
            )

    async def _frame_failed(self, frame: QueuedFrame, error: Exception) -> None:
        """This frame failed on its own account: it waits on its own backoff and, failing
        again and again, is set aside behind the others. The store's backoff is untouched."""
        failure = self.schedule.count_failure(frame)
        # The record fsyncs: in a worker thread, awaited, so one frame's records stay in order.
        await asyncio.to_thread(self.schedule.record, failure)
        failures, set_aside = failure.failures, failure.newly_set_aside
        metrics.UPLOADER_RETRIES.labels(self.bin_id, type(error).__name__).inc()
        # A traceback for what nobody expected, once per frame and when it is set aside.
        details = None if isinstance(error, TransientError) else error
        if set_aside:
            log.warning(
                "uploader %s: frame %s failed %d times in a row (%s: %s) while the store may "
                "be fine; set aside behind the other %d waiting frames and retried after them",
                self.bin_id,
                frame.event.spool.key,
                failures,
                type(error).__name__,
                error,
                self.queue.pending_frames - 1,
                exc_info=details,
            )
        elif failures == 1:
            log.log(
                logging.WARNING if details is None else logging.ERROR,
                "uploader %s: frame %s failed (%s: %s); it is retried with backoff",
                self.bin_id,
                frame.event.spool.key,
                type(error).__name__,
                error,
                exc_info=details,
            )
        else:
            log.debug(
                "uploader %s: frame %s failed again (%d in a row): %s",
                self.bin_id,
                frame.event.spool.key,
                failures,
                error,
            )
        self._notify("retry", frame.sha256)
        if set_aside:
            self._notify("set_aside", frame.sha256)

    def _retry_later(self, frame: QueuedFrame, error: TransientError) -> None:
        delay_s = self.backoff.failed()
        metrics.UPLOADER_RETRIES.labels(self.bin_id, type(error).__name__).inc()
        if self.backoff.failures == 1:  # once per outage; the recovery is logged too
            refused = isinstance(error, StoreRefusedError)
            log.log(
                logging.ERROR if refused else logging.WARNING,
                "uploader %s: upload failed (%s); frames stay in the spool, retrying with "
                "backoff (next in %.2f s)%s",
                self.bin_id,
                error,
                delay_s,
                "; the store refuses uploads, which an operator has to fix" if refused else "",
            )
        else:
            log.debug(
                "uploader %s: attempt %d failed: %s", self.bin_id, self.backoff.failures, error
            )
        self._notify("retry", frame.sha256)

    def _finish(self, frame: QueuedFrame) -> None:
        """Dequeue a stored or dead-lettered frame (disk: call it in a worker thread)."""
        if self.queue.remove(frame):
            try:
                self.queue.unwant(frame.sha256)
            except OSError as exc:  # the frame is done; the sweep prunes the mark later
                log.warning(
                    "uploader %s: wanted mark of %s kept (%s)", self.bin_id, frame.sha256, exc
                )
        self.measure()

    def _notify(self, kind: Progress, sha256: str) -> None:
        if self.on_progress is not None:
            self.on_progress(kind, sha256)
