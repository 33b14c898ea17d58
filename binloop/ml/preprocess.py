"""Image decoding and preprocessing exactly as the model card describes, vectorised (no
per-pixel Python). Training and the edge share this code, so they cannot drift apart."""

from __future__ import annotations

import os

import cv2
import numpy as np
import numpy.typing as npt

from binloop.errors import CorruptFrameError
from binloop.ml.card import ModelCard

FloatArray = npt.NDArray[np.float32]
ImageArray = npt.NDArray[np.uint8]


_IMREAD_COLOR_RGB: int | None = getattr(cv2, "IMREAD_COLOR_RGB", None)
"""OpenCV 4.11+ decodes to RGB directly; older builds (JetPack's) decode BGR and convert."""


_DEFAULT_MAX_IMAGE_PIXELS = 1 << 30
"""OpenCV's limit on the pixels an image header may claim, unless CV_IO_MAX_IMAGE_PIXELS says
otherwise (imgcodecs/src/loadsave.cpp)."""


def max_image_pixels() -> int:
    configured = os.environ.get("CV_IO_MAX_IMAGE_PIXELS", "")
    return int(configured) if configured.isdigit() else _DEFAULT_MAX_IMAGE_PIXELS


def _too_large(data: bytes) -> CorruptFrameError:
    return CorruptFrameError(
        f"{len(data)} bytes whose header claims more than OpenCV's limit of "
        f"{max_image_pixels()} pixels (CV_IO_MAX_IMAGE_PIXELS)"
    )


def _refused(data: bytes, exc: cv2.error) -> CorruptFrameError:
    if "CV_IO_MAX_IMAGE_PIXELS" in str(exc):
        return _too_large(data)
    reason = str(exc.err) if exc.err else str(exc).strip()
    return CorruptFrameError(f"{len(data)} bytes that OpenCV refuses to decode: {reason}")


JPEG_SOI = b"\xff\xd8"
"""The start-of-image marker every JPEG begins with."""
# Start-of-frame markers carry the image size; C4 (DHT), C8 (JPG) and CC (DAC) do not.
_SOF_MARKERS = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}
_STANDALONE_MARKERS = frozenset({0x01, *range(0xD0, 0xD8)})

JPEG_SCALES = (8, 4, 2)
"""The reductions libjpeg decodes at directly (IDCT scaling), largest first."""


def jpeg_size(data: bytes) -> tuple[int, int] | None:
    """(width, height) from the frame header, without decoding; None if it cannot be read
    (another format, a truncated or odd header). Reads a few marker segments, not the image."""
    if not data.startswith(JPEG_SOI):
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


def jpeg_reduction(size: tuple[int, int], at_least: tuple[int, int]) -> int:
    """The largest libjpeg scale (1/8, 1/4, 1/2) that keeps a JPEG of `size` (width, height)
    at least `at_least` (height, width, like input_size) in both directions; 1 (full size)
    when none does."""
    width, height = size
    for reduction in JPEG_SCALES:
        if height // reduction >= at_least[0] and width // reduction >= at_least[1]:
            return reduction
    return 1


_REDUCED_COLOR = {
    1: cv2.IMREAD_COLOR,
    2: cv2.IMREAD_REDUCED_COLOR_2,
    4: cv2.IMREAD_REDUCED_COLOR_4,
    8: cv2.IMREAD_REDUCED_COLOR_8,
}


def _imdecode(buffer: npt.NDArray[np.uint8], reduction: int) -> npt.NDArray[np.uint8] | None:
    flags = _REDUCED_COLOR[reduction]
    if _IMREAD_COLOR_RGB is not None:
        # RGB straight from the decoder: the scale bits with the RGB flag in place of BGR.
        decoded = cv2.imdecode(buffer, (flags & ~cv2.IMREAD_COLOR) | _IMREAD_COLOR_RGB)
        return None if decoded is None else np.asarray(decoded, dtype=np.uint8)
    decoded = cv2.imdecode(buffer, flags)
    return None if decoded is None else np.asarray(cv2.cvtColor(decoded, cv2.COLOR_BGR2RGB))


