"""record / replay: the file format, bad lines, timing, and a round trip through two real
nats-servers (replaying twice stores each message once)."""

from __future__ import annotations

import asyncio
import base64
import json
from datetime import UTC, datetime
from pathlib import Path

import nats
import pytest
from nats.aio.client import Client
from nats.js.client import JetStreamContext

from binloop.bus import ensure_streams
from binloop.natsserver import NatsServer
from binloop.process import free_port
from binloop.replay import (
    RecordingInterruptedError,
    ReplayStats,
    iter_replay_file,
    record,
    replay,
    replay_delay,
)
from binloop.storage import LocalBlobStore, sha256_hex, spool_key
from schemas.events import FrameCaptured, TrainingRequested
from schemas.routes import FRAMES_CAPTURED, TRAINING_REQUESTED
from services.frame_ingestor.sources import ReplayFileSource
from tests.helpers import eventually

DEMO_STREAM = Path(__file__).resolve().parent.parent / "data" / "demo" / "stream"
BIN = "bin-3"


def test_reader_skips_bad_lines_and_names_them(tmp_path: Path) -> None:
    good = {"t": 0.5, "subject": "training.requested.v1", "headers": {}, "data": {"a": 1}}
    frame = {**good, "t": 1, "frame_b64": base64.b64encode(b"jpeg bytes").decode()}
    lines = [
        json.dumps(good),
        "",
        "{oops",
        json.dumps([1, 2]),
        json.dumps({**good, "t": -1}),
        json.dumps({**good, "subject": ""}),
        json.dumps({**good, "data": "text"}),
        json.dumps({**good, "headers": {"n": 1}}),
        json.dumps({**good, "frame_b64": "***"}),
        json.dumps(frame),
    ]
    path = tmp_path / "mixed.jsonl"
    path.write_text("\n".join(lines) + "\n")

    stats = ReplayStats()
    messages = list(iter_replay_file(path, stats))

    assert [(m.line, m.t, m.frame) for m in messages] == [(1, 0.5, None), (10, 1.0, b"jpeg bytes")]
    assert messages[0].data == {"a": 1}
    assert (stats.messages, stats.bad_lines) == (2, 7)
    assert [p.split(":")[1] for p in stats.problems] == ["3", "4", "5", "6", "7", "8", "9"]
    assert "not JSON" in stats.problems[0]
    assert '"t" must be a number' in stats.problems[2]
    assert "base64" in stats.problems[6]


def test_replay_delay_scales_recorded_time_from_one_start() -> None:
    assert replay_delay(2.0, speed=1.0, elapsed=0.5) == pytest.approx(1.5)
    assert replay_delay(2.0, speed=4.0, elapsed=0.1) == pytest.approx(0.4)
    assert replay_delay(2.0, speed=1.0, elapsed=3.0) == 0.0  # behind: send at once
    assert replay_delay(2.0, speed=0.0, elapsed=0.0) == 0.0  # as fast as possible


def _frame_event(spool: LocalBlobStore, jpeg: bytes, sequence: int, label: str) -> FrameCaptured:
    ref = spool.put(spool_key(BIN, sha256_hex(jpeg)), jpeg, "image/jpeg")
    return FrameCaptured(
        producer="test",
        bin_id=BIN,
        frame_sha256=ref.sha256,
        spool=ref,
        captured_at=datetime.now(UTC),
        width=160,
        height=120,
        source=f"test:{sequence}",
        sequence=sequence,
        ground_truth=label,
    )


async def _connect_after_subscribing(url: str) -> Client:
    """A publisher connected after the recorder subscribed. With nats-server 2.15 a connection
    opened before a subscription can miss that subscription for a few milliseconds after its
    PONG (seen under load), which would drop the test's first message."""
    return await nats.connect(url)


