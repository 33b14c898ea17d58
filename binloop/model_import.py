"""Importing an externally trained model into the registry (`binloop import-model`, and the
demo's starting champion): services.trainer.external scores and stores it like a trained
candidate, then it is announced on training.completed, so the model-registry registers it and
promotes it when it is the first model or beats the champion on the same eval set.

The trainer's modules (torch) are imported when a model is imported, not with this module: the
edge and cloud images run `binloop` without them."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from nats.aio.client import Client as NatsClient
from nats.aio.msg import Msg
from nats.js.client import JetStreamContext
from nats.js.errors import BucketNotFoundError
from pydantic import ValidationError

from binloop.bus import Publisher, ensure_streams
from binloop.errors import BinloopError, ConfigError
from binloop.runtime import new_service
from binloop.storage import open_store
from schemas.base import read_json
from schemas.events import ModelRegistered, TrainingCompleted
from schemas.routes import MODELS_REGISTERED, TRAINING_COMPLETED

if TYPE_CHECKING:
    from binloop.ml.card import ModelCard
    from services.trainer.settings import TrainerSettings

PRODUCER = "model-import"


@dataclass(frozen=True)
class ImportResult:
    completed: TrainingCompleted
    card: ModelCard
    """The card as stored: the registry's name and version, the metrics just measured."""
    registered: ModelRegistered | None
    """The registry's decision; None when not waited for or not made within the wait."""


class AlreadyHasModelsError(BinloopError):
    """`only_first` was asked for and the registry has a champion for the model already."""


def _store_and_score(onnx: Path, card: Path | None, settings: TrainerSettings) -> ImportResult:
    from services.edge_inferencer.models import card_path_for
    from services.trainer.external import import_external_model

    outcome = import_external_model(
        open_store(settings), settings, onnx, card if card is not None else card_path_for(onnx)
    )
    return ImportResult(outcome.completed_event(PRODUCER), outcome.card, None)


def configured_registry_bucket() -> str:
    """The model-registry's bucket as its settings read it (BINLOOP_KV_BUCKET, else its
    default): the import runs on the trainer's settings, which do not name it."""
    from services.model_registry.settings import RegistrySettings

    try:
        return RegistrySettings().kv_bucket
    except ValidationError as exc:
        raise ConfigError(f"the model-registry's settings (BINLOOP_*) are invalid: {exc}") from exc


async def registry_champion(js: JetStreamContext, model_name: str, bucket: str) -> int | None:
    """The champion version the model-registry's `bucket` records for `model_name`; None when
    there is none (or no registry has run yet: the bucket is not created here)."""
    from services.model_registry.store import RegistryStore

    try:
        kv = await js.key_value(bucket)
    except BucketNotFoundError:
        return None
    state = await RegistryStore(kv).champion(model_name)
    return state.record.version if state.record is not None else None


async def import_model(
    onnx: Path,
    card: Path | None,
    settings: TrainerSettings,
    *,
    wait_s: float = 0.0,
    only_first: bool = False,
    registry_bucket: str | None = None,
) -> ImportResult:
    """Scores `onnx` on settings.eval_dir, stores it as the next version of
    settings.model_name in the services' object store, and publishes training.completed on
    settings.nats_url. `card` defaults to the edge's rule (<stem>.card.json, else card.json
    beside it). With `wait_s` > 0, waits that long for the registry's models.registered.

    With `only_first`, raises AlreadyHasModelsError (and imports nothing) when the registry
    has a champion for the model already: safe at every start of a deployment, and an import
    that was stored but never registered (the announcement failed) is simply done again. The
    registry's bucket is `registry_bucket`, by default the model-registry's setting
    (BINLOOP_KV_BUCKET, see configured_registry_bucket)."""
    bucket = None
    if only_first:
        bucket = registry_bucket or configured_registry_bucket()
    service = new_service(PRODUCER, settings)
    await service.broker.connect()
    try:
        await ensure_streams(service.js)  # the registry may not have started yet
        if bucket is not None:
            champion = await registry_champion(service.js, settings.model_name, bucket)
            if champion is not None:
                raise AlreadyHasModelsError(
                    f"the registry's champion of {settings.model_name} is v{champion} already "
                    f"(bucket {bucket})"
                )
        imported = await asyncio.to_thread(_store_and_score, onnx, card, settings)
        completed = imported.completed
        registered = await _announce(
            service.broker.connection, service.publisher, completed, wait_s
        )
    finally:
        await service.broker.stop()
    return ImportResult(completed, imported.card, registered)


async def _announce(
    connection: NatsClient, publisher: Publisher, completed: TrainingCompleted, wait_s: float
) -> ModelRegistered | None:
    """Publishes training.completed; with `wait_s` > 0, waits for the registry's decision."""
    decided: asyncio.Future[ModelRegistered] = asyncio.get_running_loop().create_future()

    async def on_registered(msg: Msg) -> None:
        event = read_json(ModelRegistered, msg.data)
        mine = (event.model_name, event.model_version)
        if mine == (completed.model_name, completed.model_version) and not decided.done():
            decided.set_result(event)

    decisions = await connection.subscribe(MODELS_REGISTERED.subject(), cb=on_registered)
    try:
        await publisher.publish(TRAINING_COMPLETED, completed)
        try:
            return await asyncio.wait_for(decided, wait_s) if wait_s > 0 else None
        except TimeoutError:
            return None
    finally:
        await decisions.unsubscribe()
