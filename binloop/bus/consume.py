"""JetStream pull consumers with explicit acks, retries and a dead-letter subject.

What happens to each delivered message:
- it does not parse or validate as the route's model -> DeadLetter event, ack (never retried);
- the handler raises PermanentError -> DeadLetter, ack;
- the handler raises anything else (TransientError, a bug, a server that is down) -> nak with a
  delay; when that message has failed `max_deliveries` times -> DeadLetter, ack. Nothing is
  dropped silently. NotReadyError (the service cannot work yet, the message is fine) is
  retried without limit and is not a failure;
- the handler returns events -> they are published, then the input is acked. Their event_ids
  are derived from the input's, so when a crash in between redelivers the input, JetStream
  drops the repeated outputs by Nats-Msg-Id (within the streams' duplicate window).

A message fetched but not acked (the process died, or stopped mid-fetch) comes back after
`ack_wait_s`; long handlers keep theirs alive with in-progress acks, so it can stay short.

Failures are counted in the process (`FailureCounts`), not read from JetStream's delivery
count: that one also counts not-ready naks, the nak a stopping service sends and redeliveries
after a crash, so after a not-ready period the first real failure would be the last. A count
in memory starts again when the process does (or on another replica), so JetStream's count
still ends it at `RetryPolicy.delivery_backstop`, far above any `max_deliveries`: a message
that fails at that delivery is dead-lettered whatever the process counted.

A process that dies while handling (out of memory, a native crash, SIGKILL) counts nothing
itself, so the handling attempts of redelivered messages are recorded outside it
(`binloop/bus/handling.py`): a message whose handling ended the process `max_deliveries`
times (not counting a death on its first delivery, which is not recorded, to keep the hot
path free of I/O) is dead-lettered (`UnfinishedHandlingError`) instead of handled again. A
batch consumer handles a redelivered message that ended a process before on its own, so the
one that kills its batch does not take its batch-mates to the dead-letter subject with it.

A stop of the service (SIGTERM) cancels the handlers still running after the graceful wait and
naks their messages: no failure and no death, but counted in the same record, since a handler
that always outlasts its process's time (a trainer Job's activeDeadlineSeconds) would otherwise
be tried by every process for ever. The stop after `max_stops` counted ones (again not counting
a first delivery's) dead-letters the message (`StoppedHandlingError`) instead of naking it.

A dead-lettered message is marked so in the same record before its dead letter is published,
and the record removed only once the server confirmed the ack: when the ack is lost (the
connection dropped), the redelivery publishes the same dead letter again (dropped by its id)
and is acked, without being handled (`DeadLetteredBeforeError`); unless the bucket was
unavailable for the mark, when it is handled once more, as before the mark existed.

Hot subjects use `subscribe_batch`: one fetch of up to N messages, one validation pass, one
handler call for the whole batch.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from dataclasses import dataclass, replace
from functools import partial
from typing import Annotated, Any, Generic, TypeVar

from faststream import Context
from faststream.message import StreamMessage
from faststream.middlewares import AckPolicy
from faststream.nats import ConsumerConfig, DeliverPolicy, JStream, NatsBroker, PullSub
from faststream.nats.message import NatsBatchMessage
from nats.aio.msg import Msg
from nats.errors import Error as NatsError
from pydantic import ValidationError

from binloop.bus import outages
from binloop.bus.handling import (
    DeadLetteredBeforeError,
    EarlierAttempts,
    MessageKey,
    StoppedHandlingError,
    UnfinishedHandlingError,
    UnfinishedStarts,
    message_key,
)
from binloop.bus.publish import MSG_ID_HEADER, Outgoing, PendingAcks, Publisher
from binloop.errors import NotReadyError, PermanentError, TransientError
from binloop.observability import metrics
from binloop.settings import ServiceSettings
from schemas.base import Event, read_json
from schemas.events import DeadLetter
from schemas.routes import DLQ, Route

log = logging.getLogger(__name__)

E = TypeVar("E", bound=Event)
PREVIEW_BYTES = 4096


@dataclass(frozen=True)
class Delivery(Generic[E]):
    event: E
    subject: str
    attempt: int


EventHandler = Callable[[Delivery[E]], Awaitable[Sequence[Outgoing]]]
BatchHandler = Callable[[list[Delivery[E]]], Awaitable[Sequence[Outgoing]]]


@dataclass(frozen=True)
class RetryPolicy:
    max_deliveries: int = 5
    """Failures of one message (in this process) before it is dead-lettered; also the handling
    attempts of a redelivered message that ended their process (counted durably) before it
    is dead-lettered instead of handled again."""
    retry_delay_s: float = 2.0
    delivery_backstop: int = 1000
    """JetStream deliveries of a message at which its next failure is its last, for failures
    spread over restarts. Large: not-ready retries (every retry_delay_s while a service waits
    for a model or a store) count here too."""
    max_stops: int = ServiceSettings.model_fields["max_stops"].default
    """Stops of the service that may cancel the handling of one message (counted durably,
    from its second delivery); the next dead-letters it (the setting's description argues
    the default)."""


class FailureCounts:
    """How often each message a consumer is retrying has failed, for at most `capacity`
    messages: beyond that the least recently failed is forgotten (and starts from 0 if it
    fails again), so a flood of failing messages cannot grow the process."""

    def __init__(self, capacity: int = 4096) -> None:
        if capacity < 1:
            raise ValueError(f"the capacity must be >= 1, got {capacity}")
        self._capacity = capacity
        self._counts: OrderedDict[MessageKey, int] = OrderedDict()

    def add(self, key: MessageKey) -> int:
        """Counts one more failure of `key`; returns its failures so far."""
        count = self._counts.pop(key, 0) + 1
        self._counts[key] = count
        while len(self._counts) > self._capacity:
            self._counts.popitem(last=False)
        return count

    def forget(self, key: MessageKey | None) -> None:
        if key is not None:
            self._counts.pop(key, None)

    def __len__(self) -> int:
        return len(self._counts)


def derive_event_ids(cause: Event, outgoing: Sequence[Outgoing]) -> list[Outgoing]:
    """Replaces each output's random (uuid4) event_id by one derived from the input's, so
    handling a redelivered message again publishes the same ids and JetStream drops the
    repeats (Nats-Msg-Id). Ids a handler chose deterministically itself (uuid5, e.g. "the
    label of this frame") say more than "caused by this input" and are kept."""
    return [
        item
        if item.event.event_id.version != 4
        else replace(
            item,
            event=item.event.model_copy(
                update={"event_id": uuid.uuid5(cause.event_id, f"{item.route.name}#{index}")}
            ),
        )
        for index, item in enumerate(outgoing)
    ]


_DEAD_LETTER_NAMESPACE = uuid.UUID("3b8f5a52-2d0e-4c77-9f55-8e0b9c1d7a13")


def dead_letter_id(service: str, msg: Msg) -> uuid.UUID:
    """The same message dead-lettered twice by the same consumer (a crash between the DLQ
    publish and the ack redelivers it) gets the same id, so JetStream keeps one entry; other
    consumers of it (another bin's durable) get their own. A message without JetStream
    metadata gets a random id."""
    try:
        metadata = msg.metadata
        where = f"{service}|{metadata.stream}|{metadata.consumer}|{metadata.sequence.stream}"
    except (NatsError, AttributeError, ValueError, TypeError, IndexError):  # core NATS: none
        return uuid.uuid4()
    return uuid.uuid5(_DEAD_LETTER_NAMESPACE, where)


def _attempt(msg: Msg) -> int:
    try:
        return int(msg.metadata.num_delivered)
    except (AttributeError, ValueError, TypeError):
        return 1


class _Consumer(Generic[E]):
    """Turns raw JetStream messages into typed deliveries and applies the policy above."""

    def __init__(
        self, publisher: Publisher, route: Route, policy: RetryPolicy, ack_wait_s: float
    ) -> None:
        self.publisher = publisher
        self.route = route
        self.policy = policy
        self.ack_wait_s = ack_wait_s
        self.service = publisher.service
        self.failures = FailureCounts()
        self.starts = UnfinishedStarts(f"{self.service}:{route.name}", lambda: publisher.connection)

    def decode(
        self, msgs: list[Msg]
    ) -> tuple[list[tuple[Msg, Delivery[E]]], list[tuple[Msg, Exception]]]:
        good: list[tuple[Msg, Delivery[E]]] = []
        bad: list[tuple[Msg, Exception]] = []
        model: Any = self.route.model
        for msg in msgs:
            try:
                event = read_json(model, msg.data)
            except ValidationError as exc:
                bad.append((msg, exc))
            else:
                good.append(
                    (msg, Delivery(event=event, subject=msg.subject, attempt=_attempt(msg)))
                )
        return good, bad

    async def dead_letter(self, msg: Msg, error: BaseException) -> None:
        """Publishes the DeadLetter, then acks. The message is marked dead-lettered first and
        its record removed only after the server confirmed the ack: a lost ack brings it back
        to `begin` or `triage`, which dead-letter it again instead of handling it."""
        again = isinstance(error, DeadLetteredBeforeError)
        error_type = (
            error.error_type if isinstance(error, DeadLetteredBeforeError) else type(error).__name__
        )
        headers = {k: v for k, v in (msg.headers or {}).items() if isinstance(v, str)}
        entry = DeadLetter(
            event_id=dead_letter_id(self.service, msg),
            producer=self.publisher.producer,
            service=self.service,
            original_subject=msg.subject,
            error_type=error_type,
            error=str(error)[:4096],
            payload_preview=msg.data[:PREVIEW_BYTES].decode("utf-8", errors="replace"),
            payload_size=len(msg.data),
            headers=headers,
            delivery_attempt=_attempt(msg),
        )
        record = await self.starts.dead_lettering(msg, error_type)
        await self.publisher.publish(DLQ, entry, self.service)
        if await self.ack_confirmed(msg) and record is not None:
            await self.starts.remove(record)
        self.failures.forget(message_key(msg))
        if not again:  # its dead letter is counted once, whatever came back
            metrics.DEAD_LETTERS.labels(self.service, self.route.name, error_type).inc()
        log.warning(
            "%s: dead-lettered a message from %s (%s: %s)",
            self.service,
            msg.subject,
            error_type,
            str(error)[:300],
        )

    async def ack_confirmed(self, msg: Msg) -> bool:
        """Acks `msg` and waits for the server to confirm it. False when no confirmation came
        (the connection dropped, the server slow): the ack may be lost, and then the message
        comes back after its ack wait."""
        try:
            await msg.ack_sync(timeout=self.publisher.ack_timeout_s)
        except NatsError as exc:  # nats-py's TimeoutError too
            log.warning(
                "%s: the ack of a dead-lettered message from %s was not confirmed (%r); if it "
                "comes back, it is dead-lettered again without being handled",
                self.service,
                msg.subject,
                exc,
            )
            return False
        return True

    async def fail(self, msg: Msg, error: BaseException) -> None:
        if isinstance(error, PermanentError):
            await self.dead_letter(msg, error)
            return
        delivered = _attempt(msg)
        if isinstance(error, NotReadyError):
            failed = "not ready"
        else:
            key = message_key(msg)
            failures = delivered if key is None else self.failures.add(key)
            if failures >= self.policy.max_deliveries or delivered >= self.policy.delivery_backstop:
                await self.dead_letter(msg, error)
                return
            failed = f"failure {failures} of {self.policy.max_deliveries}"
        await self.starts.finish(msg, final=False)
        metrics.MESSAGES_RETRIED.labels(self.service, self.route.name, type(error).__name__).inc()
        log.info(
            "%s: will retry a message from %s in %.1fs (%s, delivery %d: %s)",
            self.service,
            msg.subject,
            self.policy.retry_delay_s,
            failed,
            delivered,
            error,
        )
        await msg.nak(delay=self.policy.retry_delay_s)

    async def keep_alive(self, msgs: list[Msg]) -> None:
        """Long handlers (training) tell JetStream they are still working on the message."""
        while True:
            await asyncio.sleep(self.ack_wait_s / 3)
            for msg in msgs:
                try:
                    await msg.in_progress()
                except NatsError as exc:
                    # A beat lost (the connection is reconnecting): the handler goes on, and
                    # the next beat may still come within the ack wait.
                    log.info("%s: in-progress ack not sent (%r)", self.service, exc)

    def unhandleable(self, earlier: EarlierAttempts) -> PermanentError | None:
        """Why a redelivery is dead-lettered unhandled, if it is: it was dead-lettered before
        (its ack lost), its handling ended the process too often, or stops cancelled it more
        often than allowed (a stop whose dead letter was not published)."""
        if earlier.dead_lettered is not None:
            return DeadLetteredBeforeError(earlier.dead_lettered)
        if earlier.ended >= self.policy.max_deliveries:
            return UnfinishedHandlingError(earlier.ended)
        if earlier.stopped > self.policy.max_stops:
            return StoppedHandlingError(earlier.stopped, self.policy.max_stops)
        return None

    async def begin(self, msg: Msg, delivered: int) -> bool:
        """Before a delivery is handled on its own: False when its handling ended the process
        or was stopped too often and it was dead-lettered instead; otherwise this attempt is
        recorded (for a redelivery) and it is to be handled."""
        try:
            earlier = await self.starts.check(msg, delivered)
            if (reason := self.unhandleable(earlier)) is not None:
                await self.dead_letter(msg, reason)
                return False
            await self.starts.start(msg)
        except BaseException:  # a stop, or the dead letter not published: back it goes
            await asyncio.shield(self.hand_back(msg))
            raise
        return True

    async def triage(
        self, good: list[tuple[Msg, Delivery[E]]]
    ) -> tuple[list[tuple[Msg, Delivery[E]]], list[tuple[Msg, Delivery[E]]]]:
        """Splits a batch into what is handled together (its start recorded) and the
        redeliveries whose handling ended a process before, to be handled one at a time (each
        after `start_alone`), those that ended it least often first; dead-letters those that
        ended it, or were stopped, too often."""
        if all(delivery.attempt < 2 for _, delivery in good):
            return good, []  # the hot path: no I/O
        together: list[tuple[Msg, Delivery[E]]] = []
        alone: list[tuple[int, Msg, Delivery[E]]] = []
        try:
            earlier = await asyncio.gather(
                *(self.starts.check(msg, delivery.attempt) for msg, delivery in good)
            )
            for (msg, delivery), attempts in zip(good, earlier, strict=True):
                if (reason := self.unhandleable(attempts)) is not None:
                    await self.dead_letter(msg, reason)
                elif attempts.ended:
                    alone.append((attempts.ended, msg, delivery))
                else:
                    together.append((msg, delivery))
            await asyncio.gather(*(self.starts.start(msg) for msg, _ in together))
        except BaseException:  # a stop, or a dead letter not published: the batch goes back
            await asyncio.shield(asyncio.gather(*(self.hand_back(msg) for msg, _ in good)))
            raise
        alone.sort(key=lambda item: item[0])
        return together, [(msg, delivery) for _, msg, delivery in alone]

    async def start_alone(self, msg: Msg) -> None:
        """Records the start of a message `triage` set aside, right before it is handled."""
        try:
            await self.starts.start(msg)
        except asyncio.CancelledError:
            await asyncio.shield(self.hand_back(msg))
            raise

    async def hand_back(self, msg: Msg, *, stopped: bool = False) -> None:
        """Stopping (or unable to go on): the message goes back for redelivery now rather
        than after its ack wait, and its record to what it was before this attempt (a stop is
        no death). One already acked (dead-lettered) stays acked.

        `stopped`: the stop cancelled its handler, which the record counts; the stop after
        `max_stops` counted ones dead-letters it instead."""
        if stopped and (stops := self.starts.stops(msg)) is not None:
            if stops >= self.policy.max_stops:
                try:
                    await self.dead_letter(
                        msg, StoppedHandlingError(stops + 1, self.policy.max_stops)
                    )
                    return
                except (NatsError, TransientError) as exc:
                    # Its record says so from the nak on: the next delivery is dead-lettered
                    # before it is handled.
                    log.warning(
                        "%s: could not dead-letter a message from %s stopped %d times (%r)",
                        self.service,
                        msg.subject,
                        stops + 1,
                        exc,
                    )
            log.info(
                "%s: handling a message from %s stopped (stop %d of %d allowed)",
                self.service,
                msg.subject,
                stops + 1,
                self.policy.max_stops,
            )
        await self.starts.finish(msg, final=False, stopped=stopped)
        with contextlib.suppress(NatsError):  # the connection is going: ack_wait it is
            await msg.nak()

    async def run_guarded(
        self, msgs: list[Msg], work: Callable[[], Awaitable[Sequence[Outgoing]]]
    ) -> Sequence[Outgoing] | BaseException:
        started = time.perf_counter()
        heartbeat = asyncio.create_task(self.keep_alive(msgs))
        try:
            return await work()
        except asyncio.CancelledError:
            # Stopping: hand the messages back now rather than after their ack wait.
            await asyncio.shield(
                asyncio.gather(*(self.hand_back(msg, stopped=True) for msg in msgs))
            )
            raise
        except Exception as exc:  # every failure is retried or dead-lettered by the caller
            return exc
        finally:
            heartbeat.cancel()
            metrics.HANDLER_SECONDS.labels(self.service, self.route.name).observe(
                time.perf_counter() - started
            )

    async def finish(
        self,
        msgs: list[Msg],
        result: Sequence[Outgoing] | BaseException,
        cause: Event | None = None,
        settlements: Settlements | None = None,
    ) -> None:
        if isinstance(result, BaseException):
            for msg in msgs:
                await self.fail(msg, result)
            return
        try:
            outgoing = list(result) if cause is None else derive_event_ids(cause, result)
            pending = await self.publisher.send_all(outgoing)
        except Exception as exc:  # the bus failed, or the handler returned something unusable
            for msg in msgs:
                await self.fail(msg, exc)
            return
        if settlements is None:
            await self.settle(msgs, pending)
        else:
            await settlements.start(self.settle(msgs, pending))

    async def settle(self, msgs: list[Msg], pending: PendingAcks) -> None:
        """Acks the input once JetStream has stored every output; otherwise it is retried."""
        try:
            await pending.wait()
        except Exception as exc:
            for msg in msgs:
                await self.fail(msg, exc)
            return
        if self.starts:  # only redeliveries have records (a hot path)
            await asyncio.gather(*(self.starts.finish(msg, final=True) for msg in msgs))
        for msg in msgs:
            await msg.ack()
        if self.failures:  # only messages that failed before are counted (a hot path)
            for msg in msgs:
                self.failures.forget(message_key(msg))


DEFAULT_MAX_UNSETTLED = 64
"""Inputs a pipelined consumer lets wait for their outputs' acks before it waits for room."""

JETSTREAM_MAX_ACK_PENDING = 1000
"""JetStream's own default `max_ack_pending`: what every consumer had before binloop set it."""


def max_ack_pending(batch_size: int, unsettled: int = 0) -> int:
    """The unacked messages a consumer may hold: a whole fetch of `batch_size` plus the
    `unsettled` inputs still waiting for their outputs' acks (a pipelined consumer's window),
    and never below JetStream's default, so every consumer that fits in it keeps what it had.
    Below what the consumer holds, a fetch is cut short and then waits out its whole timeout
    for messages JetStream will not send."""
    return max(JETSTREAM_MAX_ACK_PENDING, batch_size + unsettled)


class Settlements:
    """Inputs whose outputs are sent but not yet acked by JetStream, settled in background
    tasks while the next messages are handled. At most `limit` at a time: the next `start`
    waits for room, so a slow JetStream slows the consumer down instead of piling up."""

    def __init__(self, service: str, limit: int) -> None:
        if limit < 1:
            raise ValueError(f"the unsettled limit must be >= 1, got {limit}")
        self._service = service
        self._room = asyncio.Semaphore(limit)
        self._running: set[asyncio.Task[None]] = set()

    async def start(self, settle: Coroutine[Any, Any, None]) -> None:
        try:
            await self._room.acquire()
        except BaseException:
            settle.close()  # never started: its input comes back after the ack wait
            raise
        task = asyncio.create_task(settle)
        self._running.add(task)
        task.add_done_callback(self._finished)

    async def drain(self) -> None:
        """Waits for every running settlement (each ends within the publish ack timeout)."""
        if self._running:
            await asyncio.wait(set(self._running))

    def _finished(self, task: asyncio.Task[None]) -> None:
        self._running.discard(task)
        self._room.release()
        if not task.cancelled() and (error := task.exception()) is not None:
            # Acking or naking failed (the connection went): JetStream redelivers the input
            # after its ack wait and drops the repeated outputs by their ids.
            log.warning("%s: could not settle a message: %r", self._service, error)


async def _raw_batch(msgs: list[Msg]) -> StreamMessage[list[Msg]]:
    """Skips FastStream's batch parser (it JSON-decodes every body, which we do ourselves
    with the route's model) and hands the raw messages over."""
    return NatsBatchMessage(raw_message=msgs, body=b"", path={})


async def _no_decode(_: StreamMessage[Any]) -> None:
    return None


def _register(
    broker: NatsBroker,
    route: Route,
    *,
    durable: str,
    bin_id: str | None,
    batch_size: int,
    fetch_timeout_s: float,
    ack_wait_s: float,
    description: str,
    on_messages: Callable[[list[Msg]], Awaitable[None]],
    deliver_policy: DeliverPolicy = DeliverPolicy.ALL,
    unsettled: int = 0,
) -> None:
    subject = route.subject(bin_id) if bin_id else route.wildcard
    config = ConsumerConfig(
        ack_wait=ack_wait_s,
        max_deliver=-1,
        max_ack_pending=max_ack_pending(batch_size, unsettled),
    )
    subscriber = broker.subscriber(
        subject,
        stream=JStream(route.stream, declare=False),
        durable=durable,
        config=config,
        deliver_policy=deliver_policy,
        pull_sub=PullSub(batch_size=batch_size, timeout=fetch_timeout_s, batch=True),
        ack_policy=AckPolicy.MANUAL,
        parser=_raw_batch,
        decoder=_no_decode,
        title=f"{durable}:{route.name}",
        description=f"{description} Payload: {route.model.__name__} "
        f"(schemas/jsonschema/v1/{route.name}.json).",
    )
    outages.declare(route.stream, durable, subject, config)  # what FastStream has made of it

    async def consume(message: Annotated[NatsBatchMessage, Context("message")]) -> None:
        await on_messages(list(message.raw_message))

    subscriber(consume)


def subscribe(
    broker: NatsBroker,
    publisher: Publisher,
    route: Route,
    handler: EventHandler[E],
    *,
    durable: str,
    bin_id: str | None = None,
    policy: RetryPolicy = RetryPolicy(),
    ack_wait_s: float = 10.0,
    description: str = "",
    deliver_policy: DeliverPolicy = DeliverPolicy.ALL,
    pipelined: bool = False,
    max_unsettled: int = DEFAULT_MAX_UNSETTLED,
) -> None:
    """One message at a time, for low-rate subjects where latency matters.

    `deliver_policy` applies when the durable consumer is first created, e.g. LAST_PER_SUBJECT
    for "tell me the current model, then every change".

    `pipelined`: the handler's outputs are sent at once and the next message is handled while
    JetStream confirms them; the input is acked (or retried) when the confirmation comes, at
    most `max_unsettled` inputs waiting for theirs. Outputs of consecutive messages still go
    out in order; what changes is that a message's latency no longer includes the ack round
    trip. The guarantee is the same: an input is acked only after its outputs are stored.
    """
    consumer: _Consumer[E] = _Consumer(publisher, route, policy, ack_wait_s)
    settlements = Settlements(publisher.service, max_unsettled) if pipelined else None
    if settlements is not None:
        publisher.unfinished.append(settlements.drain)

    async def on_messages(msgs: list[Msg]) -> None:
        good, bad = consumer.decode(msgs)
        for msg, error in bad:
            await consumer.dead_letter(msg, error)
        for msg, delivery in good:
            metrics.MESSAGES_CONSUMED.labels(consumer.service, route.name).inc()
            if delivery.attempt > 1 and not await consumer.begin(msg, delivery.attempt):
                continue
            result = await consumer.run_guarded([msg], partial(handler, delivery))
            await consumer.finish([msg], result, cause=delivery.event, settlements=settlements)

    _register(
        broker,
        route,
        durable=durable,
        bin_id=bin_id,
        batch_size=1,
        fetch_timeout_s=1.0,
        ack_wait_s=ack_wait_s,
        description=description,
        on_messages=on_messages,
        deliver_policy=deliver_policy,
        unsettled=max_unsettled if pipelined else 0,
    )


def subscribe_batch(
    broker: NatsBroker,
    publisher: Publisher,
    route: Route,
    handler: BatchHandler[E],
    *,
    durable: str,
    batch_size: int = 256,
    max_wait_s: float = 0.2,
    bin_id: str | None = None,
    policy: RetryPolicy = RetryPolicy(),
    ack_wait_s: float = 10.0,
    description: str = "",
) -> None:
    """Up to `batch_size` messages per call, waiting at most `max_wait_s` to fill a batch."""
    consumer: _Consumer[E] = _Consumer(publisher, route, policy, ack_wait_s)

    async def on_messages(msgs: list[Msg]) -> None:
        good, bad = consumer.decode(msgs)
        for msg, error in bad:
            await consumer.dead_letter(msg, error)
        if not good:
            return
        metrics.MESSAGES_CONSUMED.labels(consumer.service, route.name).inc(len(good))
        together, suspects = await consumer.triage(good)
        if together:
            await handle_together(together)
        for msg, delivery in suspects:
            # It ended a process before, maybe with the batch it was in: alone, it can end
            # only its own count.
            await consumer.start_alone(msg)
            alone = await consumer.run_guarded([msg], partial(handler, [delivery]))
            await consumer.finish([msg], alone)

    async def handle_together(good: list[tuple[Msg, Delivery[E]]]) -> None:
        deliveries = [d for _, d in good]
        result = await consumer.run_guarded([m for m, _ in good], partial(handler, deliveries))
        if isinstance(result, BaseException) and len(good) > 1:
            # One bad message must not take its batch down: retry each one alone, so only
            # the culprit is retried or dead-lettered.
            for msg, delivery in good:
                alone = await consumer.run_guarded([msg], partial(handler, [delivery]))
                await consumer.finish([msg], alone)
            return
        await consumer.finish([m for m, _ in good], result)

    _register(
        broker,
        route,
        durable=durable,
        bin_id=bin_id,
        batch_size=batch_size,
        fetch_timeout_s=max_wait_s,
        ack_wait_s=ack_wait_s,
        description=description,
        on_messages=on_messages,
    )


__all__ = [
    "DEFAULT_MAX_UNSETTLED",
    "JETSTREAM_MAX_ACK_PENDING",
    "MSG_ID_HEADER",
    "DeadLetteredBeforeError",
    "Delivery",
    "FailureCounts",
    "RetryPolicy",
    "Settlements",
    "StoppedHandlingError",
    "UnfinishedHandlingError",
    "max_ack_pending",
    "subscribe",
    "subscribe_batch",
]
