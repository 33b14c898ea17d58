"""The model registry: the promotion rule and rollback as pure logic, then the service on a
real nats-server with its key-value bucket."""

from __future__ import annotations

import asyncio
import itertools
import uuid
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from datetime import UTC, datetime, timedelta
from typing import Any, cast

import nats
import pytest
from nats.aio.client import Client
from nats.js.client import JetStreamContext
from nats.js.errors import NotFoundError
from prometheus_client import REGISTRY
from typer.testing import CliRunner

from binloop.bus import Publisher, ensure_streams
from binloop.bus.publish import Outgoing, PendingAcks, PublishTimeoutError
from binloop.cli import app as binloop_cli
from binloop.ml.card import ModelCard
from binloop.ml.decisions import ModelUpdate, update_for
from binloop.natsserver import NatsServer
from binloop.runtime import ServiceApp, new_service
from binloop.settings import ServiceSettings
from schemas import DeadLetter
from schemas.base import BlobRef, Event, utc_now
from schemas.events import (
    ModelMetrics,
    ModelPromoted,
    ModelRegistered,
    ModelRolledBack,
    TrainingCompleted,
)
from schemas.routes import (
    DLQ,
    MODELS_PROMOTED,
    MODELS_REGISTERED,
    MODELS_ROLLED_BACK,
    TRAINING_COMPLETED,
    Route,
)
from services.edge_inferencer.models import (
    LoadedModel,
    ModelSlot,
    update_verdict,
)
from services.model_registry import (
    RegistryError,
    RegistrySettings,
    RollbackNotAnnouncedError,
    create_app,
    rollback,
)
from services.model_registry.core import (
    PROMOTED_VERSIONS_KEPT,
    ChampionRecord,
    VersionRecord,
    check_replay,
    decide,
    ensure_announced,
    key_token,
    pending_promotion,
    register,
    registration_events,
    replay_state,
    rollback_target,
    rolled_back_champion,
    rolled_back_event,
)
from services.model_registry.operations import record_training
from services.model_registry.settings import DEFAULT_KV_BUCKET
from services.model_registry.store import RegistryStore, champion_key, version_key
from tests.helpers import Collector, eventually

EVAL_SET = "e" * 64
OTHER_EVAL_SET = "f" * 64
NOW = datetime(2025, 5, 1, 12, 0, tzinfo=UTC)
EPOCH = datetime(2025, 4, 1, tzinfo=UTC)
"""When the registry's bucket was created (the decisions' champion_epoch)."""
MODEL = "binloop-waste"


def _ref(version: int, name: str) -> BlobRef:
    key = f"models/{MODEL}/v{version:05d}/{name}"
    return BlobRef(key=key, uri=f"file:///blobs/{key}", sha256=f"{version:064x}", size=100)


def _completed(
    version: int,
    accuracy: float,
    eval_set: str = EVAL_SET,
    parent: int | None = None,
    model: str = MODEL,
) -> TrainingCompleted:
    return TrainingCompleted(
        producer="trainer",
        model_name=model,
        model_version=version,
        parent_version=parent,
        dataset_name="seed",
        dataset_version=version,
        artifact=_ref(version, "model.onnx"),
        card=_ref(version, "card.json"),
        metrics=ModelMetrics(
            eval_set_id=eval_set,
            eval_items=120,
            accuracy=accuracy,
            macro_f1=accuracy,
            compartment_accuracy=accuracy,
            per_class_f1={"glass": accuracy},
        ),
        onnx_parity_max_abs_diff=1e-6,
        train_seconds=3.0,
    )


def _champion_of(event: TrainingCompleted) -> VersionRecord:
    return register(event, None, None, 0.02, NOW, 0)


# --- the promotion rule ----------------------------------------------------------------------


def test_first_model_is_promoted() -> None:
    decision = decide(_completed(1, 0.2).metrics, None, margin=0.02)
    assert decision.promoted
    assert "first model" in decision.reason


@pytest.mark.parametrize(
    ("accuracy", "promoted"),
    [(0.52, True), (0.60, True), (0.519, False), (0.50, False), (0.30, False)],
)
def test_candidate_must_beat_champion_by_the_margin(accuracy: float, promoted: bool) -> None:
    champion = _champion_of(_completed(1, 0.50))
    decision = decide(_completed(2, accuracy).metrics, champion, margin=0.02)
    assert decision.promoted is promoted
    assert "champion v1 0.5000" in decision.reason


@pytest.mark.parametrize(("accuracy", "promoted"), [(0.45, True), (0.40, True), (0.39, False)])
def test_a_negative_margin_lets_a_slightly_worse_candidate_through(
    accuracy: float, promoted: bool
) -> None:
    champion = _champion_of(_completed(1, 0.50))
    decision = decide(_completed(2, accuracy).metrics, champion, margin=-0.1)
    assert decision.promoted is promoted
    if promoted:
        assert decision.reason.startswith("within the margin")


def test_a_different_eval_set_is_rejected_whatever_the_accuracy() -> None:
    champion = _champion_of(_completed(1, 0.50))
    decision = decide(_completed(2, 0.99, OTHER_EVAL_SET).metrics, champion, margin=0.02)
    assert not decision.promoted
    assert "different eval set" in decision.reason
    assert OTHER_EVAL_SET[:12] in decision.reason


