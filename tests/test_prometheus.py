"""A real Prometheus (Debian's `prometheus` package, see tools/install_prometheus.sh) scrapes a
running service, evaluates the shipped alert rules, and answers a dashboard's expression; and
promtool accepts the shipped config and rules and passes their unit tests."""

from __future__ import annotations

import asyncio
import json
import shutil
import subprocess
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar

import aiohttp
import pytest
import yaml
from nats.js.client import JetStreamContext

from binloop.natsserver import NatsServer
from binloop.process import free_port
from binloop.runtime import ServiceApp
from schemas.events import ActuationCommand, ActuationDone
from schemas.routes import ACTUATION_COMMAND, ACTUATION_DONE
from schemas.taxonomy import Compartment
from services.registry import SERVICES
from tests.helpers import Collector

ROOT = Path(__file__).resolve().parent.parent
PROMETHEUS_DIR = ROOT / "deploy" / "prometheus"
RULES = PROMETHEUS_DIR / "rules" / "binloop.rules.yml"
EDGE_DASHBOARD = ROOT / "deploy" / "grafana" / "dashboards" / "edge-bin-detail.json"
T = TypeVar("T")


def _tool(name: str) -> str:
    found = shutil.which(name)
    if found is None:
        pytest.fail(f"{name} is not installed: run tools/install_prometheus.sh (Debian package)")
    return found


def _promtool(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [_tool("promtool"), *args], cwd=cwd, capture_output=True, text=True, timeout=60
    )


def test_promtool_accepts_the_shipped_config_and_rules() -> None:
    config = _promtool("check", "config", str(PROMETHEUS_DIR / "prometheus.yml"))
    assert config.returncode == 0, config.stdout + config.stderr
    assert "1 rule files found" in config.stdout
    rules = _promtool("check", "rules", str(RULES))
    assert rules.returncode == 0, rules.stdout + rules.stderr
    assert "SUCCESS: 11 rules found" in rules.stdout


def test_alert_rules_pass_their_promtool_unit_tests() -> None:
    result = _promtool("test", "rules", "binloop.rules.test.yml", cwd=RULES.parent)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


@dataclass
class Prometheus:
    url: str
    process: subprocess.Popen[bytes]
    log: Path


def start_prometheus(tmp_path: Path, targets: list[str]) -> Prometheus:
    config = {
        "global": {
            "scrape_interval": "500ms",
            "scrape_timeout": "500ms",
            "evaluation_interval": "500ms",
        },
        "rule_files": [str(RULES)],
        "scrape_configs": [
            {"job_name": "binloop", "static_configs": [{"targets": targets}]},
        ],
    }
    config_path = tmp_path / "prometheus.yml"
    config_path.write_text(yaml.safe_dump(config), encoding="utf-8")
    port = free_port()
    log = tmp_path / "prometheus.log"
    with log.open("wb") as sink:
        process = subprocess.Popen(
            [
                _tool("prometheus"),
                f"--config.file={config_path}",
                f"--storage.tsdb.path={tmp_path / 'tsdb'}",
                f"--web.listen-address=127.0.0.1:{port}",
                "--log.level=warn",
            ],
            stdout=sink,
            stderr=subprocess.STDOUT,
        )
    return Prometheus(f"http://127.0.0.1:{port}", process, log)


async def poll(
    fetch: Callable[[], Awaitable[T]], done: Callable[[T], bool], timeout: float, what: str
) -> T:
    """Prometheus pushes no notifications: ask again, backing off, until `done` or timeout."""
    delay = 0.05
    last: T | None = None

    async def loop() -> T:
        nonlocal delay, last
        while True:
            last = await fetch()
            if done(last):
                return last
            await asyncio.sleep(delay)
            delay = min(delay * 2, 0.5)

    try:
        return await asyncio.wait_for(loop(), timeout)
    except TimeoutError:
        pytest.fail(f"timed out waiting for {what}; last answer: {last!r}")


@pytest.fixture
async def actuator(nats_server: NatsServer) -> AsyncIterator[ServiceApp]:
    bin_id = f"prom-{uuid.uuid4().hex[:8]}"
    service = SERVICES["actuator"].create(
        nats_url=nats_server.url,
        http_port=0,
        http_host="127.0.0.1",
        bin_id=bin_id,
        sim_actuation_ms=0,
    )
    await service.start()
    yield service
    await service.stop()


