"""frame-ingestor: sources (folder, video, replay file), the rate schedule, the capture loop,
and the service publishing real demo frames into the FRAMES stream."""

from __future__ import annotations

import asyncio
import base64
import itertools
import json
import logging
import os
import re
import shutil
import zlib
from collections import Counter
from collections.abc import Generator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aiohttp
import cv2
import nats.errors
import numpy as np
import pytest
from nats.aio.client import Client
from nats.js.client import JetStreamContext
from prometheus_client import REGISTRY

from binloop.bus.publish import PublishTimeoutError
from binloop.errors import ConfigError, CorruptFrameError
from binloop.ml.preprocess import jpeg_size
from binloop.natsserver import NatsServer
from binloop.runtime import new_service
from binloop.storage import SPOOL_ANNOUNCING_SUFFIX, LocalBlobStore, sha256_hex, spool_key
from schemas.base import BlobRef
from schemas.events import FrameCaptured
from schemas.routes import FRAMES_CAPTURED
from services.frame_ingestor import FrameIngestorSettings, core, create_app, run_capture
from services.frame_ingestor.core import CapturePlan, RateSchedule, announce_leftovers, capture
from services.frame_ingestor.jpeg import as_jpeg, encode_jpeg, spool_ref
from services.frame_ingestor.outbox import Outbox
from services.frame_ingestor.sources import (
    ImageFolderSource,
    ReplayFileSource,
    SkipHandler,
    SourceFrame,
    SourceLostError,
    VideoSource,
    label_from_folder,
    open_source,
)
from tests.helpers import Collector

DEMO_STREAM = Path(__file__).resolve().parent.parent / "data" / "demo" / "stream"
BIN = "bin-1"
TRASHNET_CLASSES = {"cardboard", "glass", "metal", "paper", "plastic", "trash"}


def _demo_jpegs(count: int) -> list[Path]:
    return sorted(DEMO_STREAM.rglob("*.jpg"))[:count]


class SkipLog:
    def __init__(self) -> None:
        self.reasons: Counter[str] = Counter()
        self.details: list[str] = []

    def __call__(self, reason: str, detail: str) -> None:
        self.reasons[reason] += 1
        self.details.append(detail)


# --- JPEG handling -------------------------------------------------------------------------


def test_jpeg_size_reads_the_header_like_a_full_decode() -> None:
    for path in _demo_jpegs(12):
        data = path.read_bytes()
        decoded = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
        assert jpeg_size(data) == (decoded.shape[1], decoded.shape[0])


