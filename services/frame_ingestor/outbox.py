"""The frame-ingestor's outbox: each frame's FrameCaptured, kept on disk beside the spooled frame
until JetStream has stored it, so an ingestor killed in between (a deploy, a restart during a
NATS outage) announces the frame at its next start instead of leaving it unannounced for ever.

`<bin>/<xx>/<sha>.jpg.announcing` holds the event's JSON. It is written before the frame, so a
kill between the two leaves a marker without a frame (dropped at the next start), never a frame
without a marker; it is deleted once JetStream acks the event. While it is there the uploader
neither sweeps nor drops the frame (services/uploader/spool.py).

The marker is renamed into place whole but not fsynced: what it covers is a killed process,
whose files the kernel still writes out. After a power cut a marker written just before may be
gone (that frame then stays unannounced, as before the outbox) or empty. An empty or otherwise
unreadable marker beside an intact frame is rebuilt from the frame: its key and bytes give the
hash and size, its JPEG header the size in pixels, its file time (stamped when it was spooled)
the capture time; the source, sequence and ground truth the marker held are lost (`source`
says `recovered:` and the key, `sequence` is 0). The capture time is the one the actuator
judges staleness by, so a frame recovered after a power cut is classified and uploaded but
never actuated.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Callable
from datetime import UTC, datetime

from pydantic import ValidationError

from binloop.ml.preprocess import jpeg_size
from binloop.storage import SPOOL_ANNOUNCING_SUFFIX, LocalBlobStore
from binloop.storage.files import write_atomically
from schemas.events import FrameCaptured
from services.frame_ingestor.jpeg import spool_ref

log = logging.getLogger(__name__)

FRAME_GONE = "frame_gone"
UNREADABLE_MARKER = "unreadable_marker"
"""An unreadable marker whose frame is unreadable too (or not a JPEG): nothing to rebuild."""

RECOVERED_SOURCE_PREFIX = "recovered:"
_RECOVERED_NAMESPACE = uuid.UUID("9d2c4e1a-7b35-4f08-a6c1-2e5f8b0d4a17")


class Outbox:
    """The announce markers of one bin's frames in the spool. `on_drop(reason)` is called for
    each leftover marker given up: FRAME_GONE or UNREADABLE_MARKER."""

    def __init__(
        self,
        spool: LocalBlobStore,
        bin_id: str,
        on_drop: Callable[[str], None] | None = None,
        producer: str = "frame-ingestor",
    ) -> None:
        self.spool = spool
        self.bin_id = bin_id
        self.on_drop = on_drop
        self.producer = producer

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
        is gone is deleted with a warning; one that cannot be read as this bin's event for its
        frame is rebuilt from the frame (module docstring), or deleted when the frame cannot
        be read either."""
        events = []
        for key in self.spool.list(f"{self.bin_id}/"):
            if not key.endswith(SPOOL_ANNOUNCING_SUFFIX):
                continue
            frame_key = key.removesuffix(SPOOL_ANNOUNCING_SUFFIX)
            event: FrameCaptured | None
            try:
                held = FrameCaptured.model_validate_json((self.spool.root / key).read_bytes())
            except FileNotFoundError:
                continue  # the uploader's sweep took it as an old orphan since the listing
            except (OSError, ValidationError) as exc:
                event, unreadable = None, str(exc)
            else:
                ours = held.spool.key == frame_key and held.bin_id == self.bin_id
                event = held if ours else None
                unreadable = f"it describes {held.spool.key} of {held.bin_id}"
            if not self.spool.exists(frame_key):
                self._drop(key, FRAME_GONE, "the frame was never written or is gone")
            elif event is not None:
                events.append(event)
            elif (rebuilt := self._rebuilt(frame_key)) is not None:
                log.warning(
                    "frame-ingestor: announce marker %s unreadable (%s): rebuilt from its frame",
                    key,
                    unreadable[:200],
                )
                self.hold(rebuilt)  # a kill before its ack announces the same event again
                events.append(rebuilt)
            else:
                self._drop(key, UNREADABLE_MARKER, f"{unreadable[:200]}; the frame is unusable")
        return sorted(events, key=lambda event: event.captured_at)

    def _rebuilt(self, frame_key: str) -> FrameCaptured | None:
        """The event of the frame at `frame_key` as far as the frame itself tells it; None when
        it is not the intact JPEG its content-addressed key names."""
        path = self.spool.root / frame_key
        try:
            data = path.read_bytes()
            spooled_at = datetime.fromtimestamp(path.stat().st_mtime, UTC)
        except OSError:
            return None
        ref = spool_ref(self.spool, self.bin_id, data)
        size = jpeg_size(data)
        if ref.key != frame_key or size is None:
            return None
        width, height = size
        return FrameCaptured(
            event_id=uuid.uuid5(_RECOVERED_NAMESPACE, frame_key),
            producer=self.producer,
            bin_id=self.bin_id,
            frame_sha256=ref.sha256,
            spool=ref,
            captured_at=spooled_at,
            width=width,
            height=height,
            source=f"{RECOVERED_SOURCE_PREFIX}{frame_key}",
            sequence=0,
        )

    def _drop(self, key: str, reason: str, detail: str) -> None:
        log.warning("frame-ingestor: announce marker %s dropped (%s): %s", key, reason, detail)
        self.spool.delete(key)
        if self.on_drop is not None:
            self.on_drop(reason)
