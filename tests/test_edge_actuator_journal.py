"""The actuator's journal of handled items: what a restart reads back, a damaged file (a record
cut short by a power cut, a flipped bit, garbage) skipped with a warning and never fatal, the
size bound, and the order of intent and outcome around the flap. No bus here."""

from __future__ import annotations

import errno
import logging
import os
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from schemas.events import ActuationCommand, ActuationDone
from schemas.taxonomy import Compartment
from services.actuator import journal as journal_module
from services.actuator.core import INTERRUPTED_ERROR, Actuator, SimulatedDriver, done_event_id
from services.actuator.journal import (
    COMPACT_FACTOR,
    Handled,
    HandledJournal,
    JournalError,
    JournalWriteError,
    decode,
    encode,
)

SEEN = datetime(2025, 3, 1, 12, 0, 0, tzinfo=UTC)
LOGGER = "services.actuator.journal"


def _done(frame: str, *, ok: bool = True, error: str | None = None) -> ActuationDone:
    return ActuationDone(
        event_id=done_event_id("bin-1", frame),
        occurred_at=SEEN + timedelta(seconds=1),
        producer="actuator",
        bin_id="bin-1",
        frame_sha256="ab" * 32,
        frame_event_id=frame,
        captured_at=SEEN,
        compartment=Compartment.GLASS,
        ok=ok,
        error=error,
        actuation_ms=0.0 if error else 5.0,
    )


def _command(frame: str | None = None) -> ActuationCommand:
    return ActuationCommand(
        producer="test",
        bin_id="bin-1",
        frame_sha256=uuid.uuid4().hex * 2,
        frame_event_id=frame or str(uuid.uuid4()),
        captured_at=SEEN,
        compartment=Compartment.GLASS,
        label="glass",
        confidence=0.9,
        abstained=False,
        model_version=1,
    )


def _journal(path: Path, remember: int = 16) -> HandledJournal:
    journal = HandledJournal(path, remember=remember)
    journal.open()
    return journal


def _lines(path: Path) -> list[bytes]:
    return path.read_bytes().splitlines()


# -- reading back -----------------------------------------------------------------------------


def test_a_reopened_journal_knows_the_last_state_of_each_frame(tmp_path: Path) -> None:
    path = tmp_path / "handled.journal"
    journal = _journal(path)
    journal.append(Handled("moving", _done("a", ok=False, error=INTERRUPTED_ERROR)))
    journal.append(Handled("done", _done("a")))
    journal.append(Handled("moving", _done("b", ok=False, error=INTERRUPTED_ERROR)))
    journal.close()

    again = _journal(path)
    assert again.get("a") == Handled("done", _done("a"))
    assert again.get("b") == Handled("moving", _done("b", ok=False, error=INTERRUPTED_ERROR))
    assert again.get("c") is None
    # Opening compacts: one record per frame.
    assert [decode(line).done.frame_event_id for line in _lines(path)] == ["a", "b"]


def test_a_record_is_one_checksummed_line() -> None:
    line = encode(Handled("done", _done("a")))
    assert line.endswith(b"\n")
    assert line.count(b"\n") == 1
    assert decode(line[:-1]) == Handled("done", _done("a"))
    flipped = line[:-1].replace(b'"ok":true', b'"ok":fals')
    with pytest.raises(ValueError, match="checksum mismatch"):
        decode(flipped)
    with pytest.raises(ValueError, match="no checksum"):
        decode(b"{}")


# -- damage -------------------------------------------------------------------------------------


