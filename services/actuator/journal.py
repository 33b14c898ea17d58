"""The actuator's memory of the items it handled, kept in a small append-only journal on the
bin's disk so that a command that comes again after a restart does not move a flap twice.
No bus here.

One line per record, `<crc32 of the payload, 8 hex digits> <payload>\\n`, the payload a JSON
object `{"v": 1, "state": "moving" | "done", "done": <ActuationDone>}`:
- `moving` is appended and fsynced *before* the flap moves. Its `done` is the answer to give
  if nothing follows it: ok=false, "interrupted", because the flap may or may not have moved.
- `done` is appended and fsynced right after, with the real outcome (or for a stale command,
  the refusal; the flap did not move).

The last record of a frame wins. A crash between the two records leaves `moving`: a command
that comes again is answered "interrupted" and the flap stays put. At most once, which is
right for a physical flap: a second drop into the compartment the first one chose is worse
than an item left to the bin's default path.

Bounded: the newest `remember` frames are kept in memory, and the file is rewritten with just
those (temporary file, fsync, rename, fsync of the folder) when it is opened and whenever it
holds more than twice as many records. A record that cannot be read back (a write cut short by
a power cut, a flipped bit) is skipped with a warning, never fatal: at worst that one frame is
forgotten. A journal file that cannot be read at all (EIO, a folder in its place) raises
JournalError. One that reads but cannot be rewritten (a full or read-only disk) keeps what it
read and raises JournalWriteError; the rewrite is tried again before the next append.
"""

from __future__ import annotations

import json
import logging
import os
import zlib
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from pydantic import ValidationError

from binloop.errors import BinloopError, TransientError
from binloop.storage.files import write_atomically
from schemas.events import ActuationDone

log = logging.getLogger(__name__)

JOURNAL_VERSION = 1
COMPACT_FACTOR = 2
"""The file is rewritten once it holds more than this many records per remembered frame."""
_SHOWN_BAD_LINES = 5

HandledState = Literal["moving", "done"]


class JournalError(BinloopError):
    """The journal file exists but cannot be read or rewritten (the bin's disk failed)."""


class JournalWriteError(JournalError, TransientError):
    """A record could not be appended (the Actuator then goes on with memory only)."""


@dataclass(frozen=True)
class Handled:
    """What the actuator knows of one frame: `moving` (it set out to move the flap and heard
    nothing since; `done` is the interrupted answer) or `done` (the answer given)."""

    state: HandledState
    done: ActuationDone


def encode(entry: Handled) -> bytes:
    payload = (
        f'{{"v":{JOURNAL_VERSION},"state":"{entry.state}","done":{entry.done.model_dump_json()}}}'
    ).encode()
    return b"%08x %s\n" % (zlib.crc32(payload), payload)


def decode(line: bytes) -> Handled:
    """One record, without its newline. Raises ValueError saying what is wrong with it."""
    crc_hex, space, payload = line.partition(b" ")
    if not space or len(crc_hex) != 8:
        raise ValueError("no checksum")
    try:
        crc = int(crc_hex, 16)
    except ValueError:
        raise ValueError("no checksum") from None
    if zlib.crc32(payload) != crc:
        raise ValueError("checksum mismatch")
    try:
        record = json.loads(payload)
    except ValueError as exc:
        raise ValueError(f"not JSON ({exc})") from None
    if not isinstance(record, dict) or record.get("v") != JOURNAL_VERSION:
        raise ValueError("unknown record version")
    state = record.get("state")
    if state not in ("moving", "done"):
        raise ValueError(f"unknown state {state!r}")
    try:
        done = ActuationDone.model_validate(record.get("done"))
    except ValidationError as exc:
        raise ValueError(f"not an ActuationDone ({exc.error_count()} errors)") from None
    return Handled(state, done)


def read_records(data: bytes, path: Path) -> list[Handled]:
    """Every readable record of a journal's bytes, in order; the others are skipped with one
    warning that says which lines and why."""
    lines = data.split(b"\n")
    partial = lines.pop()  # after the last newline: empty unless a write was cut short
    records: list[Handled] = []
    bad: list[str] = []
    for number, line in enumerate(lines, start=1):
        if not line:
            continue
        try:
            records.append(decode(line))
        except ValueError as exc:
            bad.append(f"line {number}: {exc}")
    if partial:
        bad.append(f"line {len(lines) + 1}: cut short ({len(partial)} bytes, no newline)")
    if bad:
        shown = "; ".join(bad[:_SHOWN_BAD_LINES])
        more = f"; and {len(bad) - _SHOWN_BAD_LINES} more" if len(bad) > _SHOWN_BAD_LINES else ""
        log.warning(
            "actuator journal %s: skipped %d unreadable records (%s%s); %d read. Their "
            "frames are forgotten: a command for one of them that comes again is judged by "
            "its age alone",
            path,
            len(bad),
            shown,
            more,
            len(records),
        )
    return records


