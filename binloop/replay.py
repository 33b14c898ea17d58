"""Record bus traffic to a JSON-lines file and replay it later, with its original timing.

One line per message: {"t": seconds since the first message, "subject", "headers", "data": the
JSON payload}. With frames embedded, frames.captured lines also carry "frame_b64" (the JPEG
bytes), so the file is self-contained and the frame-ingestor can replay it on another machine.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import json
import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import nats
from nats.aio.client import Client as NatsClient
from nats.aio.msg import Msg
from nats.errors import NoServersError
from nats.js.errors import NoStreamResponseError
from pydantic import ValidationError

from binloop.errors import BinloopError, PermanentError
from binloop.storage import LocalBlobStore, sha256_hex
from schemas.base import read_json
from schemas.events import FrameCaptured
from schemas.routes import FRAMES_CAPTURED, route_for_subject

log = logging.getLogger(__name__)


class RecordingInterruptedError(BinloopError):
    """The connection of `binloop record` closed for good (its reconnect attempts ran out):
    the file holds what was recorded until then."""

    def __init__(self, nats_url: str, path: Path, recorded: int, cause: str) -> None:
        super().__init__(
            f"the connection to {nats_url} closed ({cause}); {recorded} messages were "
            f"recorded to {path} before"
        )
        self.recorded = recorded


@dataclass(frozen=True)
class RecordedMessage:
    """One line of a replay file, checked for shape (the payload is not validated here)."""

    line: int
    t: float
    subject: str
    headers: dict[str, str]
    data: dict[str, Any]
    frame: bytes | None = None


@dataclass
class ReplayStats:
    """What a pass over a replay file found; bad lines are skipped, never fatal."""

    messages: int = 0
    bad_lines: int = 0
    problems: list[str] = field(default_factory=list)
    on_bad_line: Callable[[str], None] | None = None
    """Called with the message instead of logging it, for callers that count and log."""

    def skip(self, path: Path, line: int, reason: str) -> None:
        self.bad_lines += 1
        message = f"{path}:{line}: {reason}; line skipped"
        if len(self.problems) < 100:
            self.problems.append(message)
        if self.on_bad_line is not None:
            self.on_bad_line(message)
        else:
            log.warning("replay file %s", message)


def _parse_line(text: str, line: int) -> RecordedMessage:
    """Raises ValueError with a human reason when the line is not a recorded message."""
    try:
        raw = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValueError(f"not JSON ({exc.msg} at column {exc.colno})") from exc
    if not isinstance(raw, dict):
        raise ValueError(f"expected a JSON object, got {type(raw).__name__}")
    t, subject, headers, data = (
        raw.get("t"),
        raw.get("subject"),
        raw.get("headers"),
        raw.get("data"),
    )
    if isinstance(t, bool) or not isinstance(t, int | float) or t < 0:
        raise ValueError(f'"t" must be a number of seconds >= 0, got {t!r}')
    if not isinstance(subject, str) or not subject or " " in subject:
        raise ValueError(f'"subject" must be a non-empty subject without spaces, got {subject!r}')
    if headers is None:
        headers = {}
    if not isinstance(headers, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in headers.items()
    ):
        raise ValueError('"headers" must be an object of strings')
    if not isinstance(data, dict):
        raise ValueError(f'"data" must be a JSON object, got {type(data).__name__}')
    frame: bytes | None = None
    encoded = raw.get("frame_b64")
    if encoded is not None:
        if not isinstance(encoded, str):
            raise ValueError('"frame_b64" must be a base64 string')
        try:
            frame = base64.b64decode(encoded, validate=True)
        except binascii.Error as exc:
            raise ValueError(f'"frame_b64" is not valid base64 ({exc})') from exc
    return RecordedMessage(line, float(t), subject, dict(headers), data, frame)


def iter_replay_file(path: Path, stats: ReplayStats | None = None) -> Iterator[RecordedMessage]:
    """The messages of a replay file in order. Bad lines are skipped with a warning that names
    the line, and counted in `stats`."""
    counts = stats if stats is not None else ReplayStats()
    with path.open(encoding="utf-8", errors="replace") as handle:
        for number, text in enumerate(handle, start=1):
            if not text.strip():
                continue
            try:
                message = _parse_line(text, number)
            except ValueError as exc:
                counts.skip(path, number, str(exc))
                continue
            counts.messages += 1
            yield message


def replay_delay(t: float, speed: float, elapsed: float) -> float:
    """Seconds to wait before sending a message recorded `t` s after the first, when `elapsed`
    seconds have passed since the replay began. Measured from one start, so no drift builds up."""
    if speed <= 0:
        return 0.0
    return max(0.0, t / speed - elapsed)


def _embedded_frame(spool: LocalBlobStore, data: dict[str, Any]) -> bytes:
    """The spooled JPEG a frames.captured payload points at, checked against its sha256."""
    try:
        event = read_json(FrameCaptured, data)
    except ValidationError as exc:
        raise ValueError(
            f"payload is not a valid FrameCaptured ({exc.error_count()} errors)"
        ) from exc
    frame = spool.get(event.spool.key)
    actual = sha256_hex(frame)
    if actual != event.frame_sha256:
        raise ValueError(f"spooled frame hashes to {actual}, event says {event.frame_sha256}")
    return frame


class _Recorder:
    def __init__(self, out: IO[str], embed_frames_from: Path | None) -> None:
        self.out = out
        self.spool = LocalBlobStore(embed_frames_from) if embed_frames_from else None
        self.first: float | None = None
        self.written = 0
        self.skipped = 0

    async def write(self, received_at: float, msg: Msg) -> None:
        try:
            data = json.loads(msg.data)
        except (UnicodeDecodeError, json.JSONDecodeError):
            data = None
        if not isinstance(data, dict):
            self.skipped += 1
            log.warning(
                "record: %s carried %d bytes that are not a JSON object; not recorded",
                msg.subject,
                len(msg.data),
            )
            return
        if self.first is None:
            self.first = received_at
        headers = {k: v for k, v in (msg.headers or {}).items() if isinstance(v, str)}
        line: dict[str, Any] = {
            "t": round(received_at - self.first, 6),
            "subject": msg.subject,
            "headers": headers,
            "data": data,
        }
        if self.spool is not None and route_for_subject(msg.subject) is FRAMES_CAPTURED:
            try:
                frame = await asyncio.to_thread(_embedded_frame, self.spool, data)
            except (ValueError, OSError, PermanentError) as exc:
                # The message is still recorded: a replay without the frame beats none.
                log.warning("record: frame of %s not embedded: %s", msg.subject, exc)
            else:
                line["frame_b64"] = base64.b64encode(frame).decode("ascii")
        self.out.write(json.dumps(line, separators=(",", ":")) + "\n")
        self.written += 1


async def _next_message(
    inbox: asyncio.Queue[tuple[float, Msg]], *ends: asyncio.Event
) -> tuple[float, Msg] | None:
    """The next message that arrived, or None once one of `ends` is set."""
    if any(end.is_set() for end in ends):
        return None
    getter = asyncio.ensure_future(inbox.get())
    enders = [asyncio.ensure_future(end.wait()) for end in ends]
    try:
        await asyncio.wait({getter, *enders}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for ender in enders:
            ender.cancel()
        if not getter.done():
            getter.cancel()  # a cancelled Queue.get leaves its item in the queue
    return getter.result() if getter.done() and not getter.cancelled() else None


RECORD_CONNECT_TIMEOUT_S = 5.0
"""How long `record` tries to reach the server at the start before it reports it absent."""


async def _connect_for_recording(
    nats_url: str, reconnect_attempts: int, closed: asyncio.Event
) -> NatsClient:
    """A client that rides out server restarts and network blips (reconnecting a second apart,
    `reconnect_attempts` times per outage, -1: forever) and sets `closed` when it gives up.
    A server that is not there at the start is still reported within seconds."""
    client = NatsClient()

    async def quiet(_: Exception) -> None:
        return None  # every failed reconnect would log; disconnected/reconnected say enough

    async def disconnected() -> None:
        if client.is_reconnecting:  # not when closing, nor before the first connect
            log.warning(
                "record: lost the connection to %s; reconnecting (messages published "
                "meanwhile are not recorded)",
                nats_url,
            )

    async def reconnected() -> None:
        log.warning("record: reconnected to %s; recording again", nats_url)

    async def on_closed() -> None:
        closed.set()

    try:
        # With reconnect_attempts=-1 nats-py would try the first connect forever too.
        await asyncio.wait_for(
            client.connect(
                nats_url,
                connect_timeout=3,
                max_reconnect_attempts=reconnect_attempts,
                reconnect_time_wait=1,
                error_cb=quiet,
                disconnected_cb=disconnected,
                reconnected_cb=reconnected,
                closed_cb=on_closed,
            ),
            RECORD_CONNECT_TIMEOUT_S,
        )
    except TimeoutError as exc:
        await client.close()
        raise NoServersError from exc
    except BaseException:
        await client.close()
        raise
    return client


async def _let_go(client: NatsClient) -> None:
    """Drains a live connection (pending messages are delivered), closes one that is
    reconnecting, and leaves a closed one alone (drain() would raise)."""
    if client.is_closed:
        return
    if client.is_connected:
        await client.drain()
    else:
        await client.close()


async def record(
    nats_url: str,
    subjects: list[str],
    path: Path,
    *,
    embed_frames_from: Path | None = None,
    stop: asyncio.Event,
    max_messages: int | None = None,
    ready: asyncio.Event | None = None,
    on_progress: Callable[[int], None] = lambda _: None,
    reconnect_attempts: int = -1,
) -> int:
    """Write every message on `subjects` (core NATS) to `path` until `stop` is set or
    `max_messages` were written. `ready` is set once the subscriptions are in place;
    `on_progress` gets the count after each line. Returns the number of lines written.

    The connection survives server restarts: it reconnects a second apart, `reconnect_attempts`
    times per outage (-1: forever), and subscribes again; what is published while it is away
    is not recorded. When it gives up, what arrived is written and RecordingInterruptedError
    says how many messages the file holds."""
    if not subjects:
        raise ValueError("record needs at least one subject")
    closed = asyncio.Event()
    client = await _connect_for_recording(nats_url, reconnect_attempts, closed)
    inbox: asyncio.Queue[tuple[float, Msg]] = asyncio.Queue()

    async def on_msg(msg: Msg) -> None:
        # Stamped on arrival, not when written, so slow frame embedding does not skew timing.
        inbox.put_nowait((time.monotonic(), msg))

    try:
        for subject in subjects:
            await client.subscribe(subject, cb=on_msg)
        await client.flush()
        if ready is not None:
            ready.set()
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("w", encoding="utf-8") as out:
            recorder = _Recorder(out, embed_frames_from)

            def full() -> bool:
                return max_messages is not None and recorder.written >= max_messages

            while not full() and (received := await _next_message(inbox, stop, closed)) is not None:
                await recorder.write(*received)
                on_progress(recorder.written)
            # Stopped: what had already arrived is written too, what arrives now is not.
            for _ in range(inbox.qsize()):
                if full():
                    break
                await recorder.write(*inbox.get_nowait())
        if recorder.skipped:
            log.warning(
                "record: %d messages were not JSON objects and were left out", recorder.skipped
            )
        if closed.is_set() and not stop.is_set() and not full():
            error = client.last_error
            cause = (
                f"no server answered {reconnect_attempts} reconnect attempts"
                if error is None or isinstance(error, NoServersError)
                else str(error)
            )
            raise RecordingInterruptedError(nats_url, path, recorder.written, cause)
        return recorder.written
    finally:
        await _let_go(client)


@dataclass(frozen=True)
class ReplayOutcome:
    published: int
    """Messages JetStream acknowledged (duplicates included)."""
    duplicates: int
    bad_lines: int
    unroutable: int
    """Messages no stream stores (skipped)."""


async def connect(nats_url: str) -> NatsClient:
    """A client for a one-off command: a server that is not there is reported after a few
    seconds (NoServersError), without nats-py's error log on every try."""

    async def quiet(_: Exception) -> None:
        return None

    return await nats.connect(
        nats_url, connect_timeout=3, max_reconnect_attempts=1, reconnect_time_wait=1, error_cb=quiet
    )


