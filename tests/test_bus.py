"""The bus against a real nats-server: dedup by Nats-Msg-Id, DLQ for garbage, retries."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections import Counter
from collections.abc import Awaitable, Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from types import SimpleNamespace
from typing import Any, TypeVar, cast

import nats
import pytest
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.errors import Error as NatsError
from nats.errors import TimeoutError as NatsTimeoutError
from nats.js.api import AckPolicy, ConsumerConfig, PubAck
from nats.js.client import JetStreamContext
from nats.js.errors import NoStreamResponseError

from binloop.bus import Delivery, Outgoing, PendingAcks, ensure_streams, subscribe, subscribe_batch
from binloop.bus.consume import EventHandler, FailureCounts, RetryPolicy
from binloop.bus.publish import PublishTimeoutError
from binloop.errors import NotReadyError, PermanentError, TransientError
from binloop.natsserver import NatsServer
from binloop.process import free_port
from binloop.runtime import ServiceApp, new_service
from binloop.settings import ServiceSettings
from schemas import DeadLetter, TrainingRequested
from schemas.routes import DLQ, STREAMS, TRAINING_REQUESTED, Route
from tests.helpers import Collector, eventually

T = TypeVar("T")

pytestmark = pytest.mark.integration


def _settings(url: str, **more: Any) -> ServiceSettings:
    return ServiceSettings(nats_url=url, http_port=0, retry_delay_s=0.05, max_deliveries=3, **more)


async def test_publish_is_deduplicated_by_event_id(js: JetStreamContext, nats_server) -> None:
    service = new_service("probe", _settings(nats_server.url))
    await service.start()
    try:
        event = TrainingRequested(producer="test", dataset_name="d")
        await service.publisher.publish(TRAINING_REQUESTED, event)
        await service.publisher.publish(TRAINING_REQUESTED, event)
        info = await js.stream_info("ENGINE")
        assert info.state.messages == 1
    finally:
        await service.stop()


async def test_garbage_goes_to_dlq_and_service_keeps_serving(
    js: JetStreamContext, nats_client: Client, nats_server
) -> None:
    service = new_service("echo", _settings(nats_server.url))
    seen: list[str] = []
    both_seen = asyncio.Event()

    async def handle(delivery: Delivery[TrainingRequested]) -> list[Outgoing]:
        if delivery.event.dataset_name == "poison":
            raise PermanentError("poisoned dataset name")
        if delivery.event.dataset_name == "flaky" and delivery.attempt < 2:
            raise TransientError("try again")
        seen.append(delivery.event.dataset_name)
        if set(seen) == {"flaky", "good"}:
            both_seen.set()
        return []

    subscribe(
        service.broker,
        service.publisher,
        TRAINING_REQUESTED,
        handle,
        durable="echo",
        policy=service.policy,
    )
    dlq = await Collector(DeadLetter).attach(nats_client, DLQ.wildcard)
    await service.start()
    try:
        subject = TRAINING_REQUESTED.subject()
        await js.publish(subject, b"{not json")
        await js.publish(subject, b'{"schema_version": 2, "producer": "x", "dataset_name": "d"}')
        for name in ("poison", "flaky", "good"):
            event = TrainingRequested(
                producer="test", dataset_name=name, occurred_at=datetime.now(UTC)
            )
            await js.publish(subject, event.model_dump_json().encode())
        letters = await dlq.wait_for(3)
        assert {d.error_type for d in letters} == {"ValidationError", "PermanentError"}
        assert all(d.original_subject == subject for d in letters)
        assert any("schema_version" in d.error for d in letters)
        await asyncio.wait_for(both_seen.wait(), 20)
        assert sorted(seen) == ["flaky", "good"]
    finally:
        await service.stop()


async def test_an_event_with_fields_this_release_does_not_know_is_handled(
    js: JetStreamContext, nats_client: Client, nats_server
) -> None:
    # A newer producer may add optional fields within v1; a consumer still on this release
    # (a bin the cloud upgraded before it) must handle its events, not dead-letter them.
    service = new_service("older", _settings(nats_server.url))
    handled: asyncio.Queue[TrainingRequested] = asyncio.Queue()

    async def handle(delivery: Delivery[TrainingRequested]) -> list[Outgoing]:
        handled.put_nowait(delivery.event)
        return []

    subscribe(
        service.broker,
        service.publisher,
        TRAINING_REQUESTED,
        handle,
        durable="older",
        policy=service.policy,
    )
    dlq = await Collector(DeadLetter).attach(nats_client, DLQ.wildcard)
    await service.start()
    try:
        newer = TrainingRequested(producer="newer", dataset_name="d").model_dump(mode="json")
        await js.publish(
            TRAINING_REQUESTED.subject(),
            json.dumps(newer | {"priority": "high"}).encode(),
        )
        event = await asyncio.wait_for(handled.get(), 20)
        assert (event.producer, event.dataset_name) == ("newer", "d")
        assert dlq.items == []
    finally:
        await service.stop()


def test_random_output_ids_are_derived_from_the_input_and_chosen_ones_kept() -> None:
    import uuid

    from binloop.bus.consume import derive_event_ids

    cause = TrainingRequested(producer="t", dataset_name="d")
    chosen = uuid.uuid5(uuid.NAMESPACE_URL, "label-of-frame")
    outputs = [
        Outgoing(TRAINING_REQUESTED, TrainingRequested(producer="t", dataset_name="a")),
        Outgoing(
            TRAINING_REQUESTED, TrainingRequested(producer="t", dataset_name="b", event_id=chosen)
        ),
    ]
    first = derive_event_ids(cause, outputs)
    again = derive_event_ids(cause, outputs)
    assert [o.event.event_id for o in first] == [o.event.event_id for o in again]
    assert first[0].event.event_id != outputs[0].event.event_id
    assert first[1].event.event_id == chosen


async def test_one_bad_message_does_not_take_its_batch_down(
    js: JetStreamContext, nats_client: Client, nats_server
) -> None:
    service = new_service("batcher", _settings(nats_server.url))
    handled: list[str] = []
    all_good = asyncio.Event()

    async def handle(batch: list[Delivery[TrainingRequested]]) -> list[Outgoing]:
        if any(d.event.dataset_name == "poison" for d in batch):
            raise PermanentError("poisoned dataset name")
        handled.extend(d.event.dataset_name for d in batch)
        if len(handled) == 4:
            all_good.set()
        return []

    subscribe_batch(
        service.broker,
        service.publisher,
        TRAINING_REQUESTED,
        handle,
        durable="batcher",
        batch_size=10,
        max_wait_s=0.5,
        policy=service.policy,
    )
    dlq = await Collector(DeadLetter).attach(nats_client, DLQ.wildcard)
    for name in ("a", "b", "poison", "c", "d"):
        event = TrainingRequested(producer="test", dataset_name=name)
        await js.publish(TRAINING_REQUESTED.subject(), event.model_dump_json().encode())
    await service.start()
    try:
        await asyncio.wait_for(all_good.wait(), 20)
        letters = await dlq.wait_for(1)
    finally:
        await service.stop()
    assert sorted(handled) == ["a", "b", "c", "d"]
    assert [d.error_type for d in letters] == ["PermanentError"]
    assert letters[0].original_subject == TRAINING_REQUESTED.subject()


# --- fetch timeouts (binloop/bus/fetch_timeouts.py) ---------------------------------------------


async def test_a_bare_fetch_timeout_leaves_as_nats_own_and_others_pass_through() -> None:
    import nats.errors

    from binloop.bus.fetch_timeouts import as_nats_timeouts

    async def bare_timeout() -> list[int]:
        raise TimeoutError  # what nats-py 2.16 raises when the deadline runs out mid-fetch

    async def nats_timeout() -> list[int]:
        raise nats.errors.TimeoutError

    async def other_failure() -> list[int]:
        raise ConnectionError("down")

    async def messages() -> list[int]:
        return [1, 2]

    with pytest.raises(nats.errors.TimeoutError) as caught:
        await as_nats_timeouts(bare_timeout)()
    assert isinstance(caught.value.__cause__, TimeoutError)
    with pytest.raises(nats.errors.TimeoutError):
        await as_nats_timeouts(nats_timeout)()
    with pytest.raises(ConnectionError):
        await as_nats_timeouts(other_failure)()
    assert await as_nats_timeouts(messages)() == [1, 2]


@pytest.mark.integration
async def test_pull_fetch_on_an_empty_consumer_times_out_as_nats_timeout(
    js: JetStreamContext,
) -> None:
    import nats.errors

    from binloop.bus import fetch_timeouts

    fetch_timeouts.install()
    fetch_timeouts.install()  # idempotent: wrapped once
    fetch = JetStreamContext.PullSubscription.fetch
    assert not getattr(fetch.__wrapped__, "_binloop_nats_timeouts", False)  # type: ignore[attr-defined]
    await js.add_stream(name="EMPTY", subjects=["empty.>"])
    subscription = await js.pull_subscribe("empty.x", "empty-consumer")
    for timeout in (1e-6, 0.01):
        with pytest.raises(nats.errors.TimeoutError):
            await subscription.fetch(1, timeout=timeout)


# --- pipelined consumers and asynchronous publish acks ------------------------------------------

PROBE_OUT = Route("probe.out", "models.probe.v1", "ENGINE", TrainingRequested)
"""An output route inside the ENGINE stream that no service consumes."""
NOWHERE = Route("nowhere", "nowhere.v1", "NOWHERE", TrainingRequested)
"""An output route no stream captures: JetStream cannot store what is sent to it."""


async def _wait_until_settled(js: JetStreamContext, durable: str) -> bool:
    """Whether the consumer acked everything it was given (polled for up to 10 s)."""
    for _ in range(200):
        info = await js.consumer_info("ENGINE", durable)
        if info.num_ack_pending == 0 and info.num_pending == 0:
            return True
        await asyncio.sleep(0.05)
    return False


async def _pipelined_probe(
    js: JetStreamContext,
    service: ServiceApp,
    handle: EventHandler[TrainingRequested],
    durable: str,
    input_name: str,
) -> Collector[TrainingRequested]:
    """A pipelined consumer of training.requested, one input already published, and a reader
    of what JetStream stored on PROBE_OUT."""
    subscribe(
        service.broker,
        service.publisher,
        TRAINING_REQUESTED,
        handle,
        durable=durable,
        policy=service.policy,
        pipelined=True,
    )
    stored = await Collector(TrainingRequested).attach_stream(js, PROBE_OUT.subject())
    event = TrainingRequested(producer="test", dataset_name=input_name)
    await js.publish(TRAINING_REQUESTED.subject(), event.model_dump_json().encode())
    return stored


async def test_a_pipelined_consumer_keeps_output_order_and_acks_every_input(
    js: JetStreamContext, nats_server
) -> None:
    service = new_service("pipe", _settings(nats_server.url))
    names = [f"n{i:02d}" for i in range(30)]

    async def handle(delivery: Delivery[TrainingRequested]) -> list[Outgoing]:
        name = delivery.event.dataset_name
        return [Outgoing(PROBE_OUT, TrainingRequested(producer="pipe", dataset_name=name))]

    subscribe(
        service.broker,
        service.publisher,
        TRAINING_REQUESTED,
        handle,
        durable="pipe",
        policy=service.policy,
        pipelined=True,
        max_unsettled=4,
    )
    stored = await Collector(TrainingRequested).attach_stream(js, PROBE_OUT.subject())
    for name in names:
        event = TrainingRequested(producer="test", dataset_name=name)
        await js.publish(TRAINING_REQUESTED.subject(), event.model_dump_json().encode())
    await service.start()
    try:
        outputs = await stored.wait_for(len(names))
        assert await _wait_until_settled(js, "pipe")
    finally:
        await service.stop()
    assert [o.dataset_name for o in outputs] == names


async def test_a_pipelined_input_whose_output_is_not_stored_is_retried_not_acked(
    js: JetStreamContext, nats_server
) -> None:
    service = new_service("pipe-retry", _settings(nats_server.url))
    attempts: list[int] = []

    async def handle(delivery: Delivery[TrainingRequested]) -> list[Outgoing]:
        attempts.append(delivery.attempt)
        # The first time the output goes where no stream stores it: the input must come back.
        route = NOWHERE if delivery.attempt == 1 else PROBE_OUT
        return [Outgoing(route, TrainingRequested(producer="pipe", dataset_name="x"))]

    stored = await _pipelined_probe(js, service, handle, "pipe-retry", "x")
    await service.start()
    try:
        outputs = await stored.wait_for(1)
        assert await _wait_until_settled(js, "pipe-retry")
    finally:
        await service.stop()
    assert attempts == [1, 2]
    assert [o.dataset_name for o in outputs] == ["x"]


async def test_send_all_returns_before_the_acks_and_wait_confirms_them(
    js: JetStreamContext, nats_server
) -> None:
    service = new_service("sender", _settings(nats_server.url))
    await service.start()
    try:
        events = [TrainingRequested(producer="t", dataset_name=f"d{i}") for i in range(5)]
        pending = await service.publisher.send_all([Outgoing(PROBE_OUT, e) for e in events])
        assert len(pending) == 5
        await pending.wait()
        info = await js.stream_info("ENGINE")
        assert info.state.messages == 5
        failing = await service.publisher.send_all([Outgoing(NOWHERE, events[0])])
        with pytest.raises(NoStreamResponseError):
            await failing.wait()
    finally:
        await service.stop()


async def test_pending_acks_that_never_come_fail_as_a_transient_timeout() -> None:
    loop = asyncio.get_running_loop()
    acked: asyncio.Future[PubAck] = loop.create_future()
    acked.set_result(PubAck(stream="ENGINE", seq=1))
    never: asyncio.Future[PubAck] = loop.create_future()
    with pytest.raises(PublishTimeoutError, match="acked 1 of 2") as caught:
        await PendingAcks([acked, never], timeout_s=0.01).wait()
    assert isinstance(caught.value, TransientError)  # retried, not dead-lettered
    assert never.cancelled()
    await PendingAcks([], timeout_s=0.01).wait()  # nothing sent, nothing to wait for


async def test_settlements_wait_for_room_and_report_what_failed(
    caplog: pytest.LogCaptureFixture,
) -> None:
    from binloop.bus.consume import Settlements

    settlements = Settlements("probe", limit=1)
    release = asyncio.Event()
    finished: list[str] = []

    async def settle(name: str) -> None:
        await release.wait()
        finished.append(name)

    async def broken() -> None:
        raise ConnectionError("connection closed")

    await settlements.start(settle("first"))
    second = asyncio.create_task(settlements.start(settle("second")))
    await asyncio.sleep(0)
    assert not second.done()  # no room until the first one settles
    release.set()
    await second
    await settlements.start(broken())
    for _ in range(10):
        await asyncio.sleep(0)
    assert finished == ["first", "second"]
    assert "could not settle" in caplog.text
    with pytest.raises(ValueError, match="must be >= 1"):
        Settlements("probe", limit=0)


async def test_a_message_dead_lettered_twice_leaves_one_dlq_entry(
    js: JetStreamContext, nats_server
) -> None:
    from binloop.bus.consume import RetryPolicy, _Consumer, dead_letter_id

    service = new_service("twice", _settings(nats_server.url))
    await service.start()
    try:
        await js.publish(TRAINING_REQUESTED.subject(), b"{not json")
        subscription = await js.pull_subscribe(TRAINING_REQUESTED.subject(), "twice")
        (msg,) = await subscription.fetch(1, timeout=5)
        consumer: _Consumer[TrainingRequested] = _Consumer(
            service.publisher, TRAINING_REQUESTED, RetryPolicy(), ack_wait_s=10
        )
        await consumer.dead_letter(msg, ValueError("garbage"))
        # As after a crash between the DLQ publish and the ack: the same stream message,
        # delivered a second time (its ack subject counts the delivery and consumer sequence).
        tokens = (msg.reply or "").split(".")
        tokens[4], tokens[6] = "2", "2"
        again = Msg(_client=msg._client, subject=msg.subject, reply=".".join(tokens), data=msg.data)
        await consumer.dead_letter(again, ValueError("garbage"))
        info = await js.stream_info("DLQ")
        assert info.state.messages == 1
        assert dead_letter_id("twice", again) == dead_letter_id("twice", msg)
        assert dead_letter_id("other", msg) != dead_letter_id("twice", msg)
        # Another consumer of the same message (another bin's durable) has its own entry.
        tokens[3] = "twice-bin-2"
        elsewhere = Msg(_client=msg._client, subject=msg.subject, reply=".".join(tokens))
        assert dead_letter_id("twice", elsewhere) != dead_letter_id("twice", msg)
    finally:
        await service.stop()


async def test_streams_drop_repeated_ids_for_their_own_window(js: JetStreamContext) -> None:
    windows = {name: (await js.stream_info(name)).config.duplicate_window for name in STREAMS}
    assert windows["FRAMES"] == 120
    # A dead letter found again hours later (a restart re-listing it) is still one entry.
    assert windows["DLQ"] == 24 * 3600


async def test_a_restarted_service_updates_its_existing_consumer_to_the_new_settings(
    js: JetStreamContext, nats_server
) -> None:
    async def ignore(delivery: Delivery[TrainingRequested]) -> list[Outgoing]:
        return []

    async def run_once(ack_wait_s: float) -> None:
        service = new_service("evolving", _settings(nats_server.url))
        subscribe(
            service.broker,
            service.publisher,
            TRAINING_REQUESTED,
            ignore,
            durable="evolving",
            ack_wait_s=ack_wait_s,
        )
        await service.start()
        await service.stop()

    await run_once(10.0)
    first = await js.consumer_info("ENGINE", "evolving")
    await run_once(45.0)
    second = await js.consumer_info("ENGINE", "evolving")
    await run_once(20.0)  # shorter: left for the operator, running replicas rely on 45 s
    third = await js.consumer_info("ENGINE", "evolving")

    assert first.config.ack_wait == 10.0
    assert second.config.ack_wait == 45.0
    assert third.config.ack_wait == 45.0
    # What JetStream cannot change stays as it was; the consumer kept its position.
    assert second.config.filter_subject == first.config.filter_subject
    assert second.config.deliver_policy == first.config.deliver_policy
    assert second.delivered == first.delivered


def test_only_fields_jetstream_can_change_count_as_changes() -> None:
    from nats.js.api import DeliverPolicy

    from binloop.bus.consumers import changed_fields

    existing = ConsumerConfig(ack_wait=10, max_deliver=-1, deliver_policy=DeliverPolicy.ALL)
    wanted = ConsumerConfig(ack_wait=30, max_deliver=-1, deliver_policy=DeliverPolicy.LAST)
    assert changed_fields(existing, wanted) == {"ack_wait": 30}
    assert changed_fields(existing, ConsumerConfig()) == {}
    shorter = ConsumerConfig(ack_wait=5, max_deliver=3)
    assert changed_fields(existing, shorter) == {"max_deliver": 3}
    # A larger max_ack_pending is applied; a smaller one (an operator's?) costs nothing to keep.
    pending = ConsumerConfig(ack_wait=10, max_deliver=-1, max_ack_pending=1000)
    assert changed_fields(pending, ConsumerConfig(max_ack_pending=4096)) == {
        "max_ack_pending": 4096
    }
    assert changed_fields(pending, ConsumerConfig(max_ack_pending=500)) == {}
    unlimited = ConsumerConfig(max_ack_pending=-1)
    assert changed_fields(unlimited, ConsumerConfig(max_ack_pending=4096)) == {}


@pytest.mark.parametrize("existing", [False, True], ids=["new", "from-an-earlier-release"])
async def test_a_batch_above_jetstreams_default_max_ack_pending_is_fetched_whole(
    js: JetStreamContext, nats_server: NatsServer, existing: bool
) -> None:
    # At JetStream's default max_ack_pending (1000) a fetch of 1500 got 1000 messages and
    # then waited out its whole max_wait_s for the rest: the sampler's batch_size (up to
    # 4096, its diversity window) was cut at 1000 and its throughput capped.
    count = 1500
    if existing:  # as a release that did not set max_ack_pending created it
        await js.add_consumer(
            "ENGINE",
            ConsumerConfig(
                durable_name="big-batches",
                filter_subject=TRAINING_REQUESTED.wildcard,
                ack_policy=AckPolicy.EXPLICIT,
                ack_wait=10,
                max_deliver=-1,
            ),
        )
        assert (await js.consumer_info("ENGINE", "big-batches")).config.max_ack_pending == 1000
    service = new_service("big-batches", _settings(nats_server.url))
    sizes: list[int] = []
    all_handled = asyncio.Event()

    async def handle(batch: list[Delivery[TrainingRequested]]) -> list[Outgoing]:
        sizes.append(len(batch))
        if sum(sizes) >= count:
            all_handled.set()
        return []

    subscribe_batch(
        service.broker,
        service.publisher,
        TRAINING_REQUESTED,
        handle,
        durable="big-batches",
        batch_size=count,
        max_wait_s=3.0,
        policy=service.policy,
    )
    event = TrainingRequested(producer="test", dataset_name="d").model_dump_json().encode()
    await asyncio.gather(*(js.publish(TRAINING_REQUESTED.subject(), event) for _ in range(count)))
    await service.start()
    try:
        await asyncio.wait_for(all_handled.wait(), 30)
        info = await js.consumer_info("ENGINE", "big-batches")
    finally:
        await service.stop()
    assert sizes == [count]
    assert info.config.max_ack_pending == count


async def test_a_send_the_client_refuses_gives_back_its_pending_slot(
    nats_server, monkeypatch: pytest.MonkeyPatch
) -> None:
    import nats.errors

    service = new_service("refused", _settings(nats_server.url))
    await service.start()
    try:
        js = service.publisher._jetstream()
        free = js._publish_async_pending_semaphore._value
        connection = service.broker.connection

        async def buffer_full(*args: object, **kwargs: object) -> None:
            raise nats.errors.OutboundBufferLimitError

        monkeypatch.setattr(connection, "publish", buffer_full)
        event = TrainingRequested(producer="t", dataset_name="d")
        for _ in range(3):
            with pytest.raises(nats.errors.OutboundBufferLimitError):
                await service.publisher.send_all([Outgoing(PROBE_OUT, event)])
        await asyncio.sleep(0)  # the cancelled futures' callbacks run
        assert js._publish_async_pending_semaphore._value == free
        assert js.publish_async_pending() == 0
        monkeypatch.undo()
        await service.publisher.publish(PROBE_OUT, event)  # and the next send works
    finally:
        await service.stop()


async def test_a_send_waits_for_a_free_pending_slot_at_most_the_ack_timeout(
    nats_server,
) -> None:
    """Sends skip nats-py's timed wait for a slot while one is free (binloop/bus/publish.py);
    with every slot taken they still wait for one, up to the ack timeout, and no longer."""
    from nats.js.errors import TooManyStalledMsgsError

    service = new_service("stalled", _settings(nats_server.url))
    await service.start()
    try:
        service.publisher.ack_timeout_s = 0.5
        js = service.publisher._jetstream()
        slots = js._publish_async_pending_semaphore
        taken = 0
        while not slots.locked():
            await slots.acquire()
            taken += 1
        event = TrainingRequested(producer="t", dataset_name="d")
        with pytest.raises(TooManyStalledMsgsError):
            await service.publisher.send_all([Outgoing(PROBE_OUT, event)])
        asyncio.get_running_loop().call_later(0.1, slots.release)  # one slot frees up
        await (await service.publisher.send_all([Outgoing(PROBE_OUT, event)])).wait()
        for _ in range(taken - 1):
            slots.release()
        assert not slots.locked()
        await service.publisher.publish(PROBE_OUT, event)  # the fast path
        assert js.publish_async_pending() == 0
    finally:
        await service.stop()


async def test_a_long_send_lets_other_tasks_run(nats_server, js: JetStreamContext) -> None:
    """Sends with a free slot do not yield to the event loop, so send_all gives it a turn
    every SENDS_PER_TURN events: heartbeats and health checks are not held up by a batch."""
    from binloop.bus.publish import SENDS_PER_TURN

    service = new_service("long-send", _settings(nats_server.url))
    await service.start()
    turns = 0

    async def other_task() -> None:
        nonlocal turns
        while True:
            turns += 1
            await asyncio.sleep(0)

    try:
        await service.publisher.publish(
            PROBE_OUT, TrainingRequested(producer="t", dataset_name="0")
        )
        before = (await js.stream_info(PROBE_OUT.stream)).state.messages
        ticker = asyncio.create_task(other_task())
        await asyncio.sleep(0)
        events = [
            Outgoing(PROBE_OUT, TrainingRequested(producer="t", dataset_name=str(i)))
            for i in range(3 * SENDS_PER_TURN)
        ]
        turns = 0
        pending = await service.publisher.send_all(events)
        turns_during_send = turns
        ticker.cancel()
        await pending.wait()
        assert turns_during_send >= 2
        stored = (await js.stream_info(PROBE_OUT.stream)).state.messages - before
        assert stored == len(events)
    finally:
        await service.stop()


async def test_stopping_a_pipelined_consumer_settles_what_it_sent(
    js: JetStreamContext, nats_server
) -> None:
    service = new_service("pipe-stop", _settings(nats_server.url))

    async def handle(delivery: Delivery[TrainingRequested]) -> list[Outgoing]:
        event = TrainingRequested(producer="pipe", dataset_name=delivery.event.dataset_name)
        return [Outgoing(PROBE_OUT, event)]

    stored = await _pipelined_probe(js, service, handle, "pipe-stop", "last")
    await service.start()
    await stored.wait_for(1)
    await service.stop()  # right away: the input's ack must not be left behind
    info = await js.consumer_info("ENGINE", "pipe-stop")
    assert (info.num_ack_pending, info.num_pending) == (0, 0)


def test_a_publish_timeout_is_transient_and_a_nats_timeout() -> None:
    import nats.errors

    error = PublishTimeoutError("no ack")
    assert isinstance(error, TransientError)  # retried by consumers
    assert isinstance(error, nats.errors.TimeoutError)  # and handled where nats timeouts are
    assert isinstance(error, TimeoutError)


@pytest.mark.integration
async def test_a_stop_does_not_wait_for_ever_on_a_task_that_swallowed_its_cancel(
    nats_server: Any,
) -> None:
    """nats-py (around a publish) and asyncio.wait_for (in a race) can each swallow a cancel:
    the task goes back to its loop, and a stop that cancelled it once would wait for ever."""
    service = new_service("stubborn", _settings(nats_server.url))
    cancels = 0

    async def stubborn() -> None:
        nonlocal cancels
        while True:
            try:
                await asyncio.sleep(3600)
            except asyncio.CancelledError:
                cancels += 1
                if cancels > 1:
                    raise  # the second cancel ends it

    service.background.append(stubborn)
    await service.start()
    await asyncio.sleep(0)  # the task is running
    await asyncio.wait_for(service.stop(), 30)
    assert cancels == 2


# --- what counts as a failure (binloop/bus/consume.py) ------------------------------------------


async def _publish_request(js: JetStreamContext, name: str) -> None:
    event = TrainingRequested(producer="test", dataset_name=name, occurred_at=datetime.now(UTC))
    await js.publish(TRAINING_REQUESTED.subject(), event.model_dump_json().encode())


async def test_not_ready_retries_are_not_failures_and_do_not_bring_the_dead_letter_closer(
    js: JetStreamContext, nats_client: Client, nats_server: Any
) -> None:
    """max_deliveries=3. Both messages find the service not ready for their first 3 deliveries
    (retried without limit). Then "recovers" fails once and is handled at the next delivery;
    "broken" keeps failing and is dead-lettered at its third failure, its sixth delivery."""
    service = new_service("notready", _settings(nats_server.url))
    handled = asyncio.Event()
    attempts: dict[str, list[int]] = {"recovers": [], "broken": []}

    async def handle(delivery: Delivery[TrainingRequested]) -> list[Outgoing]:
        name = delivery.event.dataset_name
        attempts[name].append(delivery.attempt)
        if delivery.attempt <= 3:
            raise NotReadyError("no model loaded yet")
        if name == "broken" or delivery.attempt == 4:
            raise TransientError("object store blip")
        handled.set()
        return []

    subscribe(
        service.broker,
        service.publisher,
        TRAINING_REQUESTED,
        handle,
        durable="notready",
        policy=service.policy,
    )
    dlq = await Collector(DeadLetter).attach(nats_client, DLQ.wildcard)
    await service.start()
    try:
        await _publish_request(js, "recovers")
        await _publish_request(js, "broken")
        await asyncio.wait_for(handled.wait(), 20)
        (letter,) = await dlq.wait_for(1)
    finally:
        await service.stop()
    assert attempts["recovers"] == [1, 2, 3, 4, 5]
    assert attempts["broken"] == [1, 2, 3, 4, 5, 6]
    assert '"broken"' in letter.payload_preview
    assert letter.error_type == "TransientError"
    assert letter.delivery_attempt == 6


async def test_a_failure_after_delivery_backstop_deliveries_is_the_last(
    js: JetStreamContext, nats_client: Client, nats_server: Any
) -> None:
    """The count of failures is the process's; JetStream's delivery count still ends a message
    whose failures were spread over restarts. Here the backstop is 3 deliveries."""
    service = new_service("backstop", _settings(nats_server.url))
    attempts: list[int] = []

    async def handle(delivery: Delivery[TrainingRequested]) -> list[Outgoing]:
        attempts.append(delivery.attempt)
        if delivery.attempt < 3:
            raise NotReadyError("not yet")
        raise TransientError("store down")

    subscribe(
        service.broker,
        service.publisher,
        TRAINING_REQUESTED,
        handle,
        durable="backstop",
        policy=RetryPolicy(max_deliveries=100, retry_delay_s=0.05, delivery_backstop=3),
    )
    dlq = await Collector(DeadLetter).attach(nats_client, DLQ.wildcard)
    await service.start()
    try:
        await _publish_request(js, "d")
        (letter,) = await dlq.wait_for(1)
    finally:
        await service.stop()
    assert attempts == [1, 2, 3]
    assert letter.delivery_attempt == 3


def test_failure_counts_are_per_message_and_forget_the_least_recently_failed() -> None:
    counts = FailureCounts(capacity=2)
    first, second, third = ("ENGINE", "c", 1), ("ENGINE", "c", 2), ("ENGINE", "c", 3)
    assert counts.add(first) == 1
    assert counts.add(second) == 1
    assert counts.add(first) == 2
    assert counts.add(third) == 1  # over capacity: `second` failed least recently
    assert len(counts) == 2
    assert counts.add(second) == 1
    assert counts.add(third) == 2
    counts.forget(third)  # acked or dead-lettered
    assert counts.add(third) == 1
    counts.forget(None)  # a message without JetStream metadata has no key
    with pytest.raises(ValueError, match="must be >= 1"):
        FailureCounts(capacity=0)


async def test_a_handler_that_returns_something_unusable_is_dead_lettered_not_left_hanging(
    js: JetStreamContext, nats_client: Client, nats_server: Any
) -> None:
    """Deriving the outputs' ids is part of handling: a handler that returns an event where an
    Outgoing belongs fails like any bug, instead of leaving its input unacked for ever."""
    service = new_service("unusable", _settings(nats_server.url))

    async def handle(delivery: Delivery[TrainingRequested]) -> list[Outgoing]:
        return [delivery.event]  # type: ignore[list-item]

    subscribe(
        service.broker,
        service.publisher,
        TRAINING_REQUESTED,
        handle,
        durable="unusable",
        policy=service.policy,
    )
    dlq = await Collector(DeadLetter).attach(nats_client, DLQ.wildcard)
    await service.start()
    try:
        await _publish_request(js, "d")
        (letter,) = await dlq.wait_for(1)
    finally:
        await service.stop()
    assert letter.error_type == "AttributeError"
    assert letter.delivery_attempt == 3
    info = await js.consumer_info("ENGINE", "unusable")
    assert info.num_ack_pending == 0


async def test_the_in_progress_heartbeat_outlives_a_beat_the_connection_refused() -> None:
    import nats.errors

    from binloop.bus.consume import _Consumer

    beats = 0
    two_more = asyncio.Event()

    class Message:
        async def in_progress(self) -> None:
            nonlocal beats
            beats += 1
            if beats == 1:
                raise nats.errors.ConnectionReconnectingError
            if beats == 3:
                two_more.set()

    consumer: _Consumer[TrainingRequested] = _Consumer(
        cast(Any, SimpleNamespace(service="beats")), TRAINING_REQUESTED, RetryPolicy(), 0.03
    )
    heartbeat = asyncio.create_task(consumer.keep_alive([cast(Msg, Message())]))
    try:
        await asyncio.wait_for(two_more.wait(), 20)
    finally:
        heartbeat.cancel()
    assert beats >= 3


# --- consumers JetStream cannot serve (binloop/bus/outages.py) ----------------------------------


def _count_fetches(monkeypatch: pytest.MonkeyPatch) -> Counter[str]:
    """Outcomes of every pull fetch from now on, by exception name ("ok" for messages)."""
    outcomes: Counter[str] = Counter()
    original = JetStreamContext.PullSubscription.fetch

    async def counting_fetch(self: Any, *args: Any, **kwargs: Any) -> Any:
        try:
            result = await original(self, *args, **kwargs)
        except Exception as exc:
            outcomes[type(exc).__name__] += 1
            raise
        outcomes["ok"] += 1
        return result

    monkeypatch.setattr(JetStreamContext.PullSubscription, "fetch", counting_fetch)
    return outcomes


def _recording_subscriber(service: ServiceApp, durable: str) -> Collector[TrainingRequested]:
    """Subscribes `service` to training.requested; what it handles lands in the collector."""
    seen: Collector[TrainingRequested] = Collector(TrainingRequested)

    async def handle(delivery: Delivery[TrainingRequested]) -> list[Outgoing]:
        seen.items.append(delivery.event)
        seen._changed.set()
        return []

    subscribe(
        service.broker,
        service.publisher,
        TRAINING_REQUESTED,
        handle,
        durable=durable,
        policy=service.policy,
    )
    return seen


def _named(name: str) -> Callable[[list[TrainingRequested]], bool]:
    return lambda events: any(e.dataset_name == name for e in events)


async def test_a_deleted_consumer_is_created_again_and_consumption_resumes(
    js: JetStreamContext, nats_server: Any, caplog: pytest.LogCaptureFixture
) -> None:
    """An operator's `nats consumer rm` under a running service: the next fetch gets a 503,
    the consumer is created again as declared, and what comes next is handled."""
    service = new_service("lost", _settings(nats_server.url))
    seen = _recording_subscriber(service, "lost")
    await service.start()
    try:
        await _publish_request(js, "before")
        await seen.wait_for(_named("before"))
        await js.delete_consumer("ENGINE", "lost")
        await _publish_request(js, "after")
        await seen.wait_for(_named("after"))
        info = await js.consumer_info("ENGINE", "lost")
        assert service.is_ready()
    finally:
        await service.stop()
    assert info.config.filter_subject == TRAINING_REQUESTED.subject()
    assert info.config.ack_wait == 10.0
    assert "created it again as declared" in caplog.text


async def test_a_consumer_jetstream_cannot_serve_is_fetched_with_back_off_and_fails_readiness(
    js: JetStreamContext,
    nats_server: Any,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Its stream deleted, the consumer can be neither served nor created again: fetches back
    off (FastStream alone refetched thousands of times a second), the outage is logged once,
    and the service is not ready until the stream is back and the consumer with it."""
    outcomes = _count_fetches(monkeypatch)
    service = new_service("unserved", _settings(nats_server.url))
    seen = _recording_subscriber(service, "unserved")
    await service.start()
    try:
        await eventually(service.is_ready)
        await js.delete_stream("ENGINE")
        await eventually(lambda: not service.is_ready())
        unavailable_before = outcomes["ServiceUnavailableError"]
        await asyncio.sleep(2.0)  # a window to count fetches in, not a wait for something
        unavailable_in_window = outcomes["ServiceUnavailableError"] - unavailable_before
        await ensure_streams(js)
        await eventually(service.is_ready, timeout=30)
        await _publish_request(js, "back")
        await seen.wait_for(_named("back"))
    finally:
        await service.stop()
    assert unavailable_in_window < 50  # back-off: about 3; without it, thousands
    outage_logs = [r for r in caplog.records if "is unavailable" in r.getMessage()]
    assert len(outage_logs) == 1
    assert outcomes["ServiceUnavailableError"] >= 3


