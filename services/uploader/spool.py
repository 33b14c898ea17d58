"""The edge spool as the uploader keeps it: which frames are safely stored, and the sweep that
reclaims those older than the retention. State lives in files, so it survives a restart.

A frame `<bin>/<xx>/<sha>.jpg` is marked uploaded by a sibling `<sha>.jpg.uploaded` holding the
upload time and the object key. The sweep never deletes an unmarked frame; only the spool-full
policy gives one up (see limits.py), and never silently.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

from binloop.errors import ChecksumMismatchError
from binloop.storage import LocalBlobStore, sha256_hex

log = logging.getLogger(__name__)

UPLOADED_SUFFIX = ".uploaded"


@dataclass(frozen=True)
class SpoolScan:
    pending: int
    """Frames not (or not since they were spooled again) confirmed by the object store."""
    kept: int
    """Uploaded frames still inside the retention."""
    deleted: int


class Spool:
    def __init__(self, root: Path, bin_id: str) -> None:
        self.store = LocalBlobStore(root)
        self.bin_id = bin_id

    def read(self, key: str, sha256: str) -> bytes:
        """The spooled frame, checked against the hash its event promised.
        Raises MissingBlobError or ChecksumMismatchError (both permanent)."""
        data = self.store.get(key)
        actual = sha256_hex(data)
        if actual != sha256:
            raise ChecksumMismatchError(f"spool frame {key}", sha256, actual)
        return data

    def mark_uploaded(self, key: str, object_key: str, uploaded_at: float) -> None:
        marker = json.dumps({"uploaded_at": uploaded_at, "object_key": object_key})
        self.store.put(key + UPLOADED_SUFFIX, marker.encode(), "application/json")

    def is_pending(self, key: str) -> bool:
        """The frame is in the spool and not (yet) confirmed by the object store."""
        return self.store.exists(key) and self.uploaded_at(key) is None

    def discard(self, key: str) -> None:
        """Give a frame up (the spool-full policy decided so): the frame and any marker."""
        self.store.delete(key)
        self.store.delete(key + UPLOADED_SUFFIX)

    def uploaded_at(self, key: str) -> float | None:
        """When the frame was uploaded, or None when it is not marked (or the mark is unreadable:
        then it counts as pending and is kept, the safe side)."""
        path = self.store.root / (key + UPLOADED_SUFFIX)
        try:
            value = json.loads(path.read_bytes())["uploaded_at"]
        except FileNotFoundError:
            return None
        except (OSError, ValueError, KeyError, TypeError) as exc:
            log.warning("spool marker %s is unreadable (%s); frame kept", path, exc)
            return None
        return float(value) if isinstance(value, int | float) else None

    def sweep(self, now: float, retention_s: float) -> SpoolScan:
        """Delete uploaded frames whose upload is older than `retention_s` and which were not
        spooled again since; drop markers whose frame is gone. Counts what is left."""
        keys = set(self.store.list(f"{self.bin_id}/"))
        frames = sorted(k for k in keys if not k.endswith(UPLOADED_SUFFIX))
        pending = kept = deleted = 0
        for key in frames:
            uploaded_at = self.uploaded_at(key)
            if uploaded_at is None:
                pending += 1
                continue
            try:
                spooled_at = (self.store.root / key).stat().st_mtime
            except FileNotFoundError:
                continue  # deleted under us; its marker goes on the next sweep
            if spooled_at > uploaded_at:
                pending += 1  # captured again after the upload: wait for that event's upload
            elif now - uploaded_at >= retention_s:
                # Frame first, marker second: a crash in between leaves an orphan marker,
                # never an unmarked frame that looks pending.
                self.store.delete(key)
                self.store.delete(key + UPLOADED_SUFFIX)
                deleted += 1
            else:
                kept += 1
        for marker in keys:
            if marker.endswith(UPLOADED_SUFFIX) and marker[: -len(UPLOADED_SUFFIX)] not in keys:
                self.store.delete(marker)
        return SpoolScan(pending=pending, kept=kept, deleted=deleted)
