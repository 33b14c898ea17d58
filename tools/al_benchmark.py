"""Active-learning benchmark: simulates the label loop on TrashNet with an oracle annotator and
compares each sampling strategy of services/sampler with random sampling.

TrashNet is split by a hash of each file name into three disjoint parts: a fixed test split, a
feature split and the unlabeled pool. The trainer's CompactCNN is trained from scratch on the
feature split once (seeded, cached) and frozen; its pooled penultimate features are the
embeddings of the pool and the test split, which never touch its training. Per strategy and
seed: a small random labeled seed (none in "tiny"); then rounds of train a softmax head
(L-BFGS) -> score the pool (as InferenceResults, through the real `Sampler`, its rate limit as
the per-round budget, pHash dedup on InferenceResult.phash) -> the oracle labels the
selections; accuracy on the test split after every round.

Three protocols (docs/active-learning.md): "small" (20 seed labels + 15 rounds of 20 = 320, 37 % of
the pool), "large" (40 + 15 rounds of 40 = 640, 75 % of the pool, where random sampling is
close to what the whole pool gives) and "tiny" (a cold start: no seed, 10 rounds of 6 = 60).
--seed-size, --per-round and --rounds override each.

    .venv/bin/python tools/al_benchmark.py                     # the small protocol
    .venv/bin/python tools/al_benchmark.py --protocol large    # the large one
    .venv/bin/python tools/al_benchmark.py --seeds 1 --rounds 3 --strategies random margin
    .venv/bin/python tools/al_benchmark.py --features wide     # the stronger feature network

--features picks the frozen feature network (FEATURES): "compact", the first one and the default,
"wide", the trainer's compact-cnn-wide at 96 x 128 for 60 epochs, or "resnet", the shipped
model's compact-resnet-deep at 96 x 128 for 120 epochs.
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

from binloop.ml.phash import phash  # noqa: E402
from binloop.ml.preprocess import decode_rgb  # noqa: E402
from schemas.events import ClassScore, InferenceResult, StageLatency  # noqa: E402
from schemas.taxonomy import TRASHNET_TO_COMPARTMENT  # noqa: E402
from services.sampler.core import Sampler, build_sampler  # noqa: E402
from services.sampler.policy import SamplingPolicy  # noqa: E402
from services.sampler.ratelimit import DAY_S  # noqa: E402
from services.trainer.nets import CompactCNN, ExposesEmbedding, build_model  # noqa: E402

FloatArray = npt.NDArray[np.float64]
IntArray = npt.NDArray[np.int64]

L2 = 0.02
CAPTURED_AT = datetime(2025, 1, 1, tzinfo=UTC)
LATENCY = StageLatency(read_ms=0, decode_ms=0, preprocess_ms=0, infer_ms=0, postprocess_ms=0)
CONFIDENCE_THRESHOLD = 0.5
"""The simulated edge's confidence_threshold (the edge inferencer's default): each result
carries it, and the threshold band is centred on it."""
BIN = "benchmark-bin"
CHALLENGER_OFFSET = 100_000


@dataclass(frozen=True)
class Protocol:
    """How many labels a run starts with and buys: seed_size + rounds x per_round in the end."""

    seed_size: int
    per_round: int
    rounds: int
    plot: str
    """File name under docs/img/ for the learning curves."""


PROTOCOLS = {
    # The first protocol: a budget (320) well below the pool (858), random far from saturation.
    "small": Protocol(seed_size=20, per_round=20, rounds=15, plot="al_learning_curves.png"),
    # Budget 640 of 858: random at the full budget is near the whole-pool ceiling; half is 320.
    "large": Protocol(seed_size=40, per_round=40, rounds=15, plot="al_learning_curves_large.png"),
    # Cold start, few labels: no seed, so the first round's picks are the strategy's own (from
    # the embeddings alone; for uncertainty every frame ties and the stream order decides);
    # 60 labels, 10 per class on average, where random's curve is still steep.
    "tiny": Protocol(seed_size=0, per_round=6, rounds=10, plot="al_learning_curves_tiny.png"),
}


@dataclass(frozen=True)
class FeatureConfig:
    """The frozen feature network: trained from scratch on the feature split, cached by version."""

    version: str
    """Part of the cache key: change it whenever anything below changes."""
    architecture: str
    """A services.trainer.nets architecture, or "compact-cnn-24" for the first benchmark's."""
    image_size: tuple[int, int]
    """Height, width the network sees (TrashNet's 4:3 photos, shrunk)."""
    epochs: int
    plot_suffix: str
    """Appended to the protocol's plot name, so every feature set keeps its own curves."""

    def build(self, classes: int) -> torch.nn.Module:
        if self.architecture == "compact-cnn-24":
            return CompactCNN(classes, widths=(24, 48, 96, 192), dropout=0.3)
        return build_model(self.architecture, classes)


