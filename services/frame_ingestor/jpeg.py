"""JPEG bytes for the spool: pass real JPEGs through untouched, re-encode everything else;
and where the spool keeps them (content-addressed)."""

from __future__ import annotations

from typing import NamedTuple

import cv2
import numpy as np
import numpy.typing as npt

from binloop.errors import CorruptFrameError
from binloop.ml.preprocess import JPEG_SOI, jpeg_size, max_image_pixels
from binloop.storage import LocalBlobStore, sha256_hex, spool_key
from schemas.base import BlobRef

EOI = b"\xff\xd9"
# Scan data escapes every 0xFF, so an end-of-image marker cannot appear in it by chance; only
# the tail is searched because some writers append padding after the marker.
_EOI_SEARCH_BYTES = 4096


JPEG = "image/jpeg"


def spool_ref(spool: LocalBlobStore, bin_id: str, jpeg: bytes) -> BlobRef:
    """Where the frame-ingestor spools `jpeg` (the key is content-addressed)."""
    digest = sha256_hex(jpeg)
    key = spool_key(bin_id, digest)
    return BlobRef(key=key, uri=spool.uri(key), sha256=digest, size=len(jpeg), content_type=JPEG)


class JpegFrame(NamedTuple):
    data: bytes
    width: int
    height: int


_JPEG_CHANNELS = (1, 3, 4)
"""Grey, BGR, BGRA: what OpenCV's JPEG encoder takes (it drops alpha)."""


def encode_jpeg(bgr: npt.NDArray[np.uint8], quality: int) -> JpegFrame:
    """Raises CorruptFrameError for an image that is not one to keep: empty, or of a shape
    the JPEG encoder does not take (a decoder hands such a Mat over on a broken packet)."""
    channels = 1 if bgr.ndim == 2 else bgr.shape[2] if bgr.ndim == 3 else 0
    if bgr.size == 0 or channels not in _JPEG_CHANNELS:
        raise CorruptFrameError(f"a {bgr.shape} image is not a frame OpenCV encodes as JPEG")
    try:
        ok, buffer = cv2.imencode(".jpg", bgr, [cv2.IMWRITE_JPEG_QUALITY, quality])
    except cv2.error as exc:  # OpenCV asserts on what it cannot encode instead of failing
        raise CorruptFrameError(f"OpenCV refuses to encode a {bgr.shape} image: {exc.err}") from exc
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
    if data.startswith(JPEG_SOI):
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