def test_promotion_stacks_the_champion_history() -> None:
    first = register(_completed(1, 0.5), None, None, 0.02, NOW, 0)
    champion_1 = pending_promotion(first, None, 0)
    assert champion_1 is not None
    assert (champion_1.version, champion_1.history, champion_1.promoted_versions) == (1, [], [1])

    rejected = register(_completed(2, 0.51), champion_1, first, 0.02, NOW, 1)
    assert rejected.decision == "rejected"
    assert (rejected.champion_before, rejected.champion_revision) == (1, 1)
    assert pending_promotion(rejected, champion_1, 1) is None

    better = register(_completed(3, 0.53), champion_1, first, 0.02, NOW, 1)
    champion_3 = pending_promotion(better, champion_1, 1)
    assert champion_3 is not None
    assert (champion_3.version, champion_3.history, champion_3.promoted_versions) == (
        3,
        [1],
        [1, 3],
    )
    # Already applied: a replay has nothing left to do.
    assert replay_state(better, champion_3, 2) == "settled"
    assert pending_promotion(better, champion_3, 2) is None


def test_a_replay_tells_applied_unfinished_and_superseded_promotions_apart() -> None:
    v4 = _champion_of(_completed(4, 0.50))
    champion_4 = ChampionRecord(
        model_name=MODEL, version=4, changed_at=NOW, reason="x", promoted_versions=[4]
    )
    v5 = register(_completed(5, 0.53), champion_4, v4, 0.02, NOW, 1)
    assert v5.decision == "promoted"
    # Recorded, then a crash before the champion key was written: the replay applies it.
    assert replay_state(v5, champion_4, 1) == "unfinished"
    # v6 was promoted over v4 first: v5 never served and is decided again.
    champion_6 = ChampionRecord(
        model_name=MODEL,
        version=6,
        history=[4],
        changed_at=NOW,
        reason="x",
        promoted_versions=[4, 6],
    )
    assert replay_state(v5, champion_6, 2) == "superseded"
    assert pending_promotion(v5, champion_6, 2) is None
    # The champion went away and came back (a rollback to v4): still decided again, as the
    # rollback was announced after the decision and a late promotion would lose to it.
    assert replay_state(v5, champion_4, 3) == "superseded"
    # v5 served, then was rolled back to v4: never applied again.
    rolled_back_to_4 = champion_4.model_copy(update={"promoted_versions": [4, 5]})
    assert replay_state(v5, rolled_back_to_4, 3) == "settled"
    # v5 served, then v6 was promoted over it.
    champion_6_over_5 = champion_6.model_copy(
        update={"history": [4, 5], "promoted_versions": [4, 5, 6]}
    )
    assert replay_state(v5, champion_6_over_5, 3) == "settled"
    rejected = v5.model_copy(update={"decision": "rejected"})
    assert replay_state(rejected, champion_6, 2) == "settled"
    # Records from before revisions were kept: unfinished only while the champion is the one
    # decided against and unchanged since; otherwise never applied nor decided again, as a
    # promotion rolled back since cannot be told from one that never took effect.
    legacy = v5.model_copy(update={"champion_revision": None})
    assert replay_state(legacy, champion_4, 3) == "unfinished"
    assert replay_state(legacy, champion_6, 3) == "settled"
    rolled_back_since = champion_4.model_copy(update={"changed_at": NOW + timedelta(minutes=1)})
    assert replay_state(legacy, rolled_back_since, 3) == "settled"


def test_a_superseded_promotion_is_decided_again_against_the_new_champion() -> None:
    v4, v6 = _champion_of(_completed(4, 0.50)), _champion_of(_completed(6, 0.56))
    champion_4 = ChampionRecord(model_name=MODEL, version=4, changed_at=NOW, reason="x")
    champion_6 = ChampionRecord(
        model_name=MODEL,
        version=6,
        history=[4],
        changed_at=NOW,
        reason="x",
        promoted_versions=[6],
    )
    event = _completed(5, 0.53)
    first = register(event, champion_4, v4, 0.02, NOW, 1)
    again = register(event, champion_6, v6, 0.02, NOW, 2, superseded=first)

    assert (again.decision, again.champion_before, again.champion_revision) == ("rejected", 6, 2)
    assert again.reason.startswith(
        "decided again: the promotion over v4 never took effect, the champion became v6 first; "
        "not better by the margin"
    )
    assert again.superseded is not None
    assert (again.superseded.champion_before, again.superseded.reason) == (4, first.reason)
    [registered] = registration_events(again, "reg", 6, champion_epoch=EPOCH)
    assert isinstance(registered, ModelRegistered)
    assert (registered.decision, registered.champion_version) == ("rejected", 6)
    # Another decision, another event id: the duplicate window must not drop it.
    assert (
        registered.event_id
        != registration_events(first, "reg", 4, champion_epoch=EPOCH)[0].event_id
    )


def test_events_are_the_same_for_the_same_record() -> None:
    champion = _champion_of(_completed(1, 0.5))
    record = register(_completed(3, 0.6), None, champion, 0.02, NOW, 0).model_copy(
        update={"champion_before": 1}
    )
    first = registration_events(record, "reg", 3, champion_epoch=EPOCH)
    again = registration_events(record, "reg", 3, champion_epoch=EPOCH)
    assert [e.event_id for e in first] == [e.event_id for e in again]
    registered, promoted = first
    assert isinstance(registered, ModelRegistered)
    assert isinstance(promoted, ModelPromoted)
    assert (registered.decision, registered.champion_version) == ("promoted", 1)
    assert (promoted.model_version, promoted.previous_version) == (3, 1)
    assert (promoted.champion_revision, promoted.champion_epoch) == (0, EPOCH)
    assert promoted.artifact == _ref(3, "model.onnx")
    rejected = record.model_copy(update={"decision": "rejected", "version": 4})
    [only] = registration_events(rejected, "reg", 3, champion_epoch=EPOCH)
    assert isinstance(only, ModelRegistered)
    assert only.event_id not in {e.event_id for e in first}
    # Promoted, but not (or no longer) the champion: models.promoted stays silent.
    assert registration_events(record, "reg", 5, champion_epoch=EPOCH) == [registered]
    assert registration_events(record, "reg", None, champion_epoch=EPOCH) == [registered]


