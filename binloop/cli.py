"""The `binloop` command: run the whole loop, run one service, record/replay, export docs."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import time
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer
from nats.errors import NoServersError as NatsNoServersError
from pydantic import ValidationError
from rich.console import Console
from rich.live import Live

from binloop.embedded import DEMO_DIR, LoopConfig, run_loop
from binloop.errors import BinloopError
from binloop.liveview import progress_line, render, summary
from binloop.ml.shipped import SHIPPED_MODEL
from binloop.monitor import LoopStats
from binloop.settings import ServiceSettings
from binloop.train_command import train_command
from services.registry import SERVICES

PROGRESS_EVERY_S = 10.0
"""How often a long command without a live view (`up --no-live`, `replay`, `record`) prints
where it is."""

app = typer.Typer(
    help="binloop: the ML data engine for smart waste-sorting bins.",
    no_args_is_help=True,
    add_completion=False,
)
console = Console()
S = TypeVar("S", bound=ServiceSettings)


def _setup_logging(level: str) -> None:
    logging.basicConfig(
        level=level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )


@app.command()
def up(
    data_dir: Annotated[Path, typer.Option(help="Where the run keeps its state")] = Path(
        ".binloop/demo"
    ),
    stream: Annotated[Path, typer.Option(help="Image folder replayed as the camera")] = DEMO_DIR
    / "stream",
    fps: Annotated[float, typer.Option(help="Frames per second of the replay")] = 20.0,
    timeout: Annotated[
        float,
        typer.Option(help="Give up after this many seconds (a final drain of at most 120 s aside)"),
    ] = 900.0,
    start_model: Annotated[
        str,
        typer.Option(
            help="First champion, served from the first frame: 'shipped' (the classifier "
            "binloop ships), an ONNX file with its card beside it, or 'none' (train the first "
            "model on the seed set, then run until a retrained one is promoted and served)"
        ),
    ] = "shipped",
    live: Annotated[bool, typer.Option(help="Show the live table")] = True,
    log_level: Annotated[str, typer.Option(help="Log level")] = "WARNING",
) -> None:
    """Start nats-server, a local blob store and every service; run the loop on a replay."""
    _setup_logging(log_level)
    if not stream.is_dir():
        raise typer.BadParameter(f"{stream} is not an image folder", param_hint="--stream")
    config = LoopConfig(
        data_dir=data_dir,
        stream_dir=stream,
        fps=fps,
        timeout_s=timeout,
        start_model=_start_model(start_model),
    )

    async def main() -> int:
        with (
            Live(console=console, refresh_per_second=4, transient=True)
            if live
            else (contextlib.nullcontext()) as view
        ):
            last_line = 0.0

            def tick(stats: LoopStats) -> None:
                nonlocal last_line
                if view is not None:
                    view.update(render(stats))
                elif time.monotonic() - last_line >= PROGRESS_EVERY_S:
                    last_line = time.monotonic()
                    console.print(progress_line(stats), soft_wrap=True)

            try:
                outcome = await run_loop(config, tick)
            except (BinloopError, OSError) as exc:  # a bad data folder, model or stream
                console.print(f"[red]binloop up: {exc}", soft_wrap=True)
                return 1
        console.print(summary(outcome.stats, outcome.reason))
        lost = sum(outcome.stats.lost().values()) + sum(outcome.stats.duplicates().values())
        return 0 if outcome.finished and lost == 0 else 1

    raise typer.Exit(asyncio.run(main()))


def _every(seconds: float, template: str) -> Callable[[int], None]:
    """A progress callback that prints `template` with the count at most every `seconds`."""
    last = time.monotonic()

    def report(count: int) -> None:
        nonlocal last
        if time.monotonic() - last >= seconds:
            last = time.monotonic()
            console.print(template.format(count))

    return report


def _start_model(choice: str) -> Path | None:
    if choice == "none":
        return None
    path = SHIPPED_MODEL if choice == "shipped" else Path(choice)
    if not path.is_file():
        raise typer.BadParameter(f"{path} is not a file", param_hint="--start-model")
    return path


def _settings_or_exit(settings_cls: type[S], **values: Any) -> S:
    """Settings from BINLOOP_* (and `values`); exit 1 naming each bad variable."""
    try:
        return settings_cls(**values)
    except ValidationError as exc:
        for error in exc.errors():
            key = ".".join(str(p) for p in error["loc"])
            console.print(f"[red]BINLOOP_{key.upper()}[/]: {error['msg']}")
        raise typer.Exit(1) from exc


@app.command()
def run(
    service: Annotated[str, typer.Argument(help=f"One of: {', '.join(SERVICES)}")],
    validate_config: Annotated[
        bool, typer.Option("--validate-config", help="Check settings and exit 0 or 1")
    ] = False,
    log_level: Annotated[str, typer.Option(help="Log level")] = "INFO",
    until_idle: Annotated[
        float | None,
        typer.Option(help="Exit once nothing has been waiting for this many seconds (a Job)"),
    ] = None,
) -> None:
    """Run one service as its own process (how compose and Kubernetes run them)."""
    if service not in SERVICES:
        console.print(f"[red]unknown service {service!r}; known: {', '.join(SERVICES)}")
        raise typer.Exit(2)
    settings_cls, factory = SERVICES[service].load()
    settings = _settings_or_exit(settings_cls)
    if validate_config:
        # Building the service (nothing is connected yet) runs its own start-up checks: the
        # sampler's policy file, the frame source, the labeling backend's settings.
        try:
            factory(settings)
        except (BinloopError, ValueError, OSError) as exc:
            console.print(f"[red]{service}: {exc}", soft_wrap=True)
            raise typer.Exit(1) from exc
        console.print(f"{service}: configuration is valid")
        console.print_json(settings.model_dump_json())
        return
    _setup_logging(log_level)
    service_app = factory(settings)
    if until_idle is None:
        asyncio.run(service_app.faststream_app().run())
        return

    async def run_until_idle(quiet_s: float) -> None:
        await service_app.start()
        idle = asyncio.create_task(service_app.wait_until_idle(quiet_s))
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            # Stop cleanly on eviction or deadline: in-flight messages are given back at once
            # instead of after their ack wait.
            loop.add_signal_handler(sig, idle.cancel)
        try:
            await idle
        except asyncio.CancelledError:
            pass
        finally:
            await service_app.stop()

    asyncio.run(run_until_idle(until_idle))


@app.command()
def record(
    out: Annotated[Path, typer.Argument(help="Replay file to write (JSON lines)")],
    subjects: Annotated[list[str], typer.Option("--subject", help="Subject filter(s)")],
    nats_url: Annotated[str, typer.Option(envvar="BINLOOP_NATS_URL")] = "nats://127.0.0.1:4222",
    embed_frames_from: Annotated[
        Path | None, typer.Option(help="Spool folder: embed frames so the file stands alone")
    ] = None,
    max_messages: Annotated[int | None, typer.Option(help="Stop after this many")] = None,
    reconnect_attempts: Annotated[
        int,
        typer.Option(
            help="When the server goes away, reconnect attempts (a second apart) before "
            "giving up; -1: never give up",
            min=-1,
        ),
    ] = -1,
) -> None:
    """Write chosen subjects to a replay file until Ctrl-C (or --max-messages)."""
    from binloop.replay import RecordingInterruptedError
    from binloop.replay import record as record_subjects

    async def main() -> int:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        return await record_subjects(
            nats_url,
            subjects,
            out,
            embed_frames_from=embed_frames_from,
            stop=stop,
            max_messages=max_messages,
            on_progress=_every(PROGRESS_EVERY_S, "recorded {} messages so far"),
            reconnect_attempts=reconnect_attempts,
        )

    try:
        count = asyncio.run(main())
    except (NatsNoServersError, OSError) as exc:
        console.print(f"[red]binloop record: cannot reach {nats_url} ({exc})", soft_wrap=True)
        raise typer.Exit(1) from exc
    except RecordingInterruptedError as exc:
        console.print(f"[red]binloop record: {exc}", soft_wrap=True)
        raise typer.Exit(1) from exc
    console.print(f"recorded {count} messages to {out}")


@app.command()
def replay(
    path: Annotated[Path, typer.Argument(help="Replay file written by `binloop record`")],
    speed: Annotated[
        float, typer.Option(help="1 = original timing, N = N times faster, 0 = as fast as possible")
    ] = 1.0,
    nats_url: Annotated[str, typer.Option(envvar="BINLOOP_NATS_URL")] = "nats://127.0.0.1:4222",
) -> None:
    """Publish a recorded stream again."""
    from binloop.replay import replay as replay_file

    if not path.is_file():
        console.print(f"[red]binloop replay: no replay file at {path}", soft_wrap=True)
        raise typer.Exit(1)
    try:
        outcome = asyncio.run(
            replay_file(
                nats_url,
                path,
                speed=speed,
                on_progress=_every(PROGRESS_EVERY_S, "replayed {} messages so far"),
            )
        )
    except (NatsNoServersError, OSError) as exc:
        console.print(f"[red]binloop replay: cannot reach {nats_url} ({exc})", soft_wrap=True)
        raise typer.Exit(1) from exc
    console.print(
        f"replayed {outcome.published} messages from {path} ({outcome.duplicates} already "
        f"stored, {outcome.bad_lines} bad lines, {outcome.unroutable} without a stream)"
    )
    if outcome.bad_lines or outcome.unroutable:
        raise typer.Exit(1)


@app.command("import-model")
def import_model(
    onnx: Annotated[
        Path | None,
        typer.Option(help="ONNX file (default: the classifier binloop ships)", dir_okay=False),
    ] = None,
    card: Annotated[
        Path | None,
        typer.Option(help="Model card (default: <stem>.card.json, else card.json beside it)"),
    ] = None,
    eval_dir: Annotated[
        Path | None,
        typer.Option(help="Evaluation ImageFolder (default: the trainer's, BINLOOP_EVAL_DIR)"),
    ] = None,
    wait: Annotated[
        float, typer.Option(help="Seconds to wait for the registry's decision (0: do not wait)")
    ] = 60.0,
    only_first: Annotated[
        bool,
        typer.Option(
            help="Import only while the model-registry has no champion for the model (exit 0 "
            "otherwise): safe to run at every start, as compose does"
        ),
    ] = False,
) -> None:
    """Import an externally trained model: score it on the trainer's eval set, store it as the
    next version and announce it, so the registry promotes it if it is first or better.
    Object store, NATS and model name come from the trainer's settings (BINLOOP_*)."""
    from binloop.model_import import AlreadyHasModelsError
    from binloop.model_import import import_model as run_import
    from services.trainer.settings import TrainerSettings

    settings = _settings_or_exit(
        TrainerSettings, **({"eval_dir": eval_dir} if eval_dir is not None else {})
    )
    try:
        result = asyncio.run(
            run_import(onnx or SHIPPED_MODEL, card, settings, wait_s=wait, only_first=only_first)
        )
    except AlreadyHasModelsError as exc:
        console.print(f"nothing imported: {exc}")
        return
    except (BinloopError, OSError) as exc:
        console.print(f"[red]not imported: {exc}")
        raise typer.Exit(1) from exc
    event = result.completed
    console.print(
        f"imported {event.model_name} v{event.model_version}: accuracy "
        f"{event.metrics.accuracy:.4f} on eval set {event.metrics.eval_set_id[:12]} "
        f"({event.metrics.eval_items} items)"
    )
    if result.registered is not None:
        console.print(f"registry: {result.registered.decision} ({result.registered.reason})")
    elif wait > 0:
        console.print(
            f"[yellow]no decision from the model-registry within {wait:.0f}s; the import stands "
            "and the registry decides when it runs"
        )
        raise typer.Exit(1)


