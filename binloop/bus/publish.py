"""Publishing events: JSON on the route's subject, event_id as Nats-Msg-Id, acked by JetStream."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass

import nats.errors
import nats.js.errors
from faststream.nats import NatsBroker
from nats.aio.client import Client as NatsClient
from nats.js.api import PubAck
from nats.js.client import JetStreamContext

from binloop.errors import TransientError
from binloop.observability import metrics
from schemas.base import Event
from schemas.routes import Route

MSG_ID_HEADER = "Nats-Msg-Id"


class PublishTimeoutError(TransientError, nats.errors.TimeoutError):
    """JetStream did not confirm a publish in time (server down, stream missing or slow).
    Also a nats-py TimeoutError, so code that handles the client's own timeouts handles it."""

    def __str__(self) -> str:  # nats-py's errors print a fixed text; this one says what
        return str(self.args[0]) if self.args else "JetStream did not ack in time"


@dataclass(frozen=True)
class Outgoing:
    """An event a handler wants published; the consumer publishes it before acking the input."""

    route: Route
    event: Event
    bin_id: str | None = None


PUBLISH_ACK_TIMEOUT_S = 5.0
"""How long JetStream may take to confirm a publish before it counts as failed (nats-py's
own default for `js.publish`)."""


SENDS_PER_TURN = 64
"""Events `send_all` hands over before it lets the event loop run other tasks (and the flusher
write them out)."""


class PendingAcks:
    """JetStream's acks for events already handed to the connection. `wait()` returns once
    every one is stored and raises the first failure (an API error, or no ack in time)."""

    def __init__(self, acks: list[asyncio.Future[PubAck]], timeout_s: float) -> None:
        self._acks = acks
        self._timeout_s = timeout_s

    def __len__(self) -> int:
        return len(self._acks)

    async def wait(self) -> None:
        if not self._acks:
            return
        done, unacked = await asyncio.wait(
            self._acks, timeout=self._timeout_s, return_when=asyncio.FIRST_EXCEPTION
        )
        for ack in unacked:
            ack.cancel()
        # Every failure is retrieved (asyncio warns about unretrieved ones); the first in send
        # order is the one reported.
        errors: list[BaseException] = []
        for ack in self._acks:
            if ack not in done:
                continue
            if ack.cancelled():  # nothing cancels them here; if something did, not stored
                errors.append(PublishTimeoutError("a JetStream ack was cancelled"))
            elif (error := ack.exception()) is not None:
                errors.append(error)
        if errors:
            raise errors[0]
        if unacked:
            raise PublishTimeoutError(
                f"JetStream acked {len(done)} of {len(self._acks)} events "
                f"within {self._timeout_s:.1f}s"
            )


def _release_unsent(js: JetStreamContext, before: set[str]) -> None:
    """nats-py's publish_async registers the ack's future and takes one of its 4000 pending
    slots before it sends. When the send itself fails (buffer full while reconnecting, payload
    too big, draining), nothing would ever settle that future, and after 4000 such failures
    every publish would stall. Cancelling it runs nats-py's own cleanup (slot released, token
    dropped). A concurrent send's future started meanwhile may be cancelled too: its caller
    sees a failed ack and retries, and JetStream drops the repeat by its id."""
    futures: dict[str, asyncio.Future[PubAck]] = getattr(js, "_publish_async_futures", {})
    for token, future in list(futures.items()):
        if token not in before and not future.done():
            future.cancel()


