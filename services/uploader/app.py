"""The uploader service: store-and-forward from the edge spool to object storage.

frames.captured is acked once the frame is durably queued next to the spool; a background
forwarder drains that queue into the store (selected frames first, exponential backoff with
jitter while the store is down) and publishes frames.stored after each confirmed write.
samples.selected for this bin moves a frame to the front. See docs/uploader.md for why.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import Callable
from functools import partial

import nats.errors
from faststream.nats import DeliverPolicy

from binloop.bus import Delivery, Outgoing, subscribe
from binloop.errors import PermanentError, TransientError
from binloop.observability import metrics
from binloop.runtime import ServiceApp, new_service
from binloop.storage import BlobStore, S3BlobStore, open_store
from schemas.base import Event
from schemas.events import (
    DeadLetter,
    FleetHeartbeat,
    FrameCaptured,
    FrameStored,
    SampleSelected,
)
from schemas.routes import DLQ, FRAMES_CAPTURED, FRAMES_STORED, SAMPLES_SELECTED, Route
from services.uploader.backoff import Backoff
from services.uploader.core import FrameUploader
from services.uploader.forwarder import Forwarder, ProgressHook
from services.uploader.limits import SpoolLimits
from services.uploader.queue import QueuedFrame, UploadQueue
from services.uploader.readers import unread_since
from services.uploader.settings import UploaderSettings
from services.uploader.spool import Spool

SERVICE = "uploader"
PREVIEW_CHARS = 4096
_DEAD_LETTER_NAMESPACE = uuid.uuid5(uuid.NAMESPACE_URL, "binloop:uploader.dead-letter")

log = logging.getLogger(__name__)


def _open_store(settings: UploaderSettings) -> BlobStore:
    if settings.blob_backend == "s3":
        # The forwarder's backoff is the retry layer: the HTTP client's own retries would only
        # delay noticing that the store is down.
        return S3BlobStore.from_settings(settings, timeout_s=settings.store_timeout_s, retries=0)
    return open_store(settings)


def create_app(
    settings: UploaderSettings,
    *,
    store: BlobStore | None = None,
    clock: Callable[[], float] = time.time,
    on_progress: ProgressHook | None = None,
) -> ServiceApp:
    service = new_service(SERVICE, settings)
    service.declare_publishes(FRAMES_STORED, bin_id=settings.bin_id)
    bin_id = settings.bin_id
    spool = Spool(settings.spool_root, bin_id)

    async def publish(route: Route, event: Event, subject_bin: str) -> None:
        try:
            await service.publisher.publish(route, event, subject_bin)
        except (nats.errors.Error, TimeoutError, ConnectionError) as exc:
            raise TransientError(f"publishing {route.name}: {type(exc).__name__}: {exc}") from exc

    started = time.monotonic()
    announced = 0

    async def announce(stored: FrameStored) -> None:
        nonlocal announced
        await publish(FRAMES_STORED, stored, bin_id)
        announced += 1

    async def dead_letter(frame: QueuedFrame, error: PermanentError) -> None:
        """What the bus consumer does for a failed message, for a frame already acked."""
        payload = frame.event.model_dump_json()
        letter = DeadLetter(
            event_id=uuid.uuid5(_DEAD_LETTER_NAMESPACE, frame.event_id),
            producer=service.producer,
            service=service.publisher.service,
            original_subject=FRAMES_CAPTURED.subject(bin_id),
            error_type=type(error).__name__,
            error=str(error)[:4096],
            payload_preview=payload[:PREVIEW_CHARS],
            payload_size=len(payload.encode()),
        )
        # dlq.v1.uploader, as every consumer's: the instance is in `producer`, not the subject.
        await publish(DLQ, letter, service.publisher.service)
        metrics.DEAD_LETTERS.labels(SERVICE, FRAMES_CAPTURED.name, letter.error_type).inc()

    forwarder = Forwarder(
        spool=spool,
        queue=UploadQueue(settings.spool_root, bin_id),
        uploader=FrameUploader(spool, store or _open_store(settings), clock),
        limits=SpoolLimits(
            max_frames=settings.spool_max_pending_frames,
            max_bytes=settings.spool_max_pending_bytes,
            policy=settings.spool_full_policy,
            min_age_s=settings.spool_drop_min_age_s,
        ),
        backoff=Backoff(settings.retry_initial_s, settings.retry_max_s, settings.retry_jitter),
        announce=announce,
        dead_letter=dead_letter,
        producer=service.producer,
        set_aside_after=settings.retry_set_aside_after,
        clock=clock,
        on_progress=on_progress,
    )

    def heartbeat() -> FleetHeartbeat:
        """The fleet view's one look at this bin's uploads (bins are not scraped from the cloud)."""
        return FleetHeartbeat(
            producer=service.producer,
            bin_id=bin_id,
            service=SERVICE,
            frames_processed=announced,
            spool_backlog=forwarder.queue.pending_frames,
            uptime_s=time.monotonic() - started,
        )

    service.send_heartbeats(heartbeat)

    async def on_frame(delivery: Delivery[FrameCaptured]) -> list[Outgoing]:
        await forwarder.accept(delivery.event)
        return []  # frames.stored comes from the forwarder, once the store has the frame

    async def on_selected(delivery: Delivery[SampleSelected]) -> list[Outgoing]:
        if delivery.event.bin_id == bin_id:
            await forwarder.prioritize(delivery.event.frame_sha256)
        return []

    async def sweep_spool() -> None:
        while True:
            try:
                # Asked once, for both: the sweep keeps what the edge-inferencer has not read,
                # and the spool-full policy drops it last.
                forwarder.unread_since = await unread_since(service.js, bin_id)
                await asyncio.to_thread(forwarder.sweep, clock(), settings.spool_retention_s)
                await asyncio.to_thread(forwarder.prune_wanted)
            except OSError as exc:  # a disk that fails now may not next time: keep uploading
                log.warning(
                    "spool sweep failed, next one in %.0fs: %s", settings.sweep_interval_s, exc
                )
            except Exception:  # a bug, or an error nobody mapped: the next sweep may pass
                # Without the sweep the spool is never reclaimed: the bin's disk fills up.
                # (CancelledError is no Exception: stopping still ends the loop.)
                log.exception(
                    "spool sweep failed unexpectedly, next one in %.0fs", settings.sweep_interval_s
                )
            forwarder.report_drops()
            await asyncio.sleep(settings.sweep_interval_s)

    subscribe(
        service.broker,
        service.publisher,
        FRAMES_CAPTURED,
        on_frame,
        durable=f"uploader-{bin_id}",
        bin_id=bin_id,
        policy=service.policy,
        description="Queues each spooled frame for the object store (acked once queued on "
        "disk); a forwarder uploads it, verified by sha256, and announces frames.stored.",
    )
    subscribe(
        service.broker,
        service.publisher,
        SAMPLES_SELECTED,
        on_selected,
        durable=f"uploader-{bin_id}-selected",
        policy=service.policy,
        # Only selections made while this bin's uploader exists can concern its spool.
        deliver_policy=DeliverPolicy.NEW,
        description="Moves frames the sampler selected (for this bin) to the front of the "
        "upload queue.",
    )
    service.background.extend([forwarder.run, sweep_spool])
    service.ready_checks.append(lambda: forwarder.running)
    service.on_stop.append(partial(forwarder.drain, settings.store_timeout_s + 1.0))
    return service
