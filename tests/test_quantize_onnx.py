"""tools/quantize_onnx.py: the INT8 twin of a model folder, calibrated on the train split of an
image folder and scored on its test split, with this CPU's kernels against the graph as written."""

from __future__ import annotations

import shutil
from pathlib import Path

import onnx
import pytest
from onnx import TensorProto, numpy_helper

from binloop.storage import sha256_hex
from services.trainer.sources import SplitRule
from tools.quantize_onnx import main

REPO = Path(__file__).resolve().parents[1]
SHIPPED = REPO / "binloop" / "ml" / "shipped_model"
SEED_PHOTOS = REPO / "data" / "demo" / "seed"


def test_writes_a_7_bit_twin_and_scores_it_against_the_graph_as_written(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "shipped"

    main([str(SHIPPED), str(out), "--image-folder", str(SEED_PHOTOS), "--threads", "1"])

    assert (out / "model.onnx").read_bytes() == (SHIPPED / "model.onnx").read_bytes()
    assert (out / "card.json").read_bytes() == (SHIPPED / "card.json").read_bytes()
    weights = [
        numpy_helper.to_array(tensor)
        for tensor in onnx.load(str(out / "model.int8.onnx")).graph.initializer
        if tensor.data_type == TensorProto.INT8
    ]
    assert weights
    assert max(int(abs(w).max()) for w in weights) <= 64
    printed = " ".join(capsys.readouterr().out.split())
    assert "7-bit weights" in printed
    assert "NOT the card's test split" in printed  # the seed photos are not TrashNet's split
    for row in ("float32", "INT8 on this CPU", "INT8 as written"):
        assert row in printed
    # 7 bits: no multiply-add clips, so this CPU's kernels give the graph's own classes.
    assert "same class for 100.0% of the test images" in printed


def test_a_folder_it_cannot_calibrate_from_is_refused_with_the_reason(tmp_path: Path) -> None:
    def refused(folder: Path) -> str:
        with pytest.raises(SystemExit) as stopped:
            main([str(SHIPPED), str(tmp_path / "out"), "--image-folder", str(folder)])
        return str(stopped.value)

    assert "does not exist" in refused(tmp_path / "missing")
    photos = tmp_path / "photos"
    (photos / "glass").mkdir(parents=True)
    shutil.copy(next((SEED_PHOTOS / "glass").iterdir()), photos / "unlabeled.jpg")
    assert "no readable images in class folders" in refused(photos)
    rule = SplitRule()
    held_out = next(
        path
        for path in sorted(SEED_PHOTOS.rglob("*.jpg"))
        if rule.split_of(path.name, sha256_hex(path.read_bytes())) != "train"
    )
    shutil.copy(held_out, photos / "glass" / held_out.name)
    assert "no train-split images" in refused(photos)
    (photos / "banana").mkdir()
    for path in sorted((SEED_PHOTOS / "glass").iterdir()):
        shutil.copy(path, photos / "banana" / path.name)
    assert "classes the model does not have: banana" in refused(photos)
    assert not (tmp_path / "out").exists()
