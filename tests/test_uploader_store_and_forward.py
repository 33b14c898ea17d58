"""uploader store-and-forward against a real nats-server and a real HTTP S3 endpoint (moto):
the endpoint goes down mid-stream and comes back, the uploader restarts while it is down, and
every frame still reaches the bucket exactly once, with its checksum, announced exactly once
on the FRAMES stream, the frames the sampler selected first."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
from nats.js.client import JetStreamContext
from prometheus_client import REGISTRY

from binloop.natsserver import NatsServer
from binloop.storage import LocalBlobStore, S3BlobStore, frame_key, sha256_hex, spool_key
from schemas.events import ClassScore, FrameCaptured, FrameStored, SampleSelected
from schemas.routes import FRAMES_CAPTURED, FRAMES_STORED, SAMPLES_SELECTED
from services.uploader import UploaderSettings, create_app
from services.uploader.forwarder import Progress
from services.uploader.queue import UploadQueue
from services.uploader.spool import UPLOADED_SUFFIX, Spool
from tests.helpers import Collector

if TYPE_CHECKING:
    from tests.s3fixture import MotoS3
pytest_plugins = ["tests.s3fixture"]

DEMO_STREAM = Path(__file__).resolve().parent.parent / "data" / "demo" / "stream"
BIN = "bin-saf"


class ProgressLog:
    """The uploader's progress hook: records each step so a test can wait for one."""

    def __init__(self) -> None:
        self.steps: list[tuple[Progress, str]] = []
        self._changed = asyncio.Event()

    def __call__(self, kind: Progress, sha256: str) -> None:
        self.steps.append((kind, sha256))
        self._changed.set()

    def count(self, kind: Progress) -> int:
        return sum(1 for step, _ in self.steps if step == kind)

    def retried_after(self, kind: Progress) -> bool:
        """A failed attempt began after the last `kind` step, so that step was taken into
        account when the forwarder picked its frame."""
        last = max(i for i, (step, _) in enumerate(self.steps) if step == kind)
        return any(step == "retry" for step, _ in self.steps[last + 1 :])

    async def wait_for(self, condition: Callable[[], bool], timeout: float = 20.0) -> None:
        async def loop() -> None:
            while not condition():
                self._changed.clear()
                await self._changed.wait()

        await asyncio.wait_for(loop(), timeout)


def _settings(nats_server: NatsServer, tmp_path: Path, s3: MotoS3) -> UploaderSettings:
    return UploaderSettings(
        nats_url=nats_server.url,
        http_port=0,
        http_host="127.0.0.1",
        bin_id=BIN,
        spool_root=tmp_path / "spool",
        retry_delay_s=0.05,
        retry_initial_s=0.02,
        retry_max_s=0.3,
        store_timeout_s=2.0,
        sweep_interval_s=3600,  # no sweep while a test runs
        spool_drop_min_age_s=3600,
        **s3.overrides(),  # a bucket of its own: moto keeps objects process-wide
    )


def _spooled_frames(spool_root: Path, count: int) -> list[FrameCaptured]:
    """What the frame-ingestor does for `count` distinct frames, without it."""
    spool = LocalBlobStore(spool_root)
    events = []
    for sequence, path in enumerate(sorted(DEMO_STREAM.rglob("*.jpg"))[:count]):
        jpeg = path.read_bytes()
        ref = spool.put(spool_key(BIN, sha256_hex(jpeg)), jpeg, "image/jpeg")
        events.append(
            FrameCaptured(
                producer="test-ingestor",
                bin_id=BIN,
                frame_sha256=ref.sha256,
                spool=ref,
                captured_at=datetime(2026, 5, 6, 7, 8, sequence, tzinfo=UTC),
                width=160,
                height=120,
                source=f"test:{path.name}",
                sequence=sequence,
                ground_truth=path.parent.name,
            )
        )
    return events


async def _capture(js: JetStreamContext, events: list[FrameCaptured]) -> None:
    for event in events:
        await js.publish(
            FRAMES_CAPTURED.subject(BIN),
            event.model_dump_json().encode(),
            headers={"Nats-Msg-Id": str(event.event_id)},
        )


async def _select(js: JetStreamContext, event: FrameCaptured) -> None:
    selection = SampleSelected(
        producer="test-sampler",
        bin_id=BIN,
        frame_sha256=event.frame_sha256,
        frame_key=frame_key(BIN, event.captured_at, event.frame_sha256),
        captured_at=event.captured_at,
        strategy="least_confidence",
        score=0.9,
        reason="test: top-1 probability 0.31",
        predicted=[ClassScore(label="glass", probability=0.31)],
        model_name="edge",
        model_version=1,
    )
    await js.publish(
        SAMPLES_SELECTED.subject(),
        selection.model_dump_json().encode(),
        headers={"Nats-Msg-Id": str(selection.event_id)},
    )


