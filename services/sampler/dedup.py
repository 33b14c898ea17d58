"""The sampler's near-duplicate filter: pHashes (binloop.ml.phash) of earlier selections.

A bin sees the same item for several frames, and a stuck item for hundreds: labeling each copy
buys nothing. The sampler never sees pixels: the edge inferencer, which decodes every frame,
puts the hash on `InferenceResult.phash`, and `event_phash` (the default `HashSource`) reads it.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from binloop.ml.phash import HEX_DIGITS
from schemas.events import InferenceResult

HashSource = Callable[[InferenceResult], str | None]
"""Where the sampler gets a frame's pHash (16 hex digits), or None when it has none."""


def event_phash(result: InferenceResult) -> str | None:
    """The hash the edge inferencer put on the result (None from an edge that sends none)."""
    return result.phash


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
        return number if len(value) == HEX_DIGITS else None

    def duplicate_of(self, bin_id: str, value: int) -> tuple[int, str] | None:
        """(distance, earlier hash) when `value` is a near-duplicate of a kept selection."""
        nearest = self._ring(bin_id).nearest(value)
        if nearest is None or nearest[0] > self.max_hamming:
            return None
        return nearest[0], f"{nearest[1]:016x}"

    def add(self, bin_id: str, value: int) -> None:
        self._ring(bin_id).add(value)
