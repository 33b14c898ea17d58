"""The model-registry service: training.completed in; models.registered and, for a better
model, models.promoted out. Records live in a JetStream key-value bucket. It also follows
models.rolled_back (published by `binloop rollback`) for its metrics, publishes rollbacks
whose announcement was interrupted, and keeps the fleet gauge current from heartbeats."""

from __future__ import annotations

import asyncio
import logging
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from uuid import UUID

from faststream.nats import DeliverPolicy
from nats.errors import Error as NatsError
from nats.js.client import JetStreamContext

from binloop.bus import Delivery, Outgoing, subscribe, subscribe_batch
from binloop.errors import NotReadyError, TransientError
from binloop.observability import metrics
from binloop.runtime import ServiceApp, new_service
from schemas.base import utc_now
from schemas.events import FleetHeartbeat, ModelPromoted, ModelRolledBack, TrainingCompleted
from schemas.routes import (
    FLEET_HEARTBEAT,
    MODELS_PROMOTED,
    MODELS_REGISTERED,
    MODELS_ROLLED_BACK,
    TRAINING_COMPLETED,
)
from services.model_registry.fleet import FleetView
from services.model_registry.operations import (
    announce_pending_rollback,
    champion_accuracy,
    record_training,
)
from services.model_registry.settings import RegistrySettings
from services.model_registry.store import RegistryStore

log = logging.getLogger(__name__)

COUNTED_ROLLBACKS = 1024
"""Rollback event ids remembered so a redelivered one is not counted twice (rollbacks are
operator actions: a handful a day)."""


@dataclass
class _Registry:
    store: RegistryStore | None = None

    def require(self) -> RegistryStore:
        if self.store is None:
            raise NotReadyError("the registry bucket is not open yet")
        return self.store


@dataclass
class _FleetGauge:
    """binloop_fleet_serving_bins and binloop_fleet_spool_backlog_frames from the fleet view.
    A version no live bin serves any more and a bin whose uploader fell silent are dropped
    (not kept at 0: every version ever served would keep a series)."""

    view: FleetView = field(default_factory=FleetView)
    published: set[tuple[str, int]] = field(default_factory=set)
    backlog_bins: set[str] = field(default_factory=set)

    def refresh(self, now: datetime) -> None:
        serving = self.view.serving(now)
        for model, version in self.published - set(serving):
            metrics.FLEET_SERVING_BINS.remove(model, str(version))
        for (model, version), bins in serving.items():
            metrics.FLEET_SERVING_BINS.labels(model, str(version)).set(bins)
        self.published = set(serving)
        backlog = self.view.spool_backlog(now)
        for bin_id in self.backlog_bins - set(backlog):
            metrics.FLEET_SPOOL_BACKLOG.remove(bin_id)  # unknown now, not 0
        for bin_id, frames in backlog.items():
            metrics.FLEET_SPOOL_BACKLOG.labels(bin_id).set(frames)
        self.backlog_bins = set(backlog)


def create_app(
    settings: RegistrySettings, *, clock: Callable[[], datetime] = utc_now
) -> ServiceApp:
    service = new_service("model-registry", settings)
    service.declare_publishes(MODELS_REGISTERED, MODELS_PROMOTED, MODELS_ROLLED_BACK)
    for decision in ("promoted", "rejected", "rolled_back"):
        # Every decision exists from the start, so increase() sees the first rollback.
        metrics.MODEL_PROMOTIONS.labels(settings.model_name, decision)
    registry = _Registry()

    async def set_champion_accuracy(model_name: str) -> None:
        accuracy = await champion_accuracy(registry.require(), model_name)
        if accuracy is not None:
            metrics.MODEL_ACCURACY.labels(model_name, "champion").set(accuracy)

    async def open_bucket(js: JetStreamContext) -> None:
        registry.store = await RegistryStore.open_or_create(
            js, settings.kv_bucket, settings.kv_history
        )
        await set_champion_accuracy(settings.model_name)

    service.on_start.append(open_bucket)
    service.ready_checks.append(lambda: registry.store is not None)

    async def announce_interrupted_rollbacks() -> None:
        """Rollbacks whose publish failed (or whose CLI died) reach the bins now. Runs once
        consumers are up, so this registry counts them too."""
        while True:
            try:
                store = registry.require()
                for model_name in await store.champion_models():
                    event = await announce_pending_rollback(store, service.publisher, model_name)
                    if event is not None:
                        log.warning(
                            "published the interrupted rollback of %s v%d -> v%d (%s)",
                            model_name,
                            event.from_version,
                            event.to_version,
                            event.event_id,
                        )
            except (TransientError, NatsError, TimeoutError) as exc:
                task = asyncio.current_task()
                if task is not None and task.cancelling():
                    raise asyncio.CancelledError from exc  # stopped while publishing
                log.warning("pending rollbacks not published yet (%s); retrying", exc)
                await asyncio.sleep(settings.retry_delay_s)
                continue
            return

    async def on_completed(delivery: Delivery[TrainingCompleted]) -> list[Outgoing]:
        store = registry.require()
        # A rollback still pending goes out before anything may replace its champion.
        await announce_pending_rollback(store, service.publisher, delivery.event.model_name)
        events = await record_training(
            store, delivery.event, settings.promotion_margin, service.producer, clock
        )
        return [
            Outgoing(
                MODELS_PROMOTED if isinstance(event, ModelPromoted) else MODELS_REGISTERED, event
            )
            for event in events
        ]

    counted: OrderedDict[UUID, None] = OrderedDict()

    async def on_rolled_back(delivery: Delivery[ModelRolledBack]) -> list[Outgoing]:
        event = delivery.event
        # The gauge follows the champion now, not the event: a redelivered old rollback
        # must not overwrite a later promotion's accuracy.
        await set_champion_accuracy(event.model_name)
        if event.event_id not in counted:
            counted[event.event_id] = None
            if len(counted) > COUNTED_ROLLBACKS:
                counted.popitem(last=False)
            metrics.MODEL_PROMOTIONS.labels(event.model_name, "rolled_back").inc()
        return []

    fleet = _FleetGauge()

    async def on_heartbeats(deliveries: list[Delivery[FleetHeartbeat]]) -> list[Outgoing]:
        # Liveness by this registry's clock, not the bins' (see FleetView).
        now = clock()
        fleet.view.observe([d.event for d in deliveries], received_at=now)
        fleet.refresh(now)
        return []

    async def refresh_fleet() -> None:
        """Bins that go silent drop out even when no heartbeat arrives at all."""
        while True:
            await asyncio.sleep(settings.fleet_refresh_s)
            fleet.refresh(clock())

    service.background.extend([announce_interrupted_rollbacks, refresh_fleet])

    subscribe_batch(
        service.broker,
        service.publisher,
        FLEET_HEARTBEAT,
        on_heartbeats,
        durable="model-registry-fleet",
        policy=service.policy,
        description="Counts the bins serving each model version (fleet view).",
    )
    subscribe(
        service.broker,
        service.publisher,
        TRAINING_COMPLETED,
        on_completed,
        durable="model-registry",
        policy=service.policy,
        description="Records each candidate and promotes it when it beats the champion.",
    )
    subscribe(
        service.broker,
        service.publisher,
        MODELS_ROLLED_BACK,
        on_rolled_back,
        durable="model-registry-rollbacks",
        policy=service.policy,
        # From its creation on: a new registry does not count the stream's old rollbacks.
        deliver_policy=DeliverPolicy.NEW,
        description="Counts rollbacks and sets the champion accuracy gauge to the new champion.",
    )
    return service