def test_fetch_back_off_grows_to_its_cap_and_the_fetch_is_wrapped_once() -> None:
    from binloop.bus import fetch_timeouts, outages

    delays = []
    outage = outages._Outage()
    for _ in range(12):
        outage.unavailable += 1
        delays.append(outage.backoff_s())
    assert delays == sorted(delays)
    assert delays[0] == outages.FIRST_BACKOFF_S
    assert delays[-1] == outages.MAX_BACKOFF_S
    outages.install()
    fetch_timeouts.install()
    layers = []
    fetch: Any = JetStreamContext.PullSubscription.fetch
    while fetch is not None:
        layers.append(fetch)
        fetch = getattr(fetch, "__wrapped__", None)
    assert len(layers) == 3  # nats-py's fetch and one wrapper of each module


# --- stream replicas on a 3-server cluster (deploy/k8s/base/nats/nats.yaml) ---------------------


@contextlib.contextmanager
def _three_server_cluster(tmp_path: Path) -> Iterator[list[NatsServer]]:
    ports = [free_port() for _ in range(3)]
    routes = ",".join(f"nats://127.0.0.1:{port}" for port in ports)
    servers = [
        NatsServer(
            tmp_path / f"s{i}",
            extra_args=[
                *("-n", f"s{i}", "--cluster_name", "binloop-hub"),
                *("--cluster", f"nats://127.0.0.1:{ports[i]}", "--routes", routes),
            ],
        )
        for i in range(3)
    ]
    try:
        for server in servers:
            server.start()
        yield servers
    finally:
        for server in servers:
            server.stop()


