"""The sampler's decisions for a batch of inference results. No bus here.

Every enabled strategy judges the whole batch (the batch is the candidate window diversity
needs). A frame's combined score is the sum of weight x score over the strategies that want it;
it is a candidate when at least one of them does and the sum reaches the policy's `min_score`,
and it is attributed to the strategy that contributed most. Frames no strategy wants may still
be drawn by the random baseline (score 0). Candidates are then taken best first, random draws
last, so when a bin's rate limit bites the most useful frames are the ones kept; a candidate that
is a near-duplicate (pHash) of an earlier selection is dropped before it costs any of the limit.
"""

from __future__ import annotations

import math
import time
import uuid
from collections import Counter, OrderedDict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime

from binloop.storage.keys import frame_key
from schemas.base import utc_now
from schemas.events import InferenceResult, SampleSelected, SamplingStrategy
from services.sampler.dedup import HashSource, NearDuplicateFilter, event_phash
from services.sampler.policy import SamplingPolicy
from services.sampler.ratelimit import RateLimits
from services.sampler.strategies import (
    ClassBalance,
    Disagreement,
    Diversity,
    Entropy,
    LeastConfidence,
    Margin,
    RandomBaseline,
    Representative,
    Strategy,
    ThresholdBand,
    Verdict,
)

SELECTION_NAMESPACE = uuid.uuid5(uuid.NAMESPACE_URL, "binloop:samples.selected")
REASON_MAX_CHARS = 512


def selection_id(result: InferenceResult) -> uuid.UUID:
    """Deterministic, so JetStream drops the selection a redelivered batch produces again.
    One per (model name, model version, frame): also the key of the sampler's memory."""
    return uuid.uuid5(
        SELECTION_NAMESPACE, f"{result.model_name}:{result.model_version}:{result.frame_sha256}"
    )


@dataclass(frozen=True)
class Weighted:
    strategy: Strategy
    weight: float


@dataclass(frozen=True)
class Candidate:
    """A frame some strategy wants, with the combined score and every contributor's reason."""

    strategy: SamplingStrategy
    score: float
    reason: str
    informative: bool
    """False when only the random baseline drew it."""


def combine(
    verdicts: Sequence[tuple[SamplingStrategy, float, Verdict]],
    random_verdict: Verdict | None,
    min_score: float,
) -> Candidate | None:
    """Weighted sum of the verdicts given as (strategy, weight, verdict); None: not a candidate."""
    if verdicts:
        contributions = sorted(
            ((weight * verdict.score, name, verdict) for name, weight, verdict in verdicts),
            key=lambda item: -item[0],
        )
        total = sum(contribution for contribution, _, _ in contributions)
        if total >= min_score:
            reason = "; ".join(
                f"{name} {contribution:.2f}: {verdict.reason}"
                for contribution, name, verdict in contributions
            )
            if len(reason) > REASON_MAX_CHARS:
                reason = reason[: REASON_MAX_CHARS - 3] + "..."
            return Candidate(contributions[0][1], total, reason, informative=True)
    if random_verdict is not None:
        return Candidate("random", random_verdict.score, random_verdict.reason, informative=False)
    return None


@dataclass(frozen=True, slots=True)
class Remembered:
    """What the sampler keeps of a selection: the rest of it follows from the inference result,
    and a redelivery brings the same result again. About 0.5 KiB, where the SampleSelected
    itself took about 5 KiB (100,000 of them alone would fill the sampler's 512 MiB)."""

    source_event_id: uuid.UUID | None
    """event_id of the inference result it was made for, also after a restart (restored from
    the selection's own `source_event_id`); None for a selection restored from a sampler older
    than that field, whose redelivered result is then counted as a repeat."""
    occurred_at: datetime
    strategy: SamplingStrategy
    score: float
    reason: str


@dataclass
class BatchOutcome:
    selected: list[SampleSelected] = field(default_factory=list)
    """New selections, best first."""
    republished: list[SampleSelected] = field(default_factory=list)
    """Selections made before for a redelivered result, to publish again (same event_id)."""
    rate_limited: Counter[str] = field(default_factory=Counter)
    """Candidates dropped by a per-bin limit, by bin."""
    near_duplicates: Counter[str] = field(default_factory=Counter)
    """Candidates dropped as near-duplicates of an earlier selection, by bin."""
    below_min_score: Counter[str] = field(default_factory=Counter)
    """Frames some strategy wanted whose combined score stayed below min_score, by bin."""
    repeats: Counter[str] = field(default_factory=Counter)
    """Results for a frame already selected for the same model (other than redeliveries), by
    bin."""


