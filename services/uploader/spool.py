"""The edge spool as the uploader keeps it: which frames are settled (safely stored, or given up
as corrupt), and the sweep that reclaims those older than the retention. State lives in files,
so it survives a restart.

A frame `<bin>/<xx>/<sha>.jpg` is marked by a sibling file holding the time it was settled:
- `<sha>.jpg.uploaded`: the object store confirmed it (with the object key);
- `<sha>.jpg.dead_lettered`: it was dead-lettered (with the error): its bytes no longer match
  its sha256, so it can never be uploaded under that hash, or it was gone (then the sweep
  drops the marker).
The sweep never deletes an unmarked frame; only the spool-full policy gives one up (see
limits.py), and never silently. Settled frames the edge-inferencer has not read are kept past
the retention, but only within a budget (what the spool limits leave after the frames waiting
for the store): beyond it the sweep gives up the oldest of them, and says how many.

A third sibling is not the uploader's: `<sha>.jpg.announcing`, the frame-ingestor's outbox (see
services/frame_ingestor/outbox.py), holds a FrameCaptured that JetStream has not acked yet.
While it is there, neither the sweep nor the spool-full policy deletes the frame: a capture of
it is being announced (or will be, at the ingestor's next start).

Errors: a frame file that cannot be read or written for now (EACCES, EIO, a full disk) raises
SpoolIOError, transient and about this one frame, not the object store; a path that can never
hold the frame (a folder in its place) raises MissingBlobError, as a missing frame does.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

from binloop.errors import (
    MissingBlobError,
    PermanentError,
    StoreUnavailableError,
)
from binloop.storage import SPOOL_ANNOUNCING_SUFFIX, LocalBlobStore
from binloop.storage.blobstore import check_digest

log = logging.getLogger(__name__)

UPLOADED_SUFFIX = ".uploaded"
DEAD_LETTERED_SUFFIX = ".dead_lettered"
MARKER_SUFFIXES = (UPLOADED_SUFFIX, DEAD_LETTERED_SUFFIX)
NOT_FRAME_SUFFIXES = (*MARKER_SUFFIXES, SPOOL_ANNOUNCING_SUFFIX)
ORPHAN_ANNOUNCING_GRACE_S = 60.0
"""An announce marker is written just before its frame, so one without a frame is an orphan
(the ingestor was killed in between) only once it is older than this."""


class SpoolIOError(StoreUnavailableError):
    """The bin's own disk failed to read or write one frame's files (the spooled frame, its
    marker, its queue entry). Retryable; the forwarder retries that frame on its own schedule
    rather than backing off the object store for every frame."""


UPLOADED_UNREAD_BY_INFERENCER = "uploaded_unread_by_inferencer"
"""The drop reason of a settled frame past its retention that the sweep gave up, over its
budget, before the edge-inferencer read it."""


@dataclass(frozen=True)
class UnreadBudget:
    """How much the sweep may keep past the retention for the edge-inferencer: settled frames
    (the store has them, or never will) that it has not read yet."""

    frames: int
    bytes: int


@dataclass(frozen=True)
class SpoolScan:
    pending: int
    """Frames not (or not since they were spooled again) settled."""
    kept: int
    """Settled frames (uploaded or dead-lettered) still inside the retention, or not read by
    the edge-inferencer yet."""
    deleted: int
    """Settled frames past the retention."""
    given_up: int = 0
    """Settled frames the edge-inferencer had not read, deleted over the UnreadBudget."""


class Spool:
    def __init__(self, root: Path, bin_id: str) -> None:
        self.store = LocalBlobStore(root)
        self.bin_id = bin_id

    def read(self, key: str, sha256: str) -> bytes:
        """The spooled frame, checked against the hash its event promised. Raises
        MissingBlobError or ChecksumMismatchError (permanent), SpoolIOError (transient)."""
        try:
            data = self.store.get(key)
        except (IsADirectoryError, NotADirectoryError) as exc:
            # No file can ever be read there; treated as gone (the store may still hold it).
            raise MissingBlobError(f"spool frame {key} is not a file: {exc}") from exc
        except OSError as exc:
            raise SpoolIOError(f"spool frame {key} cannot be read: {exc}") from exc
        return check_digest(data, sha256, f"spool frame {key}")

    def mark_uploaded(self, key: str, object_key: str, uploaded_at: float) -> None:
        self._mark(key, UPLOADED_SUFFIX, {"uploaded_at": uploaded_at, "object_key": object_key})

    def mark_dead_lettered(self, key: str, error: PermanentError, dead_lettered_at: float) -> None:
        """The frame was dead-lettered: the sweep reclaims it after the retention, as it does
        an uploaded one, unless it is spooled again before that."""
        record = {
            "dead_lettered_at": dead_lettered_at,
            "error_type": type(error).__name__,
            "error": str(error),
        }
        self._mark(key, DEAD_LETTERED_SUFFIX, record)

    def _mark(self, key: str, suffix: str, record: dict[str, object]) -> None:
        try:
            self.store.put(key + suffix, json.dumps(record).encode(), "application/json")
        except OSError as exc:
            raise SpoolIOError(f"spool marker {key}{suffix} cannot be written: {exc}") from exc

    def is_pending(self, key: str) -> bool:
        """The frame is in the spool and not (yet) settled."""
        return self.store.exists(key) and self.settled_at(key) is None

    def discard(self, key: str) -> None:
        """Give a frame up (the spool-full policy decided so): the frame and any marker. Kept
        while a capture of it is being announced: that capture will be queued in its turn."""
        if self.is_announcing(key):
            return
        self.store.delete(key)
        for suffix in MARKER_SUFFIXES:
            self.store.delete(key + suffix)

    def is_announcing(self, key: str) -> bool:
        """The frame-ingestor has not had a capture of this frame acked by JetStream yet."""
        return self.store.exists(key + SPOOL_ANNOUNCING_SUFFIX)

    def uploaded_at(self, key: str) -> float | None:
        """When the frame was uploaded, or None when it is not marked (or the mark is unreadable:
        then it counts as pending and is kept, the safe side)."""
        return self._marker_time(key, UPLOADED_SUFFIX, "uploaded_at")

    def dead_lettered_at(self, key: str) -> float | None:
        """When the frame was dead-lettered, or None (as for uploaded_at)."""
        return self._marker_time(key, DEAD_LETTERED_SUFFIX, "dead_lettered_at")

    def settled_at(self, key: str) -> float | None:
        """The latest of uploaded_at and dead_lettered_at; None when neither is marked."""
        times = [t for t in (self.uploaded_at(key), self.dead_lettered_at(key)) if t is not None]
        return max(times, default=None)

    def _marker_time(self, key: str, suffix: str, field: str) -> float | None:
        path = self.store.root / (key + suffix)
        try:
            value = json.loads(path.read_bytes())[field]
        except FileNotFoundError:
            return None
        except (OSError, ValueError, KeyError, TypeError) as exc:
            log.warning("spool marker %s is unreadable (%s); frame kept", path, exc)
            return None
        return float(value) if isinstance(value, int | float) else None

    def sweep(
        self,
        now: float,
        retention_s: float,
        keep_spooled_since: float | None = None,
        unread_budget: UnreadBudget | None = None,
    ) -> SpoolScan:
        """Delete settled frames whose marker is older than `retention_s` and which were not
        spooled again since; drop markers whose frame is gone. Counts what is left.

        Frames spooled at or after `keep_spooled_since` are kept however long ago they
        settled: the edge-inferencer, which reads them from here, has not got to them yet.
        With an `unread_budget`, only as many of those past the retention as it allows: the
        oldest beyond it are given up (an inferencer that stopped reading would otherwise
        fill the disk). A frame with an announce marker counts as pending, whatever its own
        markers say."""
        keys = set(self.store.list(f"{self.bin_id}/"))
        frames = sorted(k for k in keys if not k.endswith(NOT_FRAME_SUFFIXES))
        pending = kept = deleted = 0
        held_for_inferencer: list[tuple[float, int, str]] = []  # past the retention
        for key in frames:
            settled_at = self.settled_at(key)
            # Asked of the disk, not of the listing: the ingestor may have started a capture
            # of these bytes since.
            if settled_at is None or self.is_announcing(key):
                pending += 1
                continue
            try:
                stat = (self.store.root / key).stat()
            except FileNotFoundError:
                continue  # deleted under us; its marker goes on the next sweep
            spooled_at = stat.st_mtime
            if spooled_at > settled_at:
                pending += 1  # captured again after it settled: wait for that event's upload
            elif keep_spooled_since is not None and spooled_at >= keep_spooled_since:
                kept += 1  # not read by the edge-inferencer yet
                if now - settled_at >= retention_s:
                    held_for_inferencer.append((spooled_at, stat.st_size, key))
            elif now - settled_at >= retention_s:
                self._delete_settled(key)
                deleted += 1
            else:
                kept += 1
        given_up = 0
        if unread_budget is not None:
            given_up = self._give_up_over_budget(held_for_inferencer, unread_budget)
            kept -= given_up
        for marker in keys:
            for suffix in MARKER_SUFFIXES:
                if marker.endswith(suffix) and marker[: -len(suffix)] not in keys:
                    self.store.delete(marker)
            if (
                marker.endswith(SPOOL_ANNOUNCING_SUFFIX)
                and marker.removesuffix(SPOOL_ANNOUNCING_SUFFIX) not in keys
            ):
                self._drop_orphan_announce_marker(marker, now)
        return SpoolScan(pending=pending, kept=kept, deleted=deleted, given_up=given_up)

    def _give_up_over_budget(self, held: list[tuple[float, int, str]], budget: UnreadBudget) -> int:
        """Delete the oldest of `held` (spool time, size, key) until the rest fit `budget`.
        How many went."""
        held.sort()
        frames, size = len(held), sum(entry[1] for entry in held)
        given_up = 0
        for spooled_at, frame_bytes, key in held:
            if frames <= budget.frames and size <= budget.bytes:
                break
            frames -= 1
            size -= frame_bytes
            # Asked of the disk again: the ingestor may have started a capture of it since.
            try:
                respooled = (self.store.root / key).stat().st_mtime != spooled_at
            except FileNotFoundError:
                continue
            if respooled or self.is_announcing(key):
                continue
            self._delete_settled(key)
            given_up += 1
        return given_up

    def _delete_settled(self, key: str) -> None:
        # Frame first, markers second: a crash in between leaves an orphan marker, never an
        # unmarked frame that looks pending.
        self.store.delete(key)
        for suffix in MARKER_SUFFIXES:
            self.store.delete(key + suffix)

    def _drop_orphan_announce_marker(self, marker: str, now: float) -> None:
        path = self.store.root / marker
        try:
            written_at = path.stat().st_mtime
        except FileNotFoundError:
            return  # the ingestor announced it and let it go
        if now - written_at >= ORPHAN_ANNOUNCING_GRACE_S and not path.with_suffix("").exists():
            log.warning("spool: announce marker %s has no frame; dropped", path)
            self.store.delete(marker)
