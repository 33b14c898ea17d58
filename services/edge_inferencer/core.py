"""The edge inferencer's per-frame logic: read, decode, preprocess, infer, decide. No bus here."""

from __future__ import annotations

import math
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from itertools import pairwise
from pathlib import Path
from urllib.parse import urlparse

import numpy as np

from binloop.errors import MissingBlobError, PermanentError, UnknownUriError
from binloop.ml.phash import phash
from binloop.ml.preprocess import FloatArray
from binloop.storage.blobstore import LocalBlobStore, check_sha256, read_verified
from schemas.base import BlobRef
from schemas.events import (
    ActuationCommand,
    ClassScore,
    FrameCaptured,
    InferenceResult,
    StageLatency,
)
from schemas.taxonomy import Compartment, Taxonomy
from services.edge_inferencer.models import LoadedModel

# Outputs are derived from the frame's event id, so a redelivered frame republishes the same
# ids and JetStream's duplicate window drops the copies.
_RESULT_NAMESPACE = uuid.UUID("6f1c1f0e-5b0c-4c53-9a57-3d0f6c1a2b01")
_COMMAND_NAMESPACE = uuid.UUID("0d7f2b9a-8e44-4f0b-b1c6-5a2e7f9d3c02")


@dataclass(frozen=True)
class ProbabilityStats:
    """What a probability distribution says about one frame."""

    label: str
    confidence: float
    margin: float
    entropy: float
    top_k: list[tuple[str, float]]


def _probability(value: float) -> float:
    # float32 sums can land a hair outside [0, 1]; the schema is strict about the range.
    return min(max(float(value), 0.0), 1.0)


def probability_stats(probs: FloatArray, classes: Sequence[str], top_k: int) -> ProbabilityStats:
    """Top-k, confidence, margin (top-1 minus top-2) and entropy in nats of one distribution."""
    if probs.ndim != 1 or probs.shape[0] != len(classes):
        raise ValueError(f"expected {len(classes)} probabilities, got shape {probs.shape}")
    if len(classes) < 2:
        raise ValueError("a classifier needs at least two classes")
    # A handful of values: plain Python floats beat numpy's per-call overhead threefold here.
    values: list[float] = probs.tolist()
    if not all(map(math.isfinite, values)):
        # A broken model (or export): no order of NaNs means anything, and no frame is sorted
        # by one. The frame is dead-lettered with the values, for whoever replaces the model.
        raise PermanentError(f"the model gave non-finite probabilities: {values}")
    order = sorted(range(len(values)), key=values.__getitem__, reverse=True)  # stable on ties
    first, second = values[order[0]], values[order[1]]
    entropy = 0.0 - math.fsum(p * math.log(p) for p in values if p > 0)
    return ProbabilityStats(
        label=classes[order[0]],
        confidence=_probability(first),
        margin=_probability(first - second),
        entropy=max(entropy, 0.0),
        top_k=[(classes[i], _probability(values[i])) for i in order[:top_k]],
    )


@dataclass(frozen=True)
class Decision:
    compartment: Compartment
    abstained: bool
    threshold: float
    """The confidence threshold it was made with; the result carries it to the sampler."""


def decide(stats: ProbabilityStats, taxonomy: Taxonomy, threshold: float) -> Decision:
    """Unsure items go to the fallback compartment: a wrong recycling bin costs more than trash."""
    if stats.confidence < threshold:
        return Decision(taxonomy.fallback, abstained=True, threshold=threshold)
    return Decision(taxonomy.compartment_for(stats.label), abstained=False, threshold=threshold)


@dataclass(frozen=True)
class DecisionPolicy:
    taxonomy: Taxonomy
    confidence_threshold: float
    top_k: int


EMBEDDING_MAX_DIMS = 1024
"""InferenceResult.embedding's bound: a wider feature vector is left off, not truncated."""


@dataclass(frozen=True)
class Classification:
    stats: ProbabilityStats
    decision: Decision
    latency: StageLatency
    embedding: list[float] | None = None
    """The model's feature vector for the sampler's diversity strategy, when it exposes one."""
    phash: str | None = None
    """Perceptual hash of the decoded frame, for the sampler's near-duplicate filter."""


