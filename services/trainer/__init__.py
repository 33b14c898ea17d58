"""trainer: trains a candidate image classifier on a dataset snapshot, evaluates it on the
fixed evaluation set, exports it to ONNX and stores the artifacts with a model card."""

from services.trainer.app import create_app
from services.trainer.settings import TrainerSettings

__all__ = ["TrainerSettings", "create_app"]
