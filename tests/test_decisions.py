"""The order of the registry's decisions (binloop.ml.decisions.is_older): by the champion key's
revision within one registry bucket, by the bucket's creation (its epoch) across buckets."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from binloop.ml.decisions import ModelUpdate, is_older

T0 = datetime(2025, 1, 1, tzinfo=UTC)
OLD_BUCKET = datetime(2024, 6, 1, tzinfo=UTC)
NEW_BUCKET = OLD_BUCKET + timedelta(days=30)


def _decision(
    revision: int | None, epoch: datetime | None, issued_at: datetime = T0
) -> ModelUpdate:
    return ModelUpdate("tiny-cnn", 2, issued_at, champion_revision=revision, champion_epoch=epoch)


def test_a_decision_from_a_recreated_bucket_is_newer_whatever_its_revision() -> None:
    installed_by = _decision(7, OLD_BUCKET)
    assert not is_older(_decision(0, NEW_BUCKET), installed_by)
    assert not is_older(_decision(7, NEW_BUCKET), installed_by)


def test_a_decision_from_the_old_bucket_arriving_late_is_older_whatever_its_revision() -> None:
    installed_by = _decision(0, NEW_BUCKET)
    assert is_older(_decision(8, OLD_BUCKET, issued_at=T0 + timedelta(hours=1)), installed_by)


def test_decisions_from_one_bucket_are_ordered_by_revision() -> None:
    installed_by = _decision(5, OLD_BUCKET)
    assert is_older(_decision(4, OLD_BUCKET, issued_at=T0 + timedelta(hours=1)), installed_by)
    assert is_older(_decision(5, OLD_BUCKET), installed_by)
    assert not is_older(_decision(6, OLD_BUCKET, issued_at=T0 - timedelta(hours=1)), installed_by)


def test_without_an_epoch_on_either_side_revisions_order_as_before() -> None:
    # Registries from before the epoch was sent, and bins that recorded a decision then.
    installed_by = _decision(5, None)
    assert is_older(_decision(5, None), installed_by)
    assert is_older(_decision(3, None, T0 + timedelta(hours=1)), installed_by)
    assert not is_older(_decision(6, None, T0 - timedelta(hours=1)), installed_by)


def test_a_decision_without_an_epoch_is_older_than_one_with_whatever_the_revisions() -> None:
    # A bin recorded a decision from before the upgrade: the upgraded registry's next one
    # replaces it, also from a recreated bucket whose revisions started again.
    assert not is_older(_decision(0, NEW_BUCKET), _decision(5, None))
    # A rollback still last on the stream from before the upgrade (revision 10 of the old
    # bucket) does not undo the recreated bucket's promotion when a bin restarts.
    assert is_older(_decision(10, None, T0 + timedelta(hours=1)), _decision(1, NEW_BUCKET))


def test_without_revisions_issue_time_orders_whatever_the_epochs() -> None:
    installed_by = _decision(None, NEW_BUCKET)
    assert is_older(_decision(None, NEW_BUCKET), installed_by)
    assert not is_older(_decision(None, OLD_BUCKET, T0 + timedelta(seconds=1)), installed_by)
    assert not is_older(_decision(3, None, T0 + timedelta(seconds=1)), installed_by)


def test_another_models_decision_is_ordered_by_issue_time() -> None:
    installed_by = _decision(7, NEW_BUCKET)
    other = ModelUpdate(
        "other-model", 1, T0 + timedelta(seconds=1), champion_revision=0, champion_epoch=OLD_BUCKET
    )
    assert not is_older(other, installed_by)
