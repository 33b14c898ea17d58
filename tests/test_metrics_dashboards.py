"""Dashboards and alert rules against the metrics the services really expose.

Every service is started on a real nats-server and its /metrics scraped; every PromQL
expression in deploy/grafana/dashboards/*.json and deploy/prometheus/rules/*.rules.yml must name
a metric family that a scrape declares (prometheus_client declares a labeled family before any
label value is used, so the check does not depend on which code paths ran).
"""

from __future__ import annotations

import asyncio
import json
import re
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml
from prometheus_client.metrics import MetricWrapperBase
from prometheus_client.parser import text_string_to_metric_families

from binloop.natsserver import NatsServer
from binloop.observability import metrics
from binloop.observability.dashboards import DATASOURCE_UID, all_dashboards, file_name, render
from binloop.observability.promql import Exposition, counter_arguments, metric_names, problems
from binloop.runtime import ServiceApp
from services.registry import SERVICES

ROOT = Path(__file__).resolve().parent.parent
DASHBOARDS = ROOT / "deploy" / "grafana" / "dashboards"
PROVISIONING = ROOT / "deploy" / "grafana" / "provisioning"
RULES = ROOT / "deploy" / "prometheus" / "rules"
UNITS = (
    "_total",
    "_seconds",
    "_bytes",
    "_frames",
    "_samples",
    "_ratio",
    "_version",
    "_bins",
)
# Labels that would give a series per frame or per event: unbounded cardinality.
UNBOUNDED_LABELS = {"frame", "frame_id", "frame_sha256", "sha256", "event_id", "key", "uuid"}
_LABEL_VALUES = re.compile(r"^label_values\((?P<metric>[A-Za-z_:][A-Za-z0-9_:]*)\s*,")


def dashboard_files() -> list[Path]:
    return sorted(DASHBOARDS.glob("*.json"))


def dashboard_exprs() -> Iterator[tuple[str, str]]:
    """(where, PromQL) for every panel target and query variable of every shipped dashboard."""
    for path in dashboard_files():
        model = json.loads(path.read_text(encoding="utf-8"))
        for panel in model["panels"]:
            for target in panel["targets"]:
                yield f"{path.name}: {panel['title']}", target["expr"]
        for variable in model["templating"]["list"]:
            if variable["type"] == "query":
                # Grafana's label_values(metric, label) helper wraps a metric selector.
                match = _LABEL_VALUES.match(variable["definition"])
                assert match, f"{path.name}: variable {variable['name']} is not label_values()"
                yield f"{path.name}: ${variable['name']}", match.group("metric")


def rule_exprs() -> Iterator[tuple[str, str]]:
    for path in sorted(RULES.glob("*.rules.yml")):
        document = yaml.safe_load(path.read_text(encoding="utf-8"))
        for group in document["groups"]:
            for rule in group["rules"]:
                name = rule.get("alert") or rule["record"]
                yield f"{path.name}: {name}", rule["expr"]


def recorded_names() -> set[str]:
    names = set()
    for path in sorted(RULES.glob("*.rules.yml")):
        for group in yaml.safe_load(path.read_text(encoding="utf-8"))["groups"]:
            names |= {rule["record"] for rule in group["rules"] if "record" in rule}
    return names


# -- PromQL parsing ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("expr", "expected"),
    [
        ("up", {"up"}),
        (
            'histogram_quantile(0.95, sum by (le, bin) (rate(a_seconds_bucket{bin=~"$bin"}'
            "[$__rate_interval])))",
            {"a_seconds_bucket"},
        ),
        ("sum(rate(x_total[5m])) by (service) / ignoring(route) y_total", {"x_total", "y_total"}),
        ('count_values by (model) ("version", served_version) > bool 1', {"served_version"}),
        ("max_over_time(g[1h:5m] offset 1h30m) * 1e-9 + 0x1F", {"g"}),
        ('a_total unless on (bin) group_left (model) b{c="sum(rate(d[5m]))"}', {"a_total", "b"}),
        # Grafana fills in $__range; it is no metric.
        (
            "sum((c_total unless c_total offset $__range) or increase(c_total[$__range]))",
            {"c_total"},
        ),
    ],
)
def test_metric_names_are_found_in_promql(expr: str, expected: set[str]) -> None:
    assert metric_names(expr) == expected


