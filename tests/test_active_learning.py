"""Active-learning strategies on hand-made results, the weighted combiner, pHash and the
near-duplicate filter, per-bin rate limits per hour and per day on an injected clock, the YAML
policy and its errors, and the edge inferencer filling InferenceResult.embedding."""

from __future__ import annotations

import gc
import hashlib
import math
import tracemalloc
import uuid
import weakref
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import numpy.typing as npt
import pytest
from pydantic import ValidationError

from binloop.ml.card import ModelCard
from binloop.ml.phash import hamming, phash
from binloop.ml.preprocess import FloatArray, Preprocessor
from schemas.base import BlobRef
from schemas.events import (
    ClassScore,
    FrameCaptured,
    InferenceResult,
    SamplingStrategy,
    StageLatency,
)
from schemas.taxonomy import Compartment, Taxonomy
from services.edge_inferencer.core import DecisionPolicy, build_events, classify
from services.edge_inferencer.models import LoadedModel
from services.sampler import strategies as strategies_module
from services.sampler.core import (
    Candidate,
    Sampler,
    Weighted,
    build_sampler,
    build_strategies,
    combine,
)
from services.sampler.dedup import NearDuplicateFilter
from services.sampler.policy import PolicyError, SamplingPolicy, load_policy, main, parse_policy
from services.sampler.ratelimit import DAY_S, HOUR_S, RateLimits
from services.sampler.strategies import (
    ClassBalance,
    Disagreement,
    Diversity,
    Entropy,
    LeastConfidence,
    Margin,
    Representative,
    ThresholdBand,
    Verdict,
    k_center_greedy,
    k_means,
    nearest_center_distance,
    typicality,
)
from tests.modelfactory import make_card
from tests.test_sampler import CAPTURED_AT, LABELS, FakeClock, frame_sha, make_result

REPO = Path(__file__).resolve().parents[1]
DEMO = REPO / "data" / "demo" / "eval"


def result_from(
    probabilities: dict[str, float],
    n: int = 1,
    *,
    model_version: int = 1,
    bin_id: str = "bin-a",
    embedding: list[float] | None = None,
    num_classes: int | None = len(LABELS),
) -> InferenceResult:
    """A result for a hand-made distribution over LABELS (missing classes get 0), decided with
    a confidence threshold of 0.5; `num_classes` is the class count the edge reports."""
    full = {label: probabilities.get(label, 0.0) for label in LABELS}
    ranked = sorted(full.items(), key=lambda item: -item[1])
    positive = [p for p in full.values() if p > 0]
    return InferenceResult(
        producer="edge-inferencer",
        bin_id=bin_id,
        frame_sha256=frame_sha(n),
        frame_event_id=str(uuid.uuid4()),
        captured_at=CAPTURED_AT,
        model_name="mobilenet",
        model_version=model_version,
        label=ranked[0][0],
        confidence=ranked[0][1],
        margin=ranked[0][1] - ranked[1][1],
        entropy=-sum(p * math.log(p) for p in positive),
        top_k=[ClassScore(label=label, probability=p) for label, p in ranked[: num_classes or 16]],
        compartment=Compartment.PLASTIC_METAL,
        abstained=ranked[0][1] < 0.5,
        latency=StageLatency(
            read_ms=0.1, decode_ms=1.0, preprocess_ms=0.5, infer_ms=3.0, postprocess_ms=0.1
        ),
        embedding=embedding,
        num_classes=num_classes,
        confidence_threshold=0.5,
    )


def policy(
    strategies: dict[str, dict[str, object]] | None = None, **rest: object
) -> SamplingPolicy:
    """Every strategy off unless `strategies` turns it on."""
    chosen: dict[str, dict[str, object]] = {
        name: {"enabled": False}
        for name in (
            "least_confidence",
            "margin",
            "entropy",
            "threshold_band",
            "class_balance",
            "diversity",
            "disagreement",
            "random",
        )
    }
    chosen.update(strategies or {})
    return SamplingPolicy.model_validate({"strategies": chosen, **rest})


# --- per-frame strategies -------------------------------------------------------------------


def test_margin_scores_close_calls_between_the_two_best_classes() -> None:
    strategy = Margin(0.2)
    close = strategy.score(result_from({"plastic": 0.45, "glass": 0.40, "paper": 0.15}))
    assert close is not None
    assert close.score == pytest.approx(0.95)
    assert close.reason == "margin 0.05 < 0.20"
    assert strategy.score(result_from({"plastic": 0.65, "glass": 0.35})) is None


def test_entropy_is_normalised_by_the_number_of_classes() -> None:
    strategy = Entropy(min_normalized=0.5)
    uniform = strategy.score(result_from(dict.fromkeys(LABELS, 1 / 6)))
    assert uniform is not None
    assert uniform.score == pytest.approx(1.0)
    two_way = strategy.score(result_from({"plastic": 0.5, "glass": 0.5}))
    assert two_way is None  # ln 2 / ln 6 = 0.39 < 0.5
    assert Entropy(0.3).score(result_from({"plastic": 0.5, "glass": 0.5})) == Verdict(
        pytest.approx(math.log(2) / math.log(6)), "entropy 0.39 of max >= 0.30"
    )


def test_entropy_is_normalised_by_the_class_count_each_result_carries() -> None:
    # The same distribution from a model of 6 classes and from one of 3 (missing classes at 0):
    # each is divided by its own ln(classes); nothing in the policy has to match either model.
    spread = {"plastic": 0.5, "glass": 0.3, "paper": 0.2}
    six, three = result_from(spread, 1), result_from(spread, 2, num_classes=3)
    entropy = -sum(p * math.log(p) for p in spread.values())
    verdicts = Entropy(0.5).score_batch([six, three])
    assert [v.score if v else None for v in verdicts] == [
        pytest.approx(entropy / math.log(6)),
        pytest.approx(entropy / math.log(3)),
    ]
    # An older edge does not say: the frame is not judged by entropy rather than misjudged.
    assert Entropy(0.0).score(result_from(spread, 3, num_classes=None)) is None


