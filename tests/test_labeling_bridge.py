"""The labeling bridge: Label Studio export format, the oracle, label records, dataset snapshots
(counts, versions, contents, restarts), and the service against a real nats-server."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import shutil
import uuid
import xml.etree.ElementTree as ET
from collections import Counter
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from typing import Any
from unittest import mock

import httpx
import pytest
from aiohttp import web
from aiohttp.streams import StreamReader
from aiohttp.test_utils import make_mocked_request
from label_studio_sdk.core.api_error import ApiError
from label_studio_sdk.core.pagination import SyncPager
from nats.aio.client import Client
from nats.errors import NoServersError
from nats.js.client import JetStreamContext
from nats.js.errors import NoStreamResponseError
from prometheus_client import REGISTRY
from pydantic import ValidationError

from binloop.bus.publish import PublishTimeoutError
from binloop.datasets import DatasetManifest, import_image_folder, split_for
from binloop.errors import (
    ChecksumMismatchError,
    NotReadyError,
    PermanentError,
    StoreUnavailableError,
    TransientError,
)
from binloop.ml.decisions import ModelUpdate
from binloop.natsserver import NatsServer
from binloop.storage import (
    LocalBlobStore,
    frame_key,
    label_key,
    model_key,
    reconcile_cursor_key,
    sha256_hex,
)
from binloop.storage.blobstore import read_verified
from schemas.base import BlobRef
from schemas.events import (
    ClassScore,
    DatasetSnapshot,
    DeadLetter,
    LabelAnnotated,
    ModelMetrics,
    ModelPromoted,
    ModelRolledBack,
    SampleSelected,
)
from schemas.routes import (
    DATASETS_SNAPSHOT,
    LABELS_ANNOTATED,
    MODELS_PROMOTED,
    MODELS_ROLLED_BACK,
    SAMPLES_SELECTED,
    Route,
    dlq_subject,
)
from schemas.taxonomy import Taxonomy
from services.edge_inferencer.models import (
    ModelCache,
)
from services.labeling_bridge import LabelingBridgeSettings, create_app
from services.labeling_bridge.app import LabelStudioParts
from services.labeling_bridge.backends import (
    LabelStudioBackend,
    LabelStudioExportBackend,
    OracleBackend,
)
from services.labeling_bridge.client import (
    LabelStudioClient,
    ProjectCounts,
    ProjectRef,
    ProjectSpec,
)
from services.labeling_bridge.core import LabelingBridge, snapshot_event_id
from services.labeling_bridge.cursor import SavedCursor
from services.labeling_bridge.intake import parse_tasks, parse_webhook
from services.labeling_bridge.label_studio import FROM_NAME, TO_NAME
from services.labeling_bridge.link import LabelStudioLink, ReconcilePass
from services.labeling_bridge.ml_backend import Champion
from services.labeling_bridge.records import LabelRecord, load_labels
from services.labeling_bridge.snapshots import DatasetBook
from services.labeling_bridge.web import (
    MAX_PREDICT_TASKS,
    SECRET_HEADER,
    WEBHOOK_PATH,
    FrameSigner,
    WebParts,
    make_web_app,
)
from tests.helpers import Collector

DEMO = Path(__file__).resolve().parent.parent / "data" / "demo"
TAXONOMY = Taxonomy()
CAPTURED_AT = datetime(2025, 3, 14, 9, 26, 53, tzinfo=UTC)


class TickingClock:
    """Label times one second apart, so "oldest first" is well defined in the tests."""

    def __init__(self) -> None:
        self.now = datetime(2025, 3, 14, 12, 0, tzinfo=UTC)

    def __call__(self) -> datetime:
        self.now += timedelta(seconds=1)
        return self.now


def demo_frames(count: int) -> list[tuple[bytes, str]]:
    """(JPEG bytes, true label) of real stream images, classes interleaved."""
    by_class = [sorted((DEMO / "stream" / label).glob("*.jpg")) for label in TAXONOMY.labels]
    frames = []
    for i in range(count):
        path = by_class[i % len(by_class)][i // len(by_class)]
        frames.append((path.read_bytes(), path.parent.name))
    return frames


def make_sample(
    data: bytes, ground_truth: str | None, *, bin_id: str = "bin-a", predicted: str = "plastic"
) -> SampleSelected:
    sha = sha256_hex(data)
    return SampleSelected(
        producer="sampler",
        bin_id=bin_id,
        frame_sha256=sha,
        frame_key=frame_key(bin_id, CAPTURED_AT, sha),
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
        ground_truth=ground_truth,
    )


def store_frame(store: LocalBlobStore, sample: SampleSelected, data: bytes) -> BlobRef:
    return store.put(sample.frame_key, data, "image/jpeg")


def seed_version_one(store: LocalBlobStore, tmp_path: Path, per_class: int = 1) -> DatasetManifest:
    """What the demo does before the loop starts: an ImageFolder import as version 1."""
    folder = tmp_path / "seed"
    for label in TAXONOMY.labels:
        (folder / label).mkdir(parents=True)
        for path in sorted((DEMO / "seed" / label).glob("*.jpg"))[:per_class]:
            shutil.copy(path, folder / label / path.name)
    manifest, _ = import_image_folder(
        store, folder, "binloop", taxonomy_version=TAXONOMY.version, classes=TAXONOMY.labels
    )
    return manifest


def make_bridge(
    store: LocalBlobStore, snapshot_every: int, clock: TickingClock | None = None
) -> LabelingBridge:
    book = DatasetBook(store, "binloop", TAXONOMY, snapshot_every, now=clock or TickingClock())
    return LabelingBridge(store, OracleBackend(), book, TAXONOMY, "labeling-bridge")


# --- Label Studio export -----------------------------------------------------------------------


def test_label_studio_export_writes_a_task_with_the_prediction_and_a_matching_config(
    tmp_path: Path, blob_store: LocalBlobStore
) -> None:
    ((data, _),) = demo_frames(1)
    sample = make_sample(data, ground_truth=None, predicted="metal")
    frame = store_frame(blob_store, sample, data)
    backend = LabelStudioExportBackend(tmp_path / "import", TAXONOMY)

    assert backend.submit(sample, frame) is None  # people label later
    assert backend.submit(sample, frame) is None  # a repeat overwrites the same task

    files = sorted(p.name for p in (tmp_path / "import").iterdir())
    assert files == sorted([f"{sample.frame_sha256}.json", "label_config.xml"])
    task = json.loads((tmp_path / "import" / f"{sample.frame_sha256}.json").read_text())
    assert task["data"]["image"] == frame.uri
    assert task["data"]["frame_sha256"] == sample.frame_sha256
    (prediction,) = task["predictions"]
    assert prediction["model_version"] == "mobilenet:v3"
    assert prediction["score"] == pytest.approx(0.41)
    (result,) = prediction["result"]
    assert result["type"] == "choices"
    assert result["value"] == {"choices": ["metal"]}

    config = ET.fromstring((tmp_path / "import" / "label_config.xml").read_text())
    image = config.find("Image")
    choices = config.find("Choices")
    assert image is not None
    assert choices is not None
    assert (result["from_name"], result["to_name"]) == (choices.get("name"), image.get("name"))
    assert (choices.get("name"), choices.get("toName")) == (FROM_NAME, TO_NAME)
    assert image.get("value") == "$image"
    assert [c.get("value") for c in choices.findall("Choice")] == TAXONOMY.labels


def test_export_backend_through_the_bridge_stores_no_label(
    tmp_path: Path, blob_store: LocalBlobStore
) -> None:
    ((data, truth),) = demo_frames(1)
    sample = make_sample(data, truth)
    store_frame(blob_store, sample, data)
    book = DatasetBook(blob_store, "binloop", TAXONOMY, 1)
    backend = LabelStudioExportBackend(tmp_path / "import", TAXONOMY)
    bridge = LabelingBridge(blob_store, backend, book, TAXONOMY, "labeling-bridge")
    outcome = bridge.handle(sample)
    assert (outcome.annotated, outcome.snapshot) == (None, None)
    assert not blob_store.exists(label_key("binloop", sample.frame_sha256))
    assert (tmp_path / "import" / f"{sample.frame_sha256}.json").is_file()


# --- oracle and frame checks ----------------------------------------------------------------


def test_oracle_labels_with_ground_truth_and_refuses_without(blob_store: LocalBlobStore) -> None:
    ((data, truth),) = demo_frames(1)
    labeled = make_sample(data, truth)
    frame = store_frame(blob_store, labeled, data)
    annotation = OracleBackend().submit(labeled, frame)
    assert annotation is not None
    assert annotation.label == truth
    with pytest.raises(PermanentError, match="oracle backend needs ground truth"):
        OracleBackend().submit(make_sample(data, None), frame)


def test_bridge_waits_for_the_frame_and_rejects_wrong_bytes_or_unknown_labels(
    blob_store: LocalBlobStore,
) -> None:
    (data, truth), (other, _) = demo_frames(2)
    bridge = make_bridge(blob_store, snapshot_every=10)
    sample = make_sample(data, truth)
    with pytest.raises(TransientError, match="not in the object store yet"):
        bridge.handle(sample)

    blob_store.put(sample.frame_key, other)  # bytes that do not hash to the sample's sha256
    with pytest.raises(ChecksumMismatchError):
        bridge.handle(sample)

    blob_store.put(sample.frame_key, data)
    with pytest.raises(PermanentError, match="not in taxonomy trashnet-6"):
        bridge.handle(make_sample(data, "styrofoam"))

    outcome = bridge.handle(sample)
    assert outcome.annotated is not None
    assert outcome.new_label
    assert outcome.annotated.label == truth
    assert outcome.annotated.compartment == TAXONOMY.compartment_for(truth)
    assert outcome.annotated.frame.sha256 == sample.frame_sha256
    record = LabelRecord.model_validate_json(
        blob_store.get(label_key("binloop", sample.frame_sha256))
    )
    assert (record.label, record.backend, record.frame.key) == (truth, "oracle", sample.frame_key)

    again = bridge.handle(sample)  # a redelivery: the same record and the same event
    assert again.annotated == outcome.annotated
    assert not again.new_label


# --- snapshots ------------------------------------------------------------------------------


def label_frames(
    bridge: LabelingBridge, store: LocalBlobStore, frames: list[tuple[bytes, str]]
) -> list[DatasetSnapshot]:
    snapshots = []
    for data, truth in frames:
        sample = make_sample(data, truth)
        store_frame(store, sample, data)
        outcome = bridge.handle(sample)
        if outcome.snapshot is not None:
            assert outcome.snapshot_written
            snapshots.append(outcome.snapshot)
    return snapshots


def test_snapshots_build_on_the_seed_version_without_duplicates(
    blob_store: LocalBlobStore, tmp_path: Path
) -> None:
    seed = seed_version_one(blob_store, tmp_path)
    frames = demo_frames(7)
    bridge = make_bridge(blob_store, snapshot_every=3)

    snapshots = label_frames(bridge, blob_store, frames)
    assert [s.version for s in snapshots] == [2, 3]
    v2 = DatasetManifest.model_validate_json(read_verified(snapshots[0].manifest))
    v3 = DatasetManifest.model_validate_json(read_verified(snapshots[1].manifest))

    shas = [sha256_hex(data) for data, _ in frames]
    assert [i.sha256 for i in v2.items] == [i.sha256 for i in seed.items] + shas[:3]
    assert [i.sha256 for i in v3.items] == [i.sha256 for i in seed.items] + shas[:6]
    assert v3.items[: len(v2.items)] == v2.items
    new_items = v3.items[len(seed.items) :]
    assert [(i.label, i.split) for i in new_items] == [
        (truth, split_for(sha)) for (_, truth), sha in zip(frames[:6], shas, strict=False)
    ]
    assert all(i.key.startswith("frames/bin-a/2025/03/14/") for i in new_items)
    assert (v3.classes, v3.taxonomy_version) == (TAXONOMY.labels, "trashnet-6")

    expected_counts = Counter(i.label for i in seed.items) + Counter(t for _, t in frames[:6])
    assert snapshots[1].class_counts == dict(sorted(expected_counts.items()))
    assert snapshots[1].num_items == len(seed.items) + 6
    assert snapshots[1].event_id == snapshot_event_id("binloop", 3)
    assert [r.frame_sha256 for r in bridge.book.pending] == [shas[6]]

    # Labeling the same frames again adds nothing and cuts no version.
    assert label_frames(bridge, blob_store, frames[:6]) == []
    assert [r.frame_sha256 for r in bridge.book.pending] == [shas[6]]


def test_first_version_is_one_when_nothing_was_imported(blob_store: LocalBlobStore) -> None:
    frames = demo_frames(2)
    (snapshot,) = label_frames(make_bridge(blob_store, snapshot_every=2), blob_store, frames)
    assert snapshot.version == 1
    manifest = DatasetManifest.model_validate_json(read_verified(snapshot.manifest))
    assert sorted(i.sha256 for i in manifest.items) == sorted(sha256_hex(d) for d, _ in frames)


def test_a_restarted_bridge_counts_what_the_last_one_left_pending(
    blob_store: LocalBlobStore, tmp_path: Path
) -> None:
    seed_version_one(blob_store, tmp_path)
    frames = demo_frames(8)
    shas = [sha256_hex(data) for data, _ in frames]
    clock = TickingClock()
    first = make_bridge(blob_store, 3, clock)
    assert [s.version for s in label_frames(first, blob_store, frames[:5])] == [2]

    restarted = make_bridge(blob_store, 3, clock)
    assert restarted.book.version == 2
    assert [r.frame_sha256 for r in restarted.book.pending] == shas[3:5]
    (snapshot,) = label_frames(restarted, blob_store, frames[5:8])
    assert snapshot.version == 3
    manifest = DatasetManifest.model_validate_json(read_verified(snapshot.manifest))
    assert [i.sha256 for i in manifest.items][-6:] == shas[:6]
    assert [r.frame_sha256 for r in restarted.book.pending] == shas[6:8]


def test_a_relabeled_frame_replaces_its_item(blob_store: LocalBlobStore) -> None:
    frames = demo_frames(2)
    bridge = make_bridge(blob_store, snapshot_every=1)
    label_frames(bridge, blob_store, frames[:1])
    data, truth = frames[0]
    relabel = "trash" if truth != "trash" else "glass"
    (snapshot,) = label_frames(bridge, blob_store, [(data, relabel)])
    manifest = DatasetManifest.model_validate_json(read_verified(snapshot.manifest))
    assert snapshot.version == 2
    assert [(i.sha256, i.label) for i in manifest.items] == [(sha256_hex(data), relabel)]


def test_a_version_written_by_someone_else_is_built_upon(
    blob_store: LocalBlobStore, tmp_path: Path
) -> None:
    frames = demo_frames(3)
    bridge = make_bridge(blob_store, snapshot_every=2)
    assert label_frames(bridge, blob_store, frames[:1]) == []
    seed = seed_version_one(blob_store, tmp_path)  # lands while the bridge runs
    (snapshot,) = label_frames(bridge, blob_store, frames[1:2])
    assert snapshot.version == 2
    manifest = DatasetManifest.model_validate_json(read_verified(snapshot.manifest))
    assert len(manifest.items) == len(seed.items) + 2


def test_a_redelivered_sample_announces_the_version_it_completed_again(
    blob_store: LocalBlobStore,
) -> None:
    frames = demo_frames(2)
    bridge = make_bridge(blob_store, snapshot_every=2)
    (written,) = label_frames(bridge, blob_store, frames)
    sample = make_sample(*frames[1])
    outcome = bridge.handle(sample, attempt=2)
    assert outcome.snapshot == written  # same event_id: JetStream drops it if it got out
    assert not outcome.snapshot_written
    assert bridge.handle(sample, attempt=1).snapshot is None


# --- against a real nats-server ---------------------------------------------------------------


class WatchedStore(LocalBlobStore):
    """Tells the test when the bridge looked for a frame that was not there yet."""

    def __init__(self, root: Path, watched_key: str) -> None:
        super().__init__(root)
        self.watched_key = watched_key
        self.missed = asyncio.Event()
        self._loop = asyncio.get_running_loop()

    def exists(self, key: str) -> bool:
        found = super().exists(key)
        if key == self.watched_key and not found:
            self._loop.call_soon_threadsafe(self.missed.set)
        return found


@pytest.mark.integration
async def test_oracle_labels_samples_snapshots_and_dead_letters_unlabeled(
    js: JetStreamContext,
    nats_client: Client,
    nats_server: NatsServer,
    blob_store: LocalBlobStore,
    tmp_path: Path,
) -> None:
    seed = seed_version_one(blob_store, tmp_path)
    frames = demo_frames(6)
    samples = [make_sample(data, truth) for data, truth in frames[:5]]
    unlabeled = make_sample(frames[5][0], None)
    late = samples[0]
    for sample, (data, _) in zip([*samples[1:], unlabeled], [*frames[1:]], strict=True):
        store_frame(blob_store, sample, data)

    settings = LabelingBridgeSettings(
        nats_url=nats_server.url,
        http_port=0,
        retry_delay_s=0.05,
        max_deliveries=20,
        blob_root=blob_store.root,
        snapshot_every=4,
    )
    store = WatchedStore(blob_store.root, late.frame_key)
    annotated = await Collector(LabelAnnotated).attach(nats_client, LABELS_ANNOTATED.subject())
    snapshots = await Collector(DatasetSnapshot).attach(nats_client, DATASETS_SNAPSHOT.subject())
    dlq = await Collector(DeadLetter).attach(nats_client, dlq_subject("labeling-bridge"))
    service = create_app(settings, store=store)
    await service.start()
    try:
        for sample in [*samples, unlabeled]:
            await js.publish(SAMPLES_SELECTED.subject(), sample.model_dump_json().encode())
        await asyncio.wait_for(store.missed.wait(), 20)
        store_frame(blob_store, late, frames[0][0])  # the uploader catches up

        labels = await annotated.wait_for(5)
        (snapshot,) = await snapshots.wait_for(1)
        (letter,) = await dlq.wait_for(1)
    finally:
        await service.stop()

    truths = {s.frame_sha256: s.ground_truth for s in samples}
    assert {a.frame_sha256: a.label for a in labels} == truths
    assert all(a.compartment == TAXONOMY.compartment_for(a.label) for a in labels)
    assert all(a.backend == "oracle" and a.taxonomy_version == "trashnet-6" for a in labels)

    assert snapshot.version == 2
    assert snapshot.num_items == len(seed.items) + 4
    manifest = DatasetManifest.model_validate_json(read_verified(snapshot.manifest))
    new_items = manifest.items[len(seed.items) :]
    assert manifest.items[: len(seed.items)] == seed.items
    assert len({i.sha256 for i in manifest.items}) == len(manifest.items)
    assert {i.sha256 for i in new_items} < set(truths)
    assert all(truths[i.sha256] == i.label for i in new_items)
    assert snapshot.class_counts == manifest.class_counts()
    assert all(snapshot.class_counts.get(c, 0) >= 1 for c in TAXONOMY.labels)

    assert letter.error_type == "PermanentError"
    assert letter.error == "oracle backend needs ground truth"
    assert unlabeled.frame_sha256 in letter.payload_preview
    assert blob_store.exists(label_key("binloop", late.frame_sha256))


# --- the saved reconciliation cursor -------------------------------------------------------


def test_saved_cursor_round_trips_and_belongs_to_one_project(tmp_path: Path) -> None:
    store = LocalBlobStore(tmp_path)
    key = reconcile_cursor_key("binloop")
    cursor = SavedCursor(store, key, "http://ls:8080/", "bins", "trashnet-6")
    assert cursor.load() is None  # nothing saved yet: the first pass lists everything
    moment = datetime(2026, 11, 22, 11, 30, 15, 123456, tzinfo=timezone(timedelta(hours=1)))
    cursor.save(moment)
    assert json.loads(store.get(key))["cursor"] == "2026-11-22T10:30:15.123456+00:00"
    assert SavedCursor(store, key, "http://ls:8080", "bins", "trashnet-6").load() == moment
    assert SavedCursor(store, key, "http://ls:8080", "other project", "trashnet-6").load() is None
    assert SavedCursor(store, key, "http://elsewhere:8080", "bins", "trashnet-6").load() is None
    # A new taxonomy may make dead-lettered annotations usable: list everything again.
    assert SavedCursor(store, key, "http://ls:8080", "bins", "trashnet-7").load() is None


SCOPE = '"label_studio_url": "http://ls:8080", "project": "bins", "taxonomy": "t"'


@pytest.mark.parametrize(
    "body",
    [
        b"not json",
        b"[]",
        b"{" + SCOPE.encode() + b"}",
        b"{" + SCOPE.encode() + b', "cursor": "yesterday"}',
        b"{" + SCOPE.encode() + b', "cursor": "2026-11-22T10:30:15"}',  # no time zone
    ],
)
def test_an_unreadable_saved_cursor_counts_as_none(tmp_path: Path, body: bytes) -> None:
    store = LocalBlobStore(tmp_path)
    key = reconcile_cursor_key("binloop")
    store.put(key, body)
    assert SavedCursor(store, key, "http://ls:8080", "bins", "t").load() is None


class _RefusingClient:
    """Label Studio answering as it would when it has the task but refuses the prediction:
    the backend's decision, not the HTTP, is what this test is about (the real server is in
    test_label_studio.py)."""

    def __init__(self) -> None:
        self.asked: list[tuple[int, dict[str, object]]] = []

    def find_task(self, frame_sha256: str) -> int | None:
        return 7

    def ensure_prediction(self, task_id: int, prediction: dict[str, object]) -> bool:
        self.asked.append((task_id, prediction))
        raise PermanentError("400: prediction result does not match the label config")


def test_a_refused_prediction_leaves_the_task_to_be_labeled(
    blob_store: LocalBlobStore, caplog: pytest.LogCaptureFixture
) -> None:
    ((data, _),) = demo_frames(1)
    sample = make_sample(data, None, predicted="metal")
    frame = store_frame(blob_store, sample, data)
    client = _RefusingClient()
    backend = LabelStudioBackend(client, lambda ref: ref.uri, TAXONOMY.version)  # type: ignore[arg-type]
    tasks: list[tuple[str, int]] = []
    backend.add_listener(lambda sha, task_id: tasks.append((sha, task_id)))

    assert backend.submit(sample, frame) is None
    assert tasks == [(sample.frame_sha256, 7)]
    ((task_id, prediction),) = client.asked
    assert task_id == 7
    assert prediction["model_version"] == "mobilenet:v3"
    assert "refused the prediction for task 7" in caplog.text


# --- Label Studio link, loop and web, without a server ---------------------------------------


class _ListingClient:
    """Label Studio listing fixed tasks: what reconciliation reads, nothing else."""

    def __init__(self, tasks: list[dict[str, Any]]) -> None:
        self.tasks = tasks

    def project_id(self) -> int:
        return 5

    def annotated_tasks(self, changed_after: datetime | None) -> list[dict[str, Any]]:
        return self.tasks

    def counts(self) -> ProjectCounts:
        return ProjectCounts(tasks=len(self.tasks), annotated=len(self.tasks))


class _RecordingPublisher:
    """Publishes nowhere. A snapshot announcement can be held until `gate` is set, or fail;
    every publish fails with `refusal` while it is set."""

    def __init__(self) -> None:
        self.published: list[tuple[str, Any]] = []
        self.failing_versions: set[int] = set()
        self.held_version: int | None = None
        self.gate = asyncio.Event()
        self.holding = asyncio.Event()
        self.refusal: Exception | None = None

    async def publish(self, route: Route, event: Any, bin_id: str | None = None) -> None:
        if self.refusal is not None:
            raise self.refusal
        if isinstance(event, DatasetSnapshot):
            if event.version == self.held_version:
                self.holding.set()
                await self.gate.wait()
            if event.version in self.failing_versions:
                raise PublishTimeoutError(f"no ack for version {event.version}")
        self.published.append((route.name, event))

    def versions(self) -> list[int]:
        return [e.version for _, e in self.published if isinstance(e, DatasetSnapshot)]


def ls_task(
    task_id: int,
    data: dict[str, Any],
    result: list[dict[str, Any]],
    updated_at: datetime | None,
) -> dict[str, Any]:
    annotation: dict[str, Any] = {"id": task_id * 10, "result": result}
    if updated_at is not None:
        annotation["updated_at"] = updated_at.isoformat()
    return {
        "id": task_id,
        "updated_at": (updated_at or CAPTURED_AT).isoformat(),
        "data": data,
        "annotations": [annotation],
    }


def material(label: str | None) -> list[dict[str, Any]]:
    choices = [label] if label else []
    return [
        {
            "from_name": FROM_NAME,
            "to_name": TO_NAME,
            "type": "choices",
            "value": {"choices": choices},
        }
    ]


def our_task_data(store: LocalBlobStore, data: bytes) -> dict[str, Any]:
    sample = make_sample(data, None)
    store_frame(store, sample, data)
    return {"frame_sha256": sample.frame_sha256, "frame_key": sample.frame_key, "bin_id": "bin-a"}


def make_link(
    store: LocalBlobStore, tasks: list[dict[str, Any]], snapshot_every: int = 100
) -> tuple[LabelStudioLink, _RecordingPublisher]:
    publisher = _RecordingPublisher()
    link = LabelStudioLink(
        make_bridge(store, snapshot_every),
        _ListingClient(tasks),  # type: ignore[arg-type]
        publisher,  # type: ignore[arg-type]
        asyncio.Lock(),
        overlap_s=3600,
    )
    return link, publisher


class _DeadLetters:
    def __init__(self) -> None:
        self.entries: list[tuple[str, str, str]] = []

    async def __call__(self, origin: str, payload: bytes, error: Exception) -> None:
        self.entries.append((origin, payload.decode(), str(error)))


async def test_reconciliation_dead_letters_each_task_it_cannot_read_once(
    blob_store: LocalBlobStore,
) -> None:
    (good, _), (other, _) = demo_frames(2)
    at = datetime(2025, 3, 14, 12, 0, tzinfo=UTC)
    tasks = [
        ls_task(1, {"image": "http://elsewhere/x.jpg"}, material("glass"), at),  # not ours
        ls_task(2, our_task_data(blob_store, other), material(None), at),  # names no material
        ls_task(3, our_task_data(blob_store, other), material("glass"), None),  # no updated_at
        ls_task(4, our_task_data(blob_store, good), material("glass"), at + timedelta(seconds=1)),
    ]
    link, publisher = make_link(blob_store, tasks)
    dead = _DeadLetters()

    first = await link.reconcile(dead)
    assert [origin for origin, _, _ in dead.entries] == ["task 1", "task 2", "task 3"]
    assert "task 1 was not imported by the bridge" in dead.entries[0][2]
    assert dead.entries[1][1] == f"label-studio:5:20 updated {at.isoformat()}"
    assert "must choose exactly one 'material'" in dead.entries[1][2]
    assert "task 3 is not readable: annotations.0.updated_at" in dead.entries[2][2]
    assert (first.listed, first.published, len(first.rejected)) == (4, 1, 3)
    assert [name for name, _ in publisher.published] == ["labels.annotated"]
    assert link.cursor == at + timedelta(seconds=1)  # past them: they are dead-lettered

    again = await link.reconcile(dead)  # listed again within the overlap: no new entries
    assert (again.listed, again.published, len(dead.entries)) == (4, 0, 3)

    # A later edit that is still bad is a new entry.
    tasks[1] = ls_task(2, tasks[1]["data"], material(None), at + timedelta(seconds=5))
    await link.reconcile(dead)
    assert [origin for origin, _, _ in dead.entries[3:]] == ["task 2"]


async def test_a_corrupt_label_record_dead_letters_the_annotation_and_the_pass_goes_on(
    blob_store: LocalBlobStore,
) -> None:
    (bad, _), (good, _) = demo_frames(2)
    at = datetime(2025, 3, 14, 12, 0, tzinfo=UTC)
    corrupt = our_task_data(blob_store, bad)
    tasks = [
        ls_task(1, corrupt, material("glass"), at),
        ls_task(2, our_task_data(blob_store, good), material("paper"), at),
    ]
    link, _ = make_link(blob_store, tasks)
    link.bridge.book.load()  # a running bridge: the record is damaged after it started
    blob_store.put(label_key("binloop", corrupt["frame_sha256"]), b'{"label": ')
    dead = _DeadLetters()
    reconciled = await link.reconcile(dead)
    ((origin, _, error),) = dead.entries
    assert origin == "task 1"
    assert f"label record of frame {corrupt['frame_sha256']} cannot be read" in error
    assert reconciled.published == 1


async def test_a_version_cut_while_another_is_announced_again_is_not_forgotten(
    blob_store: LocalBlobStore,
) -> None:
    (first, _), (second, _) = demo_frames(2)
    at = datetime(2025, 3, 14, 12, 0, tzinfo=UTC)
    link, publisher = make_link(blob_store, [], snapshot_every=1)
    labels = [
        parse_tasks(5, [ls_task(i, our_task_data(blob_store, data), material("glass"), at)]).found[
            0
        ]
        for i, data in [(1, first), (2, second)]
    ]
    publisher.failing_versions = {1}
    with pytest.raises(PublishTimeoutError):
        await link.take(labels[0], "webhook")  # version 1 is stored, its announcement failed

    # Reconciliation announces version 1 again and is held there; meanwhile a label cuts
    # version 2, whose announcement fails too.
    publisher.failing_versions, publisher.held_version = {2}, 1
    dead = _DeadLetters()
    reconciling = asyncio.create_task(link.reconcile(dead))
    await publisher.holding.wait()
    taking = asyncio.create_task(link.take(labels[1], "webhook"))
    if not link.lock.locked():  # nothing stops the label while version 1 is out: let it run
        with pytest.raises(PublishTimeoutError):
            await taking
    publisher.gate.set()
    with pytest.raises(PublishTimeoutError):
        await taking
    await reconciling
    assert publisher.versions() == [1]

    publisher.failing_versions, publisher.held_version = set(), None
    await link.reconcile(dead)  # version 2 is still waiting, and goes out now
    assert publisher.versions() == [1, 2]
    assert dead.entries == []


@pytest.mark.integration
async def test_a_version_an_annotation_cut_is_announced_at_the_next_start_until_it_went_out(
    nats_client: Client, nats_server: NatsServer, js: JetStreamContext, blob_store: LocalBlobStore
) -> None:
    """The label is stored and the version cut, but its announcement fails (NATS away) and the
    bridge stops: no sample waits in JetStream to announce it again, and reconciliation finds
    the label stored. The next start announces it; a version that went out is not announced
    again by a start."""
    (first, _), (second, _) = demo_frames(2)
    at = datetime(2025, 3, 14, 12, 0, tzinfo=UTC)
    tasks = [
        ls_task(n, our_task_data(blob_store, data), material("glass"), at + timedelta(seconds=n))
        for n, data in [(1, first), (2, second)]
    ]
    link, publisher = make_link(blob_store, tasks[:1], snapshot_every=1)
    publisher.failing_versions = {1}
    with pytest.raises(PublishTimeoutError):
        await link.take(parse_tasks(5, tasks[:1]).found[0], "webhook")

    settings = LabelingBridgeSettings(
        nats_url=nats_server.url, http_port=0, blob_root=blob_store.root, snapshot_every=1
    )
    snapshots = await Collector(DatasetSnapshot).attach(nats_client, DATASETS_SNAPSHOT.subject())
    service = create_app(settings, store=blob_store)
    await service.start()
    await service.stop()
    (announced,) = await snapshots.wait_for(1)
    assert (announced.version, announced.event_id) == (1, snapshot_event_id("binloop", 1))
    assert make_bridge(blob_store, 1).unannounced_latest() is None  # acked: the next start is quiet

    restarted, publisher = make_link(blob_store, tasks, snapshot_every=1)
    await restarted.reconcile(_DeadLetters())
    assert publisher.versions() == [2]
    assert make_bridge(blob_store, 1).unannounced_latest() is None


async def test_reconciliation_dead_letters_an_annotation_whose_frame_is_gone_and_goes_on(
    blob_store: LocalBlobStore,
) -> None:
    """A task is made only once its frame is stored: a frame missing when its annotation comes
    back was deleted since (retention, a privacy request) and never comes back, so waiting
    for it would stop every pass at that task, the cursor with it."""
    (gone, _), (kept, _) = demo_frames(2)
    at = datetime(2025, 3, 14, 12, 0, tzinfo=UTC)
    gone_data = our_task_data(blob_store, gone)
    blob_store.delete(gone_data["frame_key"])
    tasks = [
        ls_task(1, gone_data, material("glass"), at),
        ls_task(2, our_task_data(blob_store, kept), material("paper"), at + timedelta(seconds=1)),
    ]
    link, publisher = make_link(blob_store, tasks)
    dead = _DeadLetters()

    reconciled = await link.reconcile(dead)

    ((origin, _, error),) = dead.entries
    assert origin == "task 1"
    assert error == f"frame {gone_data['frame_key']} of the annotated task is gone from the store"
    assert reconciled.published == 1
    assert [name for name, _ in publisher.published] == ["labels.annotated"]
    assert link.cursor == at + timedelta(seconds=1)
    # Its webhook is refused the same way (422 and a dead letter), not asked to come back.
    with pytest.raises(PermanentError, match="gone from the store"):
        await link.take(parse_tasks(5, tasks[:1]).found[0], "webhook")


class _CountingStore(LocalBlobStore):
    def __init__(self, root: Path) -> None:
        super().__init__(root)
        self.frame_reads = 0

    def get(self, key: str) -> bytes:
        if key.startswith("frames/"):
            self.frame_reads += 1
        return super().get(key)


async def test_reconciling_annotations_already_stored_reads_no_frame(tmp_path: Path) -> None:
    """Every pass lists the tasks changed within the overlap again, and a pass without a cursor
    lists them all: their frames are read (from S3, under the bridge's lock) only for a record
    that will be written."""
    store = _CountingStore(tmp_path / "blobs")
    at = datetime(2025, 3, 14, 12, 0, tzinfo=UTC)
    tasks = [
        ls_task(n, our_task_data(store, data), material("glass"), at)
        for n, (data, _) in enumerate(demo_frames(3), 1)
    ]
    link, _ = make_link(store, tasks)
    assert (await link.reconcile(_DeadLetters())).published == 3
    assert store.frame_reads == 3
    tasks[0] = ls_task(1, tasks[0]["data"], material("paper"), at + timedelta(seconds=1))

    again = await link.reconcile(_DeadLetters())

    assert again.published == 1
    assert store.frame_reads == 4  # only the corrected one


async def test_a_label_corrected_back_to_its_first_value_is_a_new_event(
    blob_store: LocalBlobStore,
) -> None:
    """JetStream drops an event whose id it saw within its 2-minute window: glass, paper, then
    glass again must not be the first event's id, while one annotation version keeps its id
    whichever way it comes (its webhook says `...Z`, the listing may say `+00:00`)."""
    ((data, _),) = demo_frames(1)
    at = datetime(2025, 3, 14, 12, 0, tzinfo=UTC)
    task_data = our_task_data(blob_store, data)
    link, publisher = make_link(blob_store, [])
    for seconds, label in [(0, "glass"), (10, "paper"), (20, "glass")]:
        task = ls_task(1, task_data, material(label), at + timedelta(seconds=seconds))
        assert (await link.take(parse_tasks(5, [task]).found[0], "webhook")).published
    ids = [event.event_id for _, event in publisher.published]
    assert len(set(ids)) == 3

    # The webhook's label is published, then storing it fails; reconciliation publishes the
    # same annotation version again, with the same id (JetStream drops it).
    task = ls_task(1, task_data, material("trash"), at + timedelta(seconds=30))
    webhook = {
        "action": "ANNOTATION_UPDATED",
        "project": {"id": 5},
        "task": task,
        "annotation": {**task["annotations"][0], "updated_at": "2025-03-14T12:00:30.000000Z"},
    }
    annotation = parse_webhook(json.dumps(webhook).encode())
    assert annotation is not None
    failing_store = mock.patch.object(
        link.bridge, "commit", side_effect=StoreUnavailableError("minio: connection refused")
    )
    with failing_store, pytest.raises(StoreUnavailableError):
        await link.take(annotation, "webhook")
    link.client.tasks = [task]  # type: ignore[attr-defined]
    assert (await link.reconcile(_DeadLetters())).published == 1
    by_webhook, by_reconciliation = (event for _, event in publisher.published[3:])
    assert by_webhook.event_id == by_reconciliation.event_id


async def test_keep_in_step_outlives_failed_passes_and_sets_up_a_new_project(
    blob_store: LocalBlobStore, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    settings = LabelingBridgeSettings(
        backend="label-studio",
        label_studio_url="http://127.0.0.1:9",  # never asked: the client is stubbed below
        label_studio_token="token",
        webhook_secret="secret",
        blob_root=blob_store.root,
        register_ml_backend=False,
        reconcile_every_s=0.001,
    )
    parts = LabelStudioParts()
    service = create_app(settings, store=blob_store, parts=parts)
    assert parts.client is not None
    assert parts.link is not None
    assert parts.web is not None
    parts.web.port = 8090  # the URL the webhook is set up with; no server runs
    project = {"id": 1}
    webhooks_for: list[int] = []
    monkeypatch.setattr(
        parts.client, "project", lambda: ProjectRef("http://127.0.0.1:9", project["id"], None)
    )

    def ensure_webhook(url: str, headers: dict[str, str], path: str) -> int:
        webhooks_for.append(project["id"])
        return 1

    monkeypatch.setattr(parts.client, "ensure_webhook", ensure_webhook)
    try:
        LabelRecord.model_validate_json(b'{"label": ')
    except ValidationError as exc:
        corrupt_record = exc
    failures: list[Exception] = [
        PermanentError("Label Studio list_tasks: HTTP 400: {'detail': 'bad filter'}"),
        NoServersError(),  # a dead letter that could not be published
        corrupt_record,
        NotReadyError("Label Studio list_tasks: project 1 is gone"),
    ]
    passed = asyncio.Event()

    async def reconcile(dead_letter: object) -> ReconcilePass:
        if failures:
            failure = failures.pop(0)
            if isinstance(failure, NotReadyError):
                project["id"] = 2  # the next project_id() finds it made again
            raise failure
        passed.set()
        return ReconcilePass(0, 0, [])

    monkeypatch.setattr(parts.link, "reconcile", reconcile)
    (keep_in_step,) = [t for t in service.background if t.__name__ == "keep_in_step"]
    running = asyncio.ensure_future(keep_in_step())
    try:
        await asyncio.wait_for(passed.wait(), 30)
        assert not running.done()
    finally:
        running.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await running
        parts.client.close()

    assert webhooks_for == [1, 2]  # the new project got its webhook
    assert parts.remote_ready.is_set()
    assert parts.relabels_asked.is_set()
    assert caplog.text.count("reconciliation pass failed") == 3


def _unreachable_client() -> LabelStudioClient:
    return LabelStudioClient("http://127.0.0.1:9", "token", ProjectSpec("p", "<View/>", "d"), 1)


def test_the_reconciliation_cursor_is_sent_in_utc(monkeypatch: pytest.MonkeyPatch) -> None:
    client = _unreachable_client()
    queries: list[str] = []

    def listed(**kwargs: Any) -> SyncPager[Any, Any]:
        queries.append(kwargs["query"])
        return SyncPager(has_next=False, items=[], get_next=None, response=None)

    monkeypatch.setattr(client, "project_id", lambda: 3)
    monkeypatch.setattr(client.sdk.tasks, "list", listed)
    cursor = datetime(2025, 3, 14, 13, 0, 1, 500, tzinfo=timezone(timedelta(hours=1)))
    assert client.annotated_tasks(cursor) == []
    client.close()
    (query,) = queries
    values = [item["value"] for item in json.loads(query)["filters"]["items"]]
    assert values[-1] == "2025-03-14T12:00:01.000500Z"


def test_a_404_for_a_deleted_project_forgets_it_and_waits(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    client = _unreachable_client()
    made = iter([ProjectRef(client.url, 3, None), ProjectRef(client.url, 4, None)])
    monkeypatch.setattr(client, "_ensure_project", lambda: next(made))
    project_exists = {"answer": True}

    def tasks_list(**kwargs: Any) -> list[Any]:
        raise ApiError(status_code=404, body={"detail": "Not found."})

    def project_get(id: int) -> object:
        if not project_exists["answer"]:
            raise ApiError(status_code=404, body={"detail": "Not found."})
        return object()

    monkeypatch.setattr(client.sdk.tasks, "list", tasks_list)
    monkeypatch.setattr(client.sdk.projects, "get", project_get)
    try:
        # The project is there: a 404 about something else is Label Studio's last word.
        with pytest.raises(PermanentError, match="HTTP 404"):
            client.find_task("0" * 64)
        assert client.project_id() == 3
        project_exists["answer"] = False
        with pytest.raises(NotReadyError, match="project 3 is gone"):
            client.find_task("0" * 64)
        assert client.project_id() == 4  # found again, or made
    finally:
        client.close()


def _redirect_loop(request: httpx.Request) -> httpx.Response:
    return httpx.Response(302, headers={"Location": str(request.url)})


def _undecodable(request: httpx.Request) -> httpx.Response:
    return httpx.Response(200, headers={"Content-Encoding": "gzip"}, content=b"not gzip")


@pytest.mark.parametrize("answer", [_redirect_loop, _undecodable])
def test_a_label_studio_answering_nothing_usable_makes_samples_wait(
    monkeypatch: pytest.MonkeyPatch, answer: Any
) -> None:
    """A proxy in front of Label Studio redirecting in a loop (http <-> https), or a body that
    does not decode: no HTTP status to judge, so Label Studio counts as away (samples wait,
    the reconciliation task lives on) rather than failing with an error nobody handles."""
    client = _unreachable_client()
    monkeypatch.setattr(client._http, "_transport", httpx.MockTransport(answer))
    try:
        with pytest.raises(NotReadyError, match="Label Studio ensure_project: "):
            client.project()
    finally:
        client.close()


class _StubChampion:
    model_version = "tiny-cnn:v1"

    def __init__(self, error: Exception | None = None) -> None:
        self.error = error
        self.asked: list[int] = []

    def predict(self, store: object, tasks: list[dict[str, Any]]) -> list[dict[str, Any]]:
        self.asked.append(len(tasks))
        if self.error is not None:
            raise self.error
        return [{"result": [], "score": 0.0, "model_version": self.model_version} for _ in tasks]


async def post_json(
    app: web.Application, path: str, body: object, headers: dict[str, str] | None = None
) -> tuple[int, Any]:
    """The app's answer to a POST, without a server or a socket."""
    payload = StreamReader(mock.Mock(_reading_paused=False), 2**16, loop=asyncio.get_running_loop())
    payload.feed_data(json.dumps(body).encode())
    payload.feed_eof()
    request = make_mocked_request(
        "POST",
        path,
        headers={"Content-Type": "application/json", **(headers or {})},
        app=app,
        payload=payload,
    )
    match = await app.router.resolve(request)
    response = await match.handler(request)
    assert isinstance(response, web.Response)
    assert response.text is not None
    return response.status, json.loads(response.text)


def predict_app(store: LocalBlobStore, champion: _StubChampion | Champion) -> web.Application:
    parts = WebParts(
        "secret",
        None,  # type: ignore[arg-type]  # /predict does not take annotations
        store,
        FrameSigner("secret", lambda: "http://bridge"),
        champion,  # type: ignore[arg-type]
        _DeadLetters(),
    )
    return make_web_app(parts)


async def test_predict_caps_the_tasks_per_request_and_answers_503_while_it_cannot(
    blob_store: LocalBlobStore,
) -> None:
    champion = _StubChampion()
    app = predict_app(blob_store, champion)
    task = {"id": 1, "data": {}}
    status, body = await post_json(app, "/predict", {"tasks": [task] * MAX_PREDICT_TASKS})
    assert (status, len(body["results"])) == (200, MAX_PREDICT_TASKS)
    status, body = await post_json(app, "/predict", {"tasks": [task] * (MAX_PREDICT_TASKS + 1)})
    assert status == 413
    assert (
        f"{MAX_PREDICT_TASKS + 1} tasks in one request, at most {MAX_PREDICT_TASKS}"
        in body["error"]
    )
    assert champion.asked == [MAX_PREDICT_TASKS]  # the big one was not looked at

    unavailable = StoreUnavailableError("minio: connection refused")
    status, body = await post_json(
        predict_app(blob_store, _StubChampion(unavailable)), "/predict", {"tasks": [task]}
    )
    assert (status, body["error"]) == (503, "minio: connection refused")


class _FailingReadStore(LocalBlobStore):
    """A frame that exists until the ML backend reads it: deleted just before the read (a
    retention sweep), or found damaged at rest by the read (S3 checks the recorded sha256)."""

    def __init__(self, root: Path, key: str, damage: str) -> None:
        super().__init__(root)
        self.key = key
        self.damage = damage

    def get(self, key: str) -> bytes:
        if key == self.key:
            if self.damage == "damaged":
                raise ChecksumMismatchError(self.uri(key), "a" * 64, "b" * 64)
            self.delete(key)
        return super().get(key)


def tiny_champion(store: LocalBlobStore, tmp_path: Path) -> Champion:
    """A champion serving a small random model of the taxonomy, stored in `store`."""
    # Imported here: torch takes seconds to import and only the tests that predict need it.
    from tests.modelfactory import make_onnx_model

    onnx_path, card_path = make_onnx_model(tmp_path / "tiny", TAXONOMY.labels)
    artifact = store.put(model_key("tiny-cnn", 1, "model.onnx"), onnx_path.read_bytes())
    card = store.put(model_key("tiny-cnn", 1, "card.json"), card_path.read_bytes())
    champion = Champion(ModelCache(tmp_path / "models"))
    update = ModelUpdate("tiny-cnn", 1, datetime.now(UTC), artifact_sha256=artifact.sha256)
    assert champion.install(update, artifact, card) is None
    return champion


@pytest.mark.parametrize("damage", ["deleted", "damaged"])
async def test_predict_answers_a_frame_lost_while_it_reads_with_an_empty_prediction(
    tmp_path: Path, damage: str
) -> None:
    frames = demo_frames(2)
    samples = [make_sample(data, None) for data, _ in frames]
    store = _FailingReadStore(tmp_path / "blobs", samples[1].frame_key, damage)
    for sample, (data, _) in zip(samples, frames, strict=True):
        store_frame(store, sample, data)
    champion = tiny_champion(store, tmp_path)
    tasks = [
        {
            "id": n,
            "data": {"frame_sha256": s.frame_sha256, "frame_key": s.frame_key, "bin_id": "bin-a"},
        }
        for n, s in enumerate(samples)
    ]

    status, body = await post_json(predict_app(store, champion), "/predict", {"tasks": tasks})

    assert status == 200
    kept, lost = body["results"]
    assert kept["result"][0]["value"]["choices"][0] in TAXONOMY.labels
    assert lost == {"result": [], "score": 0.0, "model_version": "tiny-cnn:v1"}


async def test_predict_gives_a_task_naming_a_key_the_store_refuses_an_empty_prediction(
    blob_store: LocalBlobStore, tmp_path: Path
) -> None:
    """A key outside the store's root here (UnknownUriError); on S3, one the bucket policy
    denies: a PermanentError for that task, not a 500 for the whole batch."""
    ((data, _),) = demo_frames(1)
    ours = our_task_data(blob_store, data)
    refused = {**ours, "frame_key": "../elsewhere/frame.jpg"}
    app = predict_app(blob_store, tiny_champion(blob_store, tmp_path))

    status, body = await post_json(
        app, "/predict", {"tasks": [{"id": 1, "data": ours}, {"id": 2, "data": refused}]}
    )

    assert status == 200
    kept, lost = body["results"]
    assert kept["result"][0]["value"]["choices"][0] in TAXONOMY.labels
    assert lost == {"result": [], "score": 0.0, "model_version": "tiny-cnn:v1"}


def _webhooks(outcome: str) -> float:
    value = REGISTRY.get_sample_value("binloop_label_studio_webhooks_total", {"outcome": outcome})
    return value or 0.0


class _RefusedDeadLetters(_DeadLetters):
    async def __call__(self, origin: str, payload: bytes, error: Exception) -> None:
        raise NoStreamResponseError()


@pytest.mark.parametrize("material_chosen", ["glass", None])
async def test_a_webhook_that_nats_refuses_now_answers_503_and_is_counted(
    blob_store: LocalBlobStore, material_chosen: str | None
) -> None:
    """A publish (a label, or the dead letter of an annotation naming no material) that NATS
    refuses with its own error, not a TransientError (no stream: JetStream's store was
    reset): the documented 503 (reconciliation brings the label later), not a 500."""
    ((data, _),) = demo_frames(1)
    at = datetime(2025, 3, 14, 12, 0, tzinfo=UTC)
    task = ls_task(1, our_task_data(blob_store, data), material(material_chosen), at)
    link, publisher = make_link(blob_store, [task])
    publisher.refusal = NoStreamResponseError()
    signer = FrameSigner("secret", lambda: "http://bridge")
    parts = WebParts(
        "secret",
        link,
        blob_store,
        signer,
        _StubChampion(),  # type: ignore[arg-type]
        _RefusedDeadLetters(),
    )
    body = {
        "action": "ANNOTATION_CREATED",
        "project": {"id": 5},
        "task": task,
        "annotation": task["annotations"][0],
    }
    failed = _webhooks("failed")

    status, answer = await post_json(
        make_web_app(parts), WEBHOOK_PATH, body, {SECRET_HEADER: "secret"}
    )

    assert (status, answer) == (503, {"error": "nats: no response from stream"})
    assert _webhooks("failed") == failed + 1
    assert not blob_store.exists(label_key("binloop", task["data"]["frame_sha256"]))


@pytest.mark.integration
async def test_the_ml_backend_keeps_the_rollback_that_overtook_the_promotion_it_undid(
    js: JetStreamContext, nats_server: NatsServer, blob_store: LocalBlobStore, tmp_path: Path
) -> None:
    """The registry made v2 champion over v1 (replacing champion revision 1); an operator
    rolled back to v1 (replacing revision 2) before the registry published that promotion,
    whose clock runs ahead of the operator's. The bridge, serving v1, gets the rollback
    first and the overtaken promotion after it, and must stay on v1."""
    # Imported here: torch takes seconds to import and only these tests need it.
    from tests.modelfactory import make_onnx_model

    refs: dict[int, tuple[BlobRef, BlobRef]] = {}
    for version in (1, 2):
        onnx_path, card_path = make_onnx_model(
            tmp_path / f"v{version}", TAXONOMY.labels, version=version, seed=version
        )
        refs[version] = (
            blob_store.put(model_key("tiny-cnn", version, "model.onnx"), onnx_path.read_bytes()),
            blob_store.put(model_key("tiny-cnn", version, "card.json"), card_path.read_bytes()),
        )
    metrics = ModelMetrics(
        eval_set_id="c" * 64,
        eval_items=1,
        accuracy=0.5,
        macro_f1=0.5,
        compartment_accuracy=0.5,
        per_class_f1={},
    )
    promoted_v1 = ModelPromoted(
        producer="model-registry",
        model_name="tiny-cnn",
        model_version=1,
        previous_version=None,
        artifact=refs[1][0],
        card=refs[1][1],
        metrics=metrics,
        reason="first",
        champion_revision=0,
    )
    rollback = ModelRolledBack(
        producer="binloop-cli",
        model_name="tiny-cnn",
        from_version=2,
        to_version=1,
        artifact=refs[1][0],
        card=refs[1][1],
        reason="regression",
        champion_revision=2,
    )
    overtaken = promoted_v1.model_copy(
        update={
            "event_id": uuid.uuid4(),
            "model_version": 2,
            "previous_version": 1,
            "artifact": refs[2][0],
            "card": refs[2][1],
            "reason": "better",
            "champion_revision": 1,
            "occurred_at": rollback.occurred_at + timedelta(seconds=5),
        }
    )
    settings = LabelingBridgeSettings(
        backend="label-studio",
        label_studio_url="http://127.0.0.1:9",  # never reached: reconciliation just fails
        label_studio_token="token",
        webhook_secret="secret",
        register_ml_backend=False,
        reconcile_every_s=3600,
        web_host="127.0.0.1",
        web_port=0,
        model_cache=tmp_path / "models",
        blob_root=blob_store.root,
        nats_url=nats_server.url,
        http_port=0,
        retry_delay_s=0.05,
    )
    parts = LabelStudioParts()
    service = create_app(settings, store=blob_store, parts=parts)
    champion = parts.champion
    assert champion is not None
    loop = asyncio.get_running_loop()
    handled: asyncio.Queue[tuple[int, bool]] = asyncio.Queue()
    install = champion.install

    def watched_install(update: ModelUpdate, artifact: BlobRef, card: BlobRef) -> str | None:
        try:
            return install(update, artifact, card)
        finally:
            loop.call_soon_threadsafe(handled.put_nowait, (update.version, update.rollback))

    champion.install = watched_install  # type: ignore[method-assign]
    await service.start()
    try:
        for route, event, expected in [
            (MODELS_PROMOTED, promoted_v1, (1, False)),
            (MODELS_ROLLED_BACK, rollback, (1, True)),
            (MODELS_PROMOTED, overtaken, (2, False)),
        ]:
            await js.publish(route.subject(), event.model_dump_json().encode())
            # One at a time, so they are handled in the raced order.
            assert await asyncio.wait_for(handled.get(), 30) == expected
    finally:
        await service.stop()

    assert champion.model_version == "tiny-cnn:v1"


def test_an_unreadable_label_record_is_left_out_not_fatal(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    store = LocalBlobStore(tmp_path / "blobs")
    store.put(label_key("binloop", "a" * 64), b"{not json", "application/json")
    with caplog.at_level(logging.ERROR):
        assert load_labels(store, "binloop") == []
    assert "unreadable and left out" in caplog.text


@pytest.mark.parametrize(
    "values",
    [
        {"objects": ["bottle", "tetra-pak"]},
        {"conditions": ["Soiled"]},
        {
            "taxonomy": Taxonomy(
                version="bins-2", label_to_compartment={"paper-cardboard": "paper_cardboard"}
            )
        },
    ],
    ids=["object", "condition", "material"],
)
def test_choices_a_label_record_cannot_hold_are_refused_at_start(values: dict[str, Any]) -> None:
    """Annotators are offered every object, condition and material configured, and a label
    record holds only labels (`^[a-z0-9_]{1,64}$`): one chosen that it cannot hold would
    dead-letter the whole annotation, material included."""
    with pytest.raises(ValidationError, match=r"must match \^\[a-z0-9_\]\{1,64\}\$"):
        LabelingBridgeSettings(**values)


def test_frames_can_be_served_to_browsers_under_another_url_than_label_studio_uses(
    blob_store: LocalBlobStore,
) -> None:
    """Label Studio calls the webhook and the ML backend at public_url (inside the cluster);
    annotators' browsers load frames from frames_url (an Ingress exposing /frames/ only)."""
    values: dict[str, Any] = {
        "backend": "label-studio",
        "label_studio_url": "http://127.0.0.1:9",  # nothing is asked of it here
        "label_studio_token": "token",
        "webhook_secret": "secret",
        "blob_root": blob_store.root,
        "public_url": "http://labeling-bridge:8090",
    }
    frame = blob_store.put("frames/bin-a/2025/03/14/" + "c" * 64 + ".jpg", b"jpeg")
    for frames_url, base in (
        ("", "http://labeling-bridge:8090"),
        ("https://frames.binloop.example/", "https://frames.binloop.example"),
    ):
        parts = LabelStudioParts()
        create_app(
            LabelingBridgeSettings(**values, frames_url=frames_url), store=blob_store, parts=parts
        )
        assert parts.signer is not None
        assert parts.signer.url(frame).startswith(f"{base}/frames/{frame.key}?sig=")
