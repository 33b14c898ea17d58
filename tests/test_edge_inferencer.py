"""The edge inferencer: probability stats and decisions (pure), model loading and swapping,
and the service against a real nats-server (results, DLQ, live swaps, waiting for a model)."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import math
import shutil
import struct
from collections import Counter
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING

import cv2
import numpy as np
import pytest
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.js.client import JetStreamContext
from prometheus_client import REGISTRY

from binloop.bus.publish import MSG_ID_HEADER
from binloop.errors import (
    ChecksumMismatchError,
    ConfigError,
    CorruptFrameError,
    MissingBlobError,
    ModelLoadError,
    NotReadyError,
    PermanentError,
    UnknownUriError,
)
from binloop.ml.decisions import ModelUpdate, update_for
from binloop.ml.phash import phash
from binloop.ml.preprocess import decode_rgb
from binloop.ml.shipped import SHIPPED_MODEL
from binloop.natsserver import NatsServer
from binloop.runtime import ServiceApp
from binloop.storage import LocalBlobStore, model_key, open_store, sha256_hex, spool_key
from schemas.base import BlobRef, Event
from schemas.events import (
    ActuationCommand,
    DeadLetter,
    FrameCaptured,
    InferenceResult,
    ModelMetrics,
    ModelPromoted,
    ModelRolledBack,
    TrainingCompleted,
)
from schemas.routes import (
    ACTUATION_COMMAND,
    FRAMES_CAPTURED,
    INFERENCE_RESULT,
    MODELS_PROMOTED,
    MODELS_ROLLED_BACK,
    TRAINING_COMPLETED,
    Route,
    dlq_subject,
)
from schemas.taxonomy import Compartment, Taxonomy
from services.edge_inferencer import EdgeInferencerSettings, ModelSlot, create_app
from services.edge_inferencer.core import (
    Decision,
    DecisionPolicy,
    ProbabilityStats,
    SpoolReader,
    build_events,
    classify,
    decide,
    probability_stats,
)
from services.edge_inferencer.models import (
    LoadedModel,
    ModelCache,
    acknowledged,
    card_path_for,
    load_model,
    update_verdict,
)
from services.model_registry import RegistrySettings
from services.model_registry import create_app as create_registry
from tests.helpers import Collector, eventually
from tests.modelfactory import make_onnx_model

if TYPE_CHECKING:
    from tests.s3fixture import MotoS3
pytest_plugins = ["tests.s3fixture"]

CLASSES = ["cardboard", "glass", "metal", "paper", "plastic", "trash"]
DEMO = Path(__file__).resolve().parents[1] / "data" / "demo" / "stream"
BIN = "bin-t"
SERVICE = "edge-inferencer"
T0 = datetime(2025, 1, 1, tzinfo=UTC)
METRICS = ModelMetrics(
    eval_set_id="a" * 64,
    eval_items=10,
    accuracy=0.5,
    macro_f1=0.5,
    compartment_accuracy=0.6,
    per_class_f1={c: 0.5 for c in CLASSES},
)


@dataclass(frozen=True)
class ModelFiles:
    onnx: Path
    card: Path


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[int, ModelFiles]:
    """Versions 1 and 2 of the same model (different weights)."""
    root = tmp_path_factory.mktemp("models")
    return {
        version: ModelFiles(
            *make_onnx_model(root / f"v{version}", CLASSES, version=version, seed=version)
        )
        for version in (1, 2)
    }


def _demo_frames(per_class: int) -> list[Path]:
    return [path for label in CLASSES for path in sorted((DEMO / label).glob("*.jpg"))[:per_class]]


# ---------------------------------------------------------------- probability stats, decisions


def test_stats_of_a_hand_made_distribution() -> None:
    probs = np.array([0.1, 0.6, 0.3], dtype=np.float32)

    stats = probability_stats(probs, ["paper", "glass", "metal"], top_k=2)

    assert stats.label == "glass"
    assert stats.confidence == pytest.approx(0.6)
    assert stats.margin == pytest.approx(0.3)
    expected_entropy = -(0.1 * math.log(0.1) + 0.6 * math.log(0.6) + 0.3 * math.log(0.3))
    assert stats.entropy == pytest.approx(expected_entropy, abs=1e-6)
    assert [label for label, _ in stats.top_k] == ["glass", "metal"]
    assert [p for _, p in stats.top_k] == pytest.approx([0.6, 0.3])


def test_stats_of_extreme_distributions() -> None:
    uniform = probability_stats(np.full(4, 0.25, dtype=np.float32), list("abcd"), top_k=3)
    assert uniform.entropy == pytest.approx(math.log(4), abs=1e-6)
    assert uniform.margin == 0.0
    assert uniform.label == "a"  # ties keep class order: deterministic across runs

    certain = probability_stats(np.array([0.0, 1.0, 0.0], dtype=np.float32), list("abc"), 5)
    assert certain.entropy == 0.0
    assert certain.margin == 1.0
    assert certain.confidence == 1.0
    assert len(certain.top_k) == 3  # top_k is capped by the number of classes


def test_stats_reject_non_finite_probabilities() -> None:
    for bad in (math.nan, math.inf):
        with pytest.raises(PermanentError, match="non-finite probabilities"):
            probability_stats(np.array([0.2, bad, 0.5], dtype=np.float32), list("abc"), 2)


def test_stats_reject_a_distribution_of_the_wrong_size() -> None:
    with pytest.raises(ValueError, match="expected 3 probabilities"):
        probability_stats(np.array([0.5, 0.5], dtype=np.float32), list("abc"), 1)


def _stats(label: str, confidence: float) -> ProbabilityStats:
    return ProbabilityStats(label, confidence, 0.1, 1.0, [(label, confidence)])


def test_low_confidence_abstains_to_the_fallback_compartment() -> None:
    taxonomy = Taxonomy()

    unsure = decide(_stats("glass", 0.49), taxonomy, threshold=0.5)
    at_threshold = decide(_stats("glass", 0.5), taxonomy, threshold=0.5)

    assert (unsure.compartment, unsure.abstained) == (Compartment.TRASH, True)
    assert (at_threshold.compartment, at_threshold.abstained) == (Compartment.GLASS, False)


@pytest.mark.parametrize(
    ("label", "compartment"),
    [
        ("metal", Compartment.PLASTIC_METAL),
        ("plastic", Compartment.PLASTIC_METAL),
        ("cardboard", Compartment.PAPER_CARDBOARD),
        ("paper", Compartment.PAPER_CARDBOARD),
        ("glass", Compartment.GLASS),
        ("trash", Compartment.TRASH),
        ("styrofoam", Compartment.TRASH),  # unknown to the taxonomy: its fallback
    ],
)
def test_confident_labels_map_through_the_taxonomy(label: str, compartment: Compartment) -> None:
    decision = decide(_stats(label, 0.9), Taxonomy(), threshold=0.5)
    assert decision == Decision(compartment, abstained=False, threshold=0.5)


def test_a_custom_taxonomy_changes_the_mapping() -> None:
    taxonomy = Taxonomy(
        version="cups-1",
        label_to_compartment={"cup": Compartment.PAPER_CARDBOARD},
        fallback=Compartment.TRASH,
    )
    assert decide(_stats("cup", 0.8), taxonomy, 0.5).compartment == Compartment.PAPER_CARDBOARD
    assert decide(_stats("cup", 0.2), taxonomy, 0.5).compartment == Compartment.TRASH


# ---------------------------------------------------------------- model updates


def _loaded(version: int, by: ModelUpdate | None, files: dict[int, ModelFiles]) -> LoadedModel:
    model = files[version]
    return load_model(model.onnx, model.card, installed_by=by)


def _input_phash(model: LoadedModel, data: bytes) -> str:
    """The hash the edge sends: of the frame resized to the model's input, not normalised."""
    return phash(model.preprocessor.resize(model.preprocessor.decode(data)))


