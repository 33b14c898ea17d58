"""The trainer: metrics on hand-made predictions, a real (tiny) training run on demo photos,
ONNX parity, unreadable items, and the service against a real nats-server."""

from __future__ import annotations

import dataclasses
import re
import shutil
import uuid
from datetime import timedelta
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from nats.aio.client import Client
from nats.js.client import JetStreamContext

from binloop.datasets import DatasetManifest, ManifestItem, import_image_folder, write_manifest
from binloop.errors import PermanentError
from binloop.ml.backend import OnnxBackend
from binloop.ml.card import ModelCard
from binloop.ml.decisions import update_for
from binloop.ml.preprocess import Preprocessor, decode_rgb
from binloop.natsserver import NatsServer
from binloop.storage import LocalBlobStore, dataset_key, model_key, sha256_hex
from binloop.storage.blobstore import read_verified
from schemas import DeadLetter
from schemas.base import BlobRef, utc_now
from schemas.events import (
    DatasetSnapshot,
    ModelMetrics,
    ModelPromoted,
    ModelRolledBack,
    TrainingCompleted,
    TrainingRequested,
)
from schemas.routes import (
    DATASETS_SNAPSHOT,
    DLQ,
    MODELS_PROMOTED,
    MODELS_ROLLED_BACK,
    TRAINING_COMPLETED,
    TRAINING_REQUESTED,
)
from schemas.taxonomy import Taxonomy
from services.trainer.app import TrainerState, create_app, recall_champion
from services.trainer.core import (
    InsufficientDataError,
    TrainingOutcome,
    UnclaimedVersionError,
    claim_model_version,
    load_eval_set,
    manifest_for_request,
    next_model_version,
    preprocessor_for,
    run_training,
    store_model,
    train_config,
)
from services.trainer.data import (
    LoadedItems,
    ManifestDataset,
    ensure_eval_set,
    folder_content_id,
    items_in,
    load_items,
    model_classes,
)
from services.trainer.evaluate import EvalReport, confusion_matrix, evaluate
from services.trainer.export import (
    ParityError,
    check_parity,
    embedding_parity_max_abs_diff,
    export_onnx,
    onnx_embeddings,
    onnx_logits,
    onnx_session,
    parity_max_abs_diff,
)
from services.trainer.nets import CompactCNN, build_model
from services.trainer.settings import TrainerSettings
from services.trainer.train import (
    Augmenter,
    TrainConfig,
    _Run,
    class_weights,
    predict_logits,
    train_classifier,
)
from tests.helpers import Collector
from tests.modelfactory import make_card

DEMO = Path(__file__).resolve().parents[1] / "data" / "demo"
TINY_CLASSES = ("cardboard", "glass", "metal")
FAST = {"epochs": 15, "batch_size": 8, "min_items": 12}


def _copy_subset(source: Path, target: Path, classes: tuple[str, ...], per_class: int) -> Path:
    for label in classes:
        (target / label).mkdir(parents=True)
        for image in sorted((source / label).glob("*.jpg"))[:per_class]:
            shutil.copy(image, target / label / image.name)
    return target


def _settings(root: Path, **overrides: object) -> TrainerSettings:
    values: dict[str, object] = {
        "blob_root": root / "blobs",
        "eval_dir": root / "eval",
        "http_port": 0,
        **FAST,
    }
    values.update(overrides)
    return TrainerSettings.model_validate(values)


class TinyWorld:
    """Three classes of real photos: a training snapshot and a small fixed eval set."""

    def __init__(self, root: Path) -> None:
        self.root = root
        _copy_subset(DEMO / "stream", root / "train", TINY_CLASSES, 12)
        _copy_subset(DEMO / "eval", root / "eval", TINY_CLASSES, 4)
        self.settings = _settings(root)
        self.store = LocalBlobStore(self.settings.blob_root)
        self.manifest, _ = import_image_folder(
            self.store, root / "train", "tiny", taxonomy_version="t", classes=list(TINY_CLASSES)
        )
        self.eval_set = load_eval_set(self.store, self.settings)


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> TinyWorld:
    return TinyWorld(tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="module")
def trained(world: TinyWorld) -> TrainingOutcome:
    return run_training(
        world.store, world.manifest, world.eval_set, world.settings, parent_version=None
    )


# --- metrics ---------------------------------------------------------------------------------


