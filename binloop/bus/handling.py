"""A durable count of the handling attempts that ended their process, or were cancelled by a
stop of it, per redelivered message.

Failures are counted in the process (`consume.FailureCounts`, so that not-ready retries do not
count), and a process that dies while handling (out of memory, a native crash, SIGKILL) counts
nothing: without a count kept outside it, the message would come back to the next process, and
the next, without end. So each handling attempt of a redelivered message is recorded in one
shared JetStream key-value bucket
(`binloop_handling`), under `<stream>.<consumer>.<stream sequence>`, whose value is the number of
attempts that started and never reached an outcome, then, once any were, the number cancelled
by a stop (`3`, or `1,2`: one death, two stops):

- before a redelivery is handled, its record is read: at `max_deliveries` deaths the message is
  dead-lettered (`UnfinishedHandlingError`), above `max_stops` stops (a dead letter a stop
  could not publish) too (`StoppedHandlingError`), instead of handled; otherwise this start is
  added. Without a record, one conditional write (create) both reads and records;
- when the attempt ends with an outcome, the record follows it: acked, it is removed; naked
  (a failure, not ready), it goes back to the count before this start: a nak is no death, and
  the deaths and stops before it still count;
- a message about to be dead-lettered (for any reason, on any delivery) is first marked so
  (`dead-lettered:<error type>`, one write on the dead-letter path only), then its dead letter
  published, then it is acked with the server's confirmation (`ack_sync`), and only then is
  its record removed. An ack that never reached the server (the connection dropped) brings
  the message back after its ack wait: its record says dead-lettered, so the same dead letter
  (the same event id) is published again and the message acked, without handling it
  (`DeadLetteredBeforeError`). JetStream drops that repeat by its id within the DLQ's
  duplicate window (24 h); a redelivery later than that (its consumer stopped for a day)
  leaves a second DLQ entry with the same event id. An unconfirmed ack leaves the record to
  age out;
- when a stop of the service cancels the handler, the deaths go back as for a nak and the
  stops go up by one. A stop is no death: every rollout or drain cancels what is in flight.
  But a handler that always outlasts the time its process is given (a trainer Job cut off by
  its activeDeadlineSeconds gets SIGTERM first, so it stops rather than dies) would otherwise
  be tried again by every process for ever: the stop after `max_stops` dead-letters it
  (`StoppedHandlingError`) instead of naking it;
- first deliveries are neither read nor recorded (but for the mark of a dead letter), so the
  hot path (the edge at 20 fps) does no extra I/O. A death on a first delivery is therefore
  noticed only from the second one on: a message that ends every process handling it is
  dead-lettered after `max_deliveries + 1` deaths, at its delivery `max_deliveries + 2`;
  likewise a stop of a first delivery is not counted, and a message whose handling every stop
  cancels is dead-lettered by its `max_stops + 2`-th stop.

A process killed before it could stop (its event loop stuck in native code, say) counts as a
death, not a stop.

Records are removed by purging their subject (a KV delete would leave a marker behind for every
message ever retried); one whose outcome was never seen (its consumer deleted, a process that
died after the handler returned) ages out with the bucket's `max_age` of 7 days, far above any
ack wait (the trainer's is 600 s), so it still counts while the message can come back.

When the bucket cannot be read or written (the server slow or away, the bucket missing), handling
goes on as if there were no record, logged once until it works again: a crash loop meanwhile
goes on as it did before the record existed, and a dead letter whose mark could not be written
and whose ack was lost is handled once more on its redelivery.

Releases before the dead-letter mark wrote only counts, which this one reads as before; they
read a mark as no record, so during a rolling update from one an old process may still handle
such a redelivery once more.
"""

from __future__ import annotations

import logging
import string
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

from nats.aio.client import Client as NatsClient
from nats.aio.msg import Msg
from nats.errors import Error as NatsError
from nats.js.api import KeyValueConfig, StorageType
from nats.js.client import JetStreamContext
from nats.js.errors import APIError, KeyWrongLastSequenceError, NotFoundError
from nats.js.kv import KeyValue

from binloop.errors import PermanentError

log = logging.getLogger(__name__)

