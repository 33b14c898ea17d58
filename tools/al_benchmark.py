"""Active-learning benchmark: simulates the label loop on TrashNet with an oracle annotator and
compares each sampling strategy of services/sampler with random sampling.

Per strategy and seed: a small random labeled seed; then rounds of train -> score the unlabeled
pool (as InferenceResults, through the real `Sampler` with its rate limit as the per-round
budget) -> the oracle labels the selections -> retrain; accuracy on a fixed test split (by a
hash of each file name) after every round. Features are computed once and cached: a
Coates-Ng single-layer network (k-means on whitened 6x6 colour patches learnt from the pool,
triangle activation, quadrant pooling) plus an HSV colour histogram, PCA-reduced; the model is
a softmax regression trained with L-BFGS, so a round takes well under a second.

    .venv/bin/python tools/al_benchmark.py            # the full run (docs/active-learning.md)
    .venv/bin/python tools/al_benchmark.py --seeds 1 --rounds 3 --strategies random margin
"""

from __future__ import annotations

import argparse
import hashlib
import math
import sys
import time
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import numpy.typing as npt
import torch
from rich.console import Console
from rich.table import Table

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from schemas.events import ClassScore, InferenceResult, StageLatency  # noqa: E402
from schemas.taxonomy import TRASHNET_TO_COMPARTMENT  # noqa: E402
from services.sampler.core import Sampler, build_sampler  # noqa: E402
from services.sampler.phash import phash  # noqa: E402
from services.sampler.policy import SamplingPolicy  # noqa: E402
from services.sampler.ratelimit import DAY_S  # noqa: E402

FloatArray = npt.NDArray[np.float64]
IntArray = npt.NDArray[np.int64]

FEATURE_VERSION = "coates-ng-k256-hsv-pca128-v1"
PATCH, IMAGE_SIDE, CENTROIDS, PCA_DIMS = 6, 64, 256, 128
L2 = 0.02
CAPTURED_AT = datetime(2025, 1, 1, tzinfo=UTC)
LATENCY = StageLatency(read_ms=0, decode_ms=0, preprocess_ms=0, infer_ms=0, postprocess_ms=0)
BIN = "benchmark-bin"
CHALLENGER_OFFSET = 100_000


# --------------------------------------------------------------------------- data and features


@dataclass(frozen=True)
class Dataset:
    classes: list[str]
    files: list[Path]
    labels: IntArray
    is_test: npt.NDArray[np.bool_]
    features: FloatArray
    """N x PCA_DIMS, standardised."""
    sha256: list[str]
    phash: list[str]


def list_images(root: Path, limit_per_class: int | None) -> tuple[list[str], list[Path], IntArray]:
    classes = sorted(p.name for p in root.iterdir() if p.is_dir())
    files: list[Path] = []
    labels: list[int] = []
    for index, name in enumerate(classes):
        found = sorted((root / name).glob("*.jpg"))[:limit_per_class]
        files += found
        labels += [index] * len(found)
    if not files:
        raise SystemExit(f"no images under {root}/<class>/*.jpg")
    return classes, files, np.asarray(labels, dtype=np.int64)


def test_split(files: Sequence[Path], test_percent: int) -> npt.NDArray[np.bool_]:
    """Fixed by the file name alone: the same file is always on the same side."""
    return np.asarray(
        [
            int(hashlib.sha256(f.name.encode()).hexdigest()[:8], 16) % 100 < test_percent
            for f in files
        ]
    )


def _normalise_patches(patches: torch.Tensor) -> torch.Tensor:
    centred = patches - patches.mean(-1, keepdim=True)
    return centred / torch.sqrt(centred.var(-1, keepdim=True) + 0.01)


