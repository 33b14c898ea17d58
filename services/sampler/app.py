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
from services.sampler.settings import SamplerSettings


def create_app(
    settings: SamplerSettings, clock: Callable[[], float] = time.monotonic
) -> ServiceApp:
    service = new_service("sampler", settings)
    sampler = build_sampler(settings, service.producer, clock)

    async def on_results(deliveries: list[Delivery[InferenceResult]]) -> list[Outgoing]:
        outcome = sampler.select_batch([d.event for d in deliveries])
        for bin_id, dropped in outcome.rate_limited.items():
            metrics.SAMPLER_RATE_LIMITED.labels(bin_id).inc(dropped)
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
        description="Picks the frames worth labeling (least confidence, random baseline).",
    )
    return service
