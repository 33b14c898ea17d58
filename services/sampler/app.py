"""The sampler service: inference.result (every bin, in batches) in, samples.selected out."""

from __future__ import annotations

import time
from collections.abc import Callable

from binloop.bus import Delivery, Outgoing, subscribe_batch
from binloop.observability import metrics
from binloop.runtime import ServiceApp, new_service
from schemas.events import InferenceResult
from schemas.routes import INFERENCE_RESULT, SAMPLES_SELECTED
from services.sampler.core import build_sampler
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

    async def on_results(deliveries: list[Delivery[InferenceResult]]) -> list[Outgoing]:
        outcome = sampler.select_batch([d.event for d in deliveries])
        for bin_id, dropped in outcome.rate_limited.items():
            metrics.SAMPLER_RATE_LIMITED.labels(bin_id).inc(dropped)
        for bin_id, dropped in outcome.near_duplicates.items():
            metrics.SAMPLER_NEAR_DUPLICATES.labels(bin_id).inc(dropped)
        for selection in outcome.selected:
            metrics.SAMPLER_SELECTIONS.labels(selection.strategy).inc()
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