def coates_ng_features(images: npt.NDArray[np.uint8], fit_on: IntArray) -> FloatArray:
    """Single-layer k-means features (Coates, Lee, Ng 2011), learnt without labels."""
    generator = torch.Generator().manual_seed(0)
    x = torch.tensor(images, dtype=torch.float32).permute(0, 3, 1, 2) / 255.0
    patches = torch.nn.functional.unfold(x, PATCH, stride=2).permute(0, 2, 1)  # N, L, D
    dims = patches.shape[-1]
    sample = _normalise_patches(patches[torch.as_tensor(fit_on)].reshape(-1, dims))
    sample = sample[torch.randperm(len(sample), generator=generator)[:100_000]]
    mean = sample.mean(0)
    eigenvalues, eigenvectors = torch.linalg.eigh(torch.cov((sample - mean).T))
    whiten = eigenvectors @ torch.diag(1.0 / torch.sqrt(eigenvalues + 0.1)) @ eigenvectors.T
    white = (sample - mean) @ whiten
    centroids = white[torch.randperm(len(white), generator=generator)[:CENTROIDS]].clone()
    for _ in range(10):
        assignment = torch.cdist(white, centroids).argmin(1)
        for k in range(CENTROIDS):
            members = white[assignment == k]
            if len(members):
                centroids[k] = members.mean(0)
    side = math.isqrt(patches.shape[1])
    pooled = []
    for start in range(0, len(patches), 128):
        z = (_normalise_patches(patches[start : start + 128]) - mean) @ whiten
        distances = torch.cdist(z, centroids.expand(len(z), CENTROIDS, dims))
        active = torch.relu(distances.mean(-1, keepdim=True) - distances)  # triangle k-means
        maps = active.reshape(-1, side, side, CENTROIDS).permute(0, 3, 1, 2)
        pooled.append(torch.nn.functional.adaptive_avg_pool2d(maps, 2).flatten(1))
    return torch.cat(pooled).double().numpy()


def colour_histogram(bgr: npt.NDArray[np.uint8]) -> FloatArray:
    hsv = cv2.cvtColor(cv2.resize(bgr, (80, 60), interpolation=cv2.INTER_AREA), cv2.COLOR_BGR2HSV)
    hist = cv2.calcHist([hsv], [0, 1, 2], None, [12, 4, 4], [0, 180, 0, 256, 0, 256]).ravel()
    return np.sqrt(hist / hist.sum()).astype(np.float64)


def compute_features(
    files: Sequence[Path], is_test: npt.NDArray[np.bool_]
) -> tuple[FloatArray, list[str], list[str]]:
    small, histograms, shas, hashes = [], [], [], []
    for path in files:
        data = path.read_bytes()
        bgr = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
        shas.append(hashlib.sha256(data).hexdigest())
        hashes.append(phash(cv2.cvtColor(bgr, cv2.COLOR_BGR2GRAY)))
        small.append(cv2.resize(bgr, (IMAGE_SIDE, IMAGE_SIDE), interpolation=cv2.INTER_AREA))
        histograms.append(colour_histogram(bgr))
    pool = np.flatnonzero(~is_test)
    raw = np.concatenate([coates_ng_features(np.stack(small), pool), np.stack(histograms)], axis=1)
    # Standardise and project with statistics of the pool only: the test split stays unseen.
    mean, std = raw[pool].mean(0), raw[pool].std(0) + 1e-6
    standard = (raw - mean) / std
    _, _, components = np.linalg.svd(standard[pool], full_matrices=False)
    projected = standard @ components[:PCA_DIMS].T
    projected /= projected[pool].std(0)
    return projected, shas, hashes


def load_dataset(root: Path, cache: Path, test_percent: int, limit: int | None) -> Dataset:
    classes, files, labels = list_images(root, limit)
    is_test = test_split(files, test_percent)
    fingerprint = hashlib.sha256(
        "\n".join(
            [FEATURE_VERSION, str(test_percent)]
            + [f"{f.relative_to(root)}:{f.stat().st_size}" for f in files]
        ).encode()
    ).hexdigest()[:16]
    path = cache / f"features-{fingerprint}.npz"
    if path.exists():
        stored = np.load(path)
        features, shas, hashes = stored["features"], list(stored["sha"]), list(stored["phash"])
    else:
        features, shas, hashes = compute_features(files, is_test)
        cache.mkdir(parents=True, exist_ok=True)
        np.savez(path, features=features, sha=np.asarray(shas), phash=np.asarray(hashes))
    return Dataset(classes, files, labels, is_test, features, shas, hashes)


