"""Trains several `binloop train` configurations on one GPU (or CPU), one after another, and
prints a table of what each reached, so a GPU lease is spent on a comparison instead of one
guess.

Every configuration runs the trainer's own pipeline (`services.trainer.pipeline.run_pipeline`,
exactly what `binloop train` runs) into OUT/<name>/. With `--budget-minutes` each run first
trains `--probe-epochs` epochs to time itself, then gets as many epochs as fit its budget
(capped by its own `epochs`); the table names the epochs, and the equivalent `binloop train`
command is written to OUT/<name>/command.txt. The table is sorted by the best validation
accuracy: the test split is reported, not chosen on. The probe decodes the dataset once more
than the run itself (seconds for TrashNet). Runs go one after another: eight side by side on
one H100 slowed each other 30-90 times (docs/training.md).

    python tools/train_sweep.py --image-folder ../shared/datasets/trashnet --out runs/sweep \
        --budget-minutes 4 --only resnet-deep-96-mix mnv3-large-192-mix
"""

from __future__ import annotations

import argparse
import itertools
import json
import time
import traceback
from dataclasses import replace
from pathlib import Path
from typing import Any

SWEEP: dict[str, dict[str, Any]] = {
    # name: binloop train options (command-line names, underscores)
    "resnet-deep-96-mix": {
        "architecture": "compact-resnet-deep",
        "input_size": (96, 128),
        "mixup_alpha": 0.2,
        "cutmix_alpha": 1.0,
        "ema_decay": 0.999,
    },
    "resnet-deep-96": {"architecture": "compact-resnet-deep", "input_size": (96, 128)},
    "resnet-deep-120-mix": {
        "architecture": "compact-resnet-deep",
        "input_size": (120, 160),
        "mixup_alpha": 0.2,
        "cutmix_alpha": 1.0,
        "ema_decay": 0.999,
    },
    "resnet-wide-96-mix": {
        "architecture": "compact-resnet-wide",
        "input_size": (96, 128),
        "mixup_alpha": 0.2,
        "cutmix_alpha": 1.0,
        "ema_decay": 0.999,
    },
    "mnv3-large-192-mix": {
        "architecture": "mobilenet_v3_large",
        "input_size": (192, 256),
        "mixup_alpha": 0.2,
        "cutmix_alpha": 1.0,
        "ema_decay": 0.999,
    },
    "mnv3-large-144-mix": {
        "architecture": "mobilenet_v3_large",
        "input_size": (144, 192),
        "mixup_alpha": 0.2,
        "cutmix_alpha": 1.0,
        "ema_decay": 0.999,
    },
    "effnet-lite0-144-mix": {
        "architecture": "timm:efficientnet_lite0",
        "input_size": (144, 192),
        "mixup_alpha": 0.2,
        "cutmix_alpha": 1.0,
        "ema_decay": 0.999,
    },
    "resnet-deep-192-mix": {
        "architecture": "compact-resnet-deep",
        "input_size": (192, 256),
        "mixup_alpha": 0.2,
        "cutmix_alpha": 1.0,
        "ema_decay": 0.999,
    },
}

DEFAULTS: dict[str, Any] = {
    "epochs": 600,
    "batch_size": 32,
    "learning_rate": 3e-3,
    "weight_decay": 0.05,
    "label_smoothing": 0.1,
    "mixup_alpha": 0.0,
    "cutmix_alpha": 0.0,
    "ema_decay": 0.0,
    "seed": 0,
}
"""The shipped model's recipe (docs/training.md), with a longer schedule."""
CHECKPOINT_EVERY = 25


def command_line(image_folder: Path, out: Path, options: dict[str, Any]) -> str:
    """The `binloop train` command that builds the same PipelineConfig."""
    height, width = options["input_size"]
    parts = [
        f"binloop train --image-folder {image_folder} --out {out}",
        f"--architecture {options['architecture']} --input-size {height} {width}",
        f"--epochs {options['epochs']} --patience {options['epochs']}",
        f"--batch-size {options['batch_size']} --learning-rate {options['learning_rate']}",
        f"--weight-decay {options['weight_decay']} --label-smoothing {options['label_smoothing']}",
    ]
    for name in ("mixup_alpha", "cutmix_alpha", "ema_decay"):
        if options[name]:
            parts.append(f"--{name.replace('_', '-')} {options[name]}")
    parts.append(f"--seed {options['seed']} --device auto --checkpoint-every {CHECKPOINT_EVERY}")
    return " \\\n    ".join(parts)


def _pipeline_config(out: Path, options: dict[str, Any], threads: int) -> Any:
    from binloop.train_command import Augment, Balance, _train_config
    from services.trainer.pipeline import PipelineConfig

    train = _train_config(
        Augment.bin_camera,
        Balance.loss,
        options["epochs"],
        options["batch_size"],
        options["learning_rate"],
        options["epochs"],  # patience: the whole schedule (one-cycle ends low; keep the best)
        options["seed"],
        True,
        options["weight_decay"],
        options["label_smoothing"],
        mixup_alpha=options["mixup_alpha"],
        cutmix_alpha=options["cutmix_alpha"],
        ema_decay=options["ema_decay"],
    )
    return PipelineConfig(
        out_dir=out,
        architecture=options["architecture"],
        input_size=tuple(options["input_size"]),
        train=train,
        threads=threads,
        checkpoint_every=CHECKPOINT_EVERY,
        int8=False,
    )