def test_jpeg_passes_through_and_other_formats_are_reencoded() -> None:
    original = _demo_jpegs(1)[0].read_bytes()
    frame = as_jpeg(original, quality=90)
    assert frame.data is original  # not re-encoded: no generation loss
    image = np.zeros((30, 40, 3), dtype=np.uint8)
    image[:, 20:] = (0, 128, 255)
    ok, png = cv2.imencode(".png", image)
    assert ok
    converted = as_jpeg(png.tobytes(), quality=90)
    assert converted.data.startswith(b"\xff\xd8")
    assert (converted.width, converted.height) == (40, 30) == jpeg_size(converted.data)
    with pytest.raises(CorruptFrameError, match="end-of-image"):
        as_jpeg(original[: len(original) // 2], quality=90)
    with pytest.raises(CorruptFrameError, match="do not decode"):
        as_jpeg(b"definitely not an image", quality=90)


def test_an_image_whose_header_claims_too_many_pixels_is_refused_at_capture() -> None:
    """Passed through as is, such a frame would fail every reader (edge, trainer) later."""
    original = bytearray(_demo_jpegs(1)[0].read_bytes())
    width, height = jpeg_size(bytes(original)) or (0, 0)
    at = original.find(height.to_bytes(2, "big") + width.to_bytes(2, "big"))
    original[at : at + 4] = (65000).to_bytes(2, "big") * 2  # SOF's height and width
    assert jpeg_size(bytes(original)) == (65000, 65000)
    with pytest.raises(CorruptFrameError, match="claims 65000x65000 pixels"):
        as_jpeg(bytes(original), quality=90)
    image = np.zeros((2, 2, 3), dtype=np.uint8)
    ok, png = cv2.imencode(".png", image)
    assert ok
    huge = bytearray(png.tobytes())
    huge[16:24] = (65000).to_bytes(4, "big") * 2  # IHDR width and height, then its CRC
    huge[29:33] = zlib.crc32(bytes(huge[12:29])).to_bytes(4, "big")
    with pytest.raises(CorruptFrameError, match="refuses to decode"):
        as_jpeg(bytes(huge), quality=90)


# --- sources -------------------------------------------------------------------------------


def test_image_folder_skips_corrupt_files_and_labels_from_folders(tmp_path: Path) -> None:
    root = tmp_path / "stream"
    good = _demo_jpegs(3)
    for index, path in enumerate(good):
        # A sub-folder of a class is still that class, as the trainer labels it.
        target = root / ("Glass/bottles" if index == 0 else "paper") / path.name
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(path, target)
    (root / "paper" / "garbage.jpg").write_bytes(b"\x00\x01 not a jpeg")
    (root / "paper" / "truncated.jpg").write_bytes(good[0].read_bytes()[:2000])
    (root / "paper" / "empty.png").write_bytes(b"")
    (root / "paper" / "notes.txt").write_text("not an image, not counted")
    ok, png = cv2.imencode(".png", np.full((24, 32, 3), 200, dtype=np.uint8))
    assert ok
    (root / "loose.png").write_bytes(png.tobytes())

    source = ImageFolderSource(root, labels_from_folders=True, jpeg_quality=85)
    skips = SkipLog()
    frames = list(source.frames(skips))

    assert skips.reasons == {"corrupt": 3}
    assert all(str(root) in detail for detail in skips.details)
    by_name = {Path(f.description.removeprefix("folder:")).name: f for f in frames}
    assert sorted(by_name) == sorted([*(p.name for p in good), "loose.png"])
    for index, path in enumerate(good):
        frame = by_name[path.name]
        assert frame.jpeg == path.read_bytes()
        assert frame.ground_truth == ("glass" if index == 0 else "paper")
        assert (frame.width, frame.height) == (160, 120)
    loose = by_name["loose.png"]
    assert loose.ground_truth is None  # not in a class folder
    assert (loose.width, loose.height) == (32, 24)
    assert jpeg_size(loose.jpeg) == (32, 24)


def test_folder_labels_are_normalised_to_label_tokens() -> None:
    assert label_from_folder("Paper Cardboard") == "paper_cardboard"
    assert label_from_folder("glass") == "glass"
    assert label_from_folder("---") is None


def test_video_file_frames_are_encoded_with_their_size(tmp_path: Path) -> None:
    path = tmp_path / "clip.avi"
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), 10.0, (64, 48))
    assert writer.isOpened()
    for shade in range(5):
        writer.write(np.full((48, 64, 3), shade * 40, dtype=np.uint8))
    writer.release()

    source = open_source(str(path), labels_from_folders=True, jpeg_quality=80)
    assert isinstance(source, VideoSource)
    assert source.finite
    frames = list(source.frames(SkipLog()))

    assert len(frames) == 5
    assert [f.description for f in frames] == [f"video:{path}#{i}" for i in range(5)]
    for shade, frame in enumerate(frames):
        assert (frame.width, frame.height) == (64, 48) == jpeg_size(frame.jpeg)
        decoded = cv2.imdecode(np.frombuffer(frame.jpeg, np.uint8), cv2.IMREAD_GRAYSCALE)
        assert abs(float(decoded.mean()) - shade * 40) < 6
        assert frame.ground_truth is None


def _frame_line(jpeg: bytes, *, label: str | None, t: float, sha: str | None = None) -> str:
    digest = sha or sha256_hex(jpeg)
    event = FrameCaptured(
        producer="recorder-test",
        bin_id="bin-9",
        frame_sha256=digest,
        spool=BlobRef(
            key=spool_key("bin-9", digest),
            uri="file:///elsewhere/x.jpg",
            sha256=digest,
            size=len(jpeg),
        ),
        captured_at=datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC),
        width=160,
        height=120,
        source="folder:x.jpg",
        sequence=0,
        ground_truth=label,
    )
    line = {
        "t": t,
        "subject": FRAMES_CAPTURED.subject("bin-9"),
        "headers": {"Nats-Msg-Id": str(event.event_id)},
        "data": json.loads(event.model_dump_json()),
        "frame_b64": base64.b64encode(jpeg).decode(),
    }
    return json.dumps(line)


def test_replay_file_source_yields_embedded_frames_with_ground_truth(tmp_path: Path) -> None:
    first, second = (p.read_bytes() for p in _demo_jpegs(2))
    without_frame = json.loads(_frame_line(first, label="glass", t=0.2))
    del without_frame["frame_b64"]
    lines = [
        _frame_line(first, label="glass", t=0.0),
        "{this is not json",
        json.dumps(
            {
                "t": 0.1,
                "subject": "training.requested.v1",
                "headers": {},
                "data": {"producer": "x", "dataset_name": "d"},
            }
        ),
        json.dumps(without_frame),
        _frame_line(second, label="paper", t=0.3, sha="0" * 64),
        _frame_line(second, label=None, t=0.4),
    ]
    path = tmp_path / "recording.jsonl"
    path.write_text("\n".join(lines) + "\n")

    source = open_source(str(path), labels_from_folders=True, jpeg_quality=90)
    assert isinstance(source, ReplayFileSource)
    skips = SkipLog()
    frames = list(source.frames(skips))

    assert [f.jpeg for f in frames] == [first, second]
    assert [f.ground_truth for f in frames] == ["glass", None]
    assert [f.description for f in frames] == [
        "replay:recording.jsonl:1",
        "replay:recording.jsonl:6",
    ]
    assert skips.reasons == {"bad_line": 1, "no_frame": 1, "checksum": 1}
    assert any(":2:" in d and "not JSON" in d for d in skips.details)


