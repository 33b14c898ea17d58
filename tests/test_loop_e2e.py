"""The whole loop on a small replay, every service real, one nats-server: the shipped model
imported as champion and served from the first frame, a retrained candidate decided on by the
registry; or, with no start model, a first model trained on the seed set and a retrained one
promoted and served. No frame lost or handled twice."""

from __future__ import annotations

from pathlib import Path

import pytest

from binloop.embedded import LoopConfig, run_loop
from binloop.monitor import LoopStats

pytestmark = [pytest.mark.e2e, pytest.mark.integration]


def _assert_every_frame_handled_once(stats: LoopStats) -> None:
    assert stats.frames_captured > 0
    assert stats.lost() == {"inferred": 0, "actuated": 0, "stored": 0}
    assert stats.duplicates() == {"inferred": 0, "actuated": 0, "stored": 0}
    assert stats.labels > 0
    assert sum(stats.dead_letters.values()) == 0


async def test_the_shipped_champion_serves_from_the_first_frame_and_judges_a_retrained_one(
    tmp_path: Path,
) -> None:
    config = LoopConfig(
        data_dir=tmp_path / "run",
        fps=40,
        snapshot_every=30,
        frames_on_new_model=30,
        timeout_s=600,
        # No retrained candidate can gain a whole 1.0 of accuracy: the test does not depend on
        # how good the shipped model is, and covers the common outcome, a rejection.
        overrides={"model-registry": {"promotion_margin": 1.0}},
    )
    outcome = await run_loop(config)
    stats = outcome.stats

    assert outcome.finished, outcome.reason
    assert outcome.reason.startswith("retrained candidate v2 rejected (not better by the margin")
    assert stats.registered[0] == (1, "promoted", "first model: no champion yet")
    assert stats.trainings[0][0] == 1  # the imported model, announced like a trained one
    assert (2, "rejected") in [(v, decision) for v, decision, _ in stats.registered]
    assert stats.promoted == [1]
    assert outcome.champion_version == 1
    # The imported champion served every frame, the first one included.
    assert dict(stats.served_versions) == {1: stats.frames_captured}
    assert len(stats.snapshots) >= 1
    _assert_every_frame_handled_once(stats)


async def test_without_a_start_model_the_loop_closes_with_a_retrained_model_served(
    tmp_path: Path,
) -> None:
    config = LoopConfig(
        data_dir=tmp_path / "run",
        fps=40,
        snapshot_every=30,
        frames_on_new_model=30,
        timeout_s=600,
        start_model=None,
        # Whether a model retrained on a few dozen photos beats the seed model is luck (and when
        # none does before the replay's new frames run out, the loop never closes): promote every
        # candidate, so the test covers the rollout itself.
        overrides={"model-registry": {"promotion_margin": -1.0}},
    )
    outcome = await run_loop(config)
    stats = outcome.stats

    assert outcome.finished, outcome.reason
    assert "promoted and served" in outcome.reason
    assert outcome.champion_version is not None
    assert outcome.champion_version >= 2
    assert len(stats.promoted) >= 2
    newer = [v for v in stats.served_versions if v >= 2]
    assert newer, f"served only {dict(stats.served_versions)}"
    assert len(stats.snapshots) >= 2
    _assert_every_frame_handled_once(stats)