def test_metrics_on_hand_made_predictions() -> None:
    truth = ["cardboard", "cardboard", "cardboard", "paper", "paper", "glass"]
    guess = ["cardboard", "cardboard", "paper", "paper", "glass", "glass"]
    report = evaluate(truth, guess, Taxonomy(), labels=["cardboard", "paper", "glass", "metal"])

    assert report.labels == ["cardboard", "paper", "glass", "metal"]
    assert report.confusion.tolist() == [[2, 1, 0, 0], [0, 1, 1, 0], [0, 0, 1, 0], [0, 0, 0, 0]]
    assert report.accuracy == pytest.approx(4 / 6)
    # cardboard 2TP/1FN, paper 1TP/1FP/1FN, glass 1TP/1FP; metal never seen: not averaged.
    assert report.per_class_f1 == pytest.approx({"cardboard": 0.8, "paper": 0.5, "glass": 2 / 3})
    assert report.macro_f1 == pytest.approx(59 / 90)
    # Only paper -> glass crosses a compartment (cardboard <-> paper share one).
    assert report.compartment_accuracy == pytest.approx(5 / 6)
    metrics = report.to_metrics("ab" * 32)
    assert metrics.eval_items == 6
    assert metrics.accuracy == pytest.approx(4 / 6)


def test_unlisted_prediction_gets_its_own_column_and_zero_f1() -> None:
    report = evaluate(["glass", "glass"], ["glass", "trash"], Taxonomy(), labels=["glass"])
    assert report.labels == ["glass", "trash"]
    assert report.confusion.tolist() == [[1, 1], [0, 0]]
    assert report.per_class_f1 == pytest.approx({"glass": 2 / 3, "trash": 0.0})
    assert report.macro_f1 == pytest.approx(1 / 3)
    assert report.compartment_accuracy == pytest.approx(0.5)


def test_evaluate_refuses_mismatched_or_empty_input() -> None:
    with pytest.raises(ValueError, match="2 true labels but 1 predictions"):
        evaluate(["a", "b"], ["a"], Taxonomy())
    with pytest.raises(ValueError, match="empty"):
        evaluate([], [], Taxonomy())
    assert confusion_matrix(["x"], ["y"], ["y", "x"]).tolist() == [[0, 0], [1, 0]]


# --- training pieces -------------------------------------------------------------------------


def test_class_weights_balance_present_classes_and_ignore_absent_ones() -> None:
    weights = class_weights(torch.tensor([3, 1, 0]))
    assert weights.tolist() == pytest.approx([4 / 6, 4 / 2, 0.0])


def test_augmenter_without_jitter_is_an_exact_flip() -> None:
    config = TrainConfig(flip_probability=1.0, brightness=0.0, contrast=0.0)
    batch = torch.randn(4, 3, 8, 8) * 0.5
    out = Augmenter(config, torch.Generator().manual_seed(0))(batch.clamp(-1.5, 1.5))
    assert torch.allclose(out, batch.clamp(-1.5, 1.5).flip(-1), atol=1e-5)


def test_augmenter_jitter_stays_in_the_valid_pixel_range() -> None:
    config = TrainConfig(brightness=0.5, contrast=0.5)
    batch = torch.randn(16, 3, 8, 8) * 3
    out = Augmenter(config, torch.Generator().manual_seed(1))(batch)
    mean = torch.tensor(config.mean).view(1, 3, 1, 1)
    std = torch.tensor(config.std).view(1, 3, 1, 1)
    pixels = out * std + mean
    assert out.shape == batch.shape
    assert float(pixels.min()) >= -1e-5
    assert float(pixels.max()) <= 1 + 1e-5


