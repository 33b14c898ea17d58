"""The registry's decisions, pure: promote or reject a candidate, roll the champion back, and
the events each outcome publishes. No bus and no storage here."""

from __future__ import annotations

import re
import uuid
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Literal

from pydantic import AwareDatetime, Field, model_validator

from binloop.errors import PermanentError, TransientError
from schemas.base import BlobRef, Frozen
from schemas.events import (
    ModelMetrics,
    ModelPromoted,
    ModelRegistered,
    ModelRolledBack,
    TrainingCompleted,
)

# Event ids derive from what they announce, so a replayed decision re-publishes the same ids
# and JetStream's duplicate window drops them.
EVENT_NAMESPACE = uuid.UUID("5d1f7a34-8f0e-4b8e-9a57-6c1c0a3b9e21")
KEY_TOKEN = re.compile(r"^[A-Za-z0-9_-]{1,128}$")
# Accuracy arrives as float; 0.52 - 0.50 must count as a gain of 0.02.
EPSILON = 1e-9
PROMOTED_VERSIONS_KEPT = 128
"""Promotions a champion record lists one by one (ChampionRecord.promoted_versions); older
ones are folded into ChampionRecord.promoted_floor."""


class RegistryError(PermanentError):
    """A request the registry can never satisfy as given."""


class RollbackNotAnnouncedError(TransientError):
    """The champion was rolled back but models.rolled_back is not published yet; nothing may
    replace that champion until it is (see ChampionRecord.pending_rollback)."""


class SupersededDecision(Frozen):
    """A decision to promote a version that never took effect: the champion changed before
    the promotion was applied (a crash in between, or another registry or a rollback first)."""

    champion_before: int | None
    champion_revision: int | None
    reason: str
    recorded_at: AwareDatetime


class VersionRecord(Frozen):
    """Everything the registry knows about one model version, and what it decided."""

    model_name: str
    version: int = Field(ge=1)
    parent_version: int | None
    dataset_name: str
    dataset_version: int = Field(ge=1)
    artifact: BlobRef
    card: BlobRef
    metrics: ModelMetrics
    onnx_parity_max_abs_diff: float = Field(ge=0)
    train_seconds: float = Field(ge=0)
    training_event_id: uuid.UUID
    decision: Literal["promoted", "rejected"]
    reason: str
    champion_before: int | None = Field(description="Champion when the decision was made")
    champion_revision: int | None = Field(
        default=None,
        ge=0,
        description="Revision of the champion key the decision was made against (0: no "
        "champion yet). A promotion takes effect only by replacing exactly that revision; "
        "None in records written before it was kept",
    )
    recorded_at: AwareDatetime
    superseded: SupersededDecision | None = Field(
        default=None,
        description="The earlier decision to promote this version that never took effect, "
        "when the champion changed first and the version was decided again against the new one",
    )


class ChampionRecord(Frozen):
    """The version serving now, and the champions before it (oldest first) for rollback."""

    model_name: str
    version: int = Field(ge=1)
    history: list[int] = Field(default_factory=list)
    changed_at: AwareDatetime
    reason: str
    pending_rollback: ModelRolledBack | None = Field(
        default=None,
        description="The rollback that made this champion, until models.rolled_back is "
        "published (an outbox): written with the champion in one compare-and-set, so a "
        "rollback whose publish failed is announced again, with the same event id, instead "
        "of being lost or repeated one version further back",
    )
    promoted_versions: list[int] = Field(
        default_factory=list,
        description="The last versions a promotion made champion (at most "
        "PROMOTED_VERSIONS_KEPT), oldest first. Unlike history, rollbacks never remove one: a "
        "redelivered training event tells by it a promotion that took effect (never to be "
        "applied again) from one that never did",
    )
    promoted_floor: int = Field(
        default=0,
        ge=0,
        description="The highest version dropped from promoted_versions to keep it bounded: a "
        "promotion of a version at or below it counts as one that took effect",
    )

    @model_validator(mode="before")
    @classmethod
    def _migrate_and_bound(cls, data: Any) -> Any:
        """Records written before promoted_versions was kept get it from what they still
        know (every version in history, and the champion); a longer list keeps its last
        PROMOTED_VERSIONS_KEPT and folds the rest into promoted_floor.

        Why the bound is safe: the list only tells a promotion that took effect and was
        replaced since ("settled") from one the champion replaced before it took effect
        ("superseded", decided again); a promotion not applied yet is told by the champion
        key's revision alone (see replay_state). Counting a dropped version as taken effect
        can therefore never apply or announce a promotion; at worst a candidate no newer
        than one promoted PROMOTED_VERSIONS_KEPT promotions ago, whose promotion never took
        effect, is not decided again when its training event is redelivered. Versions are
        claimed in increasing order and redeliveries come within minutes, so such a
        candidate is long obsolete; deciding it again could only bring back an old model.
        """
        if not isinstance(data, dict) or "version" not in data:
            return data
        if "promoted_versions" not in data:
            known = [*data.get("history", []), data["version"]]
            data = {**data, "promoted_versions": list(dict.fromkeys(known))}
        promoted = list(data["promoted_versions"])
        if len(promoted) > PROMOTED_VERSIONS_KEPT:
            dropped = promoted[:-PROMOTED_VERSIONS_KEPT]
            floor = max(int(data.get("promoted_floor", 0)), *(int(v) for v in dropped))
            data = {
                **data,
                "promoted_versions": promoted[-PROMOTED_VERSIONS_KEPT:],
                "promoted_floor": floor,
            }
        return data


