"""The labeling-bridge service: samples.selected in; labels.annotated and datasets.snapshot out.

With the label-studio backend it also runs an HTTP server for Label Studio (webhook, frames,
ML backend), reconciles annotations periodically, and follows the champion model
(models.promoted, models.rolled_back) for the ML backend's predictions.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from nats.errors import Error as NatsError
from nats.js.api import DeliverPolicy
from nats.js.client import JetStreamContext
from pydantic import ValidationError

from binloop.bus import Delivery, Outgoing, subscribe
from binloop.errors import BinloopError, ConfigError, PermanentError, TransientError
from binloop.ml.decisions import ModelUpdate, update_for
from binloop.observability import metrics
from binloop.runtime import ServiceApp, new_service
from binloop.storage import BlobStore, PresigningStore, open_store, reconcile_cursor_key
from schemas.base import BlobRef
from schemas.events import DeadLetter, ModelPromoted, ModelRolledBack, SampleSelected
from schemas.routes import (
    DATASETS_SNAPSHOT,
    DLQ,
    LABELS_ANNOTATED,
    MODELS_PROMOTED,
    MODELS_ROLLED_BACK,
    SAMPLES_SELECTED,
)
from services.edge_inferencer.models import MODEL_ACK_WAIT_S, ModelCache
from services.labeling_bridge.backends import (
    LabelingBackend,
    LabelStudioBackend,
    LabelStudioExportBackend,
    OracleBackend,
)
from services.labeling_bridge.client import (
    LabelStudioClient,
    ProjectGoneError,
    ProjectRef,
    ProjectSpec,
)
from services.labeling_bridge.core import LabelingBridge
from services.labeling_bridge.cursor import SavedCursor
from services.labeling_bridge.imports import ImportLog, Restore, restore_task
from services.labeling_bridge.intake import preview
from services.labeling_bridge.label_studio import label_config_xml
from services.labeling_bridge.link import LabelStudioLink, ReconcilePass, Taken
from services.labeling_bridge.ml_backend import Champion
from services.labeling_bridge.relabel import waiting_relabels
from services.labeling_bridge.settings import LabelingBridgeSettings
from services.labeling_bridge.snapshots import DatasetBook
from services.labeling_bridge.web import (
    SECRET_HEADER,
    WEBHOOK_PATH,
    FrameSigner,
    WebParts,
    WebServer,
    make_web_app,
)

SERVICE = "labeling-bridge"
ML_BACKEND_TITLE = "binloop champion"

log = logging.getLogger(__name__)
_DEAD_LETTER_NAMESPACE = uuid.UUID("9c4e2f71-6a3b-4d08-8e5f-2b7d1a9c3e64")


@dataclass
class LabelStudioParts:
    """What create_app built for the label-studio backend, for callers that watch it."""

    web: WebServer | None = None
    client: LabelStudioClient | None = None
    backend: LabelStudioBackend | None = None
    imports: ImportLog | None = None
    signer: FrameSigner | None = None
    public_url: Callable[[], str] | None = None
    link: LabelStudioLink | None = None
    champion: Champion | None = None
    reconcile_once: Callable[[], Awaitable[ReconcilePass]] | None = None
    sync_once: Callable[[], Awaitable[ReconcilePass]] | None = None
    """One pass of what the bridge does every `reconcile_every_s`: set up a project made
    (again), make the tasks it lost, ask for relabels, reconcile."""
    remote_ready: asyncio.Event = field(default_factory=asyncio.Event)
    """Set once the project, its webhook and its ML backend are in place."""
    tasks_restored: asyncio.Event = field(default_factory=asyncio.Event)
    """Set once every sample imported into an earlier project and not labeled yet has its
    task in the current one."""
    relabels_asked: asyncio.Event = field(default_factory=asyncio.Event)
    """Set once every frame a taxonomy change sent back has its task."""

    @property
    def url(self) -> str:
        """The bridge's web server as Label Studio reaches it."""
        if self.public_url is None or self.web is None or self.web.port is None:
            raise RuntimeError("the bridge's web server is not running")
        return self.public_url()


def make_backend(settings: LabelingBridgeSettings) -> LabelingBackend:
    if settings.backend == "label-studio-export":
        return LabelStudioExportBackend(settings.export_dir, settings.taxonomy)
    return OracleBackend()


