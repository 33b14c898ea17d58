"""The embedded default: one local nats-server, a local blob folder and every service in one
process, running the whole loop on a replayed stream of real waste photos.

By default the shipped classifier is imported as the first champion and served from the first
frame; the loop then labels, retrains, and the registry decides on each retrained candidate
against it. Without a start model, the first model is trained on the seed set instead and the
run lasts until a retrained one is promoted and served."""

from __future__ import annotations

import asyncio
import logging
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from binloop.datasets import DatasetManifest, import_image_folder
from binloop.errors import ConfigError
from binloop.ml.shipped import SHIPPED_MODEL
from binloop.monitor import BusMonitor, LoopStats
from binloop.natsserver import NatsServer
from binloop.runtime import ServiceApp, new_service
from binloop.settings import ServiceSettings
from binloop.storage import open_store
from schemas.base import BlobRef
from schemas.events import DatasetSnapshot
from schemas.routes import DATASETS_SNAPSHOT
from schemas.taxonomy import Taxonomy
from services.registry import SERVICES

log = logging.getLogger(__name__)

DEMO_DIR = Path(__file__).resolve().parent.parent / "data" / "demo"


@dataclass(frozen=True)
class LoopConfig:
    data_dir: Path = Path(".binloop/demo")
    seed_dir: Path = DEMO_DIR / "seed"
    eval_dir: Path = DEMO_DIR / "eval"
    stream_dir: Path = DEMO_DIR / "stream"
    bin_id: str = "bin-1"
    fps: float = 20.0
    max_passes: int = 20
    snapshot_every: int = 40
    frames_on_new_model: int = 40
    timeout_s: float = 900.0
    fresh: bool = True
    dataset: str = "binloop"
    start_model: Path | None = SHIPPED_MODEL
    """Imported as the first champion (card: the edge's rule) and served from the first frame.
    None: the first model is trained on the seed set, and the run waits for a retrained one to
    be promoted and served."""
    overrides: dict[str, dict[str, Any]] = field(default_factory=dict)


@dataclass
class LoopOutcome:
    stats: LoopStats
    nats_url: str
    champion_version: int | None
    finished: bool
    reason: str


def _start_model_file(config: LoopConfig) -> Path:
    """Where the start model is written as the registry imported it (its name and version),
    for the edge to serve from the first frame."""
    return config.data_dir.resolve() / "start-model" / "model.onnx"


def _service_overrides(config: LoopConfig, nats_url: str) -> dict[str, dict[str, Any]]:
    data = config.data_dir.resolve()
    common: dict[str, Any] = {
        "nats_url": nats_url,
        "http_port": 0,
        "http_host": "127.0.0.1",
        "blob_root": data / "blobs",
        "retry_delay_s": 1.0,
    }
    spool = {"spool_root": data / "spool"}
    per_service: dict[str, dict[str, Any]] = {
        "frame-ingestor": {
            **spool,
            "bin_id": config.bin_id,
            "source": str(config.stream_dir),
            "fps": config.fps,
            "loops": config.max_passes,
            "labels_from_folders": True,
        },
        "edge-inferencer": {
            **spool,
            "bin_id": config.bin_id,
            "model_cache": data / "edge-models",
            "default_model": _start_model_file(config) if config.start_model is not None else None,
        },
        "actuator": {"bin_id": config.bin_id, "state_dir": data / "actuator"},
        "uploader": {**spool, "bin_id": config.bin_id},
        "sampler": {},
        "labeling-bridge": {
            "backend": "oracle",
            "dataset_name": config.dataset,
            "snapshot_every": config.snapshot_every,
        },
        "trainer": {"eval_dir": config.eval_dir},
        "model-registry": {},
    }
    return {
        name: {**common, **values, **config.overrides.get(name, {})}
        for name, values in per_service.items()
    }


async def _wait_until(
    condition: Callable[[], bool], timeout_s: float, on_tick: Callable[[], None]
) -> bool:
    async def loop() -> None:
        while not condition():
            on_tick()
            await asyncio.sleep(0.25)

    try:
        await asyncio.wait_for(loop(), timeout_s)
    except TimeoutError:
        return False
    on_tick()
    return True


def _loop_verdict(
    stats: LoopStats, champion: int, frames_needed: int, *, until_promoted: bool
) -> str | None:
    """Why the run is over, or None while it is not: the registry promoted a retrained
    candidate (a version after `champion`) and it has been served on `frames_needed` frames,
    or, unless `until_promoted`, the registry rejected one."""
    retrained = [(v, decision, reason) for v, decision, reason in stats.registered if v > champion]
    promoted = [(v, reason) for v, decision, reason in retrained if decision == "promoted"]
    if promoted:
        version, reason = promoted[0]
        served = sum(n for v, n in stats.served_versions.items() if v >= version)
        if served < frames_needed:
            return None
        return f"retrained candidate v{version} promoted and served on {served} frames ({reason})"
    if retrained and not until_promoted:
        version, _, reason = retrained[0]
        return f"retrained candidate v{version} rejected ({reason})"
    return None


async def _first_champion(
    start_version: int | None,
    stats: LoopStats,
    timeout_s: float,
    tick: Callable[[], None],
) -> int | None:
    """The version the loop starts from, once promoted: the imported start model, or (None)
    the first model trained on the seed set. None when it was not promoted in time."""
    if start_version is None:
        promoted = await _wait_until(lambda: bool(stats.promoted), timeout_s, tick)
        return stats.promoted[0] if promoted else None

    def decided() -> bool:
        rejected = any(v == start_version and d == "rejected" for v, d, _ in stats.registered)
        return rejected or start_version in stats.promoted

    await _wait_until(decided, timeout_s, tick)
    return start_version if start_version in stats.promoted else None