# --------------------------------------------------------------------------- the model


class SoftmaxRegression:
    """Multinomial logistic regression with an L2 penalty, fitted by L-BFGS."""

    def __init__(self, num_classes: int, l2: float = L2) -> None:
        self.num_classes = num_classes
        self.l2 = l2
        self.weights = torch.zeros(0)
        self.bias = torch.zeros(0)

    def fit(self, x: FloatArray, y: IntArray) -> SoftmaxRegression:
        inputs, targets = torch.from_numpy(x), torch.from_numpy(y)
        weights = torch.zeros(x.shape[1], self.num_classes, dtype=torch.float64, requires_grad=True)
        bias = torch.zeros(self.num_classes, dtype=torch.float64, requires_grad=True)
        optimiser = torch.optim.LBFGS([weights, bias], max_iter=200, line_search_fn="strong_wolfe")

        def closure() -> torch.Tensor:
            optimiser.zero_grad()
            loss = torch.nn.functional.cross_entropy(inputs @ weights + bias, targets)
            loss = loss + self.l2 * (weights**2).sum()
            loss.backward()  # type: ignore[no-untyped-call]
            return loss

        optimiser.step(closure)  # type: ignore[no-untyped-call]
        self.weights, self.bias = weights.detach(), bias.detach()
        return self

    def predict_proba(self, x: FloatArray) -> FloatArray:
        logits = torch.from_numpy(x) @ self.weights + self.bias
        probabilities: FloatArray = torch.softmax(logits, dim=1).numpy()
        return probabilities


# --------------------------------------------------------------------------- the simulation

STRATEGIES = (
    "random",
    "least_confidence",
    "margin",
    "entropy",
    "threshold_band",
    "class_balance",
    "diversity",
    "disagreement",
    "combined",
)


def benchmark_policy(strategy: str, budget: int, seed: int) -> SamplingPolicy:
    """Pool-based settings: every informative strategy ranks the whole pool (thresholds wide
    open), the rate limit is the round's budget, and the random baseline fills what is left."""
    off = {"enabled": False}
    strategies: dict[str, dict[str, Any]] = {
        name: dict(off)
        for name in (
            "least_confidence",
            "margin",
            "entropy",
            "threshold_band",
            "class_balance",
            "diversity",
            "disagreement",
        )
    }
    wide_open: dict[str, dict[str, Any]] = {
        "least_confidence": {"threshold": 1.0},
        "margin": {"threshold": 1.0},
        "entropy": {"min_normalized": 0.0},
        "threshold_band": {"decision_threshold": 0.5, "half_width": 1.0},
        "class_balance": {"window": 100_000},
        "diversity": {"per_batch": budget, "min_distance": 0.0, "remember": 100_000},
        "disagreement": {"min_disagreement": 0.01},
    }
    if strategy == "combined":
        strategies["margin"] = {"weight": 1.0, **wide_open["margin"]}
        strategies["diversity"] = {"weight": 0.5, **wide_open["diversity"]}
        strategies["class_balance"] = {"weight": 0.25, **wide_open["class_balance"]}
    elif strategy != "random":
        strategies[strategy] = {"enabled": True, **wide_open[strategy]}
    return SamplingPolicy.model_validate(
        {
            "seed": seed,
            "strategies": {**strategies, "random": {"fraction": 1.0}},
            "dedup": {"enabled": True, "max_hamming": 4, "per_bin": True},
            "rate_limits": {"per_bin_per_hour": budget, "per_bin_per_day": budget},
        }
    )


def inference_results(
    data: Dataset, indices: Sequence[int], probabilities: FloatArray, version: int
) -> Iterator[InferenceResult]:
    order = np.argsort(-probabilities, axis=1, kind="stable")
    for row, index in enumerate(indices):
        p = probabilities[row]
        ranked = [(data.classes[c], float(min(max(p[c], 0.0), 1.0))) for c in order[row]]
        positive = p[p > 0]
        yield InferenceResult(
            producer="al-benchmark",
            bin_id=BIN,
            frame_sha256=data.sha256[index],
            frame_event_id=str(uuid.uuid4()),
            captured_at=CAPTURED_AT,
            model_name="benchmark-head",
            model_version=version,
            label=ranked[0][0],
            confidence=ranked[0][1],
            margin=max(ranked[0][1] - ranked[1][1], 0.0),
            entropy=max(float(-(positive * np.log(positive)).sum()), 0.0),
            top_k=[ClassScore(label=label, probability=q) for label, q in ranked],
            compartment=TRASHNET_TO_COMPARTMENT[ranked[0][0]],
            abstained=ranked[0][1] < 0.5,
            latency=LATENCY,
            embedding=data.features[index].tolist(),
            ground_truth=data.classes[int(data.labels[index])],
        )


class SimulatedClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


@dataclass
class RunResult:
    labels: list[int]
    accuracy: list[float]
    near_duplicates: int


def simulate(
    data: Dataset, strategy: str, seed: int, seed_size: int, budget: int, rounds: int
) -> RunResult:
    rng = np.random.default_rng(seed)
    pool = np.flatnonzero(~data.is_test)
    test = np.flatnonzero(data.is_test)
    labeled = set(rng.choice(pool, seed_size, replace=False).tolist())
    by_sha = {data.sha256[i]: i for i in pool}
    clock = SimulatedClock()
    hashes = {data.sha256[i]: data.phash[i] for i in pool}
    sampler: Sampler = build_sampler(
        benchmark_policy(strategy, budget, seed),
        "al-benchmark",
        clock,
        hash_source=lambda result: hashes.get(result.frame_sha256),
    )
    num_classes = len(data.classes)
    curve = RunResult([], [], 0)
    for round_index in range(rounds + 1):
        train = np.asarray(sorted(labeled))
        model = SoftmaxRegression(num_classes).fit(data.features[train], data.labels[train])
        predicted = model.predict_proba(data.features[test]).argmax(1)
        curve.labels.append(len(labeled))
        curve.accuracy.append(float((predicted == data.labels[test]).mean()))
        if round_index == rounds:
            break
        # The stream arrives in a random order: ties (and the random baseline) follow it.
        unlabeled = rng.permutation([i for i in pool if i not in labeled]).tolist()
        results = list(
            inference_results(
                data, unlabeled, model.predict_proba(data.features[unlabeled]), round_index + 1
            )
        )
        if strategy == "disagreement":
            # A challenger in shadow: the same head fitted on a bootstrap of the labeled set.
            resample = rng.choice(train, len(train), replace=True)
            challenger = SoftmaxRegression(num_classes).fit(
                data.features[resample], data.labels[resample]
            )
            results += inference_results(
                data,
                unlabeled,
                challenger.predict_proba(data.features[unlabeled]),
                CHALLENGER_OFFSET + round_index,
            )
        clock.now += DAY_S  # a fresh hour and day: the rate limit is this round's budget
        outcome = sampler.select_batch(results)
        curve.near_duplicates += sum(outcome.near_duplicates.values())
        labeled.update(by_sha[s.frame_sha256] for s in outcome.selected)  # the oracle labels
    return curve


# --------------------------------------------------------------------------- the report


@dataclass(frozen=True)
class Summary:
    strategy: str
    labels: IntArray
    mean: FloatArray
    std: FloatArray
    labels_to_match: int | None
    """Fewest labels at which the mean curve reaches random's mean at the full budget."""


def summarise(strategy: str, runs: Sequence[RunResult], target: float | None) -> Summary:
    accuracy = np.asarray([run.accuracy for run in runs])
    labels = np.asarray(runs[0].labels)
    mean, std = accuracy.mean(0), accuracy.std(0)
    reached = np.flatnonzero(mean >= target) if target is not None else np.array([])
    return Summary(strategy, labels, mean, std, int(labels[reached[0]]) if len(reached) else None)


