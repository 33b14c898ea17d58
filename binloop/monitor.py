"""Watches the whole bus and keeps the loop's figures: what the live view and summary show.

`LoopStats` is pure (fed typed events); `BusMonitor` feeds it from ordered (ephemeral)
JetStream consumers, so it sees exactly what the streams stored (repeats that JetStream
dropped by Nats-Msg-Id are not counted) and never takes messages from the services.
"""

from __future__ import annotations

import time
from collections import Counter, deque
from dataclasses import dataclass, field

import nats
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.js.api import DeliverPolicy
from pydantic import ValidationError

from binloop.bus import ensure_streams
from schemas.base import read_json
from schemas.events import (
    ActuationDone,
    DatasetSnapshot,
    DeadLetter,
    FrameCaptured,
    FrameStored,
    InferenceResult,
    LabelAnnotated,
    ModelPromoted,
    ModelRegistered,
    SampleSelected,
    TrainingCompleted,
)
from schemas.routes import ROUTES, route_for_subject


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))
    return ordered[index]


@dataclass
class LoopStats:
    started: float = field(default_factory=time.monotonic)
    frames_captured: int = 0
    frames_stored: int = 0
    frame_ids_captured: Counter[str] = field(default_factory=Counter)
    frame_ids_inferred: Counter[str] = field(default_factory=Counter)
    frame_ids_actuated: Counter[str] = field(default_factory=Counter)
    frame_ids_stored: Counter[str] = field(default_factory=Counter)
    decisions: Counter[str] = field(default_factory=Counter)
    abstained: int = 0
    actuator_errors: int = 0
    latencies_ms: list[float] = field(default_factory=list)
    infer_ms: list[float] = field(default_factory=list)
    served_versions: Counter[int] = field(default_factory=Counter)
    correct_by_version: Counter[int] = field(default_factory=Counter)
    samples: Counter[str] = field(default_factory=Counter)
    labels: int = 0
    snapshots: list[tuple[int, int]] = field(default_factory=list)
    trainings: list[tuple[int, float, float]] = field(default_factory=list)
    registered: list[tuple[int, str, str]] = field(default_factory=list)
    promoted: list[int] = field(default_factory=list)
    dead_letters: Counter[str] = field(default_factory=Counter)
    _recent: deque[float] = field(default_factory=lambda: deque(maxlen=2000))

    def observe(self, event: object) -> None:
        now = time.monotonic()
        match event:
            case FrameCaptured():
                self.frames_captured += 1
                self.frame_ids_captured[str(event.event_id)] += 1
                self._recent.append(now)
            case InferenceResult():
                self.frame_ids_inferred[event.frame_event_id] += 1
                self.served_versions[event.model_version] += 1
                self.infer_ms.append(event.latency.infer_ms)
                if event.ground_truth is not None and event.ground_truth == event.label:
                    self.correct_by_version[event.model_version] += 1
                self.decisions[event.compartment.value] += 1
                self.abstained += int(event.abstained)
            case ActuationDone():
                self.frame_ids_actuated[event.frame_event_id] += 1
                latency = (event.occurred_at - event.captured_at).total_seconds() * 1000
                self.latencies_ms.append(latency)
                self.actuator_errors += int(not event.ok)
            case FrameStored():
                self.frames_stored += 1
                self.frame_ids_stored[event.frame_event_id] += 1
            case SampleSelected():
                self.samples[event.strategy] += 1
            case LabelAnnotated():
                self.labels += 1
            case DatasetSnapshot():
                self.snapshots.append((event.version, event.num_items))
            case TrainingCompleted():
                self.trainings.append(
                    (event.model_version, event.metrics.accuracy, event.train_seconds)
                )
            case ModelRegistered():
                self.registered.append((event.model_version, event.decision, event.reason))
            case ModelPromoted():
                self.promoted.append(event.model_version)
            case DeadLetter():
                self.dead_letters[event.service] += 1

    @property
    def elapsed_s(self) -> float:
        return time.monotonic() - self.started

    def frames_per_second(self, window_s: float = 5.0) -> float:
        now = time.monotonic()
        recent = [t for t in self._recent if now - t <= window_s]
        return len(recent) / window_s

    def accuracy_of(self, version: int) -> float | None:
        served = self.served_versions.get(version, 0)
        return self.correct_by_version[version] / served if served else None

    @property
    def in_flight(self) -> int:
        """Frames captured but not yet actuated."""
        return sum(1 for fid in self.frame_ids_captured if fid not in self.frame_ids_actuated)

    def duplicates(self) -> dict[str, int]:
        """How many frames were inferred / actuated / stored more than once (must be 0)."""
        return {
            "inferred": sum(1 for n in self.frame_ids_inferred.values() if n > 1),
            "actuated": sum(1 for n in self.frame_ids_actuated.values() if n > 1),
            "stored": sum(1 for n in self.frame_ids_stored.values() if n > 1),
        }

    def lost(self) -> dict[str, int]:
        captured = set(self.frame_ids_captured)
        return {
            "inferred": len(captured - set(self.frame_ids_inferred)),
            "actuated": len(captured - set(self.frame_ids_actuated)),
            "stored": len(captured - set(self.frame_ids_stored)),
        }


class BusMonitor:
    """Feeds LoopStats from every route's subjects as stored in JetStream."""

    def __init__(self, nats_url: str, stats: LoopStats | None = None) -> None:
        self.nats_url = nats_url
        self.stats = stats or LoopStats()
        self.unparsed = 0
        self._client: Client | None = None

    async def start(self) -> None:
        self._client = await nats.connect(self.nats_url, name="binloop-monitor")
        js = self._client.jetstream()
        await ensure_streams(js)
        for route in ROUTES.values():
            await js.subscribe(
                route.wildcard,
                cb=self._on_message,
                ordered_consumer=True,
                deliver_policy=DeliverPolicy.NEW,
            )

    async def _on_message(self, msg: Msg) -> None:
        route = route_for_subject(msg.subject)
        if route is None:
            return
        try:
            event = read_json(route.model, msg.data)
        except ValidationError:
            self.unparsed += 1
            return
        self.stats.observe(event)

    async def stop(self) -> None:
        if self._client is not None:
            await self._client.drain()
            self._client = None
