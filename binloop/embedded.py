"""The embedded default: one local nats-server, a local blob folder and every service in one
process, running the whole loop on a replayed stream of real waste photos."""

from __future__ import annotations

import asyncio
import logging
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from binloop.datasets import import_image_folder
from binloop.errors import ConfigError
from binloop.monitor import BusMonitor, LoopStats
from binloop.natsserver import NatsServer
from binloop.runtime import ServiceApp, new_service
from binloop.settings import ServiceSettings
from binloop.storage import open_store
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
    overrides: dict[str, dict[str, Any]] = field(default_factory=dict)


@dataclass
class LoopOutcome:
    stats: LoopStats
    nats_url: str
    champion_version: int | None
    finished: bool
    reason: str


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
        "edge-inferencer": {**spool, "bin_id": config.bin_id, "model_cache": data / "edge-models"},
        "actuator": {"bin_id": config.bin_id},
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


async def run_loop(
    config: LoopConfig, on_tick: Callable[[LoopStats], None] = lambda _: None
) -> LoopOutcome:
    """Runs the whole loop until a retrained model is served on enough frames (or timeout)."""
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
        for name, spec in SERVICES.items():
            apps[name] = spec.create(**overrides[name])
        for name, app in apps.items():
            if name != "frame-ingestor":
                await app.start()
                started.append(app)

        await _publish_seed(config, overrides["trainer"]["blob_root"], server.url)
        if not await _wait_until(lambda: bool(stats.promoted), config.timeout_s, tick):
            return LoopOutcome(stats, server.url, None, False, "no first model was promoted")

        await apps["frame-ingestor"].start()
        started.append(apps["frame-ingestor"])
        first = stats.promoted[0]

        def retrained_model_served() -> bool:
            newer = [v for v in stats.promoted if v > first]
            return (
                bool(newer)
                and sum(n for v, n in stats.served_versions.items() if v >= min(newer))
                >= config.frames_on_new_model
            )

        finished = await _wait_until(retrained_model_served, config.timeout_s, tick)
        await apps["frame-ingestor"].stop()
        started.remove(apps["frame-ingestor"])
        # Drain: every captured frame decided, actuated and safely stored before stopping.
        await _wait_until(lambda: not any(stats.lost().values()), 120.0, tick)
        champion = max(stats.promoted) if stats.promoted else None
        reason = (
            "a retrained model was promoted and served"
            if finished
            else f"timed out after {config.timeout_s:.0f}s"
        )
        return LoopOutcome(stats, server.url, champion, finished, reason)
    finally:
        await _stop_all(started, monitor, server)


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


async def _publish_seed(config: LoopConfig, blob_root: Path, nats_url: str) -> None:
    """The first labeled dataset: a small seed folder, as version 1 of the dataset."""
    taxonomy = Taxonomy()
    # The services read BINLOOP_BLOB_BACKEND and s3_* too: the seed goes where they will look.
    store = open_store(ServiceSettings(blob_root=blob_root, http_port=0))
    manifest, ref = import_image_folder(
        store,
        config.seed_dir,
        config.dataset,
        taxonomy_version=taxonomy.version,
        classes=taxonomy.labels,
        version=1,
    )
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