class Sampler:
    def __init__(
        self,
        strategies: Sequence[Weighted],
        limits: RateLimits,
        producer: str,
        *,
        random: Strategy | None = None,
        dedup: NearDuplicateFilter | None = None,
        min_score: float = 0.0,
        remember: int = 100_000,
        name_results: bool = False,
    ) -> None:
        self.strategies = list(strategies)
        self.name_results = name_results
        """Whether selections carry source_event_id (SamplerSettings.name_results)."""
        self.random = random
        self.limits = limits
        self.dedup = dedup
        self.producer = producer
        self.min_score = min_score
        self.remember = remember
        # selection_id(result).int -> the selection made for it
        self._selected: OrderedDict[int, Remembered] = OrderedDict()

    def restore(self, selections: Iterable[SampleSelected], now: datetime) -> int:
        """Takes back what a previous run of the sampler selected (read from the stream at
        start): each selection counts against its bin's rate limits for as long as it would have
        (its age by `now`, the wall clock, as the limiters' own clock may have restarted), and
        its frame is not selected again for that model version, and a redelivery of the result
        it was made for republishes it. Returns how many were new.

        The pHash and strategy memories are not restored: a selection carries neither the hash
        nor the embedding."""
        restored = 0
        for selection in selections:
            key = selection.event_id.int
            if key in self._selected:  # published twice (a republish after the dedup window)
                continue
            self.limits.restore(selection.bin_id, (now - selection.occurred_at).total_seconds())
            self._selected[key] = Remembered(
                selection.source_event_id,
                selection.occurred_at,
                selection.strategy,
                selection.score,
                selection.reason,
            )
            restored += 1
        while len(self._selected) > self.remember:
            self._selected.popitem(last=False)
        return restored

    def candidates(self, results: Sequence[InferenceResult]) -> list[tuple[Candidate | None, bool]]:
        """Every strategy's verdicts on the batch, combined per frame, with whether any
        informative strategy wanted the frame at all."""
        by_strategy = [
            (weighted, weighted.strategy.score_batch(results)) for weighted in self.strategies
        ]
        randoms = self.random.score_batch(results) if self.random else [None] * len(results)
        combined: list[tuple[Candidate | None, bool]] = []
        for index in range(len(results)):
            # A NaN score would fail `>= min_score` and drop what the other strategies wanted.
            verdicts = [
                (weighted.strategy.name, weighted.weight, verdict)
                for weighted, verdicts in by_strategy
                if (verdict := verdicts[index]) is not None and math.isfinite(verdict.score)
            ]
            combined.append((combine(verdicts, randoms[index], self.min_score), bool(verdicts)))
        return combined

    def select_batch(self, results: Sequence[InferenceResult]) -> BatchOutcome:
        outcome = BatchOutcome()
        fresh: list[InferenceResult] = []
        for result in results:
            if not self._seen_before(result, outcome):
                fresh.append(result)
        candidates = self.candidates(fresh)
        outcome.below_min_score.update(
            result.bin_id
            for result, (candidate, wanted) in zip(fresh, candidates, strict=True)
            if wanted and (candidate is None or not candidate.informative)
        )
        ranked = sorted(
            (
                (result, candidate)
                for result, (candidate, _) in zip(fresh, candidates, strict=True)
                if candidate is not None
            ),
            key=lambda pair: (not pair[1].informative, -pair[1].score),
        )
        for result, candidate in ranked:
            if self._seen_before(result, outcome):  # the same result twice in one batch
                continue
            phash = self.dedup.hash_of(result) if self.dedup else None
            if self.dedup and phash is not None and self.dedup.duplicate_of(result.bin_id, phash):
                outcome.near_duplicates[result.bin_id] += 1
                continue
            if not self.limits.try_acquire(result.bin_id):
                outcome.rate_limited[result.bin_id] += 1
                continue
            selection = self._selection(
                result, candidate.strategy, candidate.score, candidate.reason
            )
            self._remember(result, selection)
            for weighted in self.strategies:
                weighted.strategy.record(result)
            if self.dedup and phash is not None:
                self.dedup.add(result.bin_id, phash)
            outcome.selected.append(selection)
        return outcome

    def _seen_before(self, result: InferenceResult, outcome: BatchOutcome) -> bool:
        earlier = self._selected.get(selection_id(result).int)
        if earlier is None:
            return False
        if earlier.source_event_id == result.event_id:
            # A redelivery: its selection may not have been published yet. The same event_id
            # again lets JetStream drop it if it was; the same result rebuilds the same event.
            outcome.republished.append(
                self._selection(
                    result,
                    earlier.strategy,
                    earlier.score,
                    earlier.reason,
                    occurred_at=earlier.occurred_at,
                )
            )
        else:
            outcome.repeats[result.bin_id] += 1
        return True

    def _selection(
        self,
        result: InferenceResult,
        strategy: SamplingStrategy,
        score: float,
        reason: str,
        *,
        occurred_at: datetime | None = None,
    ) -> SampleSelected:
        return SampleSelected(
            event_id=selection_id(result),
            occurred_at=occurred_at or utc_now(),
            producer=self.producer,
            bin_id=result.bin_id,
            frame_sha256=result.frame_sha256,
            frame_key=frame_key(result.bin_id, result.captured_at, result.frame_sha256),
            captured_at=result.captured_at,
            strategy=strategy,
            score=score,
            reason=reason,
            predicted=result.top_k,
            model_name=result.model_name,
            model_version=result.model_version,
            ground_truth=result.ground_truth,
            source_event_id=result.event_id if self.name_results else None,
        )

    def _remember(self, result: InferenceResult, selection: SampleSelected) -> None:
        self._selected[selection.event_id.int] = Remembered(
            result.event_id,
            selection.occurred_at,
            selection.strategy,
            selection.score,
            selection.reason,
        )
        while len(self._selected) > self.remember:
            self._selected.popitem(last=False)


