"""The sampling policy: which strategies run, their weights and thresholds, near-duplicate
dropping and per-bin rate limits, read from a validated YAML file.

`python -m services.sampler --validate-config FILE` checks a file and exits 0, or 1 with
the key path of every error.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Annotated, Any, Literal, Self

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StringConstraints,
    ValidationError,
    model_validator,
)

Label = Annotated[str, StringConstraints(pattern=r"^[a-z0-9_]{1,64}$")]
Weight = Annotated[float, Field(gt=0, le=100, description="Share of the combined score")]


class PolicyError(ValueError):
    """A policy file that cannot be read or does not validate; the message lists each problem."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class LeastConfidencePolicy(_Strict):
    enabled: bool = Field(default=True, description="Run this strategy")
    weight: Weight = 1.0
    threshold: float = Field(
        default=0.6, gt=0, le=1, description="Fires when top-1 confidence is below this"
    )


class MarginPolicy(_Strict):
    enabled: bool = Field(default=False, description="Run this strategy")
    weight: Weight = 1.0
    threshold: float = Field(
        default=0.2, gt=0, le=1, description="Fires when top-1 minus top-2 is below this"
    )


class EntropyPolicy(_Strict):
    enabled: bool = Field(default=False, description="Run this strategy")
    weight: Weight = 1.0
    min_normalized: float = Field(
        default=0.5,
        ge=0,
        lt=1,
        description="Fires when entropy / ln(classes) is at least this (the class count of "
        "the model, from each result)",
    )


class ThresholdBandPolicy(_Strict):
    enabled: bool = Field(default=True, description="Run this strategy")
    weight: Weight = 1.0
    half_width: float = Field(
        default=0.1,
        gt=0,
        le=1,
        description="Fires within this distance of the confidence threshold the edge decided "
        "with (from each result)",
    )


class ClassBalancePolicy(_Strict):
    enabled: bool = Field(default=True, description="Run this strategy")
    weight: Weight = 1.0
    quotas: dict[Label, Annotated[float, Field(gt=0, le=1000)]] = Field(
        default_factory=lambda: {"trash": 3.0},
        description="Relative share of selections per predicted class; rare classes get more",
    )
    default_quota: float = Field(
        default=1.0, gt=0, le=1000, description="Share of every class not listed in quotas"
    )
    window: int = Field(
        default=1000, ge=10, le=1_000_000, description="Recent selections the shares count"
    )


class DiversityPolicy(_Strict):
    enabled: bool = Field(default=True, description="Run this strategy (needs embeddings)")
    weight: Weight = 1.0
    per_batch: int = Field(
        default=4, ge=1, le=4096, description="Most frames k-center greedy picks from one batch"
    )
    min_distance: float = Field(
        default=0.15,
        ge=0,
        le=1,
        description="Cosine distance / 2 to every earlier pick below which a frame adds nothing",
    )
    remember: int = Field(
        default=2000,
        ge=1,
        le=10_000,
        description="Embeddings of earlier picks kept as centers, per model version (at 10,000: "
        "about 0.2 s per batch of 256 and 40 MiB per version of 1024-d embeddings)",
    )


class RepresentativePolicy(_Strict):
    enabled: bool = Field(default=False, description="Run this strategy (needs embeddings)")
    weight: Weight = 1.0
    per_batch: int = Field(
        default=4,
        ge=1,
        le=4096,
        description="Uncovered k-means clusters of one batch whose most typical frame is picked",
    )
    neighbours: int = Field(
        default=20, ge=1, le=1000, description="Nearest neighbours that measure typicality"
    )
    remember: int = Field(
        default=500,
        ge=1,
        le=1000,
        description="Earlier picks that count as covering their cluster; k-means cost grows "
        "with its square (at 1000: about 0.3 s per batch of 256 with 128-d embeddings, 2 s "
        "with 1024-d)",
    )


class DisagreementPolicy(_Strict):
    enabled: bool = Field(
        default=False,
        description="Run this strategy. Off by default: it needs a second model version "
        "answering for the same frames (a shadow inferencer), which nothing in binloop runs "
        "yet; with one model it never fires and still costs up to ~20 MiB and work per result",
    )
    weight: Weight = 1.0
    min_disagreement: float = Field(
        default=0.2,
        gt=0,
        le=1,
        description="Fires when the total-variation distance of two models' top-k reaches this",
    )
    remember: int = Field(
        default=20_000,
        ge=1,
        le=100_000,
        description="Frames whose answers (each model version's top-k) are kept, about 1 KiB "
        "per frame answered by two versions",
    )


class RandomPolicy(_Strict):
    enabled: bool = Field(default=True, description="Run the random baseline")
    fraction: float = Field(
        default=0.05, ge=0, le=1, description="Share of the frames no other strategy picked"
    )


class StrategiesPolicy(_Strict):
    least_confidence: LeastConfidencePolicy = LeastConfidencePolicy()
    margin: MarginPolicy = MarginPolicy()
    entropy: EntropyPolicy = EntropyPolicy()
    threshold_band: ThresholdBandPolicy = ThresholdBandPolicy()
    class_balance: ClassBalancePolicy = ClassBalancePolicy()
    diversity: DiversityPolicy = DiversityPolicy()
    representative: RepresentativePolicy = RepresentativePolicy()
    disagreement: DisagreementPolicy = DisagreementPolicy()
    random: RandomPolicy = RandomPolicy()


