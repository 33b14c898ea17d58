"""A real Prometheus (Debian's `prometheus` package, see tools/install_prometheus.sh) scrapes a
running service, evaluates the shipped alert rules, and answers a dashboard's expression; and
promtool accepts the shipped config and rules and passes their unit tests."""

from __future__ import annotations

import asyncio
import json
import re
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
from prometheus_client.metrics import MetricWrapperBase
from typer.testing import CliRunner

from binloop.cli import app as binloop_cli
from binloop.natsserver import NatsServer
from binloop.observability import metrics
from binloop.process import free_port
from binloop.runtime import ServiceApp
from schemas.events import ActuationCommand, ActuationDone
from schemas.routes import ACTUATION_COMMAND, ACTUATION_DONE, route_for_subject
from schemas.taxonomy import Compartment
from services.registry import SERVICES
from tests.helpers import Collector

ROOT = Path(__file__).resolve().parent.parent
PROMETHEUS_DIR = ROOT / "deploy" / "prometheus"
RULES = PROMETHEUS_DIR / "rules" / "binloop.rules.yml"
DASHBOARDS = ROOT / "deploy" / "grafana" / "dashboards"
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


def test_alert_descriptions_name_commands_that_exist() -> None:
    """An alert tells the operator what to run: a `binloop` command, or the nats CLI's
    `nats stream view <stream> --subject <subject>` on a stream that holds that subject."""
    rules = yaml.safe_load(RULES.read_text(encoding="utf-8"))
    annotations = [
        text
        for group in rules["groups"]
        for rule in group["rules"]
        for text in rule.get("annotations", {}).values()
    ]
    # Template labels become a plain token: dlq.v1.{{ $labels.service }} -> dlq.v1.service
    commands = [
        re.sub(r"\{\{\s*\$labels\.(\w+)\s*\}\}", r"\1", command)
        for text in annotations
        for command in re.findall(r"`([^`]+)`", text)
    ]
    assert commands, "the dead-letter alert names how to inspect the dead letters"
    for command in commands:
        words = command.split()
        if words[0] == "binloop":
            result = CliRunner().invoke(binloop_cli, [words[1], "--help"])
            assert result.exit_code == 0, f"{command}: {result.output}"
            continue
        assert words[:3] == ["nats", "stream", "view"], command
        stream, subject = words[3], words[words.index("--subject") + 1]
        route = route_for_subject(subject)
        assert route is not None, command
        assert route.stream == stream, command


def _promtool_unit_test(
    tmp_path: Path, input_series: list[tuple[str, str]], expr_tests: list[dict[str, Any]]
) -> subprocess.CompletedProcess[str]:
    """promtool's unit test of `expr_tests` on `input_series` (a minute apart), with the
    shipped rules loaded."""
    spec = {
        "rule_files": [str(RULES)],
        "evaluation_interval": "1m",
        "tests": [
            {
                "interval": "1m",
                "input_series": [{"series": name, "values": v} for name, v in input_series],
                "promql_expr_test": expr_tests,
            }
        ],
    }
    path = tmp_path / f"unit-{uuid.uuid4().hex[:8]}.test.yml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False), encoding="utf-8")
    return _promtool("test", "rules", str(path))


def _dashboard_expr(dashboard: str, title: str, **variables: str) -> str:
    """A panel's first expression with Grafana's variables filled in, as Grafana would."""
    model = json.loads((DASHBOARDS / dashboard).read_text(encoding="utf-8"))
    (panel,) = [p for p in model["panels"] if p["title"] == title]
    expr: str = panel["targets"][0]["expr"]
    for name, value in variables.items():
        expr = expr.replace(f"${name}", value)
    assert "$" not in expr, expr
    return expr


def _histogram_series(histogram: MetricWrapperBase, **labels: str) -> list[tuple[str, str]]:
    """The bucket series of `histogram` for `labels`, as a scrape a minute apart would see them
    if each minute brought what the histogram holds now."""
    series = []
    for family in histogram.collect():
        for sample in family.samples:
            if sample.name.endswith("_bucket") and labels.items() <= sample.labels.items():
                matchers = ",".join(f'{k}="{v}"' for k, v in sample.labels.items())
                series.append((f"{sample.name}{{{matchers}}}", f"0+{int(sample.value)}x20"))
    return series


