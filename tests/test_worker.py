"""The worker process that services hand CPU-heavy work to (the trainer's training): results
and errors come back, the process is reused, and a cancelled call or a dead process never
leaves work running or a service stuck."""

from __future__ import annotations

import asyncio
import operator
import os
import select
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from prometheus_client import REGISTRY

from binloop.errors import ChecksumMismatchError, TransientError
from binloop.worker import WorkerDiedError, WorkerProcess
from tests.helpers import eventually


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


def _block_after_marking(marker: str) -> None:
    Path(marker).touch()
    threading.Event().wait()  # until the process is killed


async def test_a_cancelled_call_stops_the_work_and_the_next_call_gets_a_fresh_process(
    worker: WorkerProcess, tmp_path: Path
) -> None:
    pid = await worker.call(os.getpid)
    marker = tmp_path / "under-way"
    busy = asyncio.create_task(worker.call(_block_after_marking, str(marker)))
    await eventually(marker.exists)
    busy.cancel()
    with pytest.raises(asyncio.CancelledError):
        await busy
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)  # gone (killed and reaped), not working on in the background
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


class _RebuiltOtherwise(TransientError):
    """An error whose __init__ takes other arguments than its message: pickle cannot rebuild
    it on the service's side."""

    def __init__(self, done: int, total: int) -> None:
        super().__init__(f"{done} of {total} done")


def _raise_rebuilt_otherwise() -> None:
    raise _RebuiltOtherwise(3, 5)


def _raise_checksum_mismatch() -> None:
    raise ChecksumMismatchError("frames/x.jpg", "a" * 64, "b" * 64)


async def test_an_error_keeps_its_kind_so_the_bus_still_tells_retry_from_dead_letter(
    worker: WorkerProcess,
) -> None:
    with pytest.raises(ChecksumMismatchError, match=r"expected sha256 a+, got b+"):
        await worker.call(_raise_checksum_mismatch)
    with pytest.raises(TransientError, match="_RebuiltOtherwise: 3 of 5 done") as raised:
        await worker.call(_raise_rebuilt_otherwise)
    assert type(raised.value) is TransientError  # a stand-in, of the same kind


def _length(payload: list[str]) -> int:
    return len(payload)


_GATED_START = """\
import os, sys, threading
if "--multiprocessing-fork" in sys.argv:
    # Holds the worker's start until the test opens the gate (a FIFO), or 30 s.
    reader = threading.Thread(target=lambda: open(os.environ["GATE"]).read(), daemon=True)
    reader.start()
    reader.join(30)
    if reader.is_alive():
        open(os.environ["GATE"] + ".timed-out", "w").close()
"""


async def test_the_event_loop_runs_while_a_fresh_worker_starts_and_reads_a_large_call(
    worker: WorkerProcess, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A call larger than the pipe's buffer (a TrashNet-sized manifest) is read only once the
    freshly spawned worker's interpreter has started; sent from the event loop, it held up
    every service of `binloop up` for that long. Here the worker's start waits for a gate that
    this test opens, which it can only do while the loop is free; sent from the loop, the
    call would hold it until the gate's 30 s fallback, which leaves a mark."""
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(_GATED_START)
    gate = tmp_path / "gate"
    os.mkfifo(gate)
    monkeypatch.setenv("PYTHONPATH", str(site))
    monkeypatch.setenv("GATE", str(gate))

    def gate_opened() -> bool:
        try:  # without blocking: fails until the worker waits at the gate
            os.close(os.open(gate, os.O_WRONLY | os.O_NONBLOCK))
        except OSError:
            return False
        return True

    payload = [f"{item:064d}" for item in range(50_000)]  # ~3.5 MB pickled
    call = asyncio.create_task(worker.call(_length, payload))
    await eventually(gate_opened, 60)
    assert await call == 50_000
    assert not await asyncio.to_thread(os.path.exists, f"{gate}.timed-out")


def test_a_worker_ends_itself_when_its_service_is_killed(tmp_path: Path) -> None:
    """A killed service's worker would train on and write a model that the restarted
    service may train again."""
    service = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import asyncio, os, time\n"
            "from binloop.worker import WorkerProcess\n"
            "async def main():\n"
            "    worker = WorkerProcess('orphan-test')\n"
            "    print(await worker.call(os.getpid), flush=True)\n"
            "    await worker.call(time.sleep, 600)\n"
            "asyncio.run(main())\n",
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert service.stdout is not None
    worker_pid = int(service.stdout.readline())
    try:
        ended = os.pidfd_open(worker_pid)  # readable once the process has ended
    except ProcessLookupError:  # already ended and reaped
        return
    try:
        service.kill()
        service.wait(timeout=10)
        readable, _, _ = select.select([ended], [], [], 30)
        assert readable, f"worker {worker_pid} still running 30 s after its service was killed"
    finally:
        os.close(ended)
