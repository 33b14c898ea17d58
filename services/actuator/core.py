"""Actuator drivers and the command -> outcome logic. No bus here."""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Literal, Protocol

from schemas.base import utc_now
from schemas.events import ActuationCommand, ActuationDone
from schemas.taxonomy import Compartment
from services.actuator.journal import Handled, HandledJournal, JournalError, JournalWriteError

log = logging.getLogger(__name__)


class ActuatorJamError(Exception):
    """The flap did not move: a physical failure, reported in actuation.done, not retried."""


class ActuatorDriver(Protocol):
    async def actuate(self, compartment: Compartment, item_key: str) -> None:
        """Move the item into `compartment`; raise ActuatorJamError when it cannot."""
        ...


class SimulatedDriver:
    """Takes `actuation_ms` per item and jams for a deterministic fraction of items."""

    def __init__(self, actuation_ms: float = 5.0, jam_rate: float = 0.0, seed: int = 0) -> None:
        self.actuation_s = actuation_ms / 1000
        self.jam_rate = jam_rate
        self.seed = seed

    def _jams(self, item_key: str) -> bool:
        digest = hashlib.sha256(f"{self.seed}:{item_key}".encode()).digest()
        return int.from_bytes(digest[:4], "big") / 0xFFFFFFFF < self.jam_rate

    async def actuate(self, compartment: Compartment, item_key: str) -> None:
        await asyncio.sleep(self.actuation_s)
        if self._jams(item_key):
            raise ActuatorJamError(f"flap for {compartment.value} jammed")


_DONE_NAMESPACE = uuid.UUID("5d0c6f0e-8a51-4f1e-9b7a-2c4e8f3a61d9")

DEFAULT_REMEMBERED = 4096
"""Frames whose outcome the actuator remembers, across restarts with a journal. It has to
cover every command that can come again: those the consumer had handed out and not seen acked
when the actuator stopped, a few at most at a bin's pace of an item a second or slower."""

INTERRUPTED_ERROR = (
    "interrupted: the actuator stopped (or its driver failed) after it set out to move the "
    "flap; not moved again, at most once per item"
)


def done_event_id(bin_id: str, frame_event_id: str) -> uuid.UUID:
    """One id per frame's actuation: every answer about the same item, however it was asked
    for, is one message to JetStream's duplicate check."""
    return uuid.uuid5(_DONE_NAMESPACE, f"{bin_id}/{frame_event_id}")


def _done(
    command: ActuationCommand, producer: str, error: str | None, actuation_ms: float
) -> ActuationDone:
    return ActuationDone(
        event_id=done_event_id(command.bin_id, command.frame_event_id),
        producer=producer,
        bin_id=command.bin_id,
        frame_sha256=command.frame_sha256,
        frame_event_id=command.frame_event_id,
        captured_at=command.captured_at,
        compartment=command.compartment,
        ok=error is None,
        error=error,
        actuation_ms=actuation_ms,
    )


async def execute(
    driver: ActuatorDriver, command: ActuationCommand, producer: str
) -> ActuationDone:
    """Moves the flap once, whatever came before: `Actuator.handle` decides whether to."""
    started = time.perf_counter()
    error: str | None = None
    try:
        await driver.actuate(command.compartment, command.frame_event_id)
    except ActuatorJamError as exc:
        error = str(exc)
    return _done(command, producer, error, (time.perf_counter() - started) * 1000)


OutcomeKind = Literal["actuated", "repeated", "stale", "interrupted"]


@dataclass(frozen=True)
class Outcome:
    """What became of one command. `actuated`: the flap was driven (`done.ok` says whether it
    moved); `repeated`: the item was handled before, `done` is the answer given then and the
    flap did not move again; `stale`: refused, the item was seen too long ago; `interrupted`:
    an earlier attempt set out to move the flap and never said how it went (the process
    stopped, or the driver raised), so the flap is not moved again and `done` says so."""

    kind: OutcomeKind
    done: ActuationDone