def test_a_recreated_buckets_events_do_not_repeat_the_old_buckets_ids() -> None:
    # Versions and revisions start again in a recreated registry bucket, so the same
    # (model, version) or (revision, target) comes back; within JetStream's two-minute
    # duplicate window the server would drop the new bucket's event as a repeat.
    champion = _champion_of(_completed(1, 0.5))
    record = register(_completed(3, 0.6), None, champion, 0.02, NOW, 0).model_copy(
        update={"champion_before": 1}
    )
    recreated = EPOCH + timedelta(minutes=1)
    old = registration_events(record, "reg", 3, champion_epoch=EPOCH)
    new = registration_events(record, "reg", 3, champion_epoch=recreated)
    assert {e.event_id for e in old}.isdisjoint(e.event_id for e in new)

    target = VersionRecord.model_validate(record.model_dump() | {"version": 1})
    promoted_3 = ChampionRecord(
        model_name=MODEL, version=3, history=[1], changed_at=NOW, reason="x"
    )
    ids = {
        rolled_back_event(promoted_3, target, "x", "reg", 4, epoch=epoch).event_id
        for epoch in (EPOCH, recreated, EPOCH)
    }
    assert len(ids) == 2


def test_a_second_training_run_claiming_a_recorded_version_is_refused() -> None:
    event = _completed(1, 0.5)
    record = _champion_of(event)
    check_replay(record, event)
    with pytest.raises(RegistryError, match="already recorded"):
        check_replay(record, event.model_copy(update={"event_id": uuid.uuid4()}))


def test_rollback_goes_to_the_previous_champion_or_the_given_version() -> None:
    champion = ChampionRecord(
        model_name=MODEL,
        version=5,
        history=[1, 3],
        changed_at=NOW,
        reason="x",
        promoted_versions=[1, 3, 5],
    )
    assert rollback_target(champion, None) == 3
    assert rollback_target(champion, 1) == 1
    target_3 = _champion_of(_completed(3, 0.5))
    event = rolled_back_event(
        champion, target_3, "bad in the field", "reg", revision=7, epoch=EPOCH
    )
    after = rolled_back_champion(champion, event)
    assert (after.version, after.history) == (3, [1])
    # A rollback forgets v5 in the history, not that it was promoted.
    assert after.promoted_versions == [1, 3, 5]
    assert "rollback from v5: bad in the field" in after.reason
    # The event waits in the record (an outbox) until it is published.
    assert after.pending_rollback == event
    assert (event.from_version, event.to_version, event.artifact) == (5, 3, target_3.artifact)
    assert (event.champion_revision, event.champion_epoch) == (7, EPOCH)
    with pytest.raises(RollbackNotAnnouncedError, match="v5 -> v3"):
        ensure_announced(after)
    ensure_announced(after.model_copy(update={"pending_rollback": None}))
    target_4 = _champion_of(_completed(4, 0.5))
    event_4 = rolled_back_event(champion, target_4, "x", "reg", revision=7, epoch=EPOCH)
    assert rolled_back_champion(champion, event_4).history == [1, 3, 5]
    # Another rollback (another revision replaced) is another event.
    assert (
        rolled_back_event(champion, target_3, "x", "reg", 8, epoch=EPOCH).event_id != event.event_id
    )


def test_rollback_needs_somewhere_to_go() -> None:
    with pytest.raises(RegistryError, match="no champion"):
        rollback_target(None, None)
    first = ChampionRecord(model_name=MODEL, version=1, changed_at=NOW, reason="x")
    with pytest.raises(RegistryError, match="first champion"):
        rollback_target(first, None)
    with pytest.raises(RegistryError, match="already the champion"):
        rollback_target(first, 1)


def test_model_names_must_be_usable_as_keys() -> None:
    assert key_token("binloop-waste_2") == "binloop-waste_2"
    with pytest.raises(RegistryError):
        key_token("bad.name")


# --- the service on a real bus ---------------------------------------------------------------


