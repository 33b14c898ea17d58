"""uploader: verified, idempotent upload; spool markers and the sweep (injected clock); the
service storing every frame once, dead-lettering corrupt spool entries and carrying on; the
forwarder outliving spool errors and setting aside a frame that keeps failing on its own."""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from nats.aio.client import Client
from nats.js.client import JetStreamContext
from prometheus_client import REGISTRY
from pydantic import ValidationError

from binloop.bus import ensure_streams
from binloop.bus.consumers import edge_inferencer_durable
from binloop.errors import (
    ChecksumMismatchError,
    MissingBlobError,
    PermanentError,
    StoreUnavailableError,
    TransientError,
)
from binloop.natsserver import NatsServer
from binloop.storage import (
    SPOOL_ANNOUNCING_SUFFIX,
    BlobStore,
    LocalBlobStore,
    frame_key,
    sha256_hex,
    spool_key,
)
from schemas.base import BlobRef
from schemas.events import DeadLetter, FleetHeartbeat, FrameCaptured, FrameStored
from schemas.routes import DLQ, FLEET_HEARTBEAT, FRAMES_CAPTURED, FRAMES_STORED
from services.uploader import UploaderSettings, create_app
from services.uploader import app as uploader_app
from services.uploader.backoff import Backoff
from services.uploader.core import FrameUploader, stored_event
from services.uploader.forwarder import Announce, DeadLetterSink, Forwarder, ProgressHook
from services.uploader.limits import UNREAD_BY_INFERENCER, SpoolLimits, plan_drops
from services.uploader.queue import QueuedFrame, UploadQueue
from services.uploader.readers import KEEP_EVERYTHING, SPOOL_TO_EVENT_SLACK_S, unread_since
from services.uploader.schedule import UploadSchedule
from services.uploader.spool import (
    DEAD_LETTERED_SUFFIX,
    UPLOADED_SUFFIX,
    UPLOADED_UNREAD_BY_INFERENCER,
    Spool,
    SpoolIOError,
)
from tests.helpers import Collector

DEMO_STREAM = Path(__file__).resolve().parent.parent / "data" / "demo" / "stream"
BIN = "bin-1"


def _demo_jpegs(count: int) -> list[bytes]:
    return [p.read_bytes() for p in sorted(DEMO_STREAM.rglob("*.jpg"))[:count]]


def _spool_and_describe(spool_root: Path, jpeg: bytes, sequence: int) -> FrameCaptured:
    """What the frame-ingestor does for one frame, without it."""
    ref = LocalBlobStore(spool_root).put(spool_key(BIN, sha256_hex(jpeg)), jpeg, "image/jpeg")
    return FrameCaptured(
        producer="test-ingestor",
        bin_id=BIN,
        frame_sha256=ref.sha256,
        spool=ref,
        captured_at=datetime(2026, 3, 4, 5, 6, 7, tzinfo=UTC),
        width=160,
        height=120,
        source=f"test:{sequence}",
        sequence=sequence,
        ground_truth="glass",
    )


# --- core: upload --------------------------------------------------------------------------


def test_settings_refuse_a_drop_age_below_the_sweep_interval() -> None:
    """Frames captured since the last sweep are kept from the spool-full policy by their age
    alone (the sweep is what learns the edge-inferencer has not read them yet)."""
    below = r"spool_drop_min_age_s \(30.0\) is below sweep_interval_s \(60.0\)"
    with pytest.raises(ValidationError, match=below):
        UploaderSettings(sweep_interval_s=60, spool_drop_min_age_s=30)
    settings = UploaderSettings(sweep_interval_s=30, spool_drop_min_age_s=30)
    assert settings.spool_drop_min_age_s == settings.sweep_interval_s
    defaults = UploaderSettings()
    assert defaults.spool_drop_min_age_s > defaults.sweep_interval_s


def test_upload_is_verified_idempotent_and_marks_the_spool(tmp_path: Path) -> None:
    jpeg = _demo_jpegs(1)[0]
    event = _spool_and_describe(tmp_path / "spool", jpeg, 0)
    store = LocalBlobStore(tmp_path / "blobs")
    uploader = FrameUploader(Spool(tmp_path / "spool", BIN), store, clock=lambda: 1234.5)

    first = uploader.upload(event)
    second = uploader.upload(event)

    key = frame_key(BIN, event.captured_at, event.frame_sha256)
    assert key == f"frames/{BIN}/2026/03/04/{event.frame_sha256}.jpg"
    assert first.blob.key == second.blob.key == key
    assert first.blob.sha256 == event.frame_sha256
    assert (first.written_bytes, second.written_bytes) == (len(jpeg), 0)
    assert store.get(key) == jpeg
    assert store.list("frames/") == [key]
    assert Spool(tmp_path / "spool", BIN).uploaded_at(event.spool.key) == 1234.5


def test_missing_or_corrupt_spool_entries_are_permanent_errors(tmp_path: Path) -> None:
    first, second = _demo_jpegs(2)
    spool = Spool(tmp_path / "spool", BIN)
    uploader = FrameUploader(spool, LocalBlobStore(tmp_path / "blobs"))

    corrupt = _spool_and_describe(tmp_path / "spool", first, 0)
    (spool.store.root / corrupt.spool.key).write_bytes(second)
    with pytest.raises(ChecksumMismatchError) as mismatch:
        uploader.upload(corrupt)
    assert isinstance(mismatch.value, PermanentError)
    assert mismatch.value.actual == sha256_hex(second)

    missing = _spool_and_describe(tmp_path / "spool", second, 1)
    spool.store.delete(missing.spool.key)
    with pytest.raises(MissingBlobError):
        uploader.upload(missing)
    assert spool.uploaded_at(corrupt.spool.key) is None


def test_a_redelivery_after_the_sweep_is_answered_from_the_store(tmp_path: Path) -> None:
    jpeg = _demo_jpegs(1)[0]
    event = _spool_and_describe(tmp_path / "spool", jpeg, 0)
    spool = Spool(tmp_path / "spool", BIN)
    uploader = FrameUploader(spool, LocalBlobStore(tmp_path / "blobs"))
    stored = uploader.upload(event)
    spool.store.delete(event.spool.key)

    again = uploader.upload(event)
    assert again.blob == stored.blob
    assert again.written_bytes == 0


class FailingStore(LocalBlobStore):
    def put(self, key: str, data: bytes, content_type: str = "application/octet-stream") -> BlobRef:
        raise OSError(28, "No space left on device")


def test_a_store_write_error_is_transient_and_leaves_the_spool_unmarked(tmp_path: Path) -> None:
    event = _spool_and_describe(tmp_path / "spool", _demo_jpegs(1)[0], 0)
    spool = Spool(tmp_path / "spool", BIN)
    uploader = FrameUploader(spool, FailingStore(tmp_path / "blobs"))
    with pytest.raises(StoreUnavailableError, match="No space left") as error:
        uploader.upload(event)
    assert isinstance(error.value, TransientError)
    assert spool.uploaded_at(event.spool.key) is None
    assert spool.sweep(time.time() + 10_000, retention_s=0).pending == 1
    assert spool.store.exists(event.spool.key)


def test_stored_event_id_is_derived_from_the_captured_event(tmp_path: Path) -> None:
    event = _spool_and_describe(tmp_path, _demo_jpegs(1)[0], 0)
    blob = BlobRef(key="k", uri="file:///k", sha256=event.frame_sha256, size=1)
    one, two = stored_event(event, blob, "uploader"), stored_event(event, blob, "uploader")
    assert one.event_id == two.event_id != event.event_id
    assert one.frame_event_id == str(event.event_id)
    assert one.ground_truth == "glass"


# --- core: spool sweep with an injected clock ----------------------------------------------


def test_sweep_deletes_only_uploaded_frames_past_the_retention(tmp_path: Path) -> None:
    frames = _demo_jpegs(4)
    events = [_spool_and_describe(tmp_path / "spool", jpeg, i) for i, jpeg in enumerate(frames)]
    uploaded_at = time.time()  # after the spool writes, as in real life
    clock = iter([uploaded_at, uploaded_at, uploaded_at + 50]).__next__
    spool = Spool(tmp_path / "spool", BIN)
    uploader = FrameUploader(spool, LocalBlobStore(tmp_path / "blobs"), clock=clock)
    old, respooled, recent, pending = events
    for event in (old, respooled, recent):
        uploader.upload(event)
    # Captured again after its upload: the ingestor re-stamps the spool file.
    later = uploaded_at + 10
    os.utime(spool.store.root / respooled.spool.key, (later, later))
    orphan = f"{BIN}/zz/{'f' * 64}.jpg{UPLOADED_SUFFIX}"
    spool.store.put(orphan, b'{"uploaded_at": 1}')

    inside = spool.sweep(uploaded_at + 119, retention_s=120)
    assert (inside.pending, inside.kept, inside.deleted) == (2, 2, 0)
    assert not spool.store.exists(orphan)

    past = spool.sweep(uploaded_at + 121, retention_s=120)
    assert (past.pending, past.kept, past.deleted) == (2, 1, 1)
    assert not spool.store.exists(old.spool.key)
    assert not spool.store.exists(old.spool.key + UPLOADED_SUFFIX)
    for event in (respooled, recent, pending):
        assert spool.store.exists(event.spool.key)

    final = spool.sweep(uploaded_at + 1_000, retention_s=120)
    assert (final.pending, final.kept, final.deleted) == (2, 0, 1)
    assert spool.store.exists(pending.spool.key)  # never uploaded: never deleted
    assert spool.store.exists(respooled.spool.key)