def create_app(
    settings: LabelingBridgeSettings,
    store: BlobStore | None = None,
    backend: LabelingBackend | None = None,
    parts: LabelStudioParts | None = None,
) -> ServiceApp:
    """`parts` (label-studio backend) is filled with what was built, e.g. for tests."""
    service = new_service(SERVICE, settings)
    blob_store = store or open_store(settings)
    book = DatasetBook(
        blob_store,
        settings.dataset_name,
        settings.taxonomy,
        settings.snapshot_every,
        migrations=settings.taxonomy_migrations,
    )
    # The sample handler, webhooks and reconciliation all change label records and the book.
    lock = asyncio.Lock()
    label_studio = parts if parts is not None else LabelStudioParts()
    if backend is None and settings.backend == "label-studio":
        backend = _label_studio_backend(settings, blob_store, label_studio)
    active_backend = backend or make_backend(settings)
    bridge = LabelingBridge(blob_store, active_backend, book, settings.taxonomy, service.producer)
    if label_studio.client is not None:
        _attach_label_studio(service, settings, blob_store, bridge, lock, label_studio)

    async def migrate_dataset(_: JetStreamContext) -> None:
        """A bridge started with a new taxonomy cuts a version in it before taking samples;
        a latest version an annotation cut and whose announcement was not acked (the bridge
        stopped first) is announced again."""
        async with lock:
            migration = await asyncio.to_thread(bridge.migrate)
            unannounced = (
                await asyncio.to_thread(bridge.unannounced_latest) if migration is None else None
            )
        announced = migration.announced if migration is not None else unannounced
        if announced is None:
            return
        await service.publisher.publish(DATASETS_SNAPSHOT, announced)
        async with lock:
            try:
                await asyncio.to_thread(bridge.announced, announced)
            except BinloopError as exc:  # only costs announcing it again at the next start
                log.warning(
                    "could not note that dataset version %d went out: %s", announced.version, exc
                )
        if migration is None or not migration.written:
            return
        metrics.DATASET_SNAPSHOTS.inc()
        waiting = len(book.needs_relabel)
        log.info(
            "dataset %s v%d: migrated to taxonomy %s, %d items to label again",
            announced.name,
            announced.version,
            announced.taxonomy_version,
            waiting,
        )
        if waiting and label_studio.client is None:
            log.warning(
                "backend %s cannot ask for new labels: the %d frames are listed in the "
                "manifest's needs_relabel (%s)",
                active_backend.name,
                waiting,
                announced.manifest.uri,
            )

    service.on_start.insert(0, migrate_dataset)

    async def on_sample(delivery: Delivery[SampleSelected]) -> list[Outgoing]:
        # Store reads and writes block: run them in a thread, one at a time.
        async with lock:
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
        description="Labels selected samples (or hands them to Label Studio) and cuts dataset "
        "versions from the labels.",
    )
    return service


def _label_studio_backend(
    settings: LabelingBridgeSettings, store: BlobStore, parts: LabelStudioParts
) -> LabelStudioBackend:
    """The Label Studio client and the backend that makes tasks; frame URLs point at the web
    server `_attach_label_studio` runs."""
    web_server = WebServer(settings.web_host, settings.web_port)

    def public_url() -> str:
        return settings.public_url.rstrip("/") or f"http://127.0.0.1:{web_server.port}"

    spec = ProjectSpec(
        title=settings.label_studio_project,
        label_config=label_config_xml(settings.taxonomy, settings.objects, settings.conditions),
        description=f"binloop dataset {settings.dataset_name}: frames picked by the sampler, "
        f"pre-annotated by the edge model (taxonomy {settings.taxonomy.version})",
    )
    client = LabelStudioClient(
        settings.label_studio_url,
        settings.label_studio_token.get_secret_value(),
        spec,
        settings.label_studio_timeout_s,
    )

    def frames_url() -> str:
        return settings.frames_url.rstrip("/") or public_url()

    signer = FrameSigner(settings.webhook_secret.get_secret_value(), frames_url)

    if settings.frame_urls == "presigned" and not isinstance(store, PresigningStore):
        raise ConfigError(f"frame_urls=presigned needs a store that presigns, not {store!r}")

    def image_url(frame: BlobRef) -> str:
        if settings.frame_urls == "served":
            return signer.url(frame)
        if isinstance(store, PresigningStore) and settings.frame_urls == "presigned":
            return store.presigned_get_url(frame.key)
        return frame.uri

    parts.web, parts.client, parts.signer, parts.public_url = web_server, client, signer, public_url
    parts.imports = ImportLog(store, settings.dataset_name)
    parts.backend = LabelStudioBackend(
        client, image_url, settings.taxonomy.version, imports=parts.imports
    )
    return parts.backend