BUCKET = "binloop_handling"
BUCKET_STREAM = f"KV_{BUCKET}"
RECORD_TTL_S = 7 * 24 * 3600.0
"""How long a record outlives its last write: far above the longest ack wait (600 s)."""
KV_TIMEOUT_S = 2.0
"""How long one read or write may take before the record counts as unavailable."""

MessageKey = tuple[str, str, int]
"""(stream, consumer, stream sequence): one message as one consumer sees it."""


class UnfinishedHandlingError(PermanentError):
    """Handling the message ended the process (killed or crashed) too often: it is
    dead-lettered without being handled again."""

    def __init__(self, count: int) -> None:
        super().__init__(
            f"handling ended the process {count} times without an outcome (killed or crashed: "
            "out of memory, a native crash, SIGKILL); not handled again"
        )
        self.count = count


class StoppedHandlingError(PermanentError):
    """Stops of the service cancelled handling the message too often (its handling may always
    outlast the time its process is given): it is dead-lettered instead of naked again."""

    def __init__(self, count: int, limit: int) -> None:
        super().__init__(
            f"handling was stopped {count} times without an outcome (its service stopped: "
            f"SIGTERM from a deploy, a drain or a Job's activeDeadlineSeconds; a stop of its "
            f"first delivery is not counted), more than max_stops={limit}; not handled again"
        )
        self.count = count
        self.limit = limit


class DeadLetteredBeforeError(PermanentError):
    """An earlier delivery of the message was dead-lettered (or set out to be), and its ack did
    not reach the server: the same dead letter is published again instead of handling it."""

    def __init__(self, error_type: str) -> None:
        super().__init__(
            f"dead-lettered by an earlier delivery ({error_type}) whose ack was not confirmed; "
            "not handled again"
        )
        self.error_type = error_type


@dataclass(frozen=True)
class EarlierAttempts:
    """What a message's record says about its handling attempts before this delivery."""

    ended: int = 0
    """Attempts that ended their process (deaths)."""
    stopped: int = 0
    """Attempts cancelled by a stop of their service."""
    dead_lettered: str | None = None
    """The error type of the dead letter an earlier delivery published (or set out to)."""


def message_key(msg: Msg) -> MessageKey | None:
    """None for a message without JetStream metadata (core NATS)."""
    try:
        metadata = msg.metadata
        return (metadata.stream, metadata.consumer, int(metadata.sequence.stream))
    except (NatsError, AttributeError, ValueError, TypeError, IndexError):
        return None


_KEY_SAFE = frozenset(string.ascii_letters + string.digits + "-_")


def _escape(name: str) -> str:
    """KV keys allow [-/_=.a-zA-Z0-9]; anything else (and `=` itself) as =XX per UTF-8 byte."""
    return "".join(
        char if char in _KEY_SAFE else "".join(f"={byte:02X}" for byte in char.encode())
        for char in name
    )


def record_key(key: MessageKey) -> str:
    """`<stream>.<consumer>.<stream sequence>`, e.g. `ENGINE.trainer.42`."""
    stream, consumer, sequence = key
    return f"{_escape(stream)}.{_escape(consumer)}.{sequence}"


def bucket_config(replicas: int = 1) -> KeyValueConfig:
    return KeyValueConfig(
        bucket=BUCKET,
        description="binloop: handling attempts of redelivered messages that ended their "
        "process or were stopped, per <stream>.<consumer>.<stream sequence> "
        "(binloop/bus/handling.py)",
        history=1,
        ttl=RECORD_TTL_S,
        max_value_size=64,
        storage=StorageType.FILE,
        replicas=replicas,
        direct=True,
    )


async def ensure_bucket(js: JetStreamContext, replicas: int = 1) -> None:
    """Creates the bucket with `replicas` copies, or brings an existing one up to them (never
    down, as for the streams) and to the record TTL of this release."""
    try:
        info = await js.stream_info(BUCKET_STREAM)
    except NotFoundError:
        try:
            await js.create_key_value(bucket_config(replicas))
            return
        except APIError:  # another process created it meanwhile, with other settings
            info = await js.stream_info(BUCKET_STREAM)
    config = info.config
    wanted = config.evolve(
        num_replicas=max(config.num_replicas or 1, replicas), max_age=RECORD_TTL_S
    )
    if wanted != config:
        await js.update_stream(wanted)


