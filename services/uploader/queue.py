"""The uploader's durable queue: frames waiting for the object store, and the frames the sampler
asked for first. Kept as files next to the spool, so a restart resumes where it stopped.

Layout under `<spool_root>/.uploader/<bin>/` (a bin id cannot start with a dot, so this never
meets a bin's spool folder):
- `queue/<event_id>.json`: one frames.captured event waiting for the store, with when it came;
- `wanted/<sha256>`: an empty file per frame a samples.selected event asked for;
- `failures/<event_id>.json`: how often a queued frame failed on its own account and whether it
  is set aside (see schedule.py), so a restart does not try a poison frame from zero. It goes
  with the queue entry; one that cannot be read is deleted with a warning (the frame then
  counts its failures from zero again, nothing worse), and so is one whose frame is not queued.
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Container
from dataclasses import dataclass
from pathlib import Path

from pydantic import ValidationError

from binloop.storage.files import write_atomically
from schemas.events import FrameCaptured
from services.uploader.spool import SpoolIOError

log = logging.getLogger(__name__)

UNREADABLE_SUFFIX = ".unreadable"


MAX_RECORDED_FAILURES = 1_000_000
"""Past this a failure record is not believed: no frame is retried that often."""


@dataclass(frozen=True)
class FrameFailures:
    """A queued frame's own failures, as the schedule last recorded them."""

    failures: int
    """Failed attempts in a row, on the frame's own account."""
    set_aside: bool
    turn: int
    """Orders the records: the set-aside frame with the lowest turn is retried first."""

    def to_json(self) -> bytes:
        return json.dumps(
            {"failures": self.failures, "set_aside": self.set_aside, "turn": self.turn}
        ).encode()

    @classmethod
    def from_json(cls, data: bytes) -> FrameFailures:
        """Raises ValueError for anything but a record this module wrote."""
        record = json.loads(data)
        if not isinstance(record, dict):
            raise ValueError("not a JSON object")
        failures, set_aside, turn = (record.get(k) for k in ("failures", "set_aside", "turn"))
        if type(failures) is not int or not 1 <= failures <= MAX_RECORDED_FAILURES:
            raise ValueError(f"failures {failures!r} is not within 1..{MAX_RECORDED_FAILURES}")
        if type(set_aside) is not bool:
            raise ValueError(f"set_aside {set_aside!r} is not a boolean")
        if type(turn) is not int or turn < 0:
            raise ValueError(f"turn {turn!r} is not a whole number")
        return cls(failures, set_aside, turn)


@dataclass(frozen=True)
class QueuedFrame:
    event: FrameCaptured
    queued_at: float
    """The uploader's clock when the frame entered the queue."""

    @property
    def event_id(self) -> str:
        return str(self.event.event_id)

    @property
    def sha256(self) -> str:
        return self.event.frame_sha256

    @property
    def size(self) -> int:
        return self.event.spool.size


