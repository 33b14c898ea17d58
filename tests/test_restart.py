"""A consumer stopped mid-stream and started again resumes from its durable consumer:
nothing is lost and nothing is counted twice."""

from __future__ import annotations

import asyncio
import logging
import os
import sys
from collections import Counter
from datetime import UTC, datetime
from pathlib import Path

import pytest
from nats.js.client import JetStreamContext

from binloop.bus import Delivery, Outgoing, subscribe
from binloop.bus.consume import EventHandler
from binloop.bus.publish import PublishTimeoutError
from binloop.natsserver import NatsServer
from binloop.runtime import new_service
from binloop.settings import ServiceSettings
from schemas import ActuationCommand, ActuationDone, DeadLetter, TrainingRequested
from schemas.routes import ACTUATION_COMMAND, ACTUATION_DONE, DLQ, TRAINING_REQUESTED
from schemas.taxonomy import Compartment
from services.actuator import ActuatorSettings, create_app
from services.actuator.journal import decode
from tests.helpers import Collector, eventually

pytestmark = pytest.mark.integration
REPO = Path(__file__).resolve().parent.parent


def _command(i: int) -> ActuationCommand:
    return ActuationCommand(
        producer="test",
        bin_id="bin-1",
        frame_sha256=f"{i:064x}",
        frame_event_id=f"frame-{i}",
        captured_at=datetime.now(UTC),
        compartment=Compartment.GLASS,
        label="glass",
        confidence=0.9,
        abstained=False,
        model_version=1,
    )


async def _publish(js: JetStreamContext, first: int, count: int) -> None:
    for i in range(first, first + count):
        event = _command(i)
        await js.publish(
            ACTUATION_COMMAND.subject("bin-1"),
            event.model_dump_json().encode(),
            headers={"Nats-Msg-Id": str(event.event_id)},
        )


async def test_actuator_restart_resumes_without_loss_or_duplicates(
    nats_server: NatsServer, js: JetStreamContext
) -> None:
    settings = ActuatorSettings(nats_url=nats_server.url, http_port=0, sim_actuation_ms=1)
    done = await Collector(ActuationDone).attach_stream(js, ACTUATION_DONE.wildcard)

    first = create_app(settings)
    await first.start()
    await _publish(js, 0, 30)
    await done.wait_for(10)
    await first.stop()  # mid-stream: some commands are still unprocessed

    await _publish(js, 30, 30)  # arrive while the actuator is down
    second = create_app(settings)
    await second.start()
    try:
        # A command fetched just as the first instance stopped comes back after ack_wait.
        await done.wait_for(lambda items: len({d.frame_event_id for d in items}) >= 60, 40)
    finally:
        await second.stop()

    counts = Counter(d.frame_event_id for d in done.items)
    assert set(counts) == {f"frame-{i}" for i in range(60)}
    assert max(counts.values()) == 1, [k for k, n in counts.items() if n > 1]


async def test_a_service_run_as_a_job_exits_once_its_consumers_are_drained(
    nats_server: NatsServer, js: JetStreamContext
) -> None:
    await _publish(js, 0, 5)
    service = create_app(
        ActuatorSettings(nats_url=nats_server.url, http_port=0, sim_actuation_ms=1)
    )
    await service.start()
    try:
        assert service.durable_consumers() == [("ACTUATION", "actuator-bin-1")]
        await asyncio.wait_for(service.wait_until_idle(quiet_s=0.5, poll_s=0.1), 30)
    finally:
        await service.stop()
    info = await js.consumer_info("ACTUATION", "actuator-bin-1")
    assert info.num_pending == 0
    assert info.num_ack_pending == 0
    assert info.delivered.stream_seq >= 5


def test_a_fresh_run_never_wipes_a_folder_it_did_not_create(tmp_path: Path) -> None:
    from binloop.embedded import RUN_MARKER, _prepare_data_dir
    from binloop.errors import ConfigError

    checkout = tmp_path / "checkout"
    checkout.mkdir()
    (checkout / "README.md").write_text("precious")
    with pytest.raises(ConfigError, match="not created by `binloop up`"):
        _prepare_data_dir(checkout, fresh=True)
    assert (checkout / "README.md").read_text() == "precious"

    run = tmp_path / "run"
    _prepare_data_dir(run, fresh=True)
    (run / "old-state").write_text("x")
    _prepare_data_dir(run, fresh=True)
    assert sorted(p.name for p in run.iterdir()) == [RUN_MARKER]