async def _when_jetstream_is_up(action: Callable[[], Awaitable[T]]) -> T:
    """`action()` once the cluster's JetStream meta group has a leader (retried until then)."""
    for _ in range(100):
        try:
            return await action()
        except (NatsError, TimeoutError):
            await asyncio.sleep(0.2)
    return await action()


async def test_streams_and_the_registry_bucket_get_the_replicas_asked_and_keep_more(
    tmp_path: Path,
) -> None:
    """ensure_streams runs at every service start: it makes stream_replicas copies of a new
    stream, and never scales down one that an operator (or another service) raised."""
    from services.model_registry.store import RegistryStore

    with _three_server_cluster(tmp_path) as servers:
        client = await nats.connect(servers[0].url)
        try:
            js = client.jetstream()
            await _when_jetstream_is_up(lambda: ensure_streams(js))  # as a tool: 1 replica
            created = (await js.stream_info("FRAMES")).config
            raised = created.evolve(num_replicas=3)  # `nats stream edit FRAMES --replicas 3`
            await js.update_stream(raised)
            await ensure_streams(js)  # a service with the default stream_replicas=1 starts
            kept = (await js.stream_info("FRAMES")).config.num_replicas
            await ensure_streams(js, replicas=3)  # a k8s service starts
            engine = (await js.stream_info("ENGINE")).config.num_replicas
            await RegistryStore.open_or_create(js, "registry")
            bucket = (await js.stream_info("KV_registry")).config.num_replicas
            handling = (await js.stream_info("KV_binloop_handling")).config
        finally:
            await client.close()
    assert created.num_replicas == 1
    assert kept == 3
    assert engine == 3
    assert bucket == 3  # as many as the registry's event stream
    assert handling.num_replicas == 3  # the record of handling attempts too
    assert handling.max_age == 7 * 24 * 3600