def test_open_source_picks_the_source_kind(tmp_path: Path) -> None:
    camera = open_source("0", labels_from_folders=False, jpeg_quality=90)
    assert isinstance(camera, VideoSource)
    assert not camera.finite
    assert camera.target == 0
    stream = open_source("rtsp://cam.local/live", labels_from_folders=False, jpeg_quality=90)
    assert isinstance(stream, VideoSource)
    assert not stream.finite
    assert isinstance(
        open_source(str(DEMO_STREAM), labels_from_folders=True, jpeg_quality=90),
        ImageFolderSource,
    )
    with pytest.raises(ConfigError, match="not an image folder"):
        open_source(str(tmp_path / "missing"), labels_from_folders=True, jpeg_quality=90)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="holds no images"):
        open_source(str(tmp_path / "empty"), labels_from_folders=True, jpeg_quality=90)


class FakeCamera:
    """A cv2.VideoCapture factory without a camera. Each open takes the next entry of `script`:
    None does not open, n opens and delivers n frames, then reads fail (the stream dropped)."""

    def __init__(self, script: list[int | None]) -> None:
        self.script = list(script)
        self.opens = 0
        self.released = 0
        self.sleeps: list[float] = []

    def __call__(self, target: str | int) -> FakeCapture:
        self.opens += 1
        return FakeCapture(self, self.script.pop(0) if self.script else None)

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)

    def source(self, *, reconnect_attempts: int = 3) -> VideoSource:
        return VideoSource(
            "rtsp://cam.test/live",
            live=True,
            jpeg_quality=80,
            opener=self,
            reconnect_attempts=reconnect_attempts,
            reconnect_delay_s=0.5,
            sleep=self.sleep,
        )


class FakeCapture:
    def __init__(self, camera: FakeCamera, frames: int | None) -> None:
        self.camera = camera
        self.frames = frames

    def isOpened(self) -> bool:  # OpenCV's spelling
        return self.frames is not None

    def read(self) -> tuple[bool, object]:
        if not self.frames:
            return False, None
        self.frames -= 1
        return True, np.full((24, 32, 3), 90, dtype=np.uint8)

    def release(self) -> None:
        self.camera.released += 1


def test_a_live_source_reconnects_and_reconnects_are_not_skipped_frames() -> None:
    camera = FakeCamera([2, None, 3])  # two frames, a failed reopen, three frames, then gone
    skips = SkipLog()
    frames = camera.source(reconnect_attempts=3).frames(skips)
    got = [next(frames) for _ in range(5)]
    assert [f.description for f in got] == [f"stream:rtsp://cam.test/live#{i}" for i in range(5)]
    assert (got[0].width, got[0].height) == (32, 24)
    assert camera.sleeps == [0.5, 0.5]  # before the failed reopen and the good one
    with pytest.raises(SourceLostError, match=r"rtsp://cam.test/live lost.*3 reconnects"):
        next(frames)
    assert camera.sleeps == [0.5] * 5  # the counter starts again after a frame
    assert skips.reasons == {}  # reconnects are not frames
    assert camera.released == camera.opens  # every capture opened was released


def test_a_stream_that_opens_but_sends_nothing_is_lost() -> None:
    camera = FakeCamera([0, 0, 0, 0, 5])  # each open succeeds, no open delivers a frame
    with pytest.raises(SourceLostError, match="no frame after 2 reconnects"):
        list(camera.source(reconnect_attempts=2).frames(SkipLog()))
    assert camera.opens == 3
    assert camera.released == 3


async def test_a_lost_live_source_raises_out_of_capture(tmp_path: Path) -> None:
    camera = FakeCamera([3])
    emitted: list[FrameCaptured] = []
    skip_reasons: list[str] = []

    async def emit(event: FrameCaptured) -> None:
        emitted.append(event)

    plan = CapturePlan(bin_id="bin-3", producer="frame-ingestor", loops=0)
    with pytest.raises(SourceLostError, match="lost"):
        await capture(
            camera.source(reconnect_attempts=2),
            LocalBlobStore(tmp_path),
            emit,
            plan,
            on_skip=skip_reasons.append,
        )
    assert [e.sequence for e in emitted] == [0, 1, 2]
    assert skip_reasons == []
    assert camera.released == camera.opens == 3


