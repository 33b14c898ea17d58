"""The live view of `binloop up` (a rich table refreshed a few times a second) and its summary."""

from __future__ import annotations

from rich.console import Group
from rich.table import Table

from binloop.monitor import LoopStats, percentile
from schemas.taxonomy import COMPARTMENTS


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f} ms"


def render(stats: LoopStats, title: str = "binloop: the data engine loop") -> Table:
    table = Table(title=title, show_header=True, header_style="bold", expand=False)
    table.add_column("stage")
    table.add_column("figures", overflow="fold")
    table.add_row("elapsed", f"{stats.elapsed_s:.0f} s")
    table.add_row(
        "frames",
        f"captured {stats.frames_captured}  ({stats.frames_per_second():.1f}/s)   "
        f"inferred {sum(stats.frame_ids_inferred.values())}   "
        f"stored {stats.frames_stored}   in flight {stats.in_flight}",
    )
    table.add_row(
        "frame -> actuation",
        f"p50 {_ms(percentile(stats.latencies_ms, 50))}   "
        f"p99 {_ms(percentile(stats.latencies_ms, 99))}   "
        f"(model p50 {_ms(percentile(stats.infer_ms, 50))})",
    )
    table.add_row(
        "compartments",
        "   ".join(f"{c.value} {stats.decisions.get(c.value, 0)}" for c in COMPARTMENTS)
        + f"   (abstained {stats.abstained}, actuator errors {stats.actuator_errors})",
    )
    table.add_row(
        "samples",
        "   ".join(f"{k} {v}" for k, v in sorted(stats.samples.items())) or "0",
    )
    table.add_row(
        "labels / snapshots",
        f"{stats.labels} labels   snapshots "
        + (", ".join(f"v{v} ({n} items)" for v, n in stats.snapshots) or "-"),
    )
    table.add_row(
        "training",
        ", ".join(f"v{v}: eval acc {acc:.1%} in {s:.0f}s" for v, acc, s in stats.trainings) or "-",
    )
    table.add_row(
        "registry",
        ", ".join(f"v{v} {decision}" for v, decision, _ in stats.registered) or "-",
    )
    served = ", ".join(
        f"v{v}: {n} frames"
        + (f" ({acc:.0%} match replay labels)" if (acc := stats.accuracy_of(v)) is not None else "")
        for v, n in sorted(stats.served_versions.items())
    )
    table.add_row("models served", served or "-")
    table.add_row(
        "dead letters",
        ", ".join(f"{k} {v}" for k, v in sorted(stats.dead_letters.items())) or "0",
    )
    return table


def progress_line(stats: LoopStats) -> str:
    """One line of the live table's figures, for runs without it (`up --no-live`, logs)."""
    decided = ", ".join(f"v{version} {decision}" for version, decision, _ in stats.registered)
    return (
        f"{stats.elapsed_s:.0f} s: frames captured {stats.frames_captured}, "
        f"inferred {sum(stats.frame_ids_inferred.values())}, stored {stats.frames_stored}; "
        f"samples {sum(stats.samples.values())}, labels {stats.labels}, "
        f"trainings {len(stats.trainings)}; registry: {decided or 'no decision yet'}"
    )


def summary(stats: LoopStats, reason: str) -> Group:
    checks = Table(title="integrity", show_header=True, header_style="bold")
    checks.add_column("check")
    checks.add_column("frames", justify="right")
    for kind, count in stats.lost().items():
        checks.add_row(f"captured but never {kind}", str(count))
    for kind, count in stats.duplicates().items():
        checks.add_row(f"{kind} more than once", str(count))
    decisions = Table(title="registry decisions", show_header=True, header_style="bold")
    decisions.add_column("version")
    decisions.add_column("decision")
    decisions.add_column("reason", overflow="fold")
    for version, decision, why in stats.registered:
        decisions.add_row(f"v{version}", decision, why)
    return Group(render(stats, title=f"binloop summary: {reason}"), decisions, checks)
