"""`binloop run <service> --validate-config` checks what the service checks at start, without
connecting to anything: settings, and what building the service reads (a policy file, a frame
source)."""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path
from typing import Any

import aiohttp
import nats
import pytest
from typer.testing import CliRunner

from binloop import cli
from binloop.cli import app as binloop_cli
from binloop.liveview import progress_line
from binloop.monitor import LoopStats
from binloop.natsserver import NatsServer
from binloop.process import free_port

ROOT = Path(__file__).resolve().parent.parent
DEMO = ROOT / "data" / "demo"


def _validate(service: str, env: dict[str, str]) -> tuple[int, str]:
    result = CliRunner().invoke(binloop_cli, ["run", service, "--validate-config"], env=env)
    return result.exit_code, result.output


def test_a_missing_policy_file_fails_validation_as_it_would_fail_the_start(
    tmp_path: Path,
) -> None:
    missing = tmp_path / "policy.yaml"
    code, output = _validate("sampler", {"BINLOOP_POLICY_FILE": str(missing)})
    assert code == 1
    assert f"{missing}: cannot read" in output

    missing.write_text("strategies:\n  margin: {treshold: 0.2}\n")
    code, output = _validate("sampler", {"BINLOOP_POLICY_FILE": str(missing)})
    assert code == 1
    assert "treshold" in output


def test_a_frame_source_that_is_not_there_fails_validation(tmp_path: Path) -> None:
    code, output = _validate("frame-ingestor", {"BINLOOP_SOURCE": str(tmp_path / "nowhere")})
    assert code == 1
    assert "is not an image folder" in output
    code, output = _validate(
        "frame-ingestor",
        {"BINLOOP_SOURCE": str(DEMO / "stream"), "BINLOOP_SPOOL_ROOT": str(tmp_path / "s")},
    )
    assert code == 0, output
    assert "frame-ingestor: configuration is valid" in output


def test_up_refuses_a_missing_stream_and_a_foreign_data_folder_without_a_traceback(
    tmp_path: Path,
) -> None:
    runner = CliRunner()
    missing = runner.invoke(binloop_cli, ["up", "--stream", str(tmp_path / "nowhere")])
    assert missing.exit_code == 2  # a usage error, before anything starts
    assert "--stream" in missing.output

    foreign = tmp_path / "checkout"
    foreign.mkdir()
    (foreign / "precious.txt").write_text("keep me")
    refused = runner.invoke(binloop_cli, ["up", "--no-live", "--data-dir", str(foreign)])
    assert refused.exit_code == 1
    assert "was not created by `binloop up`" in refused.output
    assert refused.exception is None or isinstance(refused.exception, SystemExit)
    assert (foreign / "precious.txt").read_text() == "keep me"


def test_replay_reports_a_missing_file_and_an_unreachable_server_in_one_line(
    tmp_path: Path,
) -> None:
    runner = CliRunner()
    missing = runner.invoke(binloop_cli, ["replay", str(tmp_path / "none.jsonl")])
    assert missing.exit_code == 1
    assert "no replay file at" in missing.output

    recorded = tmp_path / "one.jsonl"
    recorded.write_text('{"t": 0, "subject": "fleet.heartbeat.v1.bin-1", "data": {}}\n')
    down = runner.invoke(binloop_cli, ["replay", str(recorded), "--nats-url", "nats://127.0.0.1:9"])
    assert down.exit_code == 1
    assert "cannot reach nats://127.0.0.1:9" in down.output
    assert down.exception is None or isinstance(down.exception, SystemExit)


async def _recording_connection(monitor_url: str, subject: str) -> dict[str, Any] | None:
    """The server's view (its monitoring endpoint) of the connection subscribed to `subject`."""
    async with (
        aiohttp.ClientSession() as session,
        session.get(f"{monitor_url}/connz?subs=1") as response,
    ):
        connections: list[dict[str, Any]] = (await response.json()).get("connections") or []
    for connection in connections:
        if subject in connection.get("subscriptions_list", []):
            return connection
    return None


