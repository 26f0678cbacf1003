"""Checks of the operators' kit: the dashboard and the alert rules beside this file are well formed,
and every metric they query is one that `serve` and the trainer export.

Why a check: a dashboard or an alert names metrics by string. A renamed metric
or label leaves the panel empty and the alert silent, which reads as "all is
well"; nothing else would fail. So:

    structure   the rule file is YAML (PyYAML, duplicate keys refused) in
                Prometheus' rule-file shape (``rules.schema.json``, checked
                with jsonschema); the dashboard is JSON (duplicate keys
                refused) in the shape Grafana imports (``dashboard.schema.json``);
                panel ids unique, every alert with a runbook
    PromQL      every expression parses (promql-parser, the PromQL grammar
                of Prometheus 3); Grafana's interval variables are replaced
                by a duration first
    names       every selector's metric name is exported (or is one that
                Prometheus itself makes: ``up``, ``ALERTS``; or a recording
                rule of the file), and every label it matches with ``=`` on
                a fixed value is exported on that metric with that value
                (``reason="too_large"``, ``counter="shed_impressions"``)

``exported_series`` reads Prometheus text (the metrics port of `serve`, the
trainer's ``metrics.prom`` files); ``missing`` says what the kit uses that
it does not find there, one line per use.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
DASHBOARD = HERE / "grafana-dashboard.json"
ALERTS = HERE / "prometheus-alerts.yml"
_RULES_SCHEMA = HERE / "rules.schema.json"
_DASHBOARD_SCHEMA = HERE / "dashboard.schema.json"

# Series Prometheus makes itself, not any target: usable without an exporter.
PROMETHEUS_SERIES = frozenset({"up", "ALERTS", "ALERTS_FOR_STATE", "scrape_duration_seconds", "scrape_samples_scraped"})
# Labels Prometheus attaches to every scraped series (or that the scrape renames into).
_TARGET_LABELS = frozenset({"job", "instance", "__name__"})
_LABEL_VALUES = re.compile(r"^\s*label_values\((.+),\s*[a-zA-Z_][a-zA-Z0-9_]*\s*\)\s*$")  # a variable's query
_GRAFANA_INTERVALS = re.compile(r"\$(__rate_interval|__interval|__range)\b|\$\{(__rate_interval|__interval|__range)\}")


class KitError(ValueError):
    """The kit is malformed; the message names the file, the place and the rule broken."""


@dataclass(frozen=True)
class Use:
    """One selector in the kit: metric ``name`` with its fixed-value ``=`` matchers, and where it is."""

    name: str
    labels: tuple[tuple[str, str], ...]  # (label, value) of each = matcher on a fixed value
    where: str  # "alert MonolithServerDown", "panel 'Front refusals'"


def _no_duplicate_keys(pairs):
    seen = {}
    for key, value in pairs:
        if key in seen:
            raise KitError(f"duplicate key {key!r}")
        seen[key] = value
    return seen


def _yaml_loader():
    import yaml

    class Loader(yaml.SafeLoader):
        pass

    def mapping(loader, node):
        loader.flatten_mapping(node)
        return _no_duplicate_keys([(loader.construct_object(k, deep=True), loader.construct_object(v, deep=True))
                                   for k, v in node.value])

    Loader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, mapping)
    return Loader


def _validate(document, schema_path: Path, what: str) -> None:
    import jsonschema

    schema = json.loads(schema_path.read_text())
    validator = jsonschema.Draft7Validator(schema)
    errors = sorted(validator.iter_errors(document), key=lambda e: list(e.absolute_path))
    if errors:
        first = errors[0]
        place = "/".join(str(p) for p in first.absolute_path) or "(top)"
        raise KitError(f"{what}: at {place}: {first.message} ({len(errors)} schema error(s) in all)")


def parse_promql(expr: str, where: str):
    """The expression's AST (Grafana's $__rate_interval and friends read as 5m)."""
    import promql_parser

    try:
        return promql_parser.parse(_GRAFANA_INTERVALS.sub("5m", expr))
    except ValueError as exc:
        raise KitError(f"{where}: PromQL does not parse ({exc}): {expr}") from exc


def selectors(expr: str, where: str) -> list[Use]:
    import promql_parser

    uses: list[Use] = []

    def visit(node):
        if isinstance(node, promql_parser.VectorSelector):
            if not node.name:
                raise KitError(f"{where}: a selector without a metric name cannot be checked: {expr}")
            fixed = tuple((m.name, m.value) for m in node.matchers.matchers
                          if m.op == promql_parser.MatchOp.Equal and "$" not in m.value)
            uses.append(Use(node.name, fixed, where))

    promql_parser.walk(parse_promql(expr, where), visit)
    return uses


def load_rules(path: Path = ALERTS) -> dict:
    """The rule file, checked: YAML, Prometheus' rule-file shape, PromQL, unique names, a runbook per alert."""
    import yaml

    try:
        rules = yaml.load(path.read_text(), Loader=_yaml_loader())
    except (yaml.YAMLError, KitError) as exc:
        raise KitError(f"{path.name}: not valid YAML: {exc}") from exc
    _validate(rules, _RULES_SCHEMA, path.name)
    names = set()
    for group in rules["groups"]:
        for rule in group["rules"]:
            name = rule.get("alert") or rule["record"]
            where = f"{path.name}: rule {name}"
            if name in names:
                raise KitError(f"{where}: requires a unique name, got a second {name}")
            names.add(name)
            parse_promql(rule["expr"], where)
    return rules