def build_strategies(policy: SamplingPolicy) -> list[Weighted]:
    """The enabled strategies of a policy, in its order, with their weights."""
    config = policy.strategies
    built: list[tuple[bool, float, Strategy]] = [
        (
            config.least_confidence.enabled,
            config.least_confidence.weight,
            LeastConfidence(config.least_confidence.threshold),
        ),
        (config.margin.enabled, config.margin.weight, Margin(config.margin.threshold)),
        (
            config.entropy.enabled,
            config.entropy.weight,
            Entropy(config.entropy.min_normalized),
        ),
        (
            config.threshold_band.enabled,
            config.threshold_band.weight,
            ThresholdBand(config.threshold_band.half_width),
        ),
        (
            config.class_balance.enabled,
            config.class_balance.weight,
            ClassBalance(
                config.class_balance.quotas,
                config.class_balance.default_quota,
                config.class_balance.window,
            ),
        ),
        (
            config.diversity.enabled,
            config.diversity.weight,
            Diversity(
                config.diversity.per_batch,
                config.diversity.min_distance,
                config.diversity.remember,
            ),
        ),
        (
            config.representative.enabled,
            config.representative.weight,
            Representative(
                config.representative.per_batch,
                config.representative.neighbours,
                policy.seed,
                config.representative.remember,
            ),
        ),
        (
            config.disagreement.enabled,
            config.disagreement.weight,
            Disagreement(config.disagreement.min_disagreement, config.disagreement.remember),
        ),
    ]
    return [Weighted(strategy, weight) for enabled, weight, strategy in built if enabled]


def build_sampler(
    policy: SamplingPolicy,
    producer: str,
    clock: Callable[[], float] = time.monotonic,
    *,
    hash_source: HashSource = event_phash,
    remember: int = 100_000,
    name_results: bool = False,
) -> Sampler:
    random = policy.strategies.random
    dedup = policy.dedup
    return Sampler(
        build_strategies(policy),
        RateLimits.per_hour_and_day(
            policy.rate_limits.per_bin_per_hour, policy.rate_limits.per_bin_per_day, clock
        ),
        producer,
        random=RandomBaseline(random.fraction, policy.seed) if random.enabled else None,
        dedup=(
            NearDuplicateFilter(hash_source, dedup.max_hamming, dedup.remember, dedup.per_bin)
            if dedup.enabled
            else None
        ),
        min_score=policy.min_score,
        remember=remember,
        name_results=name_results,
    )
