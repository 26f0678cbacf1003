"""The operators' kit without a server: the shipped dashboard and rules are well formed, and each
malformation the checks exist for is refused with a message that names it."""

import json

import pytest

from server.ops.kit import (ALERTS, DASHBOARD, KitError, exported_series, load_dashboard, load_rules, missing,
                            recorded_names, used_metrics)

SHIPPED_ALERTS = {"MonolithServerDown", "MonolithServerRestarting", "MonolithErrorBudgetBurn", "MonolithFreshnessLag",
                  "MonolithUpdaterHalted", "MonolithGuardHolding", "MonolithJoinsShedding",
                  "MonolithFeatureLogShedding", "MonolithDiskNearFull", "MonolithDiskFillingUp"}


def test_shipped_rules_and_dashboard_are_well_formed():
    rules, dashboard = load_rules(), load_dashboard()
    alerts = {r["alert"] for g in rules["groups"] for r in g["rules"] if "alert" in r}
    assert alerts == SHIPPED_ALERTS
    uses = used_metrics(rules, dashboard)
    names = {u.name for u in uses}
    assert {"monolith_delta_updater_halted", "monolith_guard_state", "monolith_joiner_total",
            "nv_inference_request_success", "monolith_data_dir_free_bytes"} <= names
    assert any(u.labels == (("counter", "joined"),) for u in uses)  # fixed label values are kept for the check
    assert any(u.where == "variable $model" and u.name == "nv_inference_request_success" for u in uses)


def _rules(tmp_path, rule: str):
    path = tmp_path / "rules.yml"
    path.write_text("groups:\n  - name: g\n    rules:\n" + rule)
    return path


_GOOD_RULE = """      - alert: A
        expr: up == 0
        for: 1m
        labels: {severity: page}
        annotations: {summary: s, description: d, runbook: r}
"""


@pytest.mark.parametrize("change, message", [
    (("for: 1m", "for: 1 minute"), "at groups/0/rules/0"),  # not a Prometheus duration
    (("runbook: r", "runbok: r"), "at groups/0/rules/0"),  # every alert requires a runbook
    (("severity: page", "severity: urgent"), "at groups/0/rules/0"),
    (("up == 0", "rate(up[5m]"), "PromQL does not parse"),
    (("for: 1m", "for: 1m\n        for: 2m"), "not valid YAML: duplicate key 'for'"),
    (("labels: {severity: page}", "labels: {severity: page"), "not valid YAML"),
])
def test_malformed_rules_are_refused(tmp_path, change, message):
    load_rules(_rules(tmp_path, _GOOD_RULE))
    with pytest.raises(KitError, match=message):
        load_rules(_rules(tmp_path, _GOOD_RULE.replace(*change)))


def test_a_second_alert_of_the_same_name_is_refused(tmp_path):
    with pytest.raises(KitError, match="requires a unique name"):
        load_rules(_rules(tmp_path, _GOOD_RULE + _GOOD_RULE))


@pytest.mark.parametrize("edit, message", [
    (lambda d: d["panels"][2].update(id=d["panels"][1]["id"]), "panel ids require to be unique"),
    (lambda d: d["panels"][1]["targets"][0].update(expr="sum(rate(x[5m])"), "PromQL does not parse"),
    (lambda d: d["panels"][1]["gridPos"].update(w=25), "at panels/1/gridPos/w"),
    (lambda d: d["panels"][1]["gridPos"].update(x=20, w=8), "requires x \\+ w <= 24"),
    (lambda d: d["panels"][1]["targets"][0]["datasource"].update(uid="my-prometheus"), "at panels/1/targets/0"),
    (lambda d: d.pop("__inputs"), "'__inputs' is a required property"),
])
def test_malformed_dashboards_are_refused(tmp_path, edit, message):
    dashboard = json.loads(DASHBOARD.read_text())
    edit(dashboard)
    path = tmp_path / "dashboard.json"
    path.write_text(json.dumps(dashboard))
    with pytest.raises(KitError, match=message):
        load_dashboard(path)


def test_duplicate_json_keys_are_refused(tmp_path):
    path = tmp_path / "dashboard.json"
    path.write_text(DASHBOARD.read_text().replace('"title": "monolith-rt",', '"title": "monolith-rt", "title": "x",', 1))
    with pytest.raises(KitError, match="duplicate key 'title'"):
        load_dashboard(path)


_EXPOSITION = """# HELP monolith_front_refused_total Requests the front refused
# TYPE monolith_front_refused_total counter
monolith_front_refused_total{reason="invalid"} 3.0
monolith_front_refused_total{reason="too_large"} 0.0
# TYPE nv_inference_request_success counter
nv_inference_request_success{model="ranker",version="1"} 10
"""


def test_missing_names_a_renamed_metric_and_a_renamed_label_value(tmp_path):
    rules = load_rules(_rules(tmp_path, _GOOD_RULE.replace(
        "up == 0", 'rate(monolith_front_refused_total{reason="oversized"}[5m]) > 0 or monolith_gone > 0')))
    dashboard = json.loads(DASHBOARD.read_text())
    dashboard["panels"] = [{"id": 1, "type": "timeseries", "title": "p", "gridPos": {"h": 1, "w": 1, "x": 0, "y": 0},
                            "datasource": {"type": "prometheus", "uid": "${DS_PROMETHEUS}"},
                            "targets": [{"expr": 'sum(rate(nv_inference_request_success{model=~"$model"}[$__rate_interval]))',
                                         "refId": "A", "datasource": {"type": "prometheus", "uid": "${DS_PROMETHEUS}"}}]}]
    problems = missing(used_metrics(rules, dashboard), exported_series(_EXPOSITION), recorded_names(rules))
    assert problems == [
        "alert A: metric monolith_gone is not exported",
        "alert A: monolith_front_refused_total{reason=\"oversized\"} is not exported (values seen: ['invalid', "
        "'too_large'])"]


def test_files_sit_beside_the_checks():
    assert ALERTS.parent == DASHBOARD.parent and ALERTS.parent.name == "ops"


def test_exported_names_are_read_as_prometheus_stores_them():
    series = exported_series('# TYPE nv_inference_request_success counter\n'
                             'nv_inference_request_success{model="ranker",version="1"} 10\n'
                             'odd{l="a \\"quoted\\", {braced}",m="x\\\\y"} 1.0 1700000000\n'
                             'nv_inference_request_summary_us{quantile="0.5"} Nan\n')
    assert series["nv_inference_request_success"] == [{"model": "ranker", "version": "1"}]  # no _total added
    assert series["odd"] == [{"l": 'a "quoted", {braced}', "m": "x\\y"}]
    with pytest.raises(KitError, match="line 1 is not a Prometheus sample"):
        exported_series("not a sample line {\n")