FEATURES = {
    # The first feature network (the default, so earlier results stay reproducible).
    "compact": FeatureConfig(
        version="compact-cnn-24-192-72x96-e40-v1",
        architecture="compact-cnn-24",
        image_size=(72, 96),
        epochs=40,
        plot_suffix="",
    ),
    # The trainer's wide CompactCNN (32-256), a third more pixels per side, more epochs.
    "wide": FeatureConfig(
        version="compact-cnn-wide-96x128-e60-v1",
        architecture="compact-cnn-wide",
        image_size=(96, 128),
        epochs=60,
        plot_suffix="_wide",
    ),
    # The shipped model's residual network (compact-resnet-deep, 2.7 M parameters), longer.
    "resnet": FeatureConfig(
        version="compact-resnet-deep-96x128-e120-v1",
        architecture="compact-resnet-deep",
        image_size=(96, 128),
        epochs=120,
        plot_suffix="_resnet",
    ),
}


# --------------------------------------------------------------------------- data and features


@dataclass(frozen=True)
class Dataset:
    classes: list[str]
    files: list[Path]
    labels: IntArray
    is_test: npt.NDArray[np.bool_]
    is_pool: npt.NDArray[np.bool_]
    """The unlabeled pool; images in neither split trained the feature network."""
    features: FloatArray
    """N x D frozen embeddings, standardised with pool statistics."""
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


def name_buckets(files: Sequence[Path]) -> IntArray:
    """0-99 from sha256(file name) alone: the same file always lands in the same split."""
    return np.asarray(
        [int(hashlib.sha256(f.name.encode()).hexdigest()[:8], 16) % 100 for f in files],
        dtype=np.int64,
    )


def load_images(
    files: Sequence[Path], image_size: tuple[int, int]
) -> tuple[npt.NDArray[np.uint8], list[str], list[str]]:
    """N x H x W x 3 RGB at image_size, the sha256 of each file and the edge's pHash of it."""
    small, shas, hashes = [], [], []
    height, width = image_size
    for path in files:
        data = path.read_bytes()
        rgb = decode_rgb(data)
        shas.append(hashlib.sha256(data).hexdigest())
        # The edge hashes the frame at its model's input size: within 2 bits of this on
        # TrashNet (docs/active-learning.md, Near-duplicates).
        hashes.append(phash(rgb))
        small.append(cv2.resize(rgb, (width, height), interpolation=cv2.INTER_AREA))
    return np.stack(small), shas, hashes


def _augment(batch: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Flips, a random shift (reflect-padded crop) and per-channel colour jitter."""
    n, _, height, width = batch.shape
    for axis in (-1, -2):  # items photographed from above: upside down is still the item
        flip = torch.rand(n, generator=generator) < 0.5
        batch = torch.where(flip.view(n, 1, 1, 1), batch.flip(axis), batch)
    pad_y, pad_x = height // 12, width // 12
    padded = torch.nn.functional.pad(batch, (pad_x, pad_x, pad_y, pad_y), mode="reflect")
    dy = int(torch.randint(0, 2 * pad_y + 1, (1,), generator=generator))
    dx = int(torch.randint(0, 2 * pad_x + 1, (1,), generator=generator))
    batch = padded[:, :, dy : dy + height, dx : dx + width]
    contrast = 1 + (torch.rand(n, 1, 1, 1, generator=generator) - 0.5) * 0.4
    shift = (torch.rand(n, 3, 1, 1, generator=generator) - 0.5) * 0.4
    return batch * contrast + shift


def train_feature_net(
    config: FeatureConfig, inputs: torch.Tensor, targets: torch.Tensor, classes: int
) -> torch.nn.Module:
    """The trainer's network, from scratch, on the feature split only (seeded)."""
    torch.manual_seed(0)
    generator = torch.Generator().manual_seed(0)
    model = config.build(classes)
    batch_size = 32
    steps = config.epochs * math.ceil(len(inputs) / batch_size)
    optimiser = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=5e-4)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimiser, max_lr=3e-3, total_steps=steps)
    model.train()
    for _ in range(config.epochs):
        order = torch.randperm(len(inputs), generator=generator)
        for start in range(0, len(inputs), batch_size):
            chosen = order[start : start + batch_size]
            logits = model(_augment(inputs[chosen], generator))
            loss = torch.nn.functional.cross_entropy(logits, targets[chosen], label_smoothing=0.1)
            optimiser.zero_grad()
            loss.backward()  # type: ignore[no-untyped-call]
            optimiser.step()
            schedule.step()
    return model.eval()


