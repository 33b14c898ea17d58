"""`binloop train`: the training pipeline from the command line. Heavy imports (torch, wandb)
happen inside the command, so `binloop --help` stays fast on machines without them."""

from __future__ import annotations

import logging
from enum import StrEnum
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

if TYPE_CHECKING:
    from services.trainer.pipeline import PipelineConfig, PipelineResult
    from services.trainer.sources import SourceImages
    from services.trainer.tracking import Tracker
    from services.trainer.train import TrainConfig


class Augment(StrEnum):
    light = "light"
    """Flip and a little brightness/contrast: what the service uses for the demo loop."""
    bin_camera = "bin-camera"
    """Flip, rotation, scale/crop, colour and lighting jitter, blur."""


class Balance(StrEnum):
    loss = "loss"
    sampler = "sampler"
    none = "none"


class Device(StrEnum):
    auto = "auto"
    cpu = "cpu"
    cuda = "cuda"


class SplitBy(StrEnum):
    content = "content"
    name = "name"


class Int8ActivationChoice(StrEnum):
    uint8 = "uint8"
    int8 = "int8"


class Tracking(StrEnum):
    wandb = "wandb"
    none = "none"


def _source(
    image_folder: Path | None,
    snapshot: str | None,
    label_studio: Path | None,
    image_root: Path | None,
) -> SourceImages:
    from services.trainer import sources

    chosen = [s for s in (image_folder, snapshot, label_studio) if s is not None]
    if len(chosen) != 1:
        raise typer.BadParameter(
            "give exactly one of --image-folder, --snapshot NAME[:VERSION], --label-studio"
        )
    if image_folder is not None:
        return sources.image_folder(image_folder)
    if label_studio is not None:
        return sources.label_studio_export(label_studio, image_root=image_root)
    from binloop.storage import open_store
    from services.trainer.settings import TrainerSettings

    name, version = _snapshot_name_and_version(snapshot or "")
    # The object store is the one the services use (BINLOOP_BLOB_ROOT, or S3 settings).
    return sources.snapshot(open_store(TrainerSettings()), name, version)


def _snapshot_name_and_version(snapshot: str) -> tuple[str, int | None]:
    """NAME[:VERSION]; no VERSION: the latest."""
    name, colon, version = snapshot.partition(":")
    if not colon:
        return name, None
    try:
        number = int(version)
    except ValueError:
        number = 0
    if number < 1:
        raise typer.BadParameter(
            f"the version in {snapshot!r} is not a whole number from 1 up (NAME[:VERSION]; "
            "leave out :VERSION for the latest)",
            param_hint="--snapshot",
        )
    return name, number


def _train_config(
    augment: Augment,
    balance: Balance,
    epochs: int,
    batch_size: int,
    learning_rate: float,
    patience: int,
    seed: int,
    mixed_precision: bool,
    weight_decay: float,
    label_smoothing: float,
    *,
    mixup_alpha: float,
    cutmix_alpha: float,
    ema_decay: float,
) -> TrainConfig:
    from services.trainer.train import TrainConfig

    shape = {}
    if augment is Augment.bin_camera:
        shape = {
            "brightness": 0.2,
            "contrast": 0.2,
            "saturation": 0.2,
            "rotation_degrees": 20.0,
            "scale": (0.75, 1.1),
            "blur_probability": 0.2,
        }
    return TrainConfig(
        epochs=epochs,
        patience=patience,
        batch_size=batch_size,
        learning_rate=learning_rate,
        seed=seed,
        balance=balance.value,
        mixed_precision=mixed_precision,
        weight_decay=weight_decay,
        label_smoothing=label_smoothing,
        mixup_alpha=mixup_alpha,
        cutmix_alpha=cutmix_alpha,
        ema_decay=ema_decay,
        **shape,  # type: ignore[arg-type]
    )