@pytest.mark.integration
async def test_record_says_in_one_line_how_many_messages_it_kept_when_the_server_goes_away(
    tmp_path: Path,
) -> None:
    monitor_port = free_port()
    server = NatsServer(tmp_path / "jetstream", extra_args=["-m", str(monitor_port)]).start()
    monitor_url = f"http://127.0.0.1:{monitor_port}"
    url, out = server.url, tmp_path / "rec.jsonl"
    command = [sys.executable, "-m", "binloop.cli", "record", str(out), "--subject", "probe.>"]
    recorder = await asyncio.create_subprocess_exec(
        *command,
        "--nats-url",
        url,
        "--reconnect-attempts",
        "1",
        cwd=ROOT,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )

    async def delivered() -> int:
        """Messages the server has sent to the recorder; -1 before it subscribed."""
        while True:
            connection = await _recording_connection(monitor_url, "probe.>")
            if connection is not None:
                return int(connection["out_msgs"])
            if recorder.returncode is not None:
                return -1
            await asyncio.sleep(0.05)

    try:
        assert await asyncio.wait_for(delivered(), 30) == 0
        publisher = await nats.connect(url)
        for n in (1, 2):
            await publisher.publish("probe.a", f'{{"n": {n}}}'.encode())
        await publisher.drain()
        while await asyncio.wait_for(delivered(), 10) < 2:  # noqa: ASYNC110
            await asyncio.sleep(0.05)
        server.stop()  # and it does not come back
        stdout, stderr = await asyncio.wait_for(recorder.communicate(), 30)
    finally:
        if recorder.returncode is None:
            recorder.kill()
            await recorder.wait()
        server.stop()
    assert recorder.returncode == 1, stderr.decode()
    (line,) = stdout.decode().splitlines()
    assert line.startswith(f"binloop record: the connection to {url} closed (")
    assert line.endswith(f"2 messages were recorded to {out} before")
    assert len(out.read_text().splitlines()) == 2


def test_a_run_without_the_live_table_still_says_where_the_loop_is() -> None:
    stats = LoopStats()
    stats.frames_captured, stats.frames_stored, stats.labels = 120, 118, 9
    stats.registered.append((2, "promoted", "better on the evaluation set"))
    line = progress_line(stats)
    assert "frames captured 120" in line
    assert "stored 118" in line
    assert "labels 9" in line
    assert "registry: v2 promoted" in line
    assert "registry: no decision yet" in progress_line(LoopStats())


def test_long_commands_report_progress_at_most_every_interval(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    now = [0.0]
    monkeypatch.setattr(cli.time, "monotonic", lambda: now[0])
    report = cli._every(10.0, "replayed {} messages so far")
    report(1)  # too soon
    now[0] = 10.0
    report(2)
    now[0] = 15.0
    report(3)  # too soon again
    now[0] = 21.0
    report(4)
    lines = [line for line in capsys.readouterr().out.splitlines() if line]
    assert lines == ["replayed 2 messages so far", "replayed 4 messages so far"]


def test_every_registered_service_loads_its_settings_and_factory() -> None:
    """`binloop run NAME` and `binloop up` find each service through the registry; a package
    that stops exporting its settings class or create_app (the trainer's are lazy) breaks them."""
    from services.registry import SERVICES

    for name, spec in SERVICES.items():
        settings_cls, factory = spec.load()
        assert settings_cls.__name__ == spec.settings_class, name
        assert callable(factory), name


def test_the_training_command_loads_without_the_services_messaging_packages() -> None:
    """A GPU training node runs `python -m binloop.train_command` with the pipeline's packages
    only: importing it must not pull in NATS or FastStream."""
    import subprocess

    code = (
        "import sys, binloop.train_command, services.trainer.pipeline, services.trainer.sources;"
        "print(sorted(m for m in ('nats', 'faststream') if m in sys.modules))"
    )
    shown = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout
    assert shown.strip() == "[]"