def compute_features(
    config: FeatureConfig,
    images: npt.NDArray[np.uint8],
    labels: IntArray,
    is_feature: npt.NDArray[np.bool_],
    is_pool: npt.NDArray[np.bool_],
    weights: Path,
    console: Console,
) -> FloatArray:
    """Frozen penultimate embeddings of a CNN trained on the feature split, which neither the
    pool nor the test split touches; standardised with pool statistics only."""
    pixels = torch.tensor(images, dtype=torch.float32).permute(0, 3, 1, 2) / 255.0
    feature_set = torch.as_tensor(is_feature)
    mean = pixels[feature_set].mean((0, 2, 3), keepdim=True)
    std = pixels[feature_set].std((0, 2, 3), keepdim=True)
    inputs = (pixels - mean) / std
    classes = int(labels.max()) + 1
    if weights.exists():
        model = config.build(classes)
        model.load_state_dict(torch.load(weights, weights_only=True))
        model.eval()
    else:
        started = time.perf_counter()
        model = train_feature_net(
            config, inputs[feature_set], torch.from_numpy(labels[is_feature]), classes
        )
        weights.parent.mkdir(parents=True, exist_ok=True)
        torch.save(model.state_dict(), weights)
        console.print(
            f"feature network trained on {int(is_feature.sum())} images "
            f"in {time.perf_counter() - started:.0f} s"
        )
    embedder: ExposesEmbedding = model  # type: ignore[assignment]
    with torch.no_grad():
        embedded = torch.cat(
            [
                embedder.logits_and_embedding(inputs[i : i + 256])[1]
                for i in range(0, len(inputs), 256)
            ]
        ).double()
    raw: FloatArray = embedded.numpy()
    pool = np.flatnonzero(is_pool)
    features: FloatArray = (raw - raw[pool].mean(0)) / (raw[pool].std(0) + 1e-6)
    return features


def load_dataset(
    config: FeatureConfig,
    root: Path,
    cache: Path,
    test_percent: int,
    feature_percent: int,
    limit: int | None,
    console: Console,
) -> Dataset:
    classes, files, labels = list_images(root, limit)
    buckets = name_buckets(files)
    is_test = buckets < test_percent
    is_feature = (buckets >= test_percent) & (buckets < test_percent + feature_percent)
    is_pool = ~is_test & ~is_feature
    fingerprint = hashlib.sha256(
        "\n".join(
            [config.version, str(test_percent), str(feature_percent)]
            + [f"{f.relative_to(root)}:{f.stat().st_size}" for f in files]
        ).encode()
    ).hexdigest()[:16]
    path = cache / f"features-{fingerprint}.npz"
    if path.exists():
        stored = np.load(path)
        features, shas, hashes = stored["features"], list(stored["sha"]), list(stored["phash"])
    else:
        images, shas, hashes = load_images(files, config.image_size)
        weights = cache / f"feature-net-{fingerprint}.pt"
        features = compute_features(config, images, labels, is_feature, is_pool, weights, console)
        cache.mkdir(parents=True, exist_ok=True)
        np.savez(path, features=features, sha=np.asarray(shas), phash=np.asarray(hashes))
    return Dataset(classes, files, labels, is_test, is_pool, features, shas, hashes)


# --------------------------------------------------------------------------- the model