def _attach_label_studio(
    service: ServiceApp,
    settings: LabelingBridgeSettings,
    store: BlobStore,
    bridge: LabelingBridge,
    lock: asyncio.Lock,
    parts: LabelStudioParts,
) -> None:
    """Registers the web server, reconciliation and the champion consumers."""
    assert parts.web is not None
    assert parts.client is not None
    assert parts.signer is not None
    web_server, client, signer = parts.web, parts.client, parts.signer

    def public_url() -> str:
        return parts.url

    secret = settings.webhook_secret.get_secret_value()
    champion = Champion(ModelCache(settings.model_cache))
    saved_cursor = SavedCursor(
        store,
        reconcile_cursor_key(settings.dataset_name),
        settings.label_studio_url,
        settings.label_studio_project,
        settings.taxonomy.version,
    )
    link = LabelStudioLink(
        bridge,
        client,
        service.publisher,
        lock,
        settings.reconcile_overlap_s,
        saved_cursor,
        parts.imports,
    )
    parts.link, parts.champion = link, champion

    async def dead_letter(origin: str, payload: bytes, error: Exception) -> None:
        error_type = type(error).__name__
        entry = DeadLetter(
            # The same bad annotation comes back on every reconciliation pass within the
            # overlap, and a webhook retries the same body: one entry each, not one per try.
            event_id=uuid.uuid5(
                _DEAD_LETTER_NAMESPACE,
                f"{origin}|{hashlib.sha256(payload).hexdigest()}|{error_type}|{error}",
            ),
            producer=service.producer,
            service=service.publisher.service,
            original_subject=origin,
            error_type=error_type,
            error=str(error)[:4096],
            payload_preview=preview(payload),
            payload_size=len(payload),
        )
        await service.publisher.publish(DLQ, entry, service.publisher.service)
        metrics.DEAD_LETTERS.labels(service.publisher.service, "label-studio", error_type).inc()
        log.warning("dead-lettered a Label Studio annotation from %s: %s", origin, error)

    async def reconcile_once() -> ReconcilePass:
        return await link.reconcile(dead_letter)

    async def ask_for_relabels() -> None:
        """A task for each frame a taxonomy change sent back that has none yet."""
        assert parts.backend is not None
        async with lock:
            requests = await asyncio.to_thread(waiting_relabels, bridge)
        for request in requests:
            try:
                await asyncio.to_thread(parts.backend.request_relabel, request)
            except PermanentError as exc:  # this frame's task was refused: ask for the others
                log.error(
                    "Label Studio refused the task asking for frame %s again: %s",
                    request.frame.sha256,
                    exc,
                )
        if requests:
            log.info("asked Label Studio to label %d frames again", len(requests))
        parts.relabels_asked.set()

    def on_taken(taken: Taken) -> None:
        if taken.sent_back:  # made under an older taxonomy: ask for the frame's label again
            parts.relabels_asked.clear()

    link.add_listener(on_taken)
    parts.reconcile_once = reconcile_once
    web_parts = WebParts(secret, link, store, signer, champion, dead_letter)

    async def restore_lost_tasks(project: ProjectRef) -> None:
        """Makes again, in `project`, the task of each sample imported into another project
        (deleted, or lost with Label Studio's database) that has no label yet."""
        assert parts.backend is not None
        assert parts.imports is not None
        backend, imports = parts.backend, parts.imports
        # Listed under the lock: a sample being handled now is either noted already, or
        # finds its task in this project.
        async with lock:
            frames = await asyncio.to_thread(imports.frames)
        made = 0
        for frame_sha256 in frames:
            async with lock:  # one frame at a time: samples keep flowing meanwhile
                restored = await asyncio.to_thread(
                    restore_task, bridge, backend, imports, frame_sha256, project
                )
            if restored.action is Restore.IMPORT and restored.task_id is not None:
                made += 1
        if made:
            log.info(
                "%d samples not labeled yet have their task again in Label Studio project %d",
                made,
                project.id,
            )

    def ensure_remote() -> ProjectRef:
        """Sets up the project's webhook and ML backend; returns the project."""
        project = client.project()
        client.ensure_webhook(public_url() + WEBHOOK_PATH, {SECRET_HEADER: secret}, WEBHOOK_PATH)
        if settings.register_ml_backend:
            client.ensure_ml_backend(public_url(), ML_BACKEND_TITLE)
        return project

    async def start_web(_: JetStreamContext) -> None:
        await web_server.start(make_web_app(web_parts))

    set_up_for: ProjectRef | None = None  # the project the webhook and ML backend are set up in
    restored_for: ProjectRef | None = None  # the project lost tasks were made again in
    one_sync = asyncio.Lock()

    async def sync() -> ReconcilePass:
        nonlocal set_up_for, restored_for
        project = await asyncio.to_thread(client.project)
        if project != set_up_for:
            # First pass, or the project was deleted and made again: it has no webhook,
            # ML backend, tasks of the samples handled before, or relabel tasks yet.
            parts.remote_ready.clear()
            parts.tasks_restored.clear()
            if set_up_for is not None:
                parts.relabels_asked.clear()
            project = set_up_for = await asyncio.to_thread(ensure_remote)
            parts.remote_ready.set()
        if project != restored_for:
            await restore_lost_tasks(project)
            restored_for = project
            parts.tasks_restored.set()
        if not parts.relabels_asked.is_set():
            await ask_for_relabels()
        reconciled = await reconcile_once()
        if not parts.relabels_asked.is_set():  # the pass (or a webhook) sent some back
            await ask_for_relabels()
        return reconciled

    async def sync_once() -> ReconcilePass:
        async with one_sync:
            try:
                return await sync()
            except ProjectGoneError as exc:
                # Found out by this pass: set up the project that replaces it now, not a
                # whole period later (its samples' tasks are made again then).
                log.warning("%s: setting it up again now", exc)
                return await sync()

    parts.sync_once = sync_once

    async def keep_in_step() -> None:
        """Sets up the project (once Label Studio answers), then reconciles periodically.
        A failed pass is logged and the next one tries again: this task must outlive any
        answer from Label Studio, the bus or the store, or /healthz would fail for good."""
        while True:
            try:
                await sync_once()
            except TransientError as exc:  # Label Studio down or slow: the next pass catches up
                log.warning(
                    "Label Studio not in step, next try in %.0fs: %s",
                    settings.reconcile_every_s,
                    exc,
                )
            except (BinloopError, NatsError, TimeoutError, ValidationError) as exc:
                # A request Label Studio refuses, a publish or a dead letter that did not go
                # out, a label record that cannot be read: the cursor stays, so the next pass
                # lists the same tasks again.
                log.error(
                    "reconciliation pass failed, next try in %.0fs: %s: %s",
                    settings.reconcile_every_s,
                    type(exc).__name__,
                    exc,
                )
            task = asyncio.current_task()
            if task is not None and task.cancelling():
                # Stopped while publishing, and nats-py turned the cancel into an error:
                # sleeping on would keep the service's stop waiting.
                raise asyncio.CancelledError
            await asyncio.sleep(settings.reconcile_every_s)

    async def stop() -> None:
        await web_server.stop()
        client.close()

    async def install(update: ModelUpdate, artifact: BlobRef, card: BlobRef) -> None:
        skipped = await asyncio.to_thread(champion.install, update, artifact, card)
        if skipped is not None:
            log.info("ML backend ignored %s v%d (%s)", update.name, update.version, skipped)

    async def on_promoted(delivery: Delivery[ModelPromoted]) -> list[Outgoing]:
        event = delivery.event
        await install(update_for(event), event.artifact, event.card)
        return []

    async def on_rolled_back(delivery: Delivery[ModelRolledBack]) -> list[Outgoing]:
        event = delivery.event
        await install(update_for(event), event.artifact, event.card)
        return []

    service.on_start.append(start_web)
    service.on_stop.append(stop)
    service.background.append(keep_in_step)
    subscribe(
        service.broker,
        service.publisher,
        MODELS_PROMOTED,
        on_promoted,
        durable=f"{SERVICE}-champion-promoted",
        policy=service.policy,
        ack_wait_s=MODEL_ACK_WAIT_S,
        deliver_policy=DeliverPolicy.LAST_PER_SUBJECT,  # today's champion, then each change
        description="Follows the champion model for the Label Studio ML backend.",
    )
    subscribe(
        service.broker,
        service.publisher,
        MODELS_ROLLED_BACK,
        on_rolled_back,
        durable=f"{SERVICE}-champion-rolledback",
        policy=service.policy,
        ack_wait_s=MODEL_ACK_WAIT_S,
        deliver_policy=DeliverPolicy.LAST_PER_SUBJECT,
        description="Goes back to the model version the registry rolled back to.",
    )
