"""The trainer service: datasets.snapshot / training.requested in, training.completed out.

Training runs in a worker process (binloop.worker), one run at a time, so it never holds up
the service's event loop (nor, in `binloop up`, the other services'); the bus wrapper keeps
the message alive while it works, and a stop or a taken-back message stops the training too.
The current champion (the parent of the next model) is followed from models.promoted and
models.rolled_back, in the registry's order of its decisions (binloop.ml.decisions), not in
the order they arrive.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import dataclass, field

from nats.js.client import JetStreamContext
from nats.js.errors import NotFoundError
from pydantic import ValidationError

from binloop.bus import Delivery, Outgoing, subscribe
from binloop.datasets import DatasetManifest
from binloop.ml.decisions import ModelUpdate, is_older, update_for
from binloop.observability import metrics
from binloop.runtime import ServiceApp, new_service
from binloop.storage import BlobStore, open_store, training_run_key
from binloop.worker import WorkerProcess
from schemas.base import Event, read_json
from schemas.events import (
    DatasetSnapshot,
    ModelPromoted,
    ModelRolledBack,
    TrainingCompleted,
    TrainingRequested,
)
from schemas.routes import (
    DATASETS_SNAPSHOT,
    MODELS_PROMOTED,
    MODELS_ROLLED_BACK,
    TRAINING_COMPLETED,
    TRAINING_REQUESTED,
)
from services.trainer.core import (
    EvalSet,
    InsufficientDataError,
    load_eval_set,
    manifest_for_request,
    manifest_for_snapshot,
    run_training,
)
from services.trainer.settings import TrainerSettings

log = logging.getLogger(__name__)


@dataclass
class TrainerState:
    eval_set_id: str | None = None
    """Of the evaluation set the worker process loaded (and checked) at start."""
    champion_by: ModelUpdate | None = None
    """The registry decision (promotion or rollback) that named the champion."""
    one_run_at_a_time: asyncio.Lock = field(default_factory=asyncio.Lock)

    def follow(self, update: ModelUpdate) -> None:
        """A promotion or rollback the registry decided after the one on record names the
        champion; an older one (redelivered, or a promotion whose publish a rollback
        overtook) does not. A rollback to the champion itself becomes the one on record."""
        if self.champion_by is None or not is_older(update, self.champion_by):
            self.champion_by = update

    @property
    def champion(self) -> int | None:
        """The champion's version: the parent of the next model."""
        return None if self.champion_by is None else self.champion_by.version


async def recall_champion(js: JetStreamContext, model_name: str, state: TrainerState) -> None:
    """Seeds the champion from the last promotion/rollback in the stream, so a restarted
    trainer (whose durable consumers already acked them) still knows the parent version.

    One that cannot be read (a foreign publish, an event no schema of this release accepts)
    is logged and skipped rather than stopping every start: the consumers dead-letter it, and
    the next promotion or rollback names the champion. A server that cannot answer still fails
    the start, which is retried, so a restart never forgets a champion it could have read."""
    for route in (MODELS_PROMOTED, MODELS_ROLLED_BACK):
        try:
            raw = await js.get_last_msg(route.stream, route.subject())
            if raw.data is None:
                continue
            event = read_json(route.model, raw.data)
        except NotFoundError:
            continue
        except ValidationError as exc:
            log.warning("cannot read the last %s to recall the champion: %s", route.name, exc)
            continue
        if isinstance(event, ModelPromoted | ModelRolledBack) and event.model_name == model_name:
            state.follow(update_for(event))


def _outcome_of(error: BaseException) -> str:
    return "insufficient_data" if isinstance(error, InsufficientDataError) else "failed"


_eval_sets: dict[tuple[str, str], EvalSet] = {}
"""The worker process's evaluation set, decoded once (at start, or after a new worker)."""


def _eval_set(store: BlobStore, settings: TrainerSettings) -> EvalSet:
    key = (str(settings.eval_dir), settings.eval_dataset_name)
    if key not in _eval_sets:
        _eval_sets[key] = load_eval_set(store, settings)
    return _eval_sets[key]


def load_eval_set_in_worker(settings: TrainerSettings) -> str:
    """In the worker process, at the service's start: decodes and checks the evaluation set
    where training needs it (the service itself never does), and returns its id."""
    return _eval_set(open_store(settings), settings).eval_set_id


def train_and_record(
    settings: TrainerSettings,
    manifest: DatasetManifest,
    parent_version: int | None,
    record_key: str,
    producer: str,
) -> TrainingCompleted:
    """One training, in the worker process: train, store the model, then store the
    announcement under `record_key` before it is returned (and published)."""
    store = open_store(settings)
    outcome = run_training(
        store, manifest, _eval_set(store, settings), settings, parent_version=parent_version
    )
    completed = outcome.completed_event(producer)
    store.put(record_key, completed.model_dump_json().encode(), "application/json")
    return completed


