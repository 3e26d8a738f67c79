"""Every PromQL expression the deployment ships, ready to send to a real Prometheus.

Sources: the Grafana dashboards under ``docker/grafana/dashboards`` (each panel target, nested row
panels included, and each templating query) and the Prometheus rule files under
``docker/prometheus/rules`` (alerting and recording rules). Grafana's variables in dashboard
expressions (``$tenant``, ``${tenant}``, ``${tenant:regex}``, ``[[tenant]]``, ``$__rate_interval``,
``$__interval``, ``$__range`` ...) are replaced by concrete values; a templating query such as
``label_values(metric, label)`` becomes the PromQL selector it runs (``metric``).

    from support.promql import all_expressions
    for e in all_expressions(variables={"tenant": "acme"}):
        e.expr      # concrete PromQL;  e.raw: as written;  e.where: which panel / rule
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import yaml

REPO_ROOT = Path(__file__).resolve().parents[2]
DASHBOARDS_DIR = REPO_ROOT / "docker" / "grafana" / "dashboards"
RULES_DIR = REPO_ROOT / "docker" / "prometheus" / "rules"

# Grafana's global variables, with values that suit a short test against a live Prometheus
# (rate windows must cover at least two scrapes: 1m with the stack's 15 s scrape interval).
BUILTIN_VARIABLES: dict[str, str] = {
    "__rate_interval": "1m",
    "__rate_interval_ms": "60000",
    "__interval": "30s",
    "__interval_ms": "30000",
    "__range": "1h",
    "__range_s": "3600",
    "__range_ms": "3600000",
}

# ${name}, ${name:format}, [[name]], [[name:format]], $name  (names are \w+: __rate_interval too)
_VARIABLE = re.compile(r"\$\{(\w+)(?::[^}]*)?\}|\[\[(\w+)(?::[^\]]*)?\]\]|\$(\w+)")
_LABEL_VALUES = re.compile(r"^\s*label_values\(\s*(.+?)\s*,\s*[A-Za-z_][A-Za-z0-9_]*\s*\)\s*$", re.S)
_QUERY_RESULT = re.compile(r"^\s*query_result\(\s*(.+)\s*\)\s*$", re.S)
_NO_PROMQL = re.compile(r"^\s*(label_values\(\s*[A-Za-z_][A-Za-z0-9_]*\s*\)|label_names\(.*\)|metrics\(.*\))\s*$", re.S)


@dataclass(frozen=True)
class PromQLExpression:
    source: str   # file, relative to the repository root
    where: str    # e.g. "panel 3 'Requests / s' target A", "variable tenant", "alert TailorTargetDown"
    kind: str     # "panel" | "variable" | "alert" | "record"
    raw: str      # the expression as written in the file
    expr: str     # concrete PromQL (Grafana variables substituted)
    instant: bool = False  # a dashboard target that Grafana runs as an instant query

    def __str__(self) -> str:
        return f"{self.source}: {self.where}: {self.expr}"


# --- Grafana variables ---------------------------------------------------------------------------

def _format_value(value: str | Sequence[str]) -> str:
    """A multi-value selection renders as a regex alternation, as Grafana does for Prometheus."""
    if isinstance(value, str):
        return value
    values = list(value)
    if len(values) == 1:
        return values[0]
    return "(" + "|".join(re.escape(v) for v in values) + ")"


def substitute(expr: str, variables: Mapping[str, str | Sequence[str]] | None = None) -> str:
    """Replace Grafana variables in ``expr``. ``variables`` maps names (without ``$``) to a value or
    a list of values and wins over :data:`BUILTIN_VARIABLES`. An unknown variable raises KeyError."""
    values = {**BUILTIN_VARIABLES, **(variables or {})}

    def replace(match: re.Match) -> str:
        name = next(g for g in match.groups() if g is not None)
        if name not in values:
            raise KeyError(f"Grafana variable ${name} has no value (expression: {expr!r})")
        return _format_value(values[name])

    return _VARIABLE.sub(replace, expr)


def dashboard_variables(dashboard: Mapping, overrides: Mapping[str, str | Sequence[str]] | None = None) -> dict:
    """Values for a dashboard's own template variables: ``overrides`` first; else a query variable
    with "All" uses its allValue (``.*`` when none is set); constant, custom, interval and textbox
    variables use their current value or their first option."""
    overrides = dict(overrides or {})
    values: dict[str, str | Sequence[str]] = {}
    for var in dashboard.get("templating", {}).get("list", []):
        name = var["name"]
        if name in overrides:
            values[name] = overrides[name]
            continue
        kind = var.get("type")
        if kind == "datasource":
            continue
        if kind == "query" and var.get("includeAll"):
            values[name] = var.get("allValue") or ".*"
            continue
        current = (var.get("current") or {}).get("value")
        if current in (None, "", [], "$__all", ["$__all"]):
            options = var.get("options") or []
            current = None
            if options:
                current = options[0]["value"]
            elif kind in ("constant", "textbox"):
                current = var.get("query")
        if current in (None, "", []) or isinstance(current, Mapping):
            raise ValueError(f"dashboard {dashboard.get('uid')!r}: variable {name!r} needs a value: "
                             "pass it in variables")
        values[name] = current
    return values


def templating_query_to_promql(query: str | Mapping) -> str | None:
    """The PromQL that a Prometheus templating query runs, or None when it runs none
    (``label_names()``, ``metrics(...)``, ``label_values(label)``)."""
    text = query.get("query", "") if isinstance(query, Mapping) else query
    if not text or _NO_PROMQL.match(text):
        return None
    match = _LABEL_VALUES.match(text) or _QUERY_RESULT.match(text)
    return match.group(1) if match else text


# --- dashboards ------------------------------------------------------------------------------------

def iter_panels(panels: Sequence[Mapping]) -> Iterator[Mapping]:
    """Every panel, with the panels inside (collapsed) rows."""
    for panel in panels:
        yield panel
        yield from iter_panels(panel.get("panels") or [])


def _paths(path: Path, pattern: str) -> list[Path]:
    return sorted(path.glob(pattern)) if path.is_dir() else [path]


def _relative(path: Path) -> str:
    try:
        return str(path.resolve().relative_to(REPO_ROOT))
    except ValueError:
        return str(path)


def dashboard_expressions(path: Path = DASHBOARDS_DIR,
                          variables: Mapping[str, str | Sequence[str]] | None = None) -> list[PromQLExpression]:
    """Expressions of every panel target and templating query of the dashboard file(s) at ``path``
    (a ``.json`` file or a folder of them). Hidden targets are included."""
    found = []
    for file in _paths(Path(path), "*.json"):
        dashboard = json.loads(file.read_text())
        values = {**(variables or {}), **dashboard_variables(dashboard, variables)}  # builtins may be overridden
        source = _relative(file)
        for var in dashboard.get("templating", {}).get("list", []):
            if var.get("type") != "query":
                continue
            raw = templating_query_to_promql(var.get("query") or var.get("definition") or "")
            if raw is not None:
                found.append(PromQLExpression(source, f"variable {var['name']}", "variable", raw,
                                              substitute(raw, values)))
        for panel in iter_panels(dashboard.get("panels", [])):
            for target in panel.get("targets") or []:
                raw = target.get("expr")
                if raw is None:
                    continue
                where = f"panel {panel.get('id')} {panel.get('title', '')!r} target {target.get('refId', '?')}"
                found.append(PromQLExpression(source, where, "panel", raw, substitute(raw, values),
                                              instant=bool(target.get("instant")) and not target.get("range")))
    return found


# --- rules -----------------------------------------------------------------------------------------

def rule_expressions(path: Path = RULES_DIR) -> list[PromQLExpression]:
    """Expressions of every alerting and recording rule in the rule file(s) at ``path``."""
    found = []
    for file in _paths(Path(path), "*.y*ml"):
        document = yaml.safe_load(file.read_text()) or {}
        for group in document.get("groups", []):
            for rule in group.get("rules", []):
                kind = "alert" if "alert" in rule else "record"
                raw = str(rule["expr"]).strip()
                found.append(PromQLExpression(_relative(file), f"{kind} {rule[kind]} (group {group['name']})",
                                              kind, raw, raw))
    return found


def all_expressions(variables: Mapping[str, str | Sequence[str]] | None = None) -> list[PromQLExpression]:
    """Dashboards first, then rules."""
    return dashboard_expressions(variables=variables) + rule_expressions()


def as_recording_rules(expressions: Sequence[PromQLExpression], group: str = "extracted") -> dict:
    """A rule-file document with one recording rule per expression (``check:expr_<i>``): write it
    as YAML and run ``promtool check rules`` on it to parse every expression."""
    return {"groups": [{"name": group, "rules": [
        {"record": f"check:expr_{i}", "expr": e.expr} for i, e in enumerate(expressions)]}]}


# --- metric names ----------------------------------------------------------------------------------

_KEYWORDS = {"and", "or", "unless", "by", "without", "on", "ignoring", "group_left", "group_right",
             "offset", "bool", "inf", "nan", "atan2", "start", "end"}
_STRING = re.compile(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|`[^`]*`')
_GROUPING = re.compile(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)")
_IDENT = re.compile(r"[A-Za-z_:][A-Za-z0-9_:]*")


def metric_names(expr: str) -> set[str]:
    """Metric names an expression selects (approximate, enough for catalog checks): identifiers
    outside strings, label matchers, ranges and grouping clauses that are not functions or keywords."""
    text = _STRING.sub('""', expr)
    text = re.sub(r"\{[^}]*\}", " ", text)
    text = re.sub(r"\[[^\]]*\]", " ", text)
    text = _GROUPING.sub(" ", text)
    names = set()
    for match in _IDENT.finditer(text):
        name = match.group(0)
        rest = text[match.end():].lstrip()
        if name.lower() in _KEYWORDS or rest.startswith("("):
            continue
        before = text[:match.start()]
        if before and (before[-1].isdigit() or before[-1] == "."):  # 1e3, 5m inside numbers/durations
            continue
        names.add(name)
    return names
