"""Sampling strategies: each one looks at a batch of inference results and says, per frame,
whether and how much the frame is worth labeling by its own measure (a score in [0, 1] and a
reason). The sampler weighs and combines their verdicts (see core.py).

Per-frame strategies (confidence, margin, entropy, threshold band, random) need only the result;
the others keep a little state: class balance counts recent selections, diversity and
representative keep the embeddings of earlier picks, disagreement keeps each model version's
top-k for recent frames, so that a second model (a challenger in shadow) answering for the
same frame is compared with the first. All of it is bounded by the policy's `remember` values.
"""

from __future__ import annotations

import hashlib
import math
import sys
from collections import Counter, OrderedDict, deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import numpy.typing as npt

from schemas.events import InferenceResult, SamplingStrategy

ModelKey = tuple[str, int]
"""(model name, model version)."""


@dataclass(frozen=True)
class Verdict:
    """Why a strategy wants a frame labeled: a score (higher = more useful) and a reason."""

    score: float
    reason: str


class Strategy(Protocol):
    @property
    def name(self) -> SamplingStrategy: ...

    def score_batch(self, results: Sequence[InferenceResult]) -> list[Verdict | None]:
        """One verdict per result: a Verdict when the frame is worth labeling, else None."""
        ...

    def record(self, result: InferenceResult) -> None:
        """The sampler selected this frame (stateful strategies learn from it)."""
        ...


class PerFrameStrategy:
    """A strategy that judges each frame on its own and keeps no state."""

    name: SamplingStrategy

    def score(self, result: InferenceResult) -> Verdict | None:
        raise NotImplementedError

    def score_batch(self, results: Sequence[InferenceResult]) -> list[Verdict | None]:
        return [self.score(result) for result in results]

    def record(self, result: InferenceResult) -> None:
        return None


class LeastConfidence(PerFrameStrategy):
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


class Margin(PerFrameStrategy):
    """Frames where the two best classes are close: top-1 minus top-2 below a threshold."""

    name: SamplingStrategy = "margin"

    def __init__(self, threshold: float) -> None:
        self.threshold = threshold

    def score(self, result: InferenceResult) -> Verdict | None:
        if result.margin >= self.threshold:
            return None
        return Verdict(
            score=1.0 - result.margin,
            reason=f"margin {result.margin:.2f} < {self.threshold:.2f}",
        )


def normalized_entropy(result: InferenceResult) -> float | None:
    """Entropy / ln(classes) of the result's distribution, in [0, 1], by the class count of the
    model that scored it (the result's own `num_classes`); None when the result does not say
    (an edge older than the field)."""
    if result.num_classes is None:
        return None
    return min(result.entropy / math.log(result.num_classes), 1.0)


class Entropy(PerFrameStrategy):
    """Frames whose whole distribution is spread out: entropy / ln(classes) above a minimum."""

    name: SamplingStrategy = "entropy"

    def __init__(self, min_normalized: float) -> None:
        self.min_normalized = min_normalized

    def score(self, result: InferenceResult) -> Verdict | None:
        normalized = normalized_entropy(result)
        if normalized is None or normalized < self.min_normalized:
            return None
        return Verdict(
            score=normalized,
            reason=f"entropy {normalized:.2f} of max >= {self.min_normalized:.2f}",
        )


class ThresholdBand(PerFrameStrategy):
    """Frames near the edge's abstain threshold: the ones where a better model changes which
    compartment the item falls into, so they matter most for the bin's behaviour. The threshold
    is the one each result was decided with (its `confidence_threshold`), so the band follows a
    bin whose threshold changes; a result that does not carry one (an older edge) is skipped."""

    name: SamplingStrategy = "threshold_band"

    def __init__(self, half_width: float) -> None:
        self.half_width = half_width

    def score(self, result: InferenceResult) -> Verdict | None:
        threshold = result.confidence_threshold
        if threshold is None:
            return None
        distance = abs(result.confidence - threshold)
        if distance > self.half_width:
            return None
        return Verdict(
            score=1.0 - distance / self.half_width,
            reason=(
                f"confidence {result.confidence:.2f} within {self.half_width:.2f} "
                f"of the edge's threshold {threshold:.2f}"
            ),
        )


