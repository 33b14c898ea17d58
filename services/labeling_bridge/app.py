"""The labeling-bridge service: samples.selected in; labels.annotated and datasets.snapshot out."""

from __future__ import annotations

import asyncio

from binloop.bus import Delivery, Outgoing, subscribe
from binloop.observability import metrics
from binloop.runtime import ServiceApp, new_service
from binloop.storage import BlobStore, LocalBlobStore
from schemas.events import SampleSelected
from schemas.routes import DATASETS_SNAPSHOT, LABELS_ANNOTATED, SAMPLES_SELECTED
from services.labeling_bridge.backends import (
    LabelingBackend,
    LabelStudioExportBackend,
    OracleBackend,
)
from services.labeling_bridge.core import LabelingBridge
from services.labeling_bridge.settings import LabelingBridgeSettings
from services.labeling_bridge.snapshots import DatasetBook


def make_backend(settings: LabelingBridgeSettings) -> LabelingBackend:
    if settings.backend == "label-studio-export":
        return LabelStudioExportBackend(settings.export_dir, settings.taxonomy)
    return OracleBackend()


def create_app(
    settings: LabelingBridgeSettings,
    store: BlobStore | None = None,
    backend: LabelingBackend | None = None,
) -> ServiceApp:
    service = new_service("labeling-bridge", settings)
    blob_store = store or LocalBlobStore(settings.blob_root)
    active_backend = backend or make_backend(settings)
    book = DatasetBook(
        blob_store, settings.dataset_name, settings.taxonomy, settings.snapshot_every
    )
    bridge = LabelingBridge(blob_store, active_backend, book, settings.taxonomy, service.producer)

    async def on_sample(delivery: Delivery[SampleSelected]) -> list[Outgoing]:
        # Store reads and writes block; one sample at a time, so the bridge needs no lock.
        outcome = await asyncio.to_thread(bridge.handle, delivery.event, delivery.attempt)
        outgoing = []
        if outcome.new_label:
            metrics.LABELS.labels(active_backend.name).inc()
        if outcome.annotated is not None:
            outgoing.append(Outgoing(LABELS_ANNOTATED, outcome.annotated))
        if outcome.snapshot is not None:
            if outcome.snapshot_written:
                metrics.DATASET_SNAPSHOTS.inc()
            outgoing.append(Outgoing(DATASETS_SNAPSHOT, outcome.snapshot))
        return outgoing

    subscribe(
        service.broker,
        service.publisher,
        SAMPLES_SELECTED,
        on_sample,
        durable="labeling-bridge",
        policy=service.policy,
        description="Labels selected samples and cuts dataset versions from the labels.",
    )
    return service
