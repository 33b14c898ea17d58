"""Frames a taxonomy change sent back for labeling (their class was split or dropped): which
still wait for a new label, and why, in words an annotator reads.

The list lives in the latest dataset version (`needs_relabel`), so a restarted bridge asks
again for exactly what is still missing; asking twice finds the task made the first time.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from binloop.datasets import ManifestItem
from binloop.errors import PermanentError
from schemas.base import BlobRef
from schemas.taxonomy import Taxonomy
from services.labeling_bridge.records import stored_label
from services.labeling_bridge.snapshots import TaxonomyMigration

if TYPE_CHECKING:  # core imports the backends, which make tasks from these requests
    from services.labeling_bridge.core import LabelingBridge

log = logging.getLogger(__name__)

IMPORTED_BIN = "import"
"""The bin id of a frame that came from a dataset import, not from a bin."""


@dataclass(frozen=True)
class RelabelRequest:
    frame: BlobRef
    bin_id: str
    old_label: str
    taxonomy_version: str
    """The taxonomy the new label is asked in: one task per (frame, taxonomy version)."""
    reason: str


def relabel_reason(
    old_label: str, taxonomy: Taxonomy, migrations: Sequence[TaxonomyMigration]
) -> str:
    split_into = [m.splits[old_label] for m in migrations if old_label in m.splits]
    if split_into:
        return (
            f"labeled {old_label!r} before {old_label!r} was split into "
            f"{', '.join(split_into[-1])} (taxonomy {taxonomy.version}): label it again"
        )
    return f"labeled {old_label!r}, which taxonomy {taxonomy.version} lacks: label it again"


def _bin_of(item: ManifestItem, bridge: LabelingBridge) -> str:
    stored = stored_label(bridge.store, bridge.book.name, item.sha256)
    if stored is not None:
        return stored.bin_id
    parts = item.key.split("/")  # frames/<bin>/<yyyy>/<mm>/<dd>/<sha>.jpg
    return parts[1] if len(parts) == 6 and parts[0] == "frames" else IMPORTED_BIN


def waiting_relabels(bridge: LabelingBridge) -> list[RelabelRequest]:
    """The latest version's needs_relabel, less the frames labeled again since."""
    book = bridge.book
    requests: list[RelabelRequest] = []
    for item in book.needs_relabel:
        stored = stored_label(bridge.store, book.name, item.sha256)
        if stored is not None and stored.taxonomy_version == bridge.taxonomy.version:
            continue  # labeled again: the next version has it
        if not bridge.store.exists(item.key):
            log.error("cannot ask for a new label of frame %s: %s is gone", item.sha256, item.key)
            continue
        try:
            frame = bridge.frame(item.key, item.sha256)
        except PermanentError as exc:  # changed: nobody can label it again
            log.error("cannot ask for a new label of frame %s: %s", item.sha256, exc)
            continue
        requests.append(
            RelabelRequest(
                frame=frame,
                bin_id=_bin_of(item, bridge),
                old_label=item.label,
                taxonomy_version=bridge.taxonomy.version,
                reason=relabel_reason(item.label, bridge.taxonomy, book.migrations),
            )
        )
    return requests