@pytest.mark.integration
async def test_registry_promotes_rejects_dedups_and_rolls_back(
    js: JetStreamContext, nats_client: Client, nats_server: NatsServer
) -> None:
    settings = RegistrySettings(nats_url=nats_server.url, http_port=0, retry_delay_s=0.05)
    registered = await Collector(ModelRegistered).attach(nats_client, MODELS_REGISTERED.subject())
    promoted = await Collector(ModelPromoted).attach(nats_client, MODELS_PROMOTED.subject())
    rolled = await Collector(ModelRolledBack).attach(nats_client, MODELS_ROLLED_BACK.subject())
    dead = await Collector(DeadLetter).attach(nats_client, DLQ.wildcard)
    service = create_app(settings)
    await service.start()
    subject = TRAINING_COMPLETED.subject()
    try:
        v3 = _completed(3, 0.53, parent=1)
        for event in (
            _completed(1, 0.50),
            _completed(2, 0.51, parent=1),
            v3,
            _completed(4, 0.90, OTHER_EVAL_SET, parent=3),
        ):
            await js.publish(subject, event.model_dump_json().encode())
        await registered.wait_for(4)
        # The same training run again (a redelivery): same decision, same event ids.
        await js.publish(subject, v3.model_dump_json().encode())
        await registered.wait_for(5)
        await js.publish(subject, b'{"model_name": "binloop-waste", "garbage": true}')
        [letter] = await dead.wait_for(1)

        outcome = await rollback(js, service.publisher, MODEL, reason="field accuracy dropped")
        await rolled.wait_for(1)
        store = await RegistryStore.open(js, settings.kv_bucket)
        champion = (await store.champion(MODEL)).record
        records = await store.versions(MODEL)
        with pytest.raises(RegistryError, match="first champion"):
            await rollback(js, service.publisher, MODEL)
        engine = await js.stream_info("ENGINE", subjects_filter="models.>")
    finally:
        await service.stop()

    decisions = {r.model_version: (r.decision, r.champion_version) for r in registered.items}
    assert decisions == {
        1: ("promoted", None),
        2: ("rejected", 1),
        3: ("promoted", 1),
        4: ("rejected", 3),
    }
    assert "different eval set" in registered.items[3].reason
    assert registered.items[4].event_id == registered.items[2].event_id
    assert [(p.model_version, p.previous_version) for p in promoted.items[:2]] == [
        (1, None),
        (3, 1),
    ]
    assert all(p.event_id == promoted.items[1].event_id for p in promoted.items[2:])
    # The stream kept each decision once: the replay was dropped as a duplicate.
    assert engine.state.subjects == {
        MODELS_REGISTERED.subject(): 4,
        MODELS_PROMOTED.subject(): 2,
        MODELS_ROLLED_BACK.subject(): 1,
    }
    assert letter.service == "model-registry"
    assert letter.error_type == "ValidationError"

    assert not outcome.resumed
    assert (outcome.event.from_version, outcome.event.to_version) == (3, 1)
    assert outcome.event.artifact == _ref(1, "model.onnx")
    assert rolled.items[0].event_id == outcome.event.event_id
    assert champion is not None
    assert (champion.version, champion.history, champion.pending_rollback) == (1, [], None)
    assert [(r.version, r.decision) for r in records] == [
        (1, "promoted"),
        (2, "rejected"),
        (3, "promoted"),
        (4, "rejected"),
    ]
    assert records[2].parent_version == 1


# --- a redelivered training event: what its decision became ----------------------------------


async def _crash_after_recording(
    store: RegistryStore, event: TrainingCompleted, margin: float = 0.02
) -> VersionRecord:
    """What a registry that died between the version record and the champion key leaves."""
    state = await store.champion(event.model_name)
    assert state.record is not None
    champion = await store.version(event.model_name, state.record.version)
    record = register(event, state.record, champion, margin, NOW, state.revision)
    assert await store.add_version(record)
    return record


def _decisions(model: str, decision: str) -> float:
    return _sample("binloop_model_promotions_total", model, "decision", decision) or 0.0


@pytest.mark.integration
async def test_a_replayed_promotion_that_never_took_effect_is_decided_again_not_announced(
    js: JetStreamContext, nats_client: Client, nats_server: NatsServer
) -> None:
    model = "replay-superseded"
    settings = RegistrySettings(
        nats_url=nats_server.url,
        http_port=0,
        retry_delay_s=0.05,
        kv_bucket="registry-replay",
        model_name=model,
    )
    store = await RegistryStore.open_or_create(js, settings.kv_bucket)
    await record_training(store, _completed(4, 0.50, model=model), 0.02, "test")
    v5 = _completed(5, 0.53, parent=4, model=model)
    crashed = await _crash_after_recording(store, v5)
    assert (crashed.decision, crashed.champion_before) == ("promoted", 4)
    rejected_before = _decisions(model, "rejected")

    registered = await Collector(ModelRegistered).attach(nats_client, MODELS_REGISTERED.subject())
    promoted = await Collector(ModelPromoted).attach(nats_client, MODELS_PROMOTED.subject())
    service = create_app(settings)
    await service.start()
    subject = TRAINING_COMPLETED.subject()
    try:
        # v6 is promoted over v4 before v5's training.completed is redelivered.
        await js.publish(
            subject, _completed(6, 0.56, parent=4, model=model).model_dump_json().encode()
        )
        await registered.wait_for(1)
        await js.publish(subject, v5.model_dump_json().encode())
        await registered.wait_for(2)
    finally:
        await service.stop()
    engine = await js.stream_info("ENGINE", subjects_filter=MODELS_PROMOTED.subject())
    last = await js.get_last_msg("ENGINE", MODELS_PROMOTED.subject())
    champion = (await store.champion(model)).record
    record = await store.version(model, 5)

    # Only v6 was announced as champion: bins, trainer and labeling bridge all read v6.
    assert [(p.model_version, p.previous_version) for p in promoted.items] == [(6, 4)]
    assert engine.state.subjects == {MODELS_PROMOTED.subject(): 1}
    assert ModelPromoted.model_validate_json(last.data or b"").model_version == 6
    assert champion is not None
    assert (champion.version, champion.history, champion.promoted_versions) == (6, [4], [4, 6])
    # v5 was decided again against the champion that serves, and the record says so.
    replayed = registered.items[1]
    assert (replayed.model_version, replayed.decision, replayed.champion_version) == (
        5,
        "rejected",
        6,
    )
    assert record is not None
    assert (record.decision, record.champion_before) == ("rejected", 6)
    assert record.reason == replayed.reason
    assert record.reason.startswith(
        "decided again: the promotion over v4 never took effect, the champion became v6 first"
    )
    assert record.superseded is not None
    assert (record.superseded.champion_before, record.superseded.reason) == (4, crashed.reason)
    assert _decisions(model, "rejected") == rejected_before + 1