class SoftmaxRegression:
    """Multinomial logistic regression with an L2 penalty, fitted by L-BFGS."""

    def __init__(self, num_classes: int, l2: float = L2) -> None:
        self.num_classes = num_classes
        self.l2 = l2
        self.weights = torch.zeros(0)
        self.bias = torch.zeros(0)

    def fit(self, x: FloatArray, y: IntArray) -> SoftmaxRegression:
        """Fits on the labels so far; with none (a cold start) every class stays equally likely."""
        if len(y) == 0:
            self.weights = torch.zeros(x.shape[1], self.num_classes, dtype=torch.float64)
            self.bias = torch.zeros(self.num_classes, dtype=torch.float64)
            return self
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
    "representative",
    "disagreement",
    "combined",
    "representative_margin",
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
            "representative",
            "disagreement",
        )
    }
    wide_open: dict[str, dict[str, Any]] = {
        "least_confidence": {"threshold": 1.0},
        "margin": {"threshold": 1.0},
        "entropy": {"min_normalized": 0.0},
        "threshold_band": {"half_width": 1.0},
        "class_balance": {"window": 100_000},
        # The pool is at most 858 frames: every pick is remembered at the policy's bounds.
        "diversity": {"per_batch": budget, "min_distance": 0.0, "remember": 10_000},
        "representative": {"per_batch": budget, "neighbours": 20, "remember": 1_000},
        "disagreement": {"min_disagreement": 0.01},
    }
    on = {"enabled": True}
    if strategy == "combined":
        strategies["margin"] = {**on, "weight": 1.0, **wide_open["margin"]}
        strategies["diversity"] = {**on, "weight": 0.5, **wide_open["diversity"]}
        strategies["class_balance"] = {**on, "weight": 0.25, **wide_open["class_balance"]}
    elif strategy == "representative_margin":
        # Typical frames of three times the budget's uncovered clusters; margin ranks them.
        strategies["representative"] = {
            **on,
            **wide_open["representative"],
            "weight": 1.0,
            "per_batch": min(3 * budget, 4096),
        }
        strategies["margin"] = {**on, "weight": 1.0, **wide_open["margin"]}
    elif strategy != "random":
        strategies[strategy] = {**on, **wide_open[strategy]}
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
            abstained=ranked[0][1] < CONFIDENCE_THRESHOLD,
            latency=LATENCY,
            embedding=data.features[index].tolist(),
            ground_truth=data.classes[int(data.labels[index])],
            phash=data.phash[index],
            num_classes=len(data.classes),
            confidence_threshold=CONFIDENCE_THRESHOLD,
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
    pool = np.flatnonzero(data.is_pool)
    test = np.flatnonzero(data.is_test)
    labeled = set(rng.choice(pool, seed_size, replace=False).tolist())
    by_sha = {data.sha256[i]: i for i in pool}
    clock = SimulatedClock()
    # Dedup reads InferenceResult.phash, as in the running loop.
    sampler: Sampler = build_sampler(
        benchmark_policy(strategy, budget, seed), "al-benchmark", clock
    )
    num_classes = len(data.classes)
    curve = RunResult([], [], 0)
    for round_index in range(rounds + 1):
        train = np.asarray(sorted(labeled), dtype=np.int64)
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
    per_seed_to_match: list[int | None]
    """The same, for each seed's own curve (its spread shows how noisy the first number is)."""


def labels_to_reach(labels: IntArray, curve: FloatArray, target: float | None) -> int | None:
    """The first label count at which `curve` is at or above `target`; None if it never is."""
    if target is None:
        return None
    reached = np.flatnonzero(curve >= target)
    return int(labels[reached[0]]) if len(reached) else None


def summarise(strategy: str, runs: Sequence[RunResult], target: float | None) -> Summary:
    accuracy = np.asarray([run.accuracy for run in runs])
    labels = np.asarray(runs[0].labels)
    mean, std = accuracy.mean(0), accuracy.std(0)
    return Summary(
        strategy,
        labels,
        mean,
        std,
        labels_to_reach(labels, mean, target),
        [labels_to_reach(labels, curve, target) for curve in accuracy],
    )


def describe_per_seed(reached: Sequence[int | None]) -> str:
    """'min-max (k/n)': the range over the seeds that reach the target, and how many do."""
    hits = [r for r in reached if r is not None]
    if not hits:
        return f"none (0/{len(reached)})"
    span = str(min(hits)) if min(hits) == max(hits) else f"{min(hits)}-{max(hits)}"
    return f"{span} ({len(hits)}/{len(reached)})"