def test_threshold_band_peaks_at_the_decision_threshold() -> None:
    band = ThresholdBand(half_width=0.1)
    at = band.score(make_result(1, 0.5))
    near = band.score(make_result(2, 0.55))
    assert at is not None
    assert near is not None
    assert at.score == pytest.approx(1.0)
    assert near.score == pytest.approx(0.5)
    assert near.reason == "confidence 0.55 within 0.10 of the edge's threshold 0.50"
    assert band.score(make_result(3, 0.65)) is None
    assert band.score(make_result(4, 0.3)) is None


def test_threshold_band_follows_the_threshold_each_result_was_decided_with() -> None:
    band = ThresholdBand(half_width=0.1)
    # Two bins at the same confidence, one with the threshold raised to 0.7.
    default, raised = make_result(1, 0.7), make_result(2, 0.7, bin_id="bin-b", threshold=0.7)
    verdicts = band.score_batch([default, raised])
    assert verdicts[0] is None  # 0.2 from its threshold 0.5
    assert verdicts[1] is not None
    assert verdicts[1].score == pytest.approx(1.0)
    assert verdicts[1].reason.endswith("of the edge's threshold 0.70")
    older_edge = make_result(3, 0.5).model_copy(update={"confidence_threshold": None})
    assert band.score(older_edge) is None


# --- stateful strategies --------------------------------------------------------------------


def test_class_balance_gives_rare_classes_more_and_counts_picks_within_a_batch() -> None:
    balance = ClassBalance({"trash": 3.0}, default_quota=1.0, window=100)
    trash = [make_result(n, 0.9, label="trash") for n in range(10)]
    plastic = make_result(50, 0.9, label="plastic")
    verdicts = balance.score_batch([plastic, *trash])
    # Six classes, trash at 3/8 of the target, everything at 1/6 before any selection:
    # plastic (target 1/8) is over its quota, trash under it by 1 - (1/6)/(3/8).
    assert verdicts[0] is None
    first = verdicts[1]
    assert first is not None
    assert first.score == pytest.approx(1 - (1 / 6) / (3 / 8))
    assert first.reason == "class trash at 17% of recent selections, quota 38%"
    # (k + 1) / (k + 6) reaches 3/8 at the third trash frame of the batch: two pass.
    assert [v is not None for v in verdicts[1:]] == [True, True] + [False] * 8

    for result in trash[:2]:
        balance.record(result)
    assert balance.score_batch(trash[2:3]) == [None]  # at quota now
    for n in range(10):
        balance.record(make_result(100 + n, 0.9, label="plastic"))
    assert balance.score_batch(trash[2:3])[0] is not None  # plastic grew, trash lags again


def test_class_balance_window_forgets_old_selections() -> None:
    balance = ClassBalance({}, window=10)
    for n in range(10):
        balance.record(make_result(n, 0.9, label="glass"))
    assert balance.share("glass")[0] == pytest.approx(11 / 11)
    for n in range(10):
        balance.record(make_result(20 + n, 0.9, label="paper"))
    assert balance.share("glass")[0] == pytest.approx(1 / 12)


def test_k_center_greedy_picks_the_farthest_points_until_they_get_close() -> None:
    candidates = np.array([[1.0, 0.01], [0.0, 1.0], [-1.0, 0.0], [0.7071, 0.7071]])
    candidates /= np.linalg.norm(candidates, axis=1, keepdims=True)
    centers = np.array([[1.0, 0.0]])
    picks = k_center_greedy(candidates, centers, k=3, min_distance=0.2)
    assert [index for index, _ in picks] == [2, 1]
    assert [distance for _, distance in picks] == pytest.approx([1.0, 0.5])
    # Without a floor the third pick is the diagonal, 0.146 from (0, 1).
    third = k_center_greedy(candidates, centers, k=3, min_distance=0.0)[2]
    assert third == (3, pytest.approx((1 - 0.7071) / 2, abs=1e-3))
    assert k_center_greedy(candidates[:0], centers, k=3, min_distance=0.0) == []


def test_diversity_spreads_picks_per_model_and_remembers_what_was_selected() -> None:
    diversity = Diversity(per_batch=2, min_distance=0.1)
    east, north, east_again = [1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.99, 0.05, 0.0]
    batch = [
        make_result(1, 0.9),  # no embedding: diversity cannot judge it
        result_from({"plastic": 0.9, "glass": 0.1}, 2, embedding=east),
        result_from({"plastic": 0.9, "glass": 0.1}, 3, embedding=east_again),
        result_from({"plastic": 0.9, "glass": 0.1}, 4, embedding=north),
    ]
    verdicts = diversity.score_batch(batch)
    assert verdicts[0] is None
    assert verdicts[1] is not None
    assert verdicts[1].reason == "first pick in this model's embedding space (k-center greedy)"
    assert verdicts[2] is None  # right next to the first pick
    assert verdicts[3] is not None
    assert verdicts[3].score == pytest.approx(0.5)

    diversity.record(batch[1])
    later = diversity.score_batch([result_from({"plastic": 0.9}, 5, embedding=[0.98, 0.0, 0.1])])
    assert later == [None]  # close to a selection of this model
    other_model = diversity.score_batch(
        [result_from({"plastic": 0.9}, 5, model_version=2, embedding=[0.98, 0.0, 0.1])]
    )
    assert other_model[0] is not None  # v2's embedding space has no centers yet


def _blobs(sizes: list[int], seed: int = 3) -> tuple[npt.NDArray[np.float64], list[int]]:
    """Tight clusters around orthogonal directions in 8-d, and the blob of each point."""
    rng = np.random.default_rng(seed)
    points, blob = [], []
    for index, size in enumerate(sizes):
        center = np.zeros(8)
        center[index] = 1.0
        points.append(center + rng.normal(0, 0.05, size=(size, 8)))
        blob += [index] * size
    return np.concatenate(points), blob


