"""The label-studio backend against a real Label Studio server (one per session, see
tests/labelstudio_fixture.py) and a real nats-server: project, tasks with predictions,
annotations back by webhook and by reconciliation, webhook authentication and bad bodies, a
Label Studio that is down or failing, and the ML backend. Also the pure parts: the label
config, webhook parsing and taxonomy migrations of dataset snapshots."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import uuid
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from label_studio_sdk import LabelStudio
from nats.aio.client import Client
from nats.js.client import JetStreamContext
from prometheus_client import REGISTRY

from binloop.datasets import DatasetManifest, ManifestItem, split_for, write_manifest
from binloop.errors import NotReadyError, PermanentError
from binloop.natsserver import NatsServer
from binloop.runtime import ServiceApp
from binloop.storage import (
    LocalBlobStore,
    frame_key,
    label_key,
    model_key,
    reconcile_cursor_key,
    sha256_hex,
)
from binloop.storage.blobstore import read_verified
from schemas.events import (
    ClassScore,
    DatasetSnapshot,
    DeadLetter,
    LabelAnnotated,
    ModelMetrics,
    ModelPromoted,
    SampleSelected,
)
from schemas.routes import (
    DATASETS_SNAPSHOT,
    LABELS_ANNOTATED,
    MODELS_PROMOTED,
    SAMPLES_SELECTED,
    dlq_subject,
)
from schemas.taxonomy import Compartment, Taxonomy
from services.labeling_bridge import LabelingBridgeSettings, create_app
from services.labeling_bridge import client as client_module
from services.labeling_bridge.app import LabelStudioParts
from services.labeling_bridge.backends import OracleBackend
from services.labeling_bridge.client import (
    LabelStudioClient,
    ProjectRef,
    ProjectSpec,
    _AnnotatedTaskPages,
)
from services.labeling_bridge.core import LabelingBridge, Migration
from services.labeling_bridge.intake import parse_webhook
from services.labeling_bridge.label_studio import (
    CONDITION_NAME,
    FROM_NAME,
    OBJECT_NAME,
    TO_NAME,
    choice_result,
    import_task,
    label_config_xml,
)
from services.labeling_bridge.link import ReconcilePass, Taken
from services.labeling_bridge.records import LabelRecord, save_label
from services.labeling_bridge.relabel import waiting_relabels
from services.labeling_bridge.snapshots import DatasetBook, TaxonomyMigration, migrate_items
from services.labeling_bridge.web import SECRET_HEADER, WEBHOOK_PATH
from tests.helpers import Collector
from tests.labelstudio_fixture import FaultyProxy, LabelStudioServer, label_studio_bin

DEMO = Path(__file__).resolve().parent.parent / "data" / "demo"
TAXONOMY = Taxonomy()
SECRET = "shared-webhook-secret-for-tests"
CAPTURED_AT = datetime(2025, 3, 14, 9, 26, 53, tzinfo=UTC)


# --- fixtures and helpers ----------------------------------------------------------------------


@pytest.fixture(scope="session")
def label_studio(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LabelStudioServer]:
    if not label_studio_bin().exists() and not os.environ.get("CI"):
        pytest.skip("Label Studio is not installed: run tools/install_label_studio.sh")
    with LabelStudioServer(tmp_path_factory.mktemp("label-studio")) as server:
        yield server


def sdk(server: LabelStudioServer) -> LabelStudio:
    return LabelStudio(base_url=server.url, api_key=server.token)  # type: ignore[no-untyped-call]


def demo_frames(count: int) -> list[tuple[bytes, str]]:
    by_class = [sorted((DEMO / "stream" / label).glob("*.jpg")) for label in TAXONOMY.labels]
    return [
        (path.read_bytes(), path.parent.name)
        for i in range(count)
        for path in [by_class[i % len(by_class)][i // len(by_class)]]
    ]


def stored_sample(store: LocalBlobStore, data: bytes, predicted: str = "plastic") -> SampleSelected:
    sha = sha256_hex(data)
    sample = SampleSelected(
        producer="sampler",
        bin_id="bin-a",
        frame_sha256=sha,
        frame_key=frame_key("bin-a", CAPTURED_AT, sha),
        captured_at=CAPTURED_AT,
        strategy="least_confidence",
        score=0.59,
        reason="confidence 0.41 < 0.60",
        predicted=[
            ClassScore(label="glass", probability=0.33),
            ClassScore(label=predicted, probability=0.41),
            ClassScore(label="paper", probability=0.26),
        ],
        model_name="mobilenet",
        model_version=3,
    )
    store.put(sample.frame_key, data, "image/jpeg")
    return sample


def choices(material: str, *, condition: list[str] | None = None) -> list[dict[str, Any]]:
    result = [
        {
            "from_name": FROM_NAME,
            "to_name": TO_NAME,
            "type": "choices",
            "value": {"choices": [material]},
        }
    ]
    if condition:
        result.append(
            {
                "from_name": CONDITION_NAME,
                "to_name": TO_NAME,
                "type": "choices",
                "value": {"choices": condition},
            }
        )
    return result


def counter(name: str, labels: dict[str, str] | None = None) -> float:
    return REGISTRY.get_sample_value(name, labels or {}) or 0.0


@dataclass
class Bridge:
    """A running labeling-bridge and what the test watches of it."""

    parts: LabelStudioParts
    tasks: dict[str, int] = field(default_factory=dict)
    taken: list[Taken] = field(default_factory=list)
    changed: asyncio.Event = field(default_factory=asyncio.Event)

    async def wait(self, condition: Any, timeout: float = 60.0) -> None:
        async def loop() -> None:
            while not condition():
                self.changed.clear()
                await self.changed.wait()

        await asyncio.wait_for(loop(), timeout)

    async def task_for(self, frame_sha256: str) -> int:
        await self.wait(lambda: frame_sha256 in self.tasks)
        return self.tasks[frame_sha256]


@dataclass
class Harness:
    label_studio: LabelStudioServer
    nats: NatsServer
    store: LocalBlobStore
    tmp_path: Path
    project: str = field(default_factory=lambda: f"binloop-test-{uuid.uuid4().hex[:10]}")

    def settings(self, **overrides: Any) -> LabelingBridgeSettings:
        values: dict[str, Any] = {
            "backend": "label-studio",
            "nats_url": self.nats.url,
            "http_port": 0,
            "web_port": 0,
            "web_host": "127.0.0.1",
            "retry_delay_s": 0.05,
            "blob_root": self.store.root,
            "label_studio_url": self.label_studio.url,
            "label_studio_token": self.label_studio.token,
            "label_studio_project": self.project,
            "webhook_secret": SECRET,
            "reconcile_every_s": 3600,  # the tests run passes themselves
            # Wide, so a pass lists every task these short tests touched.
            "reconcile_overlap_s": 3600,
            "model_cache": self.tmp_path / "models",
            "snapshot_every": 1000,
        }
        return LabelingBridgeSettings(**{**values, **overrides})

    async def start(self, **overrides: Any) -> tuple[ServiceApp, Bridge]:
        """Starts a bridge; returns (service, watcher) once its project is set up."""
        parts = LabelStudioParts()
        service = create_app(self.settings(**overrides), store=self.store, parts=parts)
        bridge = Bridge(parts)
        loop = asyncio.get_running_loop()

        def on_task(frame_sha256: str, task_id: int) -> None:
            def note() -> None:
                bridge.tasks[frame_sha256] = task_id
                bridge.changed.set()

            loop.call_soon_threadsafe(note)

        def on_taken(taken: Taken) -> None:
            bridge.taken.append(taken)
            bridge.changed.set()

        assert parts.backend is not None
        assert parts.link is not None
        parts.backend.add_listener(on_task)
        parts.link.add_listener(on_taken)
        await service.start()
        return service, bridge


@pytest.fixture
async def harness(
    label_studio: LabelStudioServer,
    nats_server: NatsServer,
    js: JetStreamContext,
    blob_store: LocalBlobStore,
    tmp_path: Path,
) -> Harness:
    return Harness(label_studio, nats_server, blob_store, tmp_path)


async def publish(js: JetStreamContext, sample: SampleSelected) -> None:
    await js.publish(SAMPLES_SELECTED.subject(), sample.model_dump_json().encode())


async def tasks_of(server: LabelStudioServer, project: str) -> list[Any]:
    def listed() -> list[Any]:
        client = sdk(server)
        projects: list[Any] = list(client.projects.list(title=project))
        (found,) = [p for p in projects if p.title == project]
        return list(client.tasks.list(project=found.id, fields="all"))

    return await asyncio.to_thread(listed)


# --- pure parts --------------------------------------------------------------------------------


def test_label_config_has_material_with_compartments_and_optional_object_and_condition() -> None:
    config = ET.fromstring(label_config_xml(TAXONOMY, ["cup", "bottle"], ["soiled", "crushed"]))
    controls = {c.get("name"): c for c in config.findall("Choices")}
    assert list(controls) == [FROM_NAME, OBJECT_NAME, CONDITION_NAME]
    material = controls[FROM_NAME]
    assert (material.get("required"), material.get("choice")) == ("true", "single-radio")
    assert {c.get("value"): c.get("hint") for c in material.findall("Choice")} == {
        label: f"goes to {TAXONOMY.compartment_for(label).value}" for label in TAXONOMY.labels
    }
    assert [c.get("value") for c in controls[OBJECT_NAME].findall("Choice")] == ["cup", "bottle"]
    assert controls[CONDITION_NAME].get("choice") == "multiple"
    assert controls[OBJECT_NAME].get("required") is None


def webhook_body(material: str = "glass", **changes: Any) -> bytes:
    body: dict[str, Any] = {
        "action": "ANNOTATION_CREATED",
        "project": {"id": 7, "title": "whatever"},
        "task": {
            "id": 11,
            "data": {
                "image": "http://x/y.jpg",
                "frame_sha256": "ab" * 32,
                "frame_key": "frames/bin-a/2025/03/14/" + "ab" * 32 + ".jpg",
                "bin_id": "bin-a",
            },
        },
        "annotation": {
            "id": 5,
            "result": choices(material, condition=["soiled"]),
            "was_cancelled": False,
            "updated_at": "2026-01-02T03:04:05.123456Z",
            "completed_by": 3,
        },
    }
    body.update(changes)
    return json.dumps(body).encode()


def test_webhook_bodies_are_parsed_or_rejected_with_the_reason() -> None:
    seen = parse_webhook(webhook_body())
    assert seen is not None
    assert (seen.key, seen.task_id, seen.annotator) == (
        "label-studio:7:5",
        11,
        "label-studio-user-3",
    )
    assert (seen.answers.material, seen.answers.conditions) == ("glass", ("soiled",))
    assert parse_webhook(webhook_body(action="PROJECT_UPDATED")) is None

    with pytest.raises(PermanentError, match="not a Label Studio webhook payload"):
        parse_webhook(b"{not json")
    with pytest.raises(PermanentError, match="send_payload"):
        parse_webhook(json.dumps({"action": "ANNOTATION_CREATED"}).encode())
    with pytest.raises(PermanentError, match="was not imported by the bridge"):
        parse_webhook(webhook_body(task={"id": 11, "data": {"image": "http://x/y.jpg"}}))
    no_material = json.loads(webhook_body())
    no_material["annotation"]["result"] = []
    with pytest.raises(PermanentError, match="exactly one 'material'"):
        parse_webhook(json.dumps(no_material).encode())


def item(sha_seed: int, label: str) -> ManifestItem:
    sha = f"{sha_seed:064x}"
    return ManifestItem(key=f"frames/bin-a/{sha}.jpg", sha256=sha, label=label, split="train")


SPLIT_TAXONOMY = Taxonomy(
    version="bins-7",
    label_to_compartment={
        "cardboard": Compartment.PAPER_CARDBOARD,
        "paper": Compartment.PAPER_CARDBOARD,
        "glass": Compartment.GLASS,
        "plastic_metal": Compartment.PLASTIC_METAL,
        "napkin": Compartment.TRASH,
        "food_waste": Compartment.TRASH,
    },
)
MIGRATION = TaxonomyMigration(
    source="trashnet-6",
    target="bins-7",
    renames={"plastic": "plastic_metal", "metal": "plastic_metal"},
    splits={"trash": ["napkin", "food_waste"]},
)


def test_taxonomy_migration_merges_renames_and_sends_split_classes_back_for_labeling() -> None:
    items = [item(1, "plastic"), item(2, "metal"), item(3, "trash"), item(4, "paper")]
    migrated = migrate_items(items, "trashnet-6", SPLIT_TAXONOMY, [MIGRATION])
    assert [(i.sha256, i.label) for i in migrated.items] == [
        (items[0].sha256, "plastic_metal"),
        (items[1].sha256, "plastic_metal"),
        (items[3].sha256, "paper"),
    ]
    assert migrated.needs_relabel == [items[2]]
    unchanged = migrate_items(migrated.items, "bins-7", SPLIT_TAXONOMY, [])  # same version
    assert (unchanged.items, unchanged.needs_relabel) == (migrated.items, [])

    with pytest.raises(PermanentError, match="no taxonomy migration leads from 'old-3'"):
        migrate_items(items, "old-3", SPLIT_TAXONOMY, [MIGRATION])
    with pytest.raises(ValueError, match="at least two new labels"):
        TaxonomyMigration(source="a", target="b", splits={"trash": ["napkin"]})


def record_for(store: LocalBlobStore, data: bytes, label: str, taxonomy: Taxonomy) -> LabelRecord:
    """A frame in the store and its label record, as the bridge saves them."""
    sha = sha256_hex(data)
    frame = store.put(frame_key("bin-a", CAPTURED_AT, sha), data, "image/jpeg")
    record = LabelRecord(
        dataset="binloop",
        frame_sha256=sha,
        bin_id="bin-a",
        frame=frame,
        label=label,
        compartment=taxonomy.compartment_for(label),
        backend="label-studio",
        annotator="someone",
        annotation_id=f"label-studio:1:{sha[:8]}-{taxonomy.version}",
        taxonomy_version=taxonomy.version,
        labeled_at=CAPTURED_AT,
    )
    save_label(store, record)
    return record


def as_item(record: LabelRecord) -> ManifestItem:
    return ManifestItem(
        key=record.frame.key,
        sha256=record.frame_sha256,
        label=record.label,
        split=split_for(record.frame_sha256),
    )


def test_a_migrated_version_keeps_what_waits_for_a_new_label_until_it_has_one(
    blob_store: LocalBlobStore,
) -> None:
    old = [
        record_for(blob_store, f"frame {i}".encode(), label, TAXONOMY)
        for i, label in enumerate(["plastic", "trash", "glass"])
    ]
    write_manifest(
        blob_store,
        DatasetManifest(
            name="binloop",
            version=1,
            created_at=CAPTURED_AT,
            taxonomy_version="trashnet-6",
            classes=TAXONOMY.labels,
            items=[as_item(r) for r in old],
        ),
    )

    def bridge() -> LabelingBridge:
        """A bridge (re)started with the split taxonomy: one version per new label."""
        book = DatasetBook(blob_store, "binloop", SPLIT_TAXONOMY, 1, migrations=[MIGRATION])
        return LabelingBridge(blob_store, OracleBackend(), book, SPLIT_TAXONOMY, "test")

    first = bridge()
    migration = first.migrate()
    assert migration is not None
    assert migration.written
    announced = migration.announced
    assert (announced.version, announced.taxonomy_version) == (2, "bins-7")
    assert announced.class_counts == {"glass": 1, "plastic_metal": 1}
    trash_item = as_item(old[1])
    assert first.book.needs_relabel == [trash_item]
    # Already in the book's taxonomy: announced again (same event), not written again.
    assert first.migrate() == Migration(announced, written=False)

    # Restarted: the old records (renamed, or waiting for a new label) are not new labels.
    restarted = bridge()
    assert restarted.book.pending == []
    assert restarted.migrate() == Migration(announced, written=False)
    (request,) = waiting_relabels(restarted)
    assert (request.frame.sha256, request.bin_id, request.old_label) == (
        old[1].frame_sha256,
        "bin-a",
        "trash",
    )
    assert request.taxonomy_version == "bins-7"
    assert "'trash' was split into napkin, food_waste" in request.reason

    # A new label elsewhere: the next version still lists the frame waiting.
    other = record_for(blob_store, b"frame 3", "paper", SPLIT_TAXONOMY)
    third = restarted.commit(other)
    assert third is not None
    assert third.version == 3
    assert restarted.book.needs_relabel == [trash_item]
    assert restarted.migrate() is None  # the latest version was not cut by the change

    # Labeled again: it is back, with its new label, and nothing waits any more.
    again = record_for(blob_store, b"frame 1", "napkin", SPLIT_TAXONOMY)
    assert waiting_relabels(bridge()) == []  # stored, not yet in a version
    fourth = restarted.commit(again)
    assert fourth is not None
    assert fourth.version == 4
    assert fourth.class_counts == {"glass": 1, "napkin": 1, "paper": 1, "plastic_metal": 1}
    assert restarted.book.needs_relabel == []
    assert bridge().book.needs_relabel == []


BINS_8 = Taxonomy(
    version="bins-8",
    label_to_compartment={
        **{k: v for k, v in SPLIT_TAXONOMY.label_to_compartment.items() if k != "paper"},
        "office_paper": Compartment.PAPER_CARDBOARD,
    },
)


def test_a_new_label_given_between_two_taxonomy_changes_is_kept(
    blob_store: LocalBlobStore,
) -> None:
    old = record_for(blob_store, b"frame 1", "trash", TAXONOMY)
    write_manifest(
        blob_store,
        DatasetManifest(
            name="binloop",
            version=1,
            created_at=CAPTURED_AT,
            taxonomy_version="trashnet-6",
            classes=TAXONOMY.labels,
            items=[as_item(old)],
        ),
    )
    migrations = [
        MIGRATION,
        TaxonomyMigration(source="bins-7", target="bins-8", renames={"paper": "office_paper"}),
    ]
    seven = DatasetBook(blob_store, "binloop", SPLIT_TAXONOMY, 100, migrations=migrations)
    assert seven.migrate() is not None
    assert seven.needs_relabel == [as_item(old)]
    napkin = record_for(blob_store, b"frame 1", "napkin", SPLIT_TAXONOMY)  # not in a version yet

    eight = DatasetBook(blob_store, "binloop", BINS_8, 100, migrations=migrations)
    migrated = eight.migrate()

    assert migrated is not None
    assert migrated.manifest.taxonomy_version == "bins-8"
    assert [(i.sha256, i.label) for i in migrated.manifest.items] == [
        (napkin.frame_sha256, "napkin")
    ]
    assert migrated.manifest.needs_relabel == []


# --- against a real Label Studio -----------------------------------------------------------------


@pytest.mark.integration
async def test_project_creation_is_idempotent_and_follows_taxonomy_changes(
    label_studio: LabelStudioServer,
) -> None:
    title = f"binloop-test-{uuid.uuid4().hex[:10]}"
    config = label_config_xml(TAXONOMY, ["cup"], ["soiled"])

    def ensure(label_config: str) -> ProjectRef:
        client = LabelStudioClient(
            label_studio.url, label_studio.token, ProjectSpec(title, label_config, "test"), 30
        )
        try:
            return client.project()
        finally:
            client.close()

    first = await asyncio.to_thread(ensure, config)
    # Found as it was made, creation time included: the import records compare it.
    assert first.created_at is not None
    assert await asyncio.to_thread(ensure, config) == first
    changed = label_config_xml(SPLIT_TAXONOMY, ["cup"], ["soiled"])
    assert await asyncio.to_thread(ensure, changed) == first

    def read() -> tuple[list[int], str | None]:
        client = sdk(label_studio)
        listed: list[Any] = list(client.projects.list(title=title))
        ids = [p.id for p in listed if p.title == title]
        return ids, client.projects.get(id=first.id).label_config

    ids, stored_config = await asyncio.to_thread(read)
    assert ids == [first.id]
    assert stored_config == changed.strip()


@pytest.mark.integration
async def test_a_deleted_project_makes_calls_wait_and_is_made_again(
    label_studio: LabelStudioServer,
) -> None:
    title = f"binloop-test-{uuid.uuid4().hex[:10]}"
    spec = ProjectSpec(title, label_config_xml(TAXONOMY, ["cup"], ["soiled"]), "test")
    client = LabelStudioClient(label_studio.url, label_studio.token, spec, 30)
    data = {"image": "http://bridge/x.jpg", "frame_sha256": "0" * 64, "frame_key": "k"}

    def delete_then(call: Any) -> tuple[int, str]:
        """(the deleted project, what the call raised)."""
        project = client.project_id()
        sdk(label_studio).projects.delete(id=project)
        with pytest.raises(NotReadyError) as raised:
            call()
        return project, str(raised.value)

    try:
        calls = [
            lambda: client.import_task({"data": data}),  # a sample (a 404)
            lambda: client.annotated_tasks(None),  # reconciliation (a 404)
            lambda: client.ensure_webhook("http://bridge/hook", {}, "/hook"),  # a 400
        ]
        outcomes = [await asyncio.to_thread(delete_then, call) for call in calls]
        made_again = await asyncio.to_thread(client.project_id)
        task_id = await asyncio.to_thread(client.import_task, {"data": data})
    finally:
        client.close()

    for project, error in outcomes:
        assert f"project {project} is gone" in error
    assert made_again not in [project for project, _ in outcomes]
    (task,) = await tasks_of(label_studio, title)
    assert task.id == task_id


@pytest.mark.integration
async def test_reconciliation_lists_every_task_when_one_is_edited_between_two_pages(
    label_studio: LabelStudioServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The real server's filters (`updated_at` greater, at least, equal; `id` greater) and
    ordering, with pages of two tasks and a real edit made between the first two requests."""
    title = f"binloop-test-{uuid.uuid4().hex[:10]}"
    spec = ProjectSpec(title, label_config_xml(TAXONOMY, ["cup"], ["soiled"]), "test")
    monkeypatch.setattr(client_module, "PAGE_SIZE", 2)
    client = LabelStudioClient(label_studio.url, label_studio.token, spec, 30)
    server = sdk(label_studio)

    def annotated_tasks() -> list[tuple[int, int]]:
        """(task, annotation) ids, made and annotated one after the other."""
        made = []
        for n in range(5):
            data = {"image": "http://bridge/x.jpg", "frame_sha256": f"{n:064x}", "frame_key": "k"}
            task_id = client.import_task({"data": data})
            annotation = server.annotations.create(id=task_id, result=choices("glass"))
            assert annotation.id is not None
            made.append((task_id, annotation.id))
        return made

    requests: list[dict[str, Any]] = []
    listing = client.sdk.tasks.list

    def list_then_edit(**kwargs: Any) -> Any:
        page: Any = listing(**kwargs)
        requests.append(kwargs)
        if len(requests) == 1:  # an annotator corrects the first task while the pass reads on
            server.annotations.update(id=made[0][1], result=choices("paper"))
        return page

    try:
        made = await asyncio.to_thread(annotated_tasks)
        monkeypatch.setattr(client.sdk.tasks, "list", list_then_edit)
        listed = await asyncio.to_thread(client.annotated_tasks, None)
        monkeypatch.setattr(client.sdk.tasks, "list", listing)
        second, second_at = listed[1], datetime.fromisoformat(listed[1]["updated_at"])
        later = await asyncio.to_thread(client.annotated_tasks, second_at)
        pages = _AnnotatedTaskPages(client.sdk, await asyncio.to_thread(client.project_id), 2)
        at_once = await asyncio.to_thread(pages.changed_at, second_at, None)
        after_it = await asyncio.to_thread(pages.changed_at, second_at, second["id"])
    finally:
        client.close()

    task_ids = [task_id for task_id, _ in made]
    # Every task once, the edited one last, as it is now.
    assert [t["id"] for t in listed] == task_ids[1:] + task_ids[:1]
    (edited,) = listed[-1]["annotations"]
    assert edited["result"][0]["value"]["choices"] == ["paper"]
    assert [t["id"] for t in later] == task_ids[3:] + task_ids[:1]
    assert [t["id"] for t in at_once.tasks] == [second["id"]]
    assert after_it.tasks == []


