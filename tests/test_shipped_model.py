"""The classifier binloop ships (binloop/ml/shipped_model): its card says everything needed to
run it without our code, and following the card with other libraries gives our answers."""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import onnxruntime as ort
from PIL import Image

from binloop.ml.card import ModelCard
from binloop.ml.preprocess import Preprocessor, decode_rgb, resize_filter
from binloop.ml.shipped import SHIPPED_CARD, SHIPPED_MODEL

TRASHNET_CLASSES = ["cardboard", "glass", "metal", "paper", "plastic", "trash"]
DEMO_EVAL = Path(__file__).resolve().parents[1] / "data" / "demo" / "eval"


def test_shrinking_is_antialiased_and_enlarging_is_bilinear() -> None:
    stripes = np.zeros((8, 8, 3), np.uint8)
    stripes[:, ::2] = 255  # one-pixel stripes: plain bilinear sampling would alias them
    assert resize_filter(stripes, 4, 4) == cv2.INTER_AREA
    assert resize_filter(stripes, 16, 16) == cv2.INTER_LINEAR
    shrunk = Preprocessor((4, 4), (0.0, 0.0, 0.0), (1.0, 1.0, 1.0))(stripes)
    np.testing.assert_allclose(shrunk, 0.5, atol=1 / 255)  # each pixel averages a pair


def test_card_describes_the_model_for_anyone() -> None:
    card = ModelCard.read(SHIPPED_CARD)
    raw = json.loads(SHIPPED_CARD.read_text())
    assert card.classes == TRASHNET_CLASSES  # lower-case TrashNet names, in output order
    assert raw["input_size"] == list(card.input_size)
    assert len(card.input_size) == 2
    assert raw["color_order"] == "RGB"
    assert raw["output"] == "logits"
    assert "no crop" in card.preprocessing
    assert "[0, 1]" in card.preprocessing
    assert card.parameters <= 5_000_000
    assert card.metrics is not None
    assert card.metrics.eval_items > 0
    assert SHIPPED_MODEL.stat().st_size < 15 * 1024 * 1024


def _run_from_the_card_alone(path: Path, card: dict[str, object], session: ort.InferenceSession):
    """What a user without binloop does: PIL to decode and resize, numpy to normalise."""
    height, width = card["input_size"]  # type: ignore[misc]
    image = Image.open(path).convert("RGB").resize((width, height), Image.Resampling.BILINEAR)
    pixels = np.asarray(image, np.float32) / 255.0
    mean = np.asarray(card["mean"], np.float32)
    std = np.asarray(card["std"], np.float32)
    batch = ((pixels - mean) / std).transpose(2, 0, 1)[None].astype(np.float32)
    logits = session.run(None, {session.get_inputs()[0].name: batch})[0]
    return logits[0]


def test_following_the_card_with_pil_gives_our_answers() -> None:
    card = json.loads(SHIPPED_CARD.read_text())
    session = ort.InferenceSession(str(SHIPPED_MODEL), providers=["CPUExecutionProvider"])
    ours = Preprocessor(tuple(card["input_size"]), tuple(card["mean"]), tuple(card["std"]))
    images = sorted(DEMO_EVAL.glob("*/*.jpg"))
    assert len(images) >= 100
    agree = 0
    for path in images:
        theirs = _run_from_the_card_alone(path, card, session)
        mine = session.run(None, {"input": ours(decode_rgb(path.read_bytes()))[None]})[0][0]
        agree += int(np.argmax(theirs) == np.argmax(mine))
    # PIL's bilinear shrink and OpenCV's area filter differ by rounding, not by what they show.
    assert agree / len(images) >= 0.95