app.command(
    "train", help="Train, calibrate, evaluate and export a waste classifier (docs/training.md)."
)(train_command)


@app.command("export-schemas")
def export_schemas(
    check: Annotated[bool, typer.Option(help="Fail if the committed files differ")] = False,
) -> None:
    """Write (or check) the JSON Schema file of every route."""
    from schemas.export import JSONSCHEMA_DIR, render_json_schemas, write_json_schemas

    if check:
        stale = [
            name
            for name, text in render_json_schemas().items()
            if not (JSONSCHEMA_DIR / name).exists() or (JSONSCHEMA_DIR / name).read_text() != text
        ]
        if stale:
            console.print(f"[red]out of date: {', '.join(stale)}; run `binloop export-schemas`")
            raise typer.Exit(1)
        console.print("JSON schemas are up to date")
        return
    for path in write_json_schemas():
        console.print(f"wrote {path}")


@app.command("export-asyncapi")
def export_asyncapi(
    out: Annotated[Path, typer.Option(help="Folder for the AsyncAPI documents")] = Path(
        "docs/asyncapi"
    ),
) -> None:
    """Generate each service's AsyncAPI document with FastStream's generator."""
    from binloop.docs import write_asyncapi

    for path in write_asyncapi(out):
        console.print(f"wrote {path}")