@pytest.mark.integration
async def test_a_task_that_lost_its_prediction_gets_it_back(
    harness: Harness, js: JetStreamContext, caplog: pytest.LogCaptureFixture
) -> None:
    ((data, _),) = demo_frames(1)
    sample = stored_sample(harness.store, data, predicted="glass")
    service, bridge = await harness.start()  # the ML backend registered, as by default
    try:
        await asyncio.wait_for(bridge.parts.remote_ready.wait(), 60)
        assert bridge.parts.client is not None
        # What Label Studio leaves when it drops a prediction on import: the task alone.
        frame = harness.store.put(sample.frame_key, data)
        bare = import_task(sample, frame, TAXONOMY.version)
        bare.pop("predictions")
        bare_id = await asyncio.to_thread(bridge.parts.client.import_task, bare)
        with caplog.at_level(logging.WARNING):
            await publish(js, sample)
            assert await bridge.task_for(sample.frame_sha256) == bare_id
        (task,) = await tasks_of(harness.label_studio, harness.project)
    finally:
        await service.stop()

    (prediction,) = task.predictions
    assert prediction.result == choice_result("glass")
    assert f"task {bare_id} had no prediction" in caplog.text


@pytest.mark.integration
async def test_a_sample_becomes_one_task_with_the_prediction_and_a_signed_frame_url(
    harness: Harness, js: JetStreamContext
) -> None:
    ((data, _),) = demo_frames(1)
    sample = stored_sample(harness.store, data, predicted="metal")
    service, bridge = await harness.start()
    try:
        await publish(js, sample)
        task_id = await bridge.task_for(sample.frame_sha256)
        # The same frame again (a sampler restart re-selecting it): no second task.
        del bridge.tasks[sample.frame_sha256]
        await publish(js, sample.model_copy(update={"event_id": uuid.uuid4()}))
        assert await bridge.task_for(sample.frame_sha256) == task_id
        (task,) = await tasks_of(harness.label_studio, harness.project)
        image_url = task.data["image"]
        async with aiohttp.ClientSession() as http:
            async with http.get(image_url) as response:
                assert response.status == 200
                assert await response.read() == data
            async with http.get(image_url.replace("sig=", "sig=0")) as response:
                assert response.status == 403
    finally:
        await service.stop()

    assert task.id == task_id
    assert task.data["frame_sha256"] == sample.frame_sha256
    assert task.data["frame_key"] == sample.frame_key
    (prediction,) = task.predictions
    assert prediction.model_version == "mobilenet:v3"
    assert prediction.score == pytest.approx(0.41)
    assert prediction.result == [
        {
            "from_name": FROM_NAME,
            "to_name": TO_NAME,
            "type": "choices",
            "value": {"choices": ["metal"]},
        }
    ]