class GlitchingCapture(FakeCapture):
    """A stream whose decoder first hands over, with ok=True, a frame OpenCV cannot encode as a
    JPEG (as some GStreamer/FFmpeg pipelines do on a broken packet), then good frames."""

    def __init__(self, camera: FakeCamera, glitch: np.ndarray[Any, Any], frames: int) -> None:
        super().__init__(camera, frames)
        self.glitch: list[np.ndarray[Any, Any]] = [glitch]

    def read(self) -> tuple[bool, object]:
        if self.glitch:
            return True, self.glitch.pop()
        return super().read()


@pytest.mark.parametrize(
    "glitch",
    [np.zeros((0, 0, 3), dtype=np.uint8), np.zeros((24, 32, 2), dtype=np.uint8)],
    ids=["empty", "two_channels"],
)
def test_a_camera_frame_opencv_cannot_encode_is_skipped_not_fatal(
    glitch: np.ndarray[Any, Any],
) -> None:
    """cv2.imencode asserts (cv2.error) on such an image instead of failing: the source turns
    that into a skipped corrupt frame, and the capture goes on."""
    camera = FakeCamera([])
    source = VideoSource(
        "rtsp://cam.test/live",
        live=True,
        jpeg_quality=80,
        opener=lambda target: GlitchingCapture(camera, glitch, frames=1),
        reconnect_attempts=0,
        sleep=camera.sleep,
    )
    skips = SkipLog()
    frames = source.frames(skips)
    first = next(frames)
    frames.close()
    assert (first.description, first.width, first.height) == (
        "stream:rtsp://cam.test/live#1",
        32,
        24,
    )
    assert skips.reasons == {"corrupt": 1}
    assert "frame 0" in skips.details[0]
    with pytest.raises(CorruptFrameError, match=re.escape(str(glitch.shape))):
        encode_jpeg(glitch, 80)


def test_a_file_that_disappears_is_a_config_error_not_a_reconnect(tmp_path: Path) -> None:
    path = tmp_path / "clip.avi"
    path.write_bytes(b"")
    source = open_source(str(path), labels_from_folders=True, jpeg_quality=80)
    path.unlink()
    with pytest.raises(ConfigError, match=r"cannot open video:.*clip\.avi"):
        list(source.frames(SkipLog()))


# --- rate schedule -------------------------------------------------------------------------


def test_rate_schedule_has_no_drift_and_reanchors_after_a_stall() -> None:
    schedule = RateSchedule(fps=10)
    assert schedule.wait_s(100.0) == 0.0  # the first frame goes at once
    assert schedule.wait_s(100.0) == pytest.approx(0.1)
    # Woke up late for frame 1 (100.13 instead of 100.1): frame 2 is still due at 100.2.
    assert schedule.wait_s(100.13) == pytest.approx(0.07)
    # Slow work, a little behind: no wait, and the due times stay where they were.
    assert schedule.wait_s(100.35) == 0.0
    assert schedule.wait_s(100.36) == pytest.approx(0.04)
    # A long stall: re-anchor at now instead of bursting through the missed frames.
    assert schedule.wait_s(110.0) == 0.0
    assert schedule.wait_s(110.0) == pytest.approx(0.1)


def test_a_slot_the_pass_did_not_use_goes_to_the_next_frame() -> None:
    schedule = RateSchedule(fps=10)
    assert schedule.wait_s(100.0) == 0.0
    assert schedule.wait_s(100.0) == pytest.approx(0.1)  # the pass ends in this slot
    schedule.unused()
    assert schedule.wait_s(100.1) == 0.0  # the next pass's first frame takes it


def test_rate_schedule_without_rate_never_waits() -> None:
    schedule = RateSchedule(fps=0)
    assert [schedule.wait_s(t) for t in (0.0, 0.0, 5.0)] == [0.0, 0.0, 0.0]
    with pytest.raises(ValueError, match="fps"):
        RateSchedule(fps=-1)


# --- capture loop (no bus) -----------------------------------------------------------------


class ListSource:
    finite = True
    description = "list:test"

    def __init__(self, frames: list[SourceFrame]) -> None:
        self.items = frames
        self.passes = 0

    def frames(self, on_skip: SkipHandler) -> Generator[SourceFrame, None, None]:
        self.passes += 1
        on_skip("corrupt", "one bad frame per pass")
        yield from self.items


