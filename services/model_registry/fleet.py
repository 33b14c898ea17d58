"""The fleet view: which model version each bin serves, from the bins' heartbeats."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime, timedelta

from schemas.events import FleetHeartbeat


@dataclass
class FleetView:
    """Latest heartbeat per (bin, service); bins silent for longer than `stale_after` drop out."""

    stale_after: timedelta = timedelta(minutes=5)
    latest: dict[tuple[str, str], FleetHeartbeat] = field(default_factory=dict)

    def observe(self, beats: list[FleetHeartbeat]) -> None:
        for beat in beats:
            key = (beat.bin_id, beat.service)
            known = self.latest.get(key)
            if known is None or beat.occurred_at >= known.occurred_at:
                self.latest[key] = beat

    def spool_backlog(self, now: datetime) -> dict[str, int]:
        """bin -> frames its uploader has still to store, for bins whose uploader is live."""
        return {
            beat.bin_id: beat.spool_backlog
            for (_, service), beat in self.latest.items()
            if service == "uploader" and now - beat.occurred_at <= self.stale_after
        }

    def serving(self, now: datetime) -> Counter[tuple[str, int]]:
        """(model, version) -> number of live bins serving it."""
        counts: Counter[tuple[str, int]] = Counter()
        for beat in self.latest.values():
            if now - beat.occurred_at > self.stale_after:
                continue
            if beat.model_name is not None and beat.model_version is not None:
                counts[(beat.model_name, beat.model_version)] += 1
        return counts
