"""Experiment tracking for the training pipeline: Weights & Biases in offline mode by default
(runs land under the output folder and never need a network; `wandb sync` uploads them later),
or nothing at all."""

from __future__ import annotations

import os
from dataclasses import asdict
from pathlib import Path
from typing import Any, Protocol

from services.trainer.train import EpochStats


class Tracker(Protocol):
    def log_epoch(self, stats: EpochStats) -> None: ...

    def log_summary(self, values: dict[str, float]) -> None: ...

    def log_image(self, key: str, png: Path) -> None: ...

    def log_model(self, name: str, files: list[Path]) -> None: ...

    def finish(self, exit_code: int = 0) -> None:
        """Ends the run: finished with exit code 0, failed with any other."""
        ...


class NullTracker:
    """Tracking switched off."""

    def log_epoch(self, stats: EpochStats) -> None:
        pass

    def log_summary(self, values: dict[str, float]) -> None:
        pass

    def log_image(self, key: str, png: Path) -> None:
        pass

    def log_model(self, name: str, files: list[Path]) -> None:
        pass

    def finish(self, exit_code: int = 0) -> None:
        pass


class WandbTracker:
    """One W&B run. The mode is WANDB_MODE when a user set it (e.g. "online"), else offline."""

    def __init__(self, project: str, name: str, config: dict[str, Any], directory: Path) -> None:
        import wandb

        self._wandb = wandb
        directory.mkdir(parents=True, exist_ok=True)
        self.run = wandb.init(
            project=project,
            name=name,
            config=config,
            dir=str(directory),
            mode=os.environ.get("WANDB_MODE", "offline"),  # type: ignore[arg-type]
            # Our own progress bar owns the terminal; W&B must not capture or print to it.
            settings=wandb.Settings(console="off", silent=True),
        )

    @property
    def run_dir(self) -> Path:
        return Path(self.run.dir).parent

    def log_epoch(self, stats: EpochStats) -> None:
        values = {k: v for k, v in asdict(stats).items() if v is not None and k != "epoch"}
        self.run.log(values, step=stats.epoch)

    def log_summary(self, values: dict[str, float]) -> None:
        self.run.summary.update(values)

    def log_image(self, key: str, png: Path) -> None:
        self.run.log({key: self._wandb.Image(str(png))})

    def log_model(self, name: str, files: list[Path]) -> None:
        artifact = self._wandb.Artifact(name, type="model")
        for path in files:
            artifact.add_file(str(path))
        self.run.log_artifact(artifact)

    def finish(self, exit_code: int = 0) -> None:
        self.run.finish(exit_code=exit_code)