def load_dashboard(path: Path = DASHBOARD) -> dict:
    """The dashboard, checked: JSON, the shape Grafana imports, unique panel ids, PromQL that parses."""
    try:
        dashboard = json.loads(path.read_text(), object_pairs_hook=_no_duplicate_keys)
    except (ValueError, KitError) as exc:
        raise KitError(f"{path.name}: not valid JSON: {exc}") from exc
    _validate(dashboard, _DASHBOARD_SCHEMA, path.name)
    ids = [p["id"] for p in panels(dashboard)]
    if len(ids) != len(set(ids)):
        raise KitError(f"{path.name}: panel ids require to be unique, got {sorted(ids)}")
    for panel in panels(dashboard):
        grid = panel["gridPos"]
        if grid["x"] + grid["w"] > 24:
            raise KitError(f"{path.name}: panel {panel['title']!r} requires x + w <= 24 (Grafana's grid), got "
                           f"{grid['x']} + {grid['w']}")
    for panel in panels(dashboard):
        for target in panel.get("targets", []):
            parse_promql(target["expr"], f"{path.name}: panel {panel['title']!r}")
    return dashboard


def panels(dashboard: dict) -> list[dict]:
    """Every panel, rows' children included."""
    out = []
    for panel in dashboard["panels"]:
        out.append(panel)
        out.extend(panel.get("panels", []))
    return out


def used_metrics(rules: dict, dashboard: dict) -> list[Use]:
    uses = []
    for group in rules["groups"]:
        for rule in group["rules"]:
            kind, name = ("alert", rule["alert"]) if "alert" in rule else ("recording rule", rule["record"])
            uses += selectors(rule["expr"], f"{kind} {name}")
    for panel in panels(dashboard):
        for target in panel.get("targets", []):
            uses += selectors(target["expr"], f"panel {panel['title']!r}")
    for variable in dashboard["templating"]["list"]:
        query = variable.get("query")
        query = query.get("query", "") if isinstance(query, dict) else query or ""
        match = _LABEL_VALUES.match(query)
        if variable["type"] == "query" and match:
            uses += selectors(match.group(1), f"variable ${variable['name']}")
    return uses


def recorded_names(rules: dict) -> set[str]:
    return {rule["record"] for group in rules["groups"] for rule in group["rules"] if "record" in rule}


_SAMPLE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})?\s+\S+(?:\s+-?\d+)?\s*$")
_LABEL = re.compile(r'\s*([a-zA-Z_][a-zA-Z0-9_]*)\s*=\s*"((?:[^"\\]|\\.)*)"\s*,?')


def exported_series(*texts: str) -> dict[str, list[dict]]:
    """metric name -> the label sets of its samples, over Prometheus text expositions.

    Names are read from the sample lines as written, which is what Prometheus stores
    (prometheus_client's parser would add ``_total`` to Triton's counters, OpenMetrics style)."""
    series: dict[str, list[dict]] = {}
    for text in texts:
        for number, line in enumerate(text.splitlines(), 1):
            if not line.strip() or line.startswith("#"):
                continue
            match = _SAMPLE.match(line)
            if match is None:
                raise KitError(f"exposition line {number} is not a Prometheus sample: {line[:200]}")
            labels, rest = {}, match.group(2) or ""
            while rest.strip():
                pair = _LABEL.match(rest)
                if pair is None:
                    raise KitError(f"exposition line {number}: bad labels: {line[:200]}")
                labels[pair.group(1)] = re.sub(r"\\(.)", lambda m: "\n" if m.group(1) == "n" else m.group(1),
                                               pair.group(2))
                rest = rest[pair.end():]
            series.setdefault(match.group(1), []).append(labels)
    return series


def missing(uses: list[Use], series: dict[str, list[dict]], recorded: set[str] = frozenset()) -> list[str]:
    """One line per use of a metric, or of a label value on it, that ``series`` does not hold."""
    out = []
    for use in uses:
        if use.name in PROMETHEUS_SERIES or use.name in recorded:
            continue
        if use.name not in series:
            out.append(f"{use.where}: metric {use.name} is not exported")
            continue
        for label, value in use.labels:
            if label in _TARGET_LABELS:
                continue
            if not any(labels.get(label) == value for labels in series[use.name]):
                seen = sorted({labels[label] for labels in series[use.name] if label in labels})
                out.append(f"{use.where}: {use.name}{{{label}=\"{value}\"}} is not exported (values seen: {seen})")
    return sorted(set(out))