async def annotate(server: LabelStudioServer, task_id: int, result: list[dict[str, Any]]) -> int:
    created = await asyncio.to_thread(sdk(server).annotations.create, id=task_id, result=result)
    assert created.id is not None
    return int(created.id)


async def update_annotation(
    server: LabelStudioServer, annotation_id: int, result: list[dict[str, Any]]
) -> None:
    await asyncio.to_thread(sdk(server).annotations.update, id=annotation_id, result=result)


@pytest.mark.integration
async def test_an_annotation_arrives_by_webhook_once_and_a_correction_once_more(
    harness: Harness, js: JetStreamContext, nats_client: Client
) -> None:
    ((data, truth),) = demo_frames(1)
    sample = stored_sample(harness.store, data)
    labels = await Collector(LabelAnnotated).attach(nats_client, LABELS_ANNOTATED.subject())
    service, bridge = await harness.start()
    try:
        await asyncio.wait_for(bridge.parts.remote_ready.wait(), 60)
        await publish(js, sample)
        task_id = await bridge.task_for(sample.frame_sha256)

        annotation_id = await annotate(harness.label_studio, task_id, choices(truth))
        (first,) = await labels.wait_for(1)
        # The same material, a condition added: stored, but no second labels.annotated.
        await update_annotation(
            harness.label_studio, annotation_id, choices(truth, condition=["soiled"])
        )
        await bridge.wait(lambda: len([t for t in bridge.taken if t.source == "webhook"]) == 2)
        assert bridge.parts.reconcile_once is not None
        reconciled = await bridge.parts.reconcile_once()
        assert (reconciled.listed, reconciled.published) == (1, 0)
        assert len(labels.items) == 1

        corrected = "trash" if truth != "trash" else "glass"
        await update_annotation(harness.label_studio, annotation_id, choices(corrected))
        second = (await labels.wait_for(2))[1]
    finally:
        await service.stop()

    # The start-up pass may have run before or after the first annotation: it publishes
    # nothing either way, and neither does the pass after the webhooks.
    assert [t.published for t in bridge.taken if t.source == "webhook"] == [True, False, True]
    assert not any(t.published for t in bridge.taken if t.source == "reconcile")
    assert len(labels.items) == 2
    assert (first.label, first.backend, first.frame_sha256) == (
        truth,
        "label-studio",
        sample.frame_sha256,
    )
    assert first.compartment == TAXONOMY.compartment_for(truth)
    assert first.annotation_id.endswith(f":{annotation_id}")
    assert first.annotator.startswith("label-studio-user-")
    assert (second.label, second.annotation_id) == (corrected, first.annotation_id)
    assert second.event_id != first.event_id
    record = LabelRecord.model_validate_json(
        harness.store.get(label_key("binloop", sample.frame_sha256))
    )
    assert (record.label, record.conditions) == (corrected, [])