def report(
    summaries: dict[str, Summary], ceiling: float, title: str, plot: Path, console: Console
) -> None:
    baseline = summaries["random"]
    full = float(baseline.mean[-1])
    half_round = int(np.argmin(np.abs(baseline.labels - baseline.labels[-1] / 2)))
    half_labels = int(baseline.labels[half_round])
    table = Table(
        title=f"Test accuracy (mean ± std over seeds), {title}",
        caption=f"random at the full budget {full:.3f}, head on the whole pool {ceiling:.3f}",
    )
    for column in (
        "strategy",
        f"acc @ {half_labels} labels",
        f"acc @ {baseline.labels[-1]} labels",
        "gain @ half vs random @ half",
        "labels to reach random @ full",
        "per seed",
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
            describe_per_seed(summary.per_seed_to_match),
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
    axes.axhline(ceiling, color="red", linestyle="--", linewidth=1, label="head on the whole pool")
    axes.axvline(half_labels, color="grey", linestyle=":", linewidth=1, label="half the budget")
    axes.set_xlabel("labels (seed + selections)")
    axes.set_ylabel("test accuracy")
    axes.set_title(f"Active learning on TrashNet, {title}: mean ± std over seeds")
    axes.grid(alpha=0.3)
    axes.legend(loc="lower right", fontsize=8)
    plot.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(plot, dpi=120, bbox_inches="tight")
    console.print(f"learning curves saved to {plot}")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--data", type=Path, default=REPO.parent / "shared/datasets/trashnet")
    parser.add_argument("--cache", type=Path, default=REPO / ".binloop/cache/al_benchmark")
    parser.add_argument(
        "--protocol",
        choices=sorted(PROTOCOLS),
        default="small",
        help="Preset seed size, labels per round, rounds and plot name (the flags below override)",
    )
    parser.add_argument(
        "--features",
        choices=sorted(FEATURES),
        default="compact",
        help="Frozen feature network (docs/active-learning.md); compact is the first benchmark's",
    )
    parser.add_argument("--plot", type=Path, default=None, help="Default: docs/img/<protocol's>")
    parser.add_argument("--seeds", type=int, default=5, help="Seeds per strategy")
    parser.add_argument("--seed-size", type=int, default=None, help="Labeled images to start with")
    parser.add_argument(
        "--per-round", "--budget", type=int, default=None, help="Labels added per round"
    )
    parser.add_argument("--rounds", type=int, default=None)
    parser.add_argument("--test-percent", type=int, default=25, help="Fixed test split")
    parser.add_argument(
        "--feature-percent",
        type=int,
        default=35,
        help="Split that trains the frozen feature network; the rest is the unlabeled pool",
    )
    parser.add_argument("--limit-per-class", type=int, default=None, help="For a quick try")
    parser.add_argument("--strategies", nargs="+", choices=STRATEGIES, default=list(STRATEGIES))
    parser.add_argument("--threads", type=int, default=2, help="torch threads")
    args = parser.parse_args(argv)
    preset = PROTOCOLS[args.protocol]
    seed_size = preset.seed_size if args.seed_size is None else args.seed_size
    per_round = preset.per_round if args.per_round is None else args.per_round
    rounds = preset.rounds if args.rounds is None else args.rounds
    feature_config = FEATURES[args.features]
    default_plot = Path(preset.plot)
    plot = args.plot or REPO / "docs/img" / (
        default_plot.stem + feature_config.plot_suffix + default_plot.suffix
    )
    torch.set_num_threads(args.threads)
    console = Console(width=150)  # the table stays whole when the output goes to a file
    started = time.perf_counter()
    if args.test_percent + args.feature_percent >= 100:
        parser.error("--test-percent plus --feature-percent must leave a pool (< 100)")
    data = load_dataset(
        feature_config,
        args.data,
        args.cache,
        args.test_percent,
        args.feature_percent,
        args.limit_per_class,
        console,
    )
    console.print(
        f"{len(data.files)} images: {int(data.is_test.sum())} test, {int(data.is_pool.sum())} "
        f"pool, {int((~data.is_test & ~data.is_pool).sum())} trained the feature network; "
        f"features {data.features.shape[1]}-d ready in {time.perf_counter() - started:.0f} s"
    )
    pool, test = np.flatnonzero(data.is_pool), np.flatnonzero(data.is_test)
    if seed_size + rounds * per_round > len(pool):
        parser.error(f"seed size + rounds x per round exceeds the pool ({len(pool)} images)")
    whole_pool = SoftmaxRegression(len(data.classes)).fit(data.features[pool], data.labels[pool])
    predicted = whole_pool.predict_proba(data.features[test]).argmax(1)
    ceiling = float((predicted == data.labels[test]).mean())
    console.print(f"the head trained on the whole labeled pool: test accuracy {ceiling:.3f}")
    title = (
        f"protocol {args.protocol}, features {args.features}: {seed_size} seed labels + "
        f"{rounds} rounds of {per_round} = {seed_size + rounds * per_round} of {len(pool)}"
    )
    console.print(title)
    strategies = ["random", *(s for s in args.strategies if s != "random")]
    summaries: dict[str, Summary] = {}
    target: float | None = None
    for strategy in strategies:
        runs = [
            simulate(data, strategy, seed, seed_size, per_round, rounds)
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
    report(summaries, ceiling, title, plot, console)
    console.print(f"total {time.perf_counter() - started:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
