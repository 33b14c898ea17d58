"""A real Prometheus (Debian's `prometheus` package, see tools/install_prometheus.sh) scrapes a
running service, evaluates the shipped alert rules, and answers a dashboard's expression; and
promtool accepts the shipped config and rules and passes their unit tests."""

from __future__ import annotations

import asyncio
import json
import re
import shutil
import struct
import subprocess
import time
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
KPS_VALUES = ROOT / "deploy" / "k8s" / "kube-prometheus-stack.values.yaml"
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
    command: list[str]
    env: dict[str, str] | None = None

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()

    def restart(self) -> None:
        """The same command again: the same port, config and storage."""
        self.stop()
        self.process = _spawn(self.command, self.log, self.env)


def _spawn(command: list[str], log: Path, env: dict[str, str] | None) -> subprocess.Popen[bytes]:
    with log.open("ab") as sink:
        return subprocess.Popen(command, stdout=sink, stderr=subprocess.STDOUT, env=env)


def server_config(targets: list[str]) -> dict[str, Any]:
    """A Prometheus with the shipped rules, scraping `targets` (if any) every 500 ms."""
    return {
        "global": {
            "scrape_interval": "500ms",
            "scrape_timeout": "500ms",
            "evaluation_interval": "500ms",
        },
        "rule_files": [str(RULES)],
        "scrape_configs": [
            {"job_name": "binloop", "static_configs": [{"targets": targets}]},
        ]
        if targets
        else [],
    }


def start_prometheus(
    folder: Path,
    config: dict[str, Any],
    *,
    args: tuple[str, ...] = ("--storage.tsdb.path={folder}/tsdb",),
    env: dict[str, str] | None = None,
) -> Prometheus:
    """Prometheus on a free loopback port, with `config`, its files in `folder`. `args`
    ({folder} is filled in) choose the storage; agent mode and the remote-write receiver are
    flags too."""
    folder.mkdir(parents=True, exist_ok=True)
    config_path = folder / "prometheus.yml"
    config_path.write_text(yaml.safe_dump(config), encoding="utf-8")
    port = free_port()
    command = [
        _tool("prometheus"),
        f"--config.file={config_path}",
        *(arg.format(folder=folder) for arg in args),
        f"--web.listen-address=127.0.0.1:{port}",
        "--log.level=warn",
    ]
    log = folder / "prometheus.log"
    return Prometheus(f"http://127.0.0.1:{port}", _spawn(command, log, env), log, command, env)


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
def prometheus_for(tmp_path: Path) -> Iterator[Callable[..., Prometheus]]:
    """Starts Prometheus servers for a test (`start_prometheus`'s arguments, the folder a
    fresh one under tmp_path) and stops them afterwards."""
    started: list[Prometheus] = []

    def start(config: dict[str, Any], **options: Any) -> Prometheus:
        started.append(start_prometheus(tmp_path / f"prometheus-{len(started)}", config, **options))
        return started[-1]

    yield start
    for server in started:
        server.stop()


async def _get(session: aiohttp.ClientSession, url: str, **params: str) -> dict[str, Any]:
    async with session.get(url, params=params) as response:
        body: dict[str, Any] = await response.json()
        return body


def _evaluated(rule: dict[str, Any]) -> bool:
    # Prometheus reports a rule it has not evaluated yet with the zero time, year 0001.
    return not str(rule.get("lastEvaluation", "0001")).startswith("0001")


async def actuate(js: JetStreamContext, bin_id: str, count: int, first: int = 0) -> None:
    """`count` glass items through the bin's actuator, new frames numbered from `first`;
    returns once the actuator reported each one done."""
    done = await Collector(ActuationDone).attach_stream(js, ACTUATION_DONE.subject(bin_id))
    for index in range(first, first + count):
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
    await done.wait_for(first + count, timeout=20)


async def wait_ready(session: aiohttp.ClientSession, prometheus: Prometheus) -> None:
    async def ready() -> int:
        try:
            async with session.get(f"{prometheus.url}/-/ready") as response:
                return response.status
        except aiohttp.ClientConnectionError:
            assert prometheus.process.poll() is None, prometheus.log.read_text()
            return 0

    # Until its storage is open Prometheus refuses connections, then answers 503.
    await poll(ready, lambda status: status == 200, 60, "Prometheus to be ready")


async def instant_query(
    session: aiohttp.ClientSession, prometheus: Prometheus, expr: str, at: float | None = None
) -> list[dict[str, Any]]:
    params = {"query": expr} if at is None else {"query": expr, "time": f"{at:.3f}"}
    body = await _get(session, f"{prometheus.url}/api/v1/query", **params)
    assert body["status"] == "success", body
    result: list[dict[str, Any]] = body["data"]["result"]
    return result