async def test_losing_the_hub_server_that_leads_a_stream_does_not_stop_its_consumers(
    tmp_path: Path,
) -> None:
    """A NATS pod restarting on the k8s hub (a node drain, which its PodDisruptionBudget
    allows): with 3 replicas another server takes over the stream, and a service connected
    to a surviving server handles what is published after."""
    with _three_server_cluster(tmp_path) as servers:
        admin = await nats.connect(servers[0].url)
        try:
            js = admin.jetstream()
            await _when_jetstream_is_up(lambda: ensure_streams(js, replicas=3))
            info = await js.stream_info("ENGINE")
        finally:
            await admin.close()
        assert info.config.num_replicas == 3
        assert info.cluster is not None
        victim = next(s for i, s in enumerate(servers) if f"s{i}" == info.cluster.leader)
        survivor = next(s for s in servers if s is not victim)
        settings = _settings(survivor.url).model_copy(update={"stream_replicas": 3})
        service = new_service("hubsvc", settings)
        seen = _recording_subscriber(service, "hubsvc")
        await service.start()
        admin = await nats.connect(survivor.url)
        try:
            js = admin.jetstream()
            await _when_jetstream_is_up(lambda: _publish_request(js, "before"))
            await seen.wait_for(_named("before"))
            victim.stop()
            await _when_jetstream_is_up(lambda: _publish_request(js, "after"))
            await seen.wait_for(_named("after"), timeout=60)
            await eventually(service.is_ready, timeout=30)
        finally:
            await service.stop()
            await admin.close()