def _seconds_per_epoch(source: Any, config: Any, epochs: int) -> float:
    """Trains `epochs` epochs on the train split (no checkpoint, no export) and returns the
    median time of the epochs after the first (the first pays for cuDNN's planning)."""
    from binloop.ml.preprocess import Preprocessor
    from services.trainer.data import ManifestDataset
    from services.trainer.nets import build_model
    from services.trainer.sources import load_and_split
    from services.trainer.train import resolve_device, train_classifier

    data = load_and_split(
        source, Preprocessor(config.input_size, config.mean, config.std), config.split
    )
    train = data.splits["train"]
    classes = sorted(set(train.labels))
    stamps: list[float] = [time.perf_counter()]
    train_classifier(
        lambda: build_model(config.architecture, len(classes)),
        ManifestDataset(train, classes),
        None,
        replace(config.train, epochs=epochs),
        device=resolve_device(config.device),
        on_epoch=lambda _stats: stamps.append(time.perf_counter()),
    )
    laps = sorted(b - a for a, b in itertools.pairwise(stamps[1:])) or [stamps[1] - stamps[0]]
    return laps[len(laps) // 2]


def run_one(options: dict[str, Any], out: Path, args: argparse.Namespace) -> dict[str, Any]:
    """One configuration into `out`: its row of the table, or {"error": traceback}."""
    import logging

    import torch

    from services.trainer.pipeline import run_pipeline
    from services.trainer.sources import image_folder

    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(args.threads)
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    try:
        source = image_folder(args.image_folder)
        options = dict(options)
        probe_seconds = None
        if args.budget_minutes:
            probe = _pipeline_config(out, {**options, "epochs": args.probe_epochs}, args.threads)
            probe_seconds = _seconds_per_epoch(source, probe, args.probe_epochs)
            budget = args.budget_minutes * 60 - (time.perf_counter() - started)
            fit = int(budget / probe_seconds)
            options["epochs"] = max(1, min(options["epochs"], fit))
        (out / "command.txt").write_text(command_line(args.image_folder, out, options) + "\n")
        result = run_pipeline(source, _pipeline_config(out, options, args.threads))
        best_val = max((s.val_accuracy or 0.0) for s in result.history)
        return {
            "architecture": options["architecture"],
            "input_size": list(options["input_size"]),
            "parameters": result.card.parameters,
            "epochs": len(result.history),
            "best_epoch": result.best_epoch,
            "seconds_per_epoch": probe_seconds,
            "best_val_accuracy": best_val,
            "test_accuracy": result.report.accuracy,
            "test_macro_f1": result.report.macro_f1,
            "compartment_accuracy": result.compartment_report.accuracy,
            "temperature": result.calibration.temperature,
            "seconds": time.perf_counter() - started,
        }
    except Exception:  # one failed configuration must not take the table with it
        return {"error": traceback.format_exc()[-2000:]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--image-folder", type=Path, required=True)
    parser.add_argument("--out", type=Path, default=Path("runs/sweep"))
    parser.add_argument("--only", nargs="*", choices=sorted(SWEEP), help="configurations to run")
    parser.add_argument(
        "--budget-minutes", type=float, default=0.0, help="per run; 0: each its own epochs"
    )
    parser.add_argument("--probe-epochs", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2, help="CPU threads per run")
    args = parser.parse_args()

    table: dict[str, dict[str, Any]] = {}
    for name in args.only or list(SWEEP):
        table[name] = run_one({**DEFAULTS, **SWEEP[name]}, args.out / name, args)
        print(name, json.dumps(table[name])[:600], flush=True)
    (args.out / "summary.json").write_text(json.dumps(table, indent=1) + "\n")
    _print_table(table)


def _print_table(table: dict[str, dict[str, Any]]) -> None:
    from rich.console import Console
    from rich.table import Table

    view = Table(title="sweep (sorted by best val accuracy; test reported, not chosen on)")
    for column in ("run", "params", "epochs (kept)", "s/epoch", "best val", "test", "macro F1"):
        view.add_column(column, justify="left" if column == "run" else "right")
    ranked = sorted(table.items(), key=lambda kv: -kv[1].get("best_val_accuracy", -1.0))
    for name, row in ranked:
        if "error" in row:
            view.add_row(name, "failed: " + row["error"].strip().splitlines()[-1][:60])
            continue
        per_epoch = row["seconds_per_epoch"]
        view.add_row(
            name,
            f"{row['parameters'] / 1e6:.2f} M",
            f"{row['epochs']} ({row['best_epoch']})",
            f"{per_epoch:.2f}" if per_epoch else "-",
            f"{row['best_val_accuracy']:.4f}",
            f"{row['test_accuracy']:.4f}",
            f"{row['test_macro_f1']:.4f}",
        )
    Console(width=120).print(view)


if __name__ == "__main__":
    main()