def _metric(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


async def _assert_stored_exactly_once(
    js: JetStreamContext,
    stored: Collector[FrameStored],
    events: list[FrameCaptured],
    settings: UploaderSettings,
) -> None:
    """The FRAMES stream holds one frames.stored per capture, and the bucket holds each frame
    under its key with the bytes its sha256 promised."""
    info = await js.stream_info("FRAMES", subjects_filter=FRAMES_STORED.subject(BIN))
    assert info.state.subjects == {FRAMES_STORED.subject(BIN): len(events)}
    announced = await stored.wait_for(len(events))
    assert len(announced) == len(events)
    assert sorted(s.frame_event_id for s in announced) == sorted(str(e.event_id) for e in events)

    store = S3BlobStore.from_settings(settings)
    keys = [frame_key(BIN, e.captured_at, e.frame_sha256) for e in events]
    assert store.list(f"frames/{BIN}/") == sorted(keys)
    by_sha = {s.frame_sha256: s for s in announced}
    for event, key in zip(events, keys, strict=True):
        announcement = by_sha[event.frame_sha256]
        assert announcement.blob.key == key
        assert announcement.blob.uri == f"s3://{settings.s3_bucket}/{key}"
        assert announcement.blob.sha256 == event.frame_sha256
        assert announcement.ground_truth == event.ground_truth
        assert sha256_hex(store.get(key)) == event.frame_sha256
        assert store.stored_sha256(key) == event.frame_sha256
    spool = Spool(settings.spool_root, BIN)
    assert all(spool.uploaded_at(e.spool.key) is not None for e in events)
    assert UploadQueue(settings.spool_root, BIN).pending_frames == 0


@pytest.mark.integration
async def test_frames_captured_during_a_store_outage_arrive_exactly_once_selected_first(
    js: JetStreamContext, nats_server: NatsServer, tmp_path: Path, own_moto_s3: MotoS3
) -> None:
    settings = _settings(nats_server, tmp_path, own_moto_s3)
    events = _spooled_frames(settings.spool_root, 12)
    before, during = events[:4], events[4:]
    selected = during[-2]  # captured late in the outage, but the sampler wants it
    stored = await Collector(FrameStored).attach_stream(js, FRAMES_STORED.subject(BIN))
    progress = ProgressLog()
    written_before = _metric("binloop_blob_puts_total", backend="s3", outcome="written")
    retries_before = _metric(
        "binloop_uploader_retries_total", bin=BIN, error_type="StoreUnavailableError"
    )

    service = create_app(settings, on_progress=progress)
    await service.start()
    try:
        await _capture(js, before)
        await stored.wait_for(len(before))

        own_moto_s3.stop()
        await _capture(js, during)
        await _select(js, selected)
        await progress.wait_for(
            lambda: (
                progress.count("queued") == len(events)
                and progress.count("prioritized") == 1
                and progress.count("retry") >= 3
                and progress.retried_after("prioritized")
            )
        )
        assert len(stored.items) == len(before)  # nothing announced while the store is down
        assert _metric("binloop_uploader_backlog_frames", bin=BIN) == len(during)
        backlog_bytes = sum(e.spool.size for e in during)
        assert _metric("binloop_uploader_backlog_bytes", bin=BIN) == backlog_bytes

        own_moto_s3.start()  # same port, objects kept
        await stored.wait_for(len(events))
    finally:
        await service.stop()

    await _assert_stored_exactly_once(js, stored, events, settings)
    after_outage = [s.frame_sha256 for s in stored.items[len(before) :]]
    assert after_outage[0] == selected.frame_sha256
    assert after_outage[1:] == [e.frame_sha256 for e in during if e is not selected]
    written = _metric("binloop_blob_puts_total", backend="s3", outcome="written")
    assert written - written_before == len(events)  # no frame was written twice
    retries = _metric("binloop_uploader_retries_total", bin=BIN, error_type="StoreUnavailableError")
    assert retries - retries_before == progress.count("retry") >= 3
    assert _metric("binloop_uploader_backlog_frames", bin=BIN) == 0


@pytest.mark.integration
async def test_an_uploader_restarted_while_the_store_is_down_resumes_its_queue(
    js: JetStreamContext, nats_server: NatsServer, tmp_path: Path, own_moto_s3: MotoS3
) -> None:
    settings = _settings(nats_server, tmp_path, own_moto_s3)
    events = _spooled_frames(settings.spool_root, 6)
    selected = events[3]
    stored = await Collector(FrameStored).attach_stream(js, FRAMES_STORED.subject(BIN))
    own_moto_s3.stop()

    first_run = ProgressLog()
    service = create_app(settings, on_progress=first_run)
    await service.start()
    try:
        await _capture(js, events)
        await _select(js, selected)
        await first_run.wait_for(
            lambda: (
                first_run.count("queued") == len(events)
                and first_run.count("prioritized") == 1
                and first_run.retried_after("prioritized")
            )
        )
    finally:
        await service.stop()

    # Everything the first run acked is on disk, the selection included.
    queue = UploadQueue(settings.spool_root, BIN)
    assert [f.event.event_id for f in queue.snapshot()] == [e.event_id for e in events]
    assert queue.wanted() == {selected.frame_sha256}
    assert stored.items == []

    second_run = ProgressLog()
    service = create_app(settings, on_progress=second_run)
    await service.start()
    try:
        await second_run.wait_for(lambda: second_run.count("retry") >= 1)
        assert second_run.count("queued") == 0  # nothing came again from the bus
        own_moto_s3.start()
        await stored.wait_for(len(events))
    finally:
        await service.stop()

    await _assert_stored_exactly_once(js, stored, events, settings)
    assert stored.items[0].frame_sha256 == selected.frame_sha256
    assert [s.frame_sha256 for s in stored.items[1:]] == [
        e.frame_sha256 for e in events if e is not selected
    ]
    assert UploadQueue(settings.spool_root, BIN).wanted() == frozenset()


@pytest.mark.integration
async def test_a_frame_set_aside_before_a_restart_stays_set_aside_with_its_failures(
    js: JetStreamContext, nats_server: NatsServer, tmp_path: Path, own_moto_s3: MotoS3
) -> None:
    """A poison frame (its uploaded marker cannot be written) is set aside; then the store goes
    down, another frame waits behind it, and the uploader restarts. The next run keeps the
    poison frame's failures and its place behind the others: the waiting frame goes up first,
    and the poison frame is not set aside a second time from zero."""
    settings = _settings(nats_server, tmp_path, own_moto_s3).model_copy(
        update={"retry_set_aside_after": 3}
    )
    poison, waiting = _spooled_frames(settings.spool_root, 2)
    marker = settings.spool_root / f"{poison.spool.key}{UPLOADED_SUFFIX}"
    marker.mkdir()  # the marker can never be written: the frame fails on its own account
    stored = await Collector(FrameStored).attach_stream(js, FRAMES_STORED.subject(BIN))

    first_run = ProgressLog()
    service = create_app(settings, on_progress=first_run)
    await service.start()
    try:
        await _capture(js, [poison])
        await first_run.wait_for(lambda: first_run.count("set_aside") == 1)
        own_moto_s3.stop()
        await _capture(js, [waiting])
        await first_run.wait_for(lambda: _steps_of(first_run, waiting)[-1:] == ["retry"])
    finally:
        await service.stop()
    recorded = UploadQueue(settings.spool_root, BIN).recorded_failures[str(poison.event_id)]
    assert recorded.set_aside
    assert recorded.failures >= 3  # its own failures; the store's outage does not count
    assert stored.items == []

    own_moto_s3.start()
    second_run = ProgressLog()
    service = create_app(settings, on_progress=second_run)
    await service.start()
    try:
        await second_run.wait_for(
            lambda: (
                second_run.count("stored") == 1
                and _steps_of(second_run, poison).count("retry") >= 3
            )
        )
        # Until now it failed as often as its limit allows before a set-aside, and it was
        # never set aside again: it still was.
        assert second_run.count("set_aside") == 0
        assert second_run.steps[0] == ("stored", waiting.frame_sha256)
        retried = _steps_of(second_run, poison).count("retry")  # the store is up: its own
        failures = UploadQueue(settings.spool_root, BIN).recorded_failures
        assert failures[str(poison.event_id)].failures == recorded.failures + retried
        marker.rmdir()  # the fault cleared: the frame goes up on its next turn
        await stored.wait_for(2)
    finally:
        await service.stop()

    await _assert_stored_exactly_once(js, stored, [poison, waiting], settings)
    assert [s.frame_sha256 for s in stored.items] == [waiting.frame_sha256, poison.frame_sha256]
    assert not any((UploadQueue(settings.spool_root, BIN).root / "failures").iterdir())


def _steps_of(progress: ProgressLog, event: FrameCaptured) -> list[Progress]:
    return [kind for kind, sha256 in progress.steps if sha256 == event.frame_sha256]