# --- handling that ends the process (binloop/bus/handling.py) -----------------------------------


async def _count_handling_io(client: Client) -> list[str]:
    """Subjects of every read and write of the handling bucket from now on, by anyone: its
    KV writes and the JetStream API requests (get, purge, info) that name its stream."""
    from binloop.bus.handling import BUCKET

    seen: list[str] = []

    async def on_msg(msg: Msg) -> None:
        if BUCKET in msg.subject:
            seen.append(msg.subject)

    await client.subscribe("$KV.>", cb=on_msg)
    await client.subscribe("$JS.API.>", cb=on_msg)
    await client.flush()
    return seen


async def _handling_records(js: JetStreamContext) -> int:
    from binloop.bus.handling import BUCKET_STREAM

    return (await js.stream_info(BUCKET_STREAM)).state.messages


async def test_first_deliveries_touch_no_handling_record_and_a_redelivery_has_one_while_handled(
    js: JetStreamContext, nats_client: Client, nats_server: Any
) -> None:
    """The edge's frames (pipelined) and the hot batch subjects: first deliveries neither read
    nor write the bucket. A redelivered message is recorded while it is handled, and its
    record goes with the ack."""
    from binloop.bus.handling import BUCKET, record_key

    service = new_service("hot", _settings(nats_server.url))
    one: list[str] = []
    many: list[str] = []
    during: list[bytes | None] = []
    kv = await js.key_value(BUCKET)

    async def handle_one(delivery: Delivery[TrainingRequested]) -> list[Outgoing]:
        name = delivery.event.dataset_name
        if name == "again":
            if delivery.attempt == 1:
                raise TransientError("store blip")
            key = record_key(("ENGINE", "hot-one", sequences[name]))
            during.append((await kv.get(key)).value)
        one.append(name)
        return [Outgoing(PROBE_OUT, TrainingRequested(producer="hot", dataset_name=name))]

    async def handle_many(deliveries: list[Delivery[TrainingRequested]]) -> list[Outgoing]:
        many.extend(d.event.dataset_name for d in deliveries)
        return []

    subscribe(
        service.broker,
        service.publisher,
        TRAINING_REQUESTED,
        handle_one,
        durable="hot-one",
        policy=service.policy,
        pipelined=True,
    )
    subscribe_batch(
        service.broker,
        service.publisher,
        TRAINING_REQUESTED,
        handle_many,
        durable="hot-batch",
        batch_size=10,
        max_wait_s=0.2,
        policy=service.policy,
    )
    sequences: dict[str, int] = {}
    await service.start()
    io = await _count_handling_io(nats_client)
    try:
        for i in range(30):
            await _publish_request(js, f"hot-{i}")
        await eventually(lambda: len(one) == 30 and len(many) == 30)
        assert await _wait_until_settled(js, "hot-one")
        assert await _wait_until_settled(js, "hot-batch")
        assert io == []  # nothing on the hot path
        event = TrainingRequested(producer="test", dataset_name="again")
        ack = await js.publish(TRAINING_REQUESTED.subject(), event.model_dump_json().encode())
        sequences["again"] = ack.seq
        await eventually(lambda: "again" in one and "again" in many)
        assert await _wait_until_settled(js, "hot-one")
    finally:
        await service.stop()
    assert during == [b"1"]  # this attempt, recorded before the handler ran
    assert io  # the redelivery was recorded
    assert await _handling_records(js) == 0  # and its record went with the ack