async def replay(
    nats_url: str,
    path: Path,
    *,
    speed: float = 1.0,
    on_progress: Callable[[int], None] = lambda _: None,
) -> ReplayOutcome:
    """Publish every message of a replay file to JetStream again, `speed` times faster than
    recorded (0: as fast as possible). Nats-Msg-Id is kept, so replaying twice within the
    duplicate window stores each message once. `on_progress` gets the count published."""
    if speed < 0:
        raise ValueError(f"speed must be >= 0, got {speed}")
    client = await connect(nats_url)
    stats = ReplayStats()
    published = duplicates = unroutable = 0
    try:
        js = client.jetstream()
        started = time.monotonic()
        for message in iter_replay_file(path, stats):
            delay = replay_delay(message.t, speed, time.monotonic() - started)
            if delay > 0:
                await asyncio.sleep(delay)
            payload = json.dumps(message.data, separators=(",", ":")).encode()
            try:
                ack = await js.publish(message.subject, payload, headers=message.headers or None)
            except NoStreamResponseError:
                unroutable += 1
                log.warning(
                    "replay %s:%d: no stream stores %s; message skipped",
                    path,
                    message.line,
                    message.subject,
                )
                continue
            published += 1
            duplicates += bool(ack.duplicate)
            on_progress(published)
    finally:
        await client.drain()
    return ReplayOutcome(published, duplicates, stats.bad_lines, unroutable)
