"""JPEG bytes for the spool: pass real JPEGs through untouched, re-encode everything else."""

from __future__ import annotations

from typing import NamedTuple

import cv2
import numpy as np
import numpy.typing as npt

from binloop.errors import CorruptFrameError
from binloop.ml.preprocess import max_image_pixels

SOI = b"\xff\xd8"
EOI = b"\xff\xd9"
# Start-of-frame markers carry the image size; C4 (DHT), C8 (JPG) and CC (DAC) do not.
_SOF_MARKERS = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}
_STANDALONE_MARKERS = frozenset({0x01, *range(0xD0, 0xD8)})
# Scan data escapes every 0xFF, so an end-of-image marker cannot appear in it by chance; only
# the tail is searched because some writers append padding after the marker.
_EOI_SEARCH_BYTES = 4096


class JpegFrame(NamedTuple):
    data: bytes
    width: int
    height: int


def jpeg_size(data: bytes) -> tuple[int, int] | None:
    """(width, height) from the frame header, without decoding; None if it cannot be read."""
    if not data.startswith(SOI):
        return None
    position = 2
    while position + 4 <= len(data):
        if data[position] != 0xFF:
            return None
        marker = data[position + 1]
        if marker == 0xFF:  # fill byte before a marker
            position += 1
            continue
        if marker in _STANDALONE_MARKERS:
            position += 2
            continue
        if marker in (0xD9, 0xDA):  # image ended or scan began before any frame header
            return None
        length = int.from_bytes(data[position + 2 : position + 4], "big")
        if length < 2:
            return None
        if marker in _SOF_MARKERS:
            if position + 9 > len(data):
                return None
            height = int.from_bytes(data[position + 5 : position + 7], "big")
            width = int.from_bytes(data[position + 7 : position + 9], "big")
            return (width, height) if width and height else None
        position += 2 + length
    return None


def encode_jpeg(bgr: npt.NDArray[np.uint8], quality: int) -> JpegFrame:
    ok, buffer = cv2.imencode(".jpg", bgr, [cv2.IMWRITE_JPEG_QUALITY, quality])
    if not ok:
        raise CorruptFrameError(f"OpenCV could not encode a {bgr.shape} image as JPEG")
    height, width = bgr.shape[:2]
    return JpegFrame(buffer.tobytes(), int(width), int(height))


def _check_pixels(data: bytes, width: int, height: int) -> None:
    """A header claiming more pixels than OpenCV decodes (bit rot, a hostile file) would pass
    through untouched and fail every reader of the spooled frame instead."""
    if width * height > max_image_pixels():
        raise CorruptFrameError(
            f"{len(data)} bytes of JPEG whose header claims {width}x{height} pixels, over "
            f"OpenCV's limit of {max_image_pixels()} (CV_IO_MAX_IMAGE_PIXELS)"
        )


def as_jpeg(data: bytes, quality: int) -> JpegFrame:
    """A complete JPEG is returned as is (no generation loss); other images are decoded and
    re-encoded. Raises CorruptFrameError for bytes that are not a usable image."""
    if not data:
        raise CorruptFrameError("empty file")
    if data.startswith(SOI):
        # libjpeg "decodes" a truncated file into a half-grey image; that is not a frame to keep.
        if data.rfind(EOI, max(0, len(data) - _EOI_SEARCH_BYTES)) < 0:
            raise CorruptFrameError(f"{len(data)} bytes of JPEG without an end-of-image marker")
        size = jpeg_size(data)
        if size is not None:
            _check_pixels(data, *size)
            return JpegFrame(data, *size)
    try:
        image = cv2.imdecode(np.frombuffer(data, dtype=np.uint8), cv2.IMREAD_COLOR)
    except cv2.error as exc:  # e.g. a PNG header claiming more pixels than OpenCV decodes
        message = f"{len(data)} bytes that OpenCV refuses to decode: {exc.err}"
        raise CorruptFrameError(message) from exc
    if image is None:
        raise CorruptFrameError(f"{len(data)} bytes that do not decode as an image")
    return encode_jpeg(np.asarray(image, dtype=np.uint8), quality)
