"""Decoding at the size the model needs: JPEG headers, libjpeg's reduced scales, and the cases
where the full frame must be decoded after all (other formats, EXIF turns, lying headers)."""

from __future__ import annotations

import struct

import cv2
import numpy as np
import pytest

from binloop.errors import CorruptFrameError
from binloop.ml.preprocess import Preprocessor, decode_rgb, jpeg_reduction, jpeg_size

INPUT = (96, 128)
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def _scene(height: int, width: int) -> np.ndarray:
    """Smooth gradients and a few blocks: something a camera could see, not noise."""
    rows = np.linspace(0, 255, height, dtype=np.float32)[:, None]
    cols = np.linspace(0, 255, width, dtype=np.float32)[None, :]
    rgb = np.stack([rows + 0 * cols, cols + 0 * rows, (rows + cols) / 2], axis=2)
    rgb[height // 4 : height // 2, width // 3 : width // 2] = (200, 30, 60)
    rgb[height // 2 :, : width // 5] = (20, 180, 90)
    return np.clip(rgb, 0, 255).astype(np.uint8)


def _jpeg(rgb: np.ndarray, *flags: int) -> bytes:
    ok, encoded = cv2.imencode(".jpg", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR), list(flags))
    assert ok
    return encoded.tobytes()


def _with_exif_orientation(jpeg: bytes, orientation: int) -> bytes:
    """An APP1 segment whose only EXIF entry is the orientation (6: turn 90 degrees)."""
    entry = struct.pack(">HHIHH", 0x0112, 3, 1, orientation, 0)
    tiff = b"MM\x00*" + struct.pack(">IH", 8, 1) + entry + struct.pack(">I", 0)
    app1 = b"Exif\x00\x00" + tiff
    return jpeg[:2] + b"\xff\xe1" + struct.pack(">H", len(app1) + 2) + app1 + jpeg[2:]


def test_jpeg_size_reads_the_frame_header_of_baseline_and_progressive_jpegs() -> None:
    rgb = _scene(480, 640)
    assert jpeg_size(_jpeg(rgb)) == (640, 480)  # (width, height)
    assert jpeg_size(_jpeg(rgb, cv2.IMWRITE_JPEG_PROGRESSIVE, 1)) == (640, 480)
    assert jpeg_size(_with_exif_orientation(_jpeg(rgb), 6)) == (640, 480)  # stored, not shown


@pytest.mark.parametrize(
    "data",
    [b"", b"\xff\xd8", b"\xff\xd8\xff\xe0\x00", b"not an image", b"\xff\xd8\xff\xda\x00\x02"],
)
def test_jpeg_size_is_none_for_what_has_no_frame_header(data: bytes) -> None:
    assert jpeg_size(data) is None


def test_jpeg_size_is_none_for_other_formats() -> None:
    ok, png = cv2.imencode(".png", _scene(64, 64))
    assert ok
    assert jpeg_size(png.tobytes()) is None


@pytest.mark.parametrize(
    ("size", "reduction"),
    [
        ((1920, 1080), 8),  # 240 x 135: a camera frame for a 128 x 96 model
        ((1280, 720), 4),  # 320 x 180; 1/8 would be 90 rows
        ((512, 384), 4),  # exactly the input size at 1/4
        ((320, 240), 2),  # TrashNet as shipped here
        ((320, 191), 1),  # 1/2 would be 95 rows
        ((128, 96), 1),
        ((64, 64), 1),  # enlarged later, never reduced
    ],
)
def test_the_reduction_keeps_the_frame_at_least_the_input_size(
    size: tuple[int, int], reduction: int
) -> None:
    """Sizes are (width, height) like the header's; the input is (height, width) like a card's."""
    assert jpeg_reduction(size, INPUT) == reduction


def test_a_large_jpeg_decodes_at_a_reduced_scale_close_to_the_full_frame_resized() -> None:
    rgb = _scene(480, 640)
    data = _jpeg(rgb, cv2.IMWRITE_JPEG_QUALITY, 95)
    preprocessor = Preprocessor(INPUT, MEAN, STD)

    reduced = preprocessor.decode(data)
    assert reduced.shape == (120, 160, 3)  # 1/4: the smallest scale still >= 96 x 128
    assert reduced.dtype == np.uint8
    assert decode_rgb(data).shape == (480, 640, 3)  # without a target: the whole frame

    # What the model sees: the same scene, within a grey level or two, either way.
    fast = preprocessor.resize(reduced).astype(np.int16)
    full = preprocessor.resize(decode_rgb(data)).astype(np.int16)
    assert fast.shape == full.shape == (*INPUT, 3)
    assert np.abs(fast - full).mean() < 0.6
    assert np.abs(fast - full).max() < 20  # at the blocks' edges only
    assert np.array_equal(preprocessor.load(data), preprocessor(reduced))


def test_other_formats_and_small_jpegs_decode_whole() -> None:
    scene = _scene(480, 640)
    ok, png = cv2.imencode(".png", cv2.cvtColor(scene, cv2.COLOR_RGB2BGR))
    assert ok
    # OpenCV would shrink a PNG by dropping pixels, so only JPEGs are decoded reduced.
    assert np.array_equal(decode_rgb(png.tobytes(), at_least=INPUT), scene)
    small = _jpeg(_scene(150, 200))
    assert decode_rgb(small, at_least=INPUT).shape == (150, 200, 3)


def test_a_jpeg_turned_by_its_exif_orientation_is_decoded_whole_when_reduced_is_too_small() -> None:
    """The header says 240 x 960 (1/2: 120 x 480, enough), but the EXIF orientation turns it
    to 960 x 240, whose 1/2 is 120 wide, under the model's 128: it is decoded again whole."""
    data = _with_exif_orientation(_jpeg(_scene(240, 960)), 6)
    decoded = decode_rgb(data, at_least=INPUT)
    assert decoded.shape == (960, 240, 3)
    assert np.array_equal(decoded, decode_rgb(data))


def test_a_header_over_the_pixel_limit_is_corrupt_at_any_scale() -> None:
    """At 1/8 OpenCV would check only the scaled size and fill 8125 x 8125 with grey."""
    data = bytearray(_jpeg(_scene(8, 8)))
    frame_header = data.find(b"\xff\xc0")
    data[frame_header + 5 : frame_header + 9] = struct.pack(">HH", 65000, 65000)
    with pytest.raises(CorruptFrameError, match="header claims more than OpenCV's limit"):
        decode_rgb(bytes(data), at_least=INPUT)


def test_bytes_that_are_not_an_image_are_corrupt_with_or_without_a_target() -> None:
    for at_least in (None, INPUT):
        with pytest.raises(CorruptFrameError):
            decode_rgb(b"\xff\xd8 truncated jpeg", at_least=at_least)
        with pytest.raises(CorruptFrameError, match="empty"):
            decode_rgb(b"", at_least=at_least)