class Publisher:
    """Publishes for one service. `service` names it on the bus (its dead-letter subject,
    metrics); `producer` (service plus instance) goes into the events it emits.

    Events go out in call order on one connection; JetStream acks come back asynchronously, so
    a handler can send its outputs at once and confirm them later (`send_all`), or wait for
    the confirmation in place (`publish`, `publish_all`).
    """

    def __init__(
        self,
        broker: NatsBroker,
        service: str,
        producer: str | None = None,
        *,
        ack_timeout_s: float = PUBLISH_ACK_TIMEOUT_S,
    ) -> None:
        self._broker = broker
        self._js: JetStreamContext | None = None
        self._js_connection: NatsClient | None = None
        self.service = service
        self.producer = producer or service
        self.ack_timeout_s = ack_timeout_s
        self.unfinished: list[Callable[[], Awaitable[None]]] = []
        """Awaited by ServiceApp.stop after the consumers stop and before the connection
        closes: pipelined consumers settle the inputs whose outputs are already sent."""

    @property
    def connection(self) -> NatsClient:
        """The broker's connection now (a broker stopped and connected again has a new one)."""
        return self._broker.connection

    def _jetstream(self) -> JetStreamContext:
        # One context per connection: it owns the inbox its async acks come to. A broker that
        # was stopped and connected again has a new connection, hence a new context.
        connection = self._broker.connection
        if self._js is None or self._js_connection is not connection:
            self._js, self._js_connection = connection.jetstream(), connection
        return self._js

    async def _send(self, item: Outgoing) -> asyncio.Future[PubAck]:
        route, event = item.route, item.event
        if not isinstance(event, route.model):
            raise TypeError(f"{route.name} carries {route.model.__name__}, not {type(event)}")
        js = self._jetstream()
        before = set(getattr(js, "_publish_async_futures", {}))
        # nats-py waits for one of its 4000 pending slots under asyncio.wait_for, which costs a
        # task and a turn of the event loop per publish even when a slot is free (a third of
        # a publish's time here, docs/edge-latency.md). With a slot free the wait returns at
        # once, so it is asked for without a timeout; only a stalled client gets the timed one,
        # and so does a context's first publish, which subscribes its reply inbox before it
        # takes a slot (other publishes could take the last ones meanwhile).
        slots: asyncio.Semaphore | None = getattr(js, "_publish_async_pending_semaphore", None)
        slot_free = slots is not None and not slots.locked()
        ready = slot_free and bool(getattr(js, "_async_reply_prefix", None))
        wait_stall = None if ready else self.ack_timeout_s
        try:
            ack = await js.publish_async(
                route.subject(item.bin_id),
                event.model_dump_json().encode(),
                headers={MSG_ID_HEADER: str(event.event_id), "content-type": "application/json"},
                stream=route.stream,
                # nats-py keeps at most 4000 publishes unacked; past that, wait this long for
                # room (TooManyStalledMsgsError after), not forever while the server is away.
                wait_stall=wait_stall,
            )
        except nats.js.errors.TooManyStalledMsgsError:
            task = asyncio.current_task()
            if task is not None and task.cancelling():
                # nats-py turns a cancel while it waits for a slot into this error; a caller
                # that retries on bus errors (heartbeats) would swallow its own stop.
                raise asyncio.CancelledError from None
            raise  # no slot was taken
        except BaseException:
            _release_unsent(js, before)
            raise
        metrics.EVENTS_PUBLISHED.labels(self.service, route.name).inc()
        return ack

    async def send_all(self, outgoing: Sequence[Outgoing]) -> PendingAcks:
        """Hands every event to the connection now, in order, without waiting for JetStream;
        the caller must `wait()` on the result before it treats them as stored."""
        acks: list[asyncio.Future[PubAck]] = []
        try:
            for sent, item in enumerate(outgoing):
                if sent and sent % SENDS_PER_TURN == 0:
                    # A publish with a free slot does not give the event loop a turn: a long
                    # batch would hold the loop (heartbeats, health checks) and the socket.
                    await asyncio.sleep(0)
                acks.append(await self._send(item))
        except BaseException:
            for ack in acks:
                ack.cancel()
            raise
        return PendingAcks(acks, self.ack_timeout_s)

    async def publish_all(self, outgoing: Sequence[Outgoing]) -> None:
        """Sends them all, then waits for every ack: one round trip for the lot."""
        await (await self.send_all(outgoing)).wait()

    async def publish(self, route: Route, event: Event, bin_id: str | None = None) -> None:
        await self.publish_all([Outgoing(route, event, bin_id)])