@dataclass(frozen=True)
class Decision:
    promoted: bool
    reason: str


def key_token(model_name: str) -> str:
    """A model name as a key-value key token (no dots, spaces or wildcards)."""
    if not KEY_TOKEN.match(model_name):
        raise RegistryError(f"model name {model_name!r} is not usable as a registry key")
    return model_name


def decide(candidate: ModelMetrics, champion: VersionRecord | None, margin: float) -> Decision:
    """Promote the first model; afterwards only a candidate measured on the champion's eval set
    whose accuracy beats the champion's by at least `margin`."""
    if champion is None:
        return Decision(True, "first model: no champion yet")
    ours, theirs = candidate, champion.metrics
    if ours.eval_set_id != theirs.eval_set_id:
        return Decision(
            False,
            f"evaluated on a different eval set ({ours.eval_set_id[:12]}) than champion "
            f"v{champion.version} ({theirs.eval_set_id[:12]}); accuracies are not comparable",
        )
    gain = ours.accuracy - theirs.accuracy
    comparison = (
        f"accuracy {ours.accuracy:.4f} vs champion v{champion.version} {theirs.accuracy:.4f} "
        f"(gain {gain:+.4f}, margin {margin:.4f})"
    )
    if gain + EPSILON >= margin:
        # A negative margin lets a slightly worse candidate through: say so.
        verdict = "beats the champion" if gain + EPSILON >= 0 else "within the margin"
        return Decision(True, f"{verdict}: {comparison}")
    return Decision(False, f"not better by the margin: {comparison}")


def register(
    event: TrainingCompleted,
    champion: ChampionRecord | None,
    champion_record: VersionRecord | None,
    margin: float,
    now: datetime,
    champion_revision: int,
    superseded: VersionRecord | None = None,
) -> VersionRecord:
    """The record of a candidate, with the decision against the current champion (at
    `champion_revision` of its key). `superseded`: this version's earlier record, whose
    promotion never took effect; it is decided again and the record keeps what it replaced."""
    key_token(event.model_name)
    decision = decide(event.metrics, champion_record, margin)
    reason = decision.reason
    earlier = None
    if superseded is not None:
        earlier = SupersededDecision(
            champion_before=superseded.champion_before,
            champion_revision=superseded.champion_revision,
            reason=superseded.reason,
            recorded_at=superseded.recorded_at,
        )
        reason = (
            f"decided again: the promotion over {_version_label(superseded.champion_before)} "
            "never took effect, the champion became "
            f"{_version_label(champion.version if champion else None)} first; {reason}"
        )
    return VersionRecord(
        model_name=event.model_name,
        version=event.model_version,
        parent_version=event.parent_version,
        dataset_name=event.dataset_name,
        dataset_version=event.dataset_version,
        artifact=event.artifact,
        card=event.card,
        metrics=event.metrics,
        onnx_parity_max_abs_diff=event.onnx_parity_max_abs_diff,
        train_seconds=event.train_seconds,
        training_event_id=event.event_id,
        decision="promoted" if decision.promoted else "rejected",
        reason=reason[:512],
        champion_before=champion.version if champion else None,
        champion_revision=champion_revision,
        recorded_at=now,
        superseded=earlier,
    )


def _version_label(version: int | None) -> str:
    return "no champion" if version is None else f"v{version}"


