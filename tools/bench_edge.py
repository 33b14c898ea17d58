"""Edge latency: raw onnxruntime, the edge inferencer's whole per-frame path (into JetStream),
PyTorch eager and the INT8 graph, batch 1, with 1 and 2 threads, for `binloop train` outputs.

    nice -n 10 .venv/bin/python tools/bench_edge.py \
        --model runs/edge-bench/compact-cnn-64 --model runs/edge-bench/mobilenet_v3_small-224

Each --model is a `binloop train --out` folder (model.onnx, card.json, model.pt and, with
--int8, model.int8.onnx). Prints p50/p99 tables, saves one histogram per model under
docs/img/ and rewrites the generated part of docs/edge-latency.md (see that file).
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import gc
import os
import platform
import re
import shlex
import sys
import tempfile
import time
import uuid
from collections import Counter
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from functools import partial
from pathlib import Path

import cv2
import nats
import numpy as np
import numpy.typing as npt
import onnxruntime as ort
import torch
from matplotlib.figure import Figure
from nats.aio.client import Client as NatsClient
from rich.console import Console
from rich.table import Table

from binloop.bus import Outgoing, PendingAcks, Publisher, ensure_streams, make_broker
from binloop.bus.consume import DEFAULT_MAX_UNSETTLED, Settlements
from binloop.ml.card import ModelCard
from binloop.ml.preprocess import FloatArray, Preprocessor, decode_rgb
from binloop.natsserver import NatsServer
from binloop.storage import LocalBlobStore
from schemas.events import FrameCaptured
from schemas.routes import ACTUATION_COMMAND, INFERENCE_RESULT
from services.edge_inferencer.core import (
    DecisionPolicy,
    SpoolReader,
    build_events,
    classify,
)
from services.edge_inferencer.models import ModelSlot, card_path_for, load_model
from services.edge_inferencer.settings import EdgeInferencerSettings
from services.trainer.nets import ExposesEmbedding, build_model

Nanoseconds = npt.NDArray[np.int64]
PRODUCER = "edge-inferencer-bench"
BIN_ID = "bench-bin"
BEGIN, END = "<!-- bench_edge:begin -->", "<!-- bench_edge:end -->"

ONNX_RAW = "onnx fp32 session.run"
EDGE_PATH = "edge path fp32"
TORCH_EAGER = "torch eager fp32"
INT8_RAW = "onnx int8 session.run"
INT8_EDGE_PATH = "edge path int8"
ACKED = " until acked"
"""Suffix of the rows that time a frame up to JetStream's ack of both outputs."""
VARIANTS = (ONNX_RAW, EDGE_PATH, TORCH_EAGER, INT8_RAW, INT8_EDGE_PATH)

# The targets (issue 3, "Speed on the edge").
PATH_OVERHEAD_MAX = 1.3
ONE_CORE_P99_MAX_MS = 15.0
TORCH_SLOWDOWN_MIN = 2.0


@dataclass
class Measurement:
    model: str
    threads: int
    variant: str
    samples_ns: Nanoseconds

    def percentile_ms(self, q: float) -> float:
        return float(np.percentile(self.samples_ns, q)) / 1e6

    @property
    def p50(self) -> float:
        return self.percentile_ms(50)

    @property
    def p99(self) -> float:
        return self.percentile_ms(99)

    @property
    def mean(self) -> float:
        return float(self.samples_ns.mean()) / 1e6


@dataclass
class StageBreakdown:
    """Median milliseconds per stage of the edge path, from classify's own StageLatency."""

    model: str
    threads: int
    variant: str
    stages: dict[str, list[float]] = field(default_factory=dict)

    def add(self, stage: str, ms: float) -> None:
        self.stages.setdefault(stage, []).append(ms)

    def medians(self) -> dict[str, float]:
        return {stage: float(np.median(values)) for stage, values in self.stages.items()}