def test_update_rules(models: dict[int, ModelFiles]) -> None:
    v2 = _loaded(2, ModelUpdate("tiny-cnn", 2, T0), models)
    later = T0 + timedelta(minutes=1)

    assert update_verdict(None, ModelUpdate("tiny-cnn", 1, T0)) is None
    assert "not newer" in str(update_verdict(v2, ModelUpdate("tiny-cnn", 1, later)))
    assert "already serving" in str(update_verdict(v2, ModelUpdate("tiny-cnn", 2, later)))
    assert update_verdict(v2, ModelUpdate("tiny-cnn", 3, later)) is None
    assert update_verdict(v2, ModelUpdate("tiny-cnn", 1, later, rollback=True)) is None
    # An event older than the one that installed v2 lost the race between the two consumers.
    assert "stale" in str(update_verdict(v2, ModelUpdate("tiny-cnn", 1, T0, rollback=True)))
    assert "stale" in str(update_verdict(v2, ModelUpdate("tiny-cnn", 3, T0)))
    # A model loaded from disk at start yields to any registry decision but older versions.
    from_disk = _loaded(2, None, models)
    assert update_verdict(from_disk, ModelUpdate("tiny-cnn", 1, T0, rollback=True)) is None
    assert update_verdict(from_disk, ModelUpdate("tiny-cnn", 1, T0)) is not None
    assert update_verdict(from_disk, ModelUpdate("other-model", 1, T0)) is None
    # Loaded from disk, the same name and version is the same model only with the same bytes:
    # the shipped v1 must give way to the registry's own first model, also called v1.
    same_bytes = ModelUpdate("tiny-cnn", 2, T0, artifact_sha256=from_disk.onnx_sha256)
    assert "already serving" in str(update_verdict(from_disk, same_bytes))
    assert (
        update_verdict(from_disk, ModelUpdate("tiny-cnn", 2, T0, artifact_sha256="0" * 64)) is None
    )
    # A model the registry installed is known by its version.
    other_bytes = ModelUpdate("tiny-cnn", 2, later, artifact_sha256="0" * 64)
    assert "already serving" in str(update_verdict(v2, other_bytes))


def _decisions_around_a_rollback_to_v1(
    v1_sha256: str | None, files: dict[int, ModelFiles]
) -> tuple[ModelUpdate, ModelUpdate]:
    """The registry promoted v2 (champion revision 5), then rolled back to v1 (revision 6)
    with the artifact `v1_sha256`; the rollback is published first."""
    overtaken = ModelUpdate(
        "tiny-cnn",
        2,
        T0,
        artifact_sha256=sha256_hex(files[2].onnx.read_bytes()),
        champion_revision=5,
    )
    rollback = ModelUpdate(
        "tiny-cnn",
        1,
        T0 + timedelta(seconds=1),
        rollback=True,
        artifact_sha256=v1_sha256,
        champion_revision=6,
    )
    return overtaken, rollback


def test_a_rollback_to_the_default_models_own_bytes_makes_the_promotion_it_overtook_stale(
    models: dict[int, ModelFiles],
) -> None:
    default = _loaded(1, None, models)  # default_model: no registry decision behind it
    overtaken, rollback = _decisions_around_a_rollback_to_v1(default.onnx_sha256, models)

    assert "already serving" in str(update_verdict(default, rollback))
    recorded = acknowledged(default, rollback)

    assert recorded is not None
    assert (recorded.installed_by, recorded.onnx_sha256) == (rollback, default.onnx_sha256)
    assert "stale" in str(update_verdict(recorded, overtaken))
    assert acknowledged(recorded, overtaken) is None
    assert acknowledged(recorded, rollback) is None  # the same decision again: nothing new
    newer = ModelUpdate("tiny-cnn", 2, T0, champion_revision=7)
    assert update_verdict(recorded, newer) is None


def test_a_rollback_to_the_default_models_version_but_other_bytes_is_installed(
    models: dict[int, ModelFiles],
) -> None:
    default = _loaded(1, None, models)
    # E.g. the shipped v1 and the registry's first trained model, also v1.
    _, other_bytes = _decisions_around_a_rollback_to_v1("0" * 64, models)
    _, unknown_bytes = _decisions_around_a_rollback_to_v1(None, models)

    assert update_verdict(default, other_bytes) is None
    assert acknowledged(default, other_bytes) is None
    # Without the artifact's hash the served bytes cannot be the registry's v1 for sure.
    assert acknowledged(default, unknown_bytes) is None
    assert acknowledged(default, ModelUpdate("other-model", 1, T0, champion_revision=6)) is None


async def test_a_default_model_slot_acknowledged_by_a_rollback_skips_the_overtaken_promotion(
    models: dict[int, ModelFiles],
) -> None:
    slot = ModelSlot("bin-unit")
    assert await slot.install(_loaded(1, None, models)) is None
    assert slot.current is not None
    overtaken, rollback = _decisions_around_a_rollback_to_v1(slot.current.onnx_sha256, models)

    assert await slot.acknowledge(rollback)
    skipped = await slot.install(_loaded(2, overtaken, models))

    assert "stale" in str(skipped)
    assert slot.served == ("tiny-cnn", 1)
    assert slot.current.installed_by == rollback