def uniform_draw(seed: int, frame_sha256: str) -> float:
    """A number in [0, 1) fixed by the seed and the frame: a redelivery draws the same."""
    digest = hashlib.sha256(f"{seed}:{frame_sha256}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


class RandomBaseline(PerFrameStrategy):
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


class ClassBalance:
    """Quotas per predicted class: a frame scores by how far its class lags behind its target
    share of recent selections, so rare classes (trash) keep being labeled."""

    name: SamplingStrategy = "class_balance"

    def __init__(
        self, quotas: Mapping[str, float], default_quota: float = 1.0, window: int = 1000
    ) -> None:
        self.quotas = dict(quotas)
        self.default_quota = default_quota
        self._recent: deque[str] = deque(maxlen=window)
        self._counts: Counter[str] = Counter()
        self._classes: set[str] = set(quotas)

    def _quota(self, label: str) -> float:
        return self.quotas.get(label, self.default_quota)

    def share(self, label: str, extra: Counter[str] | None = None) -> tuple[float, float]:
        """(smoothed share of recent selections, target share) of one class."""
        extra = extra or Counter()
        total = len(self._recent) + sum(extra.values())
        # Laplace smoothing: with nothing selected yet every class sits at 1/K.
        share = (self._counts[label] + extra[label] + 1) / (total + len(self._classes))
        target = self._quota(label) / sum(self._quota(c) for c in self._classes)
        return share, target

    def score_batch(self, results: Sequence[InferenceResult]) -> list[Verdict | None]:
        for result in results:
            self._classes.update(score.label for score in result.top_k)
        # Picks earlier in this batch count already, so a batch full of one rare class does not
        # all pass on the same deficit.
        tentative: Counter[str] = Counter()
        verdicts: list[Verdict | None] = []
        for result in results:
            share, target = self.share(result.label, tentative)
            deficit = 1.0 - share / target
            if deficit <= 0:
                verdicts.append(None)
                continue
            tentative[result.label] += 1
            verdicts.append(
                Verdict(
                    score=deficit,
                    reason=(
                        f"class {result.label} at {share:.0%} of recent selections, "
                        f"quota {target:.0%}"
                    ),
                )
            )
        return verdicts

    def record(self, result: InferenceResult) -> None:
        if len(self._recent) == self._recent.maxlen:
            self._counts[self._recent[0]] -= 1
        self._recent.append(result.label)
        self._counts[result.label] += 1
        self._classes.add(result.label)


FloatMatrix = npt.NDArray[np.float64]
Vectors = npt.NDArray[np.floating[Any]]
"""Unit vectors as kept (float32) or computed with (float64)."""

BLOCK_ELEMENTS = 1 << 20
"""Most values (1 Mi float64, 8 MiB) in one pairwise matrix that diversity, representative or
typicality builds: larger products are taken a block of rows at a time, so a batch's peak
memory does not grow with batch size x remembered picks."""


def _block_rows(columns: int) -> int:
    return max(1, BLOCK_ELEMENTS // max(1, columns))


def finite_embedding(result: InferenceResult) -> list[float] | None:
    """The result's embedding, or None when it has none or any value is NaN or infinite. The
    schema rejects those; this keeps a result built without validation from poisoning its
    embedding space (NaN wins argmax and spreads through every minimum it takes part in)."""
    embedding = result.embedding
    if not embedding or not all(map(math.isfinite, embedding)):
        return None
    return embedding


def _unit_rows(vectors: Sequence[Sequence[float]]) -> FloatMatrix:
    matrix = np.asarray(vectors, dtype=np.float64)
    norms = np.linalg.norm(matrix, axis=1, keepdims=True)
    unit: FloatMatrix = matrix / np.maximum(norms, 1e-12)
    return unit


class _Rows:
    """The last `capacity` unit vectors of one embedding space in one float32 array (half the
    memory of float64; a cosine distance moves by about 1e-7), grown by doubling up to
    `capacity` rows and then overwriting the oldest row, so reading them copies nothing."""

    def __init__(self, capacity: int, dims: int) -> None:
        self.capacity = capacity
        self._rows = np.empty((min(capacity, 64), dims), dtype=np.float32)
        self._size = 0
        self._next = 0

    def add(self, row: FloatMatrix) -> None:
        if self._size == len(self._rows) < self.capacity:
            grown = np.empty((min(2 * self._size, self.capacity), row.shape[0]), np.float32)
            grown[: self._size] = self._rows
            self._rows = grown
        self._rows[self._next] = row
        self._next = (self._next + 1) % self.capacity
        self._size = min(self._size + 1, self.capacity)

    def view(self) -> npt.NDArray[np.float32]:
        return self._rows[: self._size]


class EmbeddingMemory:
    """Embeddings of the frames selected so far, per model version (different versions have
    different embedding spaces), the last `remember` of each, for the last few versions: at
    most models_kept x remember x width x 4 bytes (164 MB at the policy's largest `remember`,
    10,000, and the schema's widest embedding, 1024; 20 MB at 128 values)."""

    models_kept = 4

    def __init__(self, remember: int) -> None:
        self.remember = remember
        self._kept: OrderedDict[tuple[ModelKey, int], _Rows] = OrderedDict()

    def earlier(self, key: ModelKey, dims: int) -> Vectors:
        """Unit vectors of earlier picks in this space; none if the width changed."""
        kept = self._kept.get((key, dims))
        if kept is None:
            return np.zeros((0, dims))
        return kept.view()

    def record(self, result: InferenceResult) -> None:
        embedding = finite_embedding(result)
        if embedding is None:
            return
        space = ((result.model_name, result.model_version), len(embedding))
        kept = self._kept.get(space)
        if kept is None:
            kept = self._kept[space] = _Rows(self.remember, len(embedding))
        self._kept.move_to_end(space)
        kept.add(_unit_rows([embedding])[0])
        while len(self._kept) > self.models_kept:
            self._kept.popitem(last=False)


def embedding_spaces(
    results: Sequence[InferenceResult],
) -> dict[tuple[ModelKey, int], list[int]]:
    """Indices of the results that carry a finite embedding, by (model version, width)."""
    groups: dict[tuple[ModelKey, int], list[int]] = {}
    for index, result in enumerate(results):
        embedding = finite_embedding(result)
        if embedding is not None:
            key = (result.model_name, result.model_version)
            groups.setdefault((key, len(embedding)), []).append(index)
    return groups


def nearest_center_distance(candidates: FloatMatrix, centers: Vectors) -> FloatMatrix:
    """Cosine distance / 2 from each candidate to its nearest center (1 without centers),
    taking the centers a block at a time."""
    if not len(centers):
        return np.ones(len(candidates))
    nearest: FloatMatrix = np.full(len(candidates), np.inf)
    step = _block_rows(max(len(candidates), centers.shape[1]))
    for start in range(0, len(centers), step):
        block = centers[start : start + step].astype(np.float64)
        similarity = candidates @ block.T
        np.minimum(nearest, (1.0 - similarity.max(axis=1)) / 2.0, out=nearest)
    return nearest


def k_center_greedy(
    candidates: FloatMatrix, centers: Vectors, k: int, min_distance: float
) -> list[tuple[int, float]]:
    """Greedy k-center on unit vectors: repeatedly take the candidate farthest (cosine distance
    / 2, in [0, 1]) from every center and earlier pick. Returns (index, distance) in pick order;
    stops early when nothing is at least `min_distance` away."""
    if len(candidates) == 0:
        return []
    nearest = nearest_center_distance(candidates, centers)
    picks: list[tuple[int, float]] = []
    for _ in range(min(k, len(candidates))):
        index = int(np.argmax(nearest))
        distance = float(nearest[index])
        if distance < min_distance:
            break
        picks.append((index, distance))
        nearest = np.minimum(nearest, (1.0 - candidates @ candidates[index]) / 2.0)
        nearest[index] = -1.0
    return picks


class Diversity:
    """k-center greedy on the edge model's embeddings over each batch (the candidate window):
    picks frames unlike anything selected before, so the labeled set covers the input space.
    Embeddings of different model versions live in different spaces, so each model version
    keeps its own centers."""

    name: SamplingStrategy = "diversity"

    def __init__(self, per_batch: int, min_distance: float, remember: int = 2000) -> None:
        self.per_batch = per_batch
        self.min_distance = min_distance
        self.memory = EmbeddingMemory(remember)

    def score_batch(self, results: Sequence[InferenceResult]) -> list[Verdict | None]:
        verdicts: list[Verdict | None] = [None] * len(results)
        for (key, dims), indices in embedding_spaces(results).items():
            centers = self.memory.earlier(key, dims)
            candidates = _unit_rows([results[i].embedding or [] for i in indices])
            picks = k_center_greedy(candidates, centers, self.per_batch, self.min_distance)
            for order, (position, distance) in enumerate(picks):
                reason = (
                    "first pick in this model's embedding space (k-center greedy)"
                    if order == 0 and not len(centers)
                    else f"embedding {distance:.2f} from the nearest earlier pick (k-center greedy)"
                )
                verdicts[indices[position]] = Verdict(score=distance, reason=reason)
        return verdicts

    def record(self, result: InferenceResult) -> None:
        self.memory.record(result)


def k_means(points: FloatMatrix, k: int, seed: int, iterations: int = 25) -> npt.NDArray[np.intp]:
    """Cluster index of each point: Lloyd's k-means with k-means++ seeding (seeded)."""
    count = len(points)
    k = min(k, count)
    rng = np.random.default_rng(seed)
    squared = (points * points).sum(axis=1)
    centers = [points[int(rng.integers(count))]]
    nearest = np.maximum(squared - 2 * points @ centers[0] + centers[0] @ centers[0], 0.0)
    for _ in range(1, k):
        total = nearest.sum()
        pick = int(rng.choice(count, p=nearest / total)) if total > 0 else int(rng.integers(count))
        centers.append(points[pick])
        nearest = np.minimum(
            nearest, np.maximum(squared - 2 * points @ points[pick] + squared[pick], 0.0)
        )
    means = np.stack(centers)
    assignment: npt.NDArray[np.intp] = np.zeros(count, dtype=np.intp)
    for iteration in range(iterations):
        updated = _nearest_mean(points, squared, means)
        if iteration > 0 and np.array_equal(updated, assignment):
            break  # converged
        assignment = updated
        counts = np.bincount(assignment, minlength=k)
        sums = np.zeros_like(means)
        np.add.at(sums, assignment, points)
        filled = counts > 0  # an emptied cluster keeps its old mean
        means[filled] = sums[filled] / counts[filled, None]
    return assignment


def _nearest_mean(
    points: FloatMatrix, squared: FloatMatrix, means: FloatMatrix
) -> npt.NDArray[np.intp]:
    """Index of the nearest mean of each point, a block of points at a time."""
    means_squared = (means * means).sum(axis=1)
    nearest = np.empty(len(points), dtype=np.intp)
    step = _block_rows(len(means))
    for start in range(0, len(points), step):
        distances = points[start : start + step] @ means.T
        distances *= -2.0
        distances += squared[start : start + step, None]
        distances += means_squared[None]
        nearest[start : start + step] = distances.argmin(axis=1)
    return nearest


def typicality(points: FloatMatrix, neighbours: int) -> npt.NDArray[np.float64]:
    """Inverse mean Euclidean distance to each point's nearest neighbours: high in dense regions,
    low for outliers (TypiClust, Hacohen et al. 2022). Computed a block of points at a time."""
    count = len(points)
    if count < 2:
        return np.ones(count)
    squared = (points * points).sum(axis=1)
    k = min(neighbours, count - 1)
    mean_nearest = np.empty(count)
    step = _block_rows(count)
    for start in range(0, count, step):
        stop = min(start + step, count)
        distances = points[start:stop] @ points.T
        distances *= -2.0
        distances += squared[start:stop, None]
        distances += squared[None]
        np.sqrt(np.maximum(distances, 0.0, out=distances), out=distances)
        distances[np.arange(stop - start), np.arange(start, stop)] = np.inf  # not its own
        mean_nearest[start:stop] = np.partition(distances, k - 1, axis=1)[:, :k].mean(axis=1)
    result: npt.NDArray[np.float64] = 1.0 / (mean_nearest + 1e-12)
    return result


class Representative:
    """Typical frames of regions no earlier selection covers (TypiClust): the batch and the
    earlier picks are clustered together with k-means into (earlier picks + per_batch)
    clusters; clusters without a pick are visited largest first, and from each the most
    typical frame (densest neighbourhood) is picked. Where uncertainty strategies go for the
    boundary, which is mostly noise while the model has seen few labels, this spends labels
    on what the stream is mostly made of. Embedding spaces are per model version, as in
    Diversity. A batch with fewer than 2 x per_batch frames in a space is not judged (every
    frame would be its own cluster). The cost grows with the square of the picks remembered:
    k-means over batch + remember points into remember + per_batch clusters (its k-means++
    seeding alone reads every point once per cluster); hence the policy's bound on `remember`
    (docs/active-learning.md has the measured cost per batch)."""

    name: SamplingStrategy = "representative"

    def __init__(self, per_batch: int, neighbours: int, seed: int, remember: int = 500) -> None:
        self.per_batch = per_batch
        self.neighbours = neighbours
        self.seed = seed
        self.memory = EmbeddingMemory(remember)

    def score_batch(self, results: Sequence[InferenceResult]) -> list[Verdict | None]:
        verdicts: list[Verdict | None] = [None] * len(results)
        for (key, dims), indices in embedding_spaces(results).items():
            if len(indices) < 2 * self.per_batch:
                continue  # too few frames to say where the stream's mass is
            earlier = self.memory.earlier(key, dims)
            candidates = _unit_rows([results[i].embedding or [] for i in indices])
            for order, (position, size, k) in enumerate(self._pick(candidates, earlier)):
                verdicts[indices[position]] = Verdict(
                    score=1.0 - order / self.per_batch,
                    reason=f"most typical of an uncovered cluster of {size} frames "
                    f"(k-means, k={k})",
                )
        return verdicts

    def _pick(self, candidates: FloatMatrix, earlier: Vectors) -> list[tuple[int, int, int]]:
        """(candidate index, its cluster's size, k) per pick, in pick order."""
        points: FloatMatrix = (
            np.concatenate([candidates, earlier], dtype=np.float64) if len(earlier) else candidates
        )
        k = min(len(earlier) + self.per_batch, len(points))
        clusters = k_means(points, k, self.seed + len(points))
        own = clusters[: len(candidates)]
        covered = set(clusters[len(candidates) :].tolist())
        sizes = np.bincount(own, minlength=k)
        open_clusters = [c for c in np.argsort(-sizes, kind="stable") if c not in covered]
        dense = typicality(candidates, self.neighbours)
        picks: list[tuple[int, int, int]] = []
        for cluster in open_clusters[: self.per_batch]:
            members = np.flatnonzero(own == cluster)
            if len(members):
                best = int(members[np.argmax(dense[members])])
                picks.append((best, int(sizes[cluster]), k))
        return picks

    def record(self, result: InferenceResult) -> None:
        self.memory.record(result)


def total_variation(first: Mapping[str, float], second: Mapping[str, float]) -> float:
    """Half the L1 distance of two (possibly top-k truncated) distributions; a class missing
    from one side counts as probability 0 there, so truncation can only lower the distance."""
    labels = set(first) | set(second)
    return 0.5 * sum(abs(first.get(label, 0.0) - second.get(label, 0.0)) for label in labels)


@dataclass(frozen=True, slots=True)
class Answer:
    """What disagreement keeps of one model version's answer for a frame: its top-1 (for the
    reason) and its top-k (for the distance). Not the result itself: its embedding alone is
    a few KiB as Python floats, and 20,000 of them took hundreds of MiB."""

    model_name: str
    model_version: int
    label: str
    confidence: float
    labels: tuple[str, ...]
    probabilities: tuple[float, ...]

    @classmethod
    def of(cls, result: InferenceResult) -> Answer:
        # Model names and labels repeat on every result: interned, each is stored once.
        return cls(
            sys.intern(result.model_name),
            result.model_version,
            sys.intern(result.label),
            result.confidence,
            tuple(sys.intern(score.label) for score in result.top_k),
            tuple(score.probability for score in result.top_k),
        )

    def distribution(self) -> dict[str, float]:
        return dict(zip(self.labels, self.probabilities, strict=True))


class Disagreement:
    """Two model versions answered for the same frame (a challenger in shadow next to the
    champion): the frame is worth labeling when their distributions differ. Keeps the latest
    answer of each model version (at most `versions_per_frame`) for the last `remember`
    frames: about 1 KiB per frame answered by two versions."""

    name: SamplingStrategy = "disagreement"
    versions_per_frame = 4

    def __init__(self, min_disagreement: float, remember: int = 20_000) -> None:
        self.min_disagreement = min_disagreement
        self.remember = remember
        self._answers: OrderedDict[str, tuple[Answer, ...]] = OrderedDict()

    def score_batch(self, results: Sequence[InferenceResult]) -> list[Verdict | None]:
        return [self._score(result) for result in results]

    def _score(self, result: InferenceResult) -> Verdict | None:
        mine = Answer.of(result)
        others = tuple(
            answer
            for answer in self._answers.pop(result.frame_sha256, ())
            if (answer.model_name, answer.model_version) != (mine.model_name, mine.model_version)
        )
        self._answers[result.frame_sha256] = (*others, mine)[-self.versions_per_frame :]
        while len(self._answers) > self.remember:
            self._answers.popitem(last=False)
        distribution = mine.distribution()
        best: tuple[float, Answer] | None = None
        for other in others:
            distance = total_variation(distribution, other.distribution())
            if best is None or distance > best[0]:
                best = (distance, other)
        if best is None or best[0] < self.min_disagreement:
            return None
        distance, other = best
        return Verdict(
            score=min(distance, 1.0),
            reason=(
                f"v{result.model_version} says {result.label} {result.confidence:.2f}, "
                f"v{other.model_version} says {other.label} {other.confidence:.2f}: "
                f"distance {distance:.2f}"
            ),
        )

    def record(self, result: InferenceResult) -> None:
        return None
