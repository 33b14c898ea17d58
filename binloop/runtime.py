"""How every service process starts and stops: one FastStream app, the streams it needs, the
health server, and background tasks that end cleanly."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from faststream import FastStream
from faststream.nats import JStream, NatsBroker
from faststream.specification import AsyncAPI
from nats.errors import Error as NatsError
from nats.js.client import JetStreamContext

from binloop import __version__
from binloop.bus import Publisher, ensure_streams, make_broker
from binloop.bus.consume import RetryPolicy
from binloop.bus.consumers import declared_consumers, update_declared_consumers
from binloop.bus.outages import unavailable_consumers
from binloop.observability.http import HealthServer
from binloop.settings import ServiceSettings
from schemas.events import FleetHeartbeat
from schemas.routes import DLQ, FLEET_HEARTBEAT, Route

log = logging.getLogger(__name__)

BackgroundTask = Callable[[], Awaitable[None]]


STOP_CANCEL_ATTEMPTS = 10
STOP_CANCEL_WAIT_S = 1.0
"""A background task gets this long after each cancel before it is cancelled again."""


@dataclass
class ServiceApp:
    """A service: its broker, publisher, retry policy, readiness and background tasks."""

    name: str
    settings: ServiceSettings
    broker: NatsBroker
    publisher: Publisher
    policy: RetryPolicy
    ready_checks: list[Callable[[], bool]] = field(default_factory=list)
    background: list[BackgroundTask] = field(default_factory=list)
    on_start: list[Callable[[JetStreamContext], Awaitable[None]]] = field(default_factory=list)
    on_stop: list[Callable[[], Awaitable[None]]] = field(default_factory=list)
    heartbeat: Callable[[], FleetHeartbeat] | None = None
    health: HealthServer | None = None
    _tasks: list[asyncio.Task[None]] = field(default_factory=list)
    _started: bool = False
    _background_failed: bool = False

    @property
    def producer(self) -> str:
        return f"{self.name}:{self.settings.instance}" if self.settings.instance else self.name

    def declare_publishes(self, *routes: Route, bin_id: str | None = None) -> None:
        """Documents (AsyncAPI) the routes this service publishes; publishing goes through
        `self.publisher`, which sets Nats-Msg-Id and waits for JetStream's ack."""
        for route in routes:
            self.broker.publisher(
                route.subject(bin_id) if bin_id and route.per_bin else route.wildcard,
                stream=JStream(route.stream, declare=False),
                schema=route.model,
                title=f"{self.name}:{route.name}",
                description=f"{route.model.__doc__ or route.model.__name__}".strip(),
            )

    def send_heartbeats(self, beat: Callable[[], FleetHeartbeat]) -> None:
        """Publish `beat()` on fleet.heartbeat every heartbeat_interval_s while running."""
        self.heartbeat = beat
        self.declare_publishes(FLEET_HEARTBEAT, bin_id=beat().bin_id)

    def is_ready(self) -> bool:
        """Started, connected, background tasks alive, every consumer served by JetStream
        (binloop/bus/outages.py), and the service's own checks."""
        connected = bool(
            self._started
            and self.broker.config.connection_state.connection
            and self.broker.connection.is_connected
        )
        healthy = connected and not self._background_failed
        healthy = healthy and not unavailable_consumers(self.broker)
        return healthy and all(check() for check in self.ready_checks)

    @property
    def js(self) -> JetStreamContext:
        js: JetStreamContext = self.broker.config.connection_state.stream
        return js

    async def start(self) -> None:
        """Connect, make sure the streams exist, start consumers, health server and tasks."""
        await self._connect_and_prepare()
        await self.broker.start()
        await self._after_broker_started()

    async def stop(self) -> None:
        await self.stop_extras()
        await self.broker.stop()

    async def _supervise(self, task: BackgroundTask) -> None:
        try:
            await task()
        except asyncio.CancelledError:
            raise
        except Exception:
            # Not swallowed: the task is over, so /healthz and /readyz fail and the
            # orchestrator (liveness probe, systemd watchdog) restarts the process.
            self._background_failed = True
            log.exception("%s: background task %s failed", self.name, task)
            raise

    def durable_consumers(self) -> list[tuple[str, str]]:
        """(stream, durable) of every JetStream consumer this service reads."""
        return [(c.stream, c.durable) for c in declared_consumers(self.broker)]

    async def wait_until_idle(self, quiet_s: float, poll_s: float = 1.0) -> None:
        """Returns once none of the service's consumers has had a message waiting or in
        flight for `quiet_s` seconds: how a batch job (the trainer as a CronJob) ends."""
        quiet_since: float | None = None
        loop = asyncio.get_running_loop()
        while True:
            busy = False
            for stream, durable in self.durable_consumers():
                info = await self.js.consumer_info(stream, durable)
                busy = busy or bool(info.num_pending) or bool(info.num_ack_pending)
            now = loop.time()
            if busy:
                quiet_since = None
            elif quiet_since is None:
                quiet_since = now
            elif now - quiet_since >= quiet_s:
                return
            await asyncio.sleep(poll_s)

    def faststream_app(self) -> FastStream:
        """The app `binloop run <service>` serves (signals, graceful shutdown) and documents."""
        spec = AsyncAPI(
            self.broker,
            title=f"binloop {self.name}",
            version=__version__,
            description=f"Subjects the binloop {self.name} service consumes and publishes.",
        )
        app = FastStream(self.broker, specification=spec)
        app.on_startup(self._connect_and_prepare)
        app.after_startup(self._after_broker_started)
        app.on_shutdown(self.stop_extras)
        return app

    async def _connect_and_prepare(self) -> None:
        await self.broker.connect()
        await ensure_streams(self.js, self.settings.stream_replicas)
        await update_declared_consumers(self.js, self.broker)
        for hook in self.on_start:
            await hook(self.js)

    async def _send_heartbeats(self) -> None:
        """Edge services tell the fleet view what they run, every heartbeat_interval_s."""
        while self.heartbeat is not None:
            beat = self.heartbeat()
            try:
                await self.publisher.publish(FLEET_HEARTBEAT, beat, beat.bin_id)
            except (NatsError, TimeoutError) as exc:
                # A missed beat is replaced by the next one; the bin keeps working.
                log.warning("%s: heartbeat not published (%s)", self.name, exc)
            task = asyncio.current_task()
            if task is not None and task.cancelling():
                # Stopped while publishing, and nats-py's publish swallowed the cancel:
                # sleeping on would keep the service's stop waiting for ever.
                raise asyncio.CancelledError
            await asyncio.sleep(self.settings.heartbeat_interval_s)

    async def _after_broker_started(self) -> None:
        self.health = HealthServer(
            self.settings.http_host,
            self.settings.http_port,
            self.is_ready,
            is_alive=lambda: not self._background_failed,
        )
        await self.health.start()
        background = list(self.background)
        if self.heartbeat is not None:
            background.append(self._send_heartbeats)
        for task in background:
            self._tasks.append(asyncio.create_task(self._supervise(task)))
        self._started = True

    async def _cancel_tasks(self) -> None:
        """Cancel the background tasks and wait for them. A cancel that a library swallowed
        (nats-py around a publish, asyncio.wait_for in a race) is sent again, so a stop never
        waits for ever on a task that went back to its loop."""
        pending = set(self._tasks)
        for _ in range(STOP_CANCEL_ATTEMPTS):
            if not pending:
                break
            for task in pending:
                task.cancel()
            _, pending = await asyncio.wait(pending, timeout=STOP_CANCEL_WAIT_S)
        if pending:
            log.error("%s: background tasks still running after the stop: %s", self.name, pending)
        for task in self._tasks:
            if task.done() and not task.cancelled():
                task.exception()  # already logged by _supervise; retrieved so asyncio stays quiet
        self._tasks.clear()

    async def stop_extras(self) -> None:
        """Consumers stop first (no new work), then tasks and hooks (drivers, servers).

        Every consumer stops taking work before any waits for its handlers, and they wait
        together: one at a time, the others would go on fetching and starting handlers while
        a busy one drained, and the stop would last the sum of their waits (each up to
        GRACEFUL_STOP_S, binloop/bus/broker.py) instead of the longest."""
        self._started = False
        subscribers = list(self.broker.subscribers)
        for subscriber in subscribers:
            subscriber.running = False  # FastStream's loops fetch and consume only while set
        outcomes = await asyncio.gather(
            *(subscriber.stop() for subscriber in subscribers), return_exceptions=True
        )
        errors = [outcome for outcome in outcomes if isinstance(outcome, Exception)]
        if errors:  # raised once every consumer is stopped, not while others still drain
            raise ExceptionGroup(f"{self.name}: stopping its consumers failed", errors)
        for unfinished in self.publisher.unfinished:
            await unfinished()  # acks of outputs already sent, while the connection is up
        await self._cancel_tasks()
        for hook in self.on_stop:
            await hook()
        if self.health is not None:
            await self.health.stop()


def new_service(name: str, settings: ServiceSettings) -> ServiceApp:
    broker = make_broker(settings.nats_url, name)
    producer = f"{name}:{settings.instance}" if settings.instance else name
    service = ServiceApp(
        name=name,
        settings=settings,
        broker=broker,
        publisher=Publisher(broker, name, producer),
        policy=RetryPolicy(
            settings.max_deliveries, settings.retry_delay_s, max_stops=settings.max_stops
        ),
    )
    service.declare_publishes(DLQ, bin_id=name)
    return service
