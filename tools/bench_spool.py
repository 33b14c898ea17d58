"""What the frame-ingestor's disk writes cost per frame: the outbox marker (hold), the frame
itself, and the marker's removal once JetStream acked the event (release).

    .venv/bin/python tools/bench_spool.py --frames 400 --spool /tmp/bench-spool

Prints a table of median and p99 microseconds per frame, on the disk under --spool (default: a
temporary folder; point it at the bin's spool disk to measure that one). The demo stream's
JPEGs are spooled under fresh keys each pass, as distinct frames would be.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

from binloop.storage import LocalBlobStore
from services.frame_ingestor import core
from services.frame_ingestor.jpeg import JPEG, spool_ref
from services.frame_ingestor.outbox import Outbox
from services.frame_ingestor.sources import SourceFrame

BIN_ID = "bench-bin"
DEMO_STREAM = Path("data/demo/stream")


def measure(spool_root: Path, frames: int) -> dict[str, list[float]]:
    spool = LocalBlobStore(spool_root)
    outbox = Outbox(spool, BIN_ID)
    plan = core.CapturePlan(bin_id=BIN_ID, producer="bench-spool")
    jpegs = [path.read_bytes() for path in sorted(DEMO_STREAM.rglob("*.jpg"))]
    if not jpegs:
        raise SystemExit(f"no *.jpg under {DEMO_STREAM}")
    timings: dict[str, list[float]] = {"hold (marker)": [], "frame": [], "release (marker)": []}
    for sequence in range(frames):
        # A distinct frame each time (a trailing byte after the JPEG's end changes its hash).
        jpeg = jpegs[sequence % len(jpegs)] + sequence.to_bytes(4, "big")
        ref = spool_ref(spool, BIN_ID, jpeg)
        event = core._frame_event(SourceFrame(jpeg, 160, 120, None, "bench"), ref, sequence, plan)
        start = time.perf_counter()
        outbox.hold(event)
        held = time.perf_counter()
        spool.put(event.spool.key, jpeg, JPEG)
        written = time.perf_counter()
        outbox.release(event)
        released = time.perf_counter()
        timings["hold (marker)"].append((held - start) * 1e6)
        timings["frame"].append((written - held) * 1e6)
        timings["release (marker)"].append((released - written) * 1e6)
    return timings


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--frames", type=int, default=400)
    parser.add_argument("--spool", type=Path, default=None, help="folder to spool into")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(dir=args.spool) as folder:
        timings = measure(Path(folder), args.frames)
    table = Table(title=f"Spool writes per frame ({args.frames} frames)")
    for column in ("step", "p50 us", "p99 us", "mean us"):
        table.add_column(column, justify="left" if column == "step" else "right")
    for step, samples in timings.items():
        ordered = sorted(samples)
        p99 = ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))]
        table.add_row(
            step,
            f"{statistics.median(ordered):.0f}",
            f"{p99:.0f}",
            f"{statistics.fmean(ordered):.0f}",
        )
    Console().print(table)


if __name__ == "__main__":
    main()
