"""Which queued frame the forwarder tries next, so that one frame that keeps failing on its own
never blocks the frames behind it.

Two kinds of failure, told apart by who failed:
- the object store or the bus (StoreUnavailableError, a TransientError from publishing): every
  frame would fail the same way, so the forwarder's one shared backoff waits and the order of
  the queue stays as it is (a selected frame is still the first up when the store returns);
- this frame alone (SpoolIOError: its spool file, marker or queue entry; or an error nobody
  mapped): the frame waits on its own backoff, and after `set_aside_after` failures in a row
  it is set aside behind every other waiting frame. Set-aside frames are retried, in turn,
  whenever no other frame is ready; nothing is dropped for failing.

Each failure is recorded next to the frame's queue entry (queue.py, `failures/`), so after a
restart a frame keeps its count and, if it was set aside, its place behind the others: a
poison frame does not hold the head of the queue again for `set_aside_after` more failures. Its
retry is due at once after the restart (the fault may have gone with it). A record that cannot
be written only costs that: the count lives on in memory until the next restart.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

from services.uploader.queue import FrameFailures, QueuedFrame, UploadQueue
from services.uploader.spool import SpoolIOError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Failure:
    """One counted failure of a frame, and the record to keep of it."""

    event_id: str
    record: FrameFailures
    newly_set_aside: bool

    @property
    def failures(self) -> int:
        return self.record.failures


@dataclass
class _Trouble:
    failures: int = 0
    """Failed attempts in a row of this frame, on its own account."""
    retry_at: float = 0.0


class UploadSchedule:
    def __init__(
        self,
        queue: UploadQueue,
        *,
        set_aside_after: int,
        retry_delay_s: Callable[[int], float],
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if set_aside_after < 1:
            raise ValueError(f"set_aside_after {set_aside_after} is below 1")
        self.queue = queue
        self.set_aside_after = set_aside_after
        self.retry_delay_s = retry_delay_s
        """The wait after n failures of one frame (the store's backoff schedule)."""
        self.clock = clock
        self._trouble: dict[str, _Trouble] = {}
        self._set_aside: dict[str, None] = {}  # event ids, the next to retry first
        self._turn = 0
        self._unrecorded: set[str] = set()  # warned about once
        self._resume(queue.recorded_failures)

    def _resume(self, recorded: dict[str, FrameFailures]) -> None:
        """Take up the failures recorded before a restart, set-aside frames in their turn."""
        now = self.clock()
        for event_id, record in sorted(recorded.items(), key=lambda item: item[1].turn):
            self._trouble[event_id] = _Trouble(record.failures, retry_at=now)
            if record.set_aside:
                self._set_aside[event_id] = None
            self._turn = max(self._turn, record.turn)
        if recorded:
            log.info(
                "uploader %s: %d queued frames resume with their failures, %d of them set aside",
                self.queue.root.name,
                len(recorded),
                len(self._set_aside),
            )

    def next(self) -> tuple[QueuedFrame | None, float | None]:
        """The frame to try now, or (None, seconds until one is due; None if none waits).

        The head of the queue (selected frames first, then the oldest), set-aside frames
        passed over. While that head waits for its own retry, the frames behind it wait too:
        it keeps its place until it is set aside. With only set-aside frames left, the one
        due first in turn."""
        self._forget_gone()
        now = self.clock()
        head = self.queue.peek(skip=self._set_aside)
        if head is not None:
            wait_s = self._wait_s(head.event_id, now)
            return (head, None) if wait_s <= 0 else (None, wait_s)
        waits = []
        for event_id in self._set_aside:
            wait_s = self._wait_s(event_id, now)
            if wait_s <= 0 and (frame := self.queue.get(event_id)) is not None:
                return frame, None
            waits.append(wait_s)
        return None, min(waits, default=None)

    def failed(self, frame: QueuedFrame) -> tuple[int, bool]:
        """The frame failed on its own account: (its failures in a row, set aside just now).
        Counts and records the failure; the record writes (and fsyncs) a file, so code on an
        event loop calls count_failure there and record in a worker thread instead."""
        failure = self.count_failure(frame)
        self.record(failure)
        return failure.failures, failure.newly_set_aside

    def count_failure(self, frame: QueuedFrame) -> Failure:
        """The in-memory half of failed(): no disk, so it is cheap on an event loop."""
        trouble = self._trouble.setdefault(frame.event_id, _Trouble())
        trouble.failures += 1
        trouble.retry_at = self.clock() + self.retry_delay_s(trouble.failures)
        newly_set_aside = False
        if frame.event_id in self._set_aside:
            del self._set_aside[frame.event_id]  # to the back of the set-aside frames
            self._set_aside[frame.event_id] = None
        elif trouble.failures >= self.set_aside_after:
            self._set_aside[frame.event_id] = None
            newly_set_aside = True
        self._turn += 1
        record = FrameFailures(trouble.failures, frame.event_id in self._set_aside, self._turn)
        return Failure(frame.event_id, record, newly_set_aside)

    def record(self, failure: Failure) -> None:
        """The disk half of failed(): keep the count across a restart. Blocks on the disk; a
        record that cannot be written is warned about (once per frame) and skipped. Records of
        one frame must be written in the order they were counted (the forwarder awaits each)."""
        try:
            self.queue.record_failures(failure.event_id, failure.record)
        except SpoolIOError as exc:  # the frame's own disk trouble, most likely
            log.log(
                logging.DEBUG if failure.event_id in self._unrecorded else logging.WARNING,
                "%s; after a restart the frame counts its failures anew",
                exc,
            )
            self._unrecorded.add(failure.event_id)

    def done(self, frame: QueuedFrame) -> None:
        """The frame left the queue (stored or dead-lettered)."""
        self._trouble.pop(frame.event_id, None)
        self._set_aside.pop(frame.event_id, None)
        self._unrecorded.discard(frame.event_id)

    def is_set_aside(self, event_id: str) -> bool:
        return event_id in self._set_aside

    @property
    def set_aside(self) -> list[str]:
        """Event ids of the set-aside frames, the next to retry first."""
        return list(self._set_aside)

    def _wait_s(self, event_id: str, now: float) -> float:
        trouble = self._trouble.get(event_id)
        return 0.0 if trouble is None else trouble.retry_at - now

    def _forget_gone(self) -> None:
        """Frames the spool-full policy dropped, or another path dequeued."""
        for event_id in [e for e in self._trouble if self.queue.get(e) is None]:
            del self._trouble[event_id]
            self._set_aside.pop(event_id, None)
            self._unrecorded.discard(event_id)