def test_k_means_finds_separated_blobs_and_typicality_prefers_dense_points() -> None:
    points, blob = _blobs([40, 25, 10])
    clusters = k_means(points, 3, seed=0)
    assert len(set(clusters.tolist())) == 3
    for index in range(3):  # each blob is one cluster
        members = {int(c) for c, b in zip(clusters, blob, strict=True) if b == index}
        assert len(members) == 1
    assert k_means(points, 3, seed=0).tolist() == clusters.tolist()  # seeded
    assert len(k_means(points[:2], 5, seed=0)) == 2  # k above the count: one per point

    outlier = np.zeros((1, 8))
    outlier[0, 0] = 1.6  # along blob 0's direction, far out
    dense = typicality(np.concatenate([points[:40], outlier]), neighbours=10)
    assert int(np.argmin(dense)) == 40
    assert typicality(points[:1], neighbours=10).tolist() == [1.0]


def test_representative_picks_typical_frames_of_uncovered_clusters_largest_first() -> None:
    points, blob = _blobs([40, 25, 10])
    results = [
        result_from({"plastic": 0.9, "glass": 0.1}, n, embedding=points[n].tolist())
        for n in range(len(points))
    ]
    batch = [make_result(999, 0.9), *results]  # one result without an embedding
    verdicts = Representative(per_batch=3, neighbours=10, seed=0).score_batch(batch)
    assert verdicts[0] is None
    ranked = sorted(
        ((v.score, i - 1) for i, v in enumerate(verdicts) if v is not None), reverse=True
    )
    picked = [i for _, i in ranked]
    assert [blob[i] for i in picked] == [0, 1, 2]  # one per region, the largest first
    assert [score for score, _ in ranked] == pytest.approx([1.0, 2 / 3, 1 / 3])
    first = verdicts[picked[0] + 1]
    assert first is not None
    assert first.reason == "most typical of an uncovered cluster of 40 frames (k-means, k=3)"
    # The pick is the densest frame of its blob (on unit vectors, as the strategy sees them).
    unit = points / np.linalg.norm(points, axis=1, keepdims=True)
    dense = typicality(unit, neighbours=10)[:40]
    assert picked[0] == int(np.argmax(dense))

    representative = Representative(per_batch=2, neighbours=10, seed=0)
    representative.record(results[picked[0]])  # blob 0 is covered now
    later = representative.score_batch(results)
    assert sorted(blob[i] for i, v in enumerate(later) if v is not None) == [1, 2]
    other_model = representative.score_batch(
        [
            result_from({"plastic": 0.9}, n, model_version=2, embedding=points[n].tolist())
            for n in range(0, 75, 15)
        ]
    )
    assert any(v is not None for v in other_model)  # v2's space has nothing covered yet
    # Fewer than 2 x per_batch frames say nothing about where the mass is: no verdicts.
    assert representative.score_batch(results[:3]) == [None] * 3


def test_disagreement_needs_a_second_model_on_the_same_frame() -> None:
    disagreement = Disagreement(min_disagreement=0.2)
    champion = result_from({"plastic": 0.8, "glass": 0.2}, 7, model_version=3)
    challenger = result_from({"glass": 0.7, "plastic": 0.3}, 7, model_version=4)
    agreeing = result_from({"plastic": 0.75, "glass": 0.25}, 8, model_version=4)
    assert disagreement.score_batch([champion]) == [None]  # nobody to disagree with yet
    assert disagreement.score_batch([champion]) == [None]  # a redelivery is not a second model
    (verdict,) = disagreement.score_batch([challenger])
    assert verdict is not None
    assert verdict.score == pytest.approx(0.5)
    assert verdict.reason == "v4 says glass 0.70, v3 says plastic 0.80: distance 0.50"
    assert disagreement.score_batch(
        [result_from({"plastic": 0.8, "glass": 0.2}, 8, model_version=3), agreeing]
    ) == [None, None]


def test_disagreement_keeps_the_top_k_of_each_answer_not_the_result() -> None:
    disagreement = Disagreement(min_disagreement=0.2)
    champion = result_from({"plastic": 0.8, "glass": 0.2}, 7, model_version=3, embedding=[0.5] * 64)
    assert disagreement.score_batch([champion]) == [None]
    gone = weakref.ref(champion)
    del champion
    gc.collect()
    assert gone() is None
    (verdict,) = disagreement.score_batch(
        [result_from({"glass": 0.7, "plastic": 0.3}, 7, model_version=4)]
    )
    assert verdict is not None
    assert verdict.reason == "v4 says glass 0.70, v3 says plastic 0.80: distance 0.50"


def test_disagreement_keeps_the_last_few_versions_of_a_frame_and_the_last_frames() -> None:
    disagreement = Disagreement(min_disagreement=0.2, remember=2)
    kept = Disagreement.versions_per_frame
    assert disagreement.score_batch([result_from({"glass": 1.0}, 7, model_version=1)]) == [None]
    for version in range(2, kept + 2):  # agree with each other, not with v1
        disagreement.score_batch([result_from({"plastic": 1.0}, 7, model_version=version)])
    # v1 has been pushed out of frame 7's answers: nobody left to disagree with.
    newest = result_from({"plastic": 1.0}, 7, model_version=kept + 2)
    assert disagreement.score_batch([newest]) == [None]

    disagreement.score_batch([result_from({"glass": 1.0}, n, model_version=1) for n in (8, 9)])
    # Frame 7 was the least recently answered of the three: forgotten.
    late = result_from({"glass": 1.0}, 7, model_version=1)
    assert disagreement.score_batch([late]) == [None]
    (verdict,) = disagreement.score_batch([result_from({"plastic": 1.0}, 9, model_version=2)])
    assert verdict is not None
    assert verdict.score == pytest.approx(1.0)


