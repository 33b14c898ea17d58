"""The frame-ingestor service: a source's frames into the spool and onto frames.captured."""

from __future__ import annotations

import asyncio
import logging

from binloop.bus import Publisher
from binloop.observability import metrics
from binloop.runtime import ServiceApp, new_service
from binloop.storage import LocalBlobStore
from schemas.events import FrameCaptured
from schemas.routes import FRAMES_CAPTURED
from services.frame_ingestor.core import CapturePlan, announce_leftovers, capture
from services.frame_ingestor.outbox import Outbox
from services.frame_ingestor.settings import FrameIngestorSettings
from services.frame_ingestor.sources import FrameSource, VideoSource, open_source

SERVICE = "frame-ingestor"

log = logging.getLogger(__name__)


def source_from_settings(settings: FrameIngestorSettings) -> FrameSource:
    return open_source(
        settings.source,
        labels_from_folders=settings.labels_from_folders,
        jpeg_quality=settings.jpeg_quality,
    )


async def run_capture(
    settings: FrameIngestorSettings,
    publisher: Publisher,
    *,
    source: FrameSource | None = None,
    stop: asyncio.Event | None = None,
) -> int:
    """Announce what a killed run left in the outbox, then capture from the configured (or
    given) source until it is exhausted, `max_frames` is reached or `stop` is set. Each frame
    is acked by JetStream before the next one. Returns the number of frames captured and
    published (not counting the leftovers)."""
    frame_source = source or source_from_settings(settings)
    bin_id = settings.bin_id
    captured = metrics.FRAMES_CAPTURED.labels(bin_id)

    async def emit(event: FrameCaptured) -> None:
        await publisher.publish(FRAMES_CAPTURED, event, bin_id)
        captured.inc()

    def on_skip(reason: str) -> None:
        metrics.FRAMES_SKIPPED.labels(bin_id, reason).inc()

    plan = CapturePlan(
        bin_id=bin_id,
        producer=publisher.service,
        fps=settings.fps,
        loops=settings.loops,
        max_frames=settings.max_frames,
    )

    def on_drop(reason: str) -> None:
        metrics.FRAMES_UNANNOUNCED.labels(bin_id, reason).inc()

    spool = LocalBlobStore(settings.spool_root)
    outbox = Outbox(spool, bin_id, on_drop=on_drop, producer=publisher.service)
    await announce_leftovers(outbox, emit, stop)
    stats = await capture(
        frame_source, spool, emit, plan, stop=stop, on_skip=on_skip, outbox=outbox
    )
    log.info(
        "%s: %s done, %d frames published, skipped %s",
        SERVICE,
        frame_source.description,
        stats.published,
        dict(stats.skipped) or "none",
    )
    return stats.published


def create_app(
    settings: FrameIngestorSettings,
    *,
    source: FrameSource | None = None,
    capture_done: asyncio.Event | None = None,
) -> ServiceApp:
    """The capture loop runs as a background task. A finite source (folder, file, replay) ends
    it and the service keeps serving health and metrics; a camera or stream lost for good
    fails it, which turns /healthz and /readyz red so the process is restarted. `capture_done`
    is set when the loop ends, however it ends.

    Raises ConfigError when the source does not exist, or for a camera or stream, when it
    does not deliver a frame within `source_open_timeout_s` (this call blocks that long)."""
    service = new_service(SERVICE, settings)
    service.declare_publishes(FRAMES_CAPTURED, bin_id=settings.bin_id)
    # Checked here so a wrong path, camera index or URL fails at start-up, not later in the
    # background task where it would only show up as a service with no frames.
    frame_source = source or source_from_settings(settings)
    if isinstance(frame_source, VideoSource) and frame_source.live:
        frame_source.check_available(settings.source_open_timeout_s)

    async def capture_loop() -> None:
        try:
            await run_capture(settings, service.publisher, source=frame_source)
        finally:
            if capture_done is not None:
                capture_done.set()

    service.background.append(capture_loop)
    return service