def _estimates_at_most(
    tmp_path: Path, panel: str, series: list[tuple[str, str]], truth: dict[str, float], label: str
) -> subprocess.CompletedProcess[str]:
    """promtool's verdict on whether `panel` (a quantile per `label`) estimates each of `truth`
    at least as high as it is and less than 1.5 times that (it reports 0 for one that is not)."""
    truth_series = [(f'truth_seconds{{{label}="{k}"}}', f"{v}x20") for k, v in truth.items()]
    ratio = f"(({panel}) / on ({label}) truth_seconds)"
    return _promtool_unit_test(
        tmp_path,
        series + truth_series,
        [
            {
                "expr": f"({ratio} >= bool 1) * ({ratio} < bool 1.5)",
                "eval_time": "10m",
                "exp_samples": [{"labels": f'{{{label}="{k}"}}', "value": 1} for k in truth],
            }
        ],
    )


def test_inference_stage_p95_tells_sub_millisecond_stages_apart(tmp_path: Path) -> None:
    """docs/edge-latency.md: read, decode+pHash, preprocess and postprocess take 0.1-0.5 ms.
    Observed as the edge inferencer observes them (ms / 1000), the edge dashboard's p95 panel
    must not put them all at the same 1 ms bucket bound."""
    bin_id = f"stages-{uuid.uuid4().hex[:8]}"
    stage_ms = {"read": 0.28, "decode": 0.52, "preprocess": 0.32, "postprocess": 0.17}
    for stage, ms in stage_ms.items():
        for _ in range(100):
            metrics.INFERENCE_STAGE_SECONDS.labels(bin_id, stage).observe(ms / 1000)
    panel = _dashboard_expr(
        "edge-bin-detail.json", "Inference time per stage, p95", bin=bin_id, __rate_interval="5m"
    )
    series = _histogram_series(metrics.INFERENCE_STAGE_SECONDS, bin=bin_id)
    truth = {stage: ms / 1000 for stage, ms in stage_ms.items()}
    result = _estimates_at_most(tmp_path, panel, series, truth, "stage")
    assert result.returncode == 0, result.stdout + result.stderr


def test_handler_time_p95_of_a_whole_training_is_not_cut_off(tmp_path: Path) -> None:
    """The trainer's handler runs a whole training: 25 minutes must read as about that, not
    as the latency buckets' top."""
    service = f"trainer-{uuid.uuid4().hex[:8]}"
    for _ in range(3):
        metrics.HANDLER_SECONDS.labels(service, "training.requested").observe(25 * 60)
    panel = _dashboard_expr(
        "data-engine-loop.json", "Handler time p95 per service", __rate_interval="5m"
    )
    series = _histogram_series(metrics.HANDLER_SECONDS, service=service)
    result = _estimates_at_most(tmp_path, panel, series, {service: 25 * 60}, "service")
    assert result.returncode == 0, result.stdout + result.stderr


def test_rare_event_panels_count_the_event_that_creates_the_series(tmp_path: Path) -> None:
    """A dead letter of a new kind, and a rollback of a model the registry did not create
    series for, appear with their first event already counted; the panels count that one."""
    dead_letter = (
        'binloop_dead_letters_total{service="sampler",route="inference.result",'
        'error_type="ValidationError",instance="sampler:8000",job="binloop"}'
    )
    decision = (
        'binloop_model_promotions_total{{model="{}",decision="{}",'
        'instance="model-registry:8000",job="binloop"}}'
    )
    result = _promtool_unit_test(
        tmp_path,
        [
            (dead_letter, "_ _ _ 1 1 1 1 1 1 1 1"),
            (decision.format("binloop-glass", "rolled_back"), "_ _ _ 1 1 1 1 1 1 1 1"),
            # The registry's own model: created at 0 when it starts.
            (decision.format("binloop-waste", "promoted"), "0 0 0 0 1 1 2 2 2 2 2"),
        ],
        [
            {
                "expr": _dashboard_expr("fleet-overview.json", "Dead letters (1h)"),
                "eval_time": "10m",
                "exp_samples": [{"labels": "{}", "value": 1}],
            },
            {
                "expr": _dashboard_expr(
                    "model-quality.json", "Registry decisions (range)", __range="1h"
                ),
                "eval_time": "10m",
                "exp_samples": [
                    {"labels": '{decision="rolled_back"}', "value": 1},
                    {"labels": '{decision="promoted"}', "value": 2},
                ],
            },
        ],
    )
    assert result.returncode == 0, result.stdout + result.stderr


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

        expr = _dashboard_expr("edge-bin-detail.json", "Items actuated (total)", bin=bin_id)

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