def train_command(
    out: Annotated[Path, typer.Option(help="Output folder: ONNX, card, metrics, checkpoint")],
    image_folder: Annotated[
        Path | None, typer.Option(help="ImageFolder: <dir>/<class>/<image>")
    ] = None,
    snapshot: Annotated[
        str | None, typer.Option(help="Dataset snapshot in the object store: NAME[:VERSION]")
    ] = None,
    label_studio: Annotated[
        Path | None, typer.Option(help="Label Studio JSON export (tasks with annotations)")
    ] = None,
    image_root: Annotated[
        Path | None,
        typer.Option(help="Where Label Studio's /data/local-files and /data/upload paths live"),
    ] = None,
    architecture: Annotated[
        str,
        typer.Option(
            help="compact-cnn[-narrow|-wide], mobilenet_v3_small, mobilenet_v3_large, "
            "efficientnet_b0, resnet18, or timm:<name>"
        ),
    ] = "compact-cnn",
    input_size: Annotated[tuple[int, int], typer.Option(help="HEIGHT WIDTH")] = (64, 64),
    epochs: Annotated[int, typer.Option(min=1)] = 30,
    batch_size: Annotated[int, typer.Option(min=1)] = 32,
    learning_rate: Annotated[float, typer.Option(min=0)] = 3e-3,
    patience: Annotated[int, typer.Option(min=1, help="Early stopping on val")] = 10,
    weight_decay: Annotated[float, typer.Option(min=0, help="AdamW weight decay")] = 1e-4,
    label_smoothing: Annotated[float, typer.Option(min=0, max=0.5)] = 0.0,
    mixup_alpha: Annotated[
        float, typer.Option(min=0, help="Mixup Beta(a, a) share; 0 is off (try 0.2)")
    ] = 0.0,
    cutmix_alpha: Annotated[
        float, typer.Option(min=0, help="CutMix Beta(a, a) box area; 0 is off (try 1.0)")
    ] = 0.0,
    ema_decay: Annotated[
        float,
        typer.Option(min=0, max=0.99999, help="Weight average kept and exported; 0 is off"),
    ] = 0.0,
    seed: Annotated[int, typer.Option(min=0)] = 0,
    augment: Annotated[Augment, typer.Option()] = Augment.bin_camera,
    balance: Annotated[
        Balance, typer.Option(help="Class imbalance: weighted loss or weighted sampling")
    ] = Balance.loss,
    device: Annotated[Device, typer.Option()] = Device.auto,
    threads: Annotated[int, typer.Option(min=1, help="CPU threads for torch")] = 1,
    mixed_precision: Annotated[bool, typer.Option(help="float16 autocast on CUDA")] = True,
    weights: Annotated[
        Path | None, typer.Option(help="Local checkpoint to start from (no download)")
    ] = None,
    pretrained: Annotated[
        bool, typer.Option(help="Download the library's pretrained weights (needs internet)")
    ] = False,
    resume: Annotated[bool, typer.Option(help="Continue from OUT/checkpoint.pt")] = False,
    checkpoint_every: Annotated[
        int, typer.Option(min=1, help="Save OUT/checkpoint.pt every N epochs (and the last)")
    ] = 1,
    calibrate: Annotated[bool, typer.Option(help="Fit temperature scaling on val")] = True,
    int8: Annotated[bool, typer.Option(help="Also write an INT8 model and its accuracy")] = False,
    int8_activations: Annotated[
        Int8ActivationChoice,
        typer.Option(help="uint8: integer kernels on x86; int8: for ARM CPUs"),
    ] = Int8ActivationChoice.uint8,
    int8_reduce_range: Annotated[
        bool,
        typer.Option(
            help="7-bit INT8 weights: exact on every x86 CPU (8-bit ones saturate without VNNI)"
        ),
    ] = True,
    split_by: Annotated[SplitBy, typer.Option(help="Hash the image content or its name")] = (
        SplitBy.content
    ),
    val_fraction: Annotated[float, typer.Option(min=0, max=0.5)] = 0.15,
    test_fraction: Annotated[float, typer.Option(min=0.01, max=0.5)] = 0.15,
    tracking: Annotated[Tracking, typer.Option(help="W&B runs offline unless WANDB_MODE")] = (
        Tracking.wandb
    ),
    wandb_project: Annotated[str, typer.Option()] = "binloop",
    model_name: Annotated[str, typer.Option()] = "binloop-waste",
    version: Annotated[int, typer.Option(min=1)] = 1,
    log_level: Annotated[str, typer.Option()] = "WARNING",
) -> None:
    """Train, calibrate, evaluate and export a waste classifier (docs/training.md)."""
    logging.basicConfig(level=log_level.upper(), format="%(levelname)s %(name)s: %(message)s")
    from services.trainer.pipeline import PipelineConfig
    from services.trainer.sources import SplitRule
    from services.trainer.tracking import NullTracker, WandbTracker

    source = _source(image_folder, snapshot, label_studio, image_root)
    config = PipelineConfig(
        out_dir=out,
        model_name=model_name,
        version=version,
        architecture=architecture,
        input_size=input_size,
        pretrained=pretrained,
        weights=weights,
        train=_train_config(
            augment,
            balance,
            epochs,
            batch_size,
            learning_rate,
            patience,
            seed,
            mixed_precision,
            weight_decay,
            label_smoothing,
            mixup_alpha=mixup_alpha,
            cutmix_alpha=cutmix_alpha,
            ema_decay=ema_decay,
        ),
        split=SplitRule(split_by.value, val_fraction, test_fraction),
        device=device.value,
        threads=threads,
        resume=resume,
        checkpoint_every=checkpoint_every,
        calibrate=calibrate,
        int8=int8,
        int8_activations="int8" if int8_activations is Int8ActivationChoice.int8 else "uint8",
        int8_reduce_range=int8_reduce_range,
    )
    tracker: Tracker = NullTracker()
    if tracking is Tracking.wandb:
        tracker = WandbTracker(
            wandb_project, f"{model_name}-v{version}", config.describe(), out / "wandb"
        )
    try:
        result = _run_with_progress(source, config, tracker)
    except BaseException:
        tracker.finish(exit_code=1)  # the run shows as failed, not finished
        raise
    tracker.finish()
    _print_result(result)


