"""The edge-inferencer service: frames.captured in, inference.result + actuation.command out;
models.promoted and models.rolled_back swap the served model between two frames."""

from __future__ import annotations

import asyncio
import logging
import time
from functools import partial

from nats.errors import Error as NatsError
from nats.js.api import DeliverPolicy
from nats.js.client import JetStreamContext
from nats.js.errors import NotFoundError
from pydantic import ValidationError

from binloop.bus import Delivery, Outgoing, subscribe
from binloop.bus.consumers import edge_inferencer_durable
from binloop.errors import (
    BinloopError,
    ConfigError,
    MissingBlobError,
    ModelLoadError,
    NotReadyError,
    StoreUnavailableError,
    TransientError,
)
from binloop.ml.decisions import ModelUpdate, is_older, update_for
from binloop.observability import metrics
from binloop.runtime import ServiceApp, new_service
from binloop.storage import open_store
from schemas.base import BlobRef, read_json
from schemas.events import FleetHeartbeat, FrameCaptured, ModelPromoted, ModelRolledBack
from schemas.routes import (
    ACTUATION_COMMAND,
    FRAMES_CAPTURED,
    INFERENCE_RESULT,
    MODELS_PROMOTED,
    MODELS_ROLLED_BACK,
)
from services.edge_inferencer.core import (
    Classification,
    DecisionPolicy,
    SpoolReader,
    build_events,
    classify,
)
from services.edge_inferencer.models import (
    MODEL_ACK_WAIT_S,
    ModelCache,
    ModelSlot,
    card_path_for,
    load_model,
    update_verdict,
)
from services.edge_inferencer.settings import EdgeInferencerSettings

SERVICE = "edge-inferencer"

log = logging.getLogger(__name__)


def _observe(bin_id: str, outcome: Classification) -> None:
    latency = outcome.latency
    for stage, ms in (
        ("read", latency.read_ms),
        ("decode", latency.decode_ms),
        ("preprocess", latency.preprocess_ms),
        ("infer", latency.infer_ms),
        ("postprocess", latency.postprocess_ms),
    ):
        metrics.INFERENCE_STAGE_SECONDS.labels(bin_id, stage).observe(ms / 1000)
    metrics.FRAMES_INFERRED.labels(bin_id).inc()
    metrics.DECISIONS.labels(bin_id, outcome.decision.compartment.value).inc()
    if outcome.decision.abstained:
        metrics.ABSTENTIONS.labels(bin_id).inc()