@pytest.mark.integration
async def test_a_replay_never_undoes_a_rollback_and_a_better_superseded_candidate_still_wins(
    js: JetStreamContext, nats_server: NatsServer
) -> None:
    model, bucket = "replay-kept", "registry-replay-kept"
    store = await RegistryStore.open_or_create(js, bucket)
    v2 = _completed(2, 0.53, parent=1, model=model)
    await record_training(store, _completed(1, 0.50, model=model), 0.02, "test")
    await record_training(store, v2, 0.02, "test")
    async with _operator(nats_server.url) as operator:
        await rollback(operator.js, operator.publisher, model, bucket=bucket)

    # v2's training.completed again, after the rollback to v1 it was decided against.
    after_rollback = await record_training(store, v2, 0.02, "test")
    rolled_back = (await store.champion(model)).record

    # v3 is recorded as promoted over v1, the registry dies; v4 is promoted over v1; then v3
    # is redelivered: decided again, it beats v4 too.
    v3 = _completed(3, 0.60, parent=1, model=model)
    await _crash_after_recording(store, v3)
    await record_training(store, _completed(4, 0.55, parent=1, model=model), 0.02, "test")
    redecided = await record_training(store, v3, 0.02, "test")
    replayed_again = await record_training(store, v3, 0.02, "test")
    champion = (await store.champion(model)).record
    record = await store.version(model, 3)

    assert [type(e) for e in after_rollback] == [ModelRegistered]
    assert rolled_back is not None
    assert (rolled_back.version, rolled_back.promoted_versions) == (1, [1, 2])
    registered, promotion = redecided
    assert isinstance(registered, ModelRegistered)
    assert isinstance(promotion, ModelPromoted)
    assert (registered.decision, registered.champion_version) == ("promoted", 4)
    assert (promotion.model_version, promotion.previous_version) == (3, 4)
    assert replayed_again == redecided  # same events, same ids
    assert champion is not None
    assert (champion.version, champion.history, champion.promoted_versions) == (
        3,
        [1, 4],
        [1, 2, 4, 3],
    )
    assert record is not None
    assert record.superseded is not None
    assert (record.champion_before, record.superseded.champion_before) == (4, 1)
    assert _sample("binloop_model_eval_accuracy_ratio", model, "role", "champion") == 0.60


# --- rollback: announced exactly once, counted by the registry, in the configured bucket -----


class _UnackedPublisher(Publisher):
    """JetStream never confirms: what a rollback sees when the server goes away mid-publish."""

    async def publish(self, route: Route, event: Event, bin_id: str | None = None) -> None:
        raise PublishTimeoutError("JetStream acked 0 of 1 events within 5.0s")


@asynccontextmanager
async def _operator(nats_url: str) -> AsyncIterator[ServiceApp]:
    """What `binloop rollback` runs on: its own connection and publisher."""
    operator = new_service("rollback", ServiceSettings(nats_url=nats_url, http_port=0))
    await operator.broker.connect()
    try:
        yield operator
    finally:
        await operator.broker.stop()


async def _seed(store: RegistryStore, model: str, accuracies: list[float]) -> None:
    """Versions 1..N, each promoted over the one before."""
    for version, accuracy in enumerate(accuracies, start=1):
        await record_training(store, _completed(version, accuracy, model=model), 0.02, "test")


def _sample(name: str, model: str, label: str, value: str) -> float | None:
    return REGISTRY.get_sample_value(name, {"model": model, label: value})


def _rollbacks_counted(model: str) -> float:
    return _sample("binloop_model_promotions_total", model, "decision", "rolled_back") or 0.0


def test_the_registry_exports_each_decision_at_zero_from_its_start() -> None:
    """A counter series born with its first event reads 1 at once, and increase() over it is
    0: the rollback alert and the decisions panel would miss the first rollback."""
    model = f"zero-{uuid.uuid4().hex[:8]}"
    create_app(RegistrySettings(model_name=model, http_port=0))  # connects to nothing
    for decision in ("promoted", "rejected", "rolled_back"):
        assert _sample("binloop_model_promotions_total", model, "decision", decision) == 0.0


@pytest.mark.integration
async def test_a_rollback_whose_publish_failed_is_announced_by_a_retry_not_repeated(
    js: JetStreamContext, nats_server: NatsServer
) -> None:
    bucket = "registry-retry"
    store = await RegistryStore.open_or_create(js, bucket)
    await _seed(store, MODEL, [0.50, 0.53, 0.56])
    async with _operator(nats_server.url) as operator:
        unacked = _UnackedPublisher(operator.broker, "rollback")
        with pytest.raises(RollbackNotAnnouncedError, match="v3 -> v2"):
            await rollback(operator.js, unacked, MODEL, reason="bad in the field", bucket=bucket)
        interrupted = (await store.champion(MODEL)).record
        # Nothing replaces a champion whose rollback the bins have not heard of.
        with pytest.raises(RollbackNotAnnouncedError):
            await record_training(store, _completed(4, 0.9), 0.02, "test")
        retried = await rollback(operator.js, operator.publisher, MODEL, bucket=bucket)
        after_retry = (await store.champion(MODEL)).record
        further = await rollback(operator.js, operator.publisher, MODEL, bucket=bucket)
    engine = await js.stream_info("ENGINE", subjects_filter=MODELS_ROLLED_BACK.subject())
    stored = await js.get_last_msg("ENGINE", MODELS_ROLLED_BACK.subject())

    assert interrupted is not None
    assert interrupted.version == 2
    assert interrupted.pending_rollback is not None
    assert retried.resumed
    assert retried.event == interrupted.pending_rollback  # same event id, same payload
    assert (retried.event.from_version, retried.event.to_version) == (3, 2)
    assert retried.event.reason == "bad in the field"
    assert after_retry is not None
    assert (after_retry.version, after_retry.history) == (2, [1])
    assert after_retry.pending_rollback is None
    # Only the call after that rolls back further, with a new event.
    assert not further.resumed
    assert (further.event.from_version, further.event.to_version) == (2, 1)
    assert further.event.event_id != retried.event.event_id
    assert engine.state.subjects == {MODELS_ROLLED_BACK.subject(): 2}
    assert ModelRolledBack.model_validate_json(stored.data or b"") == further.event


