"""Annotations that arrive after a taxonomy change although they were made under the old one
(their webhook failed while the bridge switched): carried over by the configured migrations,
or sent back for a new label. Reconciliation reads a fixed task list here; the real Label
Studio runs the same story in tests/test_label_studio.py."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta
from typing import Any

from binloop.datasets import DatasetManifest, write_manifest
from binloop.storage import LocalBlobStore, label_key
from binloop.storage.blobstore import read_verified
from schemas.events import DatasetSnapshot, LabelAnnotated
from services.labeling_bridge.backends import OracleBackend
from services.labeling_bridge.core import LabelingBridge
from services.labeling_bridge.link import LabelStudioLink, Taken
from services.labeling_bridge.records import LabelRecord
from services.labeling_bridge.relabel import waiting_relabels
from services.labeling_bridge.snapshots import DatasetBook
from tests.test_label_studio import MIGRATION, SPLIT_TAXONOMY, TAXONOMY, as_item, record_for
from tests.test_labeling_bridge import (
    TickingClock,
    _DeadLetters,
    _ListingClient,
    _RecordingPublisher,
    demo_frames,
    ls_task,
    material,
    our_task_data,
)

AT = datetime(2025, 3, 14, 12, 0, tzinfo=UTC)


def split_link(
    store: LocalBlobStore, tasks: list[dict[str, Any]], snapshot_every: int = 100
) -> tuple[LabelStudioLink, _RecordingPublisher, list[Taken]]:
    """A bridge restarted with trash split and plastic merged with metal, reconciling."""
    book = DatasetBook(
        store, "binloop", SPLIT_TAXONOMY, snapshot_every, TickingClock(), migrations=[MIGRATION]
    )
    bridge = LabelingBridge(store, OracleBackend(), book, SPLIT_TAXONOMY, "labeling-bridge")
    publisher = _RecordingPublisher()
    link = LabelStudioLink(
        bridge,
        _ListingClient(tasks),  # type: ignore[arg-type]
        publisher,  # type: ignore[arg-type]
        asyncio.Lock(),
        overlap_s=3600,
    )
    taken: list[Taken] = []
    link.add_listener(taken.append)
    return link, publisher, taken


def task_in(taxonomy: str | None, store: LocalBlobStore, data: bytes) -> dict[str, Any]:
    """A task's data as the bridge made it under `taxonomy` (None: before tasks said)."""
    made = our_task_data(store, data)
    return made if taxonomy is None else {**made, "taxonomy_version": taxonomy}


async def test_an_old_annotation_is_carried_over_or_sent_back_for_a_new_label(
    blob_store: LocalBlobStore,
) -> None:
    (plastic, _), (trash, _), (metal, _) = demo_frames(3)
    tasks = [
        ls_task(1, task_in("trashnet-6", blob_store, plastic), material("plastic"), AT),
        ls_task(2, task_in("trashnet-6", blob_store, trash), material("trash"), AT),
        # Made before tasks recorded their taxonomy: the migrations rename "metal".
        ls_task(3, task_in(None, blob_store, metal), material("metal"), AT),
    ]
    link, publisher, taken = split_link(blob_store, tasks, snapshot_every=3)
    dead = _DeadLetters()

    first = await link.reconcile(dead)

    assert dead.entries == []
    assert first.published == 3
    labels = [e for _, e in publisher.published if isinstance(e, LabelAnnotated)]
    shas = [t["data"]["frame_sha256"] for t in tasks]
    assert [(e.frame_sha256, e.label, e.taxonomy_version) for e in labels] == [
        (shas[0], "plastic_metal", "bins-7"),
        (shas[1], "trash", "trashnet-6"),  # as given: no label of bins-7 can be told from it
        (shas[2], "plastic_metal", "bins-7"),
    ]
    assert [t.sent_back for t in taken] == [False, True, False]
    # The frame of the split class is asked for again, in words an annotator reads.
    (request,) = waiting_relabels(link.bridge)
    assert (request.frame.sha256, request.old_label, request.taxonomy_version) == (
        shas[1],
        "trash",
        "bins-7",
    )
    assert "'trash' was split into napkin, food_waste" in request.reason
    # The version the three labels completed has the carried ones, and lists the other.
    (version,) = [e for _, e in publisher.published if isinstance(e, DatasetSnapshot)]
    assert (version.taxonomy_version, version.class_counts) == ("bins-7", {"plastic_metal": 2})
    manifest = DatasetManifest.model_validate_json(read_verified(version.manifest))
    assert [(i.sha256, i.label) for i in manifest.needs_relabel] == [(shas[1], "trash")]

    again = await link.reconcile(dead)  # listed again: nothing new, nothing dead-lettered
    assert (again.published, dead.entries) == (0, [])
    assert [t.sent_back for t in taken[3:]] == [False, False, False]