def test_a_bin_serves_the_shipped_model_unless_told_to_start_with_none(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    assert EdgeInferencerSettings().default_model == SHIPPED_MODEL
    monkeypatch.setenv("BINLOOP_DEFAULT_MODEL", "")
    assert EdgeInferencerSettings().default_model is None
    monkeypatch.setenv("BINLOOP_DEFAULT_MODEL", "/models/mine.onnx")
    assert EdgeInferencerSettings().default_model == Path("/models/mine.onnx")


async def test_slot_swaps_and_reports_what_it_serves(models: dict[int, ModelFiles]) -> None:
    slot = ModelSlot("bin-unit")
    installed: list[int] = []
    slot.add_listener(lambda model: installed.append(model.card.version))
    assert slot.served is None
    with pytest.raises(NotReadyError):
        async with slot.use():
            pass

    assert await slot.install(_loaded(1, ModelUpdate("tiny-cnn", 1, T0), models)) is None
    stale = _loaded(2, ModelUpdate("tiny-cnn", 2, T0 - timedelta(seconds=1)), models)
    assert await slot.install(stale) is not None
    assert slot.served == ("tiny-cnn", 1)
    newer = _loaded(2, ModelUpdate("tiny-cnn", 2, T0 + timedelta(seconds=1)), models)
    assert await slot.install(newer) is None

    assert slot.served == ("tiny-cnn", 2)
    assert installed == [1, 2]
    async with slot.use() as model:
        assert model.card.version == 2


def test_card_lookup_beside_the_onnx_file(tmp_path: Path) -> None:
    onnx = tmp_path / "resnet.onnx"
    onnx.write_bytes(b"")
    with pytest.raises(ConfigError, match=r"resnet\.card\.json and card\.json"):
        card_path_for(onnx)
    (tmp_path / "card.json").write_text("{}")
    assert card_path_for(onnx) == tmp_path / "card.json"
    (tmp_path / "resnet.card.json").write_text("{}")
    assert card_path_for(onnx) == tmp_path / "resnet.card.json"


def _store_model(store: LocalBlobStore, files: ModelFiles, version: int) -> tuple[BlobRef, BlobRef]:
    artifact = store.put(model_key("tiny-cnn", version, "model.onnx"), files.onnx.read_bytes())
    card = store.put(
        model_key("tiny-cnn", version, "card.json"), files.card.read_bytes(), "application/json"
    )
    return artifact, card


def test_cache_writes_the_promoted_model_and_checks_its_card(
    tmp_path: Path, blob_store: LocalBlobStore, models: dict[int, ModelFiles]
) -> None:
    cache = ModelCache(tmp_path / "cache")
    artifact, card = _store_model(blob_store, models[2], 2)

    loaded = cache.fetch(ModelUpdate("tiny-cnn", 2, T0), artifact, card)

    assert loaded.card.version == 2
    cached = tmp_path / "cache" / "tiny-cnn" / "v2"
    assert sorted(p.name for p in cached.iterdir()) == ["model.card.json", "model.onnx"]
    assert sha256_hex((cached / "model.onnx").read_bytes()) == artifact.sha256
    with pytest.raises(ModelLoadError, match="describes tiny-cnn v2, the event promised"):
        cache.fetch(ModelUpdate("tiny-cnn", 3, T0), artifact, card)
    with pytest.raises(ModelLoadError, match="not safe as a folder name"):
        cache.fetch(ModelUpdate("../escape", 2, T0), artifact, card)
    # Cached bytes that match the event are loaded from disk, without asking the store.
    unreachable = artifact.model_copy(update={"uri": "ftp://x/m"})
    assert cache.fetch(ModelUpdate("tiny-cnn", 2, T0), unreachable, card).onnx_sha256 == (
        artifact.sha256
    )
    with pytest.raises(UnknownUriError):
        ModelCache(tmp_path / "empty").fetch(ModelUpdate("tiny-cnn", 2, T0), unreachable, card)


def test_the_cache_recalls_the_model_it_served_last_only_while_its_bytes_check_out(
    tmp_path: Path, blob_store: LocalBlobStore, models: dict[int, ModelFiles]
) -> None:
    cache = ModelCache(tmp_path / "cache")
    assert cache.recall() is None  # nothing served yet
    update = ModelUpdate("tiny-cnn", 2, T0, rollback=True)
    cache.remember(cache.fetch(update, *_store_model(blob_store, models[2], 2)))

    recalled = ModelCache(tmp_path / "cache").recall()

    assert recalled is not None
    assert (recalled.card.name, recalled.card.version) == ("tiny-cnn", 2)
    assert recalled.installed_by is not None
    assert (recalled.installed_by.issued_at, recalled.installed_by.rollback) == (T0, True)
    # The record outlives the verdict: the event that installed it is stale for it.
    assert update_verdict(recalled, update) is not None
    with pytest.raises(ValueError, match="only a model installed from a registry event"):
        cache.remember(_loaded(1, None, models))
    card = tmp_path / "cache" / "tiny-cnn" / "v2" / "model.card.json"
    card.write_bytes(card.read_bytes() + b" ")
    assert cache.recall() is None
    (tmp_path / "cache" / "current.json").write_text("{not json")
    assert cache.recall() is None


def test_the_cache_recalls_the_registrys_order_and_records_written_before_the_epoch(
    tmp_path: Path, blob_store: LocalBlobStore, models: dict[int, ModelFiles]
) -> None:
    epoch = T0 - timedelta(days=1)
    artifact, card = _store_model(blob_store, models[2], 2)
    update = ModelUpdate(
        "tiny-cnn",
        2,
        T0,
        artifact_sha256=artifact.sha256,
        champion_revision=7,
        champion_epoch=epoch,
    )
    cache = ModelCache(tmp_path / "cache")
    cache.remember(cache.fetch(update, artifact, card))
    recalled = ModelCache(tmp_path / "cache").recall()
    assert recalled is not None
    assert recalled.installed_by == update
    # A decision of a later bucket is newer whatever its revision; one of the same bucket
    # is newer only with a later revision.
    newer_bucket = ModelUpdate("tiny-cnn", 3, T0, champion_revision=0, champion_epoch=T0)
    assert update_verdict(recalled, newer_bucket) is None
    same_bucket = dataclasses.replace(newer_bucket, champion_epoch=epoch)
    assert f"champion revision 0 of the bucket created {epoch.isoformat()}" in str(
        update_verdict(recalled, same_bucket)
    )

    # A bin's record from before the epoch was kept: any decision with an epoch is newer,
    # whatever its revision (a recreated bucket's too); one without compares revisions.
    current = tmp_path / "cache" / "current.json"
    record = json.loads(current.read_text())
    del record["champion_epoch"]
    current.write_text(json.dumps(record))
    recalled = ModelCache(tmp_path / "cache").recall()
    assert recalled is not None
    assert recalled.installed_by == dataclasses.replace(update, champion_epoch=None)
    assert update_verdict(recalled, newer_bucket) is None
    before_the_epoch = dataclasses.replace(newer_bucket, champion_epoch=None)
    assert "stale" in str(update_verdict(recalled, before_the_epoch))


def test_the_cache_recalls_a_default_model_a_rollback_acknowledged(
    tmp_path: Path, models: dict[int, ModelFiles]
) -> None:
    # default_model lives outside the cache: remember copies it in, so recall can check it.
    shutil.copytree(models[1].onnx.parent, tmp_path / "default")
    default = load_model(
        tmp_path / "default" / models[1].onnx.name, tmp_path / "default" / models[1].card.name
    )
    overtaken, rollback = _decisions_around_a_rollback_to_v1(default.onnx_sha256, models)
    recorded = acknowledged(default, rollback)
    assert recorded is not None
    cache = ModelCache(tmp_path / "cache")

    cache.remember(recorded)
    recalled = ModelCache(tmp_path / "cache").recall()

    assert recalled is not None
    assert (recalled.card.name, recalled.card.version) == ("tiny-cnn", 1)
    assert (recalled.onnx_sha256, recalled.card_sha256) == (
        default.onnx_sha256,
        default.card_sha256,
    )
    assert recalled.installed_by == rollback
    assert "stale" in str(update_verdict(recalled, overtaken))
    # A default model whose file changed since it was loaded is not recorded as served.
    (tmp_path / "default" / models[1].onnx.name).write_bytes(models[2].onnx.read_bytes())
    with pytest.raises(ModelLoadError, match="changed since it was loaded"):
        ModelCache(tmp_path / "other-cache").remember(recorded)
    assert ModelCache(tmp_path / "other-cache").recall() is None


# ---------------------------------------------------------------- reading and classifying frames


def _spool(spool: LocalBlobStore, data: bytes) -> BlobRef:
    return spool.put(spool_key(BIN, sha256_hex(data)), data, "image/jpeg")


def _frame(ref: BlobRef, sequence: int, ground_truth: str | None = None) -> FrameCaptured:
    return FrameCaptured(
        producer="test",
        bin_id=BIN,
        frame_sha256=ref.sha256,
        spool=ref,
        captured_at=datetime.now(UTC),
        width=160,
        height=120,
        source="test",
        sequence=sequence,
        ground_truth=ground_truth,
    )


def test_spool_reader_prefers_its_own_spool_and_checks_the_hash(tmp_path: Path) -> None:
    data = (DEMO / "glass").glob("*.jpg").__next__().read_bytes()
    ref = _spool(LocalBlobStore(tmp_path / "spool"), data)
    elsewhere = ref.model_copy(update={"uri": "file:///mounted/elsewhere/frame.jpg"})

    assert SpoolReader(tmp_path / "spool").read(elsewhere) == data
    with pytest.raises(UnknownUriError):
        SpoolReader(tmp_path / "spool").read(ref.model_copy(update={"uri": "ftp://cam/f.jpg"}))
    with pytest.raises(ChecksumMismatchError):
        SpoolReader(tmp_path / "spool").read(ref.model_copy(update={"sha256": "0" * 64}))


def test_spool_reader_falls_back_to_the_events_own_uri(tmp_path: Path) -> None:
    # A frame this bin's spool does not hold (another mount) is read where the event says.
    data = (DEMO / "metal").glob("*.jpg").__next__().read_bytes()
    ref = _spool(LocalBlobStore(tmp_path / "other-spool"), data)
    assert SpoolReader(tmp_path / "spool").read(ref) == data
    with pytest.raises(MissingBlobError):
        SpoolReader(tmp_path / "spool").read(
            ref.model_copy(update={"uri": (tmp_path / "other-spool" / "gone.jpg").as_uri()})
        )
    # A frame is never fetched over the network, even with an S3 store open in the process.
    with pytest.raises(UnknownUriError, match="spool"):
        SpoolReader(tmp_path / "spool").read(ref.model_copy(update={"uri": "s3://bucket/f.jpg"}))


def test_classify_times_every_stage_and_builds_matching_events(
    tmp_path: Path, models: dict[int, ModelFiles]
) -> None:
    model = _loaded(1, None, models)
    policy = DecisionPolicy(Taxonomy(), confidence_threshold=0.0, top_k=3)
    data = sorted((DEMO / "metal").glob("*.jpg"))[0].read_bytes()
    frame = _frame(_spool(LocalBlobStore(tmp_path / "spool"), data), 0, ground_truth="metal")

    outcome = classify(lambda: data, model, policy)
    result, command = build_events(frame, model, outcome, "edge-inferencer")
    again, _ = build_events(frame, model, outcome, "edge-inferencer")

    latency = outcome.latency
    assert min(latency.read_ms, latency.decode_ms, latency.infer_ms) >= 0
    assert result.label in CLASSES
    assert len(result.top_k) == 3
    assert result.top_k[0].label == result.label
    assert result.abstained is False  # threshold 0
    # What the sampler needs to judge it, from the decision and the model themselves.
    assert (result.confidence_threshold, result.num_classes) == (0.0, len(CLASSES))
    assert result.compartment == Taxonomy().compartment_for(result.label)
    assert (result.ground_truth, result.frame_event_id) == ("metal", str(frame.event_id))
    assert (command.compartment, command.model_version) == (result.compartment, 1)
    # The pHash of the frame at the model's input size rides along for the sampler's
    # near-duplicate filter.
    assert result.phash == _input_phash(model, data)
    # A redelivered frame republishes the same ids, which JetStream deduplicates.
    assert again.event_id == result.event_id
    assert command.event_id != result.event_id


def test_classify_raises_corrupt_frame_for_bytes_that_are_not_an_image(
    models: dict[int, ModelFiles],
) -> None:
    policy = DecisionPolicy(Taxonomy(), 0.5, 3)
    with pytest.raises(CorruptFrameError):
        classify(lambda: b"\xff\xd8 truncated jpeg", _loaded(1, None, models), policy)


def test_a_frame_whose_header_claims_too_many_pixels_is_a_corrupt_frame(
    models: dict[int, ModelFiles],
) -> None:
    """OpenCV raises cv2.error, rather than returning nothing, for a header (bit rot, a hostile
    upload) over its pixel limit; decode_rgb, which the trainer and the labeling bridge's ML
    backend share, turns it into the CorruptFrameError the edge dead-letters."""
    ok, encoded = cv2.imencode(".jpg", np.zeros((8, 8, 3), np.uint8))
    assert ok
    data = bytearray(encoded.tobytes())
    frame_header = data.find(b"\xff\xc0")
    data[frame_header + 5 : frame_header + 9] = struct.pack(">HH", 65000, 65000)
    with pytest.raises(CorruptFrameError, match=r"header claims more than OpenCV's limit of \d+"):
        decode_rgb(bytes(data))
    policy = DecisionPolicy(Taxonomy(), 0.5, 3)
    with pytest.raises(CorruptFrameError):
        classify(lambda: bytes(data), _loaded(1, None, models), policy)


# ---------------------------------------------------------------- the service on a real bus


def _settings(
    server: NatsServer, tmp_path: Path, default_model: Path | None, **overrides: object
) -> EdgeInferencerSettings:
    values: dict[str, object] = {
        "nats_url": server.url,
        "http_port": 0,
        "retry_delay_s": 0.05,
        "max_deliveries": 3,
        "bin_id": BIN,
        "spool_root": tmp_path / "spool",
        "model_cache": tmp_path / "edge-models",
        "default_model": default_model,
        "confidence_threshold": 0.3,
    }
    values.update(overrides)
    return EdgeInferencerSettings.model_validate(values)


async def _publish(
    js: JetStreamContext, route: Route, event: Event, bin_id: str | None = None
) -> None:
    await js.publish(
        route.subject(bin_id),
        event.model_dump_json().encode(),
        headers={MSG_ID_HEADER: str(event.event_id)},
    )


async def _publish_frames(
    js: JetStreamContext, spool: LocalBlobStore, paths: list[Path], start: int = 0
) -> list[FrameCaptured]:
    frames = []
    for sequence, path in enumerate(paths, start):
        frame = _frame(_spool(spool, path.read_bytes()), sequence, ground_truth=path.parent.name)
        await _publish(js, FRAMES_CAPTURED, frame, BIN)
        frames.append(frame)
    return frames


def _promotion(
    store: LocalBlobStore, models: dict[int, ModelFiles], version: int, *, occurred_at: datetime
) -> ModelPromoted:
    artifact, card = _store_model(store, models[version], version)
    return ModelPromoted(
        producer="model-registry",
        occurred_at=occurred_at,
        model_name="tiny-cnn",
        model_version=version,
        previous_version=version - 1 if version > 1 else None,
        artifact=artifact,
        card=card,
        metrics=METRICS,
        reason="better on the evaluation set",
    )


async def _collectors(
    client: Client,
) -> tuple[Collector[InferenceResult], Collector[ActuationCommand], Collector[DeadLetter]]:
    results = await Collector(InferenceResult).attach(client, INFERENCE_RESULT.subject(BIN))
    commands = await Collector(ActuationCommand).attach(client, ACTUATION_COMMAND.subject(BIN))
    dead = await Collector(DeadLetter).attach(client, dlq_subject(SERVICE))
    return results, commands, dead


async def _started(app: ServiceApp) -> ServiceApp:
    await app.start()
    return app


@pytest.mark.integration
async def test_every_frame_gets_one_result_and_one_command(
    js: JetStreamContext,
    nats_client: Client,
    nats_server: NatsServer,
    tmp_path: Path,
    models: dict[int, ModelFiles],
) -> None:
    results, commands, dead = await _collectors(nats_client)
    app = await _started(create_app(_settings(nats_server, tmp_path, models[1].onnx)))
    try:
        assert app.is_ready()
        frames = await _publish_frames(js, LocalBlobStore(tmp_path / "spool"), _demo_frames(2))
        await results.wait_for(len(frames))
        await commands.wait_for(len(frames))
    finally:
        await app.stop()

    sent = {str(f.event_id): f for f in frames}
    assert Counter(r.frame_event_id for r in results.items) == Counter(sent.keys())
    assert Counter(c.frame_event_id for c in commands.items) == Counter(sent.keys())
    by_frame = {c.frame_event_id: c for c in commands.items}
    served = _loaded(1, None, models)
    phashes = {
        sha256_hex(data): _input_phash(served, data)
        for data in (path.read_bytes() for path in _demo_frames(2))
    }
    for result in results.items:
        frame = sent[result.frame_event_id]
        assert (result.model_name, result.model_version) == ("tiny-cnn", 1)
        assert result.ground_truth == frame.ground_truth
        assert result.frame_sha256 == frame.frame_sha256
        assert result.phash == phashes[frame.frame_sha256]
        assert result.abstained == (result.confidence < 0.3)
        assert (result.confidence_threshold, result.num_classes) == (0.3, len(CLASSES))
        expected = (
            Taxonomy().fallback if result.abstained else Taxonomy().compartment_for(result.label)
        )
        assert result.compartment == expected
        assert len(result.top_k) == 3
        assert result.latency.infer_ms >= 0
        assert by_frame[result.frame_event_id].compartment == result.compartment
    assert dead.items == []
    assert (await js.stream_info("INFERENCE")).state.messages == len(frames)


@pytest.mark.integration
async def test_corrupt_frame_and_unknown_model_uri_are_dead_lettered(
    js: JetStreamContext,
    nats_client: Client,
    nats_server: NatsServer,
    tmp_path: Path,
    blob_store: LocalBlobStore,
    models: dict[int, ModelFiles],
) -> None:
    results, _, dead = await _collectors(nats_client)
    slot = ModelSlot(BIN)
    app = await _started(create_app(_settings(nats_server, tmp_path, models[1].onnx), slot))
    spool = LocalBlobStore(tmp_path / "spool")
    try:
        corrupt = _frame(_spool(spool, b"\xff\xd8\xff\xe0 not really a jpeg"), 0)
        await _publish(js, FRAMES_CAPTURED, corrupt, BIN)
        promotion = _promotion(blob_store, models, 2, occurred_at=datetime.now(UTC))
        unreachable = promotion.artifact.model_copy(update={"uri": "ftp://models.example/v2.onnx"})
        await _publish(js, MODELS_PROMOTED, promotion.model_copy(update={"artifact": unreachable}))
        (good,) = await _publish_frames(js, spool, _demo_frames(1)[:1], start=1)
        await dead.wait_for(2)
        await results.wait_for(1)
    finally:
        await app.stop()

    letters = {d.error_type: d for d in dead.items}
    assert set(letters) == {"CorruptFrameError", "UnknownUriError"}
    assert letters["CorruptFrameError"].original_subject == FRAMES_CAPTURED.subject(BIN)
    assert str(corrupt.event_id) in letters["CorruptFrameError"].payload_preview
    assert letters["UnknownUriError"].original_subject == MODELS_PROMOTED.subject()
    assert "ftp://models.example/v2.onnx" in letters["UnknownUriError"].error
    assert all(d.delivery_attempt == 1 for d in dead.items)  # permanent: never retried
    assert [r.frame_event_id for r in results.items] == [str(good.event_id)]
    assert results.items[0].model_version == 1
    assert slot.served == ("tiny-cnn", 1)


@pytest.mark.integration
async def test_promotion_mid_stream_swaps_the_model_without_losing_a_frame(
    js: JetStreamContext,
    nats_client: Client,
    nats_server: NatsServer,
    tmp_path: Path,
    blob_store: LocalBlobStore,
    models: dict[int, ModelFiles],
) -> None:
    results, commands, dead = await _collectors(nats_client)
    slot = ModelSlot(BIN)
    swapped = asyncio.Event()
    slot.add_listener(lambda model: swapped.set() if model.card.version == 2 else None)
    app = await _started(create_app(_settings(nats_server, tmp_path, models[1].onnx), slot))
    spool = LocalBlobStore(tmp_path / "spool")
    paths = _demo_frames(4)
    try:
        before = await _publish_frames(js, spool, paths[:8])
        await results.wait_for(2)
        await _publish(
            js, MODELS_PROMOTED, _promotion(blob_store, models, 2, occurred_at=datetime.now(UTC))
        )
        during = await _publish_frames(js, spool, paths[8:16], start=8)
        await asyncio.wait_for(swapped.wait(), 20)
        after = await _publish_frames(js, spool, paths[16:], start=16)
        frames = before + during + after
        await results.wait_for(len(frames))
        await commands.wait_for(len(frames))
    finally:
        await app.stop()

    assert Counter(r.frame_event_id for r in results.items) == Counter(
        str(f.event_id) for f in frames
    )
    assert len(commands.items) == len(frames)
    versions = [r.model_version for r in results.items]
    # Processed one at a time: every result before the swap is v1, every one after it is v2.
    assert versions == sorted(versions)
    assert versions[0] == 1
    late = {str(f.event_id) for f in after}
    assert {r.model_version for r in results.items if r.frame_event_id in late} == {2}
    assert slot.served == ("tiny-cnn", 2)
    assert dead.items == []
    cached = tmp_path / "edge-models" / "tiny-cnn" / "v2" / "model.onnx"
    assert cached.read_bytes() == models[2].onnx.read_bytes()


@pytest.mark.integration
async def test_the_shipped_model_serves_the_first_frame_until_the_registry_promotes_one(
    js: JetStreamContext,
    nats_client: Client,
    nats_server: NatsServer,
    tmp_path: Path,
    blob_store: LocalBlobStore,
) -> None:
    results, _, dead = await _collectors(nats_client)
    slot = ModelSlot(BIN)
    swapped = asyncio.Event()
    slot.add_listener(lambda model: swapped.set() if model.installed_by else None)
    app = await _started(create_app(_settings(nats_server, tmp_path, SHIPPED_MODEL), slot))
    spool = LocalBlobStore(tmp_path / "spool")
    # The registry's first trained model carries the shipped model's name and version.
    own = ModelFiles(*make_onnx_model(tmp_path / "own", CLASSES, name="binloop-waste"))
    promotion = _promotion(blob_store, {1: own}, 1, occurred_at=datetime.now(UTC))
    try:
        assert app.is_ready()
        (first,) = await _publish_frames(js, spool, _demo_frames(1)[:1])
        await results.wait_for(1)
        await _publish(
            js, MODELS_PROMOTED, promotion.model_copy(update={"model_name": "binloop-waste"})
        )
        await asyncio.wait_for(swapped.wait(), 20)
        (second,) = await _publish_frames(js, spool, _demo_frames(1)[1:2], start=1)
        await results.wait_for(2)
    finally:
        await app.stop()

    assert [(r.frame_event_id, r.model_name, r.model_version) for r in results.items] == [
        (str(first.event_id), "binloop-waste", 1),
        (str(second.event_id), "binloop-waste", 1),
    ]
    assert slot.current is not None
    assert (
        slot.current.onnx_sha256
        == promotion.artifact.sha256
        != sha256_hex(SHIPPED_MODEL.read_bytes())
    )
    assert dead.items == []


@pytest.mark.integration
async def test_a_frame_before_any_model_is_served_once_a_model_is_promoted(
    js: JetStreamContext,
    nats_client: Client,
    nats_server: NatsServer,
    tmp_path: Path,
    blob_store: LocalBlobStore,
    models: dict[int, ModelFiles],
) -> None:
    results, _, dead = await _collectors(nats_client)
    refused = asyncio.get_running_loop().create_future()

    async def on_nak(msg: Msg) -> None:
        if not refused.done():
            refused.set_result(json.loads(msg.data))

    # The server announces each nak; the first one is the frame refused for want of a model.
    nak_subject = f"$JS.EVENT.ADVISORY.CONSUMER.MSG_NAKED.FRAMES.{SERVICE}-{BIN}"
    await nats_client.subscribe(nak_subject, cb=on_nak)
    settings = _settings(nats_server, tmp_path, None, max_deliveries=100, retry_delay_s=0.1)
    app = await _started(create_app(settings))
    try:
        assert not app.is_ready()
        (frame,) = await _publish_frames(
            js, LocalBlobStore(tmp_path / "spool"), _demo_frames(1)[:1]
        )
        await asyncio.wait_for(refused, 20)
        await _publish(
            js, MODELS_PROMOTED, _promotion(blob_store, models, 1, occurred_at=datetime.now(UTC))
        )
        await results.wait_for(1)
        assert app.is_ready()
    finally:
        await app.stop()

    assert [r.frame_event_id for r in results.items] == [str(frame.event_id)]
    assert results.items[0].model_version == 1
    assert dead.items == []


@pytest.mark.integration
async def test_a_new_bin_loads_only_the_latest_promotion_and_follows_rollbacks(
    js: JetStreamContext,
    nats_client: Client,
    nats_server: NatsServer,
    tmp_path: Path,
    blob_store: LocalBlobStore,
    models: dict[int, ModelFiles],
) -> None:
    results, _, _ = await _collectors(nats_client)
    now = datetime.now(UTC)
    for version in (1, 2):
        await _publish(
            js,
            MODELS_PROMOTED,
            _promotion(
                blob_store, models, version, occurred_at=now - timedelta(seconds=3 - version)
            ),
        )
    slot = ModelSlot(BIN)
    installed: list[int] = []
    changed = asyncio.Event()

    def record(model: LoadedModel) -> None:
        installed.append(model.card.version)
        changed.set()

    slot.add_listener(record)
    app = await _started(create_app(_settings(nats_server, tmp_path, None), slot))
    spool = LocalBlobStore(tmp_path / "spool")
    try:
        await asyncio.wait_for(changed.wait(), 20)
        changed.clear()
        (first,) = await _publish_frames(js, spool, _demo_frames(1)[:1])
        await results.wait_for(1)
        artifact, card = _store_model(blob_store, models[1], 1)
        rollback = ModelRolledBack(
            producer="model-registry",
            model_name="tiny-cnn",
            from_version=2,
            to_version=1,
            artifact=artifact,
            card=card,
            reason="accuracy dropped in the field",
        )
        await _publish(js, MODELS_ROLLED_BACK, rollback)
        await asyncio.wait_for(changed.wait(), 20)
        (second,) = await _publish_frames(js, spool, _demo_frames(1)[1:2], start=1)
        await results.wait_for(2)
    finally:
        await app.stop()

    # Version 1's promotion was history before this bin existed: it was never downloaded.
    assert installed == [2, 1]
    versions = {r.frame_event_id: r.model_version for r in results.items}
    assert versions == {str(first.event_id): 2, str(second.event_id): 1}


@pytest.mark.integration
async def test_a_restarted_bin_serves_the_champion_again_even_with_the_store_down(
    js: JetStreamContext,
    nats_client: Client,
    nats_server: NatsServer,
    tmp_path: Path,
    blob_store: LocalBlobStore,
    models: dict[int, ModelFiles],
) -> None:
    results, _, dead = await _collectors(nats_client)
    promotion = _promotion(blob_store, models, 2, occurred_at=datetime.now(UTC))
    await _publish(js, MODELS_PROMOTED, promotion)
    first_slot = ModelSlot(BIN)
    swapped = asyncio.Event()
    first_slot.add_listener(lambda model: swapped.set() if model.installed_by else None)
    app = await _started(create_app(_settings(nats_server, tmp_path, SHIPPED_MODEL), first_slot))
    try:
        await asyncio.wait_for(swapped.wait(), 20)
    finally:
        await app.stop()

    # The bin restarts (its durable consumers acked the promotion) while the store is away.
    shutil.rmtree(blob_store.root)
    slot = ModelSlot(BIN)
    app = await _started(create_app(_settings(nats_server, tmp_path, SHIPPED_MODEL), slot))
    spool = LocalBlobStore(tmp_path / "spool")
    try:
        assert slot.current is not None
        assert (slot.current.card.name, slot.current.card.version) == ("tiny-cnn", 2)
        assert slot.current.onnx_sha256 == promotion.artifact.sha256
        (frame,) = await _publish_frames(js, spool, _demo_frames(1)[:1])
        (result,) = await results.wait_for(1)
    finally:
        await app.stop()

    assert (result.frame_event_id, result.model_name, result.model_version) == (
        str(frame.event_id),
        "tiny-cnn",
        2,
    )
    assert dead.items == []


@pytest.mark.integration
@pytest.mark.parametrize("default_model", [None, SHIPPED_MODEL], ids=["no-default", "shipped"])
async def test_a_restarted_bin_serves_its_cached_model_while_a_promotion_waits_for_its_files(
    js: JetStreamContext,
    nats_client: Client,
    nats_server: NatsServer,
    tmp_path: Path,
    blob_store: LocalBlobStore,
    models: dict[int, ModelFiles],
    default_model: Path | None,
) -> None:
    results, _, dead = await _collectors(nats_client)
    settings = _settings(nats_server, tmp_path, default_model)
    t0 = datetime.now(UTC)
    # v1 is promoted and served, so it is in the bin's model cache.
    await _publish(js, MODELS_PROMOTED, _promotion(blob_store, models, 1, occurred_at=t0))
    first_slot = ModelSlot(BIN)
    swapped = asyncio.Event()
    first_slot.add_listener(lambda model: swapped.set() if model.installed_by else None)
    app = await _started(create_app(settings, first_slot))
    try:
        await asyncio.wait_for(swapped.wait(), 20)
    finally:
        await app.stop()

    # While the bin is off, v2 is promoted; the store does not hold its files (yet).
    v2 = _promotion(blob_store, models, 2, occurred_at=t0 + timedelta(seconds=1))
    await _publish(js, MODELS_PROMOTED, v2)
    for ref in (v2.artifact, v2.card):
        (blob_store.root / ref.key).unlink()

    slot = ModelSlot(BIN)
    installed: list[int] = []
    got_v2 = asyncio.Event()

    def record(model: LoadedModel) -> None:
        installed.append(model.card.version)
        if model.card.version == 2:
            got_v2.set()

    slot.add_listener(record)
    app = await _started(create_app(settings, slot))
    spool = LocalBlobStore(tmp_path / "spool")
    try:
        # Not the shipped model, nor nothing: v1, served before the restart.
        assert slot.served == ("tiny-cnn", 1)
        (frame,) = await _publish_frames(js, spool, _demo_frames(1)[:1])
        (result,) = await results.wait_for(1)
        # The promotion waits (more tries than max_deliveries, 3), it is not dead-lettered.
        limit = _retries(MODELS_PROMOTED.name) + settings.max_deliveries + 1
        await eventually(lambda: _retries(MODELS_PROMOTED.name) >= limit, 20)
        assert slot.served == ("tiny-cnn", 1)
        _store_model(blob_store, models[2], 2)  # the store has the files again
        await asyncio.wait_for(got_v2.wait(), 20)
    finally:
        await app.stop()

    assert (result.frame_event_id, result.model_version) == (str(frame.event_id), 1)
    assert installed == [1, 2]
    assert slot.current is not None
    assert slot.current.onnx_sha256 == v2.artifact.sha256
    assert dead.items == []


async def _consumed(js: JetStreamContext, durable: str, stream_sequence: int) -> None:
    """Waits until the consumer `durable` acked everything up to `stream_sequence`."""

    async def settled() -> bool:
        info = await js.consumer_info("ENGINE", durable)
        return info.ack_floor.stream_seq >= stream_sequence and info.num_ack_pending == 0

    async def poll() -> None:
        while not await settled():  # noqa: ASYNC110 (server-side state: polled)
            await asyncio.sleep(0.02)

    await asyncio.wait_for(poll(), 20)


@pytest.mark.integration
async def test_a_bin_on_its_default_model_keeps_it_when_the_rollback_to_it_overtakes_a_promotion(
    js: JetStreamContext,
    nats_client: Client,
    nats_server: NatsServer,
    tmp_path: Path,
    blob_store: LocalBlobStore,
    models: dict[int, ModelFiles],
) -> None:
    results, _, dead = await _collectors(nats_client)
    settings = _settings(nats_server, tmp_path, models[1].onnx)
    now = datetime.now(UTC)
    # The registry's v1 is the bin's default model, byte for byte. It promoted v2 (revision
    # 5), then rolled back to v1 (revision 6), and the rollback was published first.
    promotion = _promotion(blob_store, models, 2, occurred_at=now).model_copy(
        update={"champion_revision": 5}
    )
    artifact, card = _store_model(blob_store, models[1], 1)
    rollback = ModelRolledBack(
        producer="model-registry",
        occurred_at=now + timedelta(seconds=1),
        model_name="tiny-cnn",
        from_version=2,
        to_version=1,
        artifact=artifact,
        card=card,
        reason="accuracy dropped in the field",
        champion_revision=6,
    )
    slot = ModelSlot(BIN)
    installed: list[int] = []
    slot.add_listener(lambda model: installed.append(model.card.version))
    app = await _started(create_app(settings, slot))
    spool = LocalBlobStore(tmp_path / "spool")
    try:
        await _publish(js, MODELS_ROLLED_BACK, rollback)
        await eventually(lambda: slot.current is not None and slot.current.installed_by is not None)
        ack = await js.publish(
            MODELS_PROMOTED.subject(),
            promotion.model_dump_json().encode(),
            headers={MSG_ID_HEADER: str(promotion.event_id)},
        )
        await _consumed(js, f"{SERVICE}-{BIN}-promoted", ack.seq)
        (frame,) = await _publish_frames(js, spool, _demo_frames(1)[:1])
        (result,) = await results.wait_for(1)
    finally:
        await app.stop()

    assert installed == [1]  # the default model only: v2 was never installed
    assert (result.frame_event_id, result.model_version) == (str(frame.event_id), 1)
    assert slot.current is not None
    assert slot.current.installed_by == update_for(rollback)

    # Restarted, the bin serves the same model with the rollback on record (from its cache),
    # and the last promotion and rollback in the stream change nothing.
    restarted = ModelSlot(BIN)
    reinstalled: list[int] = []
    restarted.add_listener(lambda model: reinstalled.append(model.card.version))
    app = await _started(create_app(settings, restarted))
    try:
        assert restarted.current is not None
        assert restarted.current.onnx_sha256 == artifact.sha256
        assert restarted.current.installed_by == update_for(rollback)
    finally:
        await app.stop()

    assert reinstalled == [1]
    assert dead.items == []


def _training_run(store: LocalBlobStore, files: ModelFiles, version: int) -> TrainingCompleted:
    """What the trainer announces for `version`, its files in `store` for the bin to fetch."""
    artifact, card = _store_model(store, files, version)
    return TrainingCompleted(
        producer="trainer",
        model_name="tiny-cnn",
        model_version=version,
        parent_version=None,
        dataset_name="seed",
        dataset_version=version,
        artifact=artifact,
        card=card,
        metrics=METRICS,
        onnx_parity_max_abs_diff=1e-6,
        train_seconds=1.0,
    )


@pytest.mark.integration
async def test_a_bin_follows_the_registry_whose_bucket_was_recreated(
    js: JetStreamContext,
    nats_client: Client,
    nats_server: NatsServer,
    tmp_path: Path,
    blob_store: LocalBlobStore,
    models: dict[int, ModelFiles],
) -> None:
    # The registry promoted v1 from its bucket; an operator recreated the bucket, whose
    # revisions start again, and the registry promoted v2 from the new one. The bin restarted
    # in between (v1 and the decision behind it recalled from its cache).
    _, _, dead = await _collectors(nats_client)
    promoted = await Collector(ModelPromoted).attach(nats_client, MODELS_PROMOTED.subject())
    registry = RegistrySettings(
        nats_url=nats_server.url,
        http_port=0,
        retry_delay_s=0.05,
        kv_bucket="registry-recreated",
        model_name="tiny-cnn",
    )
    edge = _settings(nats_server, tmp_path, None)
    slot = ModelSlot(BIN)
    apps = [await _started(create_app(edge, slot)), await _started(create_registry(registry))]
    try:
        await _publish(js, TRAINING_COMPLETED, _training_run(blob_store, models[1], 1))
        await eventually(lambda: slot.served == ("tiny-cnn", 1))
    finally:
        for app in reversed(apps):
            await app.stop()
    assert await js.delete_key_value(registry.kv_bucket)

    restarted = ModelSlot(BIN)
    apps = [await _started(create_app(edge, restarted)), await _started(create_registry(registry))]
    try:
        assert restarted.served == ("tiny-cnn", 1)
        assert restarted.current is not None
        recalled = restarted.current.installed_by  # from the cache's current.json
        await _publish(js, TRAINING_COMPLETED, _training_run(blob_store, models[2], 2))
        await promoted.wait_for(2)
        last = await js.get_last_msg(MODELS_PROMOTED.stream, MODELS_PROMOTED.subject())
        await _consumed(js, f"{SERVICE}-{BIN}-promoted", last.seq or 0)
    finally:
        for app in reversed(apps):
            await app.stop()

    first, second = promoted.items
    assert (first.model_version, second.model_version) == (1, 2)
    # The new bucket's first change replaced no revision, like the old bucket's first one;
    # the bucket's creation tells the two apart, also after the bin's restart.
    assert first.champion_revision == second.champion_revision == 0
    assert first.champion_epoch is not None
    assert second.champion_epoch is not None
    assert second.champion_epoch > first.champion_epoch
    assert recalled == update_for(first)
    assert restarted.served == ("tiny-cnn", 2)
    served = ModelCache(edge.model_cache).recall()
    assert served is not None
    assert served.installed_by == update_for(second)
    assert dead.items == []


def _retries(route: str) -> float:
    labels = {"service": SERVICE, "route": route, "error_type": "NotReadyError"}
    return REGISTRY.get_sample_value("binloop_messages_retried_total", labels) or 0.0


def _promotion_in_s3(
    settings: EdgeInferencerSettings, models: dict[int, ModelFiles], tmp_path: Path
) -> ModelPromoted:
    """Version 2's promotion, its artifact and card in the settings' S3 bucket."""
    store = open_store(settings)
    artifact = store.put(model_key("tiny-cnn", 2, "model.onnx"), models[2].onnx.read_bytes())
    card = store.put(model_key("tiny-cnn", 2, "card.json"), models[2].card.read_bytes())
    promotion = _promotion(LocalBlobStore(tmp_path / "unused"), models, 2, occurred_at=T0)
    return promotion.model_copy(update={"artifact": artifact, "card": card})


@pytest.mark.integration
async def test_a_promotion_waits_for_the_store_instead_of_being_dead_lettered(
    js: JetStreamContext,
    nats_client: Client,
    nats_server: NatsServer,
    tmp_path: Path,
    models: dict[int, ModelFiles],
    own_moto_s3: MotoS3,
) -> None:
    _, _, dead = await _collectors(nats_client)
    settings = _settings(nats_server, tmp_path, SHIPPED_MODEL, **own_moto_s3.overrides())
    promotion = _promotion_in_s3(settings, models, tmp_path)
    slot = ModelSlot(BIN)
    swapped = asyncio.Event()
    slot.add_listener(lambda model: swapped.set() if model.installed_by else None)
    app = await _started(create_app(settings, slot))
    try:
        own_moto_s3.stop()
        before = _retries(MODELS_PROMOTED.name)
        await _publish(js, MODELS_PROMOTED, promotion)

        # More tries than max_deliveries (3), after which any other error is dead-lettered.
        limit = before + settings.max_deliveries + 1
        await eventually(lambda: _retries(MODELS_PROMOTED.name) >= limit, 60)
        assert not swapped.is_set()
        own_moto_s3.start()  # same port, objects kept
        await asyncio.wait_for(swapped.wait(), 60)
    finally:
        await app.stop()

    assert slot.current is not None
    assert (slot.current.card.version, slot.current.onnx_sha256) == (2, promotion.artifact.sha256)
    assert dead.items == []


@pytest.mark.integration
async def test_a_restart_with_the_store_away_and_no_cache_restores_the_champion_later(
    js: JetStreamContext,
    nats_client: Client,
    nats_server: NatsServer,
    tmp_path: Path,
    models: dict[int, ModelFiles],
    own_moto_s3: MotoS3,
) -> None:
    _, _, dead = await _collectors(nats_client)
    settings = _settings(nats_server, tmp_path, SHIPPED_MODEL, **own_moto_s3.overrides())
    promotion = _promotion_in_s3(settings, models, tmp_path)
    await _publish(js, MODELS_PROMOTED, promotion)
    first = await _started(create_app(settings, ModelSlot(BIN)))  # the durable acks it
    await first.stop()

    own_moto_s3.stop()
    slot = ModelSlot(BIN)
    swapped = asyncio.Event()
    slot.add_listener(lambda model: swapped.set() if model.installed_by else None)
    fresh_cache = settings.model_copy(update={"model_cache": tmp_path / "new-disk"})
    app = await _started(create_app(fresh_cache, slot))
    try:
        assert slot.current is not None
        assert slot.current.card.name == "binloop-waste"  # the shipped model meanwhile
        own_moto_s3.start()  # same port, objects kept
        await asyncio.wait_for(swapped.wait(), 60)
    finally:
        await app.stop()

    assert (slot.current.card.version, slot.current.onnx_sha256) == (2, promotion.artifact.sha256)
    assert dead.items == []