def test_disagreement_keeps_about_a_kib_per_frame_answered_twice() -> None:
    # It kept the whole InferenceResult: about 10 KiB per answer with a 128-d embedding.
    rng = np.random.default_rng(0)
    batches = [
        [
            result_from(
                dict(zip(LABELS, rng.dirichlet(np.ones(6)).tolist(), strict=True)),
                n,
                model_version=version,
                embedding=rng.normal(size=128).tolist(),
            )
            for n in range(300)
        ]
        for version in (1, 2)
    ]
    disagreement = Disagreement(min_disagreement=0.2)
    gc.collect()
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        for batch in batches:
            disagreement.score_batch(batch)
        gc.collect()
        kept = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    assert kept / 300 < 2048


# --- embeddings with NaN or infinity ---------------------------------------------------------


def _non_finite(result: InferenceResult, value: float) -> InferenceResult:
    """A result the schema would reject, as a bug or a model_construct could still make."""
    embedding = list(result.embedding or [])
    embedding[1] = value
    return result.model_copy(update={"embedding": embedding})


@pytest.mark.parametrize("value", [math.nan, math.inf])
def test_diversity_and_representative_skip_embeddings_that_are_not_finite(value: float) -> None:
    east, north, west = [1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [-1.0, 0.0, 0.0]
    clean = [
        result_from({"plastic": 0.9, "glass": 0.1}, n, embedding=vector)
        for n, vector in enumerate([east, north, west])
    ]
    poisoned = _non_finite(result_from({"plastic": 0.9}, 9, embedding=[0.0, 0.0, 1.0]), value)

    diversity = Diversity(per_batch=3, min_distance=0.1)
    expected = Diversity(per_batch=3, min_distance=0.1).score_batch(clean)
    verdicts = diversity.score_batch([poisoned, *clean])
    assert verdicts == [None, *expected]
    assert all(v is not None and math.isfinite(v.score) for v in expected)
    diversity.record(poisoned)  # selected by another strategy: its embedding is not kept
    assert diversity.score_batch(clean) == expected

    points, _ = _blobs([10, 10])
    blobs = [
        result_from({"plastic": 0.9}, 100 + n, embedding=point.tolist())
        for n, point in enumerate(points)
    ]
    representative = Representative(per_batch=2, neighbours=5, seed=0)
    expected = Representative(per_batch=2, neighbours=5, seed=0).score_batch(blobs)
    assert any(v is not None for v in expected)
    assert representative.score_batch([poisoned, *blobs]) == [None, *expected]
    representative.record(poisoned)
    assert representative.score_batch(blobs) == expected


class _NaNScores:
    """A strategy gone wrong: it wants every frame with a score of NaN."""

    name: SamplingStrategy = "diversity"

    def score_batch(self, results: Sequence[InferenceResult]) -> list[Verdict | None]:
        return [Verdict(math.nan, "broken") for _ in results]

    def record(self, result: InferenceResult) -> None:
        return None


def test_a_nan_score_does_not_drop_a_frame_other_strategies_want() -> None:
    sampler = Sampler(
        [Weighted(LeastConfidence(0.6), 1.0), Weighted(_NaNScores(), 1.0)],
        RateLimits.per_hour_and_day(100, 100, FakeClock()),
        "sampler",
        min_score=0.1,
    )
    (selection,) = sampler.select_batch([make_result(1, 0.3), make_result(2, 0.9)]).selected
    assert (selection.frame_sha256, selection.strategy) == (frame_sha(1), "least_confidence")
    assert selection.score == pytest.approx(0.7)
    assert "broken" not in selection.reason


# --- memory and time bounds ------------------------------------------------------------------


def test_blocked_distances_equal_the_whole_matrices(monkeypatch: pytest.MonkeyPatch) -> None:
    rng = np.random.default_rng(5)
    points = rng.normal(size=(23, 6))
    unit = points / np.linalg.norm(points, axis=1, keepdims=True)
    centers = unit[15:].astype(np.float32)
    whole = (
        nearest_center_distance(unit[:15], centers),
        typicality(points, neighbours=4),
        k_means(points, 5, seed=1),
    )
    monkeypatch.setattr(strategies_module, "BLOCK_ELEMENTS", 7)  # blocks of 1 or 2 rows
    blocked = (
        nearest_center_distance(unit[:15], centers),
        typicality(points, neighbours=4),
        k_means(points, 5, seed=1),
    )
    expected = ((1 - unit[:15] @ centers.T.astype(np.float64)) / 2).min(axis=1)
    assert blocked[0] == pytest.approx(expected)
    assert blocked[0] == pytest.approx(whole[0])
    assert blocked[1] == pytest.approx(whole[1])
    assert blocked[2].tolist() == whole[2].tolist()


def test_embedding_memory_keeps_the_last_picks_of_each_space_as_float32() -> None:
    diversity = Diversity(per_batch=1, min_distance=0.0, remember=100)
    for n in range(250):
        angle = n / 250 * math.pi
        result = result_from({"plastic": 1.0}, n, embedding=[math.cos(angle), math.sin(angle)])
        diversity.record(result)
    kept = diversity.memory.earlier(("mobilenet", 1), 2)
    assert kept.dtype == np.float32
    assert kept.shape == (100, 2)
    angles = np.sort(np.arctan2(kept[:, 1], kept[:, 0]))
    assert angles == pytest.approx([n / 250 * math.pi for n in range(150, 250)], abs=1e-6)
    assert diversity.memory.earlier(("mobilenet", 1), 3).shape == (0, 3)


@pytest.mark.parametrize(
    ("strategy", "largest"),
    [("diversity", 10_000), ("representative", 1000), ("disagreement", 100_000)],
)
def test_remember_is_bounded_by_what_one_batch_can_compute(strategy: str, largest: int) -> None:
    parse_policy(f"strategies: {{{strategy}: {{remember: {largest}}}}}\n")
    with pytest.raises(PolicyError) as caught:
        parse_policy(f"strategies: {{{strategy}: {{remember: {largest + 1}}}}}\n")
    assert (
        f"strategies.{strategy}.remember: Input should be less than or equal to {largest}"
        in str(caught.value)
    )


# --- combining strategies -------------------------------------------------------------------


def test_combine_sums_weighted_scores_and_credits_the_largest_contribution() -> None:
    candidate = combine(
        [
            ("least_confidence", 1.0, Verdict(0.3, "confidence 0.70 < 0.80")),
            ("diversity", 2.0, Verdict(0.25, "far")),
        ],
        random_verdict=Verdict(0.0, "random"),
        min_score=0.5,
    )
    assert candidate == Candidate(
        strategy="diversity",
        score=pytest.approx(0.8),
        reason="diversity 0.50: far; least_confidence 0.30: confidence 0.70 < 0.80",
        informative=True,
    )
    weak = [("margin", 1.0, Verdict(0.3, "margin 0.70 < 0.80"))]
    assert combine(weak, None, min_score=0.5) is None
    fallback = combine(weak, Verdict(0.0, "random baseline: draw 0.010 < 0.050"), 0.5)
    assert fallback == Candidate(
        "random", 0.0, "random baseline: draw 0.010 < 0.050", informative=False
    )
    long = combine([("margin", 1.0, Verdict(0.9, "x" * 600))], None, 0.0)
    assert long is not None
    assert len(long.reason) == 512
    assert long.reason.endswith("...")


def test_sampler_keeps_the_best_candidates_when_the_limit_bites() -> None:
    sampler = build_sampler(
        policy(
            strategies={
                "least_confidence": {"threshold": 0.9, "weight": 1.0},
                "margin": {"enabled": True, "threshold": 0.5, "weight": 2.0},
                "random": {"fraction": 1.0},
            },
            rate_limits={"per_bin_per_hour": 2, "per_bin_per_day": 10},
        ),
        "sampler",
        FakeClock(),
    )
    easy = make_result(1, 0.97)  # only the random baseline wants it
    unsure = result_from({"plastic": 0.45, "glass": 0.40, "paper": 0.15}, 2)
    mildly = result_from({"plastic": 0.8, "glass": 0.2}, 3)
    outcome = sampler.select_batch([easy, mildly, unsure])
    assert [s.frame_sha256 for s in outcome.selected] == [frame_sha(2), frame_sha(3)]
    first, second = outcome.selected
    assert first.strategy == "margin"
    assert first.score == pytest.approx(0.55 + 2 * 0.95)
    assert first.reason.startswith("margin 1.90: margin 0.05 < 0.50; least_confidence 0.55:")
    assert second.strategy == "least_confidence"  # 0.8 margin is above 0.5: margin is silent
    assert outcome.rate_limited == {"bin-a": 1}


def test_frames_below_min_score_are_counted_and_not_selected() -> None:
    sampler = build_sampler(
        policy(min_score=0.5, strategies={"least_confidence": {"threshold": 0.8}}),
        "sampler",
        FakeClock(),
    )
    outcome = sampler.select_batch([make_result(1, 0.7), make_result(2, 0.3), make_result(3, 0.9)])
    assert [s.frame_sha256 for s in outcome.selected] == [frame_sha(2)]
    assert outcome.below_min_score == {"bin-a": 1}


def test_default_policy_runs_every_strategy_on_a_realistic_batch() -> None:
    sampler = build_sampler(SamplingPolicy(), "sampler", FakeClock())
    rng = np.random.default_rng(0)
    batch = [
        result_from(
            dict(zip(LABELS, rng.dirichlet(np.ones(6) * 0.5), strict=True)),
            n,
            embedding=rng.normal(size=8).tolist(),
        )
        for n in range(200)
    ]
    outcome = sampler.select_batch(batch)
    strategies = {s.strategy for s in outcome.selected}
    assert {"least_confidence", "diversity"} <= strategies
    assert len(outcome.selected) < len(batch)
    for selection in outcome.selected:
        assert selection.reason.startswith(selection.strategy) or selection.strategy == "random"


# --- pHash and near-duplicates ---------------------------------------------------------------


def demo_image(label: str, index: int = 0) -> npt.NDArray[np.uint8]:
    path = sorted((DEMO / label).glob("*.jpg"))[index]
    return np.asarray(cv2.cvtColor(cv2.imread(str(path)), cv2.COLOR_BGR2RGB), dtype=np.uint8)


def test_phash_survives_reencoding_and_light_changes_but_tells_items_apart() -> None:
    image = demo_image("glass")
    original = phash(image)
    assert len(original) == 16
    assert int(original, 16) >= 0
    _, jpeg = cv2.imencode(".jpg", image, [cv2.IMWRITE_JPEG_QUALITY, 40])
    recoded = cv2.imdecode(jpeg, cv2.IMREAD_COLOR)
    brighter = np.clip(image.astype(np.int16) + 25, 0, 255).astype(np.uint8)
    resized = cv2.resize(image, (80, 60), interpolation=cv2.INTER_AREA)
    assert hamming(original, phash(recoded)) <= 4
    assert hamming(original, phash(brighter)) <= 4
    assert hamming(original, phash(resized)) <= 6
    assert phash(image) == original
    others = [phash(demo_image(label)) for label in ("cardboard", "metal", "paper", "trash")]
    assert min(hamming(original, other) for other in others) > 12
    assert phash(np.zeros((4, 3))) == phash(np.zeros((40, 30)))  # tiny images still hash
    with pytest.raises(ValueError, match="expected an H x W"):
        phash(np.zeros(10))


def test_near_duplicates_are_dropped_before_they_cost_any_rate_limit() -> None:
    hashes = {
        frame_sha(1): "f0f0f0f0f0f0f0f0",
        frame_sha(2): "f0f0f0f0f0f0f0f3",  # 2 bits from frame 1
        frame_sha(3): "0f0f0f0f0f0f0f0f",
        frame_sha(4): "not-a-hash",
    }
    sampler = build_sampler(
        policy(
            strategies={"least_confidence": {"threshold": 0.6}},
            dedup={"max_hamming": 2, "per_bin": True},
            rate_limits={"per_bin_per_hour": 4, "per_bin_per_day": 4},
        ),
        "sampler",
        FakeClock(),
        hash_source=lambda result: hashes.get(result.frame_sha256),
    )
    batch = [make_result(n, 0.3) for n in range(1, 6)]  # frame 5 has no hash at all
    batch.append(make_result(2, 0.3, bin_id="bin-b"))  # other bin: not compared
    outcome = sampler.select_batch(batch)
    assert [(s.bin_id, s.frame_sha256) for s in outcome.selected] == [
        ("bin-a", frame_sha(1)),
        ("bin-a", frame_sha(3)),
        ("bin-a", frame_sha(4)),
        ("bin-a", frame_sha(5)),
        ("bin-b", frame_sha(2)),
    ]
    assert outcome.near_duplicates == {"bin-a": 1}
    assert outcome.rate_limited == {}  # the duplicate did not use bin-a's 4th slot


def test_near_duplicate_filter_across_bins_and_its_memory_bound() -> None:
    shared = NearDuplicateFilter(lambda r: None, max_hamming=0, remember=2, per_bin=False)
    shared.add("bin-a", 1)
    assert shared.duplicate_of("bin-b", 1) == (0, "0000000000000001")
    shared.add("bin-a", 2)
    shared.add("bin-a", 3)  # pushes 1 out
    assert shared.duplicate_of("bin-a", 1) is None
    assert shared.duplicate_of("bin-a", 3) == (0, "0000000000000003")


# --- rate limits ----------------------------------------------------------------------------


def test_rate_limits_per_hour_and_per_day_on_an_injected_clock() -> None:
    clock = FakeClock()
    limits = RateLimits.per_hour_and_day(per_hour=2, per_day=3, clock=clock)
    hourly, daily = limits.limiters
    assert limits.try_acquire("bin-a")
    assert limits.try_acquire("bin-a")
    assert not limits.try_acquire("bin-a")
    assert limits.blocking("bin-a") is hourly
    assert limits.try_acquire("bin-b")  # per bin

    clock.now += HOUR_S
    assert limits.try_acquire("bin-a")  # a new hour, the day's third
    assert not limits.try_acquire("bin-a")
    assert limits.blocking("bin-a") is daily  # the hour has room, the day has not

    clock.now += HOUR_S
    assert not limits.try_acquire("bin-a")  # refused by the day, and it did not use the hour
    clock.now = 1000.0 + DAY_S  # the first two grants are a day old now
    assert limits.try_acquire("bin-a")
    assert limits.try_acquire("bin-a")
    assert not limits.try_acquire("bin-a")


def test_the_sampler_counts_day_limited_candidates() -> None:
    clock = FakeClock()
    sampler: Sampler = build_sampler(
        policy(
            strategies={"least_confidence": {"threshold": 0.6}},
            rate_limits={"per_bin_per_hour": 2, "per_bin_per_day": 3},
        ),
        "sampler",
        clock,
    )
    assert len(sampler.select_batch([make_result(n, 0.3) for n in range(3)]).selected) == 2
    clock.now += HOUR_S
    later = sampler.select_batch([make_result(n, 0.3) for n in range(10, 13)])
    assert len(later.selected) == 1
    assert later.rate_limited == {"bin-a": 2}


# --- the YAML policy ------------------------------------------------------------------------


def test_the_example_policy_file_documents_the_defaults() -> None:
    example = REPO / "services" / "sampler" / "policy.example.yaml"
    assert load_policy(example) == SamplingPolicy()
    assert parse_policy("") == SamplingPolicy()
    strategies = [w.strategy.name for w in build_strategies(SamplingPolicy())]
    assert strategies == [
        "least_confidence",
        "threshold_band",
        "class_balance",
        "diversity",
    ]
    # It needs a shadow inferencer, which nothing runs yet: it would cost memory for nothing.
    assert not SamplingPolicy().strategies.disagreement.enabled


def test_the_cold_start_policy_file_runs_representative_and_the_random_baseline_only() -> None:
    policy = load_policy(REPO / "services" / "sampler" / "policy.cold-start.yaml")
    strategies = [w.strategy.name for w in build_strategies(policy)]
    assert strategies == ["representative"]
    representative = policy.strategies.representative
    assert (representative.per_batch, representative.remember) == (4, 1000)
    assert policy.strategies.random.enabled
    assert policy.strategies.random.fraction == SamplingPolicy().strategies.random.fraction
    assert policy.dedup == SamplingPolicy().dedup
    assert policy.rate_limits == SamplingPolicy().rate_limits


def test_a_policy_setting_what_each_result_now_carries_is_refused_saying_why() -> None:
    # The policy used to repeat the edge's threshold and the model's class count; a file that
    # still sets them would otherwise look as if it changed something.
    text = "num_classes: 6\nstrategies:\n  threshold_band: {decision_threshold: 0.5}\n"
    with pytest.raises(PolicyError) as caught:
        parse_policy(text, "policy.yaml")
    message = str(caught.value)
    assert message.startswith("policy.yaml: 2 errors\n")
    assert (
        "  num_classes: Extra inputs are not permitted (removed: each inference result carries "
        "the class count of the model that scored it)"
    ) in message
    assert (
        "  strategies.threshold_band.decision_threshold: Extra inputs are not permitted "
        "(removed: each inference result carries the confidence_threshold the edge decided with)"
    ) in message


def test_policy_errors_name_every_bad_key() -> None:
    text = (
        "strategies:\n"
        "  margin: {treshold: 0.2}\n"
        "  least_confidence: {threshold: 1.5}\n"
        "  class_balance: {quotas: {Trash: 2.0}}\n"
        "dedup: {max_hamming: 65}\n"
    )
    with pytest.raises(PolicyError) as caught:
        parse_policy(text, "policy.yaml")
    message = str(caught.value)
    assert message.startswith("policy.yaml: 4 errors\n")
    assert "strategies.margin.treshold: Extra inputs are not permitted" in message
    assert "strategies.least_confidence.threshold: Input should be less than or equal to 1" in (
        message
    )
    assert "strategies.class_balance.quotas.Trash.[key]: String should match pattern" in message
    assert "dedup.max_hamming: Input should be less than or equal to 64" in message


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("- a\n- b\n", "expected a mapping at the top, got list"),
        ("strategies: {margin: [1, 2\n", "not valid YAML"),
        ("version: 2\n", "version: Input should be 1"),
        (
            "rate_limits: {per_bin_per_hour: 100, per_bin_per_day: 50}\n",
            "per_bin_per_day (50) is below per_bin_per_hour (100)",
        ),
        ("strategies: {diversity: {weight: 0}}\n", "weight: Input should be greater than 0"),
    ],
)
def test_policy_rejects_bad_files_with_a_clear_message(text: str, expected: str) -> None:
    with pytest.raises(PolicyError, match=expected.replace("(", r"\(").replace(")", r"\)")):
        parse_policy(text)


