"""The uploader service: frames.captured in, frame into object storage, frames.stored out."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

from binloop.bus import Delivery, Outgoing, subscribe
from binloop.observability import metrics
from binloop.runtime import ServiceApp, new_service
from binloop.storage import BlobStore, open_store
from schemas.events import FrameCaptured
from schemas.routes import FRAMES_CAPTURED, FRAMES_STORED
from services.uploader.core import FrameUploader, stored_event
from services.uploader.settings import UploaderSettings
from services.uploader.spool import Spool

SERVICE = "uploader"


def create_app(
    settings: UploaderSettings,
    *,
    store: BlobStore | None = None,
    clock: Callable[[], float] = time.time,
) -> ServiceApp:
    service = new_service(SERVICE, settings)
    service.declare_publishes(FRAMES_STORED, bin_id=settings.bin_id)
    bin_id = settings.bin_id
    spool = Spool(settings.spool_root, bin_id)
    uploader = FrameUploader(spool, store or open_store(settings), clock)
    uploaded_bytes = metrics.UPLOADED_BYTES.labels(bin_id)
    backlog = metrics.UPLOADER_BACKLOG.labels(bin_id)

    async def on_frame(delivery: Delivery[FrameCaptured]) -> list[Outgoing]:
        upload = await asyncio.to_thread(uploader.upload, delivery.event)
        uploaded_bytes.inc(upload.written_bytes)
        stored = stored_event(delivery.event, upload.blob, service.producer)
        return [Outgoing(FRAMES_STORED, stored, bin_id)]

    async def sweep_spool() -> None:
        while True:
            scan = await asyncio.to_thread(spool.sweep, clock(), settings.spool_retention_s)
            backlog.set(scan.pending)
            await asyncio.sleep(settings.sweep_interval_s)

    subscribe(
        service.broker,
        service.publisher,
        FRAMES_CAPTURED,
        on_frame,
        durable=f"uploader-{bin_id}",
        bin_id=bin_id,
        policy=service.policy,
        description="Copies each spooled frame into object storage, verified by sha256.",
    )
    service.background.append(sweep_spool)
    return service
