"""The bus against a real nats-server: dedup by Nats-Msg-Id, DLQ for garbage, retries."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime
from typing import Any

import pytest
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.js.api import PubAck
from nats.js.client import JetStreamContext
from nats.js.errors import NoStreamResponseError

from binloop.bus import Delivery, Outgoing, PendingAcks, subscribe, subscribe_batch
from binloop.bus.consume import EventHandler
from binloop.bus.publish import PublishTimeoutError
from binloop.errors import PermanentError, TransientError
from binloop.runtime import ServiceApp, new_service
from binloop.settings import ServiceSettings
from schemas import DeadLetter, TrainingRequested
from schemas.routes import DLQ, STREAMS, TRAINING_REQUESTED, Route
from tests.helpers import Collector

pytestmark = pytest.mark.integration


def _settings(url: str) -> ServiceSettings:
    return ServiceSettings(nats_url=url, http_port=0, retry_delay_s=0.05, max_deliveries=3)


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
    from nats.js.api import ConsumerConfig, DeliverPolicy

    from binloop.bus.consumers import changed_fields

    existing = ConsumerConfig(ack_wait=10, max_deliver=-1, deliver_policy=DeliverPolicy.ALL)
    wanted = ConsumerConfig(ack_wait=30, max_deliver=-1, deliver_policy=DeliverPolicy.LAST)
    assert changed_fields(existing, wanted) == {"ack_wait": 30}
    assert changed_fields(existing, ConsumerConfig()) == {}
    shorter = ConsumerConfig(ack_wait=5, max_deliver=3)
    assert changed_fields(existing, shorter) == {"max_deliver": 3}


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