@dataclass
class _Record:
    key: str
    """The KV key."""
    found: int
    """Attempts that ended the process before this delivery."""
    stops: int
    """Attempts cancelled by a stop before this delivery."""
    revision: int | None
    """Of the record as last read or written here; None when the bucket holds none."""
    started: bool = False
    """This attempt is recorded (found + 1 in the bucket)."""
    dead_lettered: str | None = None
    """The bucket marks the message dead-lettered, with this error type."""


class UnfinishedStarts:
    """The records (see the module) of the messages one consumer is handling. What it reads
    and writes goes through the connection `connection()` returns at the time (a broker
    stopped and connected again has a new one)."""

    def __init__(
        self, consumer: str, connection: Callable[[], NatsClient], capacity: int = 4096
    ) -> None:
        self._consumer = consumer
        self._connection = connection
        self._capacity = capacity
        self._open: OrderedDict[MessageKey, _Record] = OrderedDict()
        self._js: JetStreamContext | None = None
        self._kv: KeyValue | None = None
        self._kv_connection: NatsClient | None = None
        self._unavailable = False

    def __len__(self) -> int:
        """Messages read here whose attempt has no outcome yet."""
        return len(self._open)

    async def check(self, msg: Msg, delivered: int) -> EarlierAttempts:
        """How many handling attempts of `msg` ended their process, or were stopped, before
        this delivery: none for a first delivery, without any I/O. When the bucket has no
        record, this start is recorded already (the same write); otherwise `start` records it."""
        if delivered < 2:
            return EarlierAttempts()
        key = message_key(msg)
        if key is None:
            return EarlierAttempts()
        record = _Record(record_key(key), found=0, stops=0, revision=None)
        try:
            kv = await self._bucket()
            try:
                record.revision = await kv.create(record.key, _value(1, 0))
                record.started = True
            except KeyWrongLastSequenceError:
                entry = await kv.get(record.key)
                record.found, record.stops, record.dead_lettered = _parse(entry.value)
                record.revision = entry.revision
        except (NatsError, TimeoutError) as exc:
            self._lost(exc)
            return EarlierAttempts()
        self._back()
        self._open[key] = record
        self._open.move_to_end(key)
        while len(self._open) > self._capacity:  # outcomes never seen (a dead-letter publish
            self._open.popitem(last=False)  # that failed): the bucket's TTL ends those
        return EarlierAttempts(record.found, record.stops, record.dead_lettered)

    async def start(self, msg: Msg) -> None:
        """Records that handling `msg` starts now (once per attempt; nothing for a message
        `check` did not read)."""
        record = self._record(msg, pop=False)
        if record is None or record.started:
            return
        try:
            kv = await self._bucket()
            record.revision = await kv.update(
                record.key, _value(record.found + 1, record.stops), last=record.revision or 0
            )
        except KeyWrongLastSequenceError:
            # Written meanwhile by another process handling it too (an ack wait ran out): its
            # record stands, and this attempt goes unrecorded rather than overwrite it.
            log.info("%s: record %s changed under this attempt", self._consumer, record.key)
            return
        except (NatsError, TimeoutError) as exc:
            self._lost(exc)
            return
        self._back()
        record.started = True

    def stops(self, msg: Msg) -> int | None:
        """Stops recorded for `msg` before this attempt; None when it has no record open here
        (a first delivery, or the bucket unavailable): its stop would not be counted."""
        record = self._record(msg, pop=False)
        return None if record is None or not record.started else record.stops

    async def finish(self, msg: Msg, *, final: bool, stopped: bool = False) -> None:
        """The attempt on `msg` ended with an outcome. `final` (acked, dead-lettered): the
        record goes. Otherwise (naked: a failure, not ready, a stop) its deaths go back to the
        count before this start, and `stopped` (a stop cancelled the handler) adds a stop.
        Never raises for the bus: the outcome matters more."""
        record = self._record(msg, pop=True)
        if record is None or record.revision is None or not (final or record.started):
            return
        stops = record.stops + int(stopped)
        try:
            if final or (record.found, stops) == (0, 0):
                js = await self._jetstream()
                await js.purge_stream(BUCKET_STREAM, subject=f"$KV.{BUCKET}.{record.key}")
            else:
                kv = await self._bucket()
                await kv.update(record.key, _value(record.found, stops), last=record.revision)
        except KeyWrongLastSequenceError:
            return  # another process's attempt wrote it since: its record stands
        except (NatsError, TimeoutError) as exc:
            self._lost(exc)
            return
        self._back()

    async def dead_lettering(self, msg: Msg, error_type: str) -> str | None:
        """Marks `msg` dead-lettered before its dead letter is published (one write, unless
        its record says so already), so that a redelivery after a lost ack is not handled.
        Returns the record's key, for `remove` once the ack is confirmed; None when there is
        nothing to remove (no JetStream metadata, or the bucket unavailable: the record, if
        any, ages out)."""
        record = self._record(msg, pop=True)
        if record is not None and record.dead_lettered is not None:
            return record.key
        key = message_key(msg)
        if key is None:
            return None
        try:
            kv = await self._bucket()
            await kv.put(record_key(key), _dead_value(error_type))
        except (NatsError, TimeoutError) as exc:
            self._lost(exc)
            return None
        self._back()
        return record_key(key)

    async def remove(self, key: str) -> None:
        """Removes the record under `key` (its message is acked). Never raises for the bus."""
        try:
            js = await self._jetstream()
            await js.purge_stream(BUCKET_STREAM, subject=f"$KV.{BUCKET}.{key}")
        except (NatsError, TimeoutError) as exc:
            self._lost(exc)
            return
        self._back()

    def _record(self, msg: Msg, *, pop: bool) -> _Record | None:
        if not self._open:  # the hot path: nothing redelivered in flight
            return None
        key = message_key(msg)
        if key is None:
            return None
        return self._open.pop(key, None) if pop else self._open.get(key)

    async def _jetstream(self) -> JetStreamContext:
        await self._bucket()
        assert self._js is not None
        return self._js

    async def _bucket(self) -> KeyValue:
        connection = self._connection()
        if self._kv is None or self._kv_connection is not connection:
            js = connection.jetstream(timeout=KV_TIMEOUT_S)
            self._kv = await js.key_value(BUCKET)
            self._js, self._kv_connection = js, connection
        return self._kv

    def _lost(self, error: BaseException) -> None:
        if not self._unavailable:
            self._unavailable = True
            log.warning(
                "%s: the record of handling attempts (KV bucket %s) is unavailable (%r): "
                "redelivered messages are handled without it, so one that ends the process "
                "is not counted until it is back",
                self._consumer,
                BUCKET,
                error,
            )

    def _back(self) -> None:
        if self._unavailable:
            self._unavailable = False
            log.info("%s: the record of handling attempts is available again", self._consumer)


