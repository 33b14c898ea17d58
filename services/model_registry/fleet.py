"""The fleet view: which model version each bin serves, from the bins' heartbeats."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime, timedelta

from schemas.events import FleetHeartbeat


@dataclass(frozen=True)
class ReceivedBeat:
    beat: FleetHeartbeat
    received_at: datetime
    """The registry's clock when the beat arrived: a bin's own clock (`occurred_at`) may be
    minutes or days off until NTP sets it, so it decides neither liveness nor order."""


@dataclass
class FleetView:
    """Latest heartbeat per (bin, service), by arrival: the stream keeps each bin's beats in
    the order it sent them. Bins whose last beat arrived longer than `stale_after` ago drop
    out."""

    stale_after: timedelta = timedelta(minutes=5)
    latest: dict[tuple[str, str], ReceivedBeat] = field(default_factory=dict)

    def observe(self, beats: list[FleetHeartbeat], received_at: datetime) -> None:
        """Beats in the order they arrived, at `received_at` by the registry's clock."""
        for beat in beats:
            self.latest[(beat.bin_id, beat.service)] = ReceivedBeat(beat, received_at)

    def _live(self, now: datetime) -> list[FleetHeartbeat]:
        return [
            seen.beat for seen in self.latest.values() if now - seen.received_at <= self.stale_after
        ]

    def spool_backlog(self, now: datetime) -> dict[str, int]:
        """bin -> frames its uploader has still to store, for bins whose uploader is live."""
        return {
            beat.bin_id: beat.spool_backlog
            for beat in self._live(now)
            if beat.service == "uploader"
        }

    def serving(self, now: datetime) -> Counter[tuple[str, int]]:
        """(model, version) -> number of live bins serving it."""
        counts: Counter[tuple[str, int]] = Counter()
        for beat in self._live(now):
            if beat.model_name is not None and beat.model_version is not None:
                counts[(beat.model_name, beat.model_version)] += 1
        return counts