async def test_a_long_not_ready_period_is_never_taken_for_a_process_ending(
    js: JetStreamContext, nats_client: Client, nats_server: Any
) -> None:
    """max_deliveries=3: a message not ready for 8 deliveries (each redelivery recorded, and
    set back by its nak) is handled at the 9th, and nothing is dead-lettered or left behind."""
    service = new_service("patient", _settings(nats_server.url))
    attempts: list[int] = []
    handled = asyncio.Event()

    async def handle(delivery: Delivery[TrainingRequested]) -> list[Outgoing]:
        attempts.append(delivery.attempt)
        if delivery.attempt <= 8:
            raise NotReadyError("no model loaded yet")
        handled.set()
        return []

    subscribe(
        service.broker,
        service.publisher,
        TRAINING_REQUESTED,
        handle,
        durable="patient",
        policy=service.policy,
    )
    await service.start()
    io = await _count_handling_io(nats_client)
    try:
        await _publish_request(js, "d")
        await asyncio.wait_for(handled.wait(), 20)
        assert await _wait_until_settled(js, "patient")
    finally:
        await service.stop()
    assert attempts == list(range(1, 10))
    assert len(io) >= 2 * 8  # a create and a purge per redelivery: the record was kept
    assert (await js.stream_info("DLQ")).state.messages == 0
    assert await _handling_records(js) == 0


