"""The sampler's decisions for a batch of inference results. No bus here.

Strategies are asked in priority order and the first verdict wins (least confidence first, the
random baseline only among the rest). A weighted combination of several strategies replaces
`Sampler.choose` when there are more of them.
"""

from __future__ import annotations

import time
import uuid
from collections import Counter, OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from binloop.storage.keys import frame_key
from schemas.events import InferenceResult, SampleSelected
from services.sampler.ratelimit import SlidingWindowLimiter
from services.sampler.settings import SamplerSettings
from services.sampler.strategies import (
    LeastConfidence,
    RandomBaseline,
    Strategy,
    Verdict,
)

SELECTION_NAMESPACE = uuid.uuid5(uuid.NAMESPACE_URL, "binloop:samples.selected")
HOUR_S = 3600.0

SelectionKey = tuple[str, int, str]
"""(model name, model version, frame sha256): one selection per frame and model."""


def selection_id(result: InferenceResult) -> uuid.UUID:
    """Deterministic, so JetStream drops the selection a redelivered batch produces again."""
    return uuid.uuid5(
        SELECTION_NAMESPACE, f"{result.model_name}:{result.model_version}:{result.frame_sha256}"
    )


@dataclass
class BatchOutcome:
    selected: list[SampleSelected] = field(default_factory=list)
    """New selections."""
    republished: list[SampleSelected] = field(default_factory=list)
    """Selections made before for a redelivered result, to publish again (same event_id)."""
    rate_limited: Counter[str] = field(default_factory=Counter)
    """Candidates dropped by the per-bin limit, by bin."""
    repeats: int = 0
    """Results for a frame already selected for the same model (other than redeliveries)."""


class Sampler:
    def __init__(
        self,
        strategies: Sequence[Strategy],
        limiter: SlidingWindowLimiter,
        producer: str,
        remember: int = 100_000,
    ) -> None:
        self.strategies = list(strategies)
        self.limiter = limiter
        self.producer = producer
        self.remember = remember
        # key -> (event_id of the inference result, the selection it produced)
        self._selected: OrderedDict[SelectionKey, tuple[uuid.UUID, SampleSelected]] = OrderedDict()

    def choose(self, result: InferenceResult) -> tuple[Strategy, Verdict] | None:
        for strategy in self.strategies:
            verdict = strategy.score(result)
            if verdict is not None:
                return strategy, verdict
        return None

    def select_batch(self, results: Sequence[InferenceResult]) -> BatchOutcome:
        outcome = BatchOutcome()
        for result in results:
            key: SelectionKey = (result.model_name, result.model_version, result.frame_sha256)
            earlier = self._selected.get(key)
            if earlier is not None:
                source_event_id, selection = earlier
                if source_event_id == result.event_id:
                    # A redelivery: its selection may not have been published yet. The same
                    # event_id again lets JetStream drop it if it was.
                    outcome.republished.append(selection)
                else:
                    outcome.repeats += 1
                continue
            chosen = self.choose(result)
            if chosen is None:
                continue
            if not self.limiter.try_acquire(result.bin_id):
                outcome.rate_limited[result.bin_id] += 1
                continue
            strategy, verdict = chosen
            selection = self._selection(result, strategy, verdict)
            self._remember(key, result.event_id, selection)
            outcome.selected.append(selection)
        return outcome

    def _selection(
        self, result: InferenceResult, strategy: Strategy, verdict: Verdict
    ) -> SampleSelected:
        return SampleSelected(
            event_id=selection_id(result),
            producer=self.producer,
            bin_id=result.bin_id,
            frame_sha256=result.frame_sha256,
            frame_key=frame_key(result.bin_id, result.captured_at, result.frame_sha256),
            captured_at=result.captured_at,
            strategy=strategy.name,
            score=verdict.score,
            reason=verdict.reason,
            predicted=result.top_k,
            model_name=result.model_name,
            model_version=result.model_version,
            ground_truth=result.ground_truth,
        )

    def _remember(
        self, key: SelectionKey, source_event_id: uuid.UUID, selection: SampleSelected
    ) -> None:
        self._selected[key] = (source_event_id, selection)
        while len(self._selected) > self.remember:
            self._selected.popitem(last=False)


def build_sampler(
    settings: SamplerSettings, producer: str, clock: Callable[[], float] = time.monotonic
) -> Sampler:
    strategies: list[Strategy] = [
        LeastConfidence(settings.least_confidence_threshold),
        RandomBaseline(settings.random_fraction, settings.seed),
    ]
    limiter = SlidingWindowLimiter(settings.max_per_bin_per_hour, HOUR_S, clock)
    return Sampler(strategies, limiter, producer, remember=settings.remember_selected)