class HandledJournal:
    """The newest `remember` frames' outcomes, in memory and, with a `path`, on disk.

    Not thread-safe on its own: the Actuator calls it one command at a time."""

    def __init__(self, path: Path | None, *, remember: int) -> None:
        if remember < 1:
            raise ValueError(f"remember must be >= 1, got {remember}")
        self.path = path
        self.remember = remember
        self._entries: OrderedDict[str, Handled] = OrderedDict()
        self._loaded = path is None
        self._fd: int | None = None
        self._records_in_file = 0

    @property
    def durable(self) -> bool:
        return self.path is not None

    @property
    def loaded(self) -> bool:
        return self._loaded

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, frame_event_id: str) -> Handled | None:
        return self._entries.get(frame_event_id)

    def open(self) -> None:
        """Load the journal (skipping what cannot be read) and rewrite it compacted, so
        appends start on a clean line. Idempotent; a no-op in memory. Raises JournalError
        when the file is there but cannot be read. When only the rewrite fails (a full or
        read-only disk) it raises JournalWriteError with what was read kept: the journal is
        loaded, and the next append tries the rewrite again before it writes."""
        if self._loaded:
            return
        assert self.path is not None
        try:
            data = self.path.read_bytes()
        except FileNotFoundError:
            self._loaded = True  # created by the first append
            return
        except OSError as exc:
            raise JournalError(f"actuator journal {self.path} cannot be read: {exc}") from exc
        self._entries.clear()
        for entry in read_records(data, self.path):
            self.remember_only(entry)
        # Loaded before the rewrite: forgetting what was read would move a flap again for a
        # command that comes back, the one harm the journal is there to prevent.
        self._loaded = True
        self._compact()

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def append(self, entry: Handled) -> None:
        """Write the record and fsync it, then remember it. Raises JournalWriteError, with
        nothing remembered, when the disk does not take it."""
        if self.path is not None:
            self._ready_to_append()
            assert self._fd is not None
            line = encode(entry)
            try:
                written = os.write(self._fd, line)
                if written != len(line):
                    raise OSError(f"short write, {written} of {len(line)} bytes")
                _sync_data(self._fd)
            except OSError as exc:
                # What reached the file is a partial record at most: the next append rewrites
                # the file from memory first, so it never starts on a broken line.
                self.close()
                raise JournalWriteError(
                    f"actuator journal {self.path}: record of frame {entry.done.frame_event_id} "
                    f"not written: {exc}"
                ) from exc
            self._records_in_file += 1
        self.remember_only(entry)
        # Never between an intent and its flap (a rewrite of the whole file takes tens of
        # ms, longer on eMMC, while the item falls): after an answer only.
        if (
            self.path is not None
            and entry.state != "moving"
            and self._records_in_file > COMPACT_FACTOR * self.remember
        ):
            try:
                self._compact()
            except JournalWriteError as exc:  # the record is safe; the next append retries
                log.warning("%s", exc)

    def remember_only(self, entry: Handled) -> None:
        """Memory only: what a record that could not be written still tells this process."""
        frame = entry.done.frame_event_id
        self._entries[frame] = entry
        self._entries.move_to_end(frame)
        while len(self._entries) > self.remember:
            self._entries.popitem(last=False)

    def _ready_to_append(self) -> None:
        if not self._loaded:
            self.open()
        elif self._fd is None:  # none yet, closed by a failed append, or by a stop
            self._compact()

    def _compact(self) -> None:
        """Rewrite the file with what is remembered, one record per frame, atomically."""
        assert self.path is not None
        self.close()
        data = b"".join(encode(entry) for entry in self._entries.values())
        try:
            write_atomically(self.path, data)
            # O_APPEND: every record lands at the end, whatever was written there before.
            self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND)
        except OSError as exc:
            raise JournalWriteError(
                f"actuator journal {self.path} cannot be rewritten: {exc}"
            ) from exc
        self._records_in_file = len(self._entries)


# fdatasync where there is one (Linux): the record's bytes and the file's size, not its times.
_sync_data = getattr(os, "fdatasync", os.fsync)
