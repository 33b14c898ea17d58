"""Where reconciliation got to, kept in the object store: a restarted bridge lists only the
tasks changed since its last pass (less the overlap), not every annotated task again.
Deleting the object makes the next pass list them all."""

from __future__ import annotations

import json
import logging
from datetime import UTC, datetime

from binloop.errors import ChecksumMismatchError, MissingBlobError
from binloop.storage import BlobStore

log = logging.getLogger(__name__)


class SavedCursor:
    """The newest task change a pass saw, for one Label Studio project. A cursor saved for
    another server, project or taxonomy version, or one that cannot be read, counts as none
    (the next pass lists everything, which is safe: annotations already taken are not
    published again)."""

    def __init__(
        self, store: BlobStore, key: str, label_studio_url: str, project: str, taxonomy: str
    ) -> None:
        self.store = store
        self.key = key
        # A new taxonomy version can make annotations that were dead-lettered usable (a
        # material added): the first pass under it lists every annotated task again.
        self.scope = {
            "label_studio_url": label_studio_url.rstrip("/"),
            "project": project,
            "taxonomy": taxonomy,
        }

    def load(self) -> datetime | None:
        """StoreUnavailableError when the store cannot be reached; a store that refuses us
        (PermanentError) is the deployment's error, and the bridge cannot store labels there
        either, so it is not hidden."""
        try:
            saved = json.loads(self.store.get(self.key))
            if {k: saved.get(k) for k in self.scope} != self.scope:
                log.info("the saved reconciliation cursor is for %s, not this project", saved)
                return None
            cursor = datetime.fromisoformat(saved["cursor"])
            if cursor.tzinfo is None:
                raise ValueError(f"{saved['cursor']} has no time zone")
        except MissingBlobError:
            return None
        except (ChecksumMismatchError, ValueError, KeyError, TypeError, AttributeError) as exc:
            log.warning("ignoring an unreadable reconciliation cursor at %s: %s", self.key, exc)
            return None
        return cursor

    def save(self, cursor: datetime) -> None:
        """`cursor` is Label Studio's time of a change (time-zone aware)."""
        body = {**self.scope, "cursor": cursor.astimezone(UTC).isoformat()}
        self.store.put(self.key, json.dumps(body).encode(), "application/json")
