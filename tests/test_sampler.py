"""The sampler: least confidence, deterministic random baseline, per-bin rate limit,
deduplication, restoring after a restart, policy files YAML or UTF-8 would misread, and the
service against a real nats-server (one batch in, each selection stored exactly once, the policy
read from a YAML file). The other strategies, the combiner, pHash and policy validation are in
test_active_learning.py."""

from __future__ import annotations

import gc
import hashlib
import math
import tracemalloc
import uuid
import weakref
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from nats.aio.client import Client
from nats.js.client import JetStreamContext
from prometheus_client import REGISTRY

from binloop.natsserver import NatsServer
from binloop.storage.keys import frame_key
from schemas.events import (
    ClassScore,
    DeadLetter,
    InferenceResult,
    SampleSelected,
    StageLatency,
)
from schemas.routes import INFERENCE_RESULT, SAMPLES_SELECTED, dlq_subject
from schemas.taxonomy import Compartment
from services.sampler import SamplerSettings, create_app
from services.sampler.app import count_outcome
from services.sampler.core import BatchOutcome, Sampler, build_sampler, selection_id
from services.sampler.policy import PolicyError, SamplingPolicy, load_policy, parse_policy
from services.sampler.ratelimit import HOUR_S, SlidingWindowLimiter
from services.sampler.strategies import LeastConfidence, RandomBaseline, uniform_draw
from tests.helpers import Collector

LABELS = ["cardboard", "glass", "metal", "paper", "plastic", "trash"]
CAPTURED_AT = datetime(2025, 3, 14, 9, 26, 53, tzinfo=UTC)


def frame_sha(n: int) -> str:
    return hashlib.sha256(f"frame-{n}".encode()).hexdigest()


def make_result(
    n: int,
    confidence: float,
    *,
    bin_id: str = "bin-a",
    model_version: int = 1,
    label: str = "plastic",
    ground_truth: str | None = "glass",
    threshold: float = 0.5,
) -> InferenceResult:
    """A well-formed result whose top-1 is `label` at `confidence`, the rest spread evenly,
    decided by an edge whose confidence threshold is `threshold`."""
    rest = (1.0 - confidence) / (len(LABELS) - 1)
    probabilities = {name: (confidence if name == label else rest) for name in LABELS}
    top_k = sorted(
        (ClassScore(label=name, probability=p) for name, p in probabilities.items()),
        key=lambda score: -score.probability,
    )
    return InferenceResult(
        producer="edge-inferencer",
        bin_id=bin_id,
        frame_sha256=frame_sha(n),
        frame_event_id=str(uuid.uuid4()),
        captured_at=CAPTURED_AT,
        model_name="mobilenet",
        model_version=model_version,
        label=label,
        confidence=confidence,
        margin=confidence - rest,
        entropy=-sum(p * math.log(p) for p in probabilities.values() if p > 0),
        top_k=top_k,
        compartment=Compartment.PLASTIC_METAL,
        abstained=confidence < threshold,
        latency=StageLatency(
            read_ms=0.1, decode_ms=1.0, preprocess_ms=0.5, infer_ms=3.0, postprocess_ms=0.1
        ),
        ground_truth=ground_truth,
        num_classes=len(LABELS),
        confidence_threshold=threshold,
    )


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def least_confidence_policy(
    *, threshold: float = 0.6, random_fraction: float = 0.0, per_hour: int = 600, seed: int = 7
) -> SamplingPolicy:
    """Only least confidence and the random baseline, as the sampler started out."""
    off = {"enabled": False}
    return SamplingPolicy.model_validate(
        {
            "seed": seed,
            "strategies": {
                "least_confidence": {"threshold": threshold},
                "threshold_band": off,
                "class_balance": off,
                "diversity": off,
                "disagreement": off,
                "random": {"fraction": random_fraction},
            },
            "rate_limits": {"per_bin_per_hour": per_hour, "per_bin_per_day": 24 * per_hour},
        }
    )