def create_app(settings: EdgeInferencerSettings, slot: ModelSlot | None = None) -> ServiceApp:
    """`slot` lets the caller watch what is served (`slot.served`, `slot.add_listener`)."""
    service = new_service(SERVICE, settings)
    service.declare_publishes(INFERENCE_RESULT, ACTUATION_COMMAND, bin_id=settings.bin_id)
    open_store(settings)  # lets read_verified serve the URIs of promoted models
    bin_id = settings.bin_id
    model_slot = slot or ModelSlot(bin_id)
    reader = SpoolReader(settings.spool_root)
    cache = ModelCache(settings.model_cache, settings.intra_op_threads)
    policy = DecisionPolicy(settings.taxonomy, settings.confidence_threshold, settings.top_k)
    durable = edge_inferencer_durable(bin_id)
    promoted_durable = f"{durable}-promoted"
    rolled_back_durable = f"{durable}-rolledback"
    started = time.monotonic()
    frames_done = 0

    def heartbeat() -> FleetHeartbeat:
        served = model_slot.served
        return FleetHeartbeat(
            producer=service.producer,
            bin_id=bin_id,
            service=SERVICE,
            model_name=served[0] if served else None,
            model_version=served[1] if served else None,
            frames_processed=frames_done,
            uptime_s=time.monotonic() - started,
        )

    service.send_heartbeats(heartbeat)

    async def on_frame(delivery: Delivery[FrameCaptured]) -> list[Outgoing]:
        frame = delivery.event
        async with model_slot.use() as model:
            # In the event loop itself, not a worker thread: the loop has nothing else to do
            # meanwhile but settle the previous frame's acks, which it does at the next fetch,
            # and the thread hop plus that concurrent work cost more than the stages around
            # the network together (docs/edge-latency.md).
            outcome = classify(partial(reader.read, frame.spool), model, policy)
        result, command = build_events(frame, model, outcome, service.producer)
        _observe(frame.bin_id, outcome)
        nonlocal frames_done
        frames_done += 1
        return [  # the bin waits for the command; the result is for the cloud
            Outgoing(ACTUATION_COMMAND, command, frame.bin_id),
            Outgoing(INFERENCE_RESULT, result, frame.bin_id),
        ]

    async def apply_update(update: ModelUpdate, artifact: BlobRef, card: BlobRef) -> None:
        # Check before downloading (cheap), and again at the swap: the other consumer may
        # have installed something in between.
        skipped = update_verdict(model_slot.current, update)
        if skipped is None:
            try:
                model = await asyncio.to_thread(cache.fetch, update, artifact, card)
            except StoreUnavailableError as exc:
                # The bin must get this model once the store is back: an outage is no reason
                # to dead-letter the promotion after the default few tries.
                raise NotReadyError(
                    f"model store unreachable for {update.name} v{update.version}: {exc}"
                ) from exc
            except MissingBlobError as exc:
                # Nor is a store that does not hold the files (yet): a folder store that is
                # not mounted, a bucket still replicating. Dead-lettered, the registry's
                # decision would never reach this bin; waiting ends with the files or with the
                # next promotion or rollback, which the verdict above then prefers.
                raise NotReadyError(
                    f"model store holds no {update.name} v{update.version} yet: {exc}"
                ) from exc
            skipped = await model_slot.install(model)
            if skipped is None:
                await remember_served()
        if skipped is not None:
            if await model_slot.acknowledge(update):
                await remember_served()  # a rollback to the served model: newer on record
            log.info("bin %s: ignored %s v%d (%s)", bin_id, update.name, update.version, skipped)

    remembering = asyncio.Lock()

    async def remember_served() -> None:
        """Record the served model in the cache, for the next start. What is recorded is the
        slot's model at the time, under one lock, so two installs racing on the promotion
        and rollback consumers leave the record on the model served."""
        async with remembering:
            served = model_slot.current
            if served is None or served.installed_by is None:
                return
            try:
                await asyncio.to_thread(cache.remember, served)
            except (OSError, ModelLoadError) as exc:
                # The bin keeps serving; only a restart would fall back to an older model
                # (or to default_model), which restore_champion's replay of the last
                # promotion and rollback then replaces.
                log.warning(
                    "bin %s: cannot record %s v%d as served in %s: %s",
                    bin_id,
                    served.card.name,
                    served.card.version,
                    cache.root,
                    exc,
                )

    async def on_model_event(
        delivery: Delivery[ModelPromoted] | Delivery[ModelRolledBack],
    ) -> list[Outgoing]:
        event = delivery.event
        await apply_update(update_for(event), event.artifact, event.card)
        return []

    unrestored: list[ModelPromoted | ModelRolledBack] = []
    """The champion's event while its model cannot be fetched yet (the store is away)."""

    async def restore(event: ModelPromoted | ModelRolledBack) -> None:
        try:
            await apply_update(update_for(event), event.artifact, event.card)
        except TransientError as exc:
            unrestored.append(event)
            log.warning(
                "bin %s: the champion named by %s cannot be fetched yet (%s); trying again",
                bin_id,
                type(event).__name__,
                exc,
            )
        except BinloopError as exc:
            log.warning(
                "bin %s: the champion named by %s cannot be served (%s); the next promotion "
                "or rollback replaces the model served now",
                bin_id,
                type(event).__name__,
                exc,
            )

    async def restore_champion(js: JetStreamContext) -> None:
        """The last promotion and rollback in the stream, oldest first by the registry's
        order (the verdict skips the stale one). A restarted bin's durable consumers acked
        them long ago and will not deliver them again; on a leaf node they are in the bin's
        own ENGINE stream, and a model fetched before is loaded from the cache, so this works
        offline too. One that cannot be fetched yet is tried again in the background while
        the model recalled from the cache (or default_model) serves; one that cannot be read
        is left to the consumers (it never stops the bin from starting)."""
        events: list[ModelPromoted | ModelRolledBack] = []
        for route in (MODELS_PROMOTED, MODELS_ROLLED_BACK):
            try:
                raw = await js.get_last_msg(route.stream, route.subject())
                if raw.data is not None:
                    events.append(read_json(route.model, raw.data))  # type: ignore[arg-type]
            except NotFoundError:
                continue
            except (NatsError, TimeoutError, ValidationError) as exc:
                log.warning("bin %s: cannot read the last %s: %s", bin_id, route.name, exc)
        if len(events) == 2 and is_older(update_for(events[1]), update_for(events[0])):
            events.reverse()
        for event in events:
            await restore(event)

    async def keep_restoring() -> None:
        """Fetches the champion a start could not, once the store is back."""
        while unrestored:
            await asyncio.sleep(settings.retry_delay_s)
            waiting = list(unrestored)
            unrestored.clear()
            for event in waiting:
                await restore(event)

    async def prepare(js: JetStreamContext) -> None:
        # The model served before the restart first: the last promotion may name one this
        # bin never got (promoted while the store or the link was away). The registry's
        # events replace it as they come; default_model only serves a bin with nothing cached.
        recalled = await asyncio.to_thread(cache.recall)
        if recalled is not None:
            await model_slot.install(recalled)
        elif settings.default_model is not None:
            onnx_path = settings.default_model
            try:
                model = await asyncio.to_thread(
                    load_model,
                    onnx_path,
                    card_path_for(onnx_path),
                    intra_op_threads=settings.intra_op_threads,
                )
            except (ModelLoadError, OSError) as exc:
                raise ConfigError(f"default_model {onnx_path} cannot be served: {exc}") from exc
            await model_slot.install(model)
        await restore_champion(js)

    service.on_start.append(prepare)
    service.background.append(keep_restoring)
    service.ready_checks.append(lambda: model_slot.current is not None)

    subscribe(
        service.broker,
        service.publisher,
        FRAMES_CAPTURED,
        on_frame,
        durable=durable,
        bin_id=bin_id,
        policy=service.policy,
        # The next frame is classified while JetStream acks this one's outputs: the ack
        # round trip stays out of the per-frame latency (an input is still acked only after
        # its outputs are stored).
        pipelined=True,
        description="Classifies each frame and tells the actuator where the item goes.",
    )
    subscribe(
        service.broker,
        service.publisher,
        MODELS_PROMOTED,
        on_model_event,
        durable=promoted_durable,
        policy=service.policy,
        ack_wait_s=MODEL_ACK_WAIT_S,
        deliver_policy=DeliverPolicy.LAST_PER_SUBJECT,  # a new bin wants today's model only
        description="Downloads a promoted model and serves it from the next frame on.",
    )
    subscribe(
        service.broker,
        service.publisher,
        MODELS_ROLLED_BACK,
        on_model_event,
        durable=rolled_back_durable,
        policy=service.policy,
        ack_wait_s=MODEL_ACK_WAIT_S,
        deliver_policy=DeliverPolicy.LAST_PER_SUBJECT,
        description="Goes back to the version the registry rolled back to.",
    )
    return service
