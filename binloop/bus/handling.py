"""A durable count of the handling attempts that ended their process, per redelivered message.

Failures are counted in the process (`consume.FailureCounts`, so that not-ready retries do not
count), and a process that dies while handling (out of memory, a native crash, SIGKILL) counts
nothing: without a count kept outside it, the message would come back to the next process, and
the next, without end. So each handling attempt of a redelivered message is recorded in one
shared JetStream key-value bucket
(`binloop_handling`), under `<stream>.<consumer>.<stream sequence>`, whose value is the number of
attempts that started and never reached an outcome:

- before a redelivery is handled, its record is read: at `max_deliveries` the message is
  dead-lettered (`UnfinishedHandlingError`) instead of handled; below, this start is added.
  Without a record, one conditional write (create) both reads and records;
- when the attempt ends with an outcome, the record follows it: acked or dead-lettered, it is
  removed; naked (a failure, not ready, a stopping service), it goes back to the count before
  this start: a nak is no death, and the deaths before it still count;
- first deliveries are neither read nor recorded, so the hot path (the edge at 20 fps) does no
  extra I/O. A death on a first delivery is therefore noticed only from the second one on: a
  message that ends every process handling it is dead-lettered after `max_deliveries + 1`
  deaths, at its delivery `max_deliveries + 2`.

A stop is no death, whatever asked for it: a Job cut off by its activeDeadlineSeconds gets
SIGTERM first and stops, its handler cancelled and its message naked, which is not counted; only
a process killed before it could do that (its event loop stuck in native code, say) counts.

Records are removed by purging their subject (a KV delete would leave a marker behind for every
message ever retried); one whose outcome was never seen (its consumer deleted, a process that
died after the handler returned) ages out with the bucket's `max_age` of 7 days, far above any
ack wait (the trainer's is 600 s), so it still counts while the message can come back.

When the bucket cannot be read or written (the server slow or away, the bucket missing), handling
goes on as if there were no record, logged once until it works again: a crash loop meanwhile
goes on as it did before the record existed.
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
        "process, per <stream>.<consumer>.<stream sequence> (binloop/bus/handling.py)",
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
    revision: int | None
    """Of the record as last read or written here; None when the bucket holds none."""
    started: bool = False
    """This attempt is recorded (found + 1 in the bucket)."""


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

    async def check(self, msg: Msg, delivered: int) -> int:
        """How many handling attempts of `msg` ended their process before this delivery: 0
        for a first delivery, without any I/O. When the bucket has no record, this start is
        recorded already (the same write); otherwise `start` records it."""
        if delivered < 2:
            return 0
        key = message_key(msg)
        if key is None:
            return 0
        record = _Record(record_key(key), found=0, revision=None)
        try:
            kv = await self._bucket()
            try:
                record.revision = await kv.create(record.key, b"1")
                record.started = True
            except KeyWrongLastSequenceError:
                entry = await kv.get(record.key)
                record.found, record.revision = _count(entry.value), entry.revision
        except (NatsError, TimeoutError) as exc:
            self._lost(exc)
            return 0
        self._back()
        self._open[key] = record
        self._open.move_to_end(key)
        while len(self._open) > self._capacity:  # outcomes never seen (a dead-letter publish
            self._open.popitem(last=False)  # that failed): the bucket's TTL ends those
        return record.found

    async def start(self, msg: Msg) -> None:
        """Records that handling `msg` starts now (once per attempt; nothing for a message
        `check` did not read)."""
        record = self._record(msg, pop=False)
        if record is None or record.started:
            return
        try:
            kv = await self._bucket()
            record.revision = await kv.update(
                record.key, str(record.found + 1).encode(), last=record.revision or 0
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

    async def finish(self, msg: Msg, *, final: bool) -> None:
        """The attempt on `msg` ended with an outcome. `final` (acked, dead-lettered): the
        record goes. Otherwise (naked: a failure, not ready, a stop) it goes back to the count
        before this start. Never raises for the bus: the outcome matters more."""
        record = self._record(msg, pop=True)
        if record is None or record.revision is None or not (final or record.started):
            return
        try:
            if final or record.found == 0:
                js = await self._jetstream()
                await js.purge_stream(BUCKET_STREAM, subject=f"$KV.{BUCKET}.{record.key}")
            else:
                kv = await self._bucket()
                await kv.update(record.key, str(record.found).encode(), last=record.revision)
        except KeyWrongLastSequenceError:
            return  # another process's attempt wrote it since: its record stands
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


def _count(value: bytes | None) -> int:
    try:
        return max(0, int((value or b"0").decode("ascii")))
    except (UnicodeDecodeError, ValueError):  # not written by binloop: no deaths known
        return 0