async def test_an_annotation_no_migration_explains_is_still_dead_lettered(
    blob_store: LocalBlobStore,
) -> None:
    frames = [data for data, _ in demo_frames(3)]
    tasks = [
        # Chosen under the bridge's own taxonomy, which has no "plastic".
        ls_task(1, task_in("bins-7", blob_store, frames[0]), material("plastic"), AT),
        # No taxonomy recorded, and no migration names it.
        ls_task(2, task_in(None, blob_store, frames[1]), material("styrofoam"), AT),
        # A taxonomy no configured migration leads from.
        ls_task(3, task_in("old-3", blob_store, frames[2]), material("plastic"), AT),
    ]
    link, publisher, _ = split_link(blob_store, tasks)
    dead = _DeadLetters()

    reconciled = await link.reconcile(dead)

    assert reconciled.published == 0
    assert publisher.published == []
    assert [(origin, error) for origin, _, error in dead.entries] == [
        (
            "task 1",
            f"label 'plastic' is not in taxonomy bins-7 ({', '.join(SPLIT_TAXONOMY.labels)})",
        ),
        (
            "task 2",
            f"label 'styrofoam' is not in taxonomy bins-7 ({', '.join(SPLIT_TAXONOMY.labels)})",
        ),
        (
            "task 3",
            "no taxonomy migration leads from 'old-3' to 'bins-7' (configured: trashnet-6->bins-7)",
        ),
    ]


async def test_a_new_annotation_of_a_frame_after_its_old_one_is_sent_back_wins(
    blob_store: LocalBlobStore,
) -> None:
    """The frame's task asking for a new label is answered: the old annotation, listed again,
    changes nothing and the frame no longer waits."""
    ((trash, _),) = demo_frames(1)
    old = ls_task(1, task_in("trashnet-6", blob_store, trash), material("trash"), AT)
    link, _, _ = split_link(blob_store, [old])
    dead = _DeadLetters()
    await link.reconcile(dead)
    assert len(waiting_relabels(link.bridge)) == 1

    first_task = {k: v for k, v in old["data"].items() if k != "taxonomy_version"}
    asked = {**first_task, "relabel_for": "bins-7"}
    answer = ls_task(2, asked, material("napkin"), AT + timedelta(minutes=5))
    link.client.tasks = [old, answer]  # type: ignore[attr-defined]
    await link.reconcile(dead)

    record = LabelRecord.model_validate_json(
        blob_store.get(label_key("binloop", old["data"]["frame_sha256"]))
    )
    assert (record.label, record.taxonomy_version) == ("napkin", "bins-7")
    assert waiting_relabels(link.bridge) == []
    assert dead.entries == []


def test_a_stored_label_of_a_split_class_not_yet_in_a_version_is_sent_back(
    blob_store: LocalBlobStore,
) -> None:
    """Stored under the old taxonomy, but the bridge restarted with the new one before the
    label made it into a version: the migrated version lists it, instead of losing it."""
    glass = record_for(blob_store, b"frame 0", "glass", TAXONOMY)
    write_manifest(
        blob_store,
        DatasetManifest(
            name="binloop",
            version=1,
            created_at=AT,
            taxonomy_version="trashnet-6",
            classes=TAXONOMY.labels,
            items=[as_item(glass)],
        ),
    )
    trash = record_for(blob_store, b"frame 1", "trash", TAXONOMY)  # pending, no version has it

    book = DatasetBook(blob_store, "binloop", SPLIT_TAXONOMY, 100, migrations=[MIGRATION])
    migrated = book.migrate()

    assert migrated is not None
    assert [i.label for i in migrated.manifest.items] == ["glass"]
    assert migrated.manifest.needs_relabel == [as_item(trash)]