async def annotate_first_of(
    harness: Harness,
    js: JetStreamContext,
    labels: Collector[LabelAnnotated],
    frames: list[tuple[bytes, str]],
    samples: list[SampleSelected],
    **overrides: Any,
) -> tuple[list[int], ReconcilePass]:
    """Runs a bridge until every sample has a task and the first one's annotation came back as
    a label, then a reconciliation pass, and stops it: (task ids, that pass)."""
    service, bridge = await harness.start(**overrides)
    try:
        await asyncio.wait_for(bridge.parts.remote_ready.wait(), 60)
        for sample in samples:
            await publish(js, sample)
        task_ids = [await bridge.task_for(s.frame_sha256) for s in samples]
        await annotate(harness.label_studio, task_ids[0], choices(frames[0][1]))
        await labels.wait_for(1)
        assert bridge.parts.reconcile_once is not None
        reconciled = await bridge.parts.reconcile_once()
    finally:
        await service.stop()
    return task_ids, reconciled


@pytest.mark.integration
async def test_annotations_made_while_the_bridge_was_down_arrive_by_reconciliation(
    harness: Harness, js: JetStreamContext, nats_client: Client
) -> None:
    frames = demo_frames(2)
    samples = [stored_sample(harness.store, data) for data, _ in frames]
    labels = await Collector(LabelAnnotated).attach(nats_client, LABELS_ANNOTATED.subject())
    task_ids, _ = await annotate_first_of(harness, js, labels, frames, samples)

    # The bridge is down: this annotation's webhook finds nobody listening.
    await annotate(harness.label_studio, task_ids[1], choices(frames[1][1]))
    assert len(labels.items) == 1

    service, bridge = await harness.start()
    try:
        found = await labels.wait_for(2)
        assert bridge.parts.reconcile_once is not None
        again = await bridge.parts.reconcile_once()
    finally:
        await service.stop()

    assert [(a.frame_sha256, a.label) for a in found] == [
        (s.frame_sha256, truth) for s, (_, truth) in zip(samples, frames, strict=True)
    ]
    # The first pass after the restart published the missed one only; the next, nothing.
    assert [(t.source, t.published) for t in bridge.taken] == [
        ("reconcile", False),
        ("reconcile", True),
        ("reconcile", False),
        ("reconcile", False),
    ]
    assert (again.listed, again.published) == (2, 0)
    assert len(labels.items) == 2