class DedupPolicy(_Strict):
    enabled: bool = Field(default=True, description="Drop near-duplicates of earlier selections")
    max_hamming: int = Field(
        default=6, ge=0, le=64, description="pHash bits that may differ for a near-duplicate"
    )
    remember: int = Field(
        default=10_000, ge=1, le=1_000_000, description="Hashes of earlier selections kept"
    )
    per_bin: bool = Field(
        default=True, description="Compare only with earlier selections from the same bin"
    )


class RateLimitPolicy(_Strict):
    per_bin_per_hour: int = Field(
        default=600, ge=1, le=1_000_000, description="Selections per bin in any one-hour window"
    )
    per_bin_per_day: int = Field(
        default=5000, ge=1, le=10_000_000, description="Selections per bin in any 24-hour window"
    )

    @model_validator(mode="after")
    def _day_holds_an_hour(self) -> Self:
        if self.per_bin_per_day < self.per_bin_per_hour:
            raise ValueError(
                f"per_bin_per_day ({self.per_bin_per_day}) is below per_bin_per_hour "
                f"({self.per_bin_per_hour}): the hourly limit could never be reached"
            )
        return self


class SamplingPolicy(_Strict):
    """Everything the sampler decides by. Every field has a default: an empty file is valid."""

    version: Literal[1] = Field(default=1, description="Format of this file")
    seed: int = Field(default=0, ge=0, le=2**63 - 1, description="Seed of the random baseline")
    min_score: float = Field(
        default=0.0,
        ge=0,
        le=100,
        description="Combined weighted score a frame needs unless the random baseline drew it",
    )
    strategies: StrategiesPolicy = StrategiesPolicy()
    dedup: DedupPolicy = DedupPolicy()
    rate_limits: RateLimitPolicy = RateLimitPolicy()


REMOVED_KEYS = {
    "num_classes": "each inference result carries the class count of the model that scored it",
    "strategies.threshold_band.decision_threshold": (
        "each inference result carries the confidence_threshold the edge decided with"
    ),
}
"""Keys an earlier policy had, and where their value comes from now: a file that still sets one
is refused, saying so, rather than run with a value nothing reads."""


def _describe(error: ValidationError) -> str:
    lines = []
    for item in error.errors():
        where = ".".join(str(part) for part in item["loc"]) or "(top level)"
        message = item["msg"]
        if item["type"] == "extra_forbidden" and where in REMOVED_KEYS:
            message += f" (removed: {REMOVED_KEYS[where]})"
        lines.append(f"  {where}: {message}")
    return "\n".join(lines)


class _DuplicateKeyError(yaml.YAMLError):
    def __init__(self, key: object, line: int, first_line: int) -> None:
        super().__init__(f"line {line}: key {key!r} given twice (first on line {first_line})")


class _UniqueKeyLoader(yaml.SafeLoader):
    """safe_load, but a key given twice in one mapping is an error: PyYAML keeps the last,
    so a second `strategies:` block would silently undo what the first one set. Keys a merge
    (`<<: *anchor`) brings in may still be overridden, as YAML intends."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        first_lines: dict[Any, int] = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue
            key = self.construct_object(key_node, deep=deep)
            line = key_node.start_mark.line + 1
            try:
                if key in first_lines:
                    raise _DuplicateKeyError(key, line, first_lines[key])
                first_lines[key] = line
            except TypeError:  # unhashable: the base class refuses it with its own message
                continue
        return super().construct_mapping(node, deep=deep)


def parse_policy(text: str, source: str = "<string>") -> SamplingPolicy:
    """YAML text -> a validated policy. Raises PolicyError naming each bad key, and the line
    of a key given twice."""
    try:
        raw = yaml.load(text, Loader=_UniqueKeyLoader)  # a SafeLoader: plain data only
    except _DuplicateKeyError as exc:
        raise PolicyError(f"{source}: {exc}; YAML would keep only the last") from exc
    except yaml.YAMLError as exc:
        raise PolicyError(f"{source}: not valid YAML: {exc}") from exc
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise PolicyError(f"{source}: expected a mapping at the top, got {type(raw).__name__}")
    try:
        return SamplingPolicy.model_validate(raw)
    except ValidationError as exc:
        count = exc.error_count()
        raise PolicyError(
            f"{source}: {count} error{'s' if count > 1 else ''}\n{_describe(exc)}"
        ) from exc


def load_policy(path: Path) -> SamplingPolicy:
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise PolicyError(f"{path}: cannot read: {exc.strerror or exc}") from exc
    except UnicodeDecodeError as exc:
        raise PolicyError(
            f"{path}: not UTF-8: byte 0x{exc.object[exc.start]:02x} at offset {exc.start}"
        ) from exc
    return parse_policy(text, str(path))


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m services.sampler", description="Check a sampling policy file."
    )
    parser.add_argument("--validate-config", type=Path, required=True, metavar="FILE")
    args = parser.parse_args(argv)
    try:
        load_policy(args.validate_config)
    except PolicyError as exc:
        print(exc, file=sys.stderr)
        return 1
    print(f"{args.validate_config}: valid")
    return 0
