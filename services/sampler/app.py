"""The sampler service: inference.result (every bin, in batches) in, samples.selected out."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections.abc import Callable, Sequence
from datetime import timedelta

from nats.errors import Error as NatsError
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy
from nats.js.client import JetStreamContext
from nats.js.errors import NotFoundError
from pydantic import ValidationError

from binloop.bus import Delivery, Outgoing, subscribe_batch
from binloop.observability import metrics
from binloop.runtime import ServiceApp, new_service
from schemas.base import read_json, utc_now
from schemas.events import InferenceResult, SampleSelected
from schemas.routes import INFERENCE_RESULT, SAMPLES_SELECTED
from services.sampler.core import BatchOutcome, Sampler, build_sampler
from services.sampler.dedup import HashSource, event_phash
from services.sampler.policy import SamplingPolicy, load_policy
from services.sampler.settings import SamplerSettings

log = logging.getLogger(__name__)

RECALL_ATTEMPTS = 5
RECALL_RETRY_S = 2.0
RECALL_FETCH = 1000
RECALL_FETCH_TIMEOUT_S = 10.0


async def recall_selections(js: JetStreamContext, sampler: Sampler) -> int:
    """Gives `sampler` back what it selected in the window its rate limits still count (the
    last 24 hours), read from samples.selected in the stream, so a restart (a deploy, an OOM
    kill, a crash loop) neither hands every bin a fresh quota nor selects those frames again.
    Reads through an ephemeral consumer starting at that time, a fetch at a time (a day of
    selections of many bins does not fit in memory as events). Returns how many it restored."""
    now = utc_now()
    config = ConsumerConfig(
        deliver_policy=DeliverPolicy.BY_START_TIME,
        opt_start_time=now - timedelta(seconds=sampler.limits.longest_window_s),
        ack_policy=AckPolicy.NONE,
        inactive_threshold=60.0,
        mem_storage=True,
    )
    subscription = await js.pull_subscribe(
        SAMPLES_SELECTED.subject(), stream=SAMPLES_SELECTED.stream, config=config
    )
    info = await subscription.consumer_info()
    try:
        restored = unreadable = 0
        pending = info.num_pending or 0
        while pending > 0:
            messages = await subscription.fetch(
                min(pending, RECALL_FETCH), timeout=RECALL_FETCH_TIMEOUT_S
            )
            selections = []
            for message in messages:
                pending = message.metadata.num_pending
                try:
                    selections.append(read_json(SampleSelected, message.data))
                except ValidationError:
                    # Skipped, not raised: one unreadable event would stop every later start.
                    unreadable += 1
            restored += sampler.restore(selections, now)
        if unreadable:
            log.warning("sampler: %d stored selections could not be read back", unreadable)
        return restored
    finally:
        await subscription.unsubscribe()
        with contextlib.suppress(NotFoundError):  # inactive_threshold removed it already
            await js.delete_consumer(SAMPLES_SELECTED.stream, info.name)


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

    def new_sampler() -> Sampler:
        return build_sampler(
            policy,
            service.producer,
            clock,
            hash_source=hash_source,
            remember=settings.remember_selected,
            name_results=settings.name_results,
        )

    sampler = new_sampler()

    async def recall(js: JetStreamContext) -> None:
        """Before any consumer runs. Starting with empty quotas is what this prevents, so a
        stream that cannot be read is retried, then the start fails (the process exits and the
        orchestrator restarts it; it is never ready meanwhile): selecting a little later is
        cheap, selecting a second day's quota is not. Each attempt starts from a fresh sampler,
        so a read that failed halfway is not counted twice."""
        nonlocal sampler
        for attempt in range(1, RECALL_ATTEMPTS + 1):
            fresh = new_sampler()
            try:
                restored = await recall_selections(js, fresh)
            except (NatsError, TimeoutError) as exc:
                if attempt == RECALL_ATTEMPTS:
                    raise
                log.warning(
                    "sampler: earlier selections not read (%s), attempt %d of %d",
                    exc,
                    attempt,
                    RECALL_ATTEMPTS,
                )
                await asyncio.sleep(RECALL_RETRY_S * attempt)
                continue
            sampler = fresh
            log.info("sampler: %d selections of the last day restored", restored)
            return

    service.on_start.append(recall)

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