@pytest.mark.integration
async def test_record_then_replay_round_trip(
    js: JetStreamContext, nats_server: NatsServer, tmp_path: Path
) -> None:
    """`js` creates the streams on the recording server."""
    spool = LocalBlobStore(tmp_path / "spool")
    jpegs = [p.read_bytes() for p in sorted(DEMO_STREAM.rglob("*.jpg"))[:2]]
    frames = [
        _frame_event(spool, jpeg, i, label)
        for i, (jpeg, label) in enumerate(zip(jpegs, ["glass", "paper"], strict=True))
    ]
    request = TrainingRequested(producer="test", dataset_name="binloop")
    path = tmp_path / "recording.jsonl"
    stop, ready = asyncio.Event(), asyncio.Event()
    recorder = asyncio.create_task(
        record(
            nats_server.url,
            ["frames.>", TRAINING_REQUESTED.subject()],
            path,
            embed_frames_from=spool.root,
            stop=stop,
            max_messages=3,
            ready=ready,
        )
    )
    await asyncio.wait_for(ready.wait(), 10)
    published = [
        (FRAMES_CAPTURED.subject(BIN), frames[0]),
        (TRAINING_REQUESTED.subject(), request),
        (FRAMES_CAPTURED.subject(BIN), frames[1]),
    ]
    publisher = await _connect_after_subscribing(nats_server.url)
    try:
        for subject, event in published:
            await publisher.jetstream().publish(
                subject,
                event.model_dump_json().encode(),
                headers={"Nats-Msg-Id": str(event.event_id)},
            )
    finally:
        await publisher.drain()
    assert await asyncio.wait_for(recorder, 10) == 3

    lines = [json.loads(line) for line in path.read_text().splitlines()]
    times = [line["t"] for line in lines]
    assert times[0] == 0.0
    assert times == sorted(times)
    # Each subscription keeps its order; across subjects nats-py may hand them over either way.
    frame_lines = [line for line in lines if line["subject"] == FRAMES_CAPTURED.subject(BIN)]
    (request_line,) = [line for line in lines if line["subject"] == TRAINING_REQUESTED.subject()]
    assert [line["headers"]["Nats-Msg-Id"] for line in frame_lines] == [
        str(e.event_id) for e in frames
    ]
    assert request_line["headers"]["Nats-Msg-Id"] == str(request.event_id)
    assert [base64.b64decode(line["frame_b64"]) for line in frame_lines] == jpegs
    assert "frame_b64" not in request_line
    assert TrainingRequested.model_validate(request_line["data"]) == request

    # The file stands alone: the ingestor's replay source gets the frames back from it.
    replayed_frames = list(ReplayFileSource(path).frames(lambda reason, detail: None))
    assert [f.jpeg for f in replayed_frames] == jpegs
    assert [f.ground_truth for f in replayed_frames] == ["glass", "paper"]

    with NatsServer(tmp_path / "elsewhere") as other:
        other_client = await nats.connect(other.url)
        try:
            await ensure_streams(other_client.jetstream())
        finally:
            await other_client.drain()
        assert (await replay(other.url, path, speed=0)).published == 3
        again = await replay(other.url, path, speed=50)
        assert (again.published, again.duplicates) == (3, 3)  # acked, but as duplicates
        client = await nats.connect(other.url)
        try:
            other_js = client.jetstream()
            frames_info = await other_js.stream_info("FRAMES")
            engine_info = await other_js.stream_info("ENGINE")
            assert (frames_info.state.messages, engine_info.state.messages) == (2, 1)
            stored = [(await other_js.get_msg("FRAMES", seq)) for seq in (1, 2)]
            assert [FrameCaptured.model_validate_json(m.data or b"") for m in stored] == frames
            assert [(m.headers or {}).get("Nats-Msg-Id") for m in stored] == [
                str(e.event_id) for e in frames
            ]
            request_msg = await other_js.get_msg("ENGINE", 1)
            assert TrainingRequested.model_validate_json(request_msg.data or b"") == request
        finally:
            await client.drain()


