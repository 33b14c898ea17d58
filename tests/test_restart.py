"""A consumer stopped mid-stream and started again resumes from its durable consumer:
nothing is lost and nothing is counted twice."""

from __future__ import annotations

import asyncio
from collections import Counter
from datetime import UTC, datetime
from pathlib import Path

import pytest
from nats.js.client import JetStreamContext

from binloop.natsserver import NatsServer
from schemas import ActuationCommand, ActuationDone
from schemas.routes import ACTUATION_COMMAND, ACTUATION_DONE
from schemas.taxonomy import Compartment
from services.actuator import ActuatorSettings, create_app
from tests.helpers import Collector

pytestmark = pytest.mark.integration


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
