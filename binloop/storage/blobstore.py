"""Choosing a blob-store backend from settings, and reading any blob by its URI.

The backends: LocalBlobStore (a folder, file:// URIs, the embedded default) and S3BlobStore
(S3/MinIO, s3://bucket/key URIs). A URI's scheme says which backend serves it.
"""

from __future__ import annotations

from pathlib import Path
from urllib.parse import unquote, urlparse

from binloop.errors import ChecksumMismatchError, UnknownUriError
from binloop.settings import ServiceSettings
from binloop.storage.files import read_regular_file
from binloop.storage.local import LocalBlobStore
from binloop.storage.protocol import BlobStore, PresigningStore, sha256_hex
from binloop.storage.s3 import S3BlobStore
from schemas.base import BlobRef

__all__ = [
    "BlobStore",
    "LocalBlobStore",
    "PresigningStore",
    "S3BlobStore",
    "check_digest",
    "check_sha256",
    "open_store",
    "read_verified",
    "sha256_hex",
]

# Buckets this process has opened, so that read_verified can serve an s3:// URI from an event
# with the endpoint and credentials the settings gave for that bucket.
_s3_stores: dict[str, S3BlobStore] = {}


def open_store(settings: ServiceSettings) -> BlobStore:
    """The store the settings choose: the folder blob_root, or the bucket s3_bucket."""
    if settings.blob_backend == "s3":
        store = S3BlobStore.from_settings(settings)
        _s3_stores[store.bucket] = store
        return store
    return LocalBlobStore(settings.blob_root)


def read_verified(ref: BlobRef) -> bytes:
    """Fetch a blob by its URI and check its sha256. A scheme, or a bucket, that no store in
    this process serves is a permanent error."""
    return check_sha256(ref, _read(ref.uri, ref.size))


def check_sha256(ref: BlobRef, data: bytes) -> bytes:
    """`data` if it is what `ref` promises, else ChecksumMismatchError."""
    return check_digest(data, ref.sha256, ref.uri)


def check_digest(data: bytes, expected_sha256: str, where: str) -> bytes:
    """`data` if its sha256 is `expected_sha256`, else ChecksumMismatchError naming `where`."""
    actual = sha256_hex(data)
    if actual != expected_sha256:
        raise ChecksumMismatchError(where, expected_sha256, actual)
    return data


def _read(uri: str, size: int) -> bytes:
    parsed = urlparse(uri)
    if parsed.scheme == "file":
        return _read_local(uri, Path(unquote(parsed.path)), size)
    if parsed.scheme == "s3":
        store = _s3_stores.get(parsed.netloc)
        if store is None:
            opened = ", ".join(sorted(_s3_stores)) or "none"
            raise UnknownUriError(
                f"no S3 store is open for bucket {parsed.netloc!r} of {uri!r} (open buckets: "
                f"{opened}); open_store(settings) with blob_backend='s3' opens one"
            )
        return store.get(parsed.path.removeprefix("/"))
    raise UnknownUriError(f"no backend serves {uri!r} (supported: file://, s3://)")


def _read_local(uri: str, path: Path, size: int) -> bytes:
    """Only inside a folder a LocalBlobStore serves, only a regular file of the promised
    size: an event cannot make a service read /dev/zero or someone else's files."""
    resolved = path.resolve()
    if not any(resolved.is_relative_to(root) for root in LocalBlobStore.roots):
        raise UnknownUriError(f"{uri!r} is outside every blob folder this process serves")
    return read_regular_file(resolved, size, uri)
