"""Heartbeats: services on a bin publish them; the registry's fleet view counts bins per
model version."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from nats.js.client import JetStreamContext
from prometheus_client import REGISTRY

from binloop.natsserver import NatsServer
from schemas import FleetHeartbeat
from schemas.routes import FLEET_HEARTBEAT
from services.actuator import ActuatorSettings, create_app
from services.model_registry import RegistrySettings
from services.model_registry import create_app as create_registry
from services.model_registry.fleet import FleetView
from tests.helpers import Collector, eventually

NOW = datetime(2026, 11, 22, 12, 0, tzinfo=UTC)


def _beat(bin_id: str, version: int | None, at: datetime, model: str = "waste") -> FleetHeartbeat:
    return FleetHeartbeat(
        producer="edge-inferencer",
        bin_id=bin_id,
        service="edge-inferencer",
        model_name=None if version is None else model,
        model_version=version,
        frames_processed=1,
        uptime_s=1,
        occurred_at=at,
    )


def test_fleet_view_counts_live_bins_per_version_from_their_latest_beat() -> None:
    view = FleetView(stale_after=timedelta(minutes=5))
    view.observe([_beat("bin-3", 1, NOW - timedelta(minutes=10))], NOW - timedelta(minutes=10))
    view.observe(
        [
            _beat("bin-1", 1, NOW - timedelta(seconds=30)),
            _beat("bin-1", 2, NOW - timedelta(seconds=10)),  # swapped to v2 since
            _beat("bin-2", 1, NOW - timedelta(seconds=5)),
            _beat("bin-4", None, NOW),  # no model yet
        ],
        NOW - timedelta(seconds=5),
    )
    view.observe([_beat("bin-2", 2, NOW)], NOW)
    # bin-3 is silent (its last beat arrived 10 minutes ago): left out.
    assert view.serving(NOW) == {("waste", 2): 2}


def test_fleet_view_counts_a_bin_whose_clock_is_behind_while_its_beats_arrive() -> None:
    view = FleetView(stale_after=timedelta(minutes=5))
    # The Jetson's clock runs 6 minutes late (no NTP yet); its heartbeat arrived just now.
    view.observe([_beat("bin-7", 2, NOW - timedelta(minutes=6))], NOW)
    assert view.serving(NOW) == {("waste", 2): 1}


def test_fleet_view_takes_the_last_arrived_beat_when_a_bins_clock_goes_back() -> None:
    view = FleetView(stale_after=timedelta(minutes=5))
    # Booted with its clock a day ahead and served v1; NTP then set the clock right, and the
    # bin installed v2.
    view.observe([_beat("bin-7", 1, NOW + timedelta(days=1))], NOW)
    view.observe([_beat("bin-7", 2, NOW + timedelta(seconds=15))], NOW + timedelta(seconds=15))
    assert view.serving(NOW + timedelta(seconds=16)) == {("waste", 2): 1}
    # A future-dated beat does not keep a bin alive: silent for two hours, it is gone.
    assert view.serving(NOW + timedelta(hours=2)) == {}


def _uploader_beat(bin_id: str, backlog: int, at: datetime) -> FleetHeartbeat:
    return FleetHeartbeat(
        producer="uploader",
        bin_id=bin_id,
        service="uploader",
        frames_processed=10,
        spool_backlog=backlog,
        uptime_s=1,
        occurred_at=at,
    )


def test_fleet_view_keeps_each_live_uploaders_backlog() -> None:
    view = FleetView(stale_after=timedelta(minutes=5))
    view.observe(
        [_uploader_beat("bin-3", 900, NOW - timedelta(minutes=10))],  # silent: left out
        NOW - timedelta(minutes=10),
    )
    view.observe(
        [
            _uploader_beat("bin-1", 40, NOW - timedelta(seconds=30)),
            _uploader_beat("bin-1", 12, NOW - timedelta(seconds=10)),
            _uploader_beat("bin-2", 0, NOW),
            _beat("bin-4", 2, NOW),  # an inferencer's beat says nothing about uploads
        ],
        NOW,
    )
    assert view.spool_backlog(NOW) == {"bin-1": 12, "bin-2": 0}


@pytest.mark.integration
async def test_a_service_publishes_heartbeats_on_the_fleet_stream(
    nats_server: NatsServer, js: JetStreamContext
) -> None:
    beats = await Collector(FleetHeartbeat).attach_stream(js, FLEET_HEARTBEAT.wildcard)
    service = create_app(
        ActuatorSettings(
            nats_url=nats_server.url,
            http_port=0,
            heartbeat_interval_s=0.05,
            bin_id="bin-9",
        )
    )
    service.send_heartbeats(lambda: _beat("bin-9", 3, datetime.now(UTC)))
    await service.start()
    try:
        received = await beats.wait_for(3)
    finally:
        await service.stop()
    assert {b.bin_id for b in received} == {"bin-9"}
    assert set(beats.subjects) == {FLEET_HEARTBEAT.subject("bin-9")}


def _serving_bins(model: str, version: int) -> float | None:
    return REGISTRY.get_sample_value(
        "binloop_fleet_serving_bins", {"model": model, "version": str(version)}
    )


def _backlog(bin_id: str) -> float | None:
    return REGISTRY.get_sample_value("binloop_fleet_spool_backlog_frames", {"bin": bin_id})


@pytest.mark.integration
async def test_the_fleet_gauge_drops_silent_bins_without_a_new_heartbeat(
    nats_server: NatsServer, js: JetStreamContext
) -> None:
    model = "quiet-fleet"
    now = NOW

    def clock() -> datetime:
        return now

    registry = create_registry(
        RegistrySettings(nats_url=nats_server.url, http_port=0, fleet_refresh_s=0.05),
        clock=clock,
    )
    await registry.start()
    try:
        for bin_id in ("bin-1", "bin-2"):
            beat = _beat(bin_id, 7, NOW - timedelta(seconds=5), model)
            await js.publish(FLEET_HEARTBEAT.subject(bin_id), beat.model_dump_json().encode())
        await eventually(lambda: _serving_bins(model, 7) == 2)
        beat = _uploader_beat("bin-quiet", 37, NOW - timedelta(seconds=5))
        await js.publish(FLEET_HEARTBEAT.subject("bin-quiet"), beat.model_dump_json().encode())
        await eventually(lambda: _backlog("bin-quiet") == 37)
        # Every bin falls silent: no heartbeat arrives any more, only time passes.
        now = NOW + timedelta(minutes=10)
        await eventually(lambda: _serving_bins(model, 7) is None)  # no series, not 0
        await eventually(lambda: _backlog("bin-quiet") is None)  # unknown, not 0
    finally:
        await registry.stop()


@pytest.mark.integration
async def test_the_fleet_gauge_drops_a_version_once_no_bin_serves_it(
    nats_server: NatsServer, js: JetStreamContext
) -> None:
    """Every version ever served would otherwise keep a series at 0 for as long as the
    registry runs."""
    model = "rolling-fleet"
    registry = create_registry(RegistrySettings(nats_url=nats_server.url, http_port=0))
    await registry.start()

    async def beat(bin_id: str, version: int, seconds_ago: float) -> None:
        event = _beat(bin_id, version, datetime.now(UTC) - timedelta(seconds=seconds_ago), model)
        await js.publish(FLEET_HEARTBEAT.subject(bin_id), event.model_dump_json().encode())

    try:
        await beat("bin-1", 3, 3)
        await beat("bin-2", 3, 3)
        await eventually(lambda: _serving_bins(model, 3) == 2)
        await beat("bin-1", 4, 2)  # the rollout reaches bin-1
        await eventually(lambda: (_serving_bins(model, 3), _serving_bins(model, 4)) == (1, 1))
        await beat("bin-2", 4, 1)  # and bin-2: nothing serves v3 any more
        await eventually(lambda: (_serving_bins(model, 3), _serving_bins(model, 4)) == (None, 2))
    finally:
        await registry.stop()
