"""Perceptual hash (64-bit DCT pHash) of a decoded frame: the edge computes it for every frame,
the sampler compares hashes to drop near-duplicate selections."""

from __future__ import annotations

from typing import Any

import cv2
import numpy as np
import numpy.typing as npt

HASH_SIDE = 8
"""The hash keeps the lowest HASH_SIDE x HASH_SIDE DCT frequencies: 64 bits."""
DCT_SIDE = 32
HEX_DIGITS = HASH_SIDE * HASH_SIDE // 4


def phash(image: npt.NDArray[Any]) -> str:
    """64-bit perceptual hash of an H x W (grey) or H x W x C (RGB) image, as 16 hex digits.

    Grey, area-shrink to 32 x 32, 2-D DCT, keep the 8 x 8 lowest frequencies, one bit per
    coefficient: above the median of the 63 AC terms or not. Robust to re-encoding, small
    shifts and brightness changes; different items differ in about half the bits. A few
    microseconds per 160 x 120 frame: cheap enough for every frame on the edge.
    """
    if image.ndim not in (2, 3) or image.shape[0] == 0 or image.shape[1] == 0:
        raise ValueError(f"expected an H x W or H x W x C image, got shape {image.shape}")
    pixels = np.ascontiguousarray(image, dtype=np.float32)
    if pixels.ndim == 3:
        # Luma for RGB (BGR callers convert first, so both sides hash the same grey image).
        if pixels.shape[2] == 3:
            gray = cv2.cvtColor(pixels, cv2.COLOR_RGB2GRAY)
        else:
            gray = pixels.mean(axis=2)
    else:
        gray = pixels
    small = cv2.resize(gray, (DCT_SIDE, DCT_SIDE), interpolation=cv2.INTER_AREA)
    coefficients = cv2.dct(np.ascontiguousarray(small, dtype=np.float32))
    low: npt.NDArray[np.float32] = np.asarray(coefficients, dtype=np.float32)[
        :HASH_SIDE, :HASH_SIDE
    ].ravel()
    # The DC term is the mean brightness: it says nothing about structure and skews the median.
    # The median of 63 values is the 32nd smallest: a partial sort, not np.median's overhead.
    ac_terms = low[1:]
    median = np.partition(ac_terms, ac_terms.size // 2)[ac_terms.size // 2]
    bits = low > median
    return np.packbits(bits).tobytes().hex()


def hamming(first: str, second: str) -> int:
    """Bits in which two hashes differ."""
    return (int(first, 16) ^ int(second, 16)).bit_count()