def make_sampler(
    *,
    threshold: float = 0.6,
    random_fraction: float = 0.0,
    per_hour: int = 600,
    remember: int = 100_000,
    clock: FakeClock | None = None,
    name_results: bool = False,
) -> Sampler:
    policy = least_confidence_policy(
        threshold=threshold, random_fraction=random_fraction, per_hour=per_hour
    )
    return build_sampler(
        policy, "sampler", clock or FakeClock(), remember=remember, name_results=name_results
    )


# --- strategies ---------------------------------------------------------------------------


def test_least_confidence_scores_unsure_frames_and_says_why() -> None:
    strategy = LeastConfidence(0.6)
    verdict = strategy.score(make_result(1, 0.41))
    assert verdict is not None
    assert verdict.score == pytest.approx(0.59)
    assert verdict.reason == "confidence 0.41 < 0.60"
    assert strategy.score(make_result(2, 0.6)) is None
    assert strategy.score(make_result(3, 0.93)) is None


def test_random_baseline_is_a_deterministic_function_of_seed_and_frame() -> None:
    results = [make_result(n, 0.9) for n in range(4000)]
    first = [RandomBaseline(0.05, seed=3).score(r) is not None for r in results]
    again = [RandomBaseline(0.05, seed=3).score(r) is not None for r in results]
    other_seed = [RandomBaseline(0.05, seed=4).score(r) is not None for r in results]
    assert first == again
    assert first != other_seed
    assert 0.035 < sum(first) / len(results) < 0.065
    picked = next(r for r, chosen in zip(results, first, strict=True) if chosen)
    verdict = RandomBaseline(0.05, seed=3).score(picked)
    assert verdict is not None
    assert verdict.score == 0.0
    assert f"{uniform_draw(3, picked.frame_sha256):.3f} < 0.050" in verdict.reason
    assert not any(RandomBaseline(0.0, seed=3).score(r) for r in results[:200])
    assert all(RandomBaseline(1.0, seed=3).score(r) for r in results[:200])


def test_random_baseline_only_samples_what_least_confidence_left() -> None:
    sampler = make_sampler(random_fraction=1.0)
    outcome = sampler.select_batch([make_result(1, 0.3), make_result(2, 0.95)])
    assert [(s.frame_sha256, s.strategy) for s in outcome.selected] == [
        (frame_sha(1), "least_confidence"),
        (frame_sha(2), "random"),
    ]


# --- selections -----------------------------------------------------------------------------


def test_selection_carries_prediction_reason_and_where_the_frame_is_stored() -> None:
    result = make_result(1, 0.41, bin_id="bin-7", model_version=3, ground_truth="paper")
    (selection,) = make_sampler().select_batch([result]).selected
    assert selection.strategy == "least_confidence"
    assert selection.score == pytest.approx(0.59)
    assert selection.reason == "least_confidence 0.59: confidence 0.41 < 0.60"
    assert selection.predicted == result.top_k
    assert (selection.model_name, selection.model_version) == ("mobilenet", 3)
    assert selection.ground_truth == "paper"
    assert selection.frame_key == frame_key("bin-7", CAPTURED_AT, result.frame_sha256)
    assert selection.frame_key == f"frames/bin-7/2025/03/14/{result.frame_sha256}.jpg"
    # A restarted sampler gives the same frame and model the same event_id.
    (again,) = make_sampler().select_batch([result]).selected
    assert again.event_id == selection.event_id == selection_id(result)


def test_a_frame_is_selected_once_per_model_version_and_redeliveries_republish() -> None:
    sampler = make_sampler()
    result = make_result(1, 0.2)
    (selection,) = sampler.select_batch([result]).selected

    redelivered = sampler.select_batch([result])
    assert redelivered.selected == []
    assert redelivered.republished == [selection]

    seen_again = sampler.select_batch([make_result(1, 0.25)])
    assert (seen_again.selected, seen_again.republished) == ([], [])
    assert seen_again.repeats == {"bin-a": 1}

    new_model = sampler.select_batch([make_result(1, 0.2, model_version=2)])
    (for_v2,) = new_model.selected
    assert for_v2.event_id != selection.event_id


