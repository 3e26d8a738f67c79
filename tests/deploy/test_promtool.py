"""Prometheus configuration, alert rules and every dashboard query, checked by promtool (Debian's
`prometheus` package; CI installs it). Without promtool these tests fail: they do not skip."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
import yaml
from deploy.compose_config import REPO_ROOT
from support.promql import all_expressions, as_recording_rules, dashboard_expressions, rule_expressions

PROMETHEUS_DIR = REPO_ROOT / "docker/prometheus"
CONFIG = PROMETHEUS_DIR / "prometheus.yml"
RULE_FILES = sorted((PROMETHEUS_DIR / "rules").glob("*.yml"))
ALERT_TESTS = Path(__file__).with_name("alerts_test.yml")
SEVERITIES = {"critical", "warning"}


def require_promtool() -> str:
    """promtool's path; a missing promtool fails the calling test (CI must install it)."""
    path = shutil.which("promtool")
    if path is None:
        pytest.fail("promtool is not installed: `apt-get install -y prometheus` (Debian's package ships it); "
                    ".ci/run installs it for CI")
    return path


def run_promtool(promtool: str, *args: str) -> str:
    result = subprocess.run([promtool, *args], capture_output=True, text=True, timeout=120, cwd=REPO_ROOT)
    output = result.stdout + result.stderr
    assert result.returncode == 0, f"promtool {' '.join(args)} failed:\n{output}"
    return output


def test_promtool_check_config():
    promtool = require_promtool()
    output = run_promtool(promtool, "check", "config", str(CONFIG))
    assert f"{len(RULE_FILES)} rule files found" in output, output


def test_promtool_check_rules():
    promtool = require_promtool()
    assert RULE_FILES, "no rule files"
    run_promtool(promtool, "check", "rules", *map(str, RULE_FILES))


def test_alerts_fire_on_bad_series_and_stay_silent_on_good_ones():
    """promtool's unit tests (tests/deploy/alerts_test.yml) for every alert."""
    promtool = require_promtool()
    run_promtool(promtool, "test", "rules", str(ALERT_TESTS))
    tests = yaml.safe_load(ALERT_TESTS.read_text())
    fired, silent = set(), set()
    for case in tests["tests"]:
        for check in case.get("alert_rule_test", []):
            (fired if check.get("exp_alerts") else silent).add(check["alertname"])
    alerts = {e.where.split()[1] for e in rule_expressions() if e.kind == "alert"}
    assert alerts - fired == set(), f"alerts no test makes fire: {sorted(alerts - fired)}"
    assert alerts - silent == set(), f"alerts no test keeps silent: {sorted(alerts - silent)}"


def test_every_dashboard_and_rule_expression_parses(tmp_path):
    """Each extracted expression (Grafana variables substituted) as a recording rule: promtool
    parses them all."""
    promtool = require_promtool()
    for variables in (None, {"tenant": "acme"}, {"tenant": ["acme", "globex"]}):
        expressions = all_expressions(variables)
        assert len(expressions) >= 50
        rules = tmp_path / "extracted.yml"
        rules.write_text(yaml.safe_dump(as_recording_rules(expressions), sort_keys=False))
        output = run_promtool(promtool, "check", "rules", str(rules))
        assert f"{len(expressions)} rules found" in output, output


def test_a_typo_in_an_expression_is_caught(tmp_path):
    promtool = require_promtool()
    (broken,) = [e for e in dashboard_expressions() if e.where.startswith("panel") and "sum(rate(" in e.expr][:1]
    bad = type(broken)(broken.source, broken.where, broken.kind, broken.raw, broken.expr + ")")
    rules = tmp_path / "broken.yml"
    rules.write_text(yaml.safe_dump(as_recording_rules([bad])))
    result = subprocess.run([promtool, "check", "rules", str(rules)], capture_output=True, text=True, timeout=60)
    assert result.returncode != 0


# --- the configuration's content ------------------------------------------------------------------