@pytest.mark.integration
async def test_the_registry_counts_rollbacks_and_publishes_an_interrupted_one_at_start(
    js: JetStreamContext, nats_client: Client, nats_server: NatsServer
) -> None:
    model = "rollback-metrics"
    settings = RegistrySettings(
        nats_url=nats_server.url,
        http_port=0,
        retry_delay_s=0.05,
        kv_bucket="registry-metrics",
        model_name=model,
    )
    promoted = await Collector(ModelPromoted).attach(nats_client, MODELS_PROMOTED.subject())
    first = create_app(settings)
    await first.start()
    try:
        for version, accuracy in enumerate([0.50, 0.53, 0.56], start=1):
            event = _completed(version, accuracy, model=model)
            await js.publish(TRAINING_COMPLETED.subject(), event.model_dump_json().encode())
        await promoted.wait_for(3)
    finally:
        await first.stop()
    counted_before = _rollbacks_counted(model)
    assert _sample("binloop_model_eval_accuracy_ratio", model, "role", "champion") == 0.56

    # Both rollbacks happen while the registry is down; the second is never published.
    async with _operator(nats_server.url) as operator:
        done = await rollback(operator.js, operator.publisher, model, bucket=settings.kv_bucket)
        with pytest.raises(RollbackNotAnnouncedError):
            await rollback(
                operator.js,
                _UnackedPublisher(operator.broker, "rollback"),
                model,
                bucket=settings.kv_bucket,
            )
    # Nothing scrapes the rollback command: it sets no metrics, the registry does.
    assert _rollbacks_counted(model) == counted_before
    assert _sample("binloop_model_eval_accuracy_ratio", model, "role", "champion") == 0.56

    rolled = await Collector(ModelRolledBack).attach_stream(js, MODELS_ROLLED_BACK.subject())
    second = create_app(settings)
    await second.start()
    try:
        await rolled.wait_for(2)
        await eventually(lambda: _rollbacks_counted(model) == counted_before + 2)
        store = await RegistryStore.open(js, settings.kv_bucket)
        champion = (await store.champion(model)).record
    finally:
        await second.stop()

    assert rolled.items[0] == done.event
    assert (rolled.items[1].from_version, rolled.items[1].to_version) == (2, 1)
    assert len(rolled.items) == 2
    assert champion is not None
    assert (champion.version, champion.pending_rollback) == (1, None)
    assert _sample("binloop_model_eval_accuracy_ratio", model, "role", "champion") == 0.50


@pytest.mark.integration
def test_the_rollback_command_uses_the_configured_bucket_and_never_creates_one(
    nats_server: NatsServer,
) -> None:
    bucket = "custom-models"

    async def seed() -> None:
        client = await nats.connect(nats_server.url)
        try:
            js = client.jetstream()
            await ensure_streams(js)
            await _seed(await RegistryStore.open_or_create(js, bucket), MODEL, [0.50, 0.53])
        finally:
            await client.drain()

    async def inspect() -> tuple[ChampionRecord | None, list[str]]:
        client = await nats.connect(nats_server.url)
        try:
            js = client.jetstream()
            champion = (await (await RegistryStore.open(js, bucket)).champion(MODEL)).record
            buckets = [s.config.name for s in await js.streams_info() if s.config.name]
        finally:
            await client.drain()
        return champion, buckets

    asyncio.run(seed())
    env = {"BINLOOP_NATS_URL": nats_server.url, "BINLOOP_KV_BUCKET": bucket}
    result = CliRunner().invoke(binloop_cli, ["rollback", "--reason", "field"], env=env)
    missing = CliRunner().invoke(
        binloop_cli, ["rollback"], env={**env, "BINLOOP_KV_BUCKET": "no-such-bucket"}
    )
    champion, streams = asyncio.run(inspect())

    assert result.exit_code == 0, result.output
    assert "back from v2 to v1" in " ".join(result.output.split())
    assert champion is not None
    assert (champion.version, champion.pending_rollback) == (1, None)
    assert missing.exit_code == 1, missing.output
    assert "no registry bucket 'no-such-bucket'" in " ".join(missing.output.split())
    assert f"KV_{bucket}" in streams
    assert "KV_no-such-bucket" not in streams
    assert f"KV_{DEFAULT_KV_BUCKET}" not in streams


# --- the order of promotions and rollbacks, end to end ---------------------------------------


class _HeldPromotions:
    """Holds the registry's publish of models.promoted, after its champion write, until
    `release` is set: the milliseconds a rollback can fall into, made as long as a test needs."""

    def __init__(self, publisher: Publisher) -> None:
        self.reached = asyncio.Event()
        self.release = asyncio.Event()
        self._send_all = publisher.send_all
        publisher.send_all = self.send_all  # type: ignore[method-assign]

    async def send_all(self, outgoing: Sequence[Outgoing]) -> PendingAcks:
        if any(item.route is MODELS_PROMOTED for item in outgoing):
            self.reached.set()
            await self.release.wait()
        return await self._send_all(outgoing)


def _served_by(update: ModelUpdate) -> LoadedModel:
    """What a bin serves after `update`, as update_verdict sees it (no session needed)."""
    card = ModelCard(
        name=update.name,
        version=update.version,
        architecture="stub",
        classes=["glass", "trash"],
        input_size=(8, 8),
        mean=(0.5, 0.5, 0.5),
        std=(0.2, 0.2, 0.2),
        parameters=0,
        created_at=NOW,
    )
    stub = cast(Any, None)
    return LoadedModel(card, stub, stub, update, update.artifact_sha256)