def decode_rgb(data: bytes, at_least: tuple[int, int] | None = None) -> ImageArray:
    """JPEG/PNG bytes -> HxWx3 uint8 RGB. Raises CorruptFrameError on anything else.

    With `at_least` (height, width), a JPEG at least twice that size is decoded at 1/2, 1/4
    or 1/8 scale, as large as it must be and no larger: libjpeg scales in the inverse DCT,
    an antialiased shrink that skips most of the decoding work (a 1080p camera frame for a
    128-wide model decodes at 1/8). Other formats decode at full size."""
    if not data:
        raise CorruptFrameError("empty image")
    buffer = np.frombuffer(data, dtype=np.uint8)
    reduction = 1
    size = None if at_least is None else jpeg_size(data)
    if at_least is not None and size is not None:
        # OpenCV checks its pixel limit against the scaled size: a header claiming 65000 x
        # 65000 would pass at 1/8 and allocate 200 MB of grey. The full size is what counts.
        if size[0] * size[1] > max_image_pixels():
            raise _too_large(data)
        reduction = jpeg_reduction(size, at_least)
    # Most bad bytes decode to None, but some raise instead, e.g. a header (bit rot, a hostile
    # upload) claiming a frame over OpenCV's pixel limit: they are just as corrupt, and every
    # caller (trainer, edge, ML backend) skips or dead-letters a CorruptFrameError.
    try:
        decoded = _imdecode(buffer, reduction)
        if (
            reduction > 1
            and decoded is not None
            and at_least is not None
            and (decoded.shape[0] < at_least[0] or decoded.shape[1] < at_least[1])
        ):
            # Turned by its EXIF orientation after the size was read: decode it whole.
            decoded = _imdecode(buffer, 1)
    except cv2.error as exc:
        raise _refused(data, exc) from exc
    if decoded is None:
        raise CorruptFrameError(f"{len(data)} bytes that do not decode as an image")
    return decoded


def resize_filter(image: ImageArray, height: int, width: int) -> int:
    """Area averaging when shrinking (antialiased, like PIL's BILINEAR resize, which widens its
    filter when shrinking; plain INTER_LINEAR would sample 2x2 pixels of every 4x4 and alias),
    bilinear when enlarging."""
    shrinking = image.shape[0] > height or image.shape[1] > width
    return cv2.INTER_AREA if shrinking else cv2.INTER_LINEAR


class Preprocessor:
    """Whole-frame resize to the input size (no crop), scale to [0, 1], normalise, NCHW."""

    def __init__(
        self,
        input_size: tuple[int, int],
        mean: tuple[float, float, float],
        std: tuple[float, float, float],
    ) -> None:
        self.height, self.width = input_size
        mean_arr = np.asarray(mean, dtype=np.float32)
        std_arr = np.asarray(std, dtype=np.float32)
        # x * scale + shift == (x / 255 - mean) / std, worked out once for each of the 256
        # values a channel can take: normalising a frame is then one table lookup per value
        # (cv2.LUT, uint8 in, float32 out), bit-identical to doing the float math per pixel.
        scale = (1.0 / (255.0 * std_arr)).reshape(1, 3)
        shift = (-mean_arr / std_arr).reshape(1, 3)
        levels = np.arange(256, dtype=np.float32).reshape(256, 1)
        self._table = np.ascontiguousarray((levels * scale + shift).reshape(1, 256, 3))

    @classmethod
    def from_card(cls, card: ModelCard) -> Preprocessor:
        return cls(card.input_size, card.mean, card.std)

    def decode(self, data: bytes) -> ImageArray:
        """Image bytes -> RGB, decoded no larger than the resize needs (decode_rgb)."""
        return decode_rgb(data, at_least=(self.height, self.width))

    def resize(self, rgb: ImageArray) -> ImageArray:
        """HxWx3 uint8 RGB -> the whole frame at the input size, still uint8 RGB."""
        interpolation = resize_filter(rgb, self.height, self.width)
        resized = cv2.resize(rgb, (self.width, self.height), interpolation=interpolation)
        return np.ascontiguousarray(resized, dtype=np.uint8)

    def normalise(self, resized: ImageArray) -> FloatArray:
        """Input-size uint8 RGB -> 3xHxW float32, scaled and normalised."""
        normalised = cv2.LUT(resized, self._table)
        chw: FloatArray = np.ascontiguousarray(normalised.transpose(2, 0, 1))
        return chw

    def __call__(self, rgb: ImageArray) -> FloatArray:
        """HxWx3 uint8 RGB -> 3xHxW float32."""
        return self.normalise(self.resize(rgb))

    def load(self, data: bytes) -> FloatArray:
        """Image bytes -> 3xHxW float32: what the trainer and the ML backend feed the model,
        the same path as the edge's (decode, resize, normalise)."""
        return self(self.decode(data))

    def batch(self, images: list[ImageArray]) -> FloatArray:
        stacked: FloatArray = np.stack([self(image) for image in images])
        return stacked


def softmax(logits: FloatArray) -> FloatArray:
    shifted = logits - logits.max(axis=-1, keepdims=True)
    exp = np.exp(shifted)
    result: FloatArray = exp / exp.sum(axis=-1, keepdims=True)
    return result