class UploadQueue:
    """Frames in arrival order, wanted ones first. Safe to call from several threads."""

    def __init__(self, spool_root: Path, bin_id: str) -> None:
        self.root = spool_root.resolve() / ".uploader" / bin_id
        self._entries_dir = self.root / "queue"
        self._wanted_dir = self.root / "wanted"
        self._failures_dir = self.root / "failures"
        for folder in (self._entries_dir, self._wanted_dir, self._failures_dir):
            folder.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._entries: dict[str, QueuedFrame] = {}
        self._by_sha: dict[str, dict[str, None]] = {}
        self._wanted: dict[str, None] = {}
        self._pending_bytes = 0
        self.unreadable: list[Path] = []
        """Entries found unreadable when the queue was loaded; set aside, never uploaded."""
        self.recorded_failures: dict[str, FrameFailures] = {}
        """Failure records of queued frames found when the queue was loaded, by event id."""
        self._load()

    # -- loading ---------------------------------------------------------------------------

    def _load(self) -> None:
        loaded = []
        for path in self._entries_dir.glob("*.json"):
            try:
                record = json.loads(path.read_bytes())
                frame = QueuedFrame(
                    event=FrameCaptured.model_validate(record["event"]),
                    queued_at=float(record["queued_at"]),
                )
            except (OSError, ValueError, KeyError, TypeError, ValidationError) as exc:
                # Kept for an operator to look at; its frame stays in the spool, unmarked.
                aside = path.with_name(path.name + UNREADABLE_SUFFIX)
                path.replace(aside)
                self.unreadable.append(aside)
                log.warning("upload queue entry %s is unreadable (%s); set aside", path, exc)
                continue
            loaded.append(frame)
        loaded.sort(key=lambda f: (f.queued_at, f.event.sequence, f.event_id))
        for frame in loaded:
            self._index(frame)
        for marker in sorted(self._wanted_dir.iterdir(), key=lambda p: p.stat().st_mtime):
            if not marker.name.startswith(".tmp-"):
                self._wanted[marker.name] = None
        self._load_failures()

    def _load_failures(self) -> None:
        for path in self._failures_dir.iterdir():
            event_id = path.name.removesuffix(".json")
            if path.name == event_id or event_id not in self._entries:
                self._delete_failures(path)  # a leftover temporary file, or an orphan
                continue
            try:
                record = FrameFailures.from_json(path.read_bytes())
            except (OSError, ValueError) as exc:
                log.warning(
                    "upload failure record %s is unreadable (%s); deleted, the frame counts "
                    "its failures anew",
                    path,
                    exc,
                )
                self._delete_failures(path)
                continue
            self.recorded_failures[event_id] = record

    def _index(self, frame: QueuedFrame) -> None:
        self._entries[frame.event_id] = frame
        same_frame = self._by_sha.setdefault(frame.sha256, {})
        if not same_frame:
            self._pending_bytes += frame.size
        same_frame[frame.event_id] = None

    # -- changes ---------------------------------------------------------------------------

    def add(self, frame: QueuedFrame) -> bool:
        """Persist and queue a frame; False when that event is queued already."""
        with self._lock:
            if frame.event_id in self._entries:
                return False
            record = {"queued_at": frame.queued_at, "event": frame.event.model_dump(mode="json")}
            write_atomically(self._entry_path(frame.event_id), json.dumps(record).encode())
            self._index(frame)
            return True

    def remove(self, frame: QueuedFrame) -> bool:
        """Take a frame off the queue (disk first). True when no other queued event refers to
        the same spooled file. Raises SpoolIOError, with the frame still queued, when its entry
        cannot be deleted."""
        with self._lock:
            path = self._entry_path(frame.event_id)
            try:
                path.unlink(missing_ok=True)
            except OSError as exc:  # still queued, on disk and here: the caller tries again
                raise SpoolIOError(f"upload queue entry {path} cannot be removed: {exc}") from exc
            self._forget_failures(frame.event_id)
            if self._entries.pop(frame.event_id, None) is None:
                return frame.sha256 not in self._by_sha
            same_frame = self._by_sha[frame.sha256]
            del same_frame[frame.event_id]
            if same_frame:
                return False
            del self._by_sha[frame.sha256]
            self._pending_bytes -= frame.size
            return True

    def record_failures(self, event_id: str, record: FrameFailures) -> None:
        """Keep a queued frame's failure count across restarts. Raises SpoolIOError when the
        record cannot be written (the caller goes on with what it has in memory)."""
        with self._lock:
            if event_id not in self._entries:
                return  # left the queue meanwhile: nothing to remember
            try:
                write_atomically(self._failures_path(event_id), record.to_json())
            except OSError as exc:
                raise SpoolIOError(
                    f"upload failure record of {event_id} cannot be written: {exc}"
                ) from exc

    def _forget_failures(self, event_id: str) -> None:
        self._delete_failures(self._failures_path(event_id))

    @staticmethod
    def _delete_failures(path: Path) -> None:
        try:
            path.unlink(missing_ok=True)
        except OSError as exc:  # an orphan: deleted when the queue is next loaded
            log.warning("upload failure record %s cannot be deleted: %s", path, exc)

    def want(self, sha256: str) -> bool:
        """Mark a frame as wanted first; False when it already was."""
        with self._lock:
            if sha256 in self._wanted:
                return False
            write_atomically(self._wanted_dir / sha256, b"")
            self._wanted[sha256] = None
            return True

    def unwant(self, sha256: str) -> None:
        with self._lock:
            (self._wanted_dir / sha256).unlink(missing_ok=True)
            self._wanted.pop(sha256, None)

    # -- reading ---------------------------------------------------------------------------

    def peek(self, skip: Container[str] = ()) -> QueuedFrame | None:
        """The frame to upload next: the earliest wanted one, else the oldest; frames whose
        event id is in `skip` are passed over."""
        with self._lock:
            for sha256 in self._wanted:
                for event_id in self._by_sha.get(sha256, {}):
                    if event_id not in skip:
                        return self._entries[event_id]
            for event_id, frame in self._entries.items():
                if event_id not in skip:
                    return frame
            return None

    def get(self, event_id: str) -> QueuedFrame | None:
        with self._lock:
            return self._entries.get(event_id)

    def snapshot(self) -> list[QueuedFrame]:
        """Every queued frame, oldest first."""
        with self._lock:
            return list(self._entries.values())

    def wanted(self) -> frozenset[str]:
        with self._lock:
            return frozenset(self._wanted)

    def is_queued(self, sha256: str) -> bool:
        with self._lock:
            return sha256 in self._by_sha

    @property
    def pending_frames(self) -> int:
        return len(self._entries)

    @property
    def pending_bytes(self) -> int:
        """Bytes of distinct spooled files the queue waits on."""
        return self._pending_bytes

    def _entry_path(self, event_id: str) -> Path:
        return self._entries_dir / f"{event_id}.json"

    def _failures_path(self, event_id: str) -> Path:
        return self._failures_dir / f"{event_id}.json"