def took_effect(record: VersionRecord, champion: ChampionRecord | None) -> bool:
    """Whether `record`'s version was made champion, whatever happened since: it serves,
    served before (history), or a promotion made it champion (promoted_versions, or at or
    below promoted_floor; see ChampionRecord._migrate_and_bound)."""
    if champion is None:
        return False
    return (
        record.version == champion.version
        or record.version in champion.promoted_versions
        or record.version <= champion.promoted_floor
        or record.version in champion.history
    )


ReplayState = Literal["settled", "unfinished", "superseded"]


def replay_state(
    record: VersionRecord, champion: ChampionRecord | None, champion_revision: int
) -> ReplayState:
    """Where a recorded decision stands, given the champion key now (at `champion_revision`).

    settled: rejected, or its promotion took effect; nothing is left to do.
    unfinished: a promotion over exactly the champion it was decided against, not applied yet
    (the record is written before the champion key, and a crash may fall in between): apply it.
    superseded: a promotion that never took effect and whose champion was replaced meanwhile;
    the decision compared against a model that no longer serves: decide again.

    Records written before champion_revision was kept cannot tell a promotion that took
    effect and was rolled back since from one that never took effect: such a record is
    unfinished only while the champion is the one it was decided against and unchanged since
    (changed_at not after the decision), and otherwise settled, never decided again: a
    rolled-back version must not come back, and a lost old candidate costs nothing.
    """
    if record.decision != "promoted":
        return "settled"
    if record.champion_revision is not None:
        # The revision, not the version: a champion that changed and came back (a rollback)
        # was announced after this decision, and announcing the decision now would lose to it.
        # Unchanged, the key cannot hold this promotion (applying it writes the key).
        if champion_revision == record.champion_revision:
            return "unfinished"
        return "settled" if took_effect(record, champion) else "superseded"
    if took_effect(record, champion):
        return "settled"
    if champion is None:
        unchanged = record.champion_before is None
    else:
        unchanged = (
            champion.version == record.champion_before and champion.changed_at <= record.recorded_at
        )
    return "unfinished" if unchanged else "settled"


def pending_promotion(
    record: VersionRecord, champion: ChampionRecord | None, champion_revision: int
) -> ChampionRecord | None:
    """The champion `record` makes, if it is promoted and not applied yet, to be written over
    `champion_revision` (see replay_state)."""
    if replay_state(record, champion, champion_revision) != "unfinished":
        return None
    return ChampionRecord(
        model_name=record.model_name,
        version=record.version,
        history=[*champion.history, champion.version] if champion else [],
        changed_at=record.recorded_at,
        reason=record.reason,
        promoted_versions=[*(champion.promoted_versions if champion else []), record.version],
        promoted_floor=champion.promoted_floor if champion else 0,
    )


def check_replay(existing: VersionRecord, event: TrainingCompleted) -> None:
    """A redelivery of the same training run is fine; another run claiming the version is not."""
    if existing.training_event_id != event.event_id:
        raise RegistryError(
            f"{event.model_name} v{event.model_version} is already recorded from training event "
            f"{existing.training_event_id}; refusing a second one ({event.event_id})"
        )


def _event_id(*parts: object, epoch: datetime | None) -> uuid.UUID:
    # Versions and revisions start again in a recreated bucket: its creation time (`epoch`)
    # keeps its events' ids apart from the old bucket's, which JetStream's duplicate window
    # would otherwise drop as repeats.
    if epoch is not None:
        parts = (*parts, epoch.isoformat())
    return uuid.uuid5(EVENT_NAMESPACE, "/".join(str(p) for p in parts))


def _decision_event_id(record: VersionRecord, kind: str, epoch: datetime | None) -> uuid.UUID:
    # A decision made again (against another champion revision) is another event, which
    # JetStream's duplicate window must not drop.
    if record.superseded is None:
        return _event_id(record.model_name, record.version, kind, epoch=epoch)
    return _event_id(record.model_name, record.version, kind, record.champion_revision, epoch=epoch)