def test_an_unreadable_marker_keeps_the_frame(tmp_path: Path) -> None:
    event = _spool_and_describe(tmp_path / "spool", _demo_jpegs(1)[0], 0)
    spool = Spool(tmp_path / "spool", BIN)
    spool.store.put(event.spool.key + UPLOADED_SUFFIX, b"{garbage")
    scan = spool.sweep(time.time() + 10_000, retention_s=0)
    assert (scan.pending, scan.deleted) == (1, 0)
    assert spool.store.exists(event.spool.key)


def test_sweep_keeps_what_the_edge_inferencer_has_not_read(tmp_path: Path) -> None:
    frames = _demo_jpegs(2)
    read, unread = [
        _spool_and_describe(tmp_path / "spool", jpeg, i) for i, jpeg in enumerate(frames)
    ]
    spool = Spool(tmp_path / "spool", BIN)
    uploader = FrameUploader(spool, LocalBlobStore(tmp_path / "blobs"), clock=lambda: 2_000.0)
    for event, spooled_at in ((read, 1_000.0), (unread, 1_500.0)):
        uploader.upload(event)
        os.utime(spool.store.root / event.spool.key, (spooled_at, spooled_at))

    scan = spool.sweep(10_000.0, retention_s=120, keep_spooled_since=1_400.0)

    assert (scan.kept, scan.deleted) == (1, 1)
    assert not spool.store.exists(read.spool.key)
    assert spool.store.exists(unread.spool.key)


@pytest.mark.integration
async def test_jetstream_says_from_when_the_edge_inferencer_has_frames_to_read(
    js: JetStreamContext, nats_server: NatsServer, tmp_path: Path
) -> None:
    await ensure_streams(js)
    assert await unread_since(js, BIN) is None  # no inferencer on this bin (yet)
    t0 = datetime(2026, 3, 4, 5, 6, 7, tzinfo=UTC)
    jpegs = _demo_jpegs(3)
    events = [
        _spool_and_describe(tmp_path / "spool", jpeg, i).model_copy(
            update={"captured_at": t0 + timedelta(seconds=10 * i)}
        )
        for i, jpeg in enumerate(jpegs)
    ]
    other_bin = events[0].model_copy(update={"bin_id": "bin-2", "event_id": uuid.uuid4()})
    await js.publish(FRAMES_CAPTURED.subject("bin-2"), other_bin.model_dump_json().encode())
    for event in events:
        await js.publish(FRAMES_CAPTURED.subject(BIN), event.model_dump_json().encode())
    inferencer = await js.pull_subscribe(
        FRAMES_CAPTURED.subject(BIN),
        durable=edge_inferencer_durable(BIN),
        stream=FRAMES_CAPTURED.stream,
    )
    (first,) = await inferencer.fetch(1, timeout=5)
    await first.ack_sync()

    keep_since = await unread_since(js, BIN)

    assert keep_since == events[1].captured_at.timestamp() - SPOOL_TO_EVENT_SLACK_S
    for msg in await inferencer.fetch(2, timeout=5):
        await msg.ack_sync()
    assert await unread_since(js, BIN) is None  # read them all


# --- the service against a real nats-server ------------------------------------------------


def _metric(name: str) -> float:
    return REGISTRY.get_sample_value(name, {"bin": BIN}) or 0.0


@pytest.mark.integration
async def test_uploader_stores_each_frame_once_and_dead_letters_corrupt_ones(
    js: JetStreamContext, nats_client: Client, nats_server: NatsServer, tmp_path: Path
) -> None:
    settings = UploaderSettings(
        nats_url=nats_server.url,
        http_port=0,
        http_host="127.0.0.1",
        retry_delay_s=0.05,
        blob_root=tmp_path / "blobs",
        spool_root=tmp_path / "spool",
        instance="pod-1",  # named in each entry's producer; the DLQ subject stays the service's
    )
    frames = _demo_jpegs(8)
    events = [_spool_and_describe(settings.spool_root, jpeg, i) for i, jpeg in enumerate(frames)]
    corrupt, missing = events[2], events[5]
    spool_dir = settings.spool_root.resolve()
    (spool_dir / corrupt.spool.key).write_bytes(b"\xff\xd8 flipped bits \xff\xd9")
    (spool_dir / missing.spool.key).unlink()
    good = [e for e in events if e not in (corrupt, missing)]

    stored = await Collector(FrameStored).attach(nats_client, FRAMES_STORED.wildcard)
    dead = await Collector(DeadLetter).attach(nats_client, DLQ.subject("uploader"))
    bytes_before = _metric("binloop_uploaded_bytes_total")
    service = create_app(settings)
    await service.start()
    try:
        for event in events:
            await js.publish(
                FRAMES_CAPTURED.subject(BIN),
                event.model_dump_json().encode(),
                headers={"Nats-Msg-Id": str(event.event_id)},
            )
        letters = await dead.wait_for(2)
        announced = list(await stored.wait_for(len(good)))
        # The same capture delivered again (a redelivery after a lost ack looks like this):
        # it is uploaded again, idempotently, and its announcement is the same event.
        await js.publish(
            FRAMES_CAPTURED.subject(BIN),
            good[0].model_dump_json().encode(),
            headers={"Nats-Msg-Id": f"again-{good[0].event_id}"},
        )
        repeated = (await stored.wait_for(len(good) + 1))[-1]
        assert repeated.event_id in {e.event_id for e in announced}
    finally:
        await service.stop()

    assert {d.error_type for d in letters} == {"ChecksumMismatchError", "MissingBlobError"}
    assert all(d.original_subject == FRAMES_CAPTURED.subject(BIN) for d in letters)
    assert {(d.service, d.producer) for d in letters} == {("uploader", "uploader:pod-1")}
    assert any(corrupt.frame_sha256 in d.error for d in letters)
    assert sorted(e.frame_event_id for e in announced) == sorted(str(e.event_id) for e in good)
    info = await js.stream_info("FRAMES", subjects_filter=FRAMES_STORED.wildcard)
    assert info.state.subjects == {FRAMES_STORED.subject(BIN): len(good)}
    store = LocalBlobStore(settings.blob_root)
    assert len(store.list("frames/")) == len(good)
    for event in announced:
        assert event.blob.key == frame_key(BIN, event.captured_at, event.frame_sha256)
        assert sha256_hex(store.get(event.blob.key)) == event.frame_sha256 == event.blob.sha256
        assert event.ground_truth == "glass"
    spool = Spool(settings.spool_root, BIN)
    assert all(spool.uploaded_at(e.spool.key) is not None for e in good)
    assert spool.store.exists(good[0].spool.key)  # kept for the retention, not deleted yet
    # Dead-lettered by the bus at intake: marked, so the sweep reclaims it after the retention.
    assert spool.dead_lettered_at(corrupt.spool.key) is not None
    assert _metric("binloop_uploaded_bytes_total") - bytes_before == sum(e.spool.size for e in good)


@pytest.mark.integration
async def test_the_sweep_task_reclaims_uploaded_frames(
    js: JetStreamContext, nats_client: Client, nats_server: NatsServer, tmp_path: Path
) -> None:
    settings = UploaderSettings(
        nats_url=nats_server.url,
        http_port=0,
        http_host="127.0.0.1",
        blob_root=tmp_path / "blobs",
        spool_root=tmp_path / "spool",
        spool_retention_s=0,
        sweep_interval_s=0.05,
    )
    events = [
        _spool_and_describe(settings.spool_root, jpeg, i) for i, jpeg in enumerate(_demo_jpegs(3))
    ]
    unannounced = _spool_and_describe(settings.spool_root, _demo_jpegs(4)[3], 3)
    stored = await Collector(FrameStored).attach(nats_client, FRAMES_STORED.wildcard)
    clock_read = asyncio.Event()

    def clock() -> float:
        clock_read.set()  # once the uploads are done, only the sweep reads the clock
        return time.time()

    service = create_app(settings, clock=clock)
    await service.start()
    try:
        for event in events:
            await js.publish(
                FRAMES_CAPTURED.subject(BIN),
                event.model_dump_json().encode(),
                headers={"Nats-Msg-Id": str(event.event_id)},
            )
        await stored.wait_for(len(events))
        for _ in range(2):  # the second read starts a sweep after a whole one has run
            clock_read.clear()
            await asyncio.wait_for(clock_read.wait(), 10)
    finally:
        await service.stop()

    spool = Spool(settings.spool_root, BIN)
    for event in events:
        assert not spool.store.exists(event.spool.key)
        assert not spool.store.exists(event.spool.key + UPLOADED_SUFFIX)
    assert spool.store.exists(unannounced.spool.key)  # never uploaded: never deleted
    assert _metric("binloop_uploader_backlog_frames") == 0


