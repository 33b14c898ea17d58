"""Tasks lost with their Label Studio project: which samples the bridge noted as imported, and
which of them get a task again in the project that replaces it (once, with the pre-annotation
of their first import), without a server. The real server is in test_label_studio.py."""

from __future__ import annotations

import asyncio
import itertools
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from binloop.errors import PermanentError
from binloop.storage import LocalBlobStore, frame_key, sha256_hex
from schemas.events import ClassScore, SampleSelected
from schemas.routes import Route
from schemas.taxonomy import Taxonomy
from services.labeling_bridge.backends import LabelStudioBackend
from services.labeling_bridge.client import ProjectRef
from services.labeling_bridge.core import LabelingBridge
from services.labeling_bridge.imports import (
    ImportLog,
    ImportRecord,
    Restore,
    restore_action,
    restore_task,
)
from services.labeling_bridge.intake import parse_tasks
from services.labeling_bridge.label_studio import FROM_NAME, TO_NAME
from services.labeling_bridge.link import LabelStudioLink
from services.labeling_bridge.records import LabelRecord, save_label
from services.labeling_bridge.snapshots import DatasetBook

DEMO = Path(__file__).resolve().parent.parent / "data" / "demo"
TAXONOMY = Taxonomy()
CAPTURED_AT = datetime(2025, 3, 14, 9, 26, 53, tzinfo=UTC)
URL = "http://label-studio:8080"
CREATED = datetime(2025, 3, 14, 8, 0, tzinfo=UTC)
OLD = ProjectRef(URL, 1, CREATED)


def frames(count: int) -> list[bytes]:
    paths = sorted((DEMO / "stream").glob("*/*.jpg"))[:count]
    return [path.read_bytes() for path in paths]


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
            ClassScore(label=predicted, probability=0.41),
            ClassScore(label="paper", probability=0.26),
        ],
        model_name="mobilenet",
        model_version=3,
    )
    store.put(sample.frame_key, data, "image/jpeg")
    return sample


class _LabelStudio:
    """Projects of tasks, one of them current: what making a task asks, nothing else."""

    def __init__(self) -> None:
        self.current = OLD
        self.tasks: dict[ProjectRef, dict[int, dict[str, Any]]] = {OLD: {}}
        self._ids = itertools.count(1)
        self.refusing = False

    def project(self) -> ProjectRef:
        return self.current

    def lose_project(self) -> None:
        """Label Studio's database lost: the project is made again, with the same id."""
        self.current = ProjectRef(URL, OLD.id, CREATED + timedelta(hours=len(self.tasks)))
        self.tasks[self.current] = {}

    def find_task(self, frame_sha256: str, relabel_for: str | None = None) -> int | None:
        for task_id, task in self.tasks[self.current].items():
            if task["data"]["frame_sha256"] == frame_sha256:
                return task_id
        return None

    def import_task(self, task: dict[str, Any]) -> int:
        if self.refusing:
            raise PermanentError("Label Studio import_task: HTTP 400: {'data': 'bad'}")
        task_id = next(self._ids)
        self.tasks[self.current][task_id] = task
        return task_id

    def ensure_prediction(self, task_id: int, prediction: dict[str, Any]) -> bool:
        return False


class _Setup:
    def __init__(self, store: LocalBlobStore, label_studio: _LabelStudio | None = None) -> None:
        """A bridge as a (re)started process builds it; the store and the server outlive it."""
        self.store = store
        self.label_studio = label_studio or _LabelStudio()
        self.imports = ImportLog(store, "binloop")
        self.backend = LabelStudioBackend(
            self.label_studio,  # type: ignore[arg-type]
            lambda ref: f"http://bridge/frames/{ref.key}",
            TAXONOMY.version,
            imports=self.imports,
        )
        book = DatasetBook(store, "binloop", TAXONOMY, snapshot_every=1000)
        self.bridge = LabelingBridge(store, self.backend, book, TAXONOMY, "labeling-bridge")

    def restore_all(self) -> dict[str, Restore]:
        project = self.label_studio.project()
        return {
            sha: restore_task(self.bridge, self.backend, self.imports, sha, project).action
            for sha in self.imports.frames()
        }


