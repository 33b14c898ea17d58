"""The model-registry service: training.completed in; models.registered and, for a better
model, models.promoted out. Records live in a JetStream key-value bucket."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime

from nats.js.client import JetStreamContext

from binloop.bus import Delivery, Outgoing, subscribe, subscribe_batch
from binloop.errors import NotReadyError
from binloop.observability import metrics
from binloop.runtime import ServiceApp, new_service
from schemas.events import FleetHeartbeat, ModelPromoted, TrainingCompleted
from schemas.routes import (
    FLEET_HEARTBEAT,
    MODELS_PROMOTED,
    MODELS_REGISTERED,
    MODELS_ROLLED_BACK,
    TRAINING_COMPLETED,
)
from services.model_registry.fleet import FleetView
from services.model_registry.operations import record_training
from services.model_registry.settings import RegistrySettings
from services.model_registry.store import RegistryStore


@dataclass
class _Registry:
    store: RegistryStore | None = None

    def require(self) -> RegistryStore:
        if self.store is None:
            raise NotReadyError("the registry bucket is not open yet")
        return self.store


def create_app(settings: RegistrySettings) -> ServiceApp:
    service = new_service("model-registry", settings)
    service.declare_publishes(MODELS_REGISTERED, MODELS_PROMOTED, MODELS_ROLLED_BACK)
    registry = _Registry()

    async def open_bucket(js: JetStreamContext) -> None:
        registry.store = await RegistryStore.open(js, settings.kv_bucket, settings.kv_history)
        champion = (await registry.store.champion(settings.model_name)).record
        if champion is not None:
            record = await registry.store.version(settings.model_name, champion.version)
            if record is not None:
                metrics.MODEL_ACCURACY.labels(settings.model_name, "champion").set(
                    record.metrics.accuracy
                )

    service.on_start.append(open_bucket)
    service.ready_checks.append(lambda: registry.store is not None)

    async def on_completed(delivery: Delivery[TrainingCompleted]) -> list[Outgoing]:
        events = await record_training(
            registry.require(), delivery.event, settings.promotion_margin, service.producer
        )
        return [
            Outgoing(
                MODELS_PROMOTED if isinstance(event, ModelPromoted) else MODELS_REGISTERED, event
            )
            for event in events
        ]

    fleet = FleetView()
    published: set[tuple[str, int]] = set()

    async def on_heartbeats(deliveries: list[Delivery[FleetHeartbeat]]) -> list[Outgoing]:
        fleet.observe([d.event for d in deliveries])
        serving = fleet.serving(datetime.now(UTC))
        for model, version in published - set(serving):
            metrics.FLEET_SERVING_BINS.labels(model, str(version)).set(0)
        for (model, version), bins in serving.items():
            metrics.FLEET_SERVING_BINS.labels(model, str(version)).set(bins)
        published.update(serving)
        return []

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
    return service