def test_remembered_selections_are_bounded() -> None:
    sampler = make_sampler(remember=2)
    sampler.select_batch([make_result(n, 0.2) for n in range(3)])
    # The oldest was forgotten: a new result for it is a fresh selection (same event_id, so
    # JetStream's duplicate window still catches it); the newest are still remembered.
    assert len(sampler.select_batch([make_result(0, 0.2)]).selected) == 1
    assert sampler.select_batch([make_result(2, 0.2)]).repeats == {"bin-a": 1}


def test_the_sampler_remembers_a_compact_record_not_the_selection_or_the_result() -> None:
    sampler = make_sampler()
    result = make_result(1, 0.2)
    source, outcome = result.model_dump_json(), sampler.select_batch([result])
    (selection,) = outcome.selected
    published = selection.model_dump_json()
    gone = weakref.ref(selection), weakref.ref(result)
    del outcome, selection, result
    gc.collect()
    assert [ref() for ref in gone] == [None, None]
    # A redelivery (the same result, the same event_id) still republishes the same event.
    redelivered = sampler.select_batch([InferenceResult.model_validate_json(source)])
    assert [s.model_dump_json() for s in redelivered.republished] == [published]


def test_remembered_selections_cost_well_under_a_kib_each() -> None:
    # Each remembered SampleSelected took about 5 KiB: 100,000 (the default) filled the
    # sampler's 512 MiB limit on their own.
    sampler = make_sampler(per_hour=10_000)
    batches = [[make_result(n, 0.2) for n in range(start, start + 250)] for start in (0, 250)]
    gc.collect()
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        for batch in batches:
            assert len(sampler.select_batch(batch).selected) == len(batch)
        gc.collect()
        kept = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    assert kept / 500 < 1024


# --- rate limit -----------------------------------------------------------------------------


def test_rate_limit_is_per_bin_and_slides_with_the_clock() -> None:
    clock = FakeClock()
    sampler = make_sampler(per_hour=3, clock=clock)
    batch = [make_result(n, 0.3, bin_id="bin-a") for n in range(5)]
    batch += [make_result(100 + n, 0.3, bin_id="bin-b") for n in range(2)]
    batch += [make_result(200, 0.9, bin_id="bin-a")]  # not a candidate: costs nothing
    outcome = sampler.select_batch(batch)
    assert [s.frame_sha256 for s in outcome.selected] == [
        *(frame_sha(n) for n in range(3)),
        frame_sha(100),
        frame_sha(101),
    ]
    assert outcome.rate_limited == {"bin-a": 2}

    clock.now += 3599.0
    assert sampler.select_batch([make_result(10, 0.3)]).rate_limited == {"bin-a": 1}
    clock.now += 1.0  # the first three selections are now an hour old
    later = sampler.select_batch([make_result(n, 0.3) for n in range(11, 15)])
    assert len(later.selected) == 3
    assert later.rate_limited == {"bin-a": 1}


def test_sliding_window_counts_each_grant_for_exactly_one_window() -> None:
    clock = FakeClock()
    limiter = SlidingWindowLimiter(limit=2, window_s=60.0, clock=clock)
    assert limiter.try_acquire("x")
    clock.now += 30
    assert limiter.try_acquire("x")
    assert not limiter.try_acquire("x")
    assert limiter.try_acquire("y")
    clock.now += 30  # the first grant expires, the second does not
    assert limiter.try_acquire("x")
    assert not limiter.try_acquire("x")


# --- metrics --------------------------------------------------------------------------------