async def test_capture_spools_each_frame_and_numbers_events(tmp_path: Path) -> None:
    frames = [
        SourceFrame(p.read_bytes(), 160, 120, p.parent.name, f"folder:{p.name}")
        for p in _demo_jpegs(3)
    ]
    source = ListSource(frames)
    spool = LocalBlobStore(tmp_path / "spool")
    emitted: list[FrameCaptured] = []
    skip_reasons: list[str] = []

    async def emit(event: FrameCaptured) -> None:
        emitted.append(event)

    plan = CapturePlan(bin_id="bin-7", producer="frame-ingestor", loops=3, max_frames=7)
    stats = await capture(source, spool, emit, plan, on_skip=skip_reasons.append)

    assert stats.published == 7
    assert source.passes == 3  # the third pass stopped after one frame
    assert stats.skipped == {"corrupt": 3}
    assert skip_reasons == ["corrupt"] * 3
    assert [e.sequence for e in emitted] == list(range(7))
    assert [e.ground_truth for e in emitted] == [f.ground_truth for f in frames * 3][:7]
    for event, frame in zip(emitted, (frames * 3)[:7], strict=True):
        assert event.frame_sha256 == sha256_hex(frame.jpeg) == event.spool.sha256
        assert event.spool.key == spool_key("bin-7", event.frame_sha256)
        assert spool.get(event.spool.key) == frame.jpeg
        assert event.bin_id == "bin-7"
        assert event.captured_at.tzinfo is not None
    assert len(spool.list("bin-7/")) == 3  # repeated passes reuse the content-addressed key


