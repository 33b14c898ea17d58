"""Every event on the bus. One class per subject family; see schemas.routes for subjects."""

from __future__ import annotations

import uuid
from typing import Annotated, Literal, Self

from pydantic import AwareDatetime, Field, FiniteFloat, StringConstraints, model_validator

from schemas.base import BinId, BlobRef, Event, Frozen, Name, Sha256
from schemas.taxonomy import Compartment

LABEL_PATTERN = r"^[a-z0-9_]{1,64}$"
"""A class label, object or condition: also a key in metrics and file names."""
Label = Annotated[str, StringConstraints(pattern=LABEL_PATTERN)]
Probability = Annotated[float, Field(ge=0.0, le=1.0)]
Version = Annotated[int, Field(ge=1)]
Milliseconds = Annotated[FiniteFloat, Field(ge=0)]
"""A duration: infinity (which JSON's `Infinity` literal parses to) is no time a step took."""
ChampionRevision = Annotated[
    int | None,
    Field(
        ge=0,
        description="Revision of the registry's champion key that this change replaced (0: "
        "no champion yet). Every later change of the champion in the same bucket (see "
        "champion_epoch) carries a larger one, whatever the clocks or the order of arrival: a "
        "consumer that applied one ignores any event with a revision not above it. None from "
        "registries before it was sent: order those by occurred_at.",
    ),
]
ChampionEpoch = Annotated[
    AwareDatetime | None,
    Field(
        description="When the registry's bucket that counts champion_revision was created. "
        "A recreated bucket counts its revisions from the start again and has a later one: "
        "a consumer orders events of two epochs by epoch, and by champion_revision within "
        "one. None from registries before it was sent: such an event is older than any with "
        "an epoch, and two without one order by champion_revision.",
    ),
]


class FrameCaptured(Event):
    """A camera frame, written to the edge spool; the event carries only its reference."""

    bin_id: BinId
    frame_sha256: Sha256
    spool: BlobRef
    captured_at: AwareDatetime
    width: int = Field(ge=1, le=16384)
    height: int = Field(ge=1, le=16384)
    source: Annotated[str, StringConstraints(max_length=512)]
    sequence: int = Field(ge=0, description="Position in the source, for ordering and counting.")
    ground_truth: Label | None = Field(
        default=None, description="Known label when replaying a labeled stream (simulation)."
    )


class ClassScore(Frozen):
    label: Label
    probability: Probability


class StageLatency(Frozen):
    """Milliseconds spent in each step of the edge inferencer's per-frame path."""

    read_ms: Milliseconds
    decode_ms: Milliseconds
    preprocess_ms: Milliseconds
    infer_ms: Milliseconds
    postprocess_ms: Milliseconds


class InferenceResult(Event):
    """What the edge decided for one frame, and the class count and threshold it decided by."""

    bin_id: BinId
    frame_sha256: Sha256
    frame_event_id: str = Field(description="event_id of the frames.captured event it answers.")
    captured_at: AwareDatetime
    model_name: Name
    model_version: Version
    label: Label
    confidence: Probability
    margin: Probability = Field(description="top-1 minus top-2 probability")
    entropy: FiniteFloat = Field(ge=0, description="Shannon entropy of the distribution, in nats")
    top_k: list[ClassScore] = Field(min_length=1, max_length=16)
    compartment: Compartment
    abstained: bool = Field(description="Confidence below threshold: sent to trash instead.")
    latency: StageLatency
    embedding: list[FiniteFloat] | None = Field(
        default=None,
        max_length=1024,
        description="The model's embedding of the frame; finite values only (one NaN or "
        "infinity would poison every distance the sampler's diversity strategies take).",
    )
    ground_truth: Label | None = None
    phash: str | None = Field(
        default=None,
        pattern="^[0-9a-f]{16}$",
        description="64-bit perceptual hash of the frame (16 hex digits), computed on the edge "
        "from the decoded image; the sampler drops near-duplicates by Hamming distance.",
    )
    num_classes: int | None = Field(
        default=None,
        ge=2,
        le=100_000,
        description="Classes the model scores (the length of its card's class list): the "
        "sampler's entropy strategy divides entropy by ln(num_classes). None from an edge older "
        "than this field.",
    )
    confidence_threshold: Probability | None = Field(
        default=None,
        description="The edge's confidence_threshold this decision was made with: `abstained` "
        "is confidence below it; the sampler's threshold band is centred on it. None from an "
        "edge older than this field.",
    )

    @model_validator(mode="after")
    def _consistent(self) -> Self:
        # Each of these contradicts the result itself, so the sampler would aim at a wrong
        # threshold or normalise by a wrong class count.
        if self.num_classes is not None and len(self.top_k) > self.num_classes:
            raise ValueError(
                f"top_k lists {len(self.top_k)} classes, more than num_classes ({self.num_classes})"
            )
        if self.confidence_threshold is not None and self.abstained != (
            self.confidence < self.confidence_threshold
        ):
            relation = "below" if self.confidence < self.confidence_threshold else "not below"
            raise ValueError(
                f"abstained is {str(self.abstained).lower()} but confidence {self.confidence} "
                f"is {relation} confidence_threshold {self.confidence_threshold}"
            )
        return self


