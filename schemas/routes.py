"""The routes table: every subject, its stream and its payload model. The one source of truth.

Services, stream setup, the live view, docs and tests all read this table; no subject string
is written anywhere else.
"""

from __future__ import annotations

from dataclasses import dataclass

from schemas.base import Event
from schemas.events import (
    ActuationCommand,
    ActuationDone,
    DatasetSnapshot,
    DeadLetter,
    FleetHeartbeat,
    FrameCaptured,
    FrameStored,
    InferenceResult,
    LabelAnnotated,
    ModelPromoted,
    ModelRegistered,
    ModelRolledBack,
    SampleSelected,
    TrainingCompleted,
    TrainingRequested,
)


@dataclass(frozen=True)
class Stream:
    name: str
    subjects: tuple[str, ...]
    description: str
    max_age_s: float = 7 * 24 * 3600
    duplicate_window_s: float = 120.0
    """A message whose id JetStream stored this recently is dropped (exactly-once publishing)."""


@dataclass(frozen=True)
class Route:
    """One subject family. `{bin}` in a template is filled per bin; `*` matches every bin."""

    name: str
    template: str
    stream: str
    model: type[Event]
    high_rate: bool = False

    @property
    def per_bin(self) -> bool:
        return "{bin}" in self.template

    def subject(self, bin_id: str | None = None) -> str:
        if self.per_bin:
            if not bin_id:
                raise ValueError(f"route {self.name} needs a bin id")
            return self.template.format(bin=bin_id)
        return self.template

    @property
    def wildcard(self) -> str:
        """Subject filter matching every bin (or the subject itself when not per bin)."""
        return self.template.replace("{bin}", "*")


STREAMS: dict[str, Stream] = {
    s.name: s
    for s in (
        Stream("FRAMES", ("frames.>",), "Frames captured and stored, per bin"),
        Stream("INFERENCE", ("inference.>",), "Edge model decisions, per bin"),
        Stream("ACTUATION", ("actuation.>",), "Actuator commands and outcomes, per bin"),
        Stream(
            "ENGINE",
            ("samples.>", "labels.>", "datasets.>", "training.>", "models.>"),
            "The data engine: samples, labels, datasets, training and models",
            max_age_s=365 * 24 * 3600,
        ),
        Stream(
            "DLQ",
            ("dlq.>",),
            "Messages a service could not process, with the reason",
            max_age_s=30 * 24 * 3600,
            # Dead-letter ids are deterministic: the same failure found again later in the
            # day (a redelivery, a restarted reconciliation) stays one entry.
            duplicate_window_s=24 * 3600,
        ),
        Stream("FLEET", ("fleet.>",), "Heartbeats from the bins", max_age_s=24 * 3600),
    )
}


def _route(
    name: str, template: str, stream: str, model: type[Event], *, hot: bool = False
) -> Route:
    return Route(name=name, template=template, stream=stream, model=model, high_rate=hot)


FRAMES_CAPTURED = _route("frames.captured", "frames.captured.v1.{bin}", "FRAMES", FrameCaptured)
FRAMES_STORED = _route("frames.stored", "frames.stored.v1.{bin}", "FRAMES", FrameStored, hot=True)
INFERENCE_RESULT = _route(
    "inference.result", "inference.result.v1.{bin}", "INFERENCE", InferenceResult, hot=True
)
ACTUATION_COMMAND = _route(
    "actuation.command", "actuation.command.v1.{bin}", "ACTUATION", ActuationCommand
)
ACTUATION_DONE = _route("actuation.done", "actuation.done.v1.{bin}", "ACTUATION", ActuationDone)
SAMPLES_SELECTED = _route("samples.selected", "samples.selected.v1", "ENGINE", SampleSelected)
LABELS_ANNOTATED = _route("labels.annotated", "labels.annotated.v1", "ENGINE", LabelAnnotated)
DATASETS_SNAPSHOT = _route("datasets.snapshot", "datasets.snapshot.v1", "ENGINE", DatasetSnapshot)
TRAINING_REQUESTED = _route(
    "training.requested", "training.requested.v1", "ENGINE", TrainingRequested
)
TRAINING_COMPLETED = _route(
    "training.completed", "training.completed.v1", "ENGINE", TrainingCompleted
)
MODELS_REGISTERED = _route("models.registered", "models.registered.v1", "ENGINE", ModelRegistered)
MODELS_PROMOTED = _route("models.promoted", "models.promoted.v1", "ENGINE", ModelPromoted)
MODELS_ROLLED_BACK = _route(
    "models.rolled_back", "models.rolled_back.v1", "ENGINE", ModelRolledBack
)
DLQ = _route("dlq", "dlq.v1.{bin}", "DLQ", DeadLetter)
FLEET_HEARTBEAT = _route(
    "fleet.heartbeat", "fleet.heartbeat.v1.{bin}", "FLEET", FleetHeartbeat, hot=True
)

ROUTES: dict[str, Route] = {
    r.name: r
    for r in (
        FRAMES_CAPTURED,
        FRAMES_STORED,
        INFERENCE_RESULT,
        ACTUATION_COMMAND,
        ACTUATION_DONE,
        SAMPLES_SELECTED,
        LABELS_ANNOTATED,
        DATASETS_SNAPSHOT,
        TRAINING_REQUESTED,
        TRAINING_COMPLETED,
        MODELS_REGISTERED,
        MODELS_PROMOTED,
        MODELS_ROLLED_BACK,
        DLQ,
        FLEET_HEARTBEAT,
    )
}


def dlq_subject(service: str) -> str:
    return DLQ.subject(service)


def route_for_subject(subject: str) -> Route | None:
    """Which route a concrete subject belongs to (for recording, replay and the live view)."""
    tokens = subject.split(".")
    for route in ROUTES.values():
        pattern = route.template.split(".")
        if len(pattern) == len(tokens) and all(
            p == "{bin}" or p == t for p, t in zip(pattern, tokens, strict=True)
        ):
            return route
    return None