def test_counter_functions_of_a_gauge_are_reported() -> None:
    exposition = Exposition({"queue_depth": "gauge", "jobs": "counter", "lat": "histogram"})
    assert problems("rate(jobs_total[5m]) + rate(lat_bucket[1m])", exposition) == []
    assert problems("rate(queue_depth[5m])", exposition) == [
        "'rate(queue_depth[5m])' applies a counter function to 'queue_depth', a gauge"
    ]
    assert problems("jobs + lat_total", exposition) == [
        "'jobs + lat_total' names 'jobs', which no service exposes",
        "'jobs + lat_total' names 'lat_total', which no service exposes",
    ]
    assert counter_arguments("increase(jobs_total[1h]) / queue_depth") == {"jobs_total"}


# -- metric definitions --------------------------------------------------------------------


def _defined_metrics() -> list[MetricWrapperBase]:
    return [value for value in vars(metrics).values() if isinstance(value, MetricWrapperBase)]


def test_metric_names_carry_a_unit_and_labels_stay_bounded() -> None:
    defined = _defined_metrics()
    assert len(defined) >= 20
    for metric in defined:
        name = metric._name + ("_total" if metric._type == "counter" else "")
        assert name.startswith("binloop_"), name
        assert name.endswith(UNITS), f"{name} does not end in a unit ({', '.join(UNITS)})"
        assert not set(metric._labelnames) & UNBOUNDED_LABELS, (name, metric._labelnames)


# -- dashboards as files -------------------------------------------------------------------


def test_only_the_edge_dashboard_reads_the_model_version_a_bin_exports() -> None:
    """binloop_model_served_version comes from the edge-inferencer, which the cloud Prometheus
    does not scrape (Kubernetes runs no bin); fleet panels and alerts read the model-registry's
    heartbeat view, binloop_fleet_serving_bins."""
    readers = {
        where.split(":")[0]
        for where, expr in [*dashboard_exprs(), *rule_exprs()]
        if "binloop_model_served_version" in metric_names(expr)
    }
    assert readers == {"edge-bin-detail.json"}
    fleet_readers = {
        where
        for where, expr in [*dashboard_exprs(), *rule_exprs()]
        if "binloop_fleet_serving_bins" in metric_names(expr)
    }
    assert fleet_readers == {
        "fleet-overview.json: Bins reporting",
        "fleet-overview.json: Bins per model version",
        "model-quality.json: Bins per served model version",
        "binloop.rules.yml: BinloopFleetOnMixedModels",
    }


def test_shipped_dashboards_are_what_the_code_builds() -> None:
    shipped = {path.name for path in dashboard_files()}
    assert shipped == {file_name(d) for d in all_dashboards()}
    assert shipped == {
        "fleet-overview.json",
        "edge-bin-detail.json",
        "data-engine-loop.json",
        "model-quality.json",
    }
    for dashboard in all_dashboards():
        text = (DASHBOARDS / file_name(dashboard)).read_text(encoding="utf-8")
        assert text == render(dashboard), "run `python tools/make_dashboards.py`"


def _datasource_uids(model: dict[str, Any]) -> set[str]:
    uids = {panel["datasource"]["uid"] for panel in model["panels"]}
    uids |= {t["datasource"]["uid"] for panel in model["panels"] for t in panel["targets"]}
    return uids | {v["datasource"]["uid"] for v in model["templating"]["list"]}


def test_dashboard_models_are_consistent_with_the_provisioning() -> None:
    datasources = yaml.safe_load(
        (PROVISIONING / "datasources" / "prometheus.yaml").read_text(encoding="utf-8")
    )["datasources"]
    assert [d["uid"] for d in datasources] == [DATASOURCE_UID]
    providers = yaml.safe_load(
        (PROVISIONING / "dashboards" / "binloop.yaml").read_text(encoding="utf-8")
    )["providers"]
    assert [p["type"] for p in providers] == ["file"]

    uids = set()
    for path in dashboard_files():
        model = json.loads(path.read_text(encoding="utf-8"))
        uids.add(model["uid"])
        assert len(model["uid"]) <= 40, "Grafana uids are at most 40 characters"
        assert _datasource_uids(model) == {DATASOURCE_UID}, path.name
        ids = [panel["id"] for panel in model["panels"]]
        assert len(ids) == len(set(ids)), path.name
        for panel in model["panels"]:
            grid = panel["gridPos"]
            assert grid["x"] + grid["w"] <= 24, (path.name, panel["title"])
            assert panel["targets"], (path.name, panel["title"])
        variables = {v["name"] for v in model["templating"]["list"]}
        used = set(re.findall(r"\$(\w+)", path.read_text(encoding="utf-8"))) - {
            "__rate_interval",
            "__range",
            "__all",
        }
        assert used == variables, f"{path.name}: uses {used}, defines {variables}"
    assert len(uids) == 4