class ActuationCommand(Event):
    bin_id: BinId
    frame_sha256: Sha256
    frame_event_id: str
    captured_at: AwareDatetime
    compartment: Compartment
    label: Label
    confidence: Probability
    abstained: bool
    model_version: Version


class ActuationDone(Event):
    bin_id: BinId
    frame_sha256: Sha256
    frame_event_id: str
    captured_at: AwareDatetime
    compartment: Compartment
    ok: bool
    error: str | None = Field(default=None, max_length=1024)
    actuation_ms: float = Field(ge=0)


class FrameStored(Event):
    """The frame is safely in object storage; the spool copy may now be reclaimed."""

    bin_id: BinId
    frame_sha256: Sha256
    frame_event_id: str
    captured_at: AwareDatetime
    blob: BlobRef
    ground_truth: Label | None = None


SamplingStrategy = Literal[
    "least_confidence",
    "margin",
    "entropy",
    "threshold_band",
    "class_balance",
    "diversity",
    "representative",
    "disagreement",
    "random",
    "seed",
]


class SampleSelected(Event):
    """A frame worth labeling, with why it was picked and what the model thought."""

    bin_id: BinId
    frame_sha256: Sha256
    frame_key: str = Field(description="Object-store key the frame is (or will be) stored under.")
    captured_at: AwareDatetime
    strategy: SamplingStrategy
    score: float
    reason: Annotated[str, StringConstraints(max_length=512)]
    predicted: list[ClassScore] = Field(min_length=1, max_length=16)
    model_name: Name
    model_version: Version
    ground_truth: Label | None = None
    source_event_id: uuid.UUID | None = Field(
        default=None,
        description="event_id of the inference result the frame was selected from: a sampler "
        "restarted after publishing this selection but before acking that result tells the "
        "redelivered result from another result for the same frame. None from a sampler older "
        "than this field.",
    )


class LabelAnnotated(Event):
    frame_sha256: Sha256
    bin_id: BinId
    frame: BlobRef
    label: Label
    compartment: Compartment
    backend: Name = Field(description="Labeling backend: oracle, label-studio, ...")
    annotator: Name
    annotation_id: Name
    taxonomy_version: Name


class DatasetSnapshot(Event):
    name: Name
    version: Version
    manifest: BlobRef
    num_items: int = Field(ge=0)
    class_counts: dict[str, int]
    taxonomy_version: Name


class TrainingRequested(Event):
    dataset_name: Name
    dataset_version: Version | None = Field(default=None, description="None: the latest.")
    reason: Annotated[str, StringConstraints(max_length=512)] = "requested"


class ModelMetrics(Frozen):
    eval_set_id: Sha256 = Field(description="sha256 over the evaluation set's items and labels.")
    eval_items: int = Field(ge=0)
    accuracy: Probability
    macro_f1: Probability
    compartment_accuracy: Probability
    per_class_f1: dict[str, Probability]


class TrainingCompleted(Event):
    model_name: Name
    model_version: Version
    parent_version: Version | None
    dataset_name: Name
    dataset_version: Version
    artifact: BlobRef
    card: BlobRef
    metrics: ModelMetrics
    onnx_parity_max_abs_diff: float = Field(ge=0)
    train_seconds: float = Field(ge=0)


class ModelRegistered(Event):
    model_name: Name
    model_version: Version
    metrics: ModelMetrics
    champion_version: Version | None
    decision: Literal["promoted", "rejected"]
    reason: Annotated[str, StringConstraints(max_length=512)]


class ModelPromoted(Event):
    model_name: Name
    model_version: Version
    previous_version: Version | None
    artifact: BlobRef
    card: BlobRef
    metrics: ModelMetrics
    reason: Annotated[str, StringConstraints(max_length=512)]
    champion_revision: ChampionRevision = None
    champion_epoch: ChampionEpoch = None


class ModelRolledBack(Event):
    model_name: Name
    from_version: Version
    to_version: Version
    artifact: BlobRef
    card: BlobRef
    reason: Annotated[str, StringConstraints(max_length=512)]
    champion_revision: ChampionRevision = None
    champion_epoch: ChampionEpoch = None


class DeadLetter(Event):
    """What a service could not process, why, and enough of it to replay by hand."""

    service: Name
    original_subject: Annotated[str, StringConstraints(max_length=512)]
    error_type: Name
    error: Annotated[str, StringConstraints(max_length=4096)]
    payload_preview: Annotated[str, StringConstraints(max_length=8192)]
    payload_size: int = Field(ge=0)
    headers: dict[str, str] = Field(default_factory=dict)
    delivery_attempt: int = Field(default=1, ge=1)


class FleetHeartbeat(Event):
    bin_id: BinId
    service: Name
    model_name: Name | None = None
    model_version: Version | None = None
    frames_processed: int = Field(ge=0)
    spool_backlog: int = Field(default=0, ge=0)
    uptime_s: float = Field(ge=0)
