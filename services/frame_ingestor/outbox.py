"""The frame-ingestor's outbox: each frame's FrameCaptured, kept on disk beside the spooled frame
until JetStream has stored it, so an ingestor killed in between (a deploy, a restart during a
NATS outage) announces the frame at its next start instead of leaving it unannounced for ever.

`<bin>/<xx>/<sha>.jpg.announcing` holds the event's JSON. It is written before the frame, so a
kill between the two leaves a marker without a frame (dropped at the next start), never a frame
without a marker; it is deleted once JetStream acks the event. While it is there the uploader
neither sweeps nor drops the frame (services/uploader/spool.py).

The marker is renamed into place whole but not fsynced: what it covers is a killed process,
whose files the kernel still writes out. After a power cut a marker written just before may be
gone (that frame then stays unannounced, as before the outbox) or empty (dropped as unreadable).
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from pydantic import ValidationError

from binloop.storage import SPOOL_ANNOUNCING_SUFFIX, LocalBlobStore
from binloop.storage.files import write_atomically
from schemas.events import FrameCaptured

log = logging.getLogger(__name__)

FRAME_GONE = "frame_gone"
UNREADABLE_MARKER = "unreadable_marker"


class Outbox:
    """The announce markers of one bin's frames in the spool. `on_drop(reason)` is called for
    each leftover marker given up: FRAME_GONE or UNREADABLE_MARKER."""

    def __init__(
        self,
        spool: LocalBlobStore,
        bin_id: str,
        on_drop: Callable[[str], None] | None = None,
    ) -> None:
        self.spool = spool
        self.bin_id = bin_id
        self.on_drop = on_drop

    def hold(self, event: FrameCaptured) -> None:
        """Keep the event until `release`: call before the frame is written to the spool."""
        data = event.model_dump_json().encode()
        write_atomically(
            self.spool.root / (event.spool.key + SPOOL_ANNOUNCING_SUFFIX), data, durable=False
        )

    def release(self, event: FrameCaptured) -> None:
        """JetStream stored the event: nothing is left to announce for it."""
        self.spool.delete(event.spool.key + SPOOL_ANNOUNCING_SUFFIX)

    def leftovers(self) -> list[FrameCaptured]:
        """The events a killed ingestor did not see acked, in capture order. A marker whose frame
        is gone, or which cannot be read as this bin's event for its frame, is deleted with a
        warning."""
        events = []
        for key in self.spool.list(f"{self.bin_id}/"):
            if not key.endswith(SPOOL_ANNOUNCING_SUFFIX):
                continue
            frame_key = key.removesuffix(SPOOL_ANNOUNCING_SUFFIX)
            try:
                event = FrameCaptured.model_validate_json((self.spool.root / key).read_bytes())
            except FileNotFoundError:
                continue  # the uploader's sweep took it as an old orphan since the listing
            except (OSError, ValidationError) as exc:
                self._drop(key, UNREADABLE_MARKER, str(exc))
                continue
            if event.spool.key != frame_key or event.bin_id != self.bin_id:
                self._drop(key, UNREADABLE_MARKER, f"it describes {event.spool.key}")
            elif not self.spool.exists(frame_key):
                self._drop(key, FRAME_GONE, "the frame was never written or is gone")
            else:
                events.append(event)
        return sorted(events, key=lambda event: event.captured_at)

    def _drop(self, key: str, reason: str, detail: str) -> None:
        log.warning("frame-ingestor: announce marker %s dropped (%s): %s", key, reason, detail)
        self.spool.delete(key)
        if self.on_drop is not None:
            self.on_drop(reason)