async def test_a_stop_mid_handling_is_not_taken_for_a_process_ending(
    js: JetStreamContext, nats_client: Client, nats_server: Any
) -> None:
    """A handler still running when its service stops is cancelled and its message naked (the
    trainer's rolling update): its record's deaths go back and it counts one more stop, so five
    such stops in a row, above max_deliveries=3 (and below max_stops), dead-letter nothing,
    and the sixth run handles it."""
    from binloop.bus.handling import BUCKET, record_key

    kv = await js.key_value(BUCKET)
    event = TrainingRequested(producer="test", dataset_name="long")
    ack = await js.publish(TRAINING_REQUESTED.subject(), event.model_dump_json().encode())
    key = record_key(("ENGINE", "stopped", ack.seq))
    stops = 5
    attempts: list[int] = []

    def handler(block: bool, began: asyncio.Event) -> EventHandler[TrainingRequested]:
        async def handle(delivery: Delivery[TrainingRequested]) -> list[Outgoing]:
            attempts.append(delivery.attempt)
            if delivery.attempt == 1:
                raise NotReadyError("not yet")  # so the next deliveries are recorded
            began.set()
            if block:
                await asyncio.sleep(3600)  # a long training, cancelled by the stop
            return []

        return handle

    for run in range(stops + 1):
        last = run == stops
        service = new_service("stopped", _settings(nats_server.url))
        service.broker.config.broker_config.graceful_timeout = 0.5
        began = asyncio.Event()
        subscribe(
            service.broker,
            service.publisher,
            TRAINING_REQUESTED,
            handler(not last, began),
            durable="stopped",
            policy=service.policy,
        )
        await service.start()
        try:
            await asyncio.wait_for(began.wait(), 20)
            if last:
                assert await _wait_until_settled(js, "stopped")
            else:
                running = b"1" if run == 0 else f"1,{run}".encode()
                assert (await kv.get(key)).value == running  # recorded while it runs
        finally:
            await service.stop()
        if not last:  # a stop is no death: no deaths, one more stop
            assert (await kv.get(key)).value == f"0,{run + 1}".encode()
    assert attempts == list(range(1, stops + 3))
    assert (await js.stream_info("DLQ")).state.messages == 0
    assert await _handling_records(js) == 0


async def test_a_message_whose_handling_is_stopped_too_often_is_dead_lettered_at_the_stop(
    js: JetStreamContext, nats_client: Client, nats_server: Any
) -> None:
    """A trainer Job cut off by its deadline, over and over: max_stops=2. One message, two
    consumers. Each run's handlers block until the service stops and cancels them. "patient"
    is stopped 3 times (its first delivery's stop is not counted, then 2 counted: the limit)
    and handled by the 4th run; "hopeless" is stopped a 4th time there, one more than
    allowed, and is dead-lettered by that stop instead of naked. A 5th run gets nothing."""
    from binloop.bus.handling import BUCKET, record_key

    kv = await js.key_value(BUCKET)
    event = TrainingRequested(producer="test", dataset_name="long")
    ack = await js.publish(TRAINING_REQUESTED.subject(), event.model_dump_json().encode())
    hopeless_key = record_key(("ENGINE", "stops-hopeless", ack.seq))
    attempts: dict[str, list[int]] = {"stops-hopeless": [], "stops-patient": []}
    blocked_runs = {"stops-hopeless": 4, "stops-patient": 3}
    dlq = await Collector(DeadLetter).attach(nats_client, DLQ.wildcard)

    def handler(durable: str, run: int, began: asyncio.Event) -> EventHandler[TrainingRequested]:
        async def handle(delivery: Delivery[TrainingRequested]) -> list[Outgoing]:
            attempts[durable].append(delivery.attempt)
            began.set()
            if run < blocked_runs[durable]:
                await asyncio.Event().wait()  # a long training, cancelled by the stop
            return []

        return handle

    for run in range(5):
        settings = _settings(nats_server.url, max_stops=2)
        service = new_service("stops", settings)
        service.broker.config.broker_config.graceful_timeout = 0.5
        began = {durable: asyncio.Event() for durable in attempts}
        for durable in attempts:
            subscribe(
                service.broker,
                service.publisher,
                TRAINING_REQUESTED,
                handler(durable, run, began[durable]),
                durable=durable,
                policy=service.policy,
            )
        await service.start()
        try:
            if run < 4:
                await asyncio.wait_for(began["stops-hopeless"].wait(), 20)
            if run < 3:
                await asyncio.wait_for(began["stops-patient"].wait(), 20)
            else:
                assert await _wait_until_settled(js, "stops-patient")
            if run == 4:
                assert await _wait_until_settled(js, "stops-hopeless")
        finally:
            await service.stop()
        if run in (1, 2):  # counted from the second delivery on: no death, one more stop
            assert (await kv.get(hopeless_key)).value == f"0,{run}".encode()
        if run < 3:
            assert dlq.items == []
    (letter,) = await dlq.wait_for(1)
    assert attempts == {"stops-hopeless": [1, 2, 3, 4], "stops-patient": [1, 2, 3, 4]}
    assert letter.error_type == "StoppedHandlingError"
    assert "handling was stopped 3 times without an outcome" in letter.error
    assert "more than max_stops=2" in letter.error
    assert letter.delivery_attempt == 4
    assert await _handling_records(js) == 0
    assert (await js.stream_info("DLQ")).state.messages == 1