@dataclass(frozen=True)
class BenchModel:
    """One `binloop train` output folder."""

    folder: Path
    card: ModelCard
    onnx: Path
    int8: Path | None
    weights: Path | None
    """The trained torch weights; without them eager mode runs the same network freshly
    initialised (latency does not depend on the values of the weights)."""
    tag: str | None = None
    """Set to the folder's name (its path when names repeat too) when another --model has the
    same architecture and input size, so that their rows (keyed by label) stay apart."""

    @property
    def label(self) -> str:
        height, width = self.card.input_size
        label = f"{self.card.architecture}@{height}x{width}"
        return label if self.tag is None else f"{label} ({self.tag})"

    @property
    def slug(self) -> str:
        return re.sub(r"[^A-Za-z0-9_.-]+", "_", self.label.replace("@", "-")).strip("_")

    @classmethod
    def open(cls, folder: Path) -> BenchModel:
        onnx = folder / "model.onnx"
        card = ModelCard.read(card_path_for(onnx))
        int8, weights = folder / "model.int8.onnx", folder / "model.pt"
        return cls(
            folder,
            card,
            onnx,
            int8 if int8.exists() else None,
            weights if weights.exists() else None,
        )


def distinct_labels(models: list[BenchModel]) -> list[BenchModel]:
    """Tags the models whose label another one shares with their folder's name, or with the
    folder's path where two such folders have the same name."""
    labels = Counter(model.label for model in models)
    names = Counter((model.label, model.folder.name) for model in models)

    def tag(model: BenchModel) -> str:
        unique = names[(model.label, model.folder.name)] == 1
        return model.folder.name if unique else str(model.folder)

    return [
        dataclasses.replace(model, tag=tag(model)) if labels[model.label] > 1 else model
        for model in models
    ]


@dataclass(frozen=True)
class DemoFrame:
    """A real demo JPEG in the bench's spool, and a FrameCaptured template pointing at it."""

    template: FrameCaptured
    rgb: npt.NDArray[np.uint8]


def spool_frames(source: Path, spool: LocalBlobStore, limit: int) -> list[DemoFrame]:
    paths = sorted(source.rglob("*.jpg"))[:limit]
    if not paths:
        raise SystemExit(f"no *.jpg under {source}")
    frames = []
    for sequence, path in enumerate(paths):
        data = path.read_bytes()
        ref = spool.put(f"{BIN_ID}/{path.parent.name}/{path.name}", data, "image/jpeg")
        rgb = decode_rgb(data)
        template = FrameCaptured(
            producer="frame-ingestor-bench",
            bin_id=BIN_ID,
            frame_sha256=ref.sha256,
            spool=ref,
            captured_at=datetime.now(UTC),
            width=rgb.shape[1],
            height=rgb.shape[0],
            source=str(path),
            sequence=sequence,
        )
        frames.append(DemoFrame(template, rgb))
    return frames


def time_calls(call: Callable[[], object], warmup: int, iterations: int) -> Nanoseconds:
    for _ in range(warmup):
        call()
    gc.collect()
    samples = np.empty(iterations, dtype=np.int64)
    for i in range(iterations):
        start = time.perf_counter_ns()
        call()
        samples[i] = time.perf_counter_ns() - start
    return samples


