"""Settings of the trainer service: what to train, how long, and on which fixed evaluation set."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field

from binloop.settings import ServiceSettings

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class TrainerSettings(ServiceSettings):
    model_name: str = Field(
        default="binloop-waste",
        pattern=r"^[A-Za-z0-9_-]{1,64}$",
        description="Name the models are stored and registered under",
    )
    architecture: str = Field(default="compact-cnn", description="Network from nets.ARCHITECTURES")
    input_size: tuple[int, int] = Field(
        default=(64, 64), description="[height, width] of the network input"
    )
    mean: tuple[float, float, float] = Field(
        default=IMAGENET_MEAN, description="Per-channel mean of the [0, 1] RGB input"
    )
    std: tuple[float, float, float] = Field(
        default=IMAGENET_STD, description="Per-channel std of the [0, 1] RGB input"
    )
    epochs: int = Field(default=24, ge=1, le=1000, description="Upper bound on training epochs")
    patience: int = Field(
        default=8, ge=1, le=1000, description="Stop after this many epochs without val progress"
    )
    min_val_items: int = Field(
        default=20,
        ge=1,
        le=10_000_000,
        description="Fewer val items than this: keep the last epoch instead of the best on val",
    )
    batch_size: int = Field(default=16, ge=1, le=4096)
    learning_rate: float = Field(default=3e-3, gt=0, le=1, description="AdamW peak learning rate")
    weight_decay: float = Field(default=1e-4, ge=0, le=1)
    seed: int = Field(default=0, ge=0, description="Seeds weights, shuffling and augmentation")
    device: Literal["cpu", "cuda", "auto"] = Field(
        default="cpu",
        description="Where to train (auto: CUDA when there); export and evaluation run on the CPU",
    )
    balance: Literal["loss", "sampler", "none"] = Field(
        default="loss",
        description="Class imbalance: inverse-frequency weighted loss, or weighted sampling",
    )
    mixed_precision: bool = Field(default=True, description="float16 autocast, on CUDA only")
    calibrate: bool = Field(
        default=True,
        description="Fit temperature scaling on val (at least min_val_items) and bake it into "
        "the exported graph",
    )
    torch_threads: int = Field(
        default=1, ge=1, le=256, description="Intra-op CPU threads torch may use"
    )
    eval_dir: Path = Field(
        default=Path("data/demo/eval"),
        description="ImageFolder used as the fixed evaluation set of every candidate",
    )
    eval_dataset_name: str = Field(
        default="binloop-eval",
        pattern=r"^[A-Za-z0-9_-]{1,64}$",
        description="Dataset name the evaluation set is imported under in the object store",
    )
    taxonomy_path: Path | None = Field(
        default=None, description="Taxonomy YAML for compartment accuracy; None: TrashNet's"
    )
    min_items: int = Field(
        default=12, ge=2, le=10_000_000, description="Refuse to train on fewer usable items"
    )
    parity_tolerance: float = Field(
        default=1e-3, gt=0, le=1, description="Max |onnxruntime - torch| logit difference"
    )
    ack_wait_s: float = Field(
        default=600.0, ge=10, le=86_400, description="How long JetStream waits between heartbeats"
    )
