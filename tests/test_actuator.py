"""The actuator moves each item's flap at most once, and never for an item that is long gone:
the core logic on its own (a recording driver, a hand-set clock), then the service on a real
nats-server with a publish that fails after the flap moved. Its journal across restarts:
tests/test_edge_actuator_journal.py and tests/test_restart.py."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from nats.js.client import JetStreamContext
from prometheus_client import REGISTRY
from pydantic import ValidationError
from typer.testing import CliRunner

from binloop.bus import Outgoing
from binloop.bus.publish import PendingAcks, PublishTimeoutError
from binloop.cli import app as binloop_cli
from binloop.errors import ConfigError
from binloop.natsserver import NatsServer
from schemas.events import ActuationCommand, ActuationDone
from schemas.routes import ACTUATION_COMMAND, ACTUATION_DONE
from schemas.taxonomy import Compartment
from services.actuator import ActuatorSettings, create_app
from services.actuator.core import Actuator, SimulatedDriver
from tests.helpers import Collector

SEEN = datetime(2025, 3, 1, 12, 0, 0, tzinfo=UTC)
"""When the camera saw the item in every command below."""


class Clock:
    """A clock the test moves by hand."""

    def __init__(self, now: datetime) -> None:
        self.now = now

    def __call__(self) -> datetime:
        return self.now


class CountingDriver:
    """The simulated driver, counting each time it moves a flap."""

    def __init__(self, jam_rate: float = 0.0) -> None:
        self.inner = SimulatedDriver(actuation_ms=0, jam_rate=jam_rate)
        self.moves: list[tuple[Compartment, str]] = []

    async def actuate(self, compartment: Compartment, item_key: str) -> None:
        self.moves.append((compartment, item_key))
        await self.inner.actuate(compartment, item_key)


def _command(
    bin_id: str = "bin-1", captured_at: datetime = SEEN, frame_event_id: str | None = None
) -> ActuationCommand:
    return ActuationCommand(
        producer="test",
        bin_id=bin_id,
        frame_sha256=uuid.uuid4().hex * 2,
        frame_event_id=frame_event_id or str(uuid.uuid4()),
        captured_at=captured_at,
        compartment=Compartment.GLASS,
        label="glass",
        confidence=0.9,
        abstained=False,
        model_version=1,
    )


# -- the core, without a bus ------------------------------------------------------------------


async def test_a_repeated_command_gets_the_same_answer_and_the_flap_moves_once() -> None:
    driver = CountingDriver()
    clock = Clock(SEEN + timedelta(seconds=0.5))
    actuator = Actuator(driver, "actuator", max_command_age_s=5, clock=clock)
    command = _command()

    first = await actuator.handle(command)
    clock.now += timedelta(seconds=30)  # a redelivery comes later, past the age limit too
    again = await actuator.handle(command)

    assert first.kind == "actuated"
    assert first.done.ok
    assert again.kind == "repeated"
    assert again.done == first.done  # event_id included: JetStream drops the republished one
    assert driver.moves == [(Compartment.GLASS, command.frame_event_id)]


async def test_a_jam_is_answered_again_without_another_try() -> None:
    driver = CountingDriver(jam_rate=1.0)
    actuator = Actuator(driver, "actuator", max_command_age_s=5, clock=Clock(SEEN))
    command = _command()

    first = await actuator.handle(command)
    again = await actuator.handle(command)

    assert not first.done.ok
    assert "jammed" in (first.done.error or "")
    assert again.kind == "repeated"
    assert again.done == first.done
    assert len(driver.moves) == 1


async def test_a_stale_command_is_refused_and_the_flap_stays_put() -> None:
    driver = CountingDriver()
    clock = Clock(SEEN + timedelta(seconds=7.3))
    actuator = Actuator(driver, "actuator", max_command_age_s=5, clock=clock)
    # Issued just now by an inferencer catching up: its occurred_at is fresh, the item is not.
    command = _command().model_copy(update={"occurred_at": clock.now})

    outcome = await actuator.handle(command)

    assert outcome.kind == "stale"
    assert not outcome.done.ok
    assert outcome.done.error == (
        "stale: item captured 7.3 s before the actuator got its command (limit 5 s); flap not moved"
    )
    assert outcome.done.frame_event_id == command.frame_event_id
    assert outcome.done.actuation_ms == 0
    assert driver.moves == []


async def test_a_command_right_at_the_limit_still_runs() -> None:
    driver = CountingDriver()
    actuator = Actuator(
        driver, "actuator", max_command_age_s=5, clock=Clock(SEEN + timedelta(seconds=5))
    )
    assert (await actuator.handle(_command())).kind == "actuated"
    assert len(driver.moves) == 1


async def test_the_memory_is_bounded_and_forgets_the_oldest_first() -> None:
    driver = CountingDriver()
    actuator = Actuator(driver, "actuator", max_command_age_s=5, remember=2, clock=Clock(SEEN))
    oldest, middle, newest = _command(), _command(), _command()
    for command in (oldest, middle, newest):
        await actuator.handle(command)

    assert (await actuator.handle(newest)).kind == "repeated"
    assert (await actuator.handle(middle)).kind == "repeated"
    assert (await actuator.handle(oldest)).kind == "actuated"  # forgotten: runs again
    assert len(driver.moves) == 4


def test_the_age_limit_is_validated() -> None:
    assert ActuatorSettings(http_port=0).max_command_age_s == 5.0
    for bad in (0, -1, 601):
        with pytest.raises(ValidationError, match="max_command_age_s"):
            ActuatorSettings(http_port=0, max_command_age_s=bad)
    with pytest.raises(ValueError, match="remember"):
        Actuator(CountingDriver(), "actuator", max_command_age_s=5, remember=0)


# -- the service on a real nats-server --------------------------------------------------------


async def _publish(js: JetStreamContext, command: ActuationCommand) -> None:
    await js.publish(
        ACTUATION_COMMAND.subject(command.bin_id),
        command.model_dump_json().encode(),
        headers={"Nats-Msg-Id": str(command.event_id)},
    )


@pytest.mark.integration
async def test_a_command_retried_after_a_publish_timeout_moves_the_flap_once(
    js: JetStreamContext, nats_server: NatsServer, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    settings = ActuatorSettings(
        nats_url=nats_server.url,
        http_port=0,
        bin_id="retry-bin",
        retry_delay_s=0.05,
        state_dir=tmp_path,
    )
    driver = CountingDriver()
    service = create_app(settings, driver, clock=Clock(SEEN + timedelta(seconds=0.5)))
    send_all = service.publisher.send_all
    sent: list[ActuationDone] = []
    answered_again = asyncio.Event()

    async def ack_lost_the_first_time(outgoing: Sequence[Outgoing]) -> PendingAcks:
        sent.extend(item.event for item in outgoing if isinstance(item.event, ActuationDone))
        pending = await send_all(outgoing)
        await pending.wait()  # stored in JetStream ...
        if len(sent) == 1:  # ... but the actuator does not hear of it, so it retries
            raise PublishTimeoutError("no JetStream ack within 5.0s")
        answered_again.set()
        return pending

    monkeypatch.setattr(service.publisher, "send_all", ack_lost_the_first_time)
    done = await Collector(ActuationDone).attach_stream(js, ACTUATION_DONE.subject("retry-bin"))
    command = _command("retry-bin")
    await service.start()
    try:
        await _publish(js, command)
        await asyncio.wait_for(answered_again.wait(), 20)
        stored = await done.wait_for(1)
    finally:
        await service.stop()

    assert driver.moves == [(Compartment.GLASS, command.frame_event_id)]
    assert len(sent) == 2
    assert sent[0] == sent[1]
    assert stored == [sent[0]]
    assert stored[0].ok
    state = (await js.stream_info("ACTUATION")).state
    assert state.messages == 2  # the command and one actuation.done: the repeat was dropped


def _stale_count(bin_id: str) -> float:
    sample = REGISTRY.get_sample_value("binloop_actuator_stale_commands_total", {"bin": bin_id})
    return sample or 0.0


@pytest.mark.integration
async def test_the_service_refuses_a_stale_command_and_counts_it(
    js: JetStreamContext, nats_server: NatsServer, tmp_path: Path
) -> None:
    settings = ActuatorSettings(
        nats_url=nats_server.url,
        http_port=0,
        bin_id="stale-bin",
        max_command_age_s=2,
        state_dir=tmp_path,
    )
    driver = CountingDriver()
    service = create_app(settings, driver, clock=Clock(SEEN + timedelta(seconds=60)))
    before = _stale_count("stale-bin")
    done = await Collector(ActuationDone).attach_stream(js, ACTUATION_DONE.subject("stale-bin"))
    await service.start()
    try:
        await _publish(js, _command("stale-bin"))
        (result,) = await done.wait_for(1)
    finally:
        await service.stop()

    assert not result.ok
    assert (result.error or "").startswith("stale: item captured 60.0 s before")
    assert "(limit 2 s)" in (result.error or "")
    assert driver.moves == []
    assert _stale_count("stale-bin") == before + 1


def test_a_state_dir_the_service_cannot_write_is_a_configuration_error(tmp_path: Path) -> None:
    blocked = tmp_path / "a-file"
    blocked.write_text("not a folder")
    settings = ActuatorSettings(http_port=0, state_dir=blocked / "actuator")
    with pytest.raises(ConfigError, match=r"state_dir .* cannot be created"):
        create_app(settings, CountingDriver())
    # `binloop run actuator --validate-config` (the unit's ExecStartPre) says so too.
    env = {"BINLOOP_STATE_DIR": str(blocked / "actuator"), "BINLOOP_HTTP_PORT": "0"}
    result = CliRunner().invoke(binloop_cli, ["run", "actuator", "--validate-config"], env=env)
    assert result.exit_code == 1
    assert "cannot be created" in result.output

    create_app(ActuatorSettings(http_port=0, state_dir=tmp_path / "state"), CountingDriver())
    assert (tmp_path / "state").is_dir()
    assert list((tmp_path / "state").iterdir()) == []  # the journal comes with the first item