@pytest.mark.integration
async def test_record_leaves_out_non_json_and_stops_on_request(
    nats_server: NatsServer, tmp_path: Path
) -> None:
    path = tmp_path / "out" / "rec.jsonl"
    ready = asyncio.Event()
    recorder = asyncio.create_task(
        record(
            nats_server.url, ["probe.>"], path, stop=asyncio.Event(), max_messages=1, ready=ready
        )
    )
    await asyncio.wait_for(ready.wait(), 10)
    publisher = await _connect_after_subscribing(nats_server.url)
    await publisher.publish("probe.a", b"not json")
    await publisher.publish("probe.b", b'{"n": 1}')
    await publisher.drain()
    assert await asyncio.wait_for(recorder, 10) == 1
    (line,) = [json.loads(text) for text in path.read_text().splitlines()]
    assert (line["subject"], line["data"], line["t"]) == ("probe.b", {"n": 1}, 0.0)

    stop, ready = asyncio.Event(), asyncio.Event()
    idle = asyncio.create_task(record(nats_server.url, ["probe.>"], path, stop=stop, ready=ready))
    await asyncio.wait_for(ready.wait(), 10)
    stop.set()
    assert await asyncio.wait_for(idle, 10) == 0
    assert path.read_text() == ""


async def _publish_numbers(url: str, subject: str, numbers: list[int]) -> None:
    publisher = await _connect_after_subscribing(url)
    for n in numbers:
        await publisher.publish(subject, json.dumps({"n": n}).encode())
    await publisher.drain()


@pytest.mark.integration
async def test_record_keeps_recording_across_a_server_restart(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    port = free_port()
    store = tmp_path / "jetstream"
    server = NatsServer(store, port=port).start()
    path = tmp_path / "rec.jsonl"
    stop, ready = asyncio.Event(), asyncio.Event()
    counts: list[int] = []
    recorder = asyncio.create_task(
        record(server.url, ["probe.>"], path, stop=stop, ready=ready, on_progress=counts.append)
    )
    try:
        await asyncio.wait_for(ready.wait(), 10)
        await _publish_numbers(server.url, "probe.a", [1])
        await eventually(lambda: counts[-1:] == [1])
        # A 3 s outage: a nats-server restart or upgrade, a network blip.
        server.stop()
        await asyncio.sleep(3)
        server = NatsServer(store, port=port).start()
        await eventually(lambda: "record: reconnected" in caplog.text)
        await _publish_numbers(server.url, "probe.b", [2, 3, 4])
        await eventually(lambda: counts[-1:] == [4])
        stop.set()
        assert await asyncio.wait_for(recorder, 10) == 4
    finally:
        if not recorder.done():
            recorder.cancel()
        server.stop()
    lines = [json.loads(text) for text in path.read_text().splitlines()]
    assert [line["data"]["n"] for line in lines] == [1, 2, 3, 4]
    assert "record: lost the connection" in caplog.text


@pytest.mark.integration
async def test_record_says_what_it_kept_when_the_server_stays_away(tmp_path: Path) -> None:
    server = NatsServer(tmp_path / "jetstream").start()
    url = server.url
    path = tmp_path / "rec.jsonl"
    ready = asyncio.Event()
    counts: list[int] = []
    recorder = asyncio.create_task(
        record(
            url,
            ["probe.>"],
            path,
            stop=asyncio.Event(),
            ready=ready,
            on_progress=counts.append,
            reconnect_attempts=1,
        )
    )
    try:
        await asyncio.wait_for(ready.wait(), 10)
        await _publish_numbers(url, "probe.a", [1, 2])
        await eventually(lambda: counts[-1:] == [2])
        server.stop()  # and it does not come back
        with pytest.raises(RecordingInterruptedError) as interrupted:
            await asyncio.wait_for(recorder, 20)
    finally:
        if not recorder.done():
            recorder.cancel()
        server.stop()
    assert interrupted.value.recorded == 2
    assert f"the connection to {url} closed" in str(interrupted.value)
    assert f"2 messages were recorded to {path}" in str(interrupted.value)
    assert len(path.read_text().splitlines()) == 2
