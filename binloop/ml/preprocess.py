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


def _refused(data: bytes, exc: cv2.error) -> CorruptFrameError:
    if "CV_IO_MAX_IMAGE_PIXELS" in str(exc):
        return CorruptFrameError(
            f"{len(data)} bytes whose header claims more than OpenCV's limit of "
            f"{max_image_pixels()} pixels (CV_IO_MAX_IMAGE_PIXELS)"
        )
    reason = str(exc.err) if exc.err else str(exc).strip()
    return CorruptFrameError(f"{len(data)} bytes that OpenCV refuses to decode: {reason}")


def decode_rgb(data: bytes) -> ImageArray:
    """JPEG/PNG bytes -> HxWx3 uint8 RGB. Raises CorruptFrameError on anything else."""
    if not data:
        raise CorruptFrameError("empty image")
    buffer = np.frombuffer(data, dtype=np.uint8)
    # Most bad bytes decode to None, but some raise instead, e.g. a header (bit rot, a hostile
    # upload) claiming a frame over OpenCV's pixel limit: they are just as corrupt, and every
    # caller (trainer, edge, ML backend) skips or dead-letters a CorruptFrameError.
    try:
        if _IMREAD_COLOR_RGB is not None:
            decoded = cv2.imdecode(buffer, _IMREAD_COLOR_RGB)  # RGB straight from the decoder
        else:
            decoded = cv2.imdecode(buffer, cv2.IMREAD_COLOR)
            decoded = None if decoded is None else cv2.cvtColor(decoded, cv2.COLOR_BGR2RGB)
    except cv2.error as exc:
        raise _refused(data, exc) from exc
    if decoded is None:
        raise CorruptFrameError(f"{len(data)} bytes that do not decode as an image")
    rgb: ImageArray = np.asarray(decoded, dtype=np.uint8)
    return rgb


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

    def __call__(self, rgb: ImageArray) -> FloatArray:
        """HxWx3 uint8 RGB -> 3xHxW float32."""
        interpolation = resize_filter(rgb, self.height, self.width)
        resized = cv2.resize(rgb, (self.width, self.height), interpolation=interpolation)
        normalised = cv2.LUT(np.ascontiguousarray(resized, dtype=np.uint8), self._table)
        chw: FloatArray = np.ascontiguousarray(normalised.transpose(2, 0, 1))
        return chw

    def batch(self, images: list[ImageArray]) -> FloatArray:
        stacked: FloatArray = np.stack([self(image) for image in images])
        return stacked


def softmax(logits: FloatArray) -> FloatArray:
    shifted = logits - logits.max(axis=-1, keepdims=True)
    exp = np.exp(shifted)
    result: FloatArray = exp / exp.sum(axis=-1, keepdims=True)
    return result