class Actuator:
    """Runs each item's command at most once, and only while the item can still be there.

    A command comes again when publishing its answer failed after the flap moved (the consumer
    retries it) or when the process stopped before the ack; a bin must not drop a second item
    into the compartment the first one chose. So the outcome of the last `remember` frames is
    kept, and a repeated command gets the same `ActuationDone` back without moving the flap.
    With a `journal_path` that memory is on disk (see journal.py) and survives a restart: the
    intent is fsynced before the flap moves and the outcome right after, so a crash between
    the two answers the command, when it comes again, as interrupted instead of moving twice.

    A disk that refuses the journal (full, read-only, failing) does not stop the bin: the
    actuator goes on with its memory alone, and `on_journal_failure` is called (a metric and
    an alert). Only a crash during that time, with a command redelivered while its item is
    still fresh (`max_command_age_s` above the consumer's ack wait), could move a flap twice;
    refusing to sort every item until the disk is fixed would cost far more.
    """

    def __init__(
        self,
        driver: ActuatorDriver,
        producer: str,
        *,
        max_command_age_s: float,
        remember: int = DEFAULT_REMEMBERED,
        journal_path: Path | None = None,
        clock: Callable[[], datetime] = utc_now,
        on_journal_failure: Callable[[], None] = lambda: None,
    ) -> None:
        if max_command_age_s <= 0:
            raise ValueError(f"max_command_age_s must be > 0, got {max_command_age_s}")
        self.driver = driver
        self.producer = producer
        self.max_command_age_s = max_command_age_s
        self.journal = HandledJournal(journal_path, remember=remember)
        self.clock = clock
        self.on_journal_failure = on_journal_failure
        self._one_at_a_time = asyncio.Lock()

    async def open(self) -> None:
        """Load the journal now (else the first command does): a damaged one is reported at
        start-up. One that was read but cannot be rewritten (a full or read-only disk) is kept:
        its items are still answered, and the next record tries the disk again. Only one that
        cannot be read at all leaves the actuator with memory only."""
        try:
            await asyncio.to_thread(self.journal.open)
        except JournalWriteError as exc:
            log.warning(
                "actuator: %s; the %d items it holds are remembered, the disk is tried again "
                "at the next record",
                exc,
                len(self.journal),
            )
            self.on_journal_failure()
        except JournalError as exc:
            log.error("actuator: %s; going on without it, with memory only", exc)
            self.on_journal_failure()
            self.journal = HandledJournal(None, remember=self.journal.remember)

    def close(self) -> None:
        self.journal.close()

    def command_age_s(self, command: ActuationCommand) -> float:
        # captured_at, not the command's occurred_at: the camera's timestamp says when the
        # item was on the flap, and that is what goes stale. occurred_at says when the
        # inferencer got to it, which after an inferencer backlog is recent for items long
        # gone. Both clocks are the bin's own (frame-ingestor and actuator run on the bin),
        # so no skew between machines enters the age.
        return (self.clock() - command.captured_at).total_seconds()

    async def handle(self, command: ActuationCommand) -> Outcome:
        # One at a time: a repeated command must find its first attempt's record.
        async with self._one_at_a_time:
            return await self._handle(command)

    async def _handle(self, command: ActuationCommand) -> Outcome:
        if not self.journal.loaded:
            await self.open()
        known = self.journal.get(command.frame_event_id)
        if known is not None:
            if known.state == "done":
                return Outcome("repeated", known.done)
            await self._settle(known.done)  # later repeats are plain "repeated"
            return Outcome("interrupted", known.done)
        age_s = self.command_age_s(command)
        if age_s > self.max_command_age_s:
            error = (
                f"stale: item captured {age_s:.1f} s before the actuator got its command "
                f"(limit {self.max_command_age_s:g} s); flap not moved"
            )
            outcome = Outcome("stale", _done(command, self.producer, error, 0.0))
        else:
            # On disk before the flap moves (with memory only if the disk refuses it).
            intent = Handled("moving", _done(command, self.producer, INTERRUPTED_ERROR, 0.0))
            try:
                await self._append(intent)
            except JournalWriteError as exc:
                log.warning("actuator: %s; moving the flap with memory only", exc)
                self.on_journal_failure()
                self.journal.remember_only(intent)
            outcome = Outcome("actuated", await execute(self.driver, command, self.producer))
        await self._settle(outcome.done)
        return outcome

    async def _settle(self, done: ActuationDone) -> None:
        """Record the answer. If the disk does not take it, this process still remembers it,
        and after a restart the intent written before the flap moved answers "interrupted":
        still at most once."""
        entry = Handled("done", done)
        try:
            await self._append(entry)
        except JournalWriteError as exc:
            log.warning("actuator: %s; remembered in memory only", exc)
            self.on_journal_failure()
            self.journal.remember_only(entry)

    async def _append(self, entry: Handled) -> None:
        if self.journal.durable:  # an fsync: off the event loop
            await asyncio.to_thread(self.journal.append, entry)
        else:
            self.journal.append(entry)