def classify(
    read: Callable[[], bytes], model: LoadedModel, policy: DecisionPolicy
) -> Classification:
    """One frame through every stage, timing each. Blocking: a few milliseconds of CPU."""
    marks = [time.perf_counter()]
    data = read()
    marks.append(time.perf_counter())
    preprocessor = model.preprocessor
    rgb = preprocessor.decode(data)
    marks.append(time.perf_counter())
    resized = preprocessor.resize(rgb)
    # Hashed here, where the pixels are at hand (the sampler never sees them), at the model's
    # input size: the hash shrinks the frame to 32 x 32 anyway, and from the input-size image
    # that costs a fifth of the full frame's shrink, for the same bits (docs/edge-latency.md).
    frame_hash = phash(resized)
    batch = preprocessor.normalise(resized)[np.newaxis]
    marks.append(time.perf_counter())
    probabilities, features = model.backend.predict_with_embedding(batch)
    probs = probabilities[0]
    marks.append(time.perf_counter())
    stats = probability_stats(probs, model.card.classes, policy.top_k)
    decision = decide(stats, policy.taxonomy, policy.confidence_threshold)
    marks.append(time.perf_counter())
    read_ms, decode_ms, preprocess_ms, infer_ms, postprocess_ms = (
        (end - start) * 1000 for start, end in pairwise(marks)
    )
    latency = StageLatency(
        read_ms=read_ms,
        decode_ms=decode_ms,
        preprocess_ms=preprocess_ms,
        infer_ms=infer_ms,
        postprocess_ms=postprocess_ms,
    )
    embedding = None
    if features is not None and features[0].size <= EMBEDDING_MAX_DIMS:
        embedding = features[0].ravel().astype(np.float64).tolist()  # exact, one C loop
    return Classification(stats, decision, latency, embedding, frame_hash)


def build_events(
    frame: FrameCaptured, model: LoadedModel, outcome: Classification, producer: str
) -> tuple[InferenceResult, ActuationCommand]:
    stats, decision = outcome.stats, outcome.decision
    frame_event_id = str(frame.event_id)
    result = InferenceResult(
        event_id=uuid.uuid5(_RESULT_NAMESPACE, frame_event_id),
        producer=producer,
        bin_id=frame.bin_id,
        frame_sha256=frame.frame_sha256,
        frame_event_id=frame_event_id,
        captured_at=frame.captured_at,
        model_name=model.card.name,
        model_version=model.card.version,
        label=stats.label,
        confidence=stats.confidence,
        margin=stats.margin,
        entropy=stats.entropy,
        top_k=[ClassScore(label=label, probability=p) for label, p in stats.top_k],
        compartment=decision.compartment,
        abstained=decision.abstained,
        latency=outcome.latency,
        embedding=outcome.embedding,
        ground_truth=frame.ground_truth,
        phash=outcome.phash,
        num_classes=len(model.card.classes),
        confidence_threshold=decision.threshold,
    )
    command = ActuationCommand(
        event_id=uuid.uuid5(_COMMAND_NAMESPACE, frame_event_id),
        producer=producer,
        bin_id=frame.bin_id,
        frame_sha256=frame.frame_sha256,
        frame_event_id=frame_event_id,
        captured_at=frame.captured_at,
        compartment=decision.compartment,
        label=stats.label,
        confidence=stats.confidence,
        abstained=decision.abstained,
        model_version=model.card.version,
    )
    return result, command


class SpoolReader:
    """Reads frames from this bin's spool by key, checked against the event's sha256.

    The ingestor and the inferencer may mount the spool at different paths (two containers),
    so the key under `spool_root` comes first; the event's own file:// URI is the fallback.
    Any other scheme is an UnknownUriError: frames on the edge live in the spool.
    """

    def __init__(self, spool_root: Path) -> None:
        self.store = LocalBlobStore(spool_root)

    def read(self, ref: BlobRef) -> bytes:
        if urlparse(ref.uri).scheme != "file":
            # Also when this process has an S3 store open (for promoted models): a frame
            # fetched over the network would stall the event loop the frame is handled in.
            raise UnknownUriError(f"frames are read from the spool (file://), not {ref.uri!r}")
        try:
            return check_sha256(ref, self.store.read_sized(ref.key, ref.size))
        except MissingBlobError:
            return read_verified(ref)  # not in this spool: the event's own file:// URI
