"""Actuator drivers and the command -> outcome logic. No bus here."""

from __future__ import annotations

import asyncio
import hashlib
import time
from typing import Protocol

from schemas.events import ActuationCommand, ActuationDone
from schemas.taxonomy import Compartment


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


async def execute(
    driver: ActuatorDriver, command: ActuationCommand, producer: str
) -> ActuationDone:
    started = time.perf_counter()
    error: str | None = None
    try:
        await driver.actuate(command.compartment, command.frame_event_id)
    except ActuatorJamError as exc:
        error = str(exc)
    return ActuationDone(
        producer=producer,
        bin_id=command.bin_id,
        frame_sha256=command.frame_sha256,
        frame_event_id=command.frame_event_id,
        captured_at=command.captured_at,
        compartment=command.compartment,
        ok=error is None,
        error=error,
        actuation_ms=(time.perf_counter() - started) * 1000,
    )
