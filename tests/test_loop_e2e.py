"""The whole loop on a small replay, every service real, one nats-server: frames in -> a
retrained model promoted and served by the edge inferencer; no frame lost or handled twice."""

from __future__ import annotations

from pathlib import Path

import pytest

from binloop.embedded import LoopConfig, run_loop

pytestmark = [pytest.mark.e2e, pytest.mark.integration]


async def test_the_loop_closes_with_a_retrained_model_served(tmp_path: Path) -> None:
    config = LoopConfig(
        data_dir=tmp_path / "run",
        fps=40,
        snapshot_every=30,
        frames_on_new_model=30,
        timeout_s=600,
    )
    outcome = await run_loop(config)
    stats = outcome.stats

    assert outcome.finished, outcome.reason
    assert outcome.champion_version is not None
    assert outcome.champion_version >= 2
    assert len(stats.promoted) >= 2
    newer = [v for v in stats.served_versions if v >= 2]
    assert newer, f"served only {dict(stats.served_versions)}"
    assert stats.frames_captured > 0
    assert stats.lost() == {"inferred": 0, "actuated": 0, "stored": 0}
    assert stats.duplicates() == {"inferred": 0, "actuated": 0, "stored": 0}
    assert stats.labels > 0
    assert len(stats.snapshots) >= 2
    assert sum(stats.dead_letters.values()) == 0
