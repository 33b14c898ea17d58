"""The dataset version the bridge cut from a Label Studio annotation and has not announced yet,
kept in the object store, so a restarted bridge announces it instead of leaving training to
wait for `snapshot_every` more labels.

A version a sample cut needs no note (the sample stays in JetStream until its announcement is
acked, and its redelivery announces it again), nor does one a taxonomy change cut (every start
announces it again while it is the latest), nor one someone else wrote (a seed import): only
this one is announced at start, and only while it is the latest.
"""

from __future__ import annotations

import json
import logging
import posixpath

from binloop.errors import ChecksumMismatchError, MissingBlobError
from binloop.storage import BlobStore, reconcile_cursor_key

log = logging.getLogger(__name__)


def unannounced_key(dataset: str) -> str:
    """Next to the reconciliation cursor, so the layout stays derived from keys.py."""
    return posixpath.dirname(reconcile_cursor_key(dataset)) + "/unannounced-version.json"


class UnannouncedVersion:
    """`owe` is called before the version's manifest is written and `settle` after JetStream
    acked its announcement, so a bridge stopped anywhere in between finds the note."""

    def __init__(self, store: BlobStore, dataset: str) -> None:
        self.store = store
        self.key = unannounced_key(dataset)

    def owe(self, version: int) -> None:
        self.store.put(self.key, json.dumps({"version": version}).encode(), "application/json")

    def owed(self) -> int | None:
        """The version noted, or None (none, or a note that cannot be read: logged)."""
        try:
            version = json.loads(self.store.get(self.key))["version"]
            if not isinstance(version, int) or isinstance(version, bool):
                raise TypeError(f"version {version!r} is not a number")
        except MissingBlobError:
            return None
        except (ChecksumMismatchError, ValueError, KeyError, TypeError) as exc:
            log.warning(
                "ignoring an unreadable note of an unannounced version at %s: %s", self.key, exc
            )
            return None
        return version

    def settle(self, version: int) -> None:
        """`version` went out: the note goes unless it names a newer version (cut meanwhile)."""
        owed = self.owed()
        if owed is not None and owed <= version:
            self.store.delete(self.key)