def registration_events(
    record: VersionRecord,
    producer: str,
    champion_version: int | None,
    *,
    champion_epoch: datetime | None,
) -> list[ModelRegistered | ModelPromoted]:
    """What the decision announces; the same record always yields the same events (ids).

    models.promoted is announced only while `record` is the champion (`champion_version`):
    the last promotion on the stream is what bins, the trainer and the labeling bridge take
    for the champion, so a replayed promotion that never took effect, or that a later
    promotion or rollback replaced, must not become it.

    Writing the champion and publishing its event are two steps, so a rollback that reads
    the new champion in between publishes models.rolled_back first, and the older promotion
    lands after it on the stream. Neither the stream's order nor occurred_at (stamped by the
    registry's clock here and the operator's in `binloop rollback`) can order the two, but
    the champion key's revision can: every change of a champion is a compare-and-set over
    the key's current revision, so each change replaces a larger revision than the change
    before it. Both events carry the revision their change replaced (`champion_revision`;
    here the one the decision was made against, which is the one its promotion replaced),
    and a consumer ignores an event whose revision is not above the one it applied last
    (binloop.ml.decisions.is_older, applied by bins, the trainer and the labeling bridge):
    whatever the order of arrival, each ends on the registry's champion.

    Revisions count within the bucket the record lives in; `champion_epoch`, its creation
    (see ChampionState.epoch), puts a recreated bucket's decisions after the old one's.
    """
    registered = ModelRegistered(
        event_id=_decision_event_id(record, "registered", champion_epoch),
        occurred_at=record.recorded_at,
        producer=producer,
        model_name=record.model_name,
        model_version=record.version,
        metrics=record.metrics,
        champion_version=record.champion_before,
        decision=record.decision,
        reason=record.reason,
    )
    if record.decision == "rejected" or champion_version != record.version:
        return [registered]
    promoted = ModelPromoted(
        event_id=_decision_event_id(record, "promoted", champion_epoch),
        occurred_at=record.recorded_at,
        producer=producer,
        model_name=record.model_name,
        model_version=record.version,
        previous_version=record.champion_before,
        artifact=record.artifact,
        card=record.card,
        metrics=record.metrics,
        reason=record.reason,
        champion_revision=record.champion_revision,
        champion_epoch=champion_epoch,
    )
    return [registered, promoted]


def rollback_target(champion: ChampionRecord | None, to_version: int | None) -> int:
    """The version a rollback makes champion: the given one, or the champion before this one."""
    if champion is None:
        raise RegistryError("there is no champion to roll back")
    if to_version is None:
        if not champion.history:
            raise RegistryError(
                f"{champion.model_name} v{champion.version} is the first champion; "
                "there is nothing earlier to roll back to"
            )
        return champion.history[-1]
    if to_version == champion.version:
        raise RegistryError(f"{champion.model_name} v{to_version} is already the champion")
    return to_version


def rolled_back_champion(champion: ChampionRecord, event: ModelRolledBack) -> ChampionRecord:
    """The champion after the rollback `event` announces, with `event` pending until it is
    published. Rolling back to an earlier champion forgets the ones after it; any other
    recorded version goes on top of the current history."""
    target = event.to_version
    if target in champion.history:
        history = champion.history[: champion.history.index(target)]
    else:
        history = [*champion.history, champion.version]
    return ChampionRecord(
        model_name=champion.model_name,
        version=target,
        history=history,
        changed_at=event.occurred_at,
        reason=f"rollback from v{champion.version}: {event.reason}"[:512],
        pending_rollback=event,
        promoted_versions=champion.promoted_versions,
        promoted_floor=champion.promoted_floor,
    )


def ensure_announced(champion: ChampionRecord | None) -> None:
    """Refuses to build on a champion whose rollback the bins have not heard of yet: replacing
    it would drop the pending event (the bins would never learn of the rollback) or publish it
    after what replaced it."""
    if champion is not None and champion.pending_rollback is not None:
        pending = champion.pending_rollback
        raise RollbackNotAnnouncedError(
            f"{champion.model_name} was rolled back v{pending.from_version} -> "
            f"v{pending.to_version} and models.rolled_back is not published yet"
        )


def rolled_back_event(
    champion: ChampionRecord,
    target: VersionRecord,
    reason: str,
    producer: str,
    revision: int,
    *,
    epoch: datetime | None,
) -> ModelRolledBack:
    """The announcement of rolling `champion` back to `target`. `revision` (the champion
    key's revision being replaced, in the bucket created at `epoch`) gives each rollback its
    own event id and orders it after the promotion it undoes (see registration_events); a
    retry republishes the one kept in ChampionRecord.pending_rollback rather than building a
    new one."""
    return ModelRolledBack(
        event_id=_event_id(champion.model_name, "rollback", revision, target.version, epoch=epoch),
        producer=producer,
        model_name=champion.model_name,
        from_version=champion.version,
        to_version=target.version,
        artifact=target.artifact,
        card=target.card,
        reason=reason[:512],
        champion_revision=revision,
        champion_epoch=epoch,
    )