# -- the actuator's memory of handled items survives a restart ----------------------------


class _Flaps:
    """The driver of one actuator instance: records each flap it moves."""

    def __init__(self) -> None:
        self.moves: list[str] = []

    async def actuate(self, compartment: Compartment, item_key: str) -> None:
        self.moves.append(item_key)


def _journaled_settings(nats_server: NatsServer, tmp_path: Path, bin_id: str) -> ActuatorSettings:
    return ActuatorSettings(
        nats_url=nats_server.url,
        http_port=0,
        bin_id=bin_id,
        state_dir=tmp_path / "actuator-state",
        # Far above the consumer's 10 s ack wait: the age check cannot be what saves the flap.
        max_command_age_s=600,
        retry_delay_s=1.0,
    )


async def _publish_one(js: JetStreamContext, bin_id: str) -> ActuationCommand:
    command = _command(0).model_copy(
        update={"bin_id": bin_id, "frame_event_id": f"frame-of-{bin_id}"}
    )
    await js.publish(
        ACTUATION_COMMAND.subject(bin_id),
        command.model_dump_json().encode(),
        headers={"Nats-Msg-Id": str(command.event_id)},
    )
    return command


async def test_a_command_redelivered_after_a_restart_does_not_move_the_flap_again(
    nats_server: NatsServer,
    js: JetStreamContext,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The flap moved, then the answer never reached JetStream (the bin lost power, say):
    the command comes back to the next instance, well inside the age limit."""
    settings = _journaled_settings(nats_server, tmp_path, "journal-bin")
    done = await Collector(ActuationDone).attach_stream(js, ACTUATION_DONE.subject("journal-bin"))

    first_flaps = _Flaps()
    first = create_app(settings, first_flaps)
    answer_lost = asyncio.Event()

    async def publish_fails(outgoing: object) -> None:
        answer_lost.set()
        raise PublishTimeoutError("no JetStream ack within 5.0s")

    first.publisher.send_all = publish_fails  # type: ignore[assignment,method-assign]
    await first.start()
    try:
        command = await _publish_one(js, "journal-bin")
        await asyncio.wait_for(answer_lost.wait(), 20)
    finally:
        await first.stop()
    assert first_flaps.moves == [command.frame_event_id]

    second_flaps = _Flaps()
    second = create_app(settings, second_flaps)
    caplog.set_level(logging.INFO, logger="services.actuator.app")
    await second.start()
    try:
        (answer,) = await done.wait_for(1, timeout=30)
    finally:
        await second.stop()

    assert second_flaps.moves == []  # the flap moved once, in the first instance
    assert answer.ok
    assert answer.frame_event_id == command.frame_event_id
    assert answer.actuation_ms >= 0
    assert any(
        "came again" in r.getMessage() and command.frame_event_id in r.getMessage()
        for r in caplog.records
    )
    info = await js.consumer_info("ACTUATION", "actuator-journal-bin")
    assert (info.num_ack_pending, info.num_pending) == (0, 0)


async def test_an_actuator_killed_mid_actuation_does_not_run_the_command_again(
    nats_server: NatsServer, js: JetStreamContext, tmp_path: Path
) -> None:
    """A real crash: the service runs as its own process and is killed (SIGKILL) while a flap
    moves, after the intent is on disk and before the outcome is. Whether the item dropped is
    unknown, so the command that comes back (after the ack wait) is answered as interrupted
    and the flap stays put: at most once."""
    settings = _journaled_settings(nats_server, tmp_path, "cut-bin")
    done = await Collector(ActuationDone).attach_stream(js, ACTUATION_DONE.subject("cut-bin"))
    env = {
        **os.environ,
        "BINLOOP_NATS_URL": nats_server.url,
        "BINLOOP_HTTP_PORT": "0",
        "BINLOOP_HTTP_HOST": "127.0.0.1",
        "BINLOOP_BIN_ID": "cut-bin",
        "BINLOOP_STATE_DIR": str(settings.state_dir),
        "BINLOOP_MAX_COMMAND_AGE_S": "600",
        "BINLOOP_SIM_ACTUATION_MS": "10000",  # the flap is still moving when the kill comes
    }
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "binloop.cli",
        "run",
        "actuator",
        env=env,
        cwd=REPO,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.DEVNULL,
    )
    journal = settings.state_dir / "handled-cut-bin.journal"
    try:
        command = await _publish_one(js, "cut-bin")

        def moving() -> bool:
            lines = journal.read_bytes().splitlines() if journal.exists() else []
            return [decode(line).state for line in lines] == ["moving"]

        await eventually(moving, timeout=30)
    finally:
        process.kill()
        await process.wait()

    second_flaps = _Flaps()
    second = create_app(settings, second_flaps)
    await second.start()
    try:
        (answer,) = await done.wait_for(1, timeout=30)  # after the 10 s ack wait
    finally:
        await second.stop()

    assert second_flaps.moves == []
    assert not answer.ok
    assert (answer.error or "").startswith("interrupted:")
    assert answer.frame_event_id == command.frame_event_id
    states = [decode(line).state for line in journal.read_bytes().splitlines()]
    assert states[-1] == "done"  # answered once: a later repeat is a plain repeat


# -- a stop takes no new work on any consumer while one drains -----------------------------


async def test_a_stopping_service_takes_no_new_work_on_any_consumer_while_one_drains(
    nats_server: NatsServer, js: JetStreamContext
) -> None:
    """Two consumers of one service, the first busy with a long handler when the stop comes.
    Stopped one after the other, the second went on fetching and handling while the first
    drained (up to its graceful timeout), and the stop lasted the sum of their waits. (The
    trainer: its snapshot and request consumers share one training at a time.)"""
    settings = ServiceSettings(nats_url=nats_server.url, http_port=0, retry_delay_s=0.05)
    service = new_service("one-stop", settings)
    service.broker.config.broker_config.graceful_timeout = 2.0  # GRACEFUL_STOP_S in production
    busy = asyncio.Event()
    handled_by_idle: list[str] = []
    roles: dict[str, str] = {}

    def handler_for(durable: str) -> EventHandler[TrainingRequested]:
        async def handle(delivery: Delivery[TrainingRequested]) -> list[Outgoing]:
            if roles[durable] == "busy":
                busy.set()
                await asyncio.sleep(3600)  # a long training, cancelled after the graceful wait
            handled_by_idle.append(delivery.event.dataset_name)
            return []

        return handle

    for durable in ("stop-a", "stop-b"):
        subscribe(
            service.broker,
            service.publisher,
            TRAINING_REQUESTED,
            handler_for(durable),
            durable=durable,
        )
    first, second = (getattr(s, "extra_options", {})["durable"] for s in service.broker.subscribers)
    roles[first] = "busy"  # the one a stop in declaration order waits for first
    roles[second] = "idle"

    async def request(name: str) -> None:
        event = TrainingRequested(producer="test", dataset_name=name, occurred_at=datetime.now(UTC))
        await js.publish(TRAINING_REQUESTED.subject(), event.model_dump_json().encode())

    await service.start()
    await request("before-stop")
    await asyncio.wait_for(busy.wait(), 20)
    await eventually(lambda: "before-stop" in handled_by_idle)
    stopping = asyncio.create_task(service.stop())
    await eventually(lambda: not service.is_ready())  # the stop has begun
    await request("during-stop")
    await asyncio.wait_for(stopping, 60)
    assert handled_by_idle == ["before-stop"]


# -- a message whose handling ends the process is dead-lettered, not redelivered for ever --------


async def _request(js: JetStreamContext, name: str) -> None:
    event = TrainingRequested(producer="test", dataset_name=name, occurred_at=datetime.now(UTC))
    await js.publish(TRAINING_REQUESTED.subject(), event.model_dump_json().encode())


async def _crash_until_dead_lettered(
    nats_server: NatsServer, js: JetStreamContext, output: Path, *, batch: bool
) -> tuple[int, DeadLetter, asyncio.subprocess.Process]:
    """Runs tests/crashing_service.py and starts it again each time the poison ends it (as
    Kubernetes restarts a crashed pod), until the poison is dead-lettered. Returns the deaths,
    the dead letter and the process still running."""
    from tests import crashing_service

    dlq = await Collector(DeadLetter).attach_stream(js, DLQ.wildcard)
    deaths = 0
    for _ in range(crashing_service.MAX_DELIVERIES + 4):  # the old code: deaths without end
        with output.open("ab") as log_file:
            process = await asyncio.create_subprocess_exec(
                *(sys.executable, "-m", "tests.crashing_service", nats_server.url),
                *(["--batch"] if batch else []),
                cwd=REPO,
                stdout=log_file,
                stderr=log_file,
            )
        exited = asyncio.ensure_future(process.wait())
        lettered = asyncio.ensure_future(dlq.wait_for(1, timeout=60))
        done, _ = await asyncio.wait(
            {exited, lettered}, timeout=60, return_when=asyncio.FIRST_COMPLETED
        )
        if lettered in done:
            exited.cancel()
            return deaths, lettered.result()[0], process
        lettered.cancel()
        if exited not in done:
            process.kill()
            await process.wait()
            pytest.fail(f"no death and no dead letter within 60 s; see {output}")
        assert process.returncode == crashing_service.DIED, f"see {output}"
        deaths += 1
    pytest.fail(f"the poison was not dead-lettered after {deaths} deaths")


async def _stop(process: asyncio.subprocess.Process) -> None:
    if process.returncode is None:
        process.terminate()
    await asyncio.wait_for(process.wait(), 40)


async def test_a_message_whose_handling_ends_the_process_is_dead_lettered_not_redelivered_for_ever(
    nats_server: NatsServer, js: JetStreamContext, tmp_path: Path
) -> None:
    """The service runs as its own process and its handler ends it (os._exit, as an
    out-of-memory kill would) for one message. Its first death is not recorded (first
    deliveries do no I/O), each later one is: after max_deliveries + 1 deaths the message is
    dead-lettered with the reason, the process that did it lives on, and the other messages,
    before and after, are handled."""
    from binloop.bus.handling import BUCKET_STREAM
    from tests.crashing_service import DURABLE, HANDLED, MAX_DELIVERIES, POISON

    handled = await Collector(TrainingRequested).attach_stream(js, HANDLED.subject())
    for name in ("before", POISON, "after"):
        await _request(js, name)
    deaths, letter, process = await _crash_until_dead_lettered(
        nats_server, js, tmp_path / "crasher.log", batch=False
    )
    try:
        await _request(js, "later")
        names = await handled.wait_for(
            lambda items: {"before", "after", "later"} <= {i.dataset_name for i in items}, 30
        )
        assert process.returncode is None  # the dead letter ended the loop
    finally:
        await _stop(process)
    assert deaths == MAX_DELIVERIES + 1
    assert letter.error_type == "UnfinishedHandlingError"
    assert f"handling ended the process {MAX_DELIVERIES} times without an outcome" in letter.error
    assert letter.delivery_attempt == MAX_DELIVERIES + 2
    assert f'"{POISON}"' in letter.payload_preview
    assert POISON not in {i.dataset_name for i in names}
    assert (await js.stream_info(BUCKET_STREAM)).state.messages == 0  # no record left behind
    info = await js.consumer_info("ENGINE", DURABLE)
    assert (info.num_ack_pending, info.num_pending) == (0, 0)


async def test_a_batch_that_ends_the_process_dead_letters_only_the_message_that_did_it(
    nats_server: NatsServer, js: JetStreamContext, tmp_path: Path
) -> None:
    """The poison ends the process with its whole batch. Redelivered, messages that ended a
    process before are handled one at a time, those that did it least often first: the
    batch-mates are handled, and only the poison reaches the dead-letter subject."""
    from binloop.bus.handling import BUCKET_STREAM
    from tests.crashing_service import HANDLED, MAX_DELIVERIES, POISON

    handled = await Collector(TrainingRequested).attach_stream(js, HANDLED.subject())
    mates = {"a", "b", "c"}
    for name in ("a", POISON, "b", "c"):  # published before the first start: one batch
        await _request(js, name)
    deaths, letter, process = await _crash_until_dead_lettered(
        nats_server, js, tmp_path / "crasher.log", batch=True
    )
    try:
        names = await handled.wait_for(lambda items: mates <= {i.dataset_name for i in items}, 30)
        assert process.returncode is None
    finally:
        await _stop(process)
    assert deaths == MAX_DELIVERIES + 1
    assert letter.error_type == "UnfinishedHandlingError"
    assert f'"{POISON}"' in letter.payload_preview
    assert POISON not in {i.dataset_name for i in names}
    assert (await js.stream_info("DLQ")).state.messages == 1  # the mates never got there
    assert (await js.stream_info(BUCKET_STREAM)).state.messages == 0
