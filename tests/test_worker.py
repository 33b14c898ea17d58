"""The worker process that services hand CPU-heavy work to (the trainer's training): results
and errors come back, the process is reused, and a cancelled call or a dead process never
leaves work running or a service stuck."""

from __future__ import annotations

import asyncio
import operator
import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from prometheus_client import REGISTRY

from binloop.worker import WorkerDiedError, WorkerProcess


@pytest.fixture
def worker() -> Iterator[WorkerProcess]:
    process = WorkerProcess("test-worker")
    yield process
    process.close()


async def test_a_call_runs_in_another_process_which_is_reused(worker: WorkerProcess) -> None:
    assert await worker.call(operator.add, 2, 3) == 5
    first = await worker.call(os.getpid)
    assert first != os.getpid()
    assert await worker.call(os.getpid) == first == worker.pid


async def test_the_functions_exception_is_raised_in_the_caller(worker: WorkerProcess) -> None:
    with pytest.raises(ValueError, match="invalid literal"):
        await worker.call(int, "not a number")
    assert await worker.call(operator.mul, 6, 7) == 42  # the same process goes on


async def test_a_result_that_cannot_travel_back_is_an_error_not_a_hang(
    worker: WorkerProcess,
) -> None:
    with pytest.raises(RuntimeError, match="pickle"):
        await worker.call(threading.Lock)


async def test_a_cancelled_call_stops_the_work_and_the_next_call_gets_a_fresh_process(
    worker: WorkerProcess,
) -> None:
    pid = await worker.call(os.getpid)
    busy = asyncio.create_task(worker.call(time.sleep, 600))
    await asyncio.sleep(0.5)  # under way (a cancel before the worker read it is fine too)
    busy.cancel()
    with pytest.raises(asyncio.CancelledError):
        await busy
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)  # gone, not sleeping on in the background
    assert await worker.call(os.getpid) not in (pid, None)


async def test_a_worker_that_dies_mid_call_is_a_transient_error(worker: WorkerProcess) -> None:
    with pytest.raises(WorkerDiedError, match="exit code 3"):
        await worker.call(os._exit, 3)
    assert await worker.call(operator.add, 1, 1) == 2


def _put_a_blob(root: str) -> str:
    from binloop.storage import LocalBlobStore

    return LocalBlobStore(Path(root)).put("worker/made.txt", b"made in the worker").key


async def test_what_the_call_counts_reaches_the_services_metrics(
    worker: WorkerProcess, tmp_path: Path
) -> None:
    """/metrics is the service's registry: a blob put in the worker must show there."""

    def puts(outcome: str) -> float:
        labels = {"backend": "local", "outcome": outcome}
        return REGISTRY.get_sample_value("binloop_blob_puts_total", labels) or 0.0

    written, unchanged = puts("written"), puts("unchanged")
    assert await worker.call(_put_a_blob, str(tmp_path)) == "worker/made.txt"
    assert (puts("written"), puts("unchanged")) == (written + 1, unchanged)
    assert await worker.call(_put_a_blob, str(tmp_path)) == "worker/made.txt"
    assert (puts("written"), puts("unchanged")) == (written + 1, unchanged + 1)
