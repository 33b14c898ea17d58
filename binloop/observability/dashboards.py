"""The Grafana dashboards, built in code so every panel follows one layout and one datasource.

`python tools/make_dashboards.py` writes them to deploy/grafana/dashboards/; a test checks the
shipped JSON is what this module builds and that every expression names a real metric.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

DATASOURCE_UID = "binloop-prometheus"
"""The uid deploy/grafana/provisioning/datasources/prometheus.yaml gives the datasource."""
DATASOURCE = {"type": "prometheus", "uid": DATASOURCE_UID}
RATE = "$__rate_interval"
BIN = 'bin=~"$bin"'

Json = dict[str, Any]


@dataclass(frozen=True)
class Query:
    expr: str
    legend: str = ""


@dataclass(frozen=True)
class Panel:
    title: str
    queries: tuple[Query, ...]
    unit: str = "short"
    kind: str = "timeseries"
    width: int = 12
    height: int = 8
    description: str = ""


@dataclass
class Dashboard:
    uid: str
    title: str
    description: str
    panels: list[Panel]
    per_bin: bool = False
    tags: list[str] = field(default_factory=lambda: ["binloop"])


def q(expr: str, legend: str = "") -> Query:
    return Query(expr, legend)


def counted_within(counter: str, window: str, by: str = "") -> str:
    """How much `counter` (a full series name) grew within `window`. A labeled counter that no
    service creates ahead appears with its first event, already counted, which increase() misses:
    a series absent `window` ago counts with its whole value, the others with their increase."""
    grouping = f" by ({by}) " if by else ""
    return (
        f"sum{grouping}(({counter} unless {counter} offset {window}) "
        f"or increase({counter}[{window}]))"
    )


# What the bins serve comes from their heartbeats, through the model-registry's fleet gauge: over
# NATS, with or without the bins' metrics agents, and a bin that falls silent drops out (max: two
# registry replicas report the same bins).
SERVING_BINS = "max by (model, version) (binloop_fleet_serving_bins)"


def _panel_json(panel: Panel, panel_id: int, x: int, y: int) -> Json:
    targets = [
        {
            "refId": chr(ord("A") + index),
            "datasource": DATASOURCE,
            "expr": query.expr,
            "legendFormat": query.legend or "__auto",
            "range": panel.kind != "table",
            "instant": panel.kind == "table",
        }
        for index, query in enumerate(panel.queries)
    ]
    body: Json = {
        "id": panel_id,
        "type": panel.kind,
        "title": panel.title,
        "description": panel.description,
        "datasource": DATASOURCE,
        "gridPos": {"h": panel.height, "w": panel.width, "x": x, "y": y},
        "fieldConfig": {"defaults": {"unit": panel.unit}, "overrides": []},
        "targets": targets,
    }
    if panel.kind == "stat":
        body["options"] = {"reduceOptions": {"calcs": ["lastNotNull"], "values": False}}
    elif panel.kind == "table":
        body["transformations"] = [{"id": "merge", "options": {}}]
    return body


def _bin_variable() -> Json:
    return {
        "name": "bin",
        "label": "Bin",
        "type": "query",
        "datasource": DATASOURCE,
        "query": {"query": "label_values(binloop_frames_captured_total, bin)", "refId": "bins"},
        "definition": "label_values(binloop_frames_captured_total, bin)",
        "refresh": 2,
        "multi": True,
        "includeAll": True,
        "allValue": ".*",
        "current": {"selected": True, "text": ["All"], "value": ["$__all"]},
        "sort": 1,
    }


def to_json(dashboard: Dashboard) -> Json:
    """The Grafana dashboard model (schemaVersion 39), panels laid out left to right."""
    panels: list[Json] = []
    x = y = row_height = 0
    for panel_id, panel in enumerate(dashboard.panels, start=1):
        if x + panel.width > 24:
            x, y, row_height = 0, y + row_height, 0
        panels.append(_panel_json(panel, panel_id, x, y))
        x += panel.width
        row_height = max(row_height, panel.height)
    return {
        "uid": dashboard.uid,
        "title": dashboard.title,
        "description": dashboard.description,
        "tags": dashboard.tags,
        "editable": True,
        "graphTooltip": 1,
        "schemaVersion": 39,
        "version": 1,
        "refresh": "30s",
        "time": {"from": "now-6h", "to": "now"},
        "timezone": "utc",
        "templating": {"list": [_bin_variable()] if dashboard.per_bin else []},
        "annotations": {"list": []},
        "links": [
            {"type": "dashboards", "tags": ["binloop"], "title": "binloop", "asDropdown": True}
        ],
        "panels": panels,
    }


def _quantiles(metric: str, by: str, selector: str = "", window: str = RATE) -> tuple[Query, ...]:
    matcher = f"{{{selector}}}" if selector else ""
    return tuple(
        q(
            f"histogram_quantile({quantile}, sum by (le{by}) "
            f"(rate({metric}_bucket{matcher}[{window}])))",
            f"p{round(quantile * 100)}" + (" {{" + by.strip(", ") + "}}" if by else ""),
        )
        for quantile in (0.5, 0.95)
    )


def fleet_overview() -> Dashboard:
    return Dashboard(
        uid="binloop-fleet-overview",
        title="binloop / Fleet overview",
        description="Every bin at a glance: throughput, decisions, latency, errors, backlog.",
        panels=[
            Panel(
                "Bins reporting",
                (q(f"sum({SERVING_BINS})"),),
                kind="stat",
                width=6,
                height=4,
                description="Bins whose heartbeat in the last 5 minutes names the model they "
                "serve (model-registry's fleet view).",
            ),
            Panel(
                "Scrape targets up",
                (q('sum(up{job=~"binloop.*"})'),),
                kind="stat",
                width=6,
                height=4,
            ),
            Panel(
                "Items sorted (1h)",
                (q("sum(increase(binloop_decisions_total[1h]))"),),
                kind="stat",
                width=6,
                height=4,
            ),
            Panel(
                "Dead letters (1h)",
                (q(counted_within("binloop_dead_letters_total", "1h")),),
                kind="stat",
                width=6,
                height=4,
            ),
            Panel(
                "Frames captured per bin",
                (q(f"sum by (bin) (rate(binloop_frames_captured_total[{RATE}]))", "{{bin}}"),),
                unit="fps",
            ),
            Panel(
                "Frames classified per bin",
                (q(f"sum by (bin) (rate(binloop_frames_inferred_total[{RATE}]))", "{{bin}}"),),
                unit="fps",
            ),
            Panel(
                "Items per compartment",
                (
                    q(
                        f"sum by (compartment) (rate(binloop_decisions_total[{RATE}]))",
                        "{{compartment}}",
                    ),
                ),
                unit="ops",
            ),
            Panel(
                "Abstention rate per bin",
                (
                    q(
                        f"sum by (bin) (rate(binloop_abstentions_total[{RATE}])) / "
                        f"sum by (bin) (rate(binloop_decisions_total[{RATE}]))",
                        "{{bin}}",
                    ),
                ),
                unit="percentunit",
            ),
            Panel(
                "Frame to actuation, p95 per bin",
                (
                    q(
                        "histogram_quantile(0.95, sum by (le, bin) "
                        f"(rate(binloop_frame_to_actuation_seconds_bucket[{RATE}])))",
                        "{{bin}}",
                    ),
                ),
                unit="s",
            ),
            Panel(
                "Actuator errors",
                (
                    q(
                        f"sum by (bin, error) (rate(binloop_actuator_errors_total[{RATE}]))",
                        "{{bin}} {{error}}",
                    ),
                    q(
                        f"sum by (bin) (rate(binloop_actuator_stale_commands_total[{RATE}]))",
                        "{{bin}} stale (flap not moved)",
                    ),
                    q(
                        f"sum by (bin) (rate(binloop_actuator_journal_failures_total[{RATE}]))",
                        "{{bin}} journal not written (memory only)",
                    ),
                ),
                unit="ops",
            ),
            Panel(
                "Uploader backlog per bin",
                (
                    q("max by (bin) (binloop_uploader_backlog_frames)", "{{bin}}"),
                    # The agents' series, and the heartbeats (there also without an agent).
                    q("max by (bin) (binloop_fleet_spool_backlog_frames)", "{{bin}} (heartbeat)"),
                ),
                unit="short",
            ),
            Panel(
                "Bins per model version",
                (q(SERVING_BINS),),
                kind="table",
                description="From the bins' heartbeats (model-registry's fleet view); the Edge "
                "bin detail dashboard shows the version one bin serves.",
            ),
        ],
    )


def edge_bin_detail() -> Dashboard:
    return Dashboard(
        uid="binloop-edge-bin-detail",
        title="binloop / Edge bin detail",
        description="One bin (or a few): capture, per-stage inference, actuation, upload.",
        per_bin=True,
        panels=[
            Panel(
                "Items actuated (total)",
                (q(f"sum by (bin) (binloop_frame_to_actuation_seconds_count{{{BIN}}})"),),
                kind="stat",
                width=8,
                height=4,
            ),
            Panel(
                "Model version served",
                (q(f"max by (bin, model) (binloop_model_served_version{{{BIN}}})"),),
                kind="stat",
                width=8,
                height=4,
            ),
            Panel(
                "Model swaps (range)",
                (q(f"sum(increase(binloop_model_swaps_total{{{BIN}}}[$__range]))"),),
                kind="stat",
                width=8,
                height=4,
            ),
            Panel(
                "Frames captured, classified and skipped",
                (
                    q(f"sum(rate(binloop_frames_captured_total{{{BIN}}}[{RATE}]))", "captured"),
                    q(f"sum(rate(binloop_frames_inferred_total{{{BIN}}}[{RATE}]))", "classified"),
                    q(
                        f"sum by (reason) (rate(binloop_frames_skipped_total{{{BIN}}}[{RATE}]))",
                        "skipped: {{reason}}",
                    ),
                ),
                unit="fps",
            ),
            Panel(
                "Inference time per stage, p95",
                (
                    q(
                        "histogram_quantile(0.95, sum by (le, stage) "
                        f"(rate(binloop_inference_stage_seconds_bucket{{{BIN}}}[{RATE}])))",
                        "{{stage}}",
                    ),
                ),
                unit="s",
            ),
            Panel(
                "Frame to actuation latency",
                _quantiles("binloop_frame_to_actuation_seconds", "", BIN),
                unit="s",
            ),
            Panel(
                "Decisions per compartment",
                (
                    q(
                        f"sum by (compartment) (rate(binloop_decisions_total{{{BIN}}}[{RATE}]))",
                        "{{compartment}}",
                    ),
                    q(f"sum(rate(binloop_abstentions_total{{{BIN}}}[{RATE}]))", "abstained"),
                ),
                unit="ops",
            ),
            Panel(
                "Actuator errors",
                (
                    q(
                        f"sum by (error) (rate(binloop_actuator_errors_total{{{BIN}}}[{RATE}]))",
                        "{{error}}",
                    ),
                ),
                unit="ops",
            ),
            Panel(
                "Uploader backlog",
                (q(f"max by (bin) (binloop_uploader_backlog_frames{{{BIN}}})", "{{bin}}"),),
                unit="short",
            ),
            Panel(
                "Upload throughput",
                (q(f"sum by (bin) (rate(binloop_uploaded_bytes_total{{{BIN}}}[{RATE}]))"),),
                unit="Bps",
            ),
        ],
    )


def data_engine_loop() -> Dashboard:
    return Dashboard(
        uid="binloop-data-engine-loop",
        title="binloop / Data engine loop",
        description="The cloud loop: bus traffic, sampling, labeling, snapshots, dead letters.",
        panels=[
            Panel(
                "Messages consumed per service",
                (
                    q(
                        f"sum by (service) (rate(binloop_messages_consumed_total[{RATE}]))",
                        "{{service}}",
                    ),
                ),
                unit="ops",
            ),
            Panel(
                "Events published per route",
                (
                    q(
                        f"sum by (route) (rate(binloop_events_published_total[{RATE}]))",
                        "{{route}}",
                    ),
                ),
                unit="ops",
            ),
            Panel(
                "Handler time p95 per service",
                (
                    q(
                        "histogram_quantile(0.95, sum by (le, service, route) "
                        f"(rate(binloop_handler_seconds_bucket[{RATE}])))",
                        "{{service}} {{route}}",
                    ),
                ),
                unit="s",
            ),
            Panel(
                "Retries and dead letters",
                (
                    q(
                        "sum by (service, error_type) "
                        f"(rate(binloop_messages_retried_total[{RATE}]))",
                        "retry {{service}} {{error_type}}",
                    ),
                    q(
                        f"sum by (service, error_type) (rate(binloop_dead_letters_total[{RATE}]))",
                        "dlq {{service}} {{error_type}}",
                    ),
                ),
                unit="ops",
            ),
            Panel(
                "Sampler selections per strategy",
                (
                    q(
                        f"sum by (strategy) (rate(binloop_sampler_selections_total[{RATE}]))",
                        "{{strategy}}",
                    ),
                    q(
                        f"sum(rate(binloop_sampler_rate_limited_total[{RATE}]))",
                        "dropped by the per-bin limit",
                    ),
                    q(
                        f"sum(rate(binloop_sampler_near_duplicates_total[{RATE}]))",
                        "dropped as near-duplicates",
                    ),
                    q(
                        f"sum(rate(binloop_sampler_below_min_score_total[{RATE}]))",
                        "wanted, below min_score",
                    ),
                    q(
                        f"sum(rate(binloop_sampler_repeats_total[{RATE}]))",
                        "repeats (selected before)",
                    ),
                ),
                unit="ops",
            ),
            Panel(
                "Labels per backend",
                (
                    q(
                        f"sum by (backend) (rate(binloop_labels_total[{RATE}]))",
                        "{{backend}}",
                    ),
                ),
                unit="ops",
            ),
            Panel(
                "Labeling backlog",
                (q("sum by (backend) (binloop_labeling_backlog_samples)", "{{backend}}"),),
                unit="short",
            ),
            Panel(
                "Labeling lead time (selection to label)",
                _quantiles("binloop_labeling_lead_time_seconds", ", backend", window="1h"),
                unit="s",
            ),
            Panel(
                "Dataset snapshots and training runs (range)",
                (
                    q("sum(increase(binloop_dataset_snapshots_total[$__range]))", "snapshots"),
                    q(
                        "sum by (outcome) (increase(binloop_training_runs_total[$__range]))",
                        "training {{outcome}}",
                    ),
                ),
                kind="stat",
            ),
            Panel(
                "Object store: bytes uploaded and writes",
                (
                    q(f"sum(rate(binloop_uploaded_bytes_total[{RATE}]))", "frame bytes/s"),
                    q(
                        f"sum by (backend, outcome) (rate(binloop_blob_puts_total[{RATE}]))",
                        "puts {{backend}} {{outcome}}",
                    ),
                ),
                unit="short",
            ),
        ],
    )


def model_quality() -> Dashboard:
    return Dashboard(
        uid="binloop-model-quality",
        title="binloop / Model quality",
        description="Candidates against champions on the fixed eval set, and what the fleet runs.",
        panels=[
            Panel(
                "Eval accuracy: candidate and champion",
                (
                    q(
                        "max by (model, role) (binloop_model_eval_accuracy_ratio)",
                        "{{model}} {{role}}",
                    ),
                ),
                unit="percentunit",
            ),
            Panel(
                "Registry decisions (range)",
                (
                    q(
                        counted_within("binloop_model_promotions_total", "$__range", "decision"),
                        "{{decision}}",
                    ),
                ),
                kind="stat",
            ),
            Panel(
                "Training runs per outcome",
                (
                    q(
                        "sum by (outcome) (increase(binloop_training_runs_total[1h]))",
                        "{{outcome}}",
                    ),
                ),
                unit="short",
            ),
            Panel(
                "Training duration",
                _quantiles("binloop_training_duration_seconds", "", window="6h"),
                unit="s",
            ),
            Panel(
                "Bins per served model version",
                (q(SERVING_BINS, "{{model}} v{{version}}"),),
                unit="short",
                description="From the bins' heartbeats (model-registry's fleet view).",
            ),
            Panel(
                "Fleet abstention rate",
                (
                    q(
                        f"sum(rate(binloop_abstentions_total[{RATE}])) / "
                        f"sum(rate(binloop_decisions_total[{RATE}]))",
                        "abstained",
                    ),
                ),
                unit="percentunit",
            ),
        ],
    )


def all_dashboards() -> list[Dashboard]:
    return [fleet_overview(), edge_bin_detail(), data_engine_loop(), model_quality()]


def file_name(dashboard: Dashboard) -> str:
    return f"{dashboard.uid.removeprefix('binloop-')}.json"


def render(dashboard: Dashboard) -> str:
    return json.dumps(to_json(dashboard), indent=2, sort_keys=False) + "\n"


def write_all(folder: Path) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    written = []
    for dashboard in all_dashboards():
        path = folder / file_name(dashboard)
        path.write_text(render(dashboard), encoding="utf-8")
        written.append(path)
    return written
