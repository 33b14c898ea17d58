"""The registry's decisions on which model is champion (models.promoted, models.rolled_back)
and their order, the one rule every follower of the champion applies (the edge, the trainer,
the labeling bridge's ML backend)."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from schemas.events import ModelPromoted, ModelRolledBack


@dataclass(frozen=True)
class ModelUpdate:
    """A registry decision to serve (name, version), issued at `issued_at`."""

    name: str
    version: int
    issued_at: datetime
    rollback: bool = False
    artifact_sha256: str | None = None
    """sha256 of the ONNX file the decision names (its BlobRef's); None when unknown."""
    champion_revision: int | None = None
    """The registry's order of its decisions (the events' champion_revision); None from
    registries before it was sent."""
    champion_epoch: datetime | None = None
    """When the registry's bucket that counts champion_revision was created (the events'
    champion_epoch); None from registries before it was sent."""


def is_older(update: ModelUpdate, installed_by: ModelUpdate) -> bool:
    """Whether the registry decided `update` no later than the decision `installed_by`.

    By the champion key's revision when both carry one (for the same model): it orders the
    registry's decisions whatever the order they arrive in and whatever the clocks of the
    machines that stamped them (the registry's, an operator's running `binloop rollback`);
    see services.model_registry.core.registration_events. Otherwise by issue time.

    Revisions count within one registry bucket, and a recreated bucket counts from the start
    again: when the epochs (the bucket's creation) differ, the later bucket's decision is the
    newer one, whatever the revisions. A decision without an epoch comes from a registry (or a
    `binloop rollback`) from before it was sent, so it is older than any decision with one: a
    rollback still last on the stream from before the upgrade must not undo the promotions of
    a recreated bucket when a bin restarts. Without an epoch on both sides, revisions compare
    as they are.

    A follower records every decision that is not older as the one on record, also one that
    names the model it already follows (a rollback to it): a promotion whose publish that
    rollback overtook is then older, and skipped."""
    if (
        update.name == installed_by.name
        and update.champion_revision is not None
        and installed_by.champion_revision is not None
    ):
        epoch, installed_epoch = update.champion_epoch, installed_by.champion_epoch
        if epoch == installed_epoch:  # one bucket (or no epoch on either side)
            return update.champion_revision <= installed_by.champion_revision
        if epoch is None or installed_epoch is None:
            return epoch is None
        return epoch < installed_epoch
    return update.issued_at <= installed_by.issued_at


def update_for(event: ModelPromoted | ModelRolledBack) -> ModelUpdate:
    """The registry event as the decision it announces."""
    if isinstance(event, ModelRolledBack):
        return ModelUpdate(
            event.model_name,
            event.to_version,
            event.occurred_at,
            rollback=True,
            artifact_sha256=event.artifact.sha256,
            champion_revision=event.champion_revision,
            champion_epoch=event.champion_epoch,
        )
    return ModelUpdate(
        event.model_name,
        event.model_version,
        event.occurred_at,
        artifact_sha256=event.artifact.sha256,
        champion_revision=event.champion_revision,
        champion_epoch=event.champion_epoch,
    )
