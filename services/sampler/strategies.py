"""Sampling strategies: each one looks at an inference result and says whether, and how much,
the frame is worth labeling. New strategies (margin, entropy, diversity, class balance) plug in
here by implementing `Strategy`."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Protocol

from schemas.events import InferenceResult, SamplingStrategy


@dataclass(frozen=True)
class Verdict:
    """Why a strategy wants a frame labeled: a score (higher = more useful) and a reason."""

    score: float
    reason: str


class Strategy(Protocol):
    @property
    def name(self) -> SamplingStrategy: ...

    def score(self, result: InferenceResult) -> Verdict | None:
        """A verdict when the frame is worth labeling by this strategy's measure, else None."""
        ...


class LeastConfidence:
    """Frames the model is unsure about: top-1 confidence below a threshold."""

    name: SamplingStrategy = "least_confidence"

    def __init__(self, threshold: float) -> None:
        self.threshold = threshold

    def score(self, result: InferenceResult) -> Verdict | None:
        if result.confidence >= self.threshold:
            return None
        return Verdict(
            score=1.0 - result.confidence,
            reason=f"confidence {result.confidence:.2f} < {self.threshold:.2f}",
        )


def uniform_draw(seed: int, frame_sha256: str) -> float:
    """A number in [0, 1) fixed by the seed and the frame: a redelivery draws the same."""
    digest = hashlib.sha256(f"{seed}:{frame_sha256}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


class RandomBaseline:
    """An unbiased sample of everything else, so the labeled set also shows the easy cases."""

    name: SamplingStrategy = "random"

    def __init__(self, fraction: float, seed: int) -> None:
        self.fraction = fraction
        self.seed = seed

    def score(self, result: InferenceResult) -> Verdict | None:
        draw = uniform_draw(self.seed, result.frame_sha256)
        if draw >= self.fraction:
            return None
        # A random pick carries no information about how useful the frame is.
        return Verdict(score=0.0, reason=f"random baseline: draw {draw:.3f} < {self.fraction:.3f}")
