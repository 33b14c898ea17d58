"""The blob-store protocol every backend implements, and the digest its keys are built on."""

from __future__ import annotations

import hashlib
from datetime import timedelta
from typing import Protocol, runtime_checkable

from binloop.errors import PermanentError
from schemas.base import BlobRef


class BlobExistsError(PermanentError):
    """A create-only write (BlobStore.put_new) found a blob under its key already."""


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


class BlobStore(Protocol):
    """Bytes under string keys. Errors come from binloop.errors: MissingBlobError for a key that
    is not there, ChecksumMismatchError for bytes that are not what was stored,
    StoreUnavailableError when the store cannot be reached (worth a retry)."""

    def put(self, key: str, data: bytes, content_type: str = ...) -> BlobRef:
        """Store `data` under `key`; a second put of the same bytes is a no-op."""
        ...

    def put_new(self, key: str, data: bytes, content_type: str = ...) -> BlobRef:
        """Store `data` under `key` only if no blob is there, in one atomic step: of two
        writers of one key exactly one succeeds, the other gets BlobExistsError (whatever the
        bytes). For claims (a model version), not for content-addressed data."""
        ...

    def get(self, key: str) -> bytes:
        """The bytes under `key`."""
        ...

    def exists(self, key: str) -> bool: ...

    def delete(self, key: str) -> None:
        """Remove `key`; removing a key that is not there is not an error."""
        ...

    def list(self, prefix: str) -> list[str]:
        """Every key that starts with `prefix`, sorted."""
        ...

    def uri(self, key: str) -> str:
        """Where `key` lives, as a URI whose scheme says which backend serves it."""
        ...


@runtime_checkable
class PresigningStore(BlobStore, Protocol):
    """A store that can hand out time-limited URLs, so a client (Label Studio, a browser, a bin)
    reads or writes one object over plain HTTP without credentials."""

    def presigned_get_url(self, key: str, expires: timedelta = ...) -> str: ...

    def presigned_put_url(self, key: str, expires: timedelta = ...) -> str: ...