def test_validate_config_exits_0_or_1_with_the_errors(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    good = tmp_path / "good.yaml"
    good.write_text("strategies: {margin: {enabled: true}}\n")
    bad = tmp_path / "bad.yaml"
    bad.write_text("rate_limits: {per_hour: 5}\n")
    assert main(["--validate-config", str(good)]) == 0
    assert capsys.readouterr().out == f"{good}: valid\n"
    assert main(["--validate-config", str(bad)]) == 1
    assert "rate_limits.per_hour: Extra inputs are not permitted" in capsys.readouterr().err
    assert main(["--validate-config", str(tmp_path / "missing.yaml")]) == 1
    assert "cannot read" in capsys.readouterr().err


# --- the edge inferencer's embedding --------------------------------------------------------


class EmbeddingBackend:
    """A backend whose model exposes an 'embedding' output of a chosen width."""

    def __init__(self, dims: int) -> None:
        self.dims = dims
        self._card = make_card(LABELS)
        self.passes = 0

    @property
    def card(self) -> ModelCard:
        return self._card

    def predict(self, batch: FloatArray) -> FloatArray:
        probabilities = np.full((len(batch), len(LABELS)), 0.02, dtype=np.float32)
        probabilities[:, 4] = 0.9
        return probabilities

    def embed(self, batch: FloatArray) -> FloatArray | None:
        return np.arange(len(batch) * self.dims, dtype=np.float32).reshape(len(batch), self.dims)

    def predict_with_embedding(self, batch: FloatArray) -> tuple[FloatArray, FloatArray | None]:
        self.passes += 1
        return self.predict(batch), self.embed(batch)


@pytest.mark.parametrize(("dims", "expected"), [(16, 16), (2048, None)])
def test_edge_results_carry_the_model_embedding_when_it_fits_the_schema(
    dims: int, expected: int | None
) -> None:
    backend = EmbeddingBackend(dims)
    model = LoadedModel(backend.card, backend, Preprocessor.from_card(backend.card))
    data = (sorted((DEMO / "plastic").glob("*.jpg"))[0]).read_bytes()
    outcome = classify(lambda: data, model, DecisionPolicy(Taxonomy(), 0.5, 3))
    sha = hashlib.sha256(data).hexdigest()
    frame = FrameCaptured(
        producer="frame-ingestor",
        bin_id="bin-a",
        frame_sha256=sha,
        spool=BlobRef(key=f"spool/{sha}.jpg", uri=f"file:///spool/{sha}.jpg", sha256=sha, size=1),
        captured_at=CAPTURED_AT,
        width=160,
        height=120,
        source="test",
        sequence=0,
    )
    result, _ = build_events(frame, model, outcome, "edge-inferencer")
    assert backend.passes == 1  # probabilities and embedding from one pass
    if expected is None:
        assert outcome.embedding is None  # too wide for InferenceResult: left off
        assert result.embedding is None
    else:
        assert result.embedding == [float(v) for v in range(expected)]


def _edge_result(
    model: LoadedModel, data: bytes, bin_id: str = "bin-a", threshold: float = 0.5
) -> InferenceResult:
    """What the edge inferencer publishes for these JPEG bytes, deciding with `threshold`."""
    sha = hashlib.sha256(data).hexdigest()
    frame = FrameCaptured(
        producer="frame-ingestor",
        bin_id=bin_id,
        frame_sha256=sha,
        spool=BlobRef(key=f"spool/{sha}.jpg", uri=f"file:///spool/{sha}.jpg", sha256=sha, size=1),
        captured_at=CAPTURED_AT,
        width=160,
        height=120,
        source="test",
        sequence=0,
    )
    outcome = classify(lambda: data, model, DecisionPolicy(Taxonomy(), threshold, 3))
    return build_events(frame, model, outcome, "edge-inferencer")[0]


def test_the_sampler_judges_edge_results_by_the_threshold_and_classes_they_carry() -> None:
    backend = EmbeddingBackend(8)  # plastic at 0.9, the five other classes at 0.02
    model = LoadedModel(backend.card, backend, Preprocessor.from_card(backend.card))
    first, second = (p.read_bytes() for p in sorted((DEMO / "plastic").glob("*.jpg"))[:2])
    default = _edge_result(model, first, threshold=0.5)
    raised = _edge_result(model, second, bin_id="bin-b", threshold=0.85)
    assert (default.confidence_threshold, raised.confidence_threshold) == (0.5, 0.85)
    assert default.num_classes == raised.num_classes == len(backend.card.classes)

    sampler = build_sampler(
        policy(
            strategies={
                "threshold_band": {"enabled": True, "half_width": 0.1},
                "entropy": {"enabled": True, "min_normalized": 0.0},
            },
            dedup={"enabled": False},
        ),
        "sampler",
        FakeClock(),
    )
    outcome = sampler.select_batch([default, raised])

    by_frame = {s.frame_sha256: s for s in outcome.selected}
    assert by_frame.keys() == {default.frame_sha256, raised.frame_sha256}
    # Only the bin whose edge decides at 0.85 has its 0.9 in the band.
    assert by_frame[raised.frame_sha256].strategy == "threshold_band"
    assert "of the edge's threshold 0.85" in by_frame[raised.frame_sha256].reason
    assert "threshold_band" not in by_frame[default.frame_sha256].reason
    # Entropy by the model's own six classes: 0.9 and five times 0.02.
    expected = -(0.9 * math.log(0.9) + 5 * 0.02 * math.log(0.02)) / math.log(6)
    assert by_frame[default.frame_sha256].strategy == "entropy"
    assert by_frame[default.frame_sha256].score == pytest.approx(expected, abs=1e-6)


def test_the_sampler_drops_near_duplicates_by_the_phash_the_edge_computed() -> None:
    backend = EmbeddingBackend(8)
    model = LoadedModel(backend.card, backend, Preprocessor.from_card(backend.card))
    glass = (sorted((DEMO / "glass").glob("*.jpg"))[0]).read_bytes()
    # The same item again, re-encoded: other bytes (another sha256), nearly the same pixels.
    decoded = cv2.imdecode(np.frombuffer(glass, np.uint8), cv2.IMREAD_COLOR)
    recoded = cv2.imencode(".jpg", decoded, [cv2.IMWRITE_JPEG_QUALITY, 50])[1].tobytes()
    metal = (sorted((DEMO / "metal").glob("*.jpg"))[0]).read_bytes()
    batch = [_edge_result(model, data) for data in (glass, recoded, metal)]
    assert all(result.phash is not None for result in batch)
    assert batch[0].frame_sha256 != batch[1].frame_sha256

    sampler = build_sampler(  # the default hash source: InferenceResult.phash
        policy(strategies={"least_confidence": {"threshold": 1.0}}, dedup={"max_hamming": 6}),
        "sampler",
        FakeClock(),
    )
    outcome = sampler.select_batch(batch)

    assert [s.frame_sha256 for s in outcome.selected] == [
        batch[0].frame_sha256,
        batch[2].frame_sha256,
    ]
    assert outcome.near_duplicates == {"bin-a": 1}


def test_a_phash_that_is_not_16_hex_digits_is_rejected_by_the_schema() -> None:
    fields = make_result(1, 0.5).model_dump()
    assert InferenceResult.model_validate({**fields, "phash": "0123456789abcdef"}).phash
    for bad in ("0123456789ABCDEF", "0123", "0123456789abcdefg", "xyz"):
        with pytest.raises(ValidationError, match="phash"):
            InferenceResult.model_validate({**fields, "phash": bad})


def test_phash_takes_the_median_of_the_ac_terms_as_numpy_does() -> None:
    # phash picks the median by a partial sort; it must be np.median's value exactly.
    rng = np.random.default_rng(7)
    for _ in range(50):
        image = rng.integers(0, 256, size=(120, 160, 3), dtype=np.uint8)
        gray = cv2.cvtColor(image.astype(np.float32), cv2.COLOR_RGB2GRAY)
        small = cv2.resize(gray, (32, 32), interpolation=cv2.INTER_AREA)
        low = cv2.dct(small)[:8, :8].ravel()
        expected = np.packbits(low > np.median(low[1:])).tobytes().hex()
        assert phash(image) == expected


def _al_benchmark() -> Any:
    """tools/al_benchmark.py as a module (tools/ is not a package)."""
    import importlib.util
    import sys

    path = Path(__file__).resolve().parents[1] / "tools" / "al_benchmark.py"
    spec = importlib.util.spec_from_file_location("al_benchmark", path)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("al_benchmark", module)
    spec.loader.exec_module(module)
    return module


def test_every_benchmark_arm_runs_exactly_the_strategies_it_names() -> None:
    # A strategy left at its default `enabled: false` would silently fall back to random.
    benchmark = _al_benchmark()
    expected = {
        "random": set(),
        "combined": {"margin", "diversity", "class_balance"},
        "representative_margin": {"representative", "margin"},
    }
    for arm in benchmark.STRATEGIES:
        policy = benchmark.benchmark_policy(arm, budget=20, seed=0)
        running = {weighted.strategy.name for weighted in build_strategies(policy)}
        assert running == expected.get(arm, {arm}), arm
        assert policy.strategies.random.fraction == 1.0  # the baseline fills what is left


def test_benchmark_cold_start_lets_the_strategy_pick_the_first_labels() -> None:
    """The `tiny` protocol starts with no labels: the head predicts every class equally and
    the first round goes through the real sampler, where `representative` takes one typical
    frame from each cluster of the embeddings (three tight clusters here)."""
    benchmark = _al_benchmark()
    rng = np.random.default_rng(0)
    centres = np.eye(3, 8) * 10
    per_cluster = 12
    features = np.concatenate([centre + rng.normal(size=(per_cluster, 8)) for centre in centres])
    labels = np.repeat(np.arange(3), per_cluster)
    count = len(labels)
    data = benchmark.Dataset(
        classes=["cardboard", "glass", "metal"],
        files=[Path(f"{i}.jpg") for i in range(count)],
        labels=labels.astype(np.int64),
        is_test=np.arange(count) % 4 == 0,
        is_pool=np.arange(count) % 4 != 0,
        features=features,
        sha256=[hashlib.sha256(str(i).encode()).hexdigest() for i in range(count)],
        phash=[f"{rng.integers(0, 2**63):016x}" for _ in range(count)],
    )
    untrained = benchmark.SoftmaxRegression(3).fit(features[:0], labels[:0])
    assert np.allclose(untrained.predict_proba(features), 1 / 3)

    for seed in range(5):
        run = benchmark.simulate(data, "representative", seed, seed_size=0, budget=3, rounds=1)
        assert run.labels == [0, 3]
        assert run.accuracy[1] == 1.0  # one label per cluster separates the three
    random_runs = [benchmark.simulate(data, "random", seed, 0, 3, 1) for seed in range(5)]
    assert min(run.accuracy[1] for run in random_runs) < 1.0  # chance misses a cluster
