"""Perceptual hashes (64-bit DCT pHash) and the near-duplicate filter built on them.

A bin sees the same item for several frames, and a stuck item for hundreds: labeling each copy
buys nothing. The sampler never sees pixels, so the hash comes from a `HashSource` (the edge
inferencer, which decodes every frame, is the natural place to compute it; see
docs/active-learning.md); `phash` here is the one function both sides use.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import cache
from typing import Any

import numpy as np
import numpy.typing as npt

from schemas.events import InferenceResult

HASH_SIDE = 8
"""The hash keeps the lowest HASH_SIDE x HASH_SIDE DCT frequencies: 64 bits."""
DCT_SIDE = 32

HashSource = Callable[[InferenceResult], str | None]
"""Where the sampler gets a frame's pHash (16 hex digits), or None when it has none."""


@cache
def _dct_matrix(n: int) -> npt.NDArray[np.float64]:
    """Orthonormal DCT-II matrix: C @ x is the DCT of a column x."""
    k = np.arange(n)[:, np.newaxis]
    i = np.arange(n)[np.newaxis, :]
    matrix: npt.NDArray[np.float64] = np.sqrt(2.0 / n) * np.cos(np.pi * (2 * i + 1) * k / (2 * n))
    matrix[0] /= np.sqrt(2.0)
    return matrix


def _area_resize(gray: npt.NDArray[np.float64], side: int) -> npt.NDArray[np.float64]:
    """Mean of each cell of a side x side grid over the image (box filter, no dependencies)."""
    # Smaller than the grid: repeat pixels first so every cell covers at least one.
    gray = np.repeat(gray, -(-side // gray.shape[0]), axis=0)
    gray = np.repeat(gray, -(-side // gray.shape[1]), axis=1)
    rows = np.linspace(0, gray.shape[0], side + 1).astype(int)
    cols = np.linspace(0, gray.shape[1], side + 1).astype(int)
    summed = np.add.reduceat(np.add.reduceat(gray, rows[:-1], axis=0), cols[:-1], axis=1)
    counts = np.outer(np.diff(rows), np.diff(cols))
    resized: npt.NDArray[np.float64] = summed / counts
    return resized


def phash(image: npt.NDArray[Any]) -> str:
    """64-bit perceptual hash of an H x W (grey) or H x W x C image, as 16 hex digits.

    Grey, shrink to 32 x 32, 2-D DCT, keep the 8 x 8 lowest frequencies, one bit per
    coefficient: above the median of the 63 AC terms or not. Robust to re-encoding, small
    shifts and brightness changes; different items differ in about half the bits.
    """
    if image.ndim not in (2, 3) or image.shape[0] == 0 or image.shape[1] == 0:
        raise ValueError(f"expected an H x W or H x W x C image, got shape {image.shape}")
    gray = image.astype(np.float64)
    if gray.ndim == 3:
        gray = gray.mean(axis=2)
    small = _area_resize(gray, DCT_SIDE)
    dct = _dct_matrix(DCT_SIDE)
    low = (dct @ small @ dct.T)[:HASH_SIDE, :HASH_SIDE].ravel()
    # The DC term is the mean brightness: it says nothing about structure and skews the median.
    bits = low > np.median(low[1:])
    value = 0
    for bit in bits:
        value = (value << 1) | int(bit)
    return f"{value:016x}"


def hamming(first: str, second: str) -> int:
    return (int(first, 16) ^ int(second, 16)).bit_count()


def event_phash(result: InferenceResult) -> str | None:
    """The hash the edge put on the result, once InferenceResult carries an optional `phash`."""
    value = getattr(result, "phash", None)
    return value if isinstance(value, str) else None


_POPCOUNT = np.array([bin(byte).count("1") for byte in range(256)], dtype=np.uint8)


class _HashRing:
    """The last `capacity` hashes, compared to a new one in one vectorised pass."""

    def __init__(self, capacity: int) -> None:
        self._hashes = np.zeros(capacity, dtype=np.uint64)
        self._size = 0
        self._next = 0

    def add(self, value: int) -> None:
        self._hashes[self._next] = value
        self._next = (self._next + 1) % len(self._hashes)
        self._size = min(self._size + 1, len(self._hashes))

    def nearest(self, value: int) -> tuple[int, int] | None:
        """(distance, hash) of the closest kept hash, or None when none is kept."""
        if self._size == 0:
            return None
        kept = self._hashes[: self._size]
        xor = np.bitwise_xor(kept, np.uint64(value))
        distances = _POPCOUNT[xor.view(np.uint8)].reshape(-1, 8).sum(axis=1)
        index = int(np.argmin(distances))
        return int(distances[index]), int(kept[index])


class NearDuplicateFilter:
    """Remembers the pHash of each selection; a candidate within `max_hamming` bits of one of
    them is a near-duplicate. Frames without a hash are never called duplicates."""

    def __init__(
        self,
        hash_source: HashSource,
        max_hamming: int = 6,
        remember: int = 10_000,
        per_bin: bool = True,
    ) -> None:
        self.hash_source = hash_source
        self.max_hamming = max_hamming
        self.remember = remember
        self.per_bin = per_bin
        self._rings: dict[str, _HashRing] = {}

    def _ring(self, bin_id: str) -> _HashRing:
        scope = bin_id if self.per_bin else ""
        ring = self._rings.get(scope)
        if ring is None:
            ring = self._rings[scope] = _HashRing(self.remember)
        return ring

    def hash_of(self, result: InferenceResult) -> int | None:
        value = self.hash_source(result)
        if value is None:
            return None
        try:
            number = int(value, 16)
        except ValueError:
            return None
        # Anything that is not 64 bits is not a pHash of ours: do not compare it.
        return number if len(value) == 16 else None

    def duplicate_of(self, bin_id: str, value: int) -> tuple[int, str] | None:
        """(distance, earlier hash) when `value` is a near-duplicate of a kept selection."""
        nearest = self._ring(bin_id).nearest(value)
        if nearest is None or nearest[0] > self.max_hamming:
            return None
        return nearest[0], f"{nearest[1]:016x}"

    def add(self, bin_id: str, value: int) -> None:
        self._ring(bin_id).add(value)