def test_restored_selections_count_against_the_limits_for_the_rest_of_their_window() -> None:
    clock = FakeClock()
    sampler = make_sampler(per_hour=2, clock=clock)  # 48 a day
    now = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)
    earlier = (
        make_sampler(per_hour=600).select_batch([make_result(n, 0.3) for n in range(3)]).selected
    )
    ages = [timedelta(minutes=50), timedelta(minutes=10), timedelta(hours=30)]
    restored = [
        s.model_copy(update={"occurred_at": now - age})
        for s, age in zip(earlier, ages, strict=True)
    ]

    assert sampler.restore([*restored, restored[0]], now) == 3  # a republished one counts once
    # The hour holds the two recent ones: no room.
    assert sampler.select_batch([make_result(10, 0.3)]).selected == []
    clock.now += 10 * 60 + 1  # the one selected 50 minutes before now leaves the hour
    outcome = sampler.select_batch([make_result(n, 0.3) for n in (0, 2, 11, 12)])
    # The frames selected before the restart are not selected again; one new frame has room.
    assert [s.frame_sha256 for s in outcome.selected] == [frame_sha(11)]
    assert outcome.repeats == {"bin-a": 2}
    clock.now += 40 * 60  # so does the one selected 10 minutes before
    assert len(sampler.select_batch([make_result(13, 0.3)]).selected) == 1


def test_a_result_redelivered_after_a_restart_republishes_its_selection_not_a_repeat() -> None:
    # The sampler published the selection and died before acking the result: the restarted
    # one restores the selection from the stream and then gets the same result again.
    result = make_result(1, 0.2)
    (selection,) = make_sampler(name_results=True).select_batch([result]).selected
    assert selection.source_event_id == result.event_id
    # Off by default: consumers of the previous release refuse the field.
    assert make_sampler().select_batch([result]).selected[0].source_event_id is None
    now = datetime.now(UTC)
    restarted = make_sampler(name_results=True)
    assert restarted.restore([selection], now) == 1
    redelivered = restarted.select_batch([result])
    assert (redelivered.selected, redelivered.repeats) == ([], {})
    assert [s.model_dump_json() for s in redelivered.republished] == [selection.model_dump_json()]
    # A selection stored by a sampler older than source_event_id cannot tell: a repeat.
    older = make_sampler(name_results=True)
    older.restore([selection.model_copy(update={"source_event_id": None})], now)
    assert older.select_batch([result]).repeats == {"bin-a": 1}


def test_a_restored_grant_is_kept_for_what_is_left_of_its_window() -> None:
    clock = FakeClock()
    limiter = SlidingWindowLimiter(1, HOUR_S, clock)
    limiter.restore("bin-a", 2 * HOUR_S)  # outside the window: not kept
    limiter.restore("bin-a", -5.0)  # a clock ahead of ours: counted from now
    assert not limiter.has_room("bin-a")
    clock.now += HOUR_S
    assert limiter.has_room("bin-a")


def test_every_count_of_a_batch_outcome_is_exported_by_bin() -> None:
    def value(name: str, labels: dict[str, str]) -> float:
        return REGISTRY.get_sample_value(name, labels) or 0.0

    counted = {
        "binloop_sampler_rate_limited_total": "rate_limited",
        "binloop_sampler_near_duplicates_total": "near_duplicates",
        "binloop_sampler_below_min_score_total": "below_min_score",
        "binloop_sampler_repeats_total": "repeats",
    }
    bin_id = f"bin-metrics-{uuid.uuid4().hex[:8]}"
    outcome = BatchOutcome()
    for offset, field in enumerate(counted.values()):
        getattr(outcome, field)[bin_id] += 2 + offset
    before = {name: value(name, {"bin": bin_id}) for name in counted}
    selections = {"strategy": "least_confidence"}
    selected_before = value("binloop_sampler_selections_total", selections)
    outcome.selected += make_sampler().select_batch([make_result(1, 0.2)]).selected
    count_outcome(outcome)
    assert {name: value(name, {"bin": bin_id}) - before[name] for name in counted} == {
        name: 2.0 + offset for offset, name in enumerate(counted)
    }
    assert value("binloop_sampler_selections_total", selections) - selected_before == 1.0


# --- the policy file ------------------------------------------------------------------------