def _value(ended: int, stopped: int) -> bytes:
    """`ended`, or `ended,stopped` once a stop is counted (what releases before stops were
    counted wrote and read)."""
    return (f"{ended},{stopped}" if stopped else str(ended)).encode()


_DEAD_LETTERED = "dead-lettered:"
_ERROR_TYPE_CHARS = 48
"""Of an error type in a dead-letter mark: with the prefix, within the bucket's 64 bytes."""


def _dead_value(error_type: str) -> bytes:
    """The mark of a message being dead-lettered (never a number: see `_parse`)."""
    name = error_type.encode("ascii", errors="replace").decode("ascii")
    return f"{_DEAD_LETTERED}{name[:_ERROR_TYPE_CHARS]}".encode()


def _parse(value: bytes | None) -> tuple[int, int, str | None]:
    """(ended, stopped, dead-lettered error type) from `_value`'s or `_dead_value`'s bytes."""
    try:
        text = (value or b"0").decode("ascii")
        if text.startswith(_DEAD_LETTERED):
            return 0, 0, text.removeprefix(_DEAD_LETTERED) or "unknown"
        ended, _, stopped = text.partition(",")
        return max(0, int(ended)), max(0, int(stopped or "0")), None
    except (UnicodeDecodeError, ValueError):  # not written by binloop: nothing known
        return 0, 0, None