@pytest.mark.integration
async def test_prometheus_scrapes_a_service_and_answers_a_dashboard_query(
    js: JetStreamContext, actuator: ServiceApp, prometheus_for: Callable[..., Prometheus]
) -> None:
    bin_id = actuator.settings.bin_id  # type: ignore[attr-defined]
    await actuate(js, bin_id, 3)

    assert actuator.health is not None
    prometheus = prometheus_for(server_config([f"127.0.0.1:{actuator.health.port}"]))
    api = f"{prometheus.url}/api/v1"
    async with aiohttp.ClientSession() as session:
        await wait_ready(session, prometheus)

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
        result = await poll(
            lambda: instant_query(session, prometheus, expr),
            lambda r: len(r) == 1,
            30,
            f"a sample of {expr}",
        )
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


# --- The bins' metrics: Prometheus in agent mode on the bin, remote write to the cloud ---

EDGE = ROOT / "edge"
EDGE_SERVICES = ("frame-ingestor", "edge-inferencer", "actuator", "uploader")
AGENT_CONFIG = EDGE / "prometheus" / "agent.yml"
AGENT_UNIT = EDGE / "systemd" / "binloop-metrics.service"


def read_env_file(path: Path) -> dict[str, str]:
    """KEY=VALUE lines as systemd's EnvironmentFile reads them (comments and blanks skipped)."""
    lines = path.read_text(encoding="utf-8").splitlines()
    pairs = [line.split("=", 1) for line in lines if line.strip() and not line.startswith("#")]
    return {key.strip(): value.strip() for key, value in pairs}


def edge_environment(service: str) -> dict[str, str]:
    """What binloop@<service>.service gives the service: bin.env, then its own file."""
    return read_env_file(EDGE / "env" / "bin.env") | read_env_file(EDGE / "env" / f"{service}.env")


def agent_exec_start() -> list[str]:
    """binloop-metrics.service's ExecStart, as a command line (continuations joined)."""
    text = AGENT_UNIT.read_text(encoding="utf-8").replace("\\\n", " ")
    (line,) = [line for line in text.splitlines() if line.startswith("ExecStart=")]
    return line.removeprefix("ExecStart=").split()


