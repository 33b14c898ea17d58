"""Writing a file so that a reader (or a power cut) never sees half of it, and reading one
that must be a regular file of a promised size."""

from __future__ import annotations

import os
import stat
import tempfile
from pathlib import Path

from binloop.errors import MissingBlobError, PermanentError


def write_atomically(path: Path, data: bytes, *, durable: bool = True) -> None:
    """Temporary file in the same folder, then rename. With `durable`, the data and the
    folder entry are fsynced too, so after a power cut the file is there whole or not at all."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-")
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            if durable:
                handle.flush()
                os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    if durable:
        folder = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(folder)
        finally:
            os.close(folder)


def write_exclusively(path: Path, data: bytes) -> None:
    """Like write_atomically, but FileExistsError when `path` exists: the whole file is written
    under a temporary name and hard-linked into place, and link() never replaces a name, so of
    two writers exactly one wins and a reader never sees half."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-")
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.link(tmp, path)
    finally:
        Path(tmp).unlink(missing_ok=True)
    folder = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(folder)
    finally:
        os.close(folder)


def read_regular_file(path: Path, size: int, uri: str) -> bytes:
    """The bytes of `path`, which must be a regular file of exactly `size` bytes: one open,
    one fstat of the open file, one read (no separate exists/stat calls that a swap between
    them could fool)."""
    try:
        # Non-blocking, so a FIFO planted where a blob should be cannot hang the reader; it
        # changes nothing for a regular file.
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    except (FileNotFoundError, NotADirectoryError) as exc:
        raise MissingBlobError(f"no blob at {uri}") from exc
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise MissingBlobError(f"no blob at {uri} (not a regular file)")
        if info.st_size != size:
            raise PermanentError(f"{uri} holds {info.st_size} bytes; the reference promised {size}")
        # Plain reads on the descriptor (a file object's buffering costs more than the read
        # of a frame), for one byte more than promised: that shows a file that grew since the
        # fstat.
        chunks: list[bytes] = []
        wanted = size + 1
        while wanted > 0 and (chunk := os.read(fd, wanted)):
            chunks.append(chunk)
            wanted -= len(chunk)
    finally:
        os.close(fd)
    data = b"".join(chunks)
    if len(data) != size:
        raise PermanentError(f"{uri} changed while it was read ({len(data)} bytes, not {size})")
    return data