def test_a_policy_key_given_twice_is_refused_with_both_lines() -> None:
    # Plain YAML keeps the last: the second `strategies:` block would silently switch the
    # margin strategy the first one enabled off again.
    text = (
        "strategies:\n"
        "  margin: {enabled: true}\n"
        "rate_limits: {per_bin_per_hour: 10, per_bin_per_day: 100}\n"
        "strategies:\n"
        "  diversity: {enabled: false}\n"
    )
    with pytest.raises(PolicyError, match=r"policy.yaml: line 4: key 'strategies' given twice "):
        parse_policy(text, "policy.yaml")
    with pytest.raises(PolicyError, match=r"line 1: key 'enabled' given twice \(first on line 1"):
        parse_policy("margin: {enabled: true, enabled: false}\n")
    # What a merge brings in may still be overridden, as YAML intends.
    merged = parse_policy(
        "strategies:\n  margin: &on {enabled: true}\n  entropy: {<<: *on, enabled: false}\n"
    )
    assert (merged.strategies.margin.enabled, merged.strategies.entropy.enabled) == (True, False)


def test_a_policy_file_that_is_not_utf8_is_a_policy_error_naming_it(tmp_path: Path) -> None:
    path = tmp_path / "policy.yaml"
    path.write_bytes(b"# gr\xf6\xdfere Gewichte\nseed: 3\n")  # Latin-1
    with pytest.raises(PolicyError) as refused:
        load_policy(path)
    assert str(refused.value) == f"{path}: not UTF-8: byte 0xf6 at offset 4"


# --- against a real nats-server ---------------------------------------------------------------


@pytest.mark.integration
async def test_sampler_service_selects_a_batch_exactly_once_and_dead_letters_garbage(
    js: JetStreamContext, nats_client: Client, nats_server: NatsServer, tmp_path: Path
) -> None:
    policy_file = tmp_path / "policy.yaml"
    policy_file.write_text(
        "seed: 11\n"
        "strategies:\n"
        "  least_confidence: {threshold: 0.6}\n"
        "  threshold_band: {enabled: false}\n"
        "  class_balance: {enabled: false}\n"
        "  random: {fraction: 0.3}\n"
    )
    settings = SamplerSettings(
        nats_url=nats_server.url, http_port=0, retry_delay_s=0.05, policy_file=policy_file
    )
    confidences = [0.3, 0.95, 0.55, 0.8, 0.61, 0.9, 0.2, 0.99, 0.7, 0.45, 0.85, 0.75]
    results = [
        make_result(n, c, bin_id="bin-a" if n % 2 else "bin-b") for n, c in enumerate(confidences)
    ]
    sentinel = make_result(999, 0.2)
    expected = {
        r.frame_sha256: "least_confidence" if r.confidence < 0.6 else "random"
        for r in [*results, sentinel]
        if r.confidence < 0.6 or uniform_draw(11, r.frame_sha256) < 0.3
    }
    assert "random" in expected.values()  # the seed is chosen so both strategies show up

    for result in results[:6]:
        await js.publish(INFERENCE_RESULT.subject(result.bin_id), result.model_dump_json().encode())
    await js.publish(INFERENCE_RESULT.subject("bin-a"), b'{"bin_id": "bin-a", "confid')
    # pydantic's JSON parser reads NaN; the schema turns it away before any strategy sees it.
    with_embedding = make_result(500, 0.2).model_copy(update={"embedding": [0.5, 0.25]})
    nan_embedding = with_embedding.model_dump_json().replace("[0.5,0.25]", "[NaN,0.25]")
    await js.publish(INFERENCE_RESULT.subject("bin-a"), nan_embedding.encode())
    for result in [*results[6:], results[0], sentinel]:  # results[0] is delivered twice
        await js.publish(INFERENCE_RESULT.subject(result.bin_id), result.model_dump_json().encode())

    selected = await Collector(SampleSelected).attach(nats_client, SAMPLES_SELECTED.subject())
    dlq = await Collector(DeadLetter).attach(nats_client, dlq_subject("sampler"))
    service = create_app(settings)
    await service.start()
    try:
        await selected.wait_for(
            lambda items: any(s.frame_sha256 == sentinel.frame_sha256 for s in items)
        )
        letters = await dlq.wait_for(2)
    finally:
        await service.stop()

    assert len(letters) == 2
    for letter in letters:
        assert letter.error_type == "ValidationError"
        assert letter.original_subject == INFERENCE_RESULT.subject("bin-a")
        assert letter.service == "sampler"
    (non_finite,) = [letter for letter in letters if "embedding" in letter.error]
    assert "embedding.0" in non_finite.error
    assert "Input should be a finite number" in non_finite.error

    # What the stream holds, not what core subscribers saw: duplicates are dropped there.
    info = await js.stream_info("ENGINE")
    stored = [
        SampleSelected.model_validate_json((await js.get_msg("ENGINE", seq)).data or b"")
        for seq in range(info.state.first_seq, info.state.last_seq + 1)
    ]
    assert {s.frame_sha256: s.strategy for s in stored} == expected
    assert len(stored) == len(expected)
    by_sha = {r.frame_sha256: r for r in [*results, sentinel]}
    for selection in stored:
        source = by_sha[selection.frame_sha256]
        assert selection.event_id == selection_id(source)
        assert selection.predicted == source.top_k
        assert selection.frame_key == frame_key(source.bin_id, CAPTURED_AT, source.frame_sha256)