@pytest.mark.integration
async def test_a_restarted_bridge_reconciles_from_its_saved_cursor(
    harness: Harness, js: JetStreamContext, nats_client: Client
) -> None:
    frames = demo_frames(2)
    samples = [stored_sample(harness.store, data) for data, _ in frames]
    labels = await Collector(LabelAnnotated).attach(nats_client, LABELS_ANNOTATED.subject())
    task_ids, before = await annotate_first_of(
        harness, js, labels, frames, samples, reconcile_overlap_s=0
    )
    saved = json.loads(harness.store.get(reconcile_cursor_key("binloop")))
    assert saved["project"] == harness.project
    assert before.listed == 1

    await annotate(harness.label_studio, task_ids[1], choices(frames[1][1]))
    service, bridge = await harness.start(reconcile_overlap_s=0)
    try:
        await labels.wait_for(2)
        assert bridge.parts.reconcile_once is not None
        # Passes run one at a time: this one starts once the startup pass has saved its cursor.
        again = await bridge.parts.reconcile_once()
    finally:
        await service.stop()

    # The pass after the restart started at the saved cursor: it listed the task annotated
    # while the bridge was down, not the one it had seen before.
    assert [(t.source, t.published) for t in bridge.taken] == [("reconcile", True)]
    assert again.listed == 0  # nothing changed after the cursor
    moved = json.loads(harness.store.get(reconcile_cursor_key("binloop")))
    assert datetime.fromisoformat(moved["cursor"]) > datetime.fromisoformat(saved["cursor"])


