"""Importing an externally trained model (binloop.model_import, `binloop import-model`): scored
on the trainer's eval set, stored as the next version, and decided on by the real
model-registry over a real nats-server, like a trained candidate."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import sys
from pathlib import Path

import pytest
from nats.aio.client import Client
from nats.js.client import JetStreamContext

from binloop.errors import ConfigError, ModelLoadError
from binloop.ml.card import ModelCard
from binloop.ml.shipped import SHIPPED_MODEL
from binloop.model_import import (
    AlreadyHasModelsError,
    configured_registry_bucket,
    import_model,
    registry_champion,
)
from binloop.natsserver import NatsServer
from binloop.storage import LocalBlobStore, read_verified, sha256_hex
from schemas.events import ModelPromoted, ModelRegistered
from schemas.routes import MODELS_PROMOTED, MODELS_REGISTERED
from services.model_registry import RegistrySettings
from services.model_registry import create_app as create_registry
from services.model_registry.settings import DEFAULT_KV_BUCKET
from services.trainer.core import next_model_version
from services.trainer.data import folder_content_id
from services.trainer.external import import_external_model
from services.trainer.settings import TrainerSettings
from tests.helpers import Collector
from tests.modelfactory import make_onnx_model

DEMO_EVAL = Path(__file__).resolve().parents[1] / "data" / "demo" / "eval"
CLASSES = ["cardboard", "glass", "metal", "paper", "plastic", "trash"]


@pytest.fixture
def eval_dir(tmp_path: Path) -> Path:
    """Four demo eval photos per class: the import scores on all of them."""
    for label in CLASSES:
        (tmp_path / "eval" / label).mkdir(parents=True)
        for image in sorted((DEMO_EVAL / label).glob("*.jpg"))[:4]:
            shutil.copy(image, tmp_path / "eval" / label / image.name)
    return tmp_path / "eval"


def _settings(
    blob_root: Path, eval_dir: Path, nats_url: str = "nats://127.0.0.1:1"
) -> TrainerSettings:
    return TrainerSettings(blob_root=blob_root, eval_dir=eval_dir, nats_url=nats_url, http_port=0)


@pytest.mark.integration
async def test_imported_model_is_promoted_first_and_an_equal_one_is_rejected(
    nats_client: Client,
    nats_server: NatsServer,
    blob_store: LocalBlobStore,
    eval_dir: Path,
) -> None:
    registered = await Collector(ModelRegistered).attach(nats_client, MODELS_REGISTERED.subject())
    promoted = await Collector(ModelPromoted).attach(nats_client, MODELS_PROMOTED.subject())
    registry = create_registry(RegistrySettings(nats_url=nats_server.url, http_port=0))
    await registry.start()
    settings = _settings(blob_store.root, eval_dir, nats_server.url)
    env = {
        **os.environ,
        "BINLOOP_NATS_URL": nats_server.url,
        "BINLOOP_BLOB_ROOT": str(blob_store.root),
    }
    try:
        first = await import_model(SHIPPED_MODEL, None, settings, wait_s=30)
        await promoted.wait_for(1)
        # The same model again, through the command: not better than itself, so rejected.
        command = await asyncio.create_subprocess_exec(
            *(sys.executable, "-m", "binloop.cli", "import-model"),
            *("--eval-dir", str(eval_dir), "--wait", "30"),
            env=env,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
        )
        output, _ = await asyncio.wait_for(command.communicate(), 120)
        await registered.wait_for(2)
    finally:
        await registry.stop()

    assert first.registered is not None
    assert (first.registered.model_version, first.registered.decision) == (1, "promoted")
    [promotion] = promoted.items
    assert (promotion.model_name, promotion.model_version) == ("binloop-waste", 1)
    assert promotion.artifact.sha256 == sha256_hex(SHIPPED_MODEL.read_bytes())
    metrics = first.completed.metrics
    assert metrics.eval_set_id == folder_content_id(eval_dir)  # what the trainer measures on
    assert metrics.eval_items == 24
    stored_card = ModelCard.model_validate_json(read_verified(promotion.card))
    assert (stored_card.name, stored_card.version, stored_card.metrics) == (
        "binloop-waste",
        1,
        metrics,
    )
    assert stored_card == first.card

    text = output.decode()
    assert command.returncode == 0, text
    assert "imported binloop-waste v2" in text
    assert "registry: rejected" in text
    second = registered.items[1]
    assert (second.model_version, second.decision, second.champion_version) == (2, "rejected", 1)
    assert "not better by the margin" in second.reason
    assert second.metrics == metrics
    assert len(promoted.items) == 1


@pytest.mark.integration
async def test_only_first_imports_until_the_registry_has_a_champion(
    nats_server: NatsServer,
    js: JetStreamContext,
    blob_store: LocalBlobStore,
    eval_dir: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The registry's bucket is configured (BINLOOP_KV_BUCKET), not the default: the import
    # must look where the registry writes.
    bucket = "import-models"
    monkeypatch.setenv("BINLOOP_KV_BUCKET", bucket)
    settings = _settings(blob_store.root, eval_dir, nats_server.url)
    # Stored and announced, but no registry ran: nothing registered it, so it counts as not done.
    unregistered = await import_model(SHIPPED_MODEL, None, settings, only_first=True)
    assert unregistered.completed.model_version == 1
    registry = create_registry(
        RegistrySettings(nats_url=nats_server.url, http_port=0, kv_bucket=bucket)
    )
    await registry.start()
    try:
        # The registry reads the v1 announcement from JetStream and promotes it.
        for _ in range(200):
            if await registry_champion(js, "binloop-waste", bucket) == 1:
                break
            await asyncio.sleep(0.05)
        assert await registry_champion(js, "binloop-waste", bucket) == 1
        assert await registry_champion(js, "binloop-waste", DEFAULT_KV_BUCKET) is None
        with pytest.raises(AlreadyHasModelsError, match=r"champion of binloop-waste is v\d"):
            await import_model(SHIPPED_MODEL, None, settings, only_first=True)
        # What compose runs at every start: once there is a champion, nothing happens.
        command = await asyncio.create_subprocess_exec(
            *(sys.executable, "-m", "binloop.cli", "import-model", "--only-first"),
            *("--eval-dir", str(eval_dir), "--wait", "0"),
            env={
                **os.environ,
                "BINLOOP_NATS_URL": nats_server.url,
                "BINLOOP_BLOB_ROOT": str(blob_store.root),
            },
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
        )
        output, _ = await asyncio.wait_for(command.communicate(), 120)
    finally:
        await registry.stop()
    assert command.returncode == 0, output.decode()
    assert "nothing imported" in output.decode()
    assert f"(bucket {bucket})" in " ".join(output.decode().split())
    assert next_model_version(blob_store, "binloop-waste") == 2  # v1 only


def test_the_registry_bucket_comes_from_the_registry_settings(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    assert configured_registry_bucket() == DEFAULT_KV_BUCKET
    monkeypatch.setenv("BINLOOP_KV_BUCKET", "custom-models")
    assert configured_registry_bucket() == "custom-models"
    monkeypatch.setenv("BINLOOP_KV_BUCKET", "no.dots")
    with pytest.raises(ConfigError, match="kv_bucket"):
        configured_registry_bucket()


def test_a_model_a_bin_could_not_serve_is_refused_before_anything_is_stored(
    tmp_path: Path, eval_dir: Path
) -> None:
    onnx, card_path = make_onnx_model(tmp_path / "model", CLASSES)
    card = ModelCard.read(card_path)
    card.model_copy(update={"classes": CLASSES[:5]}).write(card_path)
    settings = _settings(tmp_path / "blobs", eval_dir)
    store = LocalBlobStore(settings.blob_root)

    with pytest.raises(ModelLoadError, match="outputs 6 scores, the card lists 5 classes"):
        import_external_model(store, settings, onnx, card_path)

    assert store.list("models/") == []


def test_a_card_whose_dataset_name_no_event_can_carry_is_imported_as_external(
    tmp_path: Path, eval_dir: Path
) -> None:
    """`binloop train` once recorded its source's full path as the card's dataset_name, of any
    length; TrainingCompleted.dataset_name holds at most 128 characters."""
    onnx, card_path = make_onnx_model(tmp_path / "model", CLASSES)
    long_folder = "/mnt/datasets/" + "/".join(["waste-sorting-photos-2026"] * 5)
    card = ModelCard.read(card_path)
    card.model_copy(update={"dataset_name": f"ImageFolder {long_folder}"}).write(card_path)
    settings = _settings(tmp_path / "blobs", eval_dir)

    outcome = import_external_model(LocalBlobStore(settings.blob_root), settings, onnx, card_path)

    completed = outcome.completed_event("model-import")
    assert completed.model_version == outcome.version == 1
    assert (completed.dataset_name, completed.dataset_version) == ("external", 1)


def test_a_card_no_announcement_can_carry_is_refused_before_anything_is_stored(
    tmp_path: Path, eval_dir: Path
) -> None:
    """A version stored but never announced is not registered, and every retry of the import
    would store one more."""
    onnx, card_path = make_onnx_model(tmp_path / "model", CLASSES)
    card = ModelCard.read(card_path)
    card.model_copy(update={"onnx_parity_max_abs_diff": -1.0}).write(card_path)
    settings = _settings(tmp_path / "blobs", eval_dir)
    store = LocalBlobStore(settings.blob_root)

    with pytest.raises(ModelLoadError, match=r"cannot be announced as training\.completed"):
        import_external_model(store, settings, onnx, card_path)

    assert store.list("models/") == []


def test_a_hand_written_card_with_a_misspelt_key_is_refused(tmp_path: Path, eval_dir: Path) -> None:
    """Bins read cards past keys they do not know (a newer trainer's); an imported card is
    someone's file, where such a key is a typo that would change what the model means."""
    onnx, card_path = make_onnx_model(tmp_path / "model", CLASSES)
    card = json.loads(card_path.read_text())
    card_path.write_text(json.dumps(card | {"outputs": "probabilities"}))
    settings = _settings(tmp_path / "blobs", eval_dir)
    store = LocalBlobStore(settings.blob_root)

    with pytest.raises(ModelLoadError, match="outputs"):
        import_external_model(store, settings, onnx, card_path)
    assert store.list("models/") == []