def raw_session(path: Path, threads: int) -> ort.InferenceSession:
    """The same session options as binloop.ml.backend.OnnxBackend, without its wrapper."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def time_onnx_raw(path: Path, batch: FloatArray, threads: int, warmup: int, n: int) -> Nanoseconds:
    session = raw_session(path, threads)
    feed = {session.get_inputs()[0].name: batch}
    # All outputs (logits and embedding), as the edge asks for both in one run.
    return time_calls(lambda: session.run(None, feed), warmup, n)


def time_torch_eager(model: BenchModel, batch: FloatArray, warmup: int, n: int) -> Nanoseconds:
    network = build_model(model.card.architecture, len(model.card.classes))
    if model.weights is not None:
        network.load_state_dict(torch.load(model.weights, map_location="cpu", weights_only=True))
    network.eval()
    tensor = torch.from_numpy(batch)
    forward: Callable[[torch.Tensor], object] = (
        network.logits_and_embedding if isinstance(network, ExposesEmbedding) else network
    )

    def call() -> object:
        with torch.inference_mode():
            return forward(tensor)

    return time_calls(call, warmup, n)


class EdgePath:
    """The edge inferencer's frame handler body (services/edge_inferencer/app.py on_frame)
    and its pipelined consumer (binloop.bus.subscribe(pipelined=True)): validate the incoming
    event, read the frame from the spool (sha256 checked), decode, preprocess, infer,
    postprocess and decide (in the event loop, as the service does), build both events and
    send them to JetStream. As in the service, the next frame starts while JetStream acks the
    outputs (the consumer's own Settlements, at most DEFAULT_MAX_UNSETTLED frames waiting);
    the time until both acks is recorded as well."""

    def __init__(
        self,
        publisher: Publisher,
        connection: NatsClient,
        reader: SpoolReader,
        policy: DecisionPolicy,
    ) -> None:
        self.publisher = publisher
        self.connection = connection
        self.reader = reader
        self.policy = policy
        self.settlements = Settlements(PRODUCER, DEFAULT_MAX_UNSETTLED)
        self.failed_acks: list[BaseException] = []

    async def measure(
        self,
        onnx: Path,
        card: Path,
        threads: int,
        frames: list[DemoFrame],
        warmup: int,
        iterations: int,
        breakdown: StageBreakdown,
    ) -> tuple[Nanoseconds, Nanoseconds]:
        """Per frame: the handler's time (to the outputs sent) and the time until acked."""
        slot = ModelSlot(BIN_ID)
        await slot.install(load_model(onnx, card, intra_op_threads=threads))
        for payload in self._payloads(frames, warmup):
            await self._one_frame(slot, payload, None, None)
            await self._between_frames()
        await self._settled()
        gc.collect()
        samples = np.empty(iterations, dtype=np.int64)
        acked = np.empty(iterations, dtype=np.int64)
        for i, payload in enumerate(self._payloads(frames, iterations)):
            start = time.perf_counter_ns()
            await self._one_frame(slot, payload, breakdown, partial(acked.__setitem__, i))
            samples[i] = time.perf_counter_ns() - start
            await self._between_frames()
        await self._settled()
        return samples, acked

    @staticmethod
    def _payloads(frames: list[DemoFrame], count: int) -> Iterator[bytes]:
        # Made before the clock starts. A fresh event id per frame: a repeated one would make
        # JetStream drop the outputs as duplicates and do less work than the real loop.
        for i in range(count):
            frame = frames[i % len(frames)].template
            yield frame.model_copy(update={"event_id": uuid.uuid4()}).model_dump_json().encode()

    async def _one_frame(
        self,
        slot: ModelSlot,
        payload: bytes,
        breakdown: StageBreakdown | None,
        on_acked: Callable[[int], None] | None,
    ) -> None:
        start = time.perf_counter_ns()
        frame = FrameCaptured.model_validate_json(payload)
        async with slot.use() as model:
            outcome = classify(partial(self.reader.read, frame.spool), model, self.policy)
        classified = time.perf_counter_ns()
        result, command = build_events(frame, model, outcome, PRODUCER)
        built = time.perf_counter_ns()
        pending = await self.publisher.send_all(
            [
                Outgoing(ACTUATION_COMMAND, command, frame.bin_id),
                Outgoing(INFERENCE_RESULT, result, frame.bin_id),
            ]
        )
        sent = time.perf_counter_ns()
        await self.settlements.start(self._settle(pending, start, sent, breakdown, on_acked))
        if breakdown is None:
            return
        stages = outcome.latency
        inside = (
            stages.read_ms
            + stages.decode_ms
            + stages.preprocess_ms
            + stages.infer_ms
            + stages.postprocess_ms
        )
        breakdown.add("classify", inside)
        breakdown.add("read", stages.read_ms)
        breakdown.add("decode", stages.decode_ms)
        breakdown.add("preproc+phash", stages.preprocess_ms)
        breakdown.add("infer", stages.infer_ms)
        breakdown.add("postproc", stages.postprocess_ms)
        # Parsing the event and taking the model slot, outside classify's clock.
        breakdown.add("event+slot", (classified - start) / 1e6 - inside)
        breakdown.add("build", (built - classified) / 1e6)
        breakdown.add("send x2", (sent - built) / 1e6)

    async def _settle(
        self,
        pending: PendingAcks,
        start: int,
        sent: int,
        breakdown: StageBreakdown | None,
        on_acked: Callable[[int], None] | None,
    ) -> None:
        try:
            await pending.wait()
        except Exception as exc:  # counted, and the run fails in _settled
            self.failed_acks.append(exc)
            return
        acked = time.perf_counter_ns()
        if on_acked is not None:
            on_acked(acked - start)
        if breakdown is not None:
            breakdown.add("ack wait (pipelined)", (acked - sent) / 1e6)

    async def _between_frames(self) -> None:
        # The service fetches its next frame here: a round trip to nats-server during which
        # the loop handles the acks that came in meanwhile. A PING/PONG on the same
        # connection stands in for it (untimed, as the fetch is outside the handler).
        await self.connection.flush()

    async def _settled(self) -> None:
        await self.settlements.drain()
        if self.failed_acks:  # a benchmark that lost an output must not report
            raise SystemExit(f"{len(self.failed_acks)} acks failed: {self.failed_acks[0]!r}")


def set_threads(threads: int) -> None:
    """Every library in the path gets the same thread budget as onnxruntime."""
    torch.set_num_threads(threads)
    cv2.setNumThreads(threads)


async def bench_model(
    model: BenchModel,
    edge: EdgePath,
    frames: list[DemoFrame],
    thread_counts: list[int],
    warmup: int,
    iterations: int,
    console: Console,
) -> tuple[list[Measurement], list[StageBreakdown]]:
    card_path = card_path_for(model.onnx)
    batch = Preprocessor.from_card(model.card)(frames[0].rgb)[np.newaxis]
    measurements: list[Measurement] = []
    breakdowns: list[StageBreakdown] = []
    for threads in thread_counts:
        set_threads(threads)

        def record(variant: str, samples: Nanoseconds, threads: int = threads) -> None:
            measurements.append(Measurement(model.label, threads, variant, samples))
            console.log(f"{model.label} threads={threads} {variant}: done")

        async def edge_path(variant: str, onnx: Path, threads: int = threads) -> None:
            breakdown = StageBreakdown(model.label, threads, variant)
            samples, acked = await edge.measure(
                onnx, card_path, threads, frames, warmup, iterations, breakdown
            )
            breakdowns.append(breakdown)
            record(variant, samples)
            record(variant + ACKED, acked)

        record(ONNX_RAW, time_onnx_raw(model.onnx, batch, threads, warmup, iterations))
        await edge_path(EDGE_PATH, model.onnx)
        record(TORCH_EAGER, time_torch_eager(model, batch, warmup, iterations))
        if model.int8 is not None:
            record(INT8_RAW, time_onnx_raw(model.int8, batch, threads, warmup, iterations))
            await edge_path(INT8_EDGE_PATH, model.int8)
    return measurements, breakdowns


async def run_with_bus(
    store_dir: Path, work: Callable[[EdgePath, Callable[[], Awaitable[int]]], Awaitable[None]]
) -> None:
    """Starts nats-server (JetStream, file store), creates the streams and hands `work` the
    edge path plus a counter of what the INFERENCE stream holds."""
    with NatsServer(store_dir / "nats") as server:
        client = await nats.connect(server.url)
        js = client.jetstream()
        await ensure_streams(js)
        broker = make_broker(server.url, "bench-edge")
        await broker.connect()
        settings = EdgeInferencerSettings()
        policy = DecisionPolicy(settings.taxonomy, settings.confidence_threshold, settings.top_k)
        edge = EdgePath(
            Publisher(broker, PRODUCER), broker.connection, SpoolReader(store_dir / "spool"), policy
        )

        async def stored_results() -> int:
            info = await js.stream_info(INFERENCE_RESULT.stream)
            return int(info.state.messages)

        try:
            await work(edge, stored_results)
        finally:
            await broker.stop()
            await client.drain()


def by_key(measurements: list[Measurement]) -> dict[tuple[str, int, str], Measurement]:
    return {(m.model, m.threads, m.variant): m for m in measurements}


def latency_rows(measurements: list[Measurement]) -> list[list[str]]:
    table = by_key(measurements)
    rows = []
    for m in measurements:
        raw = table.get((m.model, m.threads, ONNX_RAW))
        ratio = f"{m.p50 / raw.p50:.2f}x" if raw is not None else "-"
        rows.append(
            [
                m.model,
                str(m.threads),
                m.variant,
                f"{m.p50:.2f}",
                f"{m.p99:.2f}",
                f"{m.mean:.2f}",
                ratio,
                str(len(m.samples_ns)),
            ]
        )
    return rows


LATENCY_HEADERS = [
    "model",
    "threads",
    "variant",
    "p50 ms",
    "p99 ms",
    "mean ms",
    "p50 / raw fp32",
    "n",
]


def stage_rows(breakdowns: list[StageBreakdown]) -> tuple[list[str], list[list[str]]]:
    stages = list(breakdowns[0].stages) if breakdowns else []
    rows = [
        [b.model, str(b.threads), b.variant, *(f"{b.medians()[s]:.3f}" for s in stages)]
        for b in breakdowns
    ]
    return ["model", "threads", "variant", *(f"{s} ms" for s in stages)], rows


@dataclass(frozen=True)
class Verdict:
    model: str
    target: str
    measured: str
    holds: bool


PRECISIONS = ((ONNX_RAW, EDGE_PATH), (INT8_RAW, INT8_EDGE_PATH))
"""Each graph's (session.run, edge path) rows; every target is judged for each graph measured."""


def _ratio_verdict(
    model: str,
    target: str,
    slower: Measurement,
    faster: Measurement,
    holds: Callable[[float], bool],
) -> Verdict:
    """A target on the ratio of two medians."""
    ratio = slower.p50 / faster.p50
    measured = f"{slower.p50:.2f} / {faster.p50:.2f} ms = {ratio:.2f}x"
    return Verdict(model, target, measured, holds(ratio))


def verdicts(measurements: list[Measurement]) -> list[Verdict]:
    table = by_key(measurements)
    found: list[Verdict] = []
    for model in dict.fromkeys(m.model for m in measurements):
        threads = sorted({m.threads for m in measurements if m.model == model})
        for raw_variant, path_variant in PRECISIONS:
            if (model, threads[0], raw_variant) not in table:
                continue  # no INT8 twin
            graph = raw_variant.removesuffix(" session.run")
            for t in threads:
                raw, path = table[(model, t, raw_variant)], table[(model, t, path_variant)]
                target = f"{path_variant} p50 <= {PATH_OVERHEAD_MAX}x {raw_variant} p50 ({t} thr)"
                found.append(
                    _ratio_verdict(model, target, path, raw, lambda r: r <= PATH_OVERHEAD_MAX)
                )
            if 1 in threads:
                for variant in (raw_variant, path_variant):
                    m = table[(model, 1, variant)]
                    found.append(
                        Verdict(
                            model,
                            f"{variant} p99 < {ONE_CORE_P99_MAX_MS:g} ms (1 thr)",
                            f"{m.p99:.2f} ms",
                            m.p99 < ONE_CORE_P99_MAX_MS,
                        )
                    )
            for t in threads:
                raw, eager = table[(model, t, raw_variant)], table[(model, t, TORCH_EAGER)]
                target = f"torch eager p50 >= {TORCH_SLOWDOWN_MIN:g}x {graph} p50 ({t} thr)"
                found.append(
                    _ratio_verdict(model, target, eager, raw, lambda r: r >= TORCH_SLOWDOWN_MIN)
                )
    return found


def print_tables(
    console: Console, measurements: list[Measurement], breakdowns: list[StageBreakdown]
) -> None:
    latency = Table(title="Edge latency, batch 1 (ms)")
    for header in LATENCY_HEADERS:
        latency.add_column(header, justify="left" if header in ("model", "variant") else "right")
    for row in latency_rows(measurements):
        latency.add_row(*row)
    console.print(latency)
    headers, rows = stage_rows(breakdowns)
    stages = Table(title="Edge path, median per stage (ms)")
    for header in headers:
        stages.add_column(header, justify="left" if header in ("model", "variant") else "right")
    for row in rows:
        stages.add_row(*row)
    console.print(stages)
    targets = Table(title="Issue 3 targets")
    for header in ("model", "target", "measured", "holds"):
        targets.add_column(header)
    for v in verdicts(measurements):
        targets.add_row(v.model, v.target, v.measured, "yes" if v.holds else "[red]no[/red]")
    console.print(targets)


def save_histogram(model: str, measurements: list[Measurement], path: Path) -> None:
    mine = [m for m in measurements if m.model == model]
    thread_counts = sorted({m.threads for m in mine})
    all_ms = np.concatenate([m.samples_ns for m in mine]) / 1e6
    bins = np.geomspace(max(all_ms.min(), 1e-3), all_ms.max(), 80)
    # The object API renders with Agg and leaves pyplot's global state alone.
    figure = Figure(figsize=(9, 3.2 * len(thread_counts)))
    axes = figure.subplots(len(thread_counts), 1, squeeze=False)
    for axis, threads in zip(axes[:, 0], thread_counts, strict=True):
        for m in mine:
            if m.threads != threads:
                continue
            axis.hist(
                m.samples_ns / 1e6,
                bins=bins,
                histtype="step",
                linewidth=1.4,
                label=f"{m.variant} (p50 {m.p50:.2f}, p99 {m.p99:.2f})",
            )
        axis.set_xscale("log")
        axis.set_title(f"{model}, batch 1, {threads} thread(s)")
        axis.set_xlabel("latency per call (ms, log scale)")
        axis.set_ylabel("calls")
        axis.legend(fontsize=8)
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110)