@app.command()
def rollback(
    model: Annotated[
        str | None, typer.Option(help="Model name (default: BINLOOP_MODEL_NAME, binloop-waste)")
    ] = None,
    to_version: Annotated[int | None, typer.Option(help="Version (default: previous)")] = None,
    reason: Annotated[str, typer.Option(help="Why, for the record")] = "operator rollback",
    nats_url: Annotated[
        str | None, typer.Option(envvar="BINLOOP_NATS_URL", help="NATS server")
    ] = None,
) -> None:
    """Make an earlier model version champion again and ship it to the bins. The registry's
    bucket and default model come from the model-registry's settings (BINLOOP_KV_BUCKET,
    BINLOOP_MODEL_NAME). Safe to run again after a failure: a rollback that was recorded but
    not announced is announced, not repeated one version further back."""
    from binloop.runtime import new_service
    from services.model_registry import RegistrySettings, RollbackOutcome
    from services.model_registry import rollback as registry_rollback

    overrides: dict[str, Any] = {"http_port": 0}
    if nats_url is not None:
        overrides["nats_url"] = nats_url
    settings = _settings_or_exit(RegistrySettings, **overrides)
    model_name = model or settings.model_name

    async def main() -> RollbackOutcome:
        service = new_service("rollback", settings)
        await service.broker.connect()
        try:
            return await registry_rollback(
                service.js,
                service.publisher,
                model_name,
                to_version,
                reason,
                bucket=settings.kv_bucket,
            )
        finally:
            await service.broker.stop()

    try:
        outcome = asyncio.run(main())
    except BinloopError as exc:
        console.print(f"[red]{model_name}: {exc}")
        raise typer.Exit(1) from exc
    event = outcome.event
    if outcome.resumed:
        console.print(
            f"[yellow]an earlier rollback of {event.model_name} (v{event.from_version} -> "
            f"v{event.to_version}) had not been announced; announced it now. Nothing else was "
            "rolled back: run again to go further back."
        )
        return
    console.print(
        f"rolled {event.model_name} back from v{event.from_version} to v{event.to_version}; "
        "the bins load it now"
    )


def main() -> None:
    app(prog_name="binloop")


if __name__ == "__main__":
    main()