def test_edge_services_each_get_their_own_port_and_the_agent_scrapes_each(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """On a bin the four services share one host: with the default port (8000) for all, three
    could not serve /metrics. The shipped env files are valid settings of their service, and
    the agent's targets are exactly their ports."""
    ports = {}
    for service in EDGE_SERVICES:
        settings_cls, _ = SERVICES[service].load()
        with monkeypatch.context() as env:
            for key, value in edge_environment(service).items():
                env.setenv(key, value)
            settings = settings_cls()
        assert settings.http_host == "127.0.0.1", service  # scraped on the bin only
        ports[service] = settings.http_port
    assert len(set(ports.values())) == len(EDGE_SERVICES), ports
    config = yaml.safe_load(AGENT_CONFIG.read_text(encoding="utf-8"))
    (job,) = config["scrape_configs"]
    (targets,) = job["static_configs"]
    assert sorted(targets["targets"]) == sorted(f"127.0.0.1:{p}" for p in ports.values())
    assert (job["job_name"], targets["labels"]) == ("binloop", {"tier": "edge"})
    # The one bin id of bin.env labels every series (expanded by the agent at start).
    assert config["global"]["external_labels"] == {"bin": "${BINLOOP_BIN_ID}"}
    assert "BINLOOP_BIN_ID" in read_env_file(EDGE / "env" / "bin.env")
    for unit in ("binloop@.service", "nats-leaf.service", "binloop-metrics.service"):
        text = (EDGE / "systemd" / unit).read_text(encoding="utf-8")
        assert "EnvironmentFile=/etc/binloop/bin.env" in text, unit
    checked = _promtool("check", "config", "--agent", "--syntax-only", str(AGENT_CONFIG))
    assert checked.returncode == 0, checked.stdout + checked.stderr


def agent_config_for_test(target: str, cloud: Prometheus, password_file: Path) -> dict[str, Any]:
    """The shipped agent config, pointed at a test's service and cloud: the target, the
    receiver's URL (plain HTTP, so no CA) and a test password file replace the bin's; short
    intervals replace 15 s. Everything else (job, tier, external labels, auth) is as shipped."""
    config: dict[str, Any] = yaml.safe_load(AGENT_CONFIG.read_text(encoding="utf-8"))
    config["global"] |= {"scrape_interval": "500ms", "scrape_timeout": "500ms"}
    config["scrape_configs"][0]["static_configs"][0]["targets"] = [target]
    (remote,) = config["remote_write"]
    del remote["tls_config"]
    remote["url"] = f"{cloud.url}/api/v1/write"
    remote["basic_auth"]["password_file"] = str(password_file)
    remote["queue_config"] = {"batch_send_deadline": "500ms", "max_backoff": "500ms"}
    return config


def agent_args(folder_flag: str = "{folder}") -> tuple[str, ...]:
    """binloop-metrics.service's flags, with the test's storage instead of the bin's (the
    config file and the listen address are start_prometheus's)."""
    args = agent_exec_start()[1:]
    kept = [a for a in args if not a.startswith(("--config.file=", "--web.listen-address="))]
    storage = [a for a in kept if a.startswith("--storage.agent.path=")]
    assert storage, args
    return tuple(f"--storage.agent.path={folder_flag}/agent" if a in storage else a for a in kept)


async def _agent_metric(session: aiohttp.ClientSession, agent: Prometheus, name: str) -> float:
    """The sum of one of the agent's own counters (its /metrics; agents answer no queries)."""
    async with session.get(f"{agent.url}/metrics") as response:
        text = await response.text()
    values = [
        float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith(name + "{") or line.startswith(name + " ")
    ]
    return sum(values)


@pytest.mark.integration
async def test_a_bins_metrics_reach_the_cloud_dashboards_through_an_outage(
    js: JetStreamContext,
    actuator: ServiceApp,
    prometheus_for: Callable[..., Prometheus],
    tmp_path: Path,
) -> None:
    """The shipped agent (edge/prometheus/agent.yml, started with binloop-metrics.service's
    flags) scrapes a real actuator and remote-writes to a cloud Prometheus that scrapes no
    bin: the edge dashboard's panel answers for the bin there, and every series carries the
    bin's id. Then the cloud is down while the bin sorts on; when it is back, the samples of
    the outage arrive from the agent's write-ahead log (not only the counter's later total)."""
    bin_id = actuator.settings.bin_id  # type: ignore[attr-defined]
    assert actuator.health is not None
    await actuate(js, bin_id, 3)
    cloud = prometheus_for(
        server_config([]),
        args=("--storage.tsdb.path={folder}/tsdb", "--web.enable-remote-write-receiver"),
    )
    password_file = tmp_path / "metrics-password"
    password_file.write_text("test-password", encoding="utf-8")
    agent = prometheus_for(
        agent_config_for_test(f"127.0.0.1:{actuator.health.port}", cloud, password_file),
        args=agent_args(),
        env={"BINLOOP_BIN_ID": bin_id, "PATH": "/usr/bin:/bin"},
    )
    actuated = _dashboard_expr("edge-bin-detail.json", "Items actuated (total)", bin=bin_id)
    async with aiohttp.ClientSession() as session:
        await wait_ready(session, cloud)
        await wait_ready(session, agent)

        # `up` is the agent's own series: only the external label can say which bin it is.
        up = f'up{{job="binloop", tier="edge", bin="{bin_id}"}}'
        result = await poll(
            lambda: instant_query(session, cloud, up), lambda r: len(r) == 1, 60, up
        )
        assert float(result[0]["value"][1]) == 1.0
        result = await poll(
            lambda: instant_query(session, cloud, actuated),
            lambda r: len(r) == 1 and float(r[0]["value"][1]) == 3.0,
            60,
            actuated,
        )
        assert result[0]["metric"] == {"bin": bin_id}
        targets_up = _dashboard_expr("fleet-overview.json", "Scrape targets up")
        assert float((await instant_query(session, cloud, targets_up))[0]["value"][1]) >= 1

        # The cloud goes away; the bin sorts two more items, and the agent keeps trying.
        cloud.stop()
        outage_start = time.time()
        await actuate(js, bin_id, 2, first=3)
        retried = "prometheus_remote_storage_samples_retried_total"
        failed_sends = await _agent_metric(session, agent, retried)
        await poll(
            lambda: _agent_metric(session, agent, retried),
            lambda value: value > failed_sends,
            60,
            "the agent to retry sending while the cloud is down",
        )
        # ... and has scraped for at least a second of the outage (the last sample it took).
        newest = "prometheus_remote_storage_highest_timestamp_in_seconds"
        await poll(
            lambda: _agent_metric(session, agent, newest),
            lambda seconds: seconds >= outage_start + 1,
            60,
            "the agent to scrape during the outage",
        )
        outage_end = time.time()
        cloud.restart()
        await wait_ready(session, cloud)

        await poll(
            lambda: instant_query(session, cloud, actuated),
            lambda r: len(r) == 1 and float(r[0]["value"][1]) == 5.0,
            60,
            f"{actuated} to count the items sorted during the outage",
        )
        # Samples scraped while the cloud was down, stored under their own times.
        window_ms = int((outage_end - outage_start) * 1000)
        during = f"count_over_time({up}[{window_ms}ms])"
        result = await instant_query(session, cloud, during, at=outage_end)
        assert len(result) == 1, (during, result)
        assert float(result[0]["value"][1]) >= 1, (during, result)


def _varint(number: int) -> bytes:
    out = bytearray()
    while True:
        low, number = number & 0x7F, number >> 7
        out.append(low | (0x80 if number else 0))
        if not number:
            return bytes(out)


def _field(number: int, wire_type: int, payload: bytes) -> bytes:
    key = _varint((number << 3) | wire_type)
    return key + (_varint(len(payload)) + payload if wire_type == 2 else payload)


def remote_write_body(labels: dict[str, str], samples: list[tuple[int, float]]) -> bytes:
    """A prompb.WriteRequest holding one series, snappy-compressed as literal blocks only
    (valid snappy, without a compressor): what an agent POSTs to /api/v1/write."""
    label_fields = b"".join(
        _field(1, 2, _field(1, 2, name.encode()) + _field(2, 2, value.encode()))
        for name, value in sorted(labels.items())
    )
    sample_fields = b"".join(
        _field(2, 2, _field(1, 1, struct.pack("<d", value)) + _field(2, 0, _varint(ms)))
        for ms, value in samples
    )
    data = _field(1, 2, label_fields + sample_fields)
    out = bytearray(_varint(len(data)))
    for start in range(0, len(data), 65536):
        chunk = data[start : start + 65536]
        length = len(chunk) - 1
        out += bytes([length << 2]) if length < 60 else bytes([61 << 2]) + struct.pack("<H", length)
        out += chunk
    return bytes(out)


def _duration_ms(duration: str) -> int:
    """A Prometheus duration of one unit (24h, 90m) in milliseconds."""
    match = re.fullmatch(r"(\d+)(ms|s|m|h|d)", duration)
    assert match, duration
    unit_ms = {"ms": 1, "s": 1000, "m": 60_000, "h": 3_600_000, "d": 86_400_000}
    return int(match.group(1)) * unit_ms[match.group(2)]


def cloud_as_the_values_configure_it() -> tuple[dict[str, Any], tuple[str, ...]]:
    """The cloud Prometheus of the kube-prometheus-stack values as a config and flags: what
    the operator makes of enableRemoteWriteReceiver (a flag) and tsdb.outOfOrderTimeWindow
    (storage.tsdb in the config). It scrapes something all the time, as the cloud does its own
    services, so its newest samples are "now"."""
    spec = yaml.safe_load(KPS_VALUES.read_text(encoding="utf-8"))["prometheus"]["prometheusSpec"]
    config: dict[str, Any] = {
        "global": {"scrape_interval": "500ms", "scrape_timeout": "500ms"},
        "scrape_configs": [{"job_name": "cloud", "static_configs": [{"targets": ["127.0.0.1:1"]}]}],
    }
    window = spec.get("tsdb", {}).get("outOfOrderTimeWindow")
    if window:
        config["storage"] = {"tsdb": {"out_of_order_time_window": window}}
    args = ["--storage.tsdb.path={folder}/tsdb"]
    if spec.get("enableRemoteWriteReceiver"):
        args.append("--web.enable-remote-write-receiver")
    return config, tuple(args)


@pytest.mark.integration
async def test_the_cloud_takes_what_a_bin_kept_through_the_longest_outage_its_agent_buffers(
    prometheus_for: Callable[..., Prometheus],
) -> None:
    """The agent keeps up to --storage.agent.retention.max-time of samples and sends them under
    their own times when the link returns. Without an out-of-order window, the cloud refuses a
    sample more than about an hour older than its newest one ("out of bounds", 400 for the
    whole request) and the agent drops it for good."""
    (retention,) = [
        arg for arg in agent_exec_start() if arg.startswith("--storage.agent.retention.max-time=")
    ]
    buffered_ms = _duration_ms(retention.split("=", 1)[1])
    config, args = cloud_as_the_values_configure_it()
    cloud = prometheus_for(config, args=args)
    async with aiohttp.ClientSession() as session:
        await wait_ready(session, cloud)
        await poll(lambda: instant_query(session, cloud, "up"), lambda r: len(r) == 1, 30, "up")
        # The oldest sample the agent may still hold, a minute inside its retention.
        oldest = int(time.time() * 1000) - buffered_ms + 60_000
        body = remote_write_body(
            {"__name__": "binloop_frames_captured_total", "bin": "bin-0001", "job": "binloop"},
            [(oldest, 42.0)],
        )
        headers = {
            "Content-Encoding": "snappy",
            "Content-Type": "application/x-protobuf",
            "X-Prometheus-Remote-Write-Version": "0.1.0",
        }
        async with session.post(f"{cloud.url}/api/v1/write", data=body, headers=headers) as answer:
            assert answer.status == 204, f"{answer.status} {await answer.text()}"
