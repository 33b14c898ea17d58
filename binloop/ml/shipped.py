"""The classifier that ships with binloop, as package data in binloop/ml/shipped_model/
(model.onnx + card.json, trained from scratch on TrashNet with `binloop train`; the command and
its results are in docs/training.md): the edge inferencer's default model and the demo's
starting champion."""

from __future__ import annotations

from pathlib import Path

SHIPPED_MODEL_DIR = Path(__file__).resolve().parent / "shipped_model"
SHIPPED_MODEL = SHIPPED_MODEL_DIR / "model.onnx"
SHIPPED_CARD = SHIPPED_MODEL_DIR / "card.json"