def markdown_table(headers: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + " --- |" * len(headers)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


@dataclass(frozen=True)
class RunInfo:
    command: str
    started: datetime
    load_before: tuple[float, float, float]
    load_after: tuple[float, float, float]
    frames: int
    warmup: int
    iterations: int
    stored_ok: str

    def machine(self) -> str:
        before = ", ".join(f"{x:.2f}" for x in self.load_before)
        after = ", ".join(f"{x:.2f}" for x in self.load_after)
        return (
            f"{cpu_name()}, {os.cpu_count()} logical CPUs shared with other processes "
            f"(load average before {before}, after {after}); Python {platform.python_version()}, "
            f"onnxruntime {ort.__version__}, torch {torch.__version__}, OpenCV {cv2.__version__}, "
            f"numpy {np.__version__}; {self.started:%Y-%m-%d %H:%M} UTC."
        )


def generated_section(
    info: RunInfo,
    measurements: list[Measurement],
    breakdowns: list[StageBreakdown],
    images: dict[str, Path],
    doc: Path,
) -> str:
    stage_headers, stage_table = stage_rows(breakdowns)
    verdict_rows = [
        [v.model, v.target, v.measured, "**yes**" if v.holds else "**no**"]
        for v in verdicts(measurements)
    ]
    pictures = "\n\n".join(
        f"![{model}]({os.path.relpath(path, doc.parent)})" for model, path in images.items()
    )
    return "\n\n".join(
        [
            BEGIN,
            "_Generated by `tools/bench_edge.py`; rerun it rather than editing this part._",
            f"Command:\n\n```bash\n{info.command}\n```",
            f"Machine: {info.machine()}",
            f"{info.frames} real demo frames (160x120 JPEG) cycled; {info.warmup} warm-up and "
            f"{info.iterations} timed calls per row, each timed with `time.perf_counter_ns`. "
            f"{info.stored_ok}",
            "### Latency",
            markdown_table(LATENCY_HEADERS, latency_rows(measurements)),
            "### Edge path by stage (medians)",
            markdown_table(stage_headers, stage_table),
            "### Targets (issue 3)",
            markdown_table(["model", "target", "measured", "holds"], verdict_rows),
            "### Histograms",
            pictures,
            END,
        ]
    )


def write_doc(doc: Path, section: str) -> None:
    """Replaces the generated part between the markers; keeps the hand-written rest."""
    if doc.exists():
        text = doc.read_text()
        if BEGIN in text and END in text:
            head, _, rest = text.partition(BEGIN)
            _, _, tail = rest.partition(END)
            doc.write_text(head + section + tail)
            return
    doc.parent.mkdir(parents=True, exist_ok=True)
    doc.write_text(f"# Edge latency\n\n{section}\n")


def nice_prefix() -> list[str]:
    niceness = os.nice(0)
    return ["nice", "-n", str(niceness)] if niceness > 0 else []


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument(
        "--model",
        type=Path,
        action="append",
        required=True,
        help="a `binloop train --out` folder; repeat for several models",
    )
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--iterations", type=int, default=2000, help="timed calls per row")
    parser.add_argument("--warmup", type=int, default=100)
    parser.add_argument("--frames", type=Path, default=Path("data/demo/stream"))
    parser.add_argument("--max-frames", type=int, default=64, help="demo frames to cycle")
    parser.add_argument("--doc", type=Path, default=Path("docs/edge-latency.md"))
    parser.add_argument("--img-dir", type=Path, default=Path("docs/img"))
    parser.add_argument("--no-doc", action="store_true", help="print only, write nothing")
    return parser.parse_args(argv)


async def main(argv: list[str]) -> None:
    args = parse_args(argv)
    # Wide enough for the tables when the output is a pipe or a log file.
    console = Console(width=None if sys.stdout.isatty() else 170)
    models = distinct_labels([BenchModel.open(folder) for folder in args.model])
    # One graph at a time: parallelism between torch ops would not be a fair comparison.
    torch.set_num_interop_threads(1)
    started = datetime.now(UTC)
    load_before = os.getloadavg()
    measurements: list[Measurement] = []
    breakdowns: list[StageBreakdown] = []
    with tempfile.TemporaryDirectory(prefix="bench-edge-") as folder:
        store_dir = Path(folder)
        frames = spool_frames(args.frames, LocalBlobStore(store_dir / "spool"), args.max_frames)
        stored_ok = ""

        async def work(edge: EdgePath, stored_results: Callable[[], Awaitable[int]]) -> None:
            nonlocal stored_ok
            for model in models:
                found, stages = await bench_model(
                    model, edge, frames, args.threads, args.warmup, args.iterations, console
                )
                measurements.extend(found)
                breakdowns.extend(stages)
            published = sum(
                args.warmup + args.iterations
                for m in measurements
                if m.variant in (EDGE_PATH, INT8_EDGE_PATH)
            )
            stored = await stored_results()
            stored_ok = (
                f"JetStream stored {stored} of the {published} inference results published "
                "(every frame had its own event id)."
            )
            if stored != published:
                raise SystemExit(f"published {published} inference results, stored {stored}")

        await run_with_bus(store_dir, work)
    print_tables(console, measurements, breakdowns)
    console.print(stored_ok)
    if args.no_doc:
        return
    images = {}
    for model in models:
        path = args.img_dir / f"edge_latency_{model.slug}.png"
        save_histogram(model.label, measurements, path)
        images[model.label] = path
    info = RunInfo(
        command=shlex.join([*nice_prefix(), ".venv/bin/python", "tools/bench_edge.py", *argv]),
        started=started,
        load_before=load_before,
        load_after=os.getloadavg(),
        frames=len(frames),
        warmup=args.warmup,
        iterations=args.iterations,
        stored_ok=stored_ok,
    )
    write_doc(args.doc, generated_section(info, measurements, breakdowns, images, args.doc))
    console.print(f"wrote {args.doc} and {', '.join(str(p) for p in images.values())}")


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1:]))