def test_a_last_batch_of_one_item_is_dropped_so_batch_norm_can_train() -> None:
    """compact-cnn at 16 px ends in a 1x1 feature map, where batch norm in train mode cannot
    normalise a batch of one item: 5 items in batches of 4 train one batch an epoch (with
    weighted sampling too), a last batch of two is kept, and a dataset no larger than one
    batch still trains."""

    def noise(items: int) -> ManifestDataset:
        rng = np.random.default_rng(0)
        labels = ["a", "b"] * (items // 2) + ["a"] * (items % 2)
        inputs = rng.standard_normal((items, 3, 16, 16)).astype(np.float32)
        return ManifestDataset(LoadedItems(inputs, labels, labels), ["a", "b"])

    def two_classes() -> torch.nn.Module:
        return build_model("compact-cnn", 2)

    for balance in ("loss", "sampler"):
        config = TrainConfig(epochs=2, batch_size=4, balance=balance)
        assert len(train_classifier(two_classes, noise(5), None, config).history) == 2
        assert len(_Run(two_classes, noise(5), config, "cpu").loader) == 1
        assert len(_Run(two_classes, noise(6), config, "cpu").loader) == 2
    assert len(train_classifier(two_classes, noise(3), None, config).history) == 2


def test_training_beats_chance_on_its_own_training_data(
    world: TinyWorld, trained: TrainingOutcome
) -> None:
    classes = model_classes(world.manifest)
    preprocessor = preprocessor_for(world.settings)
    train = ManifestDataset(
        load_items(world.store, items_in(world.manifest, ["train"]), preprocessor), classes
    )
    model = build_model(world.settings.architecture, len(classes))
    state = torch.load(
        world.store.root / model_key("binloop-waste", trained.version, "model.pt"),
        weights_only=True,
    )
    model.load_state_dict(state)
    accuracy = float(
        (predict_logits(model, train.inputs).argmax(1) == train.targets).float().mean()
    )
    assert accuracy > 0.6, f"train accuracy {accuracy:.2f} is barely above chance (1/3)"


def test_training_is_deterministic_for_a_seed(world: TinyWorld) -> None:
    preprocessor = preprocessor_for(world.settings)
    classes = model_classes(world.manifest)
    data = ManifestDataset(load_items(world.store, world.manifest.items, preprocessor), classes)
    config = dataclasses.replace(train_config(world.settings), epochs=3)

    def run() -> torch.Tensor:
        result = train_classifier(lambda: build_model("compact-cnn", 3), data, None, config)
        return predict_logits(result.model, data.inputs)

    assert torch.equal(run(), run())


def test_onnx_export_matches_torch_for_any_batch_size(
    trained: TrainingOutcome, world: TinyWorld
) -> None:
    assert trained.parity_max_abs_diff <= 1e-3
    model = build_model("compact-cnn", 3)
    model.load_state_dict(
        torch.load(
            world.store.root / model_key("binloop-waste", trained.version, "model.pt"),
            weights_only=True,
        )
    )
    session = onnx_session(export_onnx(model, world.settings.input_size))
    inputs = world.eval_set.loaded.inputs
    assert onnx_logits(session, inputs[:1]).shape == (1, 3)
    assert onnx_logits(session, inputs).shape == (len(inputs), 3)
    assert parity_max_abs_diff(model, session, inputs) <= 1e-3


def test_the_exported_model_gives_the_edge_probabilities_and_embedding_in_one_pass(
    trained: TrainingOutcome, world: TinyWorld, tmp_path: Path
) -> None:
    onnx_bytes = read_verified(trained.artifact)
    outputs = onnx.load_model_from_string(onnx_bytes).graph.output
    assert [output.name for output in outputs] == ["logits", "embedding"]
    assert trained.embedding_parity_max_abs_diff is not None
    assert trained.embedding_parity_max_abs_diff <= 1e-3

    model = build_model("compact-cnn", 3)
    model.load_state_dict(
        torch.load(
            world.store.root / model_key("binloop-waste", trained.version, "model.pt"),
            weights_only=True,
        )
    )
    assert isinstance(model, CompactCNN)
    onnx_path = tmp_path / "model.onnx"
    onnx_path.write_bytes(onnx_bytes)
    backend = OnnxBackend(onnx_path, ModelCard.model_validate_json(read_verified(trained.card_ref)))
    inputs = world.eval_set.loaded.inputs
    probabilities, embedding = backend.predict_with_embedding(inputs)

    with torch.no_grad():
        logits, expected = model.eval().logits_and_embedding(torch.from_numpy(inputs))
    assert embedding is not None
    assert embedding.shape == (len(inputs), 128)  # the pooled features of the last stage
    np.testing.assert_allclose(embedding, expected.numpy(), atol=1e-4)
    np.testing.assert_allclose(probabilities, torch.softmax(logits, 1).numpy(), atol=1e-5)
    np.testing.assert_allclose(probabilities, backend.predict(inputs), atol=1e-6)
    embedded = backend.embed(inputs)
    assert embedded is not None
    np.testing.assert_allclose(embedding, embedded, atol=1e-6)


def test_a_network_without_an_embedding_exports_logits_only(world: TinyWorld) -> None:
    logits_only = torch.nn.Sequential(
        torch.nn.Conv2d(3, 4, 3, stride=4),
        torch.nn.AdaptiveAvgPool2d(1),
        torch.nn.Flatten(),
        torch.nn.Linear(4, 3),
    )
    session = onnx_session(export_onnx(logits_only, world.settings.input_size))
    inputs = world.eval_set.loaded.inputs[:4]
    assert [output.name for output in session.get_outputs()] == ["logits"]
    assert onnx_embeddings(session, inputs) is None
    assert embedding_parity_max_abs_diff(logits_only, session, inputs) is None
    assert parity_max_abs_diff(logits_only, session, inputs) <= 1e-4


def test_a_graph_that_lost_the_embedding_fails_parity(world: TinyWorld) -> None:
    model = build_model("compact-cnn", 3)
    inputs = world.eval_set.loaded.inputs[:4]
    logits_only = onnx_session(export_onnx(torch.nn.Sequential(model), world.settings.input_size))
    with pytest.raises(ParityError, match="no 'embedding'"):
        embedding_parity_max_abs_diff(model, logits_only, inputs)


def test_parity_beyond_tolerance_or_nan_fails_the_run() -> None:
    check_parity(5e-4, 1e-3)
    with pytest.raises(ParityError, match=r"disagree by 0\.01 on the logits"):
        check_parity(0.01, 1e-3)
    with pytest.raises(ParityError, match=r"disagree by 0\.01 on the embedding"):
        check_parity(0.01, 1e-3, "embedding")
    with pytest.raises(ParityError):
        check_parity(float("nan"), 1e-3)


# --- whole runs ------------------------------------------------------------------------------


def test_run_stores_complete_artifacts_and_a_card_that_reproduces_preprocessing(
    world: TinyWorld, trained: TrainingOutcome
) -> None:
    card = ModelCard.model_validate_json(read_verified(trained.card_ref))
    assert card.classes == list(TINY_CLASSES)
    assert card.dataset_name == "tiny"
    assert card.dataset_version == world.manifest.version
    assert card.metrics == trained.metrics
    assert card.parameters < 1_000_000
    assert trained.metrics.eval_set_id == folder_content_id(world.root / "eval")
    assert trained.metrics.eval_items == 12
    assert set(trained.metrics.per_class_f1) <= set(TINY_CLASSES)
    graph = onnx.load_model_from_string(read_verified(trained.artifact)).graph
    [graph_input] = graph.input
    batch_axis = graph_input.type.tensor_type.shape.dim[0]
    assert (graph_input.name, batch_axis.dim_param) == ("input", "batch")
    assert read_verified(trained.confusion_ref)[:8] == b"\x89PNG\r\n\x1a\n"
    # The card alone reproduces the trainer's preprocessing, bit for bit.
    image = decode_rgb(sorted((world.root / "eval" / "glass").glob("*.jpg"))[0].read_bytes())
    np.testing.assert_array_equal(
        Preprocessor.from_card(card)(image), preprocessor_for(world.settings)(image)
    )


def test_versions_increase_and_record_the_parent(
    world: TinyWorld, trained: TrainingOutcome
) -> None:
    settings = world.settings.model_copy(update={"epochs": 2})
    second = run_training(
        world.store, world.manifest, world.eval_set, settings, parent_version=trained.version
    )
    assert second.version == trained.version + 1
    assert second.card.parent_version == trained.version
    assert next_model_version(world.store, "binloop-waste") == second.version + 1
    event = second.completed_event("trainer")
    assert event.parent_version == trained.version
    assert event.artifact.key == model_key("binloop-waste", second.version, "model.onnx")


def test_unreadable_items_are_skipped_and_counted(world: TinyWorld) -> None:
    garbage = b"definitely not a jpeg"
    garbage_key = world.store.put("imports/tiny/garbage.jpg", garbage).key
    real = world.manifest.items[0]
    items = [
        *world.manifest.items,
        ManifestItem(key=garbage_key, sha256=sha256_hex(garbage), label="glass", split="train"),
        # A blob that does not hash to what the manifest promises.
        ManifestItem(key=real.key, sha256="0" * 64, label=real.label, split="train"),
    ]
    manifest = world.manifest.model_copy(update={"version": 99, "items": items})
    outcome = run_training(
        world.store,
        manifest,
        world.eval_set,
        world.settings.model_copy(update={"epochs": 2}),
        parent_version=None,
    )
    assert len(outcome.skipped) == 2
    assert "CorruptFrameError" in outcome.skipped[garbage_key]
    assert "ChecksumMismatchError" in outcome.skipped[real.key]
    assert "2 unreadable items skipped" in outcome.card.notes


def test_too_few_items_is_a_permanent_error_with_the_reason(world: TinyWorld) -> None:
    few = world.manifest.model_copy(update={"items": world.manifest.items[:5]})
    with pytest.raises(InsufficientDataError, match="needs at least 12"):
        run_training(world.store, few, world.eval_set, world.settings, parent_version=None)
    one_class = world.manifest.model_copy(
        update={"items": [i for i in world.manifest.items if i.label == "glass"] * 2}
    )
    with pytest.raises(InsufficientDataError, match="1 class"):
        run_training(world.store, one_class, world.eval_set, world.settings, parent_version=None)


def test_a_corrupt_manifest_is_a_permanent_error_that_names_it(tmp_path: Path) -> None:
    """Reading it again cannot help: dead-lettered at once, not retried max_deliveries times."""
    store = LocalBlobStore(tmp_path / "blobs")
    key = store.put(dataset_key("bins", 1), b'{"name": "bins", "version": 1}').key
    request = TrainingRequested(producer="test", dataset_name="bins", dataset_version=1)

    with pytest.raises(PermanentError, match=f"{re.escape(key)} is not a valid dataset manifest"):
        manifest_for_request(store, request)


def test_eval_set_is_imported_once_per_content(world: TinyWorld) -> None:
    again = ensure_eval_set(
        world.store, world.root / "eval", world.settings.eval_dataset_name, taxonomy_version="t"
    )
    assert again.version == world.eval_set.manifest.version
    assert again.content_id() == folder_content_id(world.root / "eval")


def test_an_evaluation_set_with_an_unreadable_item_is_refused(world: TinyWorld) -> None:
    """Every model is scored on all of it, or the eval_set_id would name a different set."""
    item = world.eval_set.manifest.items[0]
    original = world.store.get(item.key)
    world.store.put(item.key, b"not a jpeg any more", "image/jpeg")
    try:
        with pytest.raises(PermanentError, match=r"has 1 unreadable items, e\.g\. .*Checksum"):
            load_eval_set(world.store, world.settings)
    finally:
        world.store.put(item.key, original, "image/jpeg")
    assert len(load_eval_set(world.store, world.settings).loaded) == len(
        world.eval_set.manifest.items
    )


# --- the service on a real bus ---------------------------------------------------------------


@pytest.mark.integration
async def test_service_trains_on_snapshots_and_requests(
    js: JetStreamContext,
    nats_client: Client,
    nats_server: NatsServer,
    tmp_path: Path,
    blob_store: LocalBlobStore,
) -> None:
    shutil.copytree(DEMO / "eval", tmp_path / "eval")
    settings = _settings(
        tmp_path, nats_url=nats_server.url, blob_root=blob_store.root, epochs=4, retry_delay_s=0.05
    )
    seed, seed_ref = import_image_folder(
        blob_store, DEMO / "seed", "seed", taxonomy_version="trashnet-6", classes=Taxonomy().labels
    )
    tiny = DatasetManifest(
        name="tiny",
        version=1,
        created_at=utc_now(),
        taxonomy_version="t",
        classes=["a", "b"],
        items=seed.items[:3],
    )
    tiny_ref = write_manifest(blob_store, tiny)
    # A champion promoted before the trainer starts: it must become the parent of what it trains.
    champion = ModelPromoted(
        producer="test",
        model_name="binloop-waste",
        model_version=7,
        previous_version=None,
        artifact=seed_ref,
        card=seed_ref,
        metrics=_some_metrics(),
        reason="earlier",
    )
    await js.publish(MODELS_PROMOTED.subject(), champion.model_dump_json().encode())

    completed = await Collector(TrainingCompleted).attach(nats_client, TRAINING_COMPLETED.subject())
    dead = await Collector(DeadLetter).attach(nats_client, DLQ.wildcard)
    service = create_app(settings)
    await service.start()
    try:
        snapshot = DatasetSnapshot(
            producer="test",
            name="seed",
            version=seed.version,
            manifest=seed_ref,
            num_items=len(seed.items),
            class_counts=seed.class_counts(),
            taxonomy_version="trashnet-6",
        )
        await js.publish(DATASETS_SNAPSHOT.subject(), snapshot.model_dump_json().encode())
        first = (await completed.wait_for(1, timeout=60))[0]
        # The same event again, as after a lost ack: announced again, not trained again.
        await js.publish(DATASETS_SNAPSHOT.subject(), snapshot.model_dump_json().encode())
        repeated = (await completed.wait_for(2, timeout=60))[1]
        await js.publish(
            TRAINING_REQUESTED.subject(),
            TrainingRequested(producer="test", dataset_name="seed").model_dump_json().encode(),
        )
        too_small = snapshot.model_copy(
            update={
                "event_id": uuid.uuid4(),
                "name": "tiny",
                "version": 1,
                "manifest": tiny_ref,
                "num_items": 3,
            }
        )
        await js.publish(DATASETS_SNAPSHOT.subject(), too_small.model_dump_json().encode())
        second = (await completed.wait_for(3, timeout=60))[2]
        letters = await dead.wait_for(1, timeout=30)
    finally:
        await service.stop()

    assert (first.model_version, first.parent_version) == (1, 7)
    assert repeated == first  # same model, same (derived) event id: JetStream keeps one
    assert (second.model_version, second.parent_version) == (2, 7)
    assert not blob_store.exists(model_key("binloop-waste", 3, "model.onnx"))
    assert (first.dataset_name, first.dataset_version) == ("seed", seed.version)
    assert second.dataset_version == seed.version
    assert first.metrics.eval_items == 120
    assert first.metrics.eval_set_id == folder_content_id(DEMO / "eval")
    assert first.onnx_parity_max_abs_diff <= 1e-3
    card = ModelCard.model_validate_json(read_verified(first.card))
    assert (card.version, card.parent_version) == (1, 7)
    assert card.classes == Taxonomy().labels
    assert read_verified(first.artifact) == blob_store.get(
        model_key("binloop-waste", 1, "model.onnx")
    )
    assert blob_store.exists(model_key("binloop-waste", 1, "confusion.png"))
    [letter] = letters
    assert letter.service == "trainer"
    assert letter.error_type == "InsufficientDataError"
    assert "needs at least 12" in letter.error


def _some_metrics() -> ModelMetrics:
    return ModelMetrics(
        eval_set_id="c" * 64,
        eval_items=1,
        accuracy=0.5,
        macro_f1=0.5,
        compartment_accuracy=0.5,
        per_class_f1={},
    )


def _raced_pair(ref: BlobRef) -> tuple[ModelRolledBack, ModelPromoted]:
    """The registry made v2 champion over v1 (replacing champion revision 1); an operator
    rolled back to v1 (replacing revision 2) before the registry published that promotion,
    whose clock runs ahead of the operator's: the rollback is the newer decision, the
    promotion the later event."""
    rollback = ModelRolledBack(
        producer="binloop-cli",
        model_name="binloop-waste",
        from_version=2,
        to_version=1,
        artifact=ref,
        card=ref,
        reason="regression",
        champion_revision=2,
    )
    overtaken = ModelPromoted(
        producer="model-registry",
        model_name="binloop-waste",
        model_version=2,
        previous_version=1,
        artifact=ref,
        card=ref,
        metrics=_some_metrics(),
        reason="better",
        champion_revision=1,
        occurred_at=rollback.occurred_at + timedelta(seconds=5),
    )
    return rollback, overtaken


@pytest.mark.integration
@pytest.mark.parametrize("rollback_first", [True, False])
async def test_a_restarted_trainer_keeps_the_rollback_that_overtook_the_promotion_it_undid(
    js: JetStreamContext, blob_store: LocalBlobStore, rollback_first: bool
) -> None:
    ref = blob_store.put("models/binloop-waste/v1/model.onnx", b"onnx")
    rollback, overtaken = _raced_pair(ref)
    published = [(MODELS_ROLLED_BACK, rollback), (MODELS_PROMOTED, overtaken)]
    for route, event in published if rollback_first else reversed(published):
        await js.publish(route.subject(), event.model_dump_json().encode())

    state = TrainerState()
    await recall_champion(js, "binloop-waste", state)

    assert state.champion == 1


@pytest.mark.integration
async def test_an_unreadable_last_promotion_does_not_stop_the_trainer_from_starting(
    js: JetStreamContext, blob_store: LocalBlobStore
) -> None:
    """recall_champion runs when the trainer starts: a last message it cannot read (a foreign
    publish, a newer registry's event with a field this one does not know) is left to the
    consumers, which dead-letter it, and the rollback beside it still names the champion."""
    ref = blob_store.put("models/binloop-waste/v1/model.onnx", b"onnx")
    rollback, _ = _raced_pair(ref)
    await js.publish(MODELS_ROLLED_BACK.subject(), rollback.model_dump_json().encode())
    await js.publish(MODELS_PROMOTED.subject(), b'{"not": "a promotion"}')

    state = TrainerState()
    await recall_champion(js, "binloop-waste", state)

    assert state.champion == 1


def test_the_trainer_follows_the_registrys_order_not_the_order_of_arrival() -> None:
    ref = BlobRef(uri="file:///m", key="m", sha256="a" * 64, size=1)
    rollback, overtaken = _raced_pair(ref)
    for arrival in ([rollback, overtaken], [overtaken, rollback]):
        state = TrainerState()
        for event in arrival:
            state.follow(update_for(event))
        assert state.champion == 1, arrival
    # A rollback to the champion followed already is the decision on record too.
    promoted_v1 = overtaken.model_copy(
        update={"model_version": 1, "previous_version": None, "champion_revision": 0}
    )
    state = TrainerState()
    for event in (promoted_v1, rollback, overtaken):
        state.follow(update_for(event))
    assert state.champion == 1


def test_a_run_with_enough_val_items_bakes_the_fitted_temperature_into_the_graph(
    world: TinyWorld,
) -> None:
    settings = world.settings.model_copy(update={"epochs": 3, "min_val_items": 2})
    outcome = run_training(
        world.store, world.manifest, world.eval_set, settings, parent_version=None
    )
    match = re.search(r"temperature T=([0-9.]+) is built into the ONNX graph", outcome.card.notes)
    assert match is not None, outcome.card.notes
    temperature = float(match.group(1))
    assert temperature != 1.0
    model = build_model("compact-cnn", 3)
    model.load_state_dict(
        torch.load(
            world.store.root / model_key("binloop-waste", outcome.version, "model.pt"),
            weights_only=True,
        )
    )
    inputs = world.eval_set.loaded.inputs
    with torch.no_grad():
        raw = model.eval()(torch.from_numpy(inputs)).numpy()
    exported = onnx_logits(onnx_session(read_verified(outcome.artifact)), inputs)
    np.testing.assert_allclose(exported, raw / temperature, rtol=1e-3, atol=1e-4)


def _perfect_report(classes: list[str]) -> EvalReport:
    return EvalReport(
        labels=classes,
        confusion=np.eye(len(classes), dtype=np.int64),
        accuracy=1.0,
        macro_f1=1.0,
        per_class_f1=dict.fromkeys(classes, 1.0),
        compartment_accuracy=1.0,
    )


def test_two_writers_that_guess_one_model_version_claim_different_ones(tmp_path: Path) -> None:
    store = LocalBlobStore(tmp_path / "blobs")
    # The trainer and `binloop import-model` both list the store before either has written.
    assert next_model_version(store, "waste") == next_model_version(store, "waste") == 1
    trainer = claim_model_version(store, "waste", "trainer")
    importer = claim_model_version(store, "waste", "model-import")
    assert (trainer.version, importer.version) == (1, 2)
    assert next_model_version(store, "waste") == 3  # a claim alone takes its number


def test_storing_a_model_version_claimed_by_another_writer_leaves_its_artifact_intact(
    tmp_path: Path,
) -> None:
    store = LocalBlobStore(tmp_path / "blobs")
    classes = ["glass", "paper"]
    report = _perfect_report(classes)
    first_claim = claim_model_version(store, "waste", "trainer")
    first = store_model(
        store,
        make_card(classes, name="waste", version=1),
        b"onnx-A" * 100,
        report,
        claim=first_claim,
    )
    # A second writer that skipped the claim (or forged one) for the same number is refused
    # before it writes a byte.
    forged = dataclasses.replace(first_claim, claim_id="not-the-first-one", claimant="import")
    with pytest.raises(UnclaimedVersionError, match="waste v1 is not claimed by import"):
        store_model(
            store,
            make_card(classes, name="waste", version=1),
            b"onnx-B" * 100,
            report,
            claim=forged,
        )
    # What a bin downloads for the promoted v1 still hashes to what models.promoted says.
    assert sha256_hex(store.get(first.artifact.key)) == first.artifact.sha256
    assert read_verified(first.artifact) == b"onnx-A" * 100