def create_app(settings: TrainerSettings) -> ServiceApp:
    service = new_service("trainer", settings)
    service.declare_publishes(TRAINING_COMPLETED)
    for outcome in ("completed", "failed", "insufficient_data"):
        # Every outcome exists from the start, so increase() sees a Job's first failure.
        metrics.TRAINING_RUNS.labels(outcome)
    blob_store = open_store(settings)
    state = TrainerState()
    worker = WorkerProcess("trainer-training")

    async def prepare_eval_set(_: JetStreamContext) -> None:
        # In the worker, which starts now rather than at the first training.
        state.eval_set_id = await worker.call(load_eval_set_in_worker, settings)

    async def seed_champion(js: JetStreamContext) -> None:
        await recall_champion(js, settings.model_name, state)

    async def stop_worker() -> None:
        await asyncio.to_thread(worker.close)

    service.on_start.extend([prepare_eval_set, seed_champion])
    service.on_stop.append(stop_worker)
    service.ready_checks.append(lambda: state.eval_set_id is not None)

    async def train(load_manifest: Callable[[], DatasetManifest], cause: Event) -> list[Outgoing]:
        """Trains once per input event. The announcement is stored before it is published, so
        a redelivery (the input's ack was lost after training.completed went out) announces
        that model again instead of training and registering another version."""
        if state.eval_set_id is None:  # on_start checks it before any consumer runs
            raise RuntimeError("the evaluation set is not loaded")
        record_key = training_run_key(settings.model_name, str(cause.event_id))
        async with state.one_run_at_a_time:
            parent = state.champion

            def announced_before() -> TrainingCompleted | None:
                if not blob_store.exists(record_key):
                    return None
                return TrainingCompleted.model_validate_json(blob_store.get(record_key))

            earlier = await asyncio.to_thread(announced_before)
            if earlier is not None:
                log.info(
                    "%s v%d was trained for event %s already: announcing it again",
                    earlier.model_name,
                    earlier.model_version,
                    cause.event_id,
                )
                return [Outgoing(TRAINING_COMPLETED, earlier)]
            try:
                manifest = await asyncio.to_thread(load_manifest)
                completed = await worker.call(
                    train_and_record, settings, manifest, parent, record_key, service.producer
                )
            except Exception as exc:  # counted, then retried or dead-lettered by the bus
                metrics.TRAINING_RUNS.labels(_outcome_of(exc)).inc()
                raise
        metrics.TRAINING_RUNS.labels("completed").inc()
        metrics.TRAINING_SECONDS.observe(completed.train_seconds)
        metrics.MODEL_ACCURACY.labels(settings.model_name, "candidate").set(
            completed.metrics.accuracy
        )
        log.info(
            "trained %s v%d on %s v%d: eval accuracy %.3f",
            completed.model_name,
            completed.model_version,
            completed.dataset_name,
            completed.dataset_version,
            completed.metrics.accuracy,
        )
        return [Outgoing(TRAINING_COMPLETED, completed)]

    async def on_snapshot(delivery: Delivery[DatasetSnapshot]) -> list[Outgoing]:
        return await train(
            lambda: manifest_for_snapshot(blob_store, delivery.event), delivery.event
        )

    async def on_request(delivery: Delivery[TrainingRequested]) -> list[Outgoing]:
        return await train(lambda: manifest_for_request(blob_store, delivery.event), delivery.event)

    async def on_promoted(delivery: Delivery[ModelPromoted]) -> list[Outgoing]:
        if delivery.event.model_name == settings.model_name:
            state.follow(update_for(delivery.event))
        return []

    async def on_rolled_back(delivery: Delivery[ModelRolledBack]) -> list[Outgoing]:
        if delivery.event.model_name == settings.model_name:
            state.follow(update_for(delivery.event))
        return []

    subscribe(
        service.broker,
        service.publisher,
        DATASETS_SNAPSHOT,
        on_snapshot,
        durable="trainer",
        ack_wait_s=settings.ack_wait_s,
        description="Trains a candidate model on each new dataset snapshot.",
        policy=service.policy,
    )
    subscribe(
        service.broker,
        service.publisher,
        TRAINING_REQUESTED,
        on_request,
        durable="trainer-requests",
        ack_wait_s=settings.ack_wait_s,
        description="Trains a candidate on the named (or latest) snapshot of a dataset.",
        policy=service.policy,
    )
    subscribe(
        service.broker,
        service.publisher,
        MODELS_PROMOTED,
        on_promoted,
        durable="trainer-champion",
        description="Follows the champion, the parent of the next candidate.",
        policy=service.policy,
    )
    subscribe(
        service.broker,
        service.publisher,
        MODELS_ROLLED_BACK,
        on_rolled_back,
        durable="trainer-champion-rollback",
        description="Follows rollbacks of the champion.",
        policy=service.policy,
    )
    return service