async def _bin_serves(events: Sequence[ModelPromoted | ModelRolledBack]) -> int | None:
    """The version a bin serves after receiving `events` in this order: what the
    edge-inferencer's apply_update does with each, on a real model slot, without downloads."""
    slot = ModelSlot("race-bin")
    for event in events:
        update = update_for(event)
        skipped = update_verdict(slot.current, update)
        if skipped is None:
            skipped = await slot.install(_served_by(update))
        if skipped is not None:
            await slot.acknowledge(update)
    return slot.served[1] if slot.served is not None else None


async def _model_decisions(js: JetStreamContext) -> list[ModelPromoted | ModelRolledBack]:
    """Promotions and rollbacks in the order the ENGINE stream stored them."""
    info = await js.stream_info("ENGINE")
    events: list[ModelPromoted | ModelRolledBack] = []
    for sequence in range(info.state.first_seq, info.state.last_seq + 1):
        try:
            msg = await js.get_msg("ENGINE", sequence)
        except NotFoundError:
            continue
        if msg.subject == MODELS_PROMOTED.subject():
            events.append(ModelPromoted.model_validate_json(msg.data or b""))
        elif msg.subject == MODELS_ROLLED_BACK.subject():
            events.append(ModelRolledBack.model_validate_json(msg.data or b""))
    return events


@pytest.mark.integration
async def test_a_rollback_between_the_champion_write_and_its_publish_wins_on_every_bin(
    js: JetStreamContext, nats_client: Client, nats_server: NatsServer
) -> None:
    model = "race"
    # The registry's host runs a few seconds ahead of the operator's: occurred_at cannot
    # order what the two publish.
    settings = RegistrySettings(
        nats_url=nats_server.url,
        http_port=0,
        retry_delay_s=0.05,
        kv_bucket="registry-race",
        model_name=model,
    )
    service = create_app(settings, clock=lambda: utc_now() + timedelta(seconds=5))
    promoted = await Collector(ModelPromoted).attach(nats_client, MODELS_PROMOTED.subject())
    subject = TRAINING_COMPLETED.subject()
    await service.start()
    try:
        await js.publish(subject, _completed(1, 0.50, model=model).model_dump_json().encode())
        await promoted.wait_for(1)
        held = _HeldPromotions(service.publisher)
        await js.publish(
            subject, _completed(2, 0.53, parent=1, model=model).model_dump_json().encode()
        )
        await asyncio.wait_for(held.reached.wait(), 20)
        async with _operator(nats_server.url) as operator:
            outcome = await rollback(
                operator.js, operator.publisher, model, bucket=settings.kv_bucket
            )
        held.release.set()
        await promoted.wait_for(2)
        store = await RegistryStore.open(js, settings.kv_bucket)
        champion = (await store.champion(model)).record
    finally:
        await service.stop()
    stream = await _model_decisions(js)

    assert champion is not None
    assert (champion.version, champion.pending_rollback) == (1, None)
    assert (outcome.event.from_version, outcome.event.to_version) == (2, 1)
    # The race happened: the promotion the rollback undid is the last event on the stream.
    kinds = [type(e).__name__ for e in stream]
    assert kinds == ["ModelPromoted", "ModelRolledBack", "ModelPromoted"]
    late = stream[2]
    assert isinstance(late, ModelPromoted)
    assert late.model_version == 2
    assert late.occurred_at > outcome.event.occurred_at
    # The registry's order travels with the events: the rollback replaced the revision the
    # promotion wrote.
    assert stream[0].champion_revision == 0
    assert late.champion_revision is not None
    assert outcome.event.champion_revision is not None
    assert outcome.event.champion_revision > late.champion_revision
    # All in the epoch of the one bucket they were decided in: its creation.
    bucket = await js.stream_info(f"KV_{settings.kv_bucket}")
    assert bucket.created is not None
    assert {event.champion_epoch for event in stream} == {bucket.created}
    # In the stream's order, and in any order the bin's two consumers deliver them, a bin
    # ends on the registry's champion.
    assert await _bin_serves(stream) == champion.version
    for order in itertools.permutations(stream):
        assert await _bin_serves(order) == champion.version, order


# --- champion records from before promoted_versions and champion_revision were kept ----------


async def _write_legacy(
    store: RegistryStore, records: list[VersionRecord], champion: ChampionRecord
) -> None:
    """What an older registry left: no champion_revision, promoted_versions, promoted_floor."""
    for record in records:
        await store.kv.put(
            version_key(record.model_name, record.version),
            record.model_dump_json(exclude={"champion_revision"}).encode(),
        )
    await store.kv.put(
        champion_key(champion.model_name),
        champion.model_dump_json(exclude={"promoted_versions", "promoted_floor"}).encode(),
    )


def _legacy_pair(model: str) -> tuple[TrainingCompleted, list[VersionRecord]]:
    """v1 and v2 (promoted over v1), as an older registry recorded them; v2's training event."""
    v1 = register(_completed(1, 0.50, model=model), None, None, 0.02, NOW, 0)
    v2_event = _completed(2, 0.53, parent=1, model=model)
    v2 = register(v2_event, None, v1, 0.02, NOW + timedelta(minutes=1), 0)
    v2 = v2.model_copy(update={"champion_before": 1})
    return v2_event, [v1, v2]