def test_a_record_cut_short_is_skipped_with_a_warning_and_appends_go_on_cleanly(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "handled.journal"
    journal = _journal(path)
    journal.append(Handled("done", _done("a")))
    journal.close()
    # The power went while the next record was being written: half of it reached the disk.
    with path.open("ab") as handle:
        handle.write(encode(Handled("done", _done("b")))[:57])

    with caplog.at_level(logging.WARNING, logger=LOGGER):
        again = _journal(path)
    assert again.get("a") == Handled("done", _done("a"))
    assert again.get("b") is None
    [warning] = [r.getMessage() for r in caplog.records if r.name == LOGGER]
    assert "skipped 1 unreadable records" in warning
    assert "line 2: cut short (57 bytes, no newline)" in warning
    assert str(path) in warning

    # The next record starts on a line of its own, not glued to the broken one.
    again.append(Handled("done", _done("c")))
    again.close()
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        third = _journal(path)
    assert caplog.records == []
    assert [third.get(f) is not None for f in "abc"] == [True, False, True]


def test_damaged_records_anywhere_are_skipped_and_the_rest_kept(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "handled.journal"
    good = [encode(Handled("done", _done(f"f{i}"))) for i in range(4)]
    flipped = good[1].replace(b'"ok":true', b'"ok":fals')
    path.write_bytes(
        good[0]
        + flipped
        + b"\x00\xff\xfe not a record at all\n"
        + b"\n"  # an empty line is no record, and no harm
        + good[2]
        + b"0badc0de {}\n"
        + good[3]
        + b"\x00" * 300  # a tail of zeroes, as some file systems leave after a crash
    )
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        journal = _journal(path)

    assert [journal.get(f"f{i}") is not None for i in range(4)] == [True, False, True, True]
    [warning] = [r.getMessage() for r in caplog.records if r.name == LOGGER]
    assert "skipped 4 unreadable records" in warning
    assert "line 2: checksum mismatch" in warning
    assert "line 3: no checksum" in warning
    assert "line 6: checksum mismatch" in warning
    assert "cut short (300 bytes" in warning
    assert [decode(line).done.frame_event_id for line in _lines(path)] == ["f0", "f2", "f3"]


def test_a_journal_that_is_all_garbage_starts_empty(tmp_path: Path) -> None:
    path = tmp_path / "handled.journal"
    path.write_bytes(os.urandom(4096))
    journal = _journal(path)
    assert len(journal) == 0
    assert path.read_bytes() == b""


def test_a_journal_that_cannot_be_read_at_all_stops_the_start(tmp_path: Path) -> None:
    path = tmp_path / "handled.journal"
    path.mkdir()  # as unreadable as a disk that answers EIO
    with pytest.raises(JournalError, match="cannot be read"):
        HandledJournal(path, remember=4).open()


# -- bounds -----------------------------------------------------------------------------------


def test_memory_and_file_stay_bounded_and_keep_the_newest(tmp_path: Path) -> None:
    path = tmp_path / "handled.journal"
    remember = 5
    journal = _journal(path, remember)
    for i in range(100):
        journal.append(Handled("moving", _done(f"f{i}", ok=False, error=INTERRUPTED_ERROR)))
        journal.append(Handled("done", _done(f"f{i}")))
        assert len(_lines(path)) <= COMPACT_FACTOR * remember + 1
        assert len(journal) <= remember
    journal.close()

    again = _journal(path, remember)
    assert [again.get(f"f{i}") is not None for i in range(94, 100)] == [False] + [True] * 5
    assert len(_lines(path)) == remember


def test_a_record_the_disk_refuses_is_not_remembered_and_the_next_one_goes_through(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "handled.journal"
    journal = _journal(path)
    journal.append(Handled("done", _done("a")))
    real_write = os.write

    def disk_full(fd: int, data: bytes) -> int:
        real_write(fd, data[:10])  # part of it lands, then the disk is full
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "write", disk_full)
    with pytest.raises(JournalWriteError, match="record of frame b not written"):
        journal.append(Handled("done", _done("b")))
    assert journal.get("b") is None
    monkeypatch.setattr(os, "write", real_write)

    journal.append(Handled("done", _done("c")))  # starts on a clean file again
    journal.close()
    assert [decode(line).done.frame_event_id for line in _lines(path)] == ["a", "c"]


# -- intent before the flap, outcome after -------------------------------------------------


class SnapshottingDriver:
    """Copies the journal at the moment the flap moves: what a crash right then leaves."""

    def __init__(self, journal: Path, snapshot: Path) -> None:
        self.journal = journal
        self.snapshot = snapshot
        self.moves: list[str] = []

    async def actuate(self, compartment: Compartment, item_key: str) -> None:
        self.moves.append(item_key)
        self.snapshot.write_bytes(self.journal.read_bytes())


async def test_the_intent_is_on_disk_before_the_flap_moves(tmp_path: Path) -> None:
    path = tmp_path / "handled.journal"
    crashed = tmp_path / "crashed.journal"
    driver = SnapshottingDriver(path, crashed)
    clock = lambda: SEEN + timedelta(seconds=1)  # noqa: E731
    command = _command()
    first = Actuator(driver, "actuator", max_command_age_s=600, journal_path=path, clock=clock)
    assert (await first.handle(command)).kind == "actuated"
    assert [decode(line).state for line in _lines(crashed)] == ["moving"]
    assert [decode(line).state for line in _lines(path)] == ["moving", "done"]

    # The process died while the flap moved: the next one answers without moving it.
    again = SnapshottingDriver(crashed, tmp_path / "unused")
    after_crash = Actuator(
        again, "actuator", max_command_age_s=600, journal_path=crashed, clock=clock
    )
    outcome = await after_crash.handle(command)
    assert outcome.kind == "interrupted"
    assert not outcome.done.ok
    assert outcome.done.error == INTERRUPTED_ERROR
    assert outcome.done.event_id == done_event_id("bin-1", command.frame_event_id)
    assert (await after_crash.handle(command)).kind == "repeated"
    assert again.moves == []

    # A clean restart answers as the first run did.
    restarted = Actuator(
        SimulatedDriver(0), "actuator", max_command_age_s=600, journal_path=path, clock=clock
    )
    repeat = await restarted.handle(command)
    assert repeat.kind == "repeated"
    assert repeat.done.ok
    assert driver.moves == [command.frame_event_id]


async def test_a_disk_that_refuses_the_journal_does_not_stop_the_bin(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A full or failing disk costs the memory across a restart, not the sorting: the flap
    moves, the item is remembered in memory (a repeat is still answered as before), and the
    failure is counted for an alert."""
    path = tmp_path / "handled.journal"
    driver = SnapshottingDriver(path, tmp_path / "snapshot")
    failures: list[None] = []
    actuator = Actuator(
        driver,
        "actuator",
        max_command_age_s=600,
        journal_path=path,
        clock=lambda: SEEN + timedelta(seconds=1),
        on_journal_failure=lambda: failures.append(None),
    )
    await actuator.open()

    def disk_full(fd: int, data: bytes) -> int:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "write", disk_full)
    command = _command()
    outcome = await actuator.handle(command)
    assert (outcome.kind, outcome.done.ok) == ("actuated", True)
    assert driver.moves == [command.frame_event_id]
    assert len(failures) == 2  # the intent and the answer
    assert (await actuator.handle(command)).kind == "repeated"
    assert driver.moves == [command.frame_event_id]


async def test_a_journal_that_cannot_be_read_leaves_the_actuator_with_memory_only(
    tmp_path: Path,
) -> None:
    path = tmp_path / "handled.journal"
    path.mkdir()  # as unreadable as a disk that answers EIO
    driver = SimulatedDriver(actuation_ms=0)
    failures: list[None] = []
    actuator = Actuator(
        driver,
        "actuator",
        max_command_age_s=600,
        journal_path=path,
        clock=lambda: SEEN + timedelta(seconds=1),
        on_journal_failure=lambda: failures.append(None),
    )
    await actuator.open()
    assert failures == [None]
    assert not actuator.journal.durable
    assert (await actuator.handle(_command())).kind == "actuated"


async def test_a_journal_read_at_start_on_a_full_disk_is_kept_and_rewritten_later(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Killed while a flap moved (a `moving` record on disk) and back on a disk that is full:
    the journal reads, only its rewrite at open fails. What was read still answers the
    redelivered commands (interrupted, repeated: no flap moves again), and once the disk takes
    writes again the next record rewrites the file first."""
    path = tmp_path / "handled.journal"
    moving, handled = _command(), _command()
    journal = _journal(path)
    journal.append(Handled("moving", _done(moving.frame_event_id, ok=False, error="x")))
    journal.append(Handled("done", _done(handled.frame_event_id)))
    journal.close()

    def disk_full(path: Path, data: bytes) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(journal_module, "write_atomically", disk_full)
    driver = SnapshottingDriver(path, tmp_path / "snapshot")
    failures: list[None] = []
    actuator = Actuator(
        driver,
        "actuator",
        max_command_age_s=600,
        journal_path=path,
        clock=lambda: SEEN + timedelta(seconds=1),
        on_journal_failure=lambda: failures.append(None),
    )
    await actuator.open()
    assert actuator.journal.durable
    assert len(failures) == 1
    outcomes = [(await actuator.handle(c)).kind for c in (moving, handled)]
    assert outcomes == ["interrupted", "repeated"]
    assert driver.moves == []

    monkeypatch.undo()  # the disk has room again
    fresh = _command()
    assert (await actuator.handle(fresh)).kind == "actuated"
    actuator.close()
    reopened = _journal(path)
    assert [reopened.get(c.frame_event_id) is not None for c in (moving, handled, fresh)] == [
        True,
        True,
        True,
    ]
    assert len(_lines(path)) == 3


async def test_the_journal_is_never_rewritten_while_an_item_waits_for_its_flap(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The rewrite (compaction: every remembered record, a file fsync, a rename, a folder fsync;
    ~1.8 MB at the default remember=4096) is triggered by whichever append crosses
    COMPACT_FACTOR * remember records. Every other append is a `moving` intent, so every other
    compaction runs after the intent and before the flap moves, on the one path where the item
    is falling. remember=2 here, so the 5th record (the 3rd item's intent) triggers it."""
    compacted_after: list[str] = []
    real_compact = HandledJournal._compact

    def compact(self: HandledJournal) -> None:
        newest = next(reversed(self._entries.values()), None)
        compacted_after.append("nothing" if newest is None else newest.state)
        real_compact(self)

    monkeypatch.setattr(HandledJournal, "_compact", compact)

    class Flap:
        async def actuate(self, compartment: object, item_key: str) -> None:
            pass

    actuator = Actuator(
        Flap(),  # type: ignore[arg-type]
        "actuator",
        max_command_age_s=600,
        remember=2,
        journal_path=tmp_path / "handled.journal",
        clock=lambda: SEEN + timedelta(seconds=1),
    )
    await actuator.open()
    for _ in range(6):
        assert (await actuator.handle(_command())).kind == "actuated"
    assert "moving" not in compacted_after, compacted_after
