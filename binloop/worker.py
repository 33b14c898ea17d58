"""A spawned worker process for CPU-heavy work (training) that a service awaits.

Why not a thread: a thread that trains holds the GIL between torch operations, and every
I/O wake-up of the service's event loop (acks, heartbeats, and in `binloop up` all eight
services of the loop) then waits for it: the demo's frame-to-actuation p99 rose from ~0.1 s
to over 6 s during a training, and the actuator refused items as stale. A thread cannot be
stopped either, so a service that stops keeps training. A process has its own interpreter,
and is killed when the awaiting task is cancelled.

One process serves one call at a time and is reused (torch is imported once); a call that
is cancelled, or a process that dies, costs the process: the next call starts a fresh one.
The function and its arguments are pickled (a module-level function, pydantic models and
settings are fine); so are its result and its exception, raised again here. What the call
added to binloop's Prometheus counters (blob puts, say) is added to the service's own, which
is what /metrics shows; the worker's registry is never scraped.
"""

from __future__ import annotations

import asyncio
import logging
import multiprocessing
import os
import pickle
import threading
import time
from collections.abc import Callable
from multiprocessing.connection import Connection
from multiprocessing.process import BaseProcess
from typing import Any, TypeVar, cast

from prometheus_client import REGISTRY, Counter

from binloop.errors import PermanentError, TransientError
from binloop.observability import metrics

log = logging.getLogger(__name__)
T = TypeVar("T")


class WorkerDiedError(TransientError):
    """The worker process ended during a call (killed, out of memory, a crash in native code)."""


CounterKey = tuple[str, tuple[tuple[str, str], ...]]
"""(counter name without _total, sorted label pairs): one series."""


def _counter_totals() -> dict[CounterKey, float]:
    totals: dict[CounterKey, float] = {}
    for metric in REGISTRY.collect():
        if metric.type == "counter":
            for sample in metric.samples:
                if sample.name.endswith("_total"):
                    totals[(metric.name, tuple(sorted(sample.labels.items())))] = sample.value
    return totals


def _portable(error: Exception) -> Exception:
    """`error`, or a stand-in of the same kind (permanent, transient) with its message when it
    cannot be rebuilt on the other side (an __init__ with other arguments than its message):
    the service must still tell a dead letter from a retry."""
    try:
        pickle.loads(pickle.dumps(error))
    except Exception:  # whatever stops it: it must not stop the answer
        kind: type[Exception] = RuntimeError
        if isinstance(error, PermanentError):
            kind = PermanentError
        elif isinstance(error, TransientError):
            kind = TransientError
        return kind(f"{type(error).__name__}: {error}")
    return error


def _exit_with_parent(parent: int) -> None:
    """A worker whose service died (SIGKILL, a crash) would train on and write a model that a
    restarted service may train again: it ends itself instead."""
    while os.getppid() == parent:
        time.sleep(1.0)
    os._exit(1)


def _serve(connection: Connection, log_level: int, parent: int) -> None:
    """The worker's loop: receive (function, args), send back ("ok", result, counted) or
    ("error", exception, counted), `counted` being what the call added to counters."""
    logging.basicConfig(
        level=log_level, format="%(asctime)s %(levelname)s %(name)s [worker]: %(message)s"
    )
    threading.Thread(target=_exit_with_parent, args=(parent,), daemon=True).start()
    while True:
        try:
            function, args = connection.recv()
        except EOFError:  # the service closed its end: nothing more to do
            return
        before = _counter_totals()
        try:
            status, value = "ok", function(*args)
        except Exception as exc:  # sent back to the caller, who raises it
            status, value = "error", _portable(exc)
        counted = {
            key: total - before.get(key, 0.0)
            for key, total in _counter_totals().items()
            if total > before.get(key, 0.0)
        }
        try:
            connection.send((status, value, counted))
        except Exception as exc:  # an unpicklable result or exception
            failure = RuntimeError(f"{type(exc).__name__}: {exc}; {status}: {value!r}")
            connection.send(("error", failure, counted))


def _binloop_counters() -> dict[str, Counter]:
    return {
        described.name: counter
        for counter in vars(metrics).values()
        if isinstance(counter, Counter)
        for described in counter.describe()
    }


def _add_counted(counted: dict[CounterKey, float]) -> None:
    counters = _binloop_counters()
    for (name, labels), amount in counted.items():
        counter = counters.get(name)
        if counter is None:  # not one of binloop's (a library's own counter)
            continue
        (counter.labels(**dict(labels)) if labels else counter).inc(amount)


class WorkerProcess:
    """`await worker.call(fn, *args)` runs `fn(*args)` in the worker process."""

    def __init__(self, name: str) -> None:
        self.name = name
        self._context = multiprocessing.get_context("spawn")
        self._process: BaseProcess | None = None
        self._connection: Connection | None = None
        self._busy = asyncio.Lock()

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process is not None else None

    def _ensure_started(self) -> Connection:
        if self._process is not None and self._process.is_alive() and self._connection:
            return self._connection
        self._discard()
        ours, theirs = self._context.Pipe()
        process = self._context.Process(
            target=_serve,
            args=(theirs, logging.getLogger().getEffectiveLevel(), os.getpid()),
            name=self.name,
            daemon=True,
        )
        process.start()
        theirs.close()
        self._process, self._connection = process, ours
        log.info("%s: worker process %d started", self.name, process.pid)
        return ours

    async def call(self, function: Callable[..., T], *args: Any) -> T:
        async with self._busy:
            connection = self._ensure_started()
            done = threading.Event()

            def exchange() -> tuple[str, object, dict[CounterKey, float]]:
                # Both ends off the event loop: a send larger than the pipe's buffer waits
                # until the worker reads it, which a freshly spawned one does only once its
                # interpreter has started (0.5 s here for a TrashNet-sized manifest).
                try:
                    connection.send((function, args))
                    return cast(tuple[str, object, dict[CounterKey, float]], connection.recv())
                finally:
                    done.set()

            try:
                status, value, counted = await asyncio.shield(asyncio.to_thread(exchange))
            except asyncio.CancelledError:
                # The caller gave up (the service stops, or the message is taken back): the
                # work must stop too, not go on in the background. Killing the process ends
                # the pending send or receive before the connection is closed under it.
                self._kill()
                await asyncio.to_thread(done.wait, 10.0)
                self._discard()
                raise
            except (EOFError, OSError) as exc:
                code = None
                if self._process is not None:
                    await asyncio.to_thread(self._process.join, 10.0)
                    code = self._process.exitcode
                self._discard()
                raise WorkerDiedError(
                    f"{self.name}: the worker process ended during {function.__name__} "
                    f"(exit code {code})"
                ) from exc
        _add_counted(counted)
        if status == "error":
            raise cast(BaseException, value)
        return cast(T, value)

    def _kill(self) -> None:
        process = self._process
        if process is not None and process.is_alive():
            process.kill()
            process.join(timeout=10)
            log.info("%s: worker process %d stopped", self.name, process.pid)

    def _discard(self) -> None:
        self._kill()
        if self._connection is not None:
            self._connection.close()
        self._process = self._connection = None

    def close(self) -> None:
        """Stops the worker process (and whatever it was doing)."""
        self._discard()