async def delete_project(server: LabelStudioServer, project: str) -> int:
    """Deletes the project titled `project` as an operator would; returns its id."""

    def delete() -> int:
        client = sdk(server)
        listed: list[Any] = list(client.projects.list(title=project))
        (found,) = [p for p in listed if p.title == project]
        client.projects.delete(id=found.id)
        return int(found.id)

    return await asyncio.to_thread(delete)


@pytest.mark.integration
async def test_samples_not_labeled_yet_get_their_task_again_when_the_project_is_made_again(
    harness: Harness, js: JetStreamContext, nats_client: Client
) -> None:
    frames = demo_frames(2)
    labeled, waiting = (stored_sample(harness.store, data, predicted="metal") for data, _ in frames)
    labels = await Collector(LabelAnnotated).attach(nats_client, LABELS_ANNOTATED.subject())

    def only_task(tasks: list[Any]) -> Any:
        """The waiting sample's task, and no other, with the prediction it was imported with."""
        (task,) = tasks
        assert task.data["frame_sha256"] == waiting.frame_sha256
        (prediction,) = task.predictions
        assert (prediction.model_version, prediction.result) == ("mobilenet:v3", choices("metal"))
        return task

    service, bridge = await harness.start()
    try:
        await asyncio.wait_for(bridge.parts.remote_ready.wait(), 60)
        for sample in (labeled, waiting):
            await publish(js, sample)
        old_tasks = [await bridge.task_for(s.frame_sha256) for s in (labeled, waiting)]
        await annotate(harness.label_studio, old_tasks[0], choices(frames[0][1]))
        await labels.wait_for(1)
        first_project = await delete_project(harness.label_studio, harness.project)

        # The next pass finds the project gone, makes it again, and the waiting sample's task.
        assert bridge.parts.sync_once is not None
        await bridge.parts.sync_once()
        made_again = only_task(await tasks_of(harness.label_studio, harness.project))
        await bridge.parts.sync_once()  # and nothing more on the next one
        assert only_task(await tasks_of(harness.label_studio, harness.project)).id == made_again.id
    finally:
        await service.stop()

    # Restarted: the task is found, not made twice.
    service, bridge = await harness.start()
    try:
        await asyncio.wait_for(bridge.parts.tasks_restored.wait(), 60)
    finally:
        await service.stop()
    assert only_task(await tasks_of(harness.label_studio, harness.project)).id == made_again.id

    # Deleted while the bridge is down: its start makes the project and the task again.
    second_project = await delete_project(harness.label_studio, harness.project)
    service, bridge = await harness.start()
    try:
        await asyncio.wait_for(bridge.parts.tasks_restored.wait(), 60)
        assert bridge.parts.client is not None
        third = await asyncio.to_thread(bridge.parts.client.project)
    finally:
        await service.stop()
    last = only_task(await tasks_of(harness.label_studio, harness.project))

    # (Label Studio on SQLite may give a new task the id a deleted one had: ids tell nothing.)
    assert len({first_project, second_project, third.id}) == 3
    assert third.created_at is not None  # tells it from a project made again with its id
    assert last.project == third.id
    assert [label.frame_sha256 for label in labels.items] == [labeled.frame_sha256]


@pytest.mark.integration
async def test_a_new_taxonomy_cuts_a_migrated_version_and_asks_again_for_split_frames(
    harness: Harness, js: JetStreamContext, nats_client: Client
) -> None:
    by_truth = {truth: data for data, truth in demo_frames(len(TAXONOMY.labels))}
    frames = [(by_truth["plastic"], "plastic"), (by_truth["trash"], "trash")]
    samples = [stored_sample(harness.store, data) for data, _ in frames]
    labels = await Collector(LabelAnnotated).attach(nats_client, LABELS_ANNOTATED.subject())
    versions = await Collector(DatasetSnapshot).attach_stream(js, DATASETS_SNAPSHOT.subject())
    dead = await Collector(DeadLetter).attach(nats_client, dlq_subject("labeling-bridge"))
    service, bridge = await harness.start(snapshot_every=2)
    try:
        await asyncio.wait_for(bridge.parts.remote_ready.wait(), 60)
        for sample in samples:
            await publish(js, sample)
        for sample, (_, truth) in zip(samples, frames, strict=True):
            await annotate(
                harness.label_studio, await bridge.task_for(sample.frame_sha256), choices(truth)
            )
        await versions.wait_for(1)
    finally:
        await service.stop()
    old_tasks = {t.id for t in await tasks_of(harness.label_studio, harness.project)}

    # Restarted with trash split in two and plastic merged with metal.
    split = {"taxonomy": SPLIT_TAXONOMY, "taxonomy_migrations": [MIGRATION], "snapshot_every": 2}
    service, bridge = await harness.start(**split)
    try:
        await asyncio.wait_for(bridge.parts.relabels_asked.wait(), 60)
        await versions.wait_for(2)
        assert bridge.parts.reconcile_once is not None
        reconciled = await bridge.parts.reconcile_once()
        relabel_task = await bridge.task_for(samples[1].frame_sha256)
    finally:
        await service.stop()
    # Restarted before anyone answered: the frame still waits, and its task is found again.
    service, bridge = await harness.start(**split)
    try:
        await asyncio.wait_for(bridge.parts.relabels_asked.wait(), 60)
        assert bridge.tasks[samples[1].frame_sha256] == relabel_task
        await annotate(harness.label_studio, relabel_task, choices("napkin"))
        await labels.wait_for(3)
    finally:
        await service.stop()

    first, migrated = versions.items
    assert (first.version, first.taxonomy_version, first.class_counts) == (
        1,
        "trashnet-6",
        {"plastic": 1, "trash": 1},
    )
    assert (migrated.version, migrated.taxonomy_version, migrated.class_counts) == (
        2,
        "bins-7",
        {"plastic_metal": 1},
    )
    manifest = DatasetManifest.model_validate_json(read_verified(migrated.manifest))
    assert [i.sha256 for i in manifest.needs_relabel] == [samples[1].frame_sha256]

    tasks = {t.id: t for t in await tasks_of(harness.label_studio, harness.project)}
    assert set(tasks) == old_tasks | {relabel_task}
    asked = tasks[relabel_task]
    assert asked.data["relabel_for"] == "bins-7"
    assert asked.data["previous_label"] == "trash"
    assert "split into napkin, food_waste" in asked.data["reason"]
    assert not asked.predictions  # the old champion knows neither napkin nor food_waste
    # The old tasks' annotations ("plastic", "trash") are stored already: no dead letters.
    assert reconciled.published == 0
    assert dead.items == []
    assert [(a.frame_sha256, a.label, a.taxonomy_version) for a in labels.items[2:]] == [
        (samples[1].frame_sha256, "napkin", "bins-7")
    ]