@pytest.mark.integration
async def test_a_redelivery_never_brings_back_a_rolled_back_version_of_an_old_record(
    js: JetStreamContext, nats_server: NatsServer
) -> None:
    bucket = "registry-legacy"
    store = await RegistryStore.open_or_create(js, bucket)
    # Rolled back by this registry, from a champion record an older one wrote.
    v2_event, records = _legacy_pair("legacy-now")
    await _write_legacy(
        store,
        records,
        ChampionRecord(
            model_name="legacy-now",
            version=2,
            history=[1],
            changed_at=NOW + timedelta(minutes=1),
            reason="older registry",
        ),
    )
    async with _operator(nats_server.url) as operator:
        await rollback(operator.js, operator.publisher, "legacy-now", bucket=bucket)
    replayed_now = await record_training(store, v2_event, 0.02, "test")
    champion_now = (await store.champion("legacy-now")).record

    # Rolled back by the older registry itself, before this one ever read the record.
    v2_event_before, records_before = _legacy_pair("legacy-before")
    await _write_legacy(
        store,
        records_before,
        ChampionRecord(
            model_name="legacy-before",
            version=1,
            changed_at=NOW + timedelta(hours=1),
            reason="rollback from v2: field accuracy dropped",
        ),
    )
    replayed_before = await record_training(store, v2_event_before, 0.02, "test")
    champion_before = (await store.champion("legacy-before")).record

    # A promotion an older registry recorded and died before applying is still applied.
    v2_event_crashed, records_crashed = _legacy_pair("legacy-crashed")
    await _write_legacy(
        store,
        records_crashed,
        ChampionRecord(
            model_name="legacy-crashed", version=1, changed_at=NOW, reason="first model"
        ),
    )
    applied = await record_training(store, v2_event_crashed, 0.02, "test")
    champion_crashed = (await store.champion("legacy-crashed")).record

    assert [type(e) for e in replayed_now] == [ModelRegistered]
    assert champion_now is not None
    # Migrated when the rollback read it, and kept through the rollback's write.
    assert (champion_now.version, champion_now.history) == (1, [])
    assert champion_now.promoted_versions == [1, 2]
    assert [type(e) for e in replayed_before] == [ModelRegistered]
    assert champion_before is not None
    assert champion_before.version == 1
    assert [type(e) for e in applied] == [ModelRegistered, ModelPromoted]
    assert champion_crashed is not None
    assert (champion_crashed.version, champion_crashed.promoted_versions) == (2, [1, 2])


def test_promoted_versions_stay_bounded_and_a_dropped_one_is_never_promoted_again() -> None:
    champion: ChampionRecord | None = None
    champion_record: VersionRecord | None = None
    records: list[VersionRecord] = []
    promotions = PROMOTED_VERSIONS_KEPT + 72
    for version in range(1, promotions + 1):
        record = register(
            _completed(version, 0.10 + version * 0.004),
            champion,
            champion_record,
            0.0,
            NOW,
            version,
        )
        champion = pending_promotion(record, champion, version)
        champion_record = record
        records.append(record)
    assert champion is not None
    stored = ChampionRecord.model_validate_json(champion.model_dump_json())
    # An old version, rolled back to: the versions promoted after it left history.
    rolled_back = rolled_back_champion(
        champion,
        rolled_back_event(champion, records[9], "bad", "test", promotions + 1, epoch=None),
    )

    assert len(champion.promoted_versions) == PROMOTED_VERSIONS_KEPT
    assert champion.promoted_versions[0] == promotions - PROMOTED_VERSIONS_KEPT + 1
    assert champion.promoted_versions[-1] == promotions
    assert champion.promoted_floor == promotions - PROMOTED_VERSIONS_KEPT
    assert stored == champion
    assert (rolled_back.version, rolled_back.history) == (10, list(range(1, 10)))
    # v30 served and was dropped from the list: its redelivery is settled, never decided
    # again (it would beat v10 and come back).
    dropped = records[29]
    assert dropped.version not in rolled_back.promoted_versions
    assert replay_state(dropped, rolled_back, promotions + 2) == "settled"
    assert pending_promotion(dropped, rolled_back, promotions + 2) is None
    # One still listed is told apart as before.
    assert replay_state(records[-1], rolled_back, promotions + 2) == "settled"


def test_a_champion_record_without_promoted_versions_is_migrated_on_read() -> None:
    legacy = (
        '{"model_name": "m", "version": 5, "history": [1, 3], '
        '"changed_at": "2025-05-01T12:00:00Z", "reason": "older registry"}'
    )
    record = ChampionRecord.model_validate_json(legacy)
    assert (record.promoted_versions, record.promoted_floor) == ([1, 3, 5], 0)


async def test_the_champion_is_read_with_the_epoch_of_the_bucket_it_came_from(
    js: JetStreamContext, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The bucket is recreated while the champion key is being read: the revision and the
    epoch must both be the new bucket's, or bins would order the decision wrongly."""
    bucket = "registry-recreated-mid-read"
    store = await RegistryStore.open_or_create(js, bucket)
    champion = ChampionRecord(model_name="m", version=1, changed_at=utc_now(), reason="first")
    for _ in range(3):  # the old bucket's champion key is at revision 3
        state = await store.champion("m")
        await store.set_champion(champion, state.revision)
    old_epoch = (await js.stream_info(f"KV_{bucket}")).created
    real_get = store.kv.get
    recreated = False

    async def get_while_recreated(key: str) -> Any:
        nonlocal recreated
        entry = await real_get(key)
        if not recreated:  # the old bucket's entry comes back, then the bucket is gone
            recreated = True
            await js.delete_key_value(bucket)
            await asyncio.sleep(0.01)  # the new bucket gets a later creation time
            fresh = await RegistryStore.open_or_create(js, bucket)
            await fresh.set_champion(champion.model_copy(update={"version": 2}), 0)
        return entry

    monkeypatch.setattr(store.kv, "get", get_while_recreated)
    state = await store.champion("m")

    assert recreated
    assert state.record is not None
    new_epoch = (await js.stream_info(f"KV_{bucket}")).created
    assert new_epoch is not None
    assert old_epoch is not None
    assert new_epoch > old_epoch
    assert (state.record.version, state.revision, state.epoch) == (2, 1, new_epoch)
