"""The blob-store interface and its local-folder backend (the embedded default).

An S3/MinIO backend implements the same protocol; a URI's scheme says which backend serves it.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path
from typing import Protocol
from urllib.parse import unquote, urlparse

from binloop.errors import ChecksumMismatchError, MissingBlobError, UnknownUriError
from schemas.base import BlobRef


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


class BlobStore(Protocol):
    def put(self, key: str, data: bytes, content_type: str = ...) -> BlobRef:
        """Store `data` under `key`; a second put of the same bytes is a no-op."""
        ...

    def get(self, key: str) -> bytes: ...

    def exists(self, key: str) -> bool: ...

    def delete(self, key: str) -> None: ...

    def list(self, prefix: str) -> list[str]: ...

    def uri(self, key: str) -> str: ...


class LocalBlobStore:
    """A folder. Writes go to a temporary file and are renamed, so a reader never sees half."""

    def __init__(self, root: Path) -> None:
        self.root = root.resolve()
        self.root.mkdir(parents=True, exist_ok=True)

    def _path(self, key: str) -> Path:
        path = (self.root / key).resolve()
        if not path.is_relative_to(self.root):
            raise UnknownUriError(f"key {key!r} escapes the store root")
        return path

    def put(self, key: str, data: bytes, content_type: str = "application/octet-stream") -> BlobRef:
        path = self._path(key)
        digest = sha256_hex(data)
        if not (
            path.exists()
            and path.stat().st_size == len(data)
            and sha256_hex(path.read_bytes()) == digest
        ):
            path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-")
            try:
                with os.fdopen(fd, "wb") as handle:
                    handle.write(data)
                    handle.flush()
                    os.fsync(handle.fileno())
                os.replace(tmp, path)
            except BaseException:
                Path(tmp).unlink(missing_ok=True)
                raise
        return BlobRef(
            key=key, uri=self.uri(key), sha256=digest, size=len(data), content_type=content_type
        )

    def get(self, key: str) -> bytes:
        path = self._path(key)
        try:
            return path.read_bytes()
        except FileNotFoundError as exc:
            raise MissingBlobError(f"no blob at {self.uri(key)}") from exc

    def exists(self, key: str) -> bool:
        return self._path(key).is_file()

    def delete(self, key: str) -> None:
        self._path(key).unlink(missing_ok=True)

    def list(self, prefix: str) -> list[str]:
        base = self._path(prefix) if prefix else self.root
        folder = base if base.is_dir() else base.parent
        if not folder.exists():
            return []
        keys = []
        for path in folder.rglob("*"):
            if path.is_file() and not path.name.startswith(".tmp-"):
                key = path.relative_to(self.root).as_posix()
                if key.startswith(prefix):
                    keys.append(key)
        return sorted(keys)

    def uri(self, key: str) -> str:
        return self._path(key).as_uri()


def open_store(root: Path) -> BlobStore:
    return LocalBlobStore(root)


def read_verified(ref: BlobRef) -> bytes:
    """Fetch a blob by its URI and check its sha256. Unknown schemes are a permanent error."""
    parsed = urlparse(ref.uri)
    if parsed.scheme != "file":
        raise UnknownUriError(f"no backend serves {ref.uri!r} (supported here: file://)")
    path = Path(unquote(parsed.path))
    try:
        data = path.read_bytes()
    except FileNotFoundError as exc:
        raise MissingBlobError(f"no blob at {ref.uri}") from exc
    actual = sha256_hex(data)
    if actual != ref.sha256:
        raise ChecksumMismatchError(ref.uri, ref.sha256, actual)
    return data