async def test_a_frame_is_announced_once_the_bus_is_back(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(core, "EMIT_RETRY_FIRST_S", 0.001)
    frames = [
        SourceFrame(p.read_bytes(), 160, 120, p.parent.name, f"folder:{p.name}")
        for p in _demo_jpegs(2)
    ]
    spool = LocalBlobStore(tmp_path / "spool")
    tries: list[int] = []
    stored: list[FrameCaptured] = []
    failures = iter([PublishTimeoutError("no ack"), nats.errors.ConnectionClosedError()])

    async def emit(event: FrameCaptured) -> None:
        tries.append(event.sequence)
        failure = next(failures, None)
        if failure is not None:
            raise failure
        stored.append(event)

    plan = CapturePlan(bin_id="bin-7", producer="frame-ingestor", loops=1)
    stats = await capture(ListSource(frames), spool, emit, plan)

    assert tries == [0, 0, 0, 1]  # the first frame waited for the bus, then went on
    assert stats.published == 2
    assert [e.sequence for e in stored] == [0, 1]
    assert [e.frame_sha256 for e in stored] == [sha256_hex(f.jpeg) for f in frames]

    async def broken(event: FrameCaptured) -> None:
        raise ValueError("a bug, not the bus")

    with pytest.raises(ValueError, match="a bug"):  # only bus errors are retried
        await capture(ListSource(frames), spool, broken, plan)


async def test_capture_stops_when_asked(tmp_path: Path) -> None:
    frames = [SourceFrame(p.read_bytes(), 160, 120, None, "x") for p in _demo_jpegs(4)]
    stop = asyncio.Event()
    emitted: list[FrameCaptured] = []

    async def emit(event: FrameCaptured) -> None:
        emitted.append(event)
        if len(emitted) == 2:
            stop.set()

    plan = CapturePlan(bin_id="bin-1", producer="p", loops=0)
    stats = await capture(ListSource(frames), LocalBlobStore(tmp_path), emit, plan, stop=stop)
    assert stats.published == len(emitted) == 2


async def test_each_frame_waits_in_the_outbox_until_jetstream_has_it(tmp_path: Path) -> None:
    frames = [SourceFrame(p.read_bytes(), 160, 120, None, "x") for p in _demo_jpegs(2)]
    spool = LocalBlobStore(tmp_path / "spool")
    held: list[FrameCaptured] = []

    async def emit(event: FrameCaptured) -> None:
        # The frame is in the spool, and its event beside it, before it is published.
        assert spool.get(event.spool.key) == frames[event.sequence].jpeg
        held.append(FrameCaptured.model_validate_json(spool.get(_marker(event))))

    plan = CapturePlan(bin_id="bin-7", producer="frame-ingestor", loops=1)
    stats = await capture(ListSource(frames), spool, emit, plan)

    assert stats.published == 2
    assert [e.sequence for e in held] == [0, 1]
    assert not [key for key in spool.list("bin-7/") if key.endswith(SPOOL_ANNOUNCING_SUFFIX)]


class NotingCamera:
    """A live source (a camera: never finite) that notes when each frame left the camera."""

    finite = False
    description = "camera:test"

    def __init__(self, jpegs: list[bytes]) -> None:
        self.jpegs = jpegs
        self.read_at: list[datetime] = []

    def frames(self, on_skip: SkipHandler) -> Generator[SourceFrame, None, None]:
        for number, jpeg in enumerate(itertools.cycle(self.jpegs)):
            self.read_at.append(datetime.now(UTC))
            yield SourceFrame(jpeg, 160, 120, None, f"camera:test#{number}")


async def test_a_paced_camera_frame_is_stamped_when_it_was_read_not_after_the_pacing_wait(
    tmp_path: Path,
) -> None:
    """The actuator judges staleness by captured_at (the camera's time) and
    binloop_frame_to_actuation_seconds measures from it: a frame stamped after the pacing wait
    would look up to 1/fps younger than it is."""
    camera = NotingCamera([p.read_bytes() for p in _demo_jpegs(3)])
    emitted: list[FrameCaptured] = []

    async def emit(event: FrameCaptured) -> None:
        emitted.append(event)

    plan = CapturePlan(bin_id="bin-1", producer="frame-ingestor", fps=4, max_frames=3)
    await capture(camera, LocalBlobStore(tmp_path / "spool"), emit, plan)

    assert len(emitted) == len(camera.read_at) == 3  # paced before the read: none read ahead
    lags_s = [
        (event.captured_at - read_at).total_seconds()
        for event, read_at in zip(emitted, camera.read_at, strict=True)
    ]
    assert all(0 <= lag < 0.4 / plan.fps for lag in lags_s), lags_s


def _marker(event: FrameCaptured) -> str:
    return event.spool.key + SPOOL_ANNOUNCING_SUFFIX


def _spool_as_if_killed(spool: LocalBlobStore, jpeg: bytes, sequence: int) -> FrameCaptured:
    """What a frame-ingestor killed before JetStream acked the frame's event leaves behind."""
    ref = spool_ref(spool, BIN, jpeg)
    frame = SourceFrame(jpeg, 160, 120, "glass", f"test:{sequence}")
    plan = CapturePlan(bin_id=BIN, producer="frame-ingestor")
    event = core._frame_event(frame, ref, sequence, plan, datetime.now(UTC))
    core.spool_frame(spool, Outbox(spool, BIN), event, jpeg)
    return event


async def test_leftovers_are_announced_as_they_were_and_broken_markers_rebuilt_or_dropped(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(core, "EMIT_RETRY_FIRST_S", 0.001)
    spool = LocalBlobStore(tmp_path / "spool")
    first, second, orphan, garbled, misplaced, damaged = [p.read_bytes() for p in _demo_jpegs(6)]
    leftovers = [_spool_as_if_killed(spool, jpeg, i) for i, jpeg in enumerate((first, second))]
    # Killed between the marker and the frame: nothing to announce.
    orphan_event = _spool_as_if_killed(spool, orphan, 2)
    spool.delete(orphan_event.spool.key)
    # A power cut left the marker cut short (it is not fsynced); the frame is intact.
    garbled_event = _spool_as_if_killed(spool, garbled, 3)
    spool.put(_marker(garbled_event), b'{"event_id": "cut sh')
    spooled_at = datetime(2026, 5, 6, 7, 8, 9, tzinfo=UTC)
    os.utime(spool.root / garbled_event.spool.key, (spooled_at.timestamp(),) * 2)
    # A marker that names another frame than the one it sits beside.
    misplaced_key = spool_key(BIN, sha256_hex(misplaced))
    spool.put(misplaced_key, misplaced)
    spool.put(misplaced_key + SPOOL_ANNOUNCING_SUFFIX, leftovers[0].model_dump_json().encode())
    # Marker and frame both cut short: nothing the frame could say.
    damaged_event = _spool_as_if_killed(spool, damaged, 5)
    spool.put(_marker(damaged_event), b"")
    spool.put(damaged_event.spool.key, damaged[:100])

    dropped: list[str] = []
    sent: list[FrameCaptured] = []
    failures = iter([PublishTimeoutError("no ack")])  # the bus is away at first

    async def emit(event: FrameCaptured) -> None:
        failure = next(failures, None)
        if failure is not None:
            raise failure
        sent.append(event)

    outbox = Outbox(spool, BIN, dropped.append, producer="frame-ingestor-test")
    with caplog.at_level(logging.WARNING, logger="services.frame_ingestor"):
        announced = await announce_leftovers(outbox, emit, None)

    assert announced == 4
    # The intact markers' events as they were, event ids included, oldest capture first.
    assert [event for event in sent if event in leftovers] == leftovers
    rebuilt = {event.spool.key: event for event in sent if event not in leftovers}
    assert set(rebuilt) == {garbled_event.spool.key, misplaced_key}
    recovered = rebuilt[garbled_event.spool.key]
    assert recovered.spool == garbled_event.spool  # key, uri, sha256, size, content type
    assert (recovered.frame_sha256, recovered.bin_id) == (garbled_event.frame_sha256, BIN)
    assert (recovered.width, recovered.height) == (160, 120)  # from the JPEG header
    assert recovered.captured_at == spooled_at  # the actuator finds it stale, the loop keeps it
    assert recovered.source == f"recovered:{garbled_event.spool.key}"
    assert recovered.producer == "frame-ingestor-test"
    assert rebuilt[misplaced_key].frame_sha256 == sha256_hex(misplaced)
    # A rebuilt event's id is fixed by the frame: rebuilt again after a second power cut, it
    # is the same event, which JetStream's duplicate window drops.
    spool.put(_marker(garbled_event), b"")
    assert [event.event_id for event in outbox.leftovers()] == [recovered.event_id]
    spool.delete(_marker(garbled_event))
    assert sorted(dropped) == ["frame_gone", "unreadable_marker"]
    assert not [key for key in spool.list(f"{BIN}/") if key.endswith(SPOOL_ANNOUNCING_SUFFIX)]
    for event in (*leftovers, garbled_event, damaged_event):
        assert spool.exists(event.spool.key)  # frames are the uploader's to reclaim
    warnings = " ".join(r.getMessage() for r in caplog.records)
    assert _marker(orphan_event) in warnings
    assert f"{_marker(garbled_event)} unreadable" in warnings
    assert "rebuilt from its frame" in warnings
    assert _marker(damaged_event) in warnings
    assert "not announced yet" in warnings  # the outage was retried, not fatal


# --- the service against a real nats-server ------------------------------------------------


def _settings(nats_server: NatsServer, tmp_path: Path, **extra: object) -> FrameIngestorSettings:
    return FrameIngestorSettings(
        nats_url=nats_server.url,
        http_port=0,
        http_host="127.0.0.1",
        retry_delay_s=0.05,
        source=str(DEMO_STREAM),
        spool_root=tmp_path / "spool",
        max_frames=10,
        **extra,  # type: ignore[arg-type]
    )


@pytest.mark.integration
async def test_run_capture_puts_demo_frames_in_the_frames_stream(
    js: JetStreamContext, nats_client: Client, nats_server: NatsServer, tmp_path: Path
) -> None:
    settings = _settings(nats_server, tmp_path)
    collector = await Collector(FrameCaptured).attach(nats_client, FRAMES_CAPTURED.wildcard)
    service = new_service("frame-ingestor", settings)
    await service.start()
    try:
        published = await run_capture(settings, service.publisher)
    finally:
        await service.stop()

    assert published == 10
    info = await js.stream_info("FRAMES", subjects_filter=FRAMES_CAPTURED.wildcard)
    assert info.state.messages == 10
    assert info.state.subjects == {FRAMES_CAPTURED.subject("bin-1"): 10}
    events = await collector.wait_for(10)
    assert [e.sequence for e in events] == list(range(10))
    assert {e.ground_truth for e in events} <= TRASHNET_CLASSES
    spool = LocalBlobStore(settings.spool_root)
    for event in events:
        assert sha256_hex(spool.get(event.spool.key)) == event.frame_sha256
        assert event.source.startswith("folder:")
        assert event.source.endswith(".jpg")


@pytest.mark.integration
async def test_a_frame_left_unannounced_by_a_killed_ingestor_is_announced_once_at_restart(
    js: JetStreamContext, nats_server: NatsServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    settings = _settings(nats_server, tmp_path)
    spool = LocalBlobStore(settings.spool_root)
    # First run: the bus takes the first frame's event and never answers; the ingestor is
    # killed (cancelled) while it waits, after the frame is in the spool.
    publishing = asyncio.Event()
    hanging = new_service("frame-ingestor", settings).publisher

    async def hang(route: object, event: FrameCaptured, bin_id: str | None = None) -> None:
        publishing.set()
        await asyncio.Event().wait()

    monkeypatch.setattr(hanging, "publish", hang)
    killed = asyncio.create_task(run_capture(settings, hanging))
    await asyncio.wait_for(publishing.wait(), 20)
    killed.cancel()
    with pytest.raises(asyncio.CancelledError):
        await killed
    (unannounced,) = [
        FrameCaptured.model_validate_json(spool.get(key))
        for key in spool.list(f"{BIN}/")
        if key.endswith(SPOOL_ANNOUNCING_SUFFIX)
    ]
    assert spool.exists(unannounced.spool.key)

    service = new_service("frame-ingestor", settings)
    await service.start()
    try:
        # Another kill, after JetStream stored the event but before its marker went: the
        # next start sends it again with the same id, and JetStream drops the copy.
        stored = _spool_as_if_killed(spool, _demo_jpegs(20)[-1].read_bytes(), 99)
        await service.publisher.publish(FRAMES_CAPTURED, stored, BIN)
        orphan = _spool_as_if_killed(spool, _demo_jpegs(19)[-1].read_bytes(), 98)
        spool.delete(orphan.spool.key)
        gone_before = _unannounced_count("frame_gone")
        collector = await Collector(FrameCaptured).attach_stream(js, FRAMES_CAPTURED.wildcard)

        new_frames = [SourceFrame(p.read_bytes(), 160, 120, None, "new") for p in _demo_jpegs(3)]
        published = await run_capture(
            settings, service.publisher, source=ListSource(new_frames[1:])
        )
    finally:
        await service.stop()

    assert published == 2
    events = await collector.wait_for(4)
    info = await js.stream_info("FRAMES", subjects_filter=FRAMES_CAPTURED.wildcard)
    assert info.state.messages == 4  # stored (once), the leftover, then the two new frames
    assert [e.event_id for e in events[:2]] == [stored.event_id, unannounced.event_id]
    assert [e.source for e in events[2:]] == ["new", "new"]
    assert events[1] == unannounced
    assert not [key for key in spool.list(f"{BIN}/") if key.endswith(SPOOL_ANNOUNCING_SUFFIX)]
    assert _unannounced_count("frame_gone") == gone_before + 1


def _unannounced_count(reason: str) -> float:
    labels = {"bin": BIN, "reason": reason}
    return REGISTRY.get_sample_value("binloop_frames_unannounced_total", labels) or 0.0


@pytest.mark.integration
async def test_service_captures_then_keeps_serving_health(
    js: JetStreamContext, nats_client: Client, nats_server: NatsServer, tmp_path: Path
) -> None:
    settings = _settings(nats_server, tmp_path, fps=500.0)
    collector = await Collector(FrameCaptured).attach(nats_client, FRAMES_CAPTURED.wildcard)
    done = asyncio.Event()
    service = create_app(settings, capture_done=done)
    await service.start()
    try:
        await asyncio.wait_for(done.wait(), 20)
        events = await collector.wait_for(10)
        assert len({e.frame_sha256 for e in events}) == 10
        info = await js.stream_info("FRAMES")
        assert info.state.messages == 10
        assert service.is_ready()
        assert service.health is not None
        async with aiohttp.ClientSession() as http:
            url = f"http://127.0.0.1:{service.health.port}"
            async with http.get(f"{url}/readyz") as response:
                assert response.status == 200
            async with http.get(f"{url}/metrics") as response:
                body = await response.text()
        assert 'binloop_frames_captured_total{bin="bin-1"}' in body
    finally:
        await service.stop()


def test_a_wrong_source_fails_at_start_up(tmp_path: Path) -> None:
    settings = FrameIngestorSettings(source=str(tmp_path / "nowhere"), http_port=0)
    with pytest.raises(ConfigError, match="nowhere"):
        create_app(settings)


@pytest.mark.parametrize("source", ["rtsp://127.0.0.1:9/live", "99"])
def test_a_stream_or_camera_that_does_not_open_fails_at_start_up(source: str) -> None:
    # Real OpenCV: nothing listens on the discard port, and there is no camera 99.
    settings = FrameIngestorSettings(source=source, http_port=0, source_open_timeout_s=0)
    with pytest.raises(ConfigError, match=rf"{source}.* does not open \(tried 1 times"):
        create_app(settings)


def test_a_camera_still_booting_is_retried_at_start_up() -> None:
    settings = FrameIngestorSettings(http_port=0, source_open_timeout_s=600)
    camera = FakeCamera([None, 0, 4])  # not there, then no frame yet, then working
    create_app(settings, source=camera.source())
    assert camera.opens == 3
    assert camera.sleeps == [0.5, 0.5]
    assert camera.released == 3  # the check does not keep the camera open


def test_a_camera_that_never_delivers_fails_start_up_naming_it() -> None:
    settings = FrameIngestorSettings(http_port=0, source_open_timeout_s=0)
    camera = FakeCamera([0])
    with pytest.raises(ConfigError, match=r"stream:rtsp://cam.test/live opens but delivers no"):
        create_app(settings, source=camera.source())


@pytest.mark.integration
async def test_a_lost_camera_turns_the_service_unhealthy(
    nats_server: NatsServer, tmp_path: Path
) -> None:
    settings = _settings(nats_server, tmp_path)
    camera = FakeCamera([1, 2])  # one frame checked at start-up, two captured, then gone
    done = asyncio.Event()
    service = create_app(settings, source=camera.source(reconnect_attempts=2), capture_done=done)
    await service.start()
    try:
        await asyncio.wait_for(done.wait(), 20)
        assert not service.is_ready()
        assert service.health is not None
        async with aiohttp.ClientSession() as http:
            url = f"http://127.0.0.1:{service.health.port}"
            for probe in ("healthz", "readyz"):
                async with http.get(f"{url}/{probe}") as response:
                    assert response.status == 503, probe
    finally:
        await service.stop()