def label(store: LocalBlobStore, sample: SampleSelected, material: str = "glass") -> None:
    save_label(
        store,
        LabelRecord(
            dataset="binloop",
            frame_sha256=sample.frame_sha256,
            bin_id=sample.bin_id,
            frame=store.put(sample.frame_key, store.get(sample.frame_key)),
            label=material,
            compartment=TAXONOMY.compartment_for(material),
            backend="label-studio",
            annotator="someone",
            annotation_id="label-studio:1:1",
            taxonomy_version=TAXONOMY.version,
            labeled_at=CAPTURED_AT,
        ),
    )


def record(project: ProjectRef, sample: SampleSelected) -> ImportRecord:
    return ImportRecord(
        label_studio_url=project.label_studio_url,
        project_id=project.id,
        project_created_at=project.created_at,
        task_id=1,
        sample=sample,
    )


def test_what_a_record_asks_for_in_the_project_the_bridge_works_in(
    blob_store: LocalBlobStore,
) -> None:
    sample = stored_sample(blob_store, frames(1)[0])
    same_id_made_again = ProjectRef(URL, OLD.id, CREATED + timedelta(hours=1))
    another_server = ProjectRef("http://elsewhere:8080", OLD.id, CREATED)
    in_old = record(OLD, sample)
    assert restore_action(in_old, OLD, labeled=False) is Restore.KEEP
    assert restore_action(in_old, ProjectRef(URL, 2, CREATED), labeled=False) is Restore.IMPORT
    assert restore_action(in_old, same_id_made_again, labeled=False) is Restore.IMPORT
    assert restore_action(in_old, another_server, labeled=False) is Restore.IMPORT
    # Labeled: done, wherever its task was; an unreadable record is left alone.
    assert restore_action(in_old, same_id_made_again, labeled=True) is Restore.FORGET
    assert restore_action(None, same_id_made_again, labeled=True) is Restore.FORGET
    assert restore_action(None, same_id_made_again, labeled=False) is Restore.KEEP


def test_unlabeled_samples_get_their_task_again_once_with_their_first_prediction(
    blob_store: LocalBlobStore,
) -> None:
    first, second = frames(2)
    labeled = stored_sample(blob_store, first)
    waiting = stored_sample(blob_store, second, predicted="metal")
    setup = _Setup(blob_store)
    for sample in (labeled, waiting):
        setup.bridge.handle(sample)
    # Selected again by a newer model: it finds its task, whose pre-annotation stays.
    setup.bridge.handle(
        waiting.model_copy(update={"model_version": 4, "predicted": labeled.predicted})
    )
    label(blob_store, labeled)
    (first_task,) = [
        task
        for task in setup.label_studio.tasks[OLD].values()
        if task["data"]["frame_sha256"] == waiting.frame_sha256
    ]
    assert setup.imports.frames() == sorted([labeled.frame_sha256, waiting.frame_sha256])

    setup.label_studio.lose_project()
    assert setup.restore_all() == {
        labeled.frame_sha256: Restore.FORGET,
        waiting.frame_sha256: Restore.IMPORT,
    }
    (made_again,) = setup.label_studio.tasks[setup.label_studio.current].values()
    assert made_again == first_task
    assert made_again["predictions"][0]["model_version"] == "mobilenet:v3"
    assert setup.imports.frames() == [waiting.frame_sha256]
    noted = setup.imports.read(waiting.frame_sha256)
    assert noted is not None
    assert noted.in_project(setup.label_studio.current)

    # Again, and after a restart: the task is there, nothing is made twice.
    assert setup.restore_all() == {waiting.frame_sha256: Restore.KEEP}
    restarted = _Setup(blob_store, setup.label_studio)
    assert restarted.restore_all() == {waiting.frame_sha256: Restore.KEEP}
    assert len(setup.label_studio.tasks[setup.label_studio.current]) == 1