def test_scrape_jobs_and_rule_files():
    config = yaml.safe_load(CONFIG.read_text())
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    for name, targets in (("api", ["api:8000"]), ("inference", ["inference:8001", "inference-2:8001"]),
                          ("worker", ["worker:9101"])):
        job = jobs[name]
        assert job.get("metrics_path", "/metrics") == "/metrics"
        assert [t for sc in job["static_configs"] for t in sc["targets"]] == targets
    matched = [p for pattern in config["rule_files"] for p in (CONFIG.parent).glob(pattern)]
    assert sorted(matched) == RULE_FILES


def test_every_alert_has_for_severity_and_annotations():
    alerts = 0
    for path in RULE_FILES:
        for group in yaml.safe_load(path.read_text())["groups"]:
            for rule in group["rules"]:
                if "alert" not in rule:
                    continue
                alerts += 1
                name = rule["alert"]
                assert rule.get("for"), f"{name}: no `for`"
                assert rule.get("labels", {}).get("severity") in SEVERITIES, f"{name}: severity"
                annotations = rule.get("annotations", {})
                assert annotations.get("summary") and annotations.get("description"), f"{name}: annotations"
    assert alerts >= 6


def test_the_required_alerts_exist():
    exprs = {e.where.split()[1]: e.expr for e in rule_expressions() if e.kind == "alert"}
    assert "up{" in exprs["TailorTargetDown"] and "== 0" in exprs["TailorTargetDown"]
    assert 'status=~"5.."' in exprs["TailorHighErrorRate"]
    ttft = exprs["TailorFirstTokenLatencySLO"]
    assert "histogram_quantile(0.9" in ttft and "tailor_inference_time_to_first_token_seconds_bucket" in ttft
    assert ttft.rstrip().endswith("> 6")
    assert 'kind=~"free|cached"' in exprs["TailorPagePoolExhausted"] and "< 0.05" in exprs["TailorPagePoolExhausted"]
    slo = exprs["TailorTenantSLOAttainmentLow"]
    assert "tailor_slo_ttft_attained_total" in slo and "tailor_slo_ttft_missed_total" in slo and "by (tenant)" in slo
    assert "< 0.9" in slo and "[10m]" in slo
    thrash = exprs["TailorAdapterThrash"]
    assert "tailor_adapter_evictions_total" in thrash and "tailor_adapter_loads_total" in thrash
    assert "tailor_worker_queue_length" in exprs["TailorWorkerQueueBacklog"]
    assert "tailor_worker_queue_lag_seconds_bucket" in exprs["TailorWorkerQueueLag"]
    # outcome="error" counts adapters given up (never retried attempts); retries have their own alert
    assert 'outcome="error"' in exprs["TailorWorkerValidationErrors"]
    assert 'outcome="retry"' in exprs["TailorWorkerValidationRetrying"]
    fetch = exprs["TailorAdapterFetchFailures"]
    assert "tailor_adapter_fetch_failures_total" in fetch and "reason" in fetch


def test_every_alert_has_a_row_in_the_operations_alerts_table():
    """docs/operations.md's alerts table is where an operator paged by an alert looks for what to
    do: every alert in the rules has a row there with its severity and a non-empty action, and the
    table names no alert the rules lack."""
    rules = {}
    for path in RULE_FILES:
        for group in yaml.safe_load(path.read_text())["groups"]:
            rules.update({r["alert"]: r["labels"]["severity"] for r in group["rules"] if "alert" in r})
    text = (REPO_ROOT / "docs/operations.md").read_text()
    table = text[text.index("## Alerts"):]
    rows = {}
    for line in table.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if line.startswith("| Tailor") and len(cells) == 4:
            rows[cells[0]] = cells
    assert set(rows) == set(rules)
    for name, (_name, severity, fires_when, what_to_do) in rows.items():
        assert severity == rules[name], f"{name}: severity in docs/operations.md"
        assert fires_when and len(what_to_do) > 40, f"{name}: say when it fires and what to do"