async def _stored_selections(js: JetStreamContext) -> list[SampleSelected]:
    info = await js.stream_info("ENGINE")
    if info.state.messages == 0:
        return []
    return [
        SampleSelected.model_validate_json((await js.get_msg("ENGINE", seq)).data or b"")
        for seq in range(info.state.first_seq, info.state.last_seq + 1)
    ]


@pytest.mark.integration
async def test_a_restarted_sampler_keeps_each_bins_daily_quota_and_its_selected_frames(
    js: JetStreamContext, nats_client: Client, nats_server: NatsServer, tmp_path: Path
) -> None:
    policy_file = tmp_path / "policy.yaml"
    policy_file.write_text(
        "strategies:\n"
        "  least_confidence: {threshold: 0.6}\n"
        "  threshold_band: {enabled: false}\n"
        "  class_balance: {enabled: false}\n"
        "  diversity: {enabled: false}\n"
        "  random: {enabled: false}\n"
        "rate_limits: {per_bin_per_hour: 3, per_bin_per_day: 3}\n"
    )
    settings = SamplerSettings(
        nats_url=nats_server.url, http_port=0, retry_delay_s=0.05, policy_file=policy_file
    )

    stored_selections = await Collector(SampleSelected).attach_stream(
        js, SAMPLES_SELECTED.subject()
    )

    async def run_once(results: list[InferenceResult], sentinel: InferenceResult) -> None:
        """Runs the service until it has judged `results` and then `sentinel` (another bin,
        which has room: its selection shows the results before it were judged)."""
        service = create_app(settings)
        await service.start()
        try:
            for result in [*results, sentinel]:
                await js.publish(
                    INFERENCE_RESULT.subject(result.bin_id), result.model_dump_json().encode()
                )
            await stored_selections.wait_for(
                lambda items: any(s.frame_sha256 == sentinel.frame_sha256 for s in items)
            )
        finally:
            await service.stop()

    first = [make_result(n, 0.3, bin_id="bin-a") for n in range(6)]
    await run_once(first, make_result(900, 0.3, bin_id="bin-b"))
    # The pod restarted (a deploy, an OOM kill) minutes later; the edge re-sent a frame too.
    later = [make_result(n, 0.3, bin_id="bin-a") for n in range(100, 106)]
    await run_once([*later, first[0]], make_result(901, 0.3, bin_id="bin-b"))

    stored = await _stored_selections(js)
    # The policy says at most 3 selections for bin-a in any 24 hours.
    bin_a = [s.frame_sha256 for s in stored if s.bin_id == "bin-a"]
    assert len(bin_a) == 3, f"{len(bin_a)} selections for bin-a within one day"
    assert len(set(bin_a)) == 3
    assert len([s for s in stored if s.bin_id == "bin-b"]) == 2