def test_a_task_made_before_a_restart_that_lost_its_note_is_found_not_made_twice(
    blob_store: LocalBlobStore,
) -> None:
    (data,) = frames(1)
    sample = stored_sample(blob_store, data)
    setup = _Setup(blob_store)
    setup.bridge.handle(sample)
    setup.label_studio.lose_project()
    new_project = setup.label_studio.current
    # The bridge made the task in the new project and stopped before noting it.
    setup.backend.imports = None
    task_id = setup.backend.make_task(sample, setup.bridge.frame_ref(sample))
    restarted = _Setup(blob_store, setup.label_studio)
    assert restarted.restore_all() == {sample.frame_sha256: Restore.IMPORT}
    assert list(setup.label_studio.tasks[new_project]) == [task_id]
    noted = restarted.imports.read(sample.frame_sha256)
    assert noted is not None
    assert (noted.task_id, noted.in_project(new_project)) == (task_id, True)


def test_records_that_cannot_be_acted_on_stop_nothing_else(
    blob_store: LocalBlobStore, caplog: pytest.LogCaptureFixture
) -> None:
    gone, refused, corrupt, fine = (stored_sample(blob_store, data) for data in frames(4))
    setup = _Setup(blob_store)
    for sample in (gone, refused, corrupt, fine):
        setup.bridge.handle(sample)
    blob_store.delete(gone.frame_key)
    blob_store.put(setup.imports.key(corrupt.frame_sha256), b'{"project_id": ')
    setup.label_studio.lose_project()
    project = setup.label_studio.current

    setup.label_studio.refusing = True
    assert (
        restore_task(setup.bridge, setup.backend, setup.imports, refused.frame_sha256, project)
    ).task_id is None
    setup.label_studio.refusing = False
    assert setup.restore_all() == {
        gone.frame_sha256: Restore.FORGET,  # nobody can label it any more
        refused.frame_sha256: Restore.IMPORT,  # tried again, and made this time
        corrupt.frame_sha256: Restore.KEEP,  # left for someone to look at
        fine.frame_sha256: Restore.IMPORT,
    }
    made = {task["data"]["frame_sha256"] for task in setup.label_studio.tasks[project].values()}
    assert made == {refused.frame_sha256, fine.frame_sha256}
    assert f"cannot make the task of frame {gone.frame_sha256} again" in caplog.text
    assert f"refused the task of frame {refused.frame_sha256}" in caplog.text
    assert f"{setup.imports.key(corrupt.frame_sha256)} is unreadable" in caplog.text
    assert gone.frame_sha256 not in setup.imports.frames()

    # A corrupt record is overwritten when its frame is selected again, and dropped once the
    # frame is labeled.
    setup.bridge.handle(corrupt)
    assert setup.imports.read(corrupt.frame_sha256) is not None
    label(blob_store, corrupt)
    blob_store.put(setup.imports.key(corrupt.frame_sha256), b"garbage")
    assert setup.restore_all()[corrupt.frame_sha256] is Restore.FORGET
    assert corrupt.frame_sha256 not in setup.imports.frames()


class _Publisher:
    async def publish(self, route: Route, event: Any, bin_id: str | None = None) -> None:
        pass


async def test_a_label_taken_from_label_studio_drops_the_frames_import_record(
    blob_store: LocalBlobStore,
) -> None:
    (data,) = frames(1)
    sample = stored_sample(blob_store, data)
    setup = _Setup(blob_store)
    setup.bridge.handle(sample)
    link = LabelStudioLink(
        setup.bridge,
        setup.label_studio,  # type: ignore[arg-type]
        _Publisher(),  # type: ignore[arg-type]
        asyncio.Lock(),
        overlap_s=0,
        imports=setup.imports,
    )
    task = {
        "id": 1,
        "updated_at": CAPTURED_AT.isoformat(),
        "data": {
            "frame_sha256": sample.frame_sha256,
            "frame_key": sample.frame_key,
            "bin_id": "bin-a",
        },
        "annotations": [
            {
                "id": 10,
                "updated_at": CAPTURED_AT.isoformat(),
                "result": [
                    {
                        "from_name": FROM_NAME,
                        "to_name": TO_NAME,
                        "type": "choices",
                        "value": {"choices": ["glass"]},
                    }
                ],
            }
        ],
    }
    (annotation,) = parse_tasks(1, [task]).found
    taken = await link.take(annotation, "webhook")
    assert taken.published
    assert setup.imports.frames() == []