@pytest.mark.integration
async def test_annotations_made_under_the_old_taxonomy_while_the_bridge_switched_are_kept(
    harness: Harness, js: JetStreamContext, nats_client: Client
) -> None:
    by_truth = {truth: data for data, truth in demo_frames(len(TAXONOMY.labels))}
    frames = [(by_truth["plastic"], "plastic"), (by_truth["trash"], "trash")]
    samples = [stored_sample(harness.store, data) for data, _ in frames]
    labels = await Collector(LabelAnnotated).attach(nats_client, LABELS_ANNOTATED.subject())
    dead = await Collector(DeadLetter).attach(nats_client, dlq_subject("labeling-bridge"))
    service, bridge = await harness.start()
    try:
        await asyncio.wait_for(bridge.parts.remote_ready.wait(), 60)
        for sample in samples:
            await publish(js, sample)
        task_ids = [await bridge.task_for(s.frame_sha256) for s in samples]
    finally:
        await service.stop()
    # Annotated while the bridge switches to the new taxonomy: no webhook reaches it.
    for task_id, (_, truth) in zip(task_ids, frames, strict=True):
        await annotate(harness.label_studio, task_id, choices(truth))

    split = {"taxonomy": SPLIT_TAXONOMY, "taxonomy_migrations": [MIGRATION]}
    service, bridge = await harness.start(**split)
    try:
        # Reconciliation carries "plastic" over and sends the "trash" frame back: its task
        # asking for a label in bins-7 is made.
        relabel_task = await bridge.task_for(samples[1].frame_sha256)
        await labels.wait_for(2)
        await annotate(harness.label_studio, relabel_task, choices("napkin"))
        await labels.wait_for(3)
    finally:
        await service.stop()

    assert relabel_task not in task_ids
    tasks = {t.id: t for t in await tasks_of(harness.label_studio, harness.project)}
    assert [tasks[t].data["taxonomy_version"] for t in task_ids] == ["trashnet-6"] * 2
    asked = tasks[relabel_task]
    assert (asked.data["relabel_for"], asked.data["previous_label"]) == ("bins-7", "trash")
    assert "split into napkin, food_waste" in asked.data["reason"]
    assert [(a.frame_sha256, a.label, a.taxonomy_version) for a in labels.items] == [
        (samples[0].frame_sha256, "plastic_metal", "bins-7"),
        (samples[1].frame_sha256, "trash", "trashnet-6"),
        (samples[1].frame_sha256, "napkin", "bins-7"),
    ]
    assert dead.items == []


@pytest.mark.integration
async def test_reconciliation_dead_letters_a_bad_annotation_once(
    harness: Harness, js: JetStreamContext, nats_client: Client
) -> None:
    ((data, _),) = demo_frames(1)
    sample = stored_sample(harness.store, data)
    dlq = await Collector(DeadLetter).attach(nats_client, dlq_subject("labeling-bridge"))
    service, bridge = await harness.start(register_ml_backend=False)
    try:
        await asyncio.wait_for(bridge.parts.remote_ready.wait(), 60)
        await publish(js, sample)
        task_id = await bridge.task_for(sample.frame_sha256)
    finally:
        await service.stop()
    # Made while the bridge is down, so only reconciliation sees it: a material the taxonomy
    # does not have, which can never become a label.
    await annotate(harness.label_studio, task_id, choices("styrofoam"))

    service, bridge = await harness.start(register_ml_backend=False)
    try:
        assert bridge.parts.reconcile_once is not None
        (letter,) = await dlq.wait_for(1)
        # An idle project lists its newest change on every pass (within the overlap).
        passes = [await bridge.parts.reconcile_once() for _ in range(2)]
    finally:
        await service.stop()

    assert letter.original_subject == f"task {task_id}"
    assert "'styrofoam' is not in taxonomy" in letter.error
    assert [p.listed for p in passes] == [1, 1]
    assert len(dlq.items) == 1  # one entry, not one per pass
    assert bridge.taken == []


