"""Which metrics a PromQL expression reads, and whether a /metrics exposition provides them.

Dashboards and alert rules name metrics in PromQL strings that no type checker sees; these
helpers let a test (or `tools/check_promql.py`) catch a renamed or misspelled metric.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from prometheus_client.parser import text_string_to_metric_families

# Words PromQL uses that look like identifiers but are not metric names.
_KEYWORDS = frozenset(
    {
        "by",
        "without",
        "on",
        "ignoring",
        "group_left",
        "group_right",
        "bool",
        "and",
        "or",
        "unless",
        "offset",
        "atan2",
        "inf",
        "nan",
    }
)
# Series Prometheus itself attaches to every scrape target.
PROMETHEUS_SYNTHETIC = frozenset(
    {
        "up",
        "scrape_duration_seconds",
        "scrape_samples_scraped",
        "scrape_samples_post_metric_relabeling",
        "scrape_series_added",
    }
)
# Functions whose argument must be a counter (a monotonic series) to mean anything.
_COUNTER_FUNCTIONS = ("rate", "irate", "increase", "resets")

_STRING = re.compile(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|`[^`]*`')
_BRACES = re.compile(r"\{[^{}]*\}")
_BRACKETS = re.compile(r"\[[^\[\]]*\]")
_GROUPING = re.compile(
    r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^()]*\)", re.IGNORECASE
)
# A duration, or a Grafana variable that becomes one (`offset $__range`).
_OFFSET = re.compile(r"\boffset\s+(?:-?(?:\d+(?:ms|[smhdwy]))+|\$\{?\w+\}?)", re.IGNORECASE)
_TOKEN = re.compile(
    r"(?P<number>(?:0x[0-9a-fA-F]+|\d+(?:\.\d*)?(?:[eE][+-]?\d+)?|\.\d+(?:[eE][+-]?\d+)?))"
    r"|(?P<ident>[A-Za-z_:][A-Za-z0-9_:]*)"
    r"|(?P<other>\S)"
)
_COUNTER_CALL = re.compile(
    r"\b(?:" + "|".join(_COUNTER_FUNCTIONS) + r")\s*\(\s*(?P<name>[A-Za-z_:][A-Za-z0-9_:]*)"
)


def _strip(expr: str) -> str:
    """The expression without strings, label matchers, ranges and grouping label lists."""
    text = _STRING.sub('""', expr)
    text = _BRACES.sub(" ", text)
    # Subqueries nest brackets only one level deep in practice; repeat until none are left.
    while _BRACKETS.search(text):
        text = _BRACKETS.sub(" ", text)
    return _OFFSET.sub(" ", _GROUPING.sub(" ", text))


def metric_names(expr: str) -> set[str]:
    """Every metric (series) name `expr` selects, e.g. `binloop_handler_seconds_bucket`."""
    text = _strip(expr)
    tokens = [(m.lastgroup, m.group()) for m in _TOKEN.finditer(text)]
    names: set[str] = set()
    for index, (kind, value) in enumerate(tokens):
        if kind != "ident" or value.lower() in _KEYWORDS:
            continue
        following = tokens[index + 1][1] if index + 1 < len(tokens) else ""
        if following == "(":
            continue  # a function or aggregation operator
        names.add(value)
    return names


def counter_arguments(expr: str) -> set[str]:
    """Metric names passed straight to rate/irate/increase/resets."""
    return {match.group("name") for match in _COUNTER_CALL.finditer(_strip(expr))}


@dataclass(frozen=True)
class Exposition:
    """The metric families one or more /metrics pages declare: name -> type."""

    families: Mapping[str, str]

    @classmethod
    def parse(cls, pages: Iterable[str]) -> Exposition:
        families: dict[str, str] = {}
        for page in pages:
            for family in text_string_to_metric_families(page):
                families[family.name] = family.type
        return cls(families)

    def series_names(self) -> dict[str, str]:
        """Every name a query may select -> the kind of series it is.

        prometheus_client declares a family even before a label value was used, so this
        covers labeled metrics that have no samples yet."""
        names: dict[str, str] = {}
        for family, kind in self.families.items():
            if kind == "counter":
                names[f"{family}_total"] = "counter"
                names[f"{family}_created"] = "gauge"
            elif kind == "histogram":
                names[f"{family}_bucket"] = "counter"
                names[f"{family}_sum"] = "counter"
                names[f"{family}_count"] = "counter"
                names[f"{family}_created"] = "gauge"
            elif kind == "summary":
                names[family] = "gauge"
                names[f"{family}_sum"] = "counter"
                names[f"{family}_count"] = "counter"
            else:
                names[family] = kind
        return names


def problems(expr: str, exposition: Exposition, extra_names: Iterable[str] = ()) -> list[str]:
    """What is wrong with `expr` against `exposition`: unknown names, rate() of a gauge."""
    known = exposition.series_names()
    allowed = set(known) | PROMETHEUS_SYNTHETIC | set(extra_names)
    found: list[str] = []
    names = metric_names(expr)
    if not names:
        found.append(f"{expr!r} selects no metric")
    for name in sorted(names - allowed):
        found.append(f"{expr!r} names {name!r}, which no service exposes")
    for name in sorted(counter_arguments(expr)):
        if known.get(name, "counter") != "counter":
            found.append(f"{expr!r} applies a counter function to {name!r}, a {known[name]}")
    return found
