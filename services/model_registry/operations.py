"""Registry operations over the key-value store: record a finished training run, and roll the
champion back. The decisions themselves are in core.py."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime

from nats.errors import Error as NatsError
from nats.js.client import JetStreamContext

from binloop.bus import Publisher
from binloop.errors import TransientError
from binloop.observability import metrics
from schemas.base import utc_now
from schemas.events import ModelPromoted, ModelRegistered, ModelRolledBack, TrainingCompleted
from schemas.routes import MODELS_ROLLED_BACK
from services.model_registry.core import (
    ChampionRecord,
    RegistryError,
    RollbackNotAnnouncedError,
    VersionRecord,
    check_replay,
    ensure_announced,
    pending_promotion,
    register,
    registration_events,
    replay_state,
    rollback_target,
    rolled_back_champion,
    rolled_back_event,
)
from services.model_registry.settings import DEFAULT_KV_BUCKET
from services.model_registry.store import ChampionChangedError, ChampionState, RegistryStore

CLEAR_ATTEMPTS = 5


async def record_training(
    store: RegistryStore,
    event: TrainingCompleted,
    margin: float,
    producer: str,
    clock: Callable[[], datetime] = utc_now,
) -> list[ModelRegistered | ModelPromoted]:
    """Records the candidate, promotes it when it earns it, and returns the events to publish.

    A redelivered event finds its record (see replay_state): a decision that took effect, or
    a rejection, returns the same events (same ids) again, announcing the promotion only while
    the version is still champion; a promotion a crash interrupted is applied first; one whose
    champion was replaced before it took effect is decided again against the current champion.
    Raises RollbackNotAnnouncedError (retried) while the champion's rollback is not
    published (see announce_pending_rollback), ChampionChangedError (retried) when the
    champion changes while deciding: the retry decides again.
    """
    model = event.model_name
    state = await store.champion(model)
    ensure_announced(state.record)
    existing = await store.version_entry(model, event.model_version)
    if existing is None:
        record = await _decide(store, state, event, margin, clock())
        if not await store.add_version(record):
            raise TransientError(f"{model} v{record.version} was recorded concurrently; retrying")
        return await _apply(store, state, record, producer)

    check_replay(existing.record, event)
    replay = replay_state(existing.record, state.record, state.revision)
    if replay == "settled":
        serving = state.record.version if state.record is not None else None
        return registration_events(existing.record, producer, serving, champion_epoch=state.epoch)
    if replay == "superseded":
        record = await _decide(store, state, event, margin, clock(), superseded=existing.record)
        await store.replace_version(record, existing.revision)
        return await _apply(store, state, record, producer)
    return await _apply(store, state, existing.record, producer)


async def _decide(
    store: RegistryStore,
    state: ChampionState,
    event: TrainingCompleted,
    margin: float,
    now: datetime,
    superseded: VersionRecord | None = None,
) -> VersionRecord:
    champion_record = None
    if state.record is not None:
        champion_record = await store.version(event.model_name, state.record.version)
        if champion_record is None:
            raise RegistryError(
                f"champion {event.model_name} v{state.record.version} has no version record"
            )
    return register(event, state.record, champion_record, margin, now, state.revision, superseded)


async def _apply(
    store: RegistryStore, state: ChampionState, record: VersionRecord, producer: str
) -> list[ModelRegistered | ModelPromoted]:
    """Makes `record` champion when it is a promotion not applied yet, counts the decision and
    returns its events. The champion is replaced only at the revision the decision was made
    against: if it changed meanwhile, ChampionChangedError leaves the record as it is and the
    retry finds it superseded and decides again (nothing is announced for it before)."""
    serving = state.record.version if state.record is not None else None
    promotion = pending_promotion(record, state.record, state.revision)
    if promotion is not None:
        await store.set_champion(promotion, state.revision)
        serving = promotion.version
        metrics.MODEL_ACCURACY.labels(record.model_name, "champion").set(record.metrics.accuracy)
    metrics.MODEL_PROMOTIONS.labels(record.model_name, record.decision).inc()
    return registration_events(record, producer, serving, champion_epoch=state.epoch)


@dataclass(frozen=True)
class RollbackOutcome:
    event: ModelRolledBack
    resumed: bool
    """True when an earlier rollback's unpublished event was published instead: nothing was
    rolled back by this call."""


async def rollback(
    js: JetStreamContext,
    publisher: Publisher,
    model_name: str,
    to_version: int | None = None,
    reason: str = "manual rollback",
    *,
    bucket: str = DEFAULT_KV_BUCKET,
) -> RollbackOutcome:
    """Makes the previous champion (or `to_version`) the champion again and publishes
    models.rolled_back with its artifact and card.

    The new champion and its event are written in one compare-and-set (the event waits in
    `pending_rollback`), then the event is published and the pending mark cleared. When an
    earlier rollback's event is still pending (its publish failed, or the caller died), this
    publishes that one, same event id, and rolls nothing back: a retry never goes one version
    further. Raises RegistryError when the bucket does not exist or there is nothing to roll
    back to, RollbackNotAnnouncedError when the publish fails (a retry completes it).
    Metrics are the registry service's: it counts the rollback when it consumes the event.
    """
    store = await RegistryStore.open(js, bucket)
    state = await store.champion(model_name)
    if state.record is not None and state.record.pending_rollback is not None:
        return RollbackOutcome(await _announce(store, publisher, state.record), resumed=True)
    target_version = rollback_target(state.record, to_version)
    target = await store.version(model_name, target_version)
    if state.record is None or target is None:
        raise RegistryError(f"{model_name} v{target_version} is not a recorded version")
    event = rolled_back_event(
        state.record, target, reason, publisher.producer, state.revision, epoch=state.epoch
    )
    champion = rolled_back_champion(state.record, event)
    await store.set_champion(champion, state.revision)
    return RollbackOutcome(await _announce(store, publisher, champion), resumed=False)


async def announce_pending_rollback(
    store: RegistryStore, publisher: Publisher, model_name: str
) -> ModelRolledBack | None:
    """Publishes the rollback of `model_name` still waiting in its champion record, if any
    (same event id, so JetStream drops it if the first publish did arrive)."""
    state = await store.champion(model_name)
    if state.record is None or state.record.pending_rollback is None:
        return None
    return await _announce(store, publisher, state.record)


async def _announce(
    store: RegistryStore, publisher: Publisher, champion: ChampionRecord
) -> ModelRolledBack:
    event = champion.pending_rollback
    if event is None:
        raise ValueError(f"{champion.model_name} v{champion.version} has no pending rollback")
    try:
        await publisher.publish(MODELS_ROLLED_BACK, event)
    except (NatsError, TimeoutError) as exc:
        raise RollbackNotAnnouncedError(
            f"{event.model_name} is rolled back v{event.from_version} -> v{event.to_version} "
            f"in the registry, but models.rolled_back was not published ({exc}); "
            "`binloop rollback` again publishes it (and rolls nothing further back), as does "
            "the model-registry at its start"
        ) from exc
    await _clear_pending(store, event)
    return event


async def _clear_pending(store: RegistryStore, event: ModelRolledBack) -> None:
    """Marks `event` published. Another publisher of it (the registry at start, a second
    CLI) may have cleared it first: then there is nothing left to do."""
    for _ in range(CLEAR_ATTEMPTS):
        state = await store.champion(event.model_name)
        pending = state.record.pending_rollback if state.record is not None else None
        if state.record is None or pending is None or pending.event_id != event.event_id:
            return
        try:
            await store.set_champion(
                state.record.model_copy(update={"pending_rollback": None}), state.revision
            )
        except ChampionChangedError:
            continue
        return
    raise ChampionChangedError(
        f"could not mark rollback {event.event_id} of {event.model_name} published in "
        f"{CLEAR_ATTEMPTS} attempts; it stays pending and is published again, same id"
    )


async def champion_accuracy(store: RegistryStore, model_name: str) -> float | None:
    """The current champion's accuracy on its evaluation set; None without a champion."""
    champion = (await store.champion(model_name)).record
    if champion is None:
        return None
    record = await store.version(model_name, champion.version)
    return record.metrics.accuracy if record is not None else None
