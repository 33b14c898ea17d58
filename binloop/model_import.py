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

from nats.aio.msg import Msg

from binloop.bus import ensure_streams
from binloop.errors import BinloopError
from binloop.runtime import new_service
from binloop.storage import open_store
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
    """`only_first` was asked for and the store holds versions of the model already."""


def _store_and_score(
    onnx: Path, card: Path | None, settings: TrainerSettings, only_first: bool
) -> ImportResult:
    from services.edge_inferencer.models import card_path_for
    from services.trainer.core import next_model_version
    from services.trainer.external import import_external_model

    store = open_store(settings)
    if only_first and (stored := next_model_version(store, settings.model_name) - 1) > 0:
        raise AlreadyHasModelsError(
            f"{settings.model_name} has {stored} version(s) stored already (latest v{stored})"
        )
    outcome = import_external_model(
        store, settings, onnx, card if card is not None else card_path_for(onnx)
    )
    return ImportResult(outcome.completed_event(PRODUCER), outcome.card, None)


async def import_model(
    onnx: Path,
    card: Path | None,
    settings: TrainerSettings,
    *,
    wait_s: float = 0.0,
    only_first: bool = False,
) -> ImportResult:
    """Scores `onnx` on settings.eval_dir, stores it as the next version of
    settings.model_name in the services' object store, and publishes training.completed on
    settings.nats_url. `card` defaults to the edge's rule (<stem>.card.json, else card.json
    beside it). With `wait_s` > 0, waits that long for the registry's models.registered.
    With `only_first`, raises AlreadyHasModelsError (and imports nothing) when any version of
    the model is stored already: safe to run at every start of a deployment."""
    imported = await asyncio.to_thread(_store_and_score, onnx, card, settings, only_first)
    completed = imported.completed
    service = new_service(PRODUCER, settings)
    await service.broker.connect()
    decided: asyncio.Future[ModelRegistered] = asyncio.get_running_loop().create_future()

    async def on_registered(msg: Msg) -> None:
        event = ModelRegistered.model_validate_json(msg.data)
        mine = (event.model_name, event.model_version)
        if mine == (completed.model_name, completed.model_version) and not decided.done():
            decided.set_result(event)

    try:
        await ensure_streams(service.js)  # the registry may not have started yet
        decisions = await service.broker.connection.subscribe(
            MODELS_REGISTERED.subject(), cb=on_registered
        )
        await service.publisher.publish(TRAINING_COMPLETED, completed)
        try:
            registered = await asyncio.wait_for(decided, wait_s) if wait_s > 0 else None
        except TimeoutError:
            registered = None
        await decisions.unsubscribe()
    finally:
        await service.broker.stop()
    return ImportResult(completed, imported.card, registered)