def _run_with_progress(
    source: SourceImages, config: PipelineConfig, tracker: Tracker
) -> PipelineResult:
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from services.trainer.pipeline import run_pipeline
    from services.trainer.train import EpochStats

    console = Console(stderr=True)
    with Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("loss {task.fields[loss]:.3f}"),
        TimeElapsedColumn(),
        console=console,
    ) as progress:
        bar = progress.add_task("epoch 1", total=None, loss=0.0)
        epoch = {"number": 1}

        def on_batch(done: int, total: int, loss: float) -> None:
            if done == 1:
                progress.reset(bar, total=total, description=f"epoch {epoch['number']}", loss=loss)
            progress.update(bar, completed=done, loss=loss)

        def on_epoch(stats: EpochStats) -> None:
            epoch["number"] = stats.epoch + 1
            val = (
                f"val acc {stats.val_accuracy:.3f} loss {stats.val_loss:.3f}"
                if stats.val_accuracy is not None and stats.val_loss is not None
                else "no val"
            )
            progress.console.print(f"epoch {stats.epoch}: train loss {stats.train_loss:.4f}, {val}")

        return run_pipeline(source, config, tracker=tracker, on_epoch=on_epoch, on_batch=on_batch)


def _print_result(result: PipelineResult) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"{result.card.name} v{result.card.version}: {result.out_dir}")
    table.add_column("metric")
    table.add_column("value", justify="right")
    counts = result.split_counts
    rows = [
        ("split train/val/test", f"{counts['train']}/{counts['val']}/{counts['test']}"),
        ("skipped (unreadable, no label)", str(len(result.skipped))),
        ("epochs (kept)", f"{len(result.history)} ({result.best_epoch})"),
        ("test accuracy", f"{result.report.accuracy:.4f}"),
        ("test macro F1", f"{result.report.macro_f1:.4f}"),
        ("compartment accuracy", f"{result.compartment_report.accuracy:.4f}"),
        ("temperature", f"{result.calibration.temperature:.4f}"),
        (
            "test ECE before -> after",
            f"{result.calibration.test_ece_before:.4f} -> {result.calibration.test_ece_after:.4f}",
        ),
        ("ONNX parity dynamic / fixed", f"{result.parity_dynamic:.2e} / {result.parity_fixed:.2e}"),
    ]
    if result.int8 is not None:
        rows.append(
            (
                "INT8 accuracy (delta)",
                f"{result.int8.accuracy:.4f} ({result.int8.accuracy_delta:+.4f})",
            )
        )
    for name, value in rows:
        table.add_row(name, value)
    Console().print(table)


if __name__ == "__main__":
    # `python -m binloop.train_command ...`: the same command on a training node that has the
    # pipeline's packages (torch, onnx, pydantic) but not the services' (NATS, FastStream).
    typer.run(train_command)