async def run_loop(
    config: LoopConfig, on_tick: Callable[[LoopStats], None] = lambda _: None
) -> LoopOutcome:
    """Runs the whole loop until the registry has decided on a retrained candidate and a
    promoted one has been served on enough frames (see _loop_verdict), or the timeout, which
    counts from here (the drain after the loop, at most 120 s, comes on top)."""
    deadline = time.monotonic() + config.timeout_s
    _prepare_data_dir(config.data_dir, fresh=config.fresh)
    server = NatsServer(config.data_dir / "jetstream").start()
    monitor = BusMonitor(server.url)
    stats = monitor.stats
    apps: dict[str, ServiceApp] = {}
    started: list[ServiceApp] = []
    tick: Callable[[], None] = lambda: on_tick(stats)  # noqa: E731
    try:
        await monitor.start()
        overrides = _service_overrides(config, server.url)
        seed = _import_seed(config, overrides["trainer"]["blob_root"])
        start_version = None
        if config.start_model is not None:
            start_version = await _import_start_model(
                config.start_model, _start_model_file(config), overrides["trainer"]
            )
        for name, spec in SERVICES.items():
            apps[name] = spec.create(**overrides[name])
        for name, app in apps.items():
            if name != "frame-ingestor":
                await app.start()
                started.append(app)

        if start_version is None:
            await _publish_seed(seed, server.url)
        first = await _first_champion(start_version, stats, _left(deadline), tick)
        if first is None:
            why = next((r for v, _, r in stats.registered if v == start_version), "no decision")
            reason = (
                "no first model was promoted"
                if start_version is None
                else f"the start model v{start_version} was not promoted ({why})"
            )
            return LoopOutcome(stats, server.url, None, False, reason)

        await apps["frame-ingestor"].start()
        started.append(apps["frame-ingestor"])

        def verdict() -> str | None:
            until_promoted = start_version is None
            return _loop_verdict(
                stats, first, config.frames_on_new_model, until_promoted=until_promoted
            )

        finished = await _wait_until(lambda: verdict() is not None, _left(deadline), tick)
        await apps["frame-ingestor"].stop()
        started.remove(apps["frame-ingestor"])
        # Drain: every captured frame decided, actuated and safely stored before stopping.
        await _wait_until(lambda: not any(stats.lost().values()), 120.0, tick)
        champion = max(stats.promoted) if stats.promoted else None
        timed_out = f"timed out after {config.timeout_s:.0f}s"
        outcome = (verdict() if finished else None) or timed_out
        return LoopOutcome(stats, server.url, champion, finished, outcome)
    finally:
        await _stop_all(started, monitor, server)


def _left(deadline: float) -> float:
    return max(deadline - time.monotonic(), 0.0)


async def _stop_all(apps: list[ServiceApp], monitor: BusMonitor, server: NatsServer) -> None:
    """Everything stops, and nats-server last, even when one of them fails to stop cleanly."""
    try:
        for app in reversed(apps):
            try:
                await app.stop()
            except Exception:  # keep stopping the others; the error is shown, not lost
                log.exception("%s did not stop cleanly", app.name)
        await monitor.stop()
    finally:
        server.stop()


RUN_MARKER = ".binloop-run"


def _prepare_data_dir(data_dir: Path, *, fresh: bool) -> None:
    """A fresh run wipes the folder, but only one that an earlier run created (it holds the
    marker): `--data-dir .` must never delete a checkout."""
    if fresh and data_dir.exists():
        if not (data_dir / RUN_MARKER).exists() and any(data_dir.iterdir()):
            raise ConfigError(
                f"{data_dir} is not empty and was not created by `binloop up`; "
                "choose another --data-dir"
            )
        shutil.rmtree(data_dir)
    data_dir.mkdir(parents=True, exist_ok=True)
    (data_dir / RUN_MARKER).touch()


def _import_seed(config: LoopConfig, blob_root: Path) -> tuple[DatasetManifest, BlobRef]:
    """The first labeled dataset: a small seed folder, as version 1 of the dataset (the
    labeling bridge's snapshots build on it)."""
    taxonomy = Taxonomy()
    # The services read BINLOOP_BLOB_BACKEND and s3_* too: the seed goes where they will look.
    store = open_store(ServiceSettings(blob_root=blob_root, http_port=0))
    return import_image_folder(
        store,
        config.seed_dir,
        config.dataset,
        taxonomy_version=taxonomy.version,
        classes=taxonomy.labels,
        version=1,
    )


async def _import_start_model(
    start_model: Path, target: Path, trainer_overrides: dict[str, Any]
) -> int:
    """Imports the start model as the trainer scores its candidates (the same eval set, store
    and bus) and writes it, as imported (the registry's name and version on its card), to
    `target`, where the edge serves it from. Returns its version."""
    from binloop.model_import import import_model
    from services.trainer.settings import TrainerSettings

    imported = await import_model(start_model, None, TrainerSettings(**trainer_overrides))
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(start_model, target)
    imported.card.write(target.with_name("card.json"))
    return imported.completed.model_version


async def _publish_seed(seed: tuple[DatasetManifest, BlobRef], nats_url: str) -> None:
    """Announces the seed dataset, so the trainer trains the first model on it."""
    manifest, ref = seed
    seeder = new_service("seeder", ServiceSettings(nats_url=nats_url, http_port=0))
    await seeder.broker.connect()
    try:
        await seeder.publisher.publish(
            DATASETS_SNAPSHOT,
            DatasetSnapshot(
                producer="binloop-up",
                name=manifest.name,
                version=manifest.version,
                manifest=ref,
                num_items=len(manifest.items),
                class_counts=manifest.class_counts(),
                taxonomy_version=manifest.taxonomy_version,
            ),
        )
    finally:
        await seeder.broker.stop()
