"""The capture loop: pace frames, write each to the spool, describe it as a FrameCaptured.

No bus here: the loop hands each event to an `emit` coroutine the caller provides. Each event
waits in the outbox (outbox.py) until `emit` returns, and `announce_leftovers` sends at start
what an ingestor killed before that left there.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import random
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from datetime import datetime

from nats.errors import Error as NatsError

from binloop.errors import TransientError
from binloop.storage import LocalBlobStore
from schemas.base import BlobRef, utc_now
from schemas.events import FrameCaptured
from services.frame_ingestor.jpeg import JPEG, spool_ref
from services.frame_ingestor.outbox import Outbox
from services.frame_ingestor.sources import FrameSource, SourceFrame

log = logging.getLogger(__name__)

Emit = Callable[[FrameCaptured], Awaitable[None]]


class RateSchedule:
    """When each frame is due at a target rate. Frame n is due at anchor + n / fps, all
    measured from one anchor, so sleep overshoot never accumulates (no drift). After a stall
    longer than `max_lag_s` the schedule re-anchors instead of bursting to catch up."""

    def __init__(self, fps: float, max_lag_s: float = 1.0) -> None:
        if fps < 0:
            raise ValueError(f"fps must be >= 0, got {fps}")
        self.period = 1.0 / fps if fps > 0 else 0.0
        self.max_lag_s = max_lag_s
        self._anchor: float | None = None
        self._next = 0

    def wait_s(self, now: float) -> float:
        """Seconds to wait before emitting the next frame; advances to the frame after it."""
        if self.period == 0.0:
            return 0.0
        if self._anchor is None:
            self._anchor, self._next = now, 0
        due = self._anchor + self._next * self.period
        if now - due > self.max_lag_s:
            self._anchor, self._next, due = now, 0, now
        self._next += 1
        return max(0.0, due - now)

    def unused(self) -> None:
        """The slot wait_s just gave was not used (the pass ended there): the next frame takes
        it, rather than wait a period more."""
        if self.period > 0.0 and self._next > 0:
            self._next -= 1


def spool_frame(spool: LocalBlobStore, outbox: Outbox, event: FrameCaptured, jpeg: bytes) -> None:
    """Hold the event in the outbox, then write the frame to the spool (idempotent by content)
    and stamp it as freshly spooled: the uploader's sweep keeps a frame that was spooled again
    after it was uploaded. Marker first: a kill in between leaves no frame nothing announces."""
    outbox.hold(event)
    spool.put(event.spool.key, jpeg, JPEG)
    now = time.time()
    os.utime(spool.root / event.spool.key, (now, now))


@dataclass
class CaptureStats:
    published: int = 0
    skipped: Counter[str] = field(default_factory=Counter)


@dataclass(frozen=True)
class CapturePlan:
    bin_id: str
    producer: str
    fps: float = 0.0
    loops: int = 1
    """Passes over a finite source; 0 repeats it until stopped."""
    max_frames: int | None = None


EMIT_RETRY_FIRST_S = 0.2
EMIT_RETRY_MAX_S = 5.0


async def emit_until_stored(
    emit: Emit, event: FrameCaptured, stop: asyncio.Event | None, description: str
) -> None:
    """`emit`, again with backoff and jitter while the bus is away. The frame is in the spool
    already and nothing else would ever announce it (the uploader and the inferencer learn of
    frames from this event); the repeats carry the same event id, so JetStream stores one."""
    delay = EMIT_RETRY_FIRST_S
    while True:
        try:
            await emit(event)
            return
        except (NatsError, TimeoutError, TransientError) as exc:
            task = asyncio.current_task()
            if task is not None and task.cancelling():
                raise asyncio.CancelledError from exc  # nats-py may turn a stop into this
            if stop is not None and stop.is_set():
                raise
            wait = delay * random.uniform(0.5, 1.0)
            log.warning(
                "%s: frame %d not announced yet (%s); again in %.1fs",
                description,
                event.sequence,
                exc,
                wait,
            )
            await _pause(wait, stop)
            delay = min(delay * 2, EMIT_RETRY_MAX_S)


async def announce_leftovers(outbox: Outbox, emit: Emit, stop: asyncio.Event | None) -> int:
    """Announce what an ingestor killed before JetStream acked it left in the outbox: each
    event as it was (same id, so JetStream drops a copy it stored already), retried while the
    bus is away. Returns how many were announced; stops early when `stop` is set."""
    announced = 0
    for event in await asyncio.to_thread(outbox.leftovers):
        if stop is not None and stop.is_set():
            break
        await emit_until_stored(emit, event, stop, "outbox")
        await asyncio.to_thread(outbox.release, event)
        announced += 1
    if announced:
        log.info("outbox: announced %d frames a previous run had left unannounced", announced)
    return announced


async def _pause(seconds: float, stop: asyncio.Event | None) -> None:
    if stop is None:
        await asyncio.sleep(seconds)
        return
    with contextlib.suppress(TimeoutError):  # the pause ran its course; stop is not set
        await asyncio.wait_for(stop.wait(), seconds)


def _read(frames: Iterator[SourceFrame]) -> tuple[SourceFrame | None, datetime]:
    """The next frame and when it was read (a live camera's frame is taken then); None at the
    end of a pass. Blocks: run it in a thread, so the time is the read's, not the loop's."""
    frame = next(frames, None)
    return frame, utc_now()


def _frame_event(
    frame: SourceFrame, ref: BlobRef, sequence: int, plan: CapturePlan, captured_at: datetime
) -> FrameCaptured:
    return FrameCaptured(
        producer=plan.producer,
        bin_id=plan.bin_id,
        frame_sha256=ref.sha256,
        spool=ref,
        captured_at=captured_at,
        width=frame.width,
        height=frame.height,
        source=frame.description,
        sequence=sequence,
        ground_truth=frame.ground_truth,
    )


async def capture(
    source: FrameSource,
    spool: LocalBlobStore,
    emit: Emit,
    plan: CapturePlan,
    *,
    stop: asyncio.Event | None = None,
    on_skip: Callable[[str], None] | None = None,
    outbox: Outbox | None = None,
) -> CaptureStats:
    """Run the source for `plan.loops` passes (one for a live source) or until `max_frames`
    frames were emitted or `stop` is set. Blocking reads and spool writes run in a thread."""
    stats = CaptureStats()
    outbox = outbox or Outbox(spool, plan.bin_id)
    schedule = RateSchedule(plan.fps)

    def report_skip(reason: str, detail: str) -> None:
        stats.skipped[reason] += 1
        log.warning("%s: skipped a frame (%s): %s", source.description, reason, detail)
        if on_skip is not None:
            on_skip(reason)

    def finished() -> bool:
        stopped = stop is not None and stop.is_set()
        return stopped or (plan.max_frames is not None and stats.published >= plan.max_frames)

    passes = 0
    while not finished() and (plan.loops == 0 or passes < plan.loops):
        passes += 1
        frames = source.frames(report_skip)
        try:
            while not finished():
                # Paced before the read, stamped at the read: a live camera's frame is taken
                # when it is read, and the actuator judges the item's age by that time.
                wait = schedule.wait_s(time.monotonic())
                if wait > 0:
                    await _pause(wait, stop)
                    if finished():
                        break
                frame, read_at = await asyncio.to_thread(_read, frames)
                if frame is None:
                    schedule.unused()
                    break
                ref = spool_ref(spool, plan.bin_id, frame.jpeg)
                event = _frame_event(frame, ref, stats.published, plan, read_at)
                await asyncio.to_thread(spool_frame, spool, outbox, event, frame.jpeg)
                await emit_until_stored(emit, event, stop, source.description)
                await asyncio.to_thread(outbox.release, event)
                stats.published += 1
        finally:
            # After a cancel the generator may still be inside next() in its worker thread;
            # it is then closed when collected instead.
            with contextlib.suppress(ValueError):
                frames.close()
        if not source.finite:
            break
        if passes == 1 and stats.published == 0:
            break  # a pass that yields nothing would only spin when looped
    return stats