@pytest.mark.integration
async def test_the_sweep_outlives_a_message_it_cannot_read_and_an_unexpected_error(
    js: JetStreamContext,
    nats_server: NatsServer,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The first message after the edge-inferencer's ack floor is not a FrameCaptured at all
    (garbage): the sweep keeps everything this time (within the spool limits), with a
    warning. An error nobody expected (here, in the first question to JetStream) is logged
    with its traceback and the next sweep runs: without the sweep the spool is never
    reclaimed, and the uploader would be restarted into the same crash."""
    settings = UploaderSettings(
        nats_url=nats_server.url,
        http_port=0,
        http_host="127.0.0.1",
        blob_root=tmp_path / "blobs",
        spool_root=tmp_path / "spool",
        sweep_interval_s=0.05,
        spool_drop_min_age_s=0.05,
    )
    await js.pull_subscribe(  # the edge-inferencer's durable consumer, behind
        FRAMES_CAPTURED.subject(BIN),
        durable=edge_inferencer_durable(BIN),
        stream=FRAMES_CAPTURED.stream,
    )
    await js.publish(FRAMES_CAPTURED.subject(BIN), b'{"not": "a frame"}')
    asked = 0
    answers: list[float | None] = []
    answered = asyncio.Event()

    async def buggy_then_real_unread_since(js: JetStreamContext, bin_id: str) -> float | None:
        nonlocal asked
        asked += 1
        if asked == 1:
            raise RuntimeError("a bug in the sweep")
        answer = await unread_since(js, bin_id)
        answers.append(answer)
        answered.set()
        return answer

    monkeypatch.setattr(uploader_app, "unread_since", buggy_then_real_unread_since)
    service = create_app(settings)
    await service.start()
    try:
        with caplog.at_level(logging.WARNING):
            while len(answers) < 2:
                answered.clear()
                await asyncio.wait_for(answered.wait(), 10)
        assert service.is_ready()
    finally:
        await service.stop()

    assert answers[:2] == [KEEP_EVERYTHING, KEEP_EVERYTHING]
    [bug] = [r for r in caplog.records if r.exc_info]
    assert "spool sweep failed unexpectedly" in bug.getMessage()
    assert any("is not a FrameCaptured" in r.getMessage() for r in caplog.records)


@pytest.mark.integration
async def test_uploaded_frames_kept_for_a_stuck_edge_inferencer_stay_within_the_spool_limits(
    js: JetStreamContext,
    nats_client: Client,
    nats_server: NatsServer,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The sweep keeps every frame the edge-inferencer has not read, however long ago it was
    uploaded; one that stopped reading (no model yet, its consumer left behind) would grow the
    spool with the store up, until the disk the frame-ingestor writes to is full. Past what the
    spool limits leave after the frames waiting for the store, the oldest of those frames go,
    counted under their own reason."""
    settings = UploaderSettings(
        nats_url=nats_server.url,
        http_port=0,
        http_host="127.0.0.1",
        blob_root=tmp_path / "blobs",
        spool_root=tmp_path / "spool",
        spool_retention_s=30,
        sweep_interval_s=0.05,
        spool_drop_min_age_s=60,  # no frame is dropped while it waits for the store
        spool_max_pending_frames=3,
    )
    await js.pull_subscribe(  # the edge-inferencer's durable consumer: it reads nothing
        FRAMES_CAPTURED.subject(BIN),
        durable=edge_inferencer_durable(BIN),
        stream=FRAMES_CAPTURED.stream,
    )
    t0 = datetime.now(UTC)
    events = [
        _spool_and_describe(settings.spool_root, jpeg, i).model_copy(
            update={"captured_at": t0 + timedelta(milliseconds=i)}
        )
        for i, jpeg in enumerate(_demo_jpegs(8))
    ]
    spool_dir = settings.spool_root / BIN
    for i, event in enumerate(events):  # spooled in order, oldest first
        at = t0.timestamp() + i / 1000
        os.utime(settings.spool_root / event.spool.key, (at, at))
    stored = await Collector(FrameStored).attach(nats_client, FRAMES_STORED.wildcard)
    now = [time.time() + 1]
    clock_read = asyncio.Event()

    def clock() -> float:
        clock_read.set()  # once the uploads are done, only the sweep reads the clock
        return now[0]

    before = _dropped(UPLOADED_UNREAD_BY_INFERENCER)
    service = create_app(settings, clock=clock)
    await service.start()
    try:
        with caplog.at_level(logging.WARNING, logger="services.uploader.forwarder"):
            for event in events:
                await js.publish(
                    FRAMES_CAPTURED.subject(BIN),
                    event.model_dump_json().encode(),
                    headers={"Nats-Msg-Id": str(event.event_id)},
                )
            await stored.wait_for(len(events))
            now[0] += 60  # every frame past its retention, kept only for the inferencer
            for _ in range(3):  # whole sweeps after that
                clock_read.clear()
                await asyncio.wait_for(clock_read.wait(), 10)
    finally:
        await service.stop()

    left = sorted(p.name for p in spool_dir.rglob("*.jpg"))
    assert left == sorted(Path(e.spool.key).name for e in events[-3:])  # the newest stay
    assert _dropped(UPLOADED_UNREAD_BY_INFERENCER) - before == len(events) - 3
    [warning] = [r.getMessage() for r in caplog.records if "not read yet" in r.getMessage()]
    assert "deleted 5 uploaded frames" in warning


# --- store-and-forward pieces, without sockets ---------------------------------------------


def test_backoff_doubles_up_to_the_cap_with_jitter_taken_off() -> None:
    now = [100.0]
    draws = iter([0.0, 0.0, 0.0, 0.0, 0.5, 1.0, 0.2])
    backoff = Backoff(1.0, 8.0, 0.5, clock=lambda: now[0], rand=lambda: next(draws))
    assert backoff.wait_s() == 0.0

    delays = [backoff.failed() for _ in range(6)]
    # 1, 2, 4, 8, then capped at 8: minus 50 % of it times the draw (0.5 -> 25 %, 1.0 -> 50 %).
    assert delays == [1.0, 2.0, 4.0, 8.0, 6.0, 4.0]
    assert backoff.failures == 6
    assert backoff.wait_s() == 4.0
    now[0] += 1.5
    assert backoff.wait_s() == 2.5
    now[0] += 10
    assert backoff.wait_s() == 0.0

    backoff.succeeded()
    assert (backoff.failures, backoff.wait_s()) == (0, 0.0)
    assert backoff.failed() == pytest.approx(0.9)  # back to the start: 1 s minus 0.5 * 0.2


def test_backoff_without_jitter_is_the_plain_schedule_and_bad_bounds_are_refused() -> None:
    backoff = Backoff(0.5, 60.0, 0.0, rand=lambda: 0.99)
    assert [backoff.delay_s(n) for n in range(0, 10)] == [
        0.0,
        0.5,
        1.0,
        2.0,
        4.0,
        8.0,
        16.0,
        32.0,
        60.0,
        60.0,
    ]
    assert backoff.delay_s(5000) == 60.0  # no overflow far past the cap
    with pytest.raises(ValueError, match="max_s"):
        Backoff(2.0, 1.0, 0.5)
    with pytest.raises(ValueError, match="jitter"):
        Backoff(1.0, 2.0, 1.5)


def _queued(events: list[FrameCaptured], times: list[float]) -> list[QueuedFrame]:
    return [QueuedFrame(e, t) for e, t in zip(events, times, strict=True)]


def test_plan_drops_spares_selected_young_and_busy_frames(tmp_path: Path) -> None:
    events = [_spool_and_describe(tmp_path, jpeg, i) for i, jpeg in enumerate(_demo_jpegs(6))]
    queued = _queued(events, [0, 1, 2, 3, 4, 5])
    wanted = {events[0].frame_sha256}
    limits = SpoolLimits(max_frames=3, max_bytes=10**9, policy="drop_oldest", min_age_s=2)

    plan = plan_drops(queued, wanted, limits, now=5.5)
    # Over by 3: frame 0 is selected, 4 and 5 are younger than 2 s: 1, 2, 3 go.
    assert [d.frame.event.sequence for d in plan.drops] == [1, 2, 3]
    assert {d.reason for d in plan.drops} == {"max_frames"}
    assert not plan.still_over

    busy = plan_drops(queued, wanted, limits, now=5.5, busy={str(events[1].event_id)})
    assert [d.frame.event.sequence for d in busy.drops] == [2, 3]
    assert busy.still_over  # 0 (selected), 1 (uploading), 4, 5 (young) are all protected

    newest = plan_drops(queued, wanted, replace(limits, policy="drop_newest"), now=5.5)
    assert [d.frame.event.sequence for d in newest.drops] == [3, 2, 1]


def test_plan_drops_counts_bytes_once_per_spooled_file(tmp_path: Path) -> None:
    events = [_spool_and_describe(tmp_path, jpeg, i) for i, jpeg in enumerate(_demo_jpegs(3))]
    again = events[0].model_copy(update={"event_id": uuid.uuid4(), "sequence": 3})
    queued = _queued([*events, again], [0, 1, 2, 3])
    sizes = [e.spool.size for e in events]
    limits = SpoolLimits(max_frames=100, max_bytes=sum(sizes) - 1)

    plan = plan_drops(queued, set(), limits, now=10)
    # Dropping the first capture of frame 0 frees nothing (a later capture still needs the
    # file), so the oldest capture of frame 1 goes too.
    assert [d.frame.event.sequence for d in plan.drops] == [0, 1]
    assert [d.reason for d in plan.drops] == ["max_bytes", "max_bytes"]
    assert not plan.still_over


def test_plan_drops_gives_up_frames_the_edge_inferencer_has_read_first(tmp_path: Path) -> None:
    t0 = datetime(2026, 3, 4, 5, 6, 7, tzinfo=UTC)
    events = [
        _spool_and_describe(tmp_path, jpeg, i).model_copy(
            update={"captured_at": t0 + timedelta(seconds=10 * i)}
        )
        for i, jpeg in enumerate(_demo_jpegs(6))
    ]
    queued = _queued(events, [0, 1, 2, 3, 4, 5])
    limits = SpoolLimits(max_frames=3, max_bytes=10**9, policy="drop_newest", min_age_s=2)
    # What the sweep learns: the inferencer has read frames 0 and 1, not 2 onwards.
    unread_since = events[2].captured_at.timestamp() - SPOOL_TO_EVENT_SLACK_S

    newest = plan_drops(queued, set(), limits, now=5.5, unread_since=unread_since)
    # Over by 3; 4 and 5 are young. Frames 2 and 3 are past the minimum age but unread: the
    # read ones go first (newest first), and only then the newest unread one, so named.
    assert [d.frame.event.sequence for d in newest.drops] == [1, 0, 3]
    assert [d.reason for d in newest.drops] == ["max_frames", "max_frames", UNREAD_BY_INFERENCER]
    assert not newest.still_over

    oldest = plan_drops(
        queued, set(), replace(limits, policy="drop_oldest"), now=5.5, unread_since=unread_since
    )
    assert [d.frame.event.sequence for d in oldest.drops] == [0, 1, 2]
    assert [d.reason for d in oldest.drops] == ["max_frames", "max_frames", UNREAD_BY_INFERENCER]

    enough = plan_drops(
        queued, set(), replace(limits, max_frames=4), now=5.5, unread_since=unread_since
    )
    assert [d.frame.event.sequence for d in enough.drops] == [1, 0]  # no unread frame goes

    # Read everything (or no inferencer on this bin): the plain policy.
    everything = plan_drops(queued, set(), limits, now=5.5, unread_since=None)
    assert [d.frame.event.sequence for d in everything.drops] == [3, 2, 1]
    assert {d.reason for d in everything.drops} == {"max_frames"}


ROOMY = SpoolLimits(max_frames=1000, max_bytes=10**9)


async def _forward_nothing(stored: FrameStored) -> None:
    raise AssertionError(f"nothing should be announced, got {stored.frame_sha256}")


async def _announce_nothing_to_check(stored: FrameStored) -> None:
    pass


async def _no_dead_letters(frame: QueuedFrame, error: PermanentError) -> None:
    raise AssertionError(f"nothing should be dead-lettered, got {error}")


def _forwarder(
    tmp_path: Path,
    store: BlobStore,
    *,
    limits: SpoolLimits = ROOMY,
    clock: Callable[[], float] = time.time,
    announce: Announce = _forward_nothing,
    dead_letter: DeadLetterSink = _no_dead_letters,
    on_progress: ProgressHook | None = None,
    set_aside_after: int = 3,
    backoff: Backoff | None = None,
) -> Forwarder:
    spool = Spool(tmp_path / "spool", BIN)
    return Forwarder(
        spool=spool,
        queue=UploadQueue(tmp_path / "spool", BIN),
        uploader=FrameUploader(spool, store, clock),
        limits=limits,
        backoff=backoff or Backoff(0.001, 0.005, 0.5),
        announce=announce,
        dead_letter=dead_letter,
        producer="uploader",
        set_aside_after=set_aside_after,
        clock=clock,
        on_progress=on_progress,
    )


def _dropped(reason: str) -> float:
    return (
        REGISTRY.get_sample_value(
            "binloop_uploader_dropped_frames_total", {"bin": BIN, "reason": reason}
        )
        or 0.0
    )


async def test_a_full_spool_drops_the_oldest_unselected_frames_and_says_so(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    now = [0.0]
    limits = SpoolLimits(max_frames=3, max_bytes=10**9, policy="drop_oldest", min_age_s=1.5)
    forwarder = _forwarder(
        tmp_path, LocalBlobStore(tmp_path / "blobs"), limits=limits, clock=lambda: now[0]
    )
    events = [_spool_and_describe(tmp_path / "spool", j, i) for i, j in enumerate(_demo_jpegs(5))]
    before = _dropped("max_frames")

    with caplog.at_level(logging.WARNING, logger="services.uploader.forwarder"):
        for second, event in enumerate(events):
            now[0] = float(second)
            plan = await forwarder.accept(event)
            if second == 0:
                assert await forwarder.prioritize(event.frame_sha256)  # the sampler wants it
        # t=3: four waiting, frame 1 is the oldest unselected one past 1.5 s; t=4: frame 2.
        assert [d.frame.event.sequence for d in plan.drops] == [2]

    kept = [f.event.sequence for f in forwarder.queue.snapshot()]
    assert kept == [0, 3, 4]
    assert _dropped("max_frames") - before == 2
    spool = forwarder.spool
    for event in events:
        assert spool.store.exists(event.spool.key) == (event.sequence in kept)
    assert _metric("binloop_uploader_backlog_frames") == 3
    assert _metric("binloop_uploader_backlog_bytes") == sum(
        e.spool.size for e in events if e.sequence in kept
    )
    warnings = [r.getMessage() for r in caplog.records]
    assert len(warnings) == 1  # the first drop at once; the next is summed up later
    assert "dropped 1 frames" in warnings[0]
    assert "drop_oldest" in warnings[0]

    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="services.uploader.forwarder"):
        now[0] = 70.0
        forwarder.report_drops()
    assert ["dropped 1 frames" in r.getMessage() for r in caplog.records] == [True]

    # Restarted: the queue and the selection come back from disk, in the same order.
    reloaded = UploadQueue(tmp_path / "spool", BIN)
    assert [f.event.sequence for f in reloaded.snapshot()] == [0, 3, 4]
    assert reloaded.wanted() == {events[0].frame_sha256}
    assert reloaded.peek() is not None
    assert reloaded.peek() == forwarder.queue.peek()


async def test_when_only_protected_frames_are_left_the_spool_stays_over_and_warns(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    limits = SpoolLimits(max_frames=1, max_bytes=10**9, min_age_s=3600)
    forwarder = _forwarder(tmp_path, LocalBlobStore(tmp_path / "blobs"), limits=limits)
    events = [_spool_and_describe(tmp_path / "spool", j, i) for i, j in enumerate(_demo_jpegs(3))]
    with caplog.at_level(logging.WARNING, logger="services.uploader.forwarder"):
        plans = [await forwarder.accept(event) for event in events]
    assert [p.drops for p in plans] == [[], [], []]
    assert [p.still_over for p in plans] == [False, True, True]
    assert forwarder.queue.pending_frames == 3
    assert len(caplog.records) == 1
    assert "over its limits" in caplog.records[0].getMessage()


@pytest.mark.integration
async def test_a_full_spool_keeps_what_the_edge_inferencer_has_not_read(
    js: JetStreamContext, nats_server: NatsServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The spool-full policy asks the same fact as the sweep: what the inferencer's durable
    consumer has still to read. Frames it has read go first, even under drop_newest."""
    settings = UploaderSettings(
        nats_url=nats_server.url,
        http_port=0,
        http_host="127.0.0.1",
        bin_id=BIN,
        spool_root=tmp_path / "spool",
        spool_max_pending_frames=4,
        spool_full_policy="drop_newest",
        spool_drop_min_age_s=30,
        sweep_interval_s=0.05,
        retry_initial_s=0.02,
        retry_max_s=0.05,
    )
    t0 = datetime(2026, 3, 4, 5, 6, 7, tzinfo=UTC)
    events = [
        _spool_and_describe(settings.spool_root, jpeg, i).model_copy(
            update={"captured_at": t0 + timedelta(seconds=10 * i)}
        )
        for i, jpeg in enumerate(_demo_jpegs(5))
    ]
    # The sweep loop's question to JetStream, observed (the answer is JetStream's own).
    answers: list[float | None] = []
    answered = asyncio.Event()

    async def observed_unread_since(js: JetStreamContext, bin_id: str) -> float | None:
        answer = await unread_since(js, bin_id)
        answers.append(answer)
        answered.set()
        return answer

    monkeypatch.setattr(uploader_app, "unread_since", observed_unread_since)
    inferencer = await js.pull_subscribe(
        FRAMES_CAPTURED.subject(BIN),
        durable=edge_inferencer_durable(BIN),
        stream=FRAMES_CAPTURED.stream,
    )
    now = [1_000.0]
    steps = Steps()
    dropped_before = {r: _dropped(r) for r in ("max_frames", UNREAD_BY_INFERENCER)}
    service = create_app(
        settings, store=FailingStore(tmp_path / "blobs"), clock=lambda: now[0], on_progress=steps
    )
    await service.start()

    async def capture(event: FrameCaptured) -> None:
        await js.publish(
            FRAMES_CAPTURED.subject(BIN),
            event.model_dump_json().encode(),
            headers={"Nats-Msg-Id": str(event.event_id)},
        )

    async def until_answer(expected: float) -> None:
        while not answers or answers[-1] != expected:
            answered.clear()
            await asyncio.wait_for(answered.wait(), 10)

    try:
        for event in events[:4]:
            await capture(event)
        await steps.until(lambda: steps.count("queued") == 4)
        for msg in await inferencer.fetch(2, timeout=5):  # the inferencer reads frames 0 and 1
            await msg.ack_sync()
        await until_answer(events[2].captured_at.timestamp() - SPOOL_TO_EVENT_SLACK_S)
        now[0] += 60  # every waiting frame is past spool_drop_min_age_s now
        await capture(events[4])
        await steps.until(lambda: steps.count("dropped") == 1)
    finally:
        await service.stop()

    # drop_newest alone would give up frame 3, which the inferencer has still to read.
    assert steps.order("dropped") == [events[1].frame_sha256]
    kept = [f.event.sequence for f in UploadQueue(settings.spool_root, BIN).snapshot()]
    assert kept == [0, 2, 3, 4]
    spool = Spool(settings.spool_root, BIN)
    for event in events:
        assert spool.store.exists(event.spool.key) == (event.sequence in kept)
    assert _dropped("max_frames") - dropped_before["max_frames"] == 1
    assert _dropped(UNREAD_BY_INFERENCER) == dropped_before[UNREAD_BY_INFERENCER]


def test_unreadable_queue_entries_are_set_aside_and_counted(tmp_path: Path) -> None:
    event = _spool_and_describe(tmp_path / "spool", _demo_jpegs(1)[0], 0)
    queue = UploadQueue(tmp_path / "spool", BIN)
    assert queue.add(QueuedFrame(event, 1.0))
    assert not queue.add(QueuedFrame(event, 2.0))  # the same event twice: queued once
    broken = queue.root / "queue" / f"{uuid.uuid4()}.json"
    broken.write_bytes(b'{"queued_at": 1, "event": {"bin_id": "bin-1"}}')
    before = _dropped("unreadable_entry")

    forwarder = _forwarder(tmp_path, LocalBlobStore(tmp_path / "blobs"))
    assert [f.event.event_id for f in forwarder.queue.snapshot()] == [event.event_id]
    assert forwarder.queue.unreadable == [broken.with_name(broken.name + ".unreadable")]
    assert forwarder.queue.unreadable[0].exists()
    assert _dropped("unreadable_entry") - before == 1


class FlakyStore(LocalBlobStore):
    """A store that refuses writes while `down` is set, like an unreachable endpoint."""

    down = True

    def put(self, key: str, data: bytes, content_type: str = "application/octet-stream") -> BlobRef:
        if self.down:
            raise OSError(111, "Connection refused")
        return super().put(key, data, content_type)


async def test_the_forwarder_retries_until_the_store_answers_selected_frame_first(
    tmp_path: Path,
) -> None:
    store = FlakyStore(tmp_path / "blobs")
    announced: list[FrameStored] = []
    steps: list[str] = []
    changed = asyncio.Event()

    async def announce(stored: FrameStored) -> None:
        announced.append(stored)

    def on_progress(kind: str, sha256: str) -> None:
        steps.append(kind)
        changed.set()

    async def until(condition: Callable[[], bool]) -> None:
        while not condition():
            changed.clear()
            await asyncio.wait_for(changed.wait(), 10)

    forwarder = _forwarder(tmp_path, store, announce=announce, on_progress=on_progress)
    events = [_spool_and_describe(tmp_path / "spool", j, i) for i, j in enumerate(_demo_jpegs(3))]
    running = asyncio.create_task(forwarder.run())
    try:
        for event in events:
            await forwarder.accept(event)
        assert await forwarder.prioritize(events[2].frame_sha256)
        await until(lambda: steps.count("retry") >= 4)
        assert announced == []
        assert forwarder.backoff.failures >= 4
        # The store fails every frame alike: nothing is set aside, the order stays.
        assert forwarder.schedule.set_aside == []
        store.down = False
        await until(lambda: steps.count("stored") == 3)
    finally:
        running.cancel()
        await asyncio.gather(running, return_exceptions=True)

    assert [s.frame_sha256 for s in announced] == [events[i].frame_sha256 for i in (2, 0, 1)]
    assert [s.frame_event_id for s in announced] == [str(events[i].event_id) for i in (2, 0, 1)]
    assert forwarder.backoff.failures == 0
    assert forwarder.queue.pending_frames == 0
    assert forwarder.queue.wanted() == frozenset()
    for event in events:
        key = frame_key(BIN, event.captured_at, event.frame_sha256)
        assert sha256_hex(store.get(key)) == event.frame_sha256
        assert forwarder.spool.uploaded_at(event.spool.key) is not None
    assert not await forwarder.prioritize(events[0].frame_sha256)  # stored: nothing to hurry


async def test_a_frame_corrupted_after_it_was_queued_is_dead_lettered_not_retried(
    tmp_path: Path,
) -> None:
    letters: list[tuple[str, str]] = []
    done = asyncio.Event()

    async def dead_letter(frame: QueuedFrame, error: PermanentError) -> None:
        letters.append((frame.sha256, type(error).__name__))

    forwarder = _forwarder(
        tmp_path,
        LocalBlobStore(tmp_path / "blobs"),
        dead_letter=dead_letter,
        on_progress=lambda kind, sha: done.set() if kind == "dead_lettered" else None,
    )
    first, second = _demo_jpegs(2)
    event = _spool_and_describe(tmp_path / "spool", first, 0)
    await forwarder.accept(event)
    (forwarder.spool.store.root / event.spool.key).write_bytes(second)  # bit rot on the edge
    running = asyncio.create_task(forwarder.run())
    try:
        await asyncio.wait_for(done.wait(), 10)
    finally:
        running.cancel()
        await asyncio.gather(running, return_exceptions=True)
    assert letters == [(event.frame_sha256, "ChecksumMismatchError")]
    assert forwarder.queue.pending_frames == 0
    spool = forwarder.spool
    assert spool.store.exists(event.spool.key)  # kept for a look, never uploaded
    marked_at = spool.dead_lettered_at(event.spool.key)
    assert marked_at is not None
    assert not spool.is_pending(event.spool.key)
    # ... for the retention, like an uploaded frame; then the sweep reclaims file and marker.
    assert spool.sweep(marked_at + 119, retention_s=120).kept == 1
    reclaimed = spool.sweep(marked_at + 120, retention_s=120)
    assert (reclaimed.pending, reclaimed.kept, reclaimed.deleted) == (0, 0, 1)
    assert not spool.store.exists(event.spool.key)
    assert not spool.store.exists(event.spool.key + DEAD_LETTERED_SUFFIX)


class RefusingStore(LocalBlobStore):
    """An object store that answers but refuses every request while `refusing` is set, with
    the PermanentError S3BlobStore raises for a 4xx it does not retry (e.g. a disabled SSE-KMS
    key: 400 KMS.DisabledException)."""

    refusing = True

    def _refuse(self, action: str, key: str) -> None:
        if self.refusing:
            raise PermanentError(f"{action} of {key} refused: KMS.DisabledException: key disabled")

    def get(self, key: str) -> bytes:
        self._refuse("get", key)
        return super().get(key)

    def exists(self, key: str) -> bool:
        self._refuse("stat", key)
        return super().exists(key)

    def put(self, key: str, data: bytes, content_type: str = "application/octet-stream") -> BlobRef:
        self._refuse("put", key)
        return super().put(key, data, content_type)


async def test_a_store_that_refuses_uploads_is_backed_off_and_no_frame_is_dead_lettered(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    letters: list[tuple[str, str]] = []

    async def dead_letter(frame: QueuedFrame, error: PermanentError) -> None:
        letters.append((frame.sha256, type(error).__name__))

    async def announce(stored: FrameStored) -> None:
        pass

    store = RefusingStore(tmp_path / "blobs")
    steps = Steps()
    forwarder = _forwarder(
        tmp_path, store, announce=announce, dead_letter=dead_letter, on_progress=steps
    )
    events = [_spool_and_describe(tmp_path / "spool", j, i) for i, j in enumerate(_demo_jpegs(5))]
    for event in events:
        await forwarder.accept(event)
    # The head of the queue is gone from the spool: only the store can tell whether it is lost.
    gone = events[0]
    forwarder.spool.store.delete(gone.spool.key)
    spool = forwarder.spool
    running = asyncio.create_task(forwarder.run())
    try:
        with caplog.at_level(logging.WARNING, logger="services.uploader.forwarder"):
            await steps.until(lambda: steps.count("retry") >= 4)
            assert letters == []
            assert forwarder.queue.pending_frames == len(events)
            assert forwarder.backoff.failures >= 4  # the store's backoff, not the frame's
            assert forwarder.schedule.set_aside == []
            assert all(spool.is_pending(e.spool.key) for e in events[1:])
            [refused] = [r for r in caplog.records if "refuse" in r.getMessage()]
            assert refused.levelno == logging.ERROR
            assert "KMS.DisabledException" in refused.getMessage()
            store.refusing = False  # an operator enabled the key again
            await steps.until(lambda: steps.count("stored") + steps.count("dead_lettered") == 5)
    finally:
        running.cancel()
        await asyncio.gather(running, return_exceptions=True)

    # Only the frame that is really lost (not in the spool, not in the store) is dead-lettered,
    # and marked, so the sweep reclaims what is left of it.
    assert letters == [(gone.frame_sha256, "MissingBlobError")]
    assert spool.dead_lettered_at(gone.spool.key) is not None
    assert steps.order("stored") == [e.frame_sha256 for e in events[1:]]
    assert forwarder.queue.pending_frames == 0
    assert spool.sweep(time.time(), retention_s=0).pending == 0
    assert not spool.store.exists(gone.spool.key + DEAD_LETTERED_SUFFIX)


# --- spool errors, frames that keep failing, dead-lettered frames in the sweep ----------------


class SickSpool(LocalBlobStore):
    """The spool folder on a disk that fails to read some frames (a bad block, a permission
    an operator will fix): reading a key in `failing` raises the OSError the kernel would."""

    def __init__(self, root: Path, failing: set[str], code: int = errno.EIO) -> None:
        super().__init__(root)
        self.failing = failing
        self.code = code

    def get(self, key: str) -> bytes:
        if key in self.failing:
            raise OSError(self.code, os.strerror(self.code), str(self.root / key))
        return super().get(key)


def test_spool_read_errors_are_mapped_to_transient_or_permanent(tmp_path: Path) -> None:
    jpeg = _demo_jpegs(1)[0]
    event = _spool_and_describe(tmp_path / "spool", jpeg, 0)
    spool = Spool(tmp_path / "spool", BIN)
    for code in (errno.EIO, errno.EACCES):
        spool.store = SickSpool(tmp_path / "spool", {event.spool.key}, code)
        with pytest.raises(SpoolIOError, match=os.strerror(code)) as error:
            spool.read(event.spool.key, event.frame_sha256)
        assert isinstance(error.value, StoreUnavailableError | TransientError)

    # A folder where the frame should be can never be read: as good as missing.
    spool.store = LocalBlobStore(tmp_path / "spool")
    path = spool.store.root / event.spool.key
    path.unlink()
    path.mkdir()
    with pytest.raises(MissingBlobError, match="not a file"):
        spool.read(event.spool.key, event.frame_sha256)


def test_a_frame_that_fails_on_its_own_is_set_aside_and_retried_in_turn(tmp_path: Path) -> None:
    events = [_spool_and_describe(tmp_path, jpeg, i) for i, jpeg in enumerate(_demo_jpegs(4))]
    queue = UploadQueue(tmp_path, BIN)
    a, b, c, d = frames = [QueuedFrame(e, float(i)) for i, e in enumerate(events)]
    for frame in (a, b, c):
        queue.add(frame)
    now = [0.0]
    schedule = UploadSchedule(
        queue, set_aside_after=2, retry_delay_s=lambda n: 10.0 * n, clock=lambda: now[0]
    )

    def leave(frame: QueuedFrame) -> None:  # what the forwarder does after an upload
        queue.remove(frame)
        schedule.done(frame)

    assert schedule.next() == (a, None)
    assert schedule.failed(a) == (1, False)
    assert schedule.next() == (None, 10.0)  # a keeps its place while it waits for its retry
    now[0] = 10.0
    assert schedule.next() == (a, None)
    assert schedule.failed(a) == (2, True)  # 20 s until its next try
    assert schedule.set_aside == [a.event_id]
    assert schedule.next() == (b, None)  # a no longer blocks the frames behind it
    leave(b)
    assert schedule.next() == (c, None)
    leave(c)
    assert schedule.next() == (None, 20.0)  # only a is left, due at 30
    now[0] = 30.0
    assert schedule.next() == (a, None)
    assert schedule.failed(a) == (3, False)  # still set aside, still retried
    queue.add(d)
    assert queue.want(d.sha256)
    assert schedule.next() == (d, None)  # a newcomer, selected or not, goes before it
    leave(d)
    queue.remove(a)  # the spool-full policy dropped it
    assert schedule.next() == (None, None)
    assert schedule.set_aside == []
    assert [f.event_id for f in frames if schedule.is_set_aside(f.event_id)] == []


def test_a_restart_keeps_each_frames_failures_and_its_place_behind_the_others(
    tmp_path: Path,
) -> None:
    events = [_spool_and_describe(tmp_path, jpeg, i) for i, jpeg in enumerate(_demo_jpegs(4))]
    queue = UploadQueue(tmp_path, BIN)
    a, b, c, d = [QueuedFrame(e, float(i)) for i, e in enumerate(events)]
    for frame in (a, b, c, d):
        queue.add(frame)
    now = [0.0]

    def schedule_on(queue: UploadQueue) -> UploadSchedule:
        return UploadSchedule(
            queue, set_aside_after=3, retry_delay_s=lambda n: 10.0 * n, clock=lambda: now[0]
        )

    before = schedule_on(queue)
    for _ in range(3):
        before.failed(a)
    assert before.set_aside == [a.event_id]
    assert before.failed(b) == (1, False)
    for _ in range(3):
        before.failed(c)
    assert before.set_aside == [a.event_id, c.event_id]
    assert before.failed(a) == (4, False)  # to the back of the set-aside frames
    assert before.set_aside == [c.event_id, a.event_id]

    now[0] = 1.0  # a new process: another monotonic clock
    after = schedule_on(UploadQueue(tmp_path, BIN))
    assert after.set_aside == [c.event_id, a.event_id]
    assert after.next() == (b, None)  # due at once, keeping its place at the head
    assert after.failed(b) == (2, False)  # its second failure, not its first
    assert after.failed(b) == (3, True)
    assert after.next() == (d, None)  # no poison frame holds the head again
    assert after.failed(a) == (5, False)
    assert after.set_aside == [c.event_id, b.event_id, a.event_id]

    # A frame that leaves the queue takes its record with it.
    queue = after.queue
    queue.remove(c)
    after.done(c)
    records = sorted(p.name for p in (queue.root / "failures").iterdir())
    assert records == sorted(f"{f.event_id}.json" for f in (a, b))
    assert UploadQueue(tmp_path, BIN).recorded_failures.keys() == {a.event_id, b.event_id}


def test_damaged_failure_records_are_dropped_with_a_warning_and_the_queue_loads(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    events = [_spool_and_describe(tmp_path, jpeg, i) for i, jpeg in enumerate(_demo_jpegs(6))]
    queue = UploadQueue(tmp_path, BIN)
    frames = [QueuedFrame(e, float(i)) for i, e in enumerate(events)]
    for frame in frames[:5]:
        queue.add(frame)
    schedule = UploadSchedule(queue, set_aside_after=1, retry_delay_s=lambda n: 1.0)
    for frame in frames[:5]:
        schedule.failed(frame)
    failures = queue.root / "failures"
    damaged = {
        frames[0]: b'{"failures": 3, "set_aside": tr',  # cut short by a power cut
        frames[1]: b"\x00" * 64,  # zeroes where the data should be
        frames[2]: b'{"failures": -2, "set_aside": true, "turn": 1}',
        frames[3]: b'{"failures": 2, "set_aside": "yes", "turn": 1}',
    }
    for frame, data in damaged.items():
        (failures / f"{frame.event_id}.json").write_bytes(data)
    (failures / f"{frames[5].event_id}.json").write_bytes(b"{}")  # its frame is not queued
    (failures / ".tmp-leftover").write_bytes(b"half")

    with caplog.at_level(logging.WARNING, logger="services.uploader.queue"):
        reloaded = UploadQueue(tmp_path, BIN)
    assert reloaded.pending_frames == 5  # the frames themselves are untouched
    assert list(reloaded.recorded_failures) == [frames[4].event_id]
    warnings = [r.getMessage() for r in caplog.records]
    assert len(warnings) == len(damaged)  # orphans and leftovers go quietly
    assert all("counts its failures anew" in w for w in warnings)
    assert sorted(p.name for p in failures.iterdir()) == [f"{frames[4].event_id}.json"]
    after = UploadSchedule(reloaded, set_aside_after=2, retry_delay_s=lambda n: 1.0)
    assert after.set_aside == [frames[4].event_id]
    assert after.failed(frames[0]) == (1, False)  # from zero: nothing worse


def test_a_failure_that_cannot_be_recorded_is_kept_in_memory(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    event = _spool_and_describe(tmp_path, _demo_jpegs(1)[0], 0)
    queue = UploadQueue(tmp_path, BIN)
    frame = QueuedFrame(event, 0.0)
    queue.add(frame)
    schedule = UploadSchedule(queue, set_aside_after=2, retry_delay_s=lambda n: 0.0)
    (queue.root / "failures" / f"{frame.event_id}.json").mkdir()  # cannot be replaced
    with caplog.at_level(logging.WARNING, logger="services.uploader.schedule"):
        assert schedule.failed(frame) == (1, False)
        assert schedule.failed(frame) == (2, True)
    [warning] = [r.getMessage() for r in caplog.records]  # once per frame
    assert "cannot be written" in warning
    assert schedule.set_aside == [frame.event_id]


class Steps:
    """The forwarder's progress hook: records each step; a test waits for a condition on them."""

    def __init__(self) -> None:
        self.steps: list[tuple[str, str]] = []
        self._changed = asyncio.Event()

    def __call__(self, kind: str, sha256: str) -> None:
        self.steps.append((kind, sha256))
        self._changed.set()

    def count(self, kind: str, sha256: str | None = None) -> int:
        return sum(1 for k, s in self.steps if k == kind and sha256 in (None, s))

    def order(self, kind: str) -> list[str]:
        return [s for k, s in self.steps if k == kind]

    async def until(self, condition: Callable[[], bool]) -> None:
        async def loop() -> None:
            while not condition():
                self._changed.clear()
                await self._changed.wait()

        await asyncio.wait_for(loop(), 10)


def _retries(error_type: str) -> float:
    return (
        REGISTRY.get_sample_value(
            "binloop_uploader_retries_total", {"bin": BIN, "error_type": error_type}
        )
        or 0.0
    )


async def test_a_spool_read_error_does_not_stop_the_forwarder(tmp_path: Path) -> None:
    announced: list[FrameStored] = []

    async def announce(stored: FrameStored) -> None:
        announced.append(stored)

    steps = Steps()
    store = LocalBlobStore(tmp_path / "blobs")
    forwarder = _forwarder(
        tmp_path, store, announce=announce, on_progress=steps, set_aside_after=1000
    )
    event = _spool_and_describe(tmp_path / "spool", _demo_jpegs(1)[0], 0)
    sick = SickSpool(tmp_path / "spool", {event.spool.key}, errno.EACCES)
    forwarder.spool.store = sick
    before = _retries("SpoolIOError")
    await forwarder.accept(event)  # unreadable for now: queued all the same
    running = asyncio.create_task(forwarder.run())
    try:
        await steps.until(lambda: steps.count("retry") >= 3)
        assert not running.done()
        assert forwarder.running
        assert announced == []
        assert forwarder.backoff.failures == 0  # the store was never the problem
        sick.failing.clear()  # the operator fixed the permissions
        await steps.until(lambda: steps.count("stored") == 1)
    finally:
        running.cancel()
        await asyncio.gather(running, return_exceptions=True)

    assert [s.frame_event_id for s in announced] == [str(event.event_id)]
    key = frame_key(BIN, event.captured_at, event.frame_sha256)
    assert sha256_hex(store.get(key)) == event.frame_sha256
    assert forwarder.queue.pending_frames == 0
    assert _retries("SpoolIOError") - before == steps.count("retry") >= 3


async def test_a_queue_entry_that_cannot_be_removed_is_retried_until_it_can(
    tmp_path: Path,
) -> None:
    announced: list[FrameStored] = []

    async def announce(stored: FrameStored) -> None:
        announced.append(stored)

    steps = Steps()
    forwarder = _forwarder(
        tmp_path, LocalBlobStore(tmp_path / "blobs"), announce=announce, on_progress=steps
    )
    event = _spool_and_describe(tmp_path / "spool", _demo_jpegs(1)[0], 0)
    await forwarder.accept(event)
    entry = forwarder.queue.root / "queue" / f"{event.event_id}.json"
    entry.unlink()
    entry.mkdir()  # unlink(2) of a folder fails (EISDIR), as a broken queue folder would
    running = asyncio.create_task(forwarder.run())
    try:
        await steps.until(lambda: steps.count("retry") >= 1)
        assert forwarder.queue.pending_frames == 1  # still queued: on disk and in memory
        entry.rmdir()
        await steps.until(lambda: steps.count("stored") == 1)
    finally:
        running.cancel()
        await asyncio.gather(running, return_exceptions=True)
    # Stored and announced on every attempt, under one event id: JetStream keeps one.
    assert len(announced) >= 2
    assert {s.event_id for s in announced} == {announced[0].event_id}
    assert forwarder.queue.pending_frames == 0
    assert UploadQueue(tmp_path / "spool", BIN).pending_frames == 0


async def test_an_unexpected_error_is_logged_counted_and_retried(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    announced: list[FrameStored] = []

    async def announce(stored: FrameStored) -> None:
        if not announced:
            announced.append(stored)
            raise RuntimeError("a bug in the announcement")
        announced.append(stored)

    steps = Steps()
    forwarder = _forwarder(
        tmp_path, LocalBlobStore(tmp_path / "blobs"), announce=announce, on_progress=steps
    )
    event = _spool_and_describe(tmp_path / "spool", _demo_jpegs(1)[0], 0)
    before = _retries("RuntimeError")
    await forwarder.accept(event)
    running = asyncio.create_task(forwarder.run())
    try:
        with caplog.at_level(logging.WARNING, logger="services.uploader.forwarder"):
            await steps.until(lambda: steps.count("stored") == 1)
    finally:
        running.cancel()
        await asyncio.gather(running, return_exceptions=True)
    assert steps.count("retry") == 1
    assert _retries("RuntimeError") - before == 1
    [record] = [r for r in caplog.records if r.exc_info]
    assert record.levelno == logging.ERROR
    assert "a bug in the announcement" in record.getMessage()
    assert len(announced) == 2
    assert forwarder.queue.pending_frames == 0


async def test_bytes_written_while_frames_stored_cannot_be_published_are_counted(
    tmp_path: Path,
) -> None:
    """binloop_uploaded_bytes_total is the bytes written to the store. When frames.stored
    cannot be published (the bin's nats-server restarting) the frame is in the store already,
    and the retry finds it there and writes nothing: its bytes count at the write."""
    attempts = 0

    async def announce(stored: FrameStored) -> None:
        nonlocal attempts
        attempts += 1
        if attempts == 1:
            raise TransientError("publishing frames.stored: no responders (nats restarting)")

    steps = Steps()
    forwarder = _forwarder(
        tmp_path, LocalBlobStore(tmp_path / "blobs"), announce=announce, on_progress=steps
    )
    event = _spool_and_describe(tmp_path / "spool", _demo_jpegs(1)[0], 0)
    before = _metric("binloop_uploaded_bytes_total")
    await forwarder.accept(event)
    running = asyncio.create_task(forwarder.run())
    try:
        await steps.until(lambda: steps.count("stored") == 1)
    finally:
        running.cancel()
        await asyncio.gather(running, return_exceptions=True)
    assert (attempts, steps.count("retry")) == (2, 1)
    assert _metric("binloop_uploaded_bytes_total") - before == event.spool.size


async def test_a_frame_selected_while_the_head_waits_out_its_own_retry_goes_up_at_once(
    tmp_path: Path,
) -> None:
    """The head of the queue failed on its own and waits for its retry (up to retry_max_s),
    and the frames behind it wait too. A frame the sampler selects meanwhile becomes the head:
    it goes up now, not once that wait is over."""
    steps = Steps()
    forwarder = _forwarder(
        tmp_path,
        LocalBlobStore(tmp_path / "blobs"),
        announce=_announce_nothing_to_check,
        on_progress=steps,
        set_aside_after=1000,
        backoff=Backoff(600, 600, 0),
    )
    head, selected = (
        _spool_and_describe(tmp_path / "spool", j, i) for i, j in enumerate(_demo_jpegs(2))
    )
    forwarder.spool.store = SickSpool(tmp_path / "spool", {head.spool.key}, errno.EIO)
    await forwarder.accept(head)
    await forwarder.accept(selected)
    running = asyncio.create_task(forwarder.run())
    try:
        await steps.until(lambda: steps.count("retry", head.frame_sha256) == 1)
        assert await forwarder.prioritize(selected.frame_sha256)
        await steps.until(lambda: steps.count("stored") == 1)
    finally:
        running.cancel()
        await asyncio.gather(running, return_exceptions=True)
    assert steps.order("stored") == [selected.frame_sha256]
    assert steps.count("retry") == 1


async def test_a_frame_that_keeps_failing_does_not_block_the_frames_behind_it(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    announced: list[FrameStored] = []

    async def announce(stored: FrameStored) -> None:
        announced.append(stored)

    steps = Steps()
    forwarder = _forwarder(
        tmp_path, LocalBlobStore(tmp_path / "blobs"), announce=announce, on_progress=steps
    )
    events = [_spool_and_describe(tmp_path / "spool", j, i) for i, j in enumerate(_demo_jpegs(4))]
    bad = events[1]
    sick = SickSpool(tmp_path / "spool", {bad.spool.key}, errno.EIO)
    forwarder.spool.store = sick
    for event in events:
        await forwarder.accept(event)
    assert await forwarder.prioritize(bad.frame_sha256)  # even a selected frame stands aside
    others = [e.frame_sha256 for e in events if e is not bad]
    running = asyncio.create_task(forwarder.run())
    try:
        with caplog.at_level(logging.WARNING, logger="services.uploader.forwarder"):
            await steps.until(lambda: steps.count("stored") == len(others))
            # It keeps being retried while it is set aside, and is never dropped for it.
            await steps.until(lambda: steps.count("retry", bad.frame_sha256) >= 5)
        assert forwarder.queue.pending_frames == 1
        assert forwarder.schedule.set_aside == [str(bad.event_id)]
        sick.failing.clear()  # the bad block was remapped
        await steps.until(lambda: steps.count("stored") == len(events))
    finally:
        running.cancel()
        await asyncio.gather(running, return_exceptions=True)

    assert steps.order("set_aside") == [bad.frame_sha256]
    assert steps.order("stored") == [*others, bad.frame_sha256]
    assert steps.count("retry") == steps.count("retry", bad.frame_sha256)
    assert steps.order("stored") == [s.frame_sha256 for s in announced]
    assert steps.count("dropped") == 0
    assert forwarder.queue.pending_frames == 0
    assert forwarder.schedule.set_aside == []
    assert forwarder.queue.wanted() == frozenset()
    [warning] = [r.getMessage() for r in caplog.records if "set aside" in r.getMessage()]
    assert "failed 3 times in a row" in warning
    assert bad.spool.key in warning


async def test_failure_records_and_dequeues_are_written_in_worker_threads(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """On a failing eMMC each fsync can take seconds: the forwarder's disk writes must not
    hold the event loop (intake acks, heartbeats, /healthz; every service in `binloop up`)."""

    async def announce(stored: FrameStored) -> None:
        pass

    steps = Steps()
    forwarder = _forwarder(
        tmp_path,
        LocalBlobStore(tmp_path / "blobs"),
        announce=announce,
        on_progress=steps,
        set_aside_after=1,
    )
    bad, good = (
        _spool_and_describe(tmp_path / "spool", j, i) for i, j in enumerate(_demo_jpegs(2))
    )
    forwarder.spool.store = SickSpool(tmp_path / "spool", {bad.spool.key}, errno.EIO)
    await forwarder.accept(bad)
    await forwarder.accept(good)

    loop_thread = threading.current_thread()
    fsyncs: list[threading.Thread] = []
    removes: list[threading.Thread] = []
    real_fsync, real_remove = os.fsync, forwarder.queue.remove

    def fsync(fd: int) -> None:
        fsyncs.append(threading.current_thread())
        real_fsync(fd)

    def remove(frame: QueuedFrame) -> bool:
        removes.append(threading.current_thread())
        return real_remove(frame)

    monkeypatch.setattr("binloop.storage.files.os.fsync", fsync)
    monkeypatch.setattr(forwarder.queue, "remove", remove)
    running = asyncio.create_task(forwarder.run())
    try:
        await steps.until(lambda: steps.count("stored") == 1 and steps.count("retry") >= 2)
    finally:
        running.cancel()
        await asyncio.gather(running, return_exceptions=True)

    assert fsyncs
    assert removes
    assert loop_thread not in fsyncs
    assert loop_thread not in removes
    # Written all the same, and in order: the record holds the latest count.
    recorded = UploadQueue(tmp_path / "spool", BIN).recorded_failures[str(bad.event_id)]
    assert recorded.set_aside
    assert recorded.failures >= 2


async def test_a_frame_dead_lettered_at_intake_is_reclaimed_by_the_sweep(tmp_path: Path) -> None:
    now = [1000.0]
    forwarder = _forwarder(tmp_path, LocalBlobStore(tmp_path / "blobs"), clock=lambda: now[0])
    first, second = _demo_jpegs(2)
    event = _spool_and_describe(tmp_path / "spool", first, 0)
    spool = forwarder.spool
    path = spool.store.root / event.spool.key
    path.write_bytes(second)
    os.utime(path, (now[0] - 1, now[0] - 1))
    with pytest.raises(ChecksumMismatchError):
        await forwarder.accept(event)  # the bus dead-letters it
    assert forwarder.queue.pending_frames == 0
    assert spool.dead_lettered_at(event.spool.key) == now[0]
    assert spool.sweep(now[0] + 10, retention_s=120).kept == 1
    assert spool.sweep(now[0] + 120, retention_s=120).deleted == 1
    assert not spool.store.exists(event.spool.key)
    assert not spool.store.exists(event.spool.key + DEAD_LETTERED_SUFFIX)


def test_a_frame_spooled_again_after_it_was_dead_lettered_waits_for_its_upload(
    tmp_path: Path,
) -> None:
    event = _spool_and_describe(tmp_path / "spool", _demo_jpegs(1)[0], 0)
    spool = Spool(tmp_path / "spool", BIN)
    marked_at = time.time()
    spool.mark_dead_lettered(
        event.spool.key, ChecksumMismatchError("spool frame", "a", "b"), marked_at
    )
    later = marked_at + 10  # the ingestor wrote the right bytes again and re-stamped the file
    os.utime(spool.store.root / event.spool.key, (later, later))
    scan = spool.sweep(marked_at + 1_000, retention_s=0)
    assert (scan.pending, scan.deleted) == (1, 0)
    assert spool.store.exists(event.spool.key)
    # A marker whose frame is gone goes too, as an orphan upload marker does.
    spool.store.delete(event.spool.key)
    spool.sweep(marked_at + 1_000, retention_s=0)
    assert not spool.store.exists(event.spool.key + DEAD_LETTERED_SUFFIX)


def test_a_frame_whose_announce_is_pending_is_neither_swept_nor_dropped(tmp_path: Path) -> None:
    """The frame-ingestor's announce marker (its outbox) is no frame, and while it is there a
    capture of the frame is yet to be queued: the sweep and the spool-full policy keep it."""
    uploaded, orphaned = [
        _spool_and_describe(tmp_path / "spool", jpeg, i) for i, jpeg in enumerate(_demo_jpegs(2))
    ]
    spool = Spool(tmp_path / "spool", BIN)
    uploaded_at = time.time()
    FrameUploader(spool, LocalBlobStore(tmp_path / "blobs"), lambda: uploaded_at).upload(uploaded)
    # Captured again, killed before JetStream acked that capture's event.
    spool.store.put(
        uploaded.spool.key + SPOOL_ANNOUNCING_SUFFIX, uploaded.model_dump_json().encode()
    )
    # Killed between writing a marker and its frame, long ago; and a marker just written.
    orphan = orphaned.spool.key + SPOOL_ANNOUNCING_SUFFIX
    spool.store.put(orphan, orphaned.model_dump_json().encode())
    spool.store.delete(orphaned.spool.key)
    os.utime(spool.store.root / orphan, (uploaded_at - 120, uploaded_at - 120))
    fresh = f"{BIN}/zz/{'f' * 64}.jpg{SPOOL_ANNOUNCING_SUFFIX}"
    spool.store.put(fresh, b"{}")

    scan = spool.sweep(uploaded_at + 30, retention_s=0)

    assert (scan.pending, scan.kept, scan.deleted) == (1, 0, 0)
    assert spool.store.exists(uploaded.spool.key)
    assert not spool.store.exists(orphan)
    assert spool.store.exists(fresh)  # its frame may be on its way
    spool.discard(uploaded.spool.key)  # the spool-full policy's deletion
    assert spool.store.exists(uploaded.spool.key)

    spool.store.delete(uploaded.spool.key + SPOOL_ANNOUNCING_SUFFIX)  # announced
    assert spool.sweep(uploaded_at + 30, retention_s=0).deleted == 1
    assert not spool.store.exists(uploaded.spool.key)


@pytest.mark.integration
async def test_the_uploader_tells_the_fleet_view_its_backlog(
    js: JetStreamContext, nats_server: NatsServer, tmp_path: Path
) -> None:
    """Bins are not scraped from the cloud: the heartbeat carries what is still to upload."""
    settings = UploaderSettings(
        nats_url=nats_server.url,
        http_port=0,
        http_host="127.0.0.1",
        bin_id=BIN,
        spool_root=tmp_path / "spool",
        retry_initial_s=0.02,
        retry_max_s=0.05,
        heartbeat_interval_s=0.05,
    )
    queue = UploadQueue(settings.spool_root, BIN)
    for i, jpeg in enumerate(_demo_jpegs(3)):
        queue.add(QueuedFrame(_spool_and_describe(settings.spool_root, jpeg, i), time.time()))
    beats = await Collector(FleetHeartbeat).attach_stream(js, FLEET_HEARTBEAT.subject(BIN))
    service = create_app(settings, store=FailingStore(tmp_path / "blobs"))  # nothing leaves
    await service.start()
    try:
        (beat, *_) = await beats.wait_for(1)
    finally:
        await service.stop()
    assert (beat.service, beat.bin_id) == ("uploader", BIN)
    assert (beat.spool_backlog, beat.frames_processed) == (3, 0)
