"""Upload one captured frame: spool -> object store, verified, idempotent. No bus here."""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass

from binloop.errors import (
    ChecksumMismatchError,
    MissingBlobError,
    PermanentError,
    StoreUnavailableError,
)
from binloop.storage import BlobStore, frame_key, sha256_hex
from schemas.base import BlobRef
from schemas.events import FrameCaptured, FrameStored
from services.uploader.spool import Spool

# FrameStored ids derive from the captured event, so a redelivered frame yields the same id
# and JetStream drops the repeated announcement.
_STORED_NAMESPACE = uuid.uuid5(uuid.NAMESPACE_URL, "binloop:frames.stored")


class StoreRefusedError(StoreUnavailableError):
    """The object store answered but refused the request for a reason it will not retry on its
    own (an S3 4xx binloop does not list as retryable: a disabled SSE-KMS key, a bucket policy).
    Nothing is wrong with the frame: every frame would be refused the same way, so the
    forwarder backs off the store for all of them, until an operator fixes the store."""


@dataclass(frozen=True)
class Upload:
    blob: BlobRef
    written_bytes: int
    """0 when the object store already held the frame."""


class FrameUploader:
    def __init__(
        self, spool: Spool, store: BlobStore, clock: Callable[[], float] = time.time
    ) -> None:
        self.spool = spool
        self.store = store
        self.clock = clock

    def _already_stored(self, key: str, sha256: str) -> BlobRef | None:
        try:
            data = self.store.get(key)
        except (MissingBlobError, ChecksumMismatchError, OSError):
            return None  # not there, or not intact: the frame is lost either way
        except PermanentError as exc:
            raise StoreRefusedError(f"object store read of {key} refused: {exc}") from exc
        if sha256_hex(data) != sha256:
            return None
        return BlobRef(
            key=key,
            uri=self.store.uri(key),
            sha256=sha256,
            size=len(data),
            content_type="image/jpeg",
        )

    def upload(self, event: FrameCaptured) -> Upload:
        """Store the frame and only then mark its spool entry uploaded. Raises PermanentError
        only for the frame itself: MissingBlobError when its spool entry is gone (and the store
        does not hold it), ChecksumMismatchError when its bytes do not match. The object store
        failing raises StoreUnavailableError, its refusing StoreRefusedError (a permanent error
        from the store is the store's trouble, not the frame's), and this frame's spool files
        failing SpoolIOError."""
        key = frame_key(event.bin_id, event.captured_at, event.frame_sha256)
        try:
            data = self.spool.read(event.spool.key, event.frame_sha256)
        except MissingBlobError:
            # A redelivery after the sweep reclaimed the frame: it is safe if the store has it.
            stored = self._already_stored(key, event.frame_sha256)
            if stored is None:
                raise
            return Upload(stored, 0)
        try:
            existed = self.store.exists(key)
            blob = self.store.put(key, data, "image/jpeg")
        except OSError as exc:
            raise StoreUnavailableError(f"object store write of {key} failed: {exc}") from exc
        except PermanentError as exc:
            raise StoreRefusedError(f"object store write of {key} refused: {exc}") from exc
        self.spool.mark_uploaded(event.spool.key, key, self.clock())
        return Upload(blob, 0 if existed else len(data))


def stored_event(captured: FrameCaptured, blob: BlobRef, producer: str) -> FrameStored:
    return FrameStored(
        event_id=uuid.uuid5(_STORED_NAMESPACE, str(captured.event_id)),
        producer=producer,
        bin_id=captured.bin_id,
        frame_sha256=captured.frame_sha256,
        frame_event_id=str(captured.event_id),
        captured_at=captured.captured_at,
        blob=blob,
        ground_truth=captured.ground_truth,
    )
