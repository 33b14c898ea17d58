"""The sampler service: inference.result (every bin, in batches) in, samples.selected out."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable, Sequence

from binloop.bus import Delivery, Outgoing, subscribe_batch
from binloop.observability import metrics
from binloop.runtime import ServiceApp, new_service
from schemas.events import InferenceResult
from schemas.routes import INFERENCE_RESULT, SAMPLES_SELECTED
from services.sampler.core import BatchOutcome, build_sampler
from services.sampler.dedup import HashSource, event_phash
from services.sampler.policy import SamplingPolicy, load_policy
from services.sampler.settings import SamplerSettings


def create_app(
    settings: SamplerSettings,
    clock: Callable[[], float] = time.monotonic,
    *,
    policy: SamplingPolicy | None = None,
    hash_source: HashSource = event_phash,
) -> ServiceApp:
    """`policy` overrides settings.policy_file; a bad policy file raises PolicyError here, at
    start, rather than on the first batch."""
    if policy is None:
        policy = load_policy(settings.policy_file) if settings.policy_file else SamplingPolicy()
    service = new_service("sampler", settings)
    sampler = build_sampler(
        policy,
        service.producer,
        clock,
        hash_source=hash_source,
        remember=settings.remember_selected,
    )

    # A batch can take seconds (k-means of the representative strategy), so it runs in a worker
    # thread and the event loop goes on sending in-progress acks and answering /healthz. The
    # sampler is touched only here and the batch subscriber hands over one batch at a time; the
    # lock keeps it one at a time even when a handler cancelled at shutdown leaves its thread
    # running.
    one_batch_at_a_time = threading.Lock()

    def select(results: Sequence[InferenceResult]) -> BatchOutcome:
        with one_batch_at_a_time:
            return sampler.select_batch(results)

    async def on_results(deliveries: list[Delivery[InferenceResult]]) -> list[Outgoing]:
        outcome = await asyncio.to_thread(select, [d.event for d in deliveries])
        count_outcome(outcome)
        return [
            Outgoing(SAMPLES_SELECTED, selection)
            for selection in (*outcome.republished, *outcome.selected)
        ]

    subscribe_batch(
        service.broker,
        service.publisher,
        INFERENCE_RESULT,
        on_results,
        durable="sampler",
        batch_size=settings.batch_size,
        max_wait_s=settings.batch_max_wait_s,
        policy=service.policy,
        description="Picks the frames worth labeling: weighted active-learning strategies, "
        "near-duplicate dropping, per-bin rate limits.",
    )
    return service


def count_outcome(outcome: BatchOutcome) -> None:
    """What a batch selected and what it dropped, by reason, in the sampler's metrics."""
    for counter, by_bin in (
        (metrics.SAMPLER_RATE_LIMITED, outcome.rate_limited),
        (metrics.SAMPLER_NEAR_DUPLICATES, outcome.near_duplicates),
        (metrics.SAMPLER_BELOW_MIN_SCORE, outcome.below_min_score),
        (metrics.SAMPLER_REPEATS, outcome.repeats),
    ):
        for bin_id, count in by_bin.items():
            counter.labels(bin_id).inc(count)
    for selection in outcome.selected:
        metrics.SAMPLER_SELECTIONS.labels(selection.strategy).inc()
