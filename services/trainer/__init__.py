"""trainer: trains a candidate image classifier on a dataset snapshot, evaluates it on the
fixed evaluation set, exports it to ONNX and stores the artifacts with a model card.

`create_app` and `TrainerSettings` are imported on first use (PEP 562), so the training
pipeline (`binloop train`, a GPU node's `python -m binloop.train_command`) loads without the
NATS service's dependencies."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from services.trainer.app import create_app
    from services.trainer.settings import TrainerSettings

__all__ = ["TrainerSettings", "create_app"]


def __getattr__(name: str) -> Any:
    if name == "create_app":
        from services.trainer.app import create_app

        return create_app
    if name == "TrainerSettings":
        from services.trainer.settings import TrainerSettings

        return TrainerSettings
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