def report(summaries: dict[str, Summary], plot: Path, console: Console) -> None:
    baseline = summaries["random"]
    full = float(baseline.mean[-1])
    half_round = int(np.argmin(np.abs(baseline.labels - baseline.labels[-1] / 2)))
    half_labels = int(baseline.labels[half_round])
    table = Table(
        title=f"Test accuracy (mean ± std over seeds); random at the full budget: {full:.3f}"
    )
    for column in (
        "strategy",
        f"acc @ {half_labels} labels",
        f"acc @ {baseline.labels[-1]} labels",
        "gain @ half vs random @ half",
        "labels to reach random @ full",
        "goal met",
    ):
        table.add_column(column, justify="left" if column == "strategy" else "right")
    for name, summary in summaries.items():
        gain = summary.mean[half_round] - baseline.mean[half_round]
        spread = max(summary.std[half_round], baseline.std[half_round])
        met = (
            summary.labels_to_match is not None
            and summary.labels_to_match <= half_labels
            and gain > spread
        )
        table.add_row(
            name,
            f"{summary.mean[half_round]:.3f} ± {summary.std[half_round]:.3f}",
            f"{summary.mean[-1]:.3f} ± {summary.std[-1]:.3f}",
            "-" if name == "random" else f"{gain:+.3f} (spread {spread:.3f})",
            str(summary.labels_to_match) if summary.labels_to_match is not None else "not reached",
            "-" if name == "random" else ("yes" if met else "no"),
        )
    console.print(table)

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(9, 6))
    for name, summary in summaries.items():
        style = {"color": "black", "linewidth": 2.5} if name == "random" else {"linewidth": 1.5}
        axes.plot(summary.labels, summary.mean, label=name, **style)
        axes.fill_between(
            summary.labels, summary.mean - summary.std, summary.mean + summary.std, alpha=0.12
        )
    axes.axhline(full, color="black", linestyle="--", linewidth=1, label="random @ full budget")
    axes.axvline(half_labels, color="grey", linestyle=":", linewidth=1, label="half the budget")
    axes.set_xlabel("labels (seed + selections)")
    axes.set_ylabel("test accuracy")
    axes.set_title("Active learning on TrashNet: learning curves (mean ± std over seeds)")
    axes.grid(alpha=0.3)
    axes.legend(loc="lower right", fontsize=8)
    plot.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(plot, dpi=120, bbox_inches="tight")
    console.print(f"learning curves saved to {plot}")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--data", type=Path, default=REPO.parent / "shared/datasets/trashnet")
    parser.add_argument("--cache", type=Path, default=REPO / ".binloop/cache/al_benchmark")
    parser.add_argument("--plot", type=Path, default=REPO / "docs/img/al_learning_curves.png")
    parser.add_argument("--seeds", type=int, default=3, help="Seeds per strategy")
    parser.add_argument("--seed-size", type=int, default=30, help="Labeled images to start with")
    parser.add_argument("--budget", type=int, default=30, help="Labels added per round")
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--test-percent", type=int, default=25)
    parser.add_argument("--limit-per-class", type=int, default=None, help="For a quick try")
    parser.add_argument("--strategies", nargs="+", choices=STRATEGIES, default=list(STRATEGIES))
    parser.add_argument("--threads", type=int, default=2, help="torch threads")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    console = Console(width=130)  # the table stays whole when the output goes to a file
    started = time.perf_counter()
    data = load_dataset(args.data, args.cache, args.test_percent, args.limit_per_class)
    console.print(
        f"{len(data.files)} images, {int(data.is_test.sum())} in the test split, "
        f"features {data.features.shape[1]}-d ready in {time.perf_counter() - started:.0f} s"
    )
    strategies = ["random", *(s for s in args.strategies if s != "random")]
    summaries: dict[str, Summary] = {}
    target: float | None = None
    for strategy in strategies:
        runs = [
            simulate(data, strategy, seed, args.seed_size, args.budget, args.rounds)
            for seed in range(args.seeds)
        ]
        summaries[strategy] = summarise(strategy, runs, target)
        if strategy == "random":
            target = float(summaries["random"].mean[-1])
            summaries["random"] = summarise(strategy, runs, target)
        duplicates = sum(run.near_duplicates for run in runs)
        console.print(
            f"{strategy}: final {summaries[strategy].mean[-1]:.3f}, "
            f"{duplicates} near-duplicates dropped, {time.perf_counter() - started:.0f} s"
        )
    report(summaries, args.plot, console)
    console.print(f"total {time.perf_counter() - started:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
