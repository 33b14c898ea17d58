"""What the edge-inferencer still has to read from the shared spool, asked of JetStream.

The frame-ingestor writes each frame into the spool, then announces it; the uploader and the
edge-inferencer both read it from there. The uploader's sweep deletes uploaded frames after a
retention; an inferencer that lags further behind (restarted, waiting for a model) would find
them gone. Its durable consumer knows how far it got: the first frame after its ack floor is
the oldest it has not finished, and the sweep keeps everything spooled since.
"""

from __future__ import annotations

import logging

from nats.errors import Error as NatsError
from nats.js.client import JetStreamContext
from nats.js.errors import NotFoundError
from pydantic import ValidationError

from binloop.bus.consumers import edge_inferencer_durable
from schemas.base import read_json
from schemas.events import FrameCaptured
from schemas.routes import FRAMES_CAPTURED

log = logging.getLogger(__name__)

SPOOL_TO_EVENT_SLACK_S = 5.0
"""A frame is spooled just before its event is stamped (`captured_at`); the margin covers that
gap, so the oldest unread frame itself is kept."""

KEEP_EVERYTHING = 0.0
"""A spool time no frame is older than."""


async def unread_since(js: JetStreamContext, bin_id: str) -> float | None:
    """The spool time (epoch seconds) from which the edge-inferencer has frames left to read;
    None when it has read every frame or has no consumer on this bin. When JetStream cannot
    say, every frame is kept this time (KEEP_EVERYTHING)."""
    try:
        info = await js.consumer_info(FRAMES_CAPTURED.stream, edge_inferencer_durable(bin_id))
        if not info.num_pending and not info.num_ack_pending:
            return None
        floor = info.ack_floor.stream_seq if info.ack_floor and info.ack_floor.stream_seq else 0
        raw = await js.get_msg(
            FRAMES_CAPTURED.stream,
            seq=floor + 1,
            subject=FRAMES_CAPTURED.subject(bin_id),
            next=True,
        )
    except NotFoundError:
        return None  # no inferencer consumer here, or nothing after its floor
    except (NatsError, TimeoutError) as exc:
        log.warning("cannot ask JetStream what the edge-inferencer has read (%s): keeping all", exc)
        return KEEP_EVERYTHING
    if raw.data is None:
        return KEEP_EVERYTHING
    try:
        oldest = read_json(FrameCaptured, raw.data)
    except ValidationError as exc:
        # Garbage (a newer producer's added fields are read past): it says nothing about
        # when the frames after it were spooled. The spool limits still bound what is kept
        # (see Forwarder.sweep).
        log.warning(
            "the edge-inferencer's next frames.captured message (stream sequence %s) is not a "
            "FrameCaptured this uploader reads (%d errors): keeping all",
            raw.seq,
            exc.error_count(),
        )
        return KEEP_EVERYTHING
    return oldest.captured_at.timestamp() - SPOOL_TO_EVENT_SLACK_S