@pytest.fixture
def prometheus_for(tmp_path: Path) -> Iterator[Callable[[list[str]], Prometheus]]:
    started: list[Prometheus] = []

    def start(targets: list[str]) -> Prometheus:
        started.append(start_prometheus(tmp_path, targets))
        return started[-1]

    yield start
    for server in started:
        server.process.terminate()
        try:
            server.process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            server.process.kill()
            server.process.wait()


def _panel_expr(title: str, bin_id: str) -> str:
    """A panel's expression with Grafana's $bin variable filled in, as Grafana would."""
    model = json.loads(EDGE_DASHBOARD.read_text(encoding="utf-8"))
    (panel,) = [p for p in model["panels"] if p["title"] == title]
    expr: str = panel["targets"][0]["expr"]
    return expr.replace("$bin", bin_id)


async def _get(session: aiohttp.ClientSession, url: str, **params: str) -> dict[str, Any]:
    async with session.get(url, params=params) as response:
        body: dict[str, Any] = await response.json()
        return body


def _evaluated(rule: dict[str, Any]) -> bool:
    # Prometheus reports a rule it has not evaluated yet with the zero time, year 0001.
    return not str(rule.get("lastEvaluation", "0001")).startswith("0001")


@pytest.mark.integration
async def test_prometheus_scrapes_a_service_and_answers_a_dashboard_query(
    js: JetStreamContext, actuator: ServiceApp, prometheus_for: Callable[..., Prometheus]
) -> None:
    bin_id = actuator.settings.bin_id  # type: ignore[attr-defined]
    done = await Collector(ActuationDone).attach_stream(js, ACTUATION_DONE.subject(bin_id))
    for index in range(3):
        command = ActuationCommand(
            producer="test",
            bin_id=bin_id,
            frame_sha256=f"{index:064x}",
            frame_event_id=str(uuid.uuid4()),
            captured_at=datetime.now(UTC),
            compartment=Compartment.GLASS,
            label="glass",
            confidence=0.9,
            abstained=False,
            model_version=1,
        )
        await js.publish(
            ACTUATION_COMMAND.subject(bin_id),
            command.model_dump_json().encode(),
            headers={"Nats-Msg-Id": str(command.event_id)},
        )
    await done.wait_for(3, timeout=20)

    assert actuator.health is not None
    prometheus = prometheus_for([f"127.0.0.1:{actuator.health.port}"])
    api = f"{prometheus.url}/api/v1"
    async with aiohttp.ClientSession() as session:

        async def ready() -> int:
            try:
                async with session.get(f"{prometheus.url}/-/ready") as response:
                    return response.status
            except aiohttp.ClientConnectionError:
                assert prometheus.process.poll() is None, prometheus.log.read_text()
                return 0

        # Until its storage is open Prometheus refuses connections, then answers 503.
        await poll(ready, lambda status: status == 200, 60, "Prometheus to be ready")

        async def targets() -> list[dict[str, Any]]:
            active: list[dict[str, Any]] = (await _get(session, f"{api}/targets"))["data"][
                "activeTargets"
            ]
            return active

        up = await poll(
            targets, lambda ts: [t["health"] for t in ts] == ["up"], 60, "the target to be up"
        )
        assert up[0]["labels"]["job"] == "binloop"

        expr = _panel_expr("Items actuated (total)", bin_id)

        async def query() -> list[dict[str, Any]]:
            result: list[dict[str, Any]] = (await _get(session, f"{api}/query", query=expr))[
                "data"
            ]["result"]
            return result

        result = await poll(query, lambda r: len(r) == 1, 30, f"a sample of {expr}")
        assert result[0]["metric"] == {"bin": bin_id}
        assert float(result[0]["value"][1]) == 3.0

        # The shipped alert rules load and evaluate in a real Prometheus without errors.
        async def rules() -> list[dict[str, Any]]:
            groups = (await _get(session, f"{api}/rules"))["data"]["groups"]
            return [rule for group in groups for rule in group["rules"]]

        evaluated = await poll(
            rules,
            lambda rs: len(rs) == 11 and all(_evaluated(rule) for rule in rs),
            30,
            "every rule to be evaluated",
        )
        assert {rule["health"] for rule in evaluated} == {"ok"}
        # The actuator is scraped and answers, so the target-down alert stays quiet. (Other
        # rules may fire: the scraped process shares its metrics registry with earlier tests.)
        states = {rule["name"]: rule["state"] for rule in evaluated}
        assert states["BinloopTargetDown"] == "inactive"