# -- against running services --------------------------------------------------------------


def _overrides(name: str, url: str, tmp_path: Path) -> dict[str, Any]:
    settings_class, _ = SERVICES[name].load()
    wanted: dict[str, Any] = {
        "nats_url": url,
        "http_port": 0,
        "http_host": "127.0.0.1",
        "retry_delay_s": 0.05,
        "blob_root": tmp_path / "blobs",
        "spool_root": tmp_path / "spool",
        "model_cache": tmp_path / "models",
        "export_dir": tmp_path / "label-studio",
        "source": str(ROOT / "data" / "demo" / "stream"),
        "max_frames": 2,
        "eval_dir": ROOT / "data" / "demo" / "eval",
    }
    return {key: value for key, value in wanted.items() if key in settings_class.model_fields}


@dataclass
class Running:
    services: dict[str, ServiceApp]
    bin_id: str
    capture_done: asyncio.Event


@pytest.fixture
async def running(nats_server: NatsServer, tmp_path: Path) -> AsyncIterator[Running]:
    # A bin id of its own: the metrics registry is shared by every test in this process.
    bin_id = f"metrics-{uuid.uuid4().hex[:8]}"
    capture_done = asyncio.Event()
    started: dict[str, ServiceApp] = {}
    try:
        for name, spec in SERVICES.items():
            settings_class, factory = spec.load()
            overrides = _overrides(name, nats_server.url, tmp_path)
            if "bin_id" in settings_class.model_fields:
                overrides["bin_id"] = bin_id
            if name == "frame-ingestor":
                service = factory(settings_class(**overrides), capture_done=capture_done)
            else:
                service = spec.create(**overrides)
            await service.start()
            started[name] = service
        yield Running(started, bin_id, capture_done)
    finally:
        for service in reversed(list(started.values())):
            await service.stop()


async def _scrape(session: aiohttp.ClientSession, service: ServiceApp) -> str:
    assert service.health is not None
    assert service.health.port
    async with session.get(f"http://127.0.0.1:{service.health.port}/metrics") as response:
        assert response.status == 200, service.name
        assert response.headers["Content-Type"].startswith("text/plain")
        return await response.text()


@pytest.mark.integration
async def test_every_dashboard_and_alert_expression_names_an_exposed_metric(
    running: Running,
) -> None:
    async with aiohttp.ClientSession() as session:
        pages = [await _scrape(session, service) for service in running.services.values()]
    assert len(pages) == len(SERVICES) == 8
    exposition = Exposition.parse(pages)

    # Every metric binloop defines is declared on /metrics, labeled or not.
    declared = set(exposition.families)
    for metric in _defined_metrics():
        assert metric._name in declared, metric._name

    expressions = [*dashboard_exprs(), *rule_exprs()]
    assert len(expressions) >= 50
    found = [
        f"{where}: {problem}"
        for where, expr in expressions
        for problem in problems(expr, exposition, recorded_names())
    ]
    assert found == []
    # The check is not vacuous: the panels together read the metrics the issue asks for.
    named = set().union(*(metric_names(expr) for _, expr in expressions))
    for required in (
        "binloop_frames_captured_total",
        "binloop_frames_inferred_total",
        "binloop_inference_stage_seconds_bucket",
        "binloop_frame_to_actuation_seconds_bucket",
        "binloop_decisions_total",
        "binloop_abstentions_total",
        "binloop_actuator_errors_total",
        "binloop_uploader_backlog_frames",
        "binloop_uploaded_bytes_total",
        "binloop_sampler_selections_total",
        "binloop_labeling_backlog_samples",
        "binloop_labeling_lead_time_seconds_bucket",
        "binloop_training_runs_total",
        "binloop_model_eval_accuracy_ratio",
        "binloop_model_served_version",
        "binloop_fleet_serving_bins",
        "binloop_dead_letters_total",
    ):
        assert required in named, required


@pytest.mark.integration
async def test_series_carry_the_bin_and_never_a_frame(running: Running) -> None:
    await asyncio.wait_for(running.capture_done.wait(), 30)
    async with aiohttp.ClientSession() as session:
        page = await _scrape(session, running.services["frame-ingestor"])
    assert f'binloop_frames_captured_total{{bin="{running.bin_id}"}} 2.0' in page
    label_names = {
        label
        for family in text_string_to_metric_families(page)
        for sample in family.samples
        for label in sample.labels
    }
    assert "bin" in label_names
    assert not label_names & UNBOUNDED_LABELS
