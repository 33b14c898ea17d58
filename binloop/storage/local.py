"""The local-folder blob store: the embedded default, and the edge spool."""

from __future__ import annotations

import os
from pathlib import Path
from typing import ClassVar

from binloop.errors import MissingBlobError, UnknownUriError
from binloop.observability import metrics
from binloop.storage.files import read_regular_file, write_atomically, write_exclusively
from binloop.storage.protocol import BlobExistsError, sha256_hex
from schemas.base import BlobRef


class LocalBlobStore:
    """A folder. Writes go to a temporary file and are renamed, so a reader never sees half."""

    backend = "local"
    roots: ClassVar[set[Path]] = set()
    """Every folder a LocalBlobStore serves in this process: the only places a file:// URI
    from an event may point into (see blobstore.read_verified)."""

    def __init__(self, root: Path) -> None:
        self.root = root.resolve()
        self.root.mkdir(parents=True, exist_ok=True)
        self._root_text = str(self.root)
        self._inside_root = os.path.join(self._root_text, "")  # the root and a separator
        LocalBlobStore.roots.add(self.root)

    def _path(self, key: str) -> Path:
        # Resolved with os.path on strings, as Path.resolve does underneath, without pathlib's
        # objects and its extra stat: a third of the time, and every frame the edge reads
        # from its spool comes through here (docs/edge-latency.md).
        resolved = os.path.realpath(os.path.join(self._root_text, key))
        if resolved != self._root_text and not resolved.startswith(self._inside_root):
            raise UnknownUriError(f"key {key!r} escapes the store root")
        return Path(resolved)

    def put(self, key: str, data: bytes, content_type: str = "application/octet-stream") -> BlobRef:
        path = self._path(key)
        digest = sha256_hex(data)
        already_there = (
            path.exists()
            and path.stat().st_size == len(data)
            and sha256_hex(path.read_bytes()) == digest
        )
        if not already_there:
            write_atomically(path, data)
        outcome = "unchanged" if already_there else "written"
        metrics.BLOB_PUTS.labels(self.backend, outcome).inc()
        return BlobRef(
            key=key, uri=self.uri(key), sha256=digest, size=len(data), content_type=content_type
        )

    def put_new(
        self, key: str, data: bytes, content_type: str = "application/octet-stream"
    ) -> BlobRef:
        path = self._path(key)
        try:
            write_exclusively(path, data)
        except FileExistsError as exc:
            raise BlobExistsError(f"{self.uri(key)} exists already") from exc
        metrics.BLOB_PUTS.labels(self.backend, "written").inc()
        return BlobRef(
            key=key,
            uri=self.uri(key),
            sha256=sha256_hex(data),
            size=len(data),
            content_type=content_type,
        )

    def get(self, key: str) -> bytes:
        path = self._path(key)
        try:
            return path.read_bytes()
        except FileNotFoundError as exc:
            raise MissingBlobError(f"no blob at {self.uri(key)}") from exc

    def read_sized(self, key: str, size: int) -> bytes:
        """The blob at `key`, which must hold exactly `size` bytes (MissingBlobError if there
        is none, PermanentError if its size differs)."""
        path = self._path(key)
        return read_regular_file(path, size, path.as_uri())

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