@pytest.mark.integration
async def test_webhook_rejects_strangers_and_dead_letters_bad_bodies(
    harness: Harness, nats_client: Client, js: JetStreamContext
) -> None:
    dlq = await Collector(DeadLetter).attach(nats_client, dlq_subject("labeling-bridge"))
    service, bridge = await harness.start(register_ml_backend=False)
    unauthenticated = {"outcome": "unauthenticated"}
    before = counter("binloop_label_studio_webhooks_total", unauthenticated)
    try:
        url = bridge.parts.url + WEBHOOK_PATH
        async with aiohttp.ClientSession() as http:
            async with http.post(url, data=webhook_body()) as response:
                assert response.status == 401
            async with http.post(url, data=webhook_body(), headers={SECRET_HEADER: "guess"}) as r:
                assert r.status == 401
            authentic = {SECRET_HEADER: SECRET}
            for _ in range(2):  # a sender retrying the same bad body: one DLQ entry
                async with http.post(url, data=b'{"action": 42', headers=authentic) as response:
                    assert response.status == 400
            async with http.post(url, data=webhook_body("styrofoam"), headers=authentic) as r:
                assert r.status == 422
                assert "not in taxonomy" in (await r.json())["error"]
        letters = await dlq.wait_for(3)
        stored = (await js.stream_info("DLQ")).state.messages
    finally:
        await service.stop()

    assert counter("binloop_label_studio_webhooks_total", unauthenticated) == before + 2
    assert [(d.error_type, d.original_subject) for d in letters] == [
        ("PermanentError", f"http:POST {WEBHOOK_PATH}")
    ] * 3
    assert letters[0].error.startswith("not a Label Studio webhook payload")
    assert letters[0].payload_preview == '{"action": 42'
    assert letters[1].event_id == letters[0].event_id
    assert stored == 2  # JetStream kept the retried body once
    assert "'styrofoam' is not in taxonomy trashnet-6" in letters[2].error
    assert '"styrofoam"' in letters[2].payload_preview


@pytest.mark.integration
async def test_a_failing_label_studio_keeps_the_sample_until_it_is_back(
    harness: Harness, js: JetStreamContext, nats_client: Client
) -> None:
    ((data, _),) = demo_frames(1)
    sample = stored_sample(harness.store, data)
    dlq = await Collector(DeadLetter).attach(nats_client, dlq_subject("labeling-bridge"))
    refused_calls = {"operation": "ensure_project", "error": "500"}
    before = counter("binloop_label_studio_errors_total", refused_calls)
    proxy = await FaultyProxy(
        harness.label_studio.url, failing_status=500, refusals_wanted=4, failing=True
    ).start()
    # Fewer deliveries than refusals: a sample only survives because it is never given up on.
    service, bridge = await harness.start(
        label_studio_url=proxy.url, max_deliveries=2, register_ml_backend=False
    )
    try:
        await publish(js, sample)
        assert proxy.refused is not None
        await asyncio.wait_for(proxy.refused.wait(), 30)
        proxy.failing = False
        await bridge.task_for(sample.frame_sha256)
    finally:
        await service.stop()
        await proxy.stop()

    (task,) = await tasks_of(harness.label_studio, harness.project)
    assert task.data["frame_sha256"] == sample.frame_sha256
    assert proxy.refused_count >= 4
    assert dlq.items == []
    assert counter("binloop_label_studio_errors_total", refused_calls) - before >= 4


def promoted_model(store: LocalBlobStore, tmp_path: Path) -> ModelPromoted:
    # Imported here: torch takes seconds to import and only this test needs it.
    from tests.modelfactory import make_onnx_model

    onnx_path, card_path = make_onnx_model(tmp_path / "tiny", TAXONOMY.labels)
    artifact = store.put(model_key("tiny-cnn", 1, "model.onnx"), onnx_path.read_bytes())
    card = store.put(model_key("tiny-cnn", 1, "card.json"), card_path.read_bytes())
    return ModelPromoted(
        producer="model-registry",
        model_name="tiny-cnn",
        model_version=1,
        previous_version=None,
        artifact=artifact,
        card=card,
        metrics=ModelMetrics(
            eval_set_id="a" * 64,
            eval_items=10,
            accuracy=0.5,
            macro_f1=0.5,
            compartment_accuracy=0.6,
            per_class_f1={c: 0.5 for c in TAXONOMY.labels},
        ),
        reason="test",
    )


@pytest.mark.integration
async def test_the_ml_backend_serves_the_champion_to_label_studio(
    harness: Harness, js: JetStreamContext
) -> None:
    ((data, _),) = demo_frames(1)
    sample = stored_sample(harness.store, data)
    promotion = promoted_model(harness.store, harness.tmp_path)
    service, bridge = await harness.start()
    assert bridge.parts.champion is not None
    installed = asyncio.Event()
    loop = asyncio.get_running_loop()

    def on_installed(_: object) -> None:
        loop.call_soon_threadsafe(installed.set)

    bridge.parts.champion.add_listener(on_installed)
    try:
        await asyncio.wait_for(bridge.parts.remote_ready.wait(), 60)  # LS checked /health, /setup
        await js.publish(MODELS_PROMOTED.subject(), promotion.model_dump_json().encode())
        await asyncio.wait_for(installed.wait(), 60)
        await publish(js, sample)
        task_id = await bridge.task_for(sample.frame_sha256)
        async with aiohttp.ClientSession() as http:
            async with http.get(bridge.parts.url + "/health") as response:
                health = await response.json()
            async with http.post(bridge.parts.url + "/setup", json={"project": "1.1"}) as response:
                setup = await response.json()
            task = {
                "id": task_id,
                "data": {
                    "frame_sha256": sample.frame_sha256,
                    "frame_key": sample.frame_key,
                    "bin_id": "bin-a",
                },
            }
            stranger = {"id": 999, "data": {"image": "http://elsewhere/x.jpg"}}
            # Asking for the frame's label again after a taxonomy change: no champion guess.
            again = {"id": 1000, "data": {**task["data"], "relabel_for": "bins-7"}}
            async with http.post(
                bridge.parts.url + "/predict", json={"tasks": [task, stranger, again]}
            ) as response:
                assert response.status == 200
                predicted = await response.json()
            async with http.post(bridge.parts.url + "/predict", json={"nope": 1}) as response:
                assert response.status == 400

        def backends() -> list[Any]:
            client = sdk(harness.label_studio)
            listed: list[Any] = list(client.projects.list(title=harness.project))
            (project,) = [p for p in listed if p.title == harness.project]
            return list(client.ml.list(project=project.id))

        (connected,) = await asyncio.to_thread(backends)
    finally:
        await service.stop()

    assert health == {"status": "UP", "model_version": "tiny-cnn:v1"}
    assert setup == {"model_version": "tiny-cnn:v1"}
    mine, theirs, relabel = predicted["results"]
    (region,) = mine["result"]
    assert (region["from_name"], region["to_name"]) == (FROM_NAME, TO_NAME)
    assert region["value"]["choices"][0] in TAXONOMY.labels
    assert 1 / len(TAXONOMY.labels) <= mine["score"] <= 1
    assert mine["model_version"] == "tiny-cnn:v1"
    assert theirs == {"result": [], "score": 0.0, "model_version": "tiny-cnn:v1"}
    assert relabel == theirs
    assert connected.url == bridge.parts.url
    assert connected.title == "binloop champion"
