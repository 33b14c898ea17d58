"""uploader: verified, idempotent upload; spool markers and the sweep (injected clock); the
service storing every frame once, dead-lettering corrupt spool entries and carrying on."""

from __future__ import annotations

import asyncio
import os
import time
from datetime import UTC, datetime
from pathlib import Path

import pytest
from nats.aio.client import Client
from nats.js.client import JetStreamContext
from prometheus_client import REGISTRY

from binloop.errors import (
    ChecksumMismatchError,
    MissingBlobError,
    PermanentError,
    StoreUnavailableError,
    TransientError,
)
from binloop.natsserver import NatsServer
from binloop.storage import LocalBlobStore, frame_key, sha256_hex, spool_key
from schemas.base import BlobRef
from schemas.events import DeadLetter, FrameCaptured, FrameStored
from schemas.routes import DLQ, FRAMES_CAPTURED, FRAMES_STORED
from services.uploader import UploaderSettings, create_app
from services.uploader.core import FrameUploader, stored_event
from services.uploader.spool import UPLOADED_SUFFIX, Spool
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
    assert _metric("binloop_uploaded_bytes_total") - bytes_before == sum(e.spool.size for e in good)


@pytest.mark.integration
async def test_sweep_task_reports_the_backlog(
    js: JetStreamContext, nats_server: NatsServer, tmp_path: Path
) -> None:
    settings = UploaderSettings(
        nats_url=nats_server.url,
        http_port=0,
        http_host="127.0.0.1",
        blob_root=tmp_path / "blobs",
        spool_root=tmp_path / "spool",
        sweep_interval_s=0.05,
    )
    for i, jpeg in enumerate(_demo_jpegs(3)):
        _spool_and_describe(settings.spool_root, jpeg, i)
    swept = asyncio.Event()

    def clock() -> float:
        swept.set()  # the sweep reads the clock, then sets the gauge right after
        return time.time()

    service = create_app(settings, clock=clock)
    await service.start()
    try:
        await asyncio.wait_for(swept.wait(), 10)
        swept.clear()
        await asyncio.wait_for(swept.wait(), 10)  # a whole sweep has run since
        assert _metric("binloop_uploader_backlog_frames") == 3
    finally:
        await service.stop()
