"""How many inference results one sampler process judges per second: `Sampler.select_batch`
(every enabled strategy, pHash dedup, rate limits) on batches of realistic results, with the
built-in policy and with every strategy switched on. One process is what runs (its limits and
memories are per process), so this is the fleet's ceiling.

    .venv/bin/python tools/bench_sampler.py --batches 20

Prints a table of results/s. Parsing the JSON payloads is measured on its own row.
"""

from __future__ import annotations

import argparse
import math
import time
import uuid
from datetime import UTC, datetime

import numpy as np
from rich.console import Console
from rich.table import Table

from schemas import ClassScore, InferenceResult, StageLatency
from schemas.taxonomy import Compartment, Taxonomy
from services.sampler.core import build_sampler
from services.sampler.policy import SamplingPolicy

BATCH = 256
"""The sampler's default batch_size."""
BINS = 20
EMBEDDING = 128
"""compact-cnn's embedding width."""
CONFIDENCE_THRESHOLD = 0.5
"""The edge inferencer's default."""


def _results(count: int, rng: np.random.Generator) -> list[InferenceResult]:
    labels = Taxonomy().labels
    results = []
    for i in range(count):
        probabilities = rng.dirichlet(np.full(len(labels), 0.5))
        order = np.argsort(-probabilities)
        top, second = probabilities[order[0]], probabilities[order[1]]
        results.append(
            InferenceResult(
                producer="bench",
                bin_id=f"bin-{i % BINS}",
                frame_sha256=f"{i:064x}",
                frame_event_id=str(uuid.uuid4()),
                captured_at=datetime.now(UTC),
                model_name="compact-cnn",
                model_version=1,
                label=labels[order[0]],
                confidence=float(top),
                margin=float(top - second),
                entropy=float(-sum(p * math.log(p) for p in probabilities if p > 0)),
                top_k=[
                    ClassScore(label=labels[k], probability=float(probabilities[k])) for k in order
                ],
                compartment=Compartment.TRASH,
                abstained=bool(top < CONFIDENCE_THRESHOLD),
                latency=StageLatency(
                    read_ms=0.1, decode_ms=1, preprocess_ms=0.3, infer_ms=3, postprocess_ms=0.1
                ),
                embedding=rng.normal(size=EMBEDDING).tolist(),
                phash=f"{int(rng.integers(0, 2**63)):016x}",
                num_classes=len(labels),
                confidence_threshold=CONFIDENCE_THRESHOLD,
            )
        )
    return results


def _every_strategy() -> SamplingPolicy:
    policy = SamplingPolicy().model_dump()
    for settings in policy["strategies"].values():
        settings["enabled"] = True
    return SamplingPolicy.model_validate(policy)


def _select_rate(policy: SamplingPolicy, batches: list[list[InferenceResult]]) -> float:
    sampler = build_sampler(policy, "bench")
    started = time.perf_counter()
    for batch in batches:
        sampler.select_batch(batch)
    return sum(map(len, batches)) / (time.perf_counter() - started)


def _parse_rate(batches: list[list[InferenceResult]]) -> float:
    payloads = [r.model_dump_json().encode() for batch in batches for r in batch]
    started = time.perf_counter()
    for payload in payloads:
        InferenceResult.model_validate_json(payload)
    return len(payloads) / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batches", type=int, default=20, help=f"batches of {BATCH} results")
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    results = _results(args.batches * BATCH, rng)
    batches = [results[i : i + BATCH] for i in range(0, len(results), BATCH)]
    table = Table(title=f"One sampler process, {len(results)} results from {BINS} bins")
    table.add_column("work")
    table.add_column("results/s", justify="right")
    table.add_row(
        "select_batch, built-in policy", f"{_select_rate(SamplingPolicy(), batches):,.0f}"
    )
    table.add_row(
        "select_batch, every strategy on", f"{_select_rate(_every_strategy(), batches):,.0f}"
    )
    table.add_row("parse the JSON payload", f"{_parse_rate(batches):,.0f}")
    Console().print(table)


if __name__ == "__main__":
    main()