@pytest.mark.parametrize(
    ("record", "max_stops", "error_type", "reason"),
    [
        # As three dead processes would have left it: 3 deaths (max_deliveries).
        (b"3", 8, "UnfinishedHandlingError", "handling ended the process 3 times"),
        # As a stop whose dead letter could not be published leaves it: no deaths, 3 stops,
        # above max_stops=2.
        (b"0,3", 2, "StoppedHandlingError", "handling was stopped 3 times"),
    ],
)
async def test_a_redelivery_whose_record_says_too_often_is_dead_lettered_unhandled(
    js: JetStreamContext,
    nats_client: Client,
    nats_server: Any,
    record: bytes,
    max_stops: int,
    error_type: str,
    reason: str,
) -> None:
    """The first delivery does not read the handling record; the redelivery goes to the
    dead-letter subject with the reason instead of to the handler, and the record goes."""
    from binloop.bus.handling import BUCKET, record_key

    event = TrainingRequested(producer="test", dataset_name="seeded")
    ack = await js.publish(TRAINING_REQUESTED.subject(), event.model_dump_json().encode())
    kv = await js.key_value(BUCKET)
    await kv.put(record_key(("ENGINE", "seeded", ack.seq)), record)
    service = new_service("seeded", _settings(nats_server.url, max_stops=max_stops))
    attempts: list[int] = []

    async def handle(delivery: Delivery[TrainingRequested]) -> list[Outgoing]:
        attempts.append(delivery.attempt)
        raise NotReadyError("not yet")

    subscribe(
        service.broker,
        service.publisher,
        TRAINING_REQUESTED,
        handle,
        durable="seeded",
        policy=service.policy,
    )
    dlq = await Collector(DeadLetter).attach(nats_client, DLQ.wildcard)
    await service.start()
    try:
        (letter,) = await dlq.wait_for(1)
        assert await _wait_until_settled(js, "seeded")
    finally:
        await service.stop()
    assert attempts == [1]
    assert letter.error_type == error_type
    assert f"{reason} without an outcome" in letter.error
    assert letter.delivery_attempt == 2
    assert await _handling_records(js) == 0


async def test_without_the_handling_bucket_redeliveries_are_handled_and_it_is_said_once(
    js: JetStreamContext, nats_server: Any, caplog: pytest.LogCaptureFixture
) -> None:
    """The bucket gone (or the server unable to answer for it): redelivered messages are
    handled as before, the loss is logged once, and its return once."""
    from binloop.bus.handling import BUCKET

    caplog.set_level("INFO", logger="binloop.bus.handling")
    service = new_service("unrecorded", _settings(nats_server.url))
    handled: list[str] = []

    async def handle(delivery: Delivery[TrainingRequested]) -> list[Outgoing]:
        if delivery.attempt == 1:
            raise TransientError("store blip")
        handled.append(delivery.event.dataset_name)
        return []

    subscribe(
        service.broker,
        service.publisher,
        TRAINING_REQUESTED,
        handle,
        durable="unrecorded",
        policy=service.policy,
    )
    await service.start()
    try:
        await js.delete_key_value(BUCKET)
        for name in ("a", "b", "c"):
            await _publish_request(js, name)
        await eventually(lambda: len(handled) == 3)
        await ensure_streams(js)  # the next service start makes it again
        await _publish_request(js, "d")
        await eventually(lambda: len(handled) == 4)
        assert await _wait_until_settled(js, "unrecorded")
    finally:
        await service.stop()
    assert handled == ["a", "b", "c", "d"]
    messages = [r.getMessage() for r in caplog.records]
    assert sum("record of handling attempts" in m and "unavailable" in m for m in messages) == 1
    assert sum("available again" in m for m in messages) == 1
    assert await _handling_records(js) == 0


def _lose_the_first_ack(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The first ack of any message never reaches the server, as when the connection drops
    right after it was handed to the socket: `ack()` returns as if sent, `ack_sync()` gets no
    confirmation (a timeout). Returns the acks asked for, in order."""
    asked: list[str] = []
    real_ack, real_ack_sync = Msg.ack, Msg.ack_sync

    async def ack(self: Msg) -> None:
        asked.append("ack")
        if len(asked) > 1:
            await real_ack(self)

    async def ack_sync(self: Msg, timeout: float = 1.0) -> Msg:
        asked.append("ack_sync")
        if len(asked) == 1:
            raise NatsTimeoutError
        return await real_ack_sync(self, timeout)

    monkeypatch.setattr(Msg, "ack", ack)
    monkeypatch.setattr(Msg, "ack_sync", ack_sync)
    return asked


@pytest.mark.parametrize("batched", [False, True], ids=["one", "batch"])
async def test_a_dead_letter_whose_ack_was_lost_is_not_handled_again_on_its_redelivery(
    js: JetStreamContext, nats_server: Any, monkeypatch: pytest.MonkeyPatch, batched: bool
) -> None:
    """A handler dead-letters its message; the ack after the DLQ publish is lost, so JetStream
    redelivers the message after its ack wait. The redelivery is dead-lettered again (the same
    entry, dropped by its id) and acked, without running the handler a second time."""
    service = new_service("lostack", _settings(nats_server.url))
    calls: list[int] = []

    async def handle(delivery: Delivery[TrainingRequested]) -> list[Outgoing]:
        calls.append(delivery.attempt)
        raise PermanentError("side effects done, then refused")

    async def handle_batch(deliveries: list[Delivery[TrainingRequested]]) -> list[Outgoing]:
        for delivery in deliveries:
            await handle(delivery)
        return []

    if batched:
        subscribe_batch(
            service.broker,
            service.publisher,
            TRAINING_REQUESTED,
            handle_batch,
            durable="lostack",
            policy=service.policy,
            ack_wait_s=1.0,
        )
    else:
        subscribe(
            service.broker,
            service.publisher,
            TRAINING_REQUESTED,
            handle,
            durable="lostack",
            policy=service.policy,
            ack_wait_s=1.0,
        )
    asked = _lose_the_first_ack(monkeypatch)
    await service.start()
    try:
        await _publish_request(js, "refused")
        await eventually(lambda: len(asked) >= 2)  # the lost ack, then the redelivery's
        assert await _wait_until_settled(js, "lostack")
    finally:
        await service.stop()
    assert calls == [1]
    assert len(asked) == 2  # the lost ack, then the redelivery's
    assert (await js.stream_info("DLQ")).state.messages == 1
    info = await js.consumer_info("ENGINE", "lostack")
    assert (info.num_pending, info.num_ack_pending, info.num_redelivered) == (0, 0, 0)
    assert info.delivered.stream_seq == info.ack_floor.stream_seq
    assert await _handling_records(js) == 0  # the mark went with the confirmed ack


def test_handling_records_of_earlier_releases_read_as_before_and_marks_apart() -> None:
    from binloop.bus.handling import _dead_value, _parse, _value

    assert _parse(b"3") == (3, 0, None)  # counts, as every release wrote them
    assert _parse(b"1,2") == (1, 2, None)
    assert _parse(_value(0, 4)) == (0, 4, None)
    assert _parse(_dead_value("PermanentError")) == (0, 0, "PermanentError")
    assert len(_dead_value("E" * 200)) <= 64  # the bucket's max_value_size
    assert _parse(b"\xff") == (0, 0, None)


def test_handling_record_keys_are_valid_kv_keys_for_any_consumer_name() -> None:
    from nats.js.kv import _is_key_valid

    from binloop.bus.handling import record_key

    assert record_key(("ENGINE", "edge-inferencer-bin_1", 42)) == "ENGINE.edge-inferencer-bin_1.42"
    odd = record_key(("S", "a=b c/ü", 7))
    assert odd == "S.a=3Db=20c=2F=C3=BC.7"
    assert _is_key_valid(odd)
    assert record_key(("S", "a", 7)) != record_key(("S", "a=", 7))
