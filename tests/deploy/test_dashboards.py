"""The Grafana dashboards and their provisioning, checked structurally (Grafana cannot run here):
valid JSON with uid and title, unique panel ids on a 24-column grid without overlaps, a PromQL
expression on every target, the provisioned datasource everywhere, metric names from the
services' catalog, and provisioning paths that match the mounts in docker-compose.yml."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import yaml
from deploy.compose_config import REPO_ROOT
from support.promql import DASHBOARDS_DIR, dashboard_expressions, iter_panels, metric_names, rule_expressions

PROVISIONING = REPO_ROOT / "docker/grafana/provisioning"
DASHBOARD_FILES = sorted(DASHBOARDS_DIR.glob("*.json"))
REQUIRED_DASHBOARDS = {"overview.json", "engine.json", "tenants.json"}

# The metrics the services export (the contract of the observability issue). Histograms add
# _bucket, _sum and _count series.
COUNTERS = {
    "tailor_http_requests_total", "tailor_tenant_requests_total", "tailor_tenant_tokens_total",
    "tailor_rejected_requests_total", "tailor_inference_prompt_tokens_total",
    "tailor_inference_generation_tokens_total", "tailor_inference_preemptions_total",
    "tailor_inference_requests_finished_total", "tailor_adapter_cache_hits_total",
    "tailor_adapter_cache_misses_total", "tailor_adapter_loads_total", "tailor_adapter_evictions_total",
    "tailor_adapter_fetch_failures_total", "tailor_worker_validations_total",
    "tailor_slo_ttft_attained_total", "tailor_slo_ttft_missed_total", "tailor_slo_early_aborts_total",
    "tailor_prefix_cache_queries_tokens_total", "tailor_prefix_cache_hits_tokens_total",
    "tailor_training_jobs_total", "tailor_training_adapters_total",
    "tailor_router_decisions_total", "tailor_router_retries_total", "tailor_router_ejections_total",
}
GAUGES = {
    "tailor_inference_requests_waiting", "tailor_inference_requests_running", "tailor_pool_pages",
    "tailor_pool_pages_total", "tailor_pool_bytes", "tailor_adapter_staged_bytes", "tailor_adapters_resident",
    "tailor_worker_queue_length", "tailor_tenant_info", "tailor_prefix_cache_pages", "tailor_training_jobs_running",
    "tailor_step_token_budget", "tailor_router_replica_up", "tailor_router_replica_in_flight",
}
# Exported by inference under vLLM's names for Kubernetes' inference gateway (its endpoint picker
# scrapes them to route by queue depth and LoRA affinity); they repeat tailor_* series, so no
# dashboard needs to show them.
GATEWAY_GAUGES = {
    "vllm:num_requests_waiting", "vllm:num_requests_running", "vllm:kv_cache_usage_perc",
    "vllm:gpu_cache_usage_perc", "vllm:lora_requests_info",
}
HISTOGRAMS = {
    "tailor_http_request_duration_seconds", "tailor_inference_time_to_first_token_seconds",
    "tailor_inference_time_per_output_token_seconds", "tailor_inference_e2e_latency_seconds",
    "tailor_inference_batch_size", "tailor_adapter_load_seconds", "tailor_worker_validation_duration_seconds",
    "tailor_worker_queue_lag_seconds", "tailor_training_duration_seconds", "tailor_training_examples",
}
KNOWN_SERIES = COUNTERS | GAUGES | GATEWAY_GAUGES | {f"{h}{s}" for h in HISTOGRAMS for s in ("_bucket", "_sum", "_count")} | {"up"}


def provisioned_datasource_uid() -> str:
    document = yaml.safe_load((PROVISIONING / "datasources/prometheus.yml").read_text())
    (datasource,) = [d for d in document["datasources"] if d["type"] == "prometheus"]
    return datasource["uid"]


@pytest.fixture(scope="module", params=[p.name for p in DASHBOARD_FILES])
def dashboard(request) -> dict:
    return json.loads((DASHBOARDS_DIR / request.param).read_text())


def test_the_three_dashboards_exist_with_unique_uids():
    assert REQUIRED_DASHBOARDS <= {p.name for p in DASHBOARD_FILES}
    uids, titles = [], []
    for path in DASHBOARD_FILES:
        document = json.loads(path.read_text())
        assert document.get("uid") and document.get("title"), f"{path.name} needs uid and title"
        assert len(document["uid"]) <= 40, "Grafana limits uids to 40 characters"
        assert document.get("id") is None, f"{path.name}: drop the instance-specific id"
        uids.append(document["uid"])
        titles.append(document["title"])
    assert len(set(uids)) == len(uids) and len(set(titles)) == len(titles)


def test_panel_ids_are_unique_and_panels_have_titles(dashboard):
    panels = list(iter_panels(dashboard["panels"]))
    assert panels, "empty dashboard"
    ids = [p.get("id") for p in panels]
    assert None not in ids and len(set(ids)) == len(ids), f"{dashboard['uid']}: duplicate or missing panel ids"
    for panel in panels:
        assert panel.get("title"), f"{dashboard['uid']}: panel {panel['id']} has no title"


def test_panels_fit_the_grid_without_overlapping(dashboard):
    cells: dict[tuple[int, int], int] = {}
    for panel in iter_panels(dashboard["panels"]):
        pos = panel["gridPos"]
        assert pos["w"] >= 1 and pos["h"] >= 1 and 0 <= pos["x"] and pos["x"] + pos["w"] <= 24, \
            f"{dashboard['uid']}: panel {panel['id']} is off the 24-column grid"
        for x in range(pos["x"], pos["x"] + pos["w"]):
            for y in range(pos["y"], pos["y"] + pos["h"]):
                assert (x, y) not in cells, f"{dashboard['uid']}: panels {cells[(x, y)]} and {panel['id']} overlap"
                cells[(x, y)] = panel["id"]


def test_every_target_has_an_expr_and_the_provisioned_datasource(dashboard):
    uid = provisioned_datasource_uid()
    for panel in iter_panels(dashboard["panels"]):
        if panel["type"] == "row":
            continue
        assert panel.get("targets"), f"{dashboard['uid']}: panel {panel['title']!r} has no query"
        assert panel.get("datasource", {}).get("uid") == uid, f"panel {panel['title']!r}: datasource uid"
        ref_ids = [t.get("refId") for t in panel["targets"]]
        assert len(set(ref_ids)) == len(ref_ids), f"panel {panel['title']!r}: duplicate refIds"
        for target in panel["targets"]:
            assert target.get("expr", "").strip(), f"panel {panel['title']!r} target {target.get('refId')}: no expr"
            assert target.get("datasource", {}).get("uid") == uid, f"panel {panel['title']!r}: target datasource uid"
    for variable in dashboard.get("templating", {}).get("list", []):
        if variable.get("type") == "query":
            assert variable.get("datasource", {}).get("uid") == uid


def test_rates_use_the_rate_interval_and_ranges_use_the_range():
    for e in dashboard_expressions():
        if "rate(" in e.raw or "increase(" in e.raw:
            assert "$__rate_interval" in e.raw or "$__range" in e.raw, f"{e.where}: use $__rate_interval: {e.raw}"


TENANT_NAMES = "max by (tenant, tenant_name) (tailor_tenant_info)"


def _grafana_regex(variable: dict) -> re.Pattern:
    """A variable's ``/regex/`` in Python syntax (Grafana's named groups are ``(?<name>...)``)."""
    pattern = variable["regex"]
    assert pattern.startswith("/") and pattern.endswith("/"), pattern
    return re.compile(pattern[1:-1].replace("(?<", "(?P<"))


def test_tenant_dashboard_has_the_tenant_variable():
    document = json.loads((DASHBOARDS_DIR / "tenants.json").read_text())
    variables = {v["name"]: v for v in document["templating"]["list"]}
    tenant = variables["tenant"]
    query = tenant["query"]["query"] if isinstance(tenant["query"], dict) else tenant["query"]
    assert query == f"query_result({TENANT_NAMES})"
    assert tenant["type"] == "query" and tenant.get("includeAll") and tenant.get("multi")
    exprs = [t["expr"] for p in iter_panels(document["panels"]) for t in p.get("targets", [])]
    assert exprs and all('tenant=~"$tenant"' in e for e in exprs), "every tenant panel filters on $tenant"
    for path in DASHBOARD_FILES:
        if path.name != "tenants.json":
            assert "$tenant" not in path.read_text(), f"{path.name} uses $tenant but has no such variable"


def test_tenant_variable_shows_names_and_selects_ids():
    """Grafana's query_result lines, as it formats them; the option's text is the name (quotes and
    braces included), its value the id that the metrics carry."""
    tenant = {v["name"]: v for v in json.loads((DASHBOARDS_DIR / "tenants.json").read_text())["templating"]["list"]}
    regex = _grafana_regex(tenant["tenant"])
    for name in ("acme", 'the "best" {co}', "Zürich AG"):
        line = f'{{tenant="0b5e7c1d2f",tenant_name="{name}"}} 1 1733300000000'
        match = regex.search(line)
        assert match and match.group("value") == "0b5e7c1d2f" and match.group("text") == name, (line, regex)


def test_per_tenant_panels_are_labelled_with_tenant_names():
    document = json.loads((DASHBOARDS_DIR / "tenants.json").read_text())
    per_tenant = [t for p in iter_panels(document["panels"]) for t in p.get("targets", [])
                  if "by (tenant" in t["expr"]]
    assert len(per_tenant) >= 5
    for target in per_tenant:
        assert f"* on(tenant) group_left(tenant_name) {TENANT_NAMES}" in target["expr"], target["expr"]
        assert "{{tenant_name}}" in target["legendFormat"] and "{{tenant}}" not in target["legendFormat"], target


def test_quantiles_and_ratios_are_guarded_against_quiet_windows():
    """histogram_quantile over zero rates and 0/0 ratios are NaN: each quantile keeps only windows
    with observations, each ratio of rates divides by a denominator filtered ``> 0``, and no bare
    ``or vector(0)`` adds an unlabelled series beside labelled ones."""
    for e in dashboard_expressions():
        if "histogram_quantile(" in e.raw:
            assert re.search(r"and on\([\w, ]*\) \(sum[^>]*_count\[[^\]]+\]\)\) > 0\)", e.raw), f"{e.where}: {e.raw}"
        for _, denominator in re.findall(r"(\)) / (.*)", e.raw):
            if "rate(" in denominator:
                assert "> 0)" in denominator, f"{e.where}: unguarded ratio of rates: {e.raw}"
        assert "or vector(" not in e.raw, f"{e.where}: bare `or vector(...)`: use `or on() ...`: {e.raw}"
    for path in DASHBOARD_FILES:
        if path.name != "tenants.json":
            assert "$tenant" not in path.read_text(), f"{path.name} uses $tenant but has no such variable"


def test_grafana_variables_are_substituted():
    expressions = dashboard_expressions(variables={"tenant": ["acme", "globex"]})
    assert len(expressions) >= 40
    for e in expressions:
        assert "$" not in e.expr and "[[" not in e.expr, f"{e.where}: {e.expr}"
    tenant_exprs = [e.expr for e in expressions if '$tenant' in e.raw]
    assert tenant_exprs and all('tenant=~"(acme|globex)"' in x for x in tenant_exprs)
    assert any("[1m]" in e.expr for e in expressions) and any("[1h]" in e.expr for e in expressions)
    variables = [e for e in expressions if e.kind == "variable"]
    assert [v.expr for v in variables] == [TENANT_NAMES]


def test_dashboards_and_rules_use_only_exported_metrics():
    for e in dashboard_expressions() + rule_expressions():
        unknown = metric_names(e.expr) - KNOWN_SERIES
        assert not unknown, f"{e.source}: {e.where} uses {sorted(unknown)}, which no service exports"


def test_every_exported_metric_appears_on_a_dashboard():
    used = set().union(*(metric_names(e.expr) for e in dashboard_expressions()))
    missing = {m for m in COUNTERS | GAUGES if m not in used}
    missing |= {h for h in HISTOGRAMS if not ({f"{h}_bucket", f"{h}_sum", f"{h}_count"} & used)}
    assert not missing, f"metrics no dashboard shows: {sorted(missing)}"


# --- provisioning ------------------------------------------------------------------------------------

def _compose_mounts(services: dict, name: str) -> dict[str, str]:
    mounts = {}
    for volume in services[name].get("volumes") or []:
        source, _, rest = volume.partition(":")
        mounts[source] = rest.split(":")[0]
    return mounts


def test_datasource_provisioning_points_at_the_prometheus_service(services):
    document = yaml.safe_load((PROVISIONING / "datasources/prometheus.yml").read_text())
    assert document["apiVersion"] == 1
    (datasource,) = document["datasources"]
    assert datasource["uid"] == "prometheus" and datasource["access"] == "proxy"
    assert datasource["url"] == "http://prometheus:9090" and "prometheus" in services
    scrape = yaml.safe_load((REPO_ROOT / "docker/prometheus/prometheus.yml").read_text())["global"]["scrape_interval"]
    assert datasource["jsonData"]["timeInterval"] == scrape, "Grafana's timeInterval must match the scrape interval"


def test_dashboard_provisioning_path_is_the_mounted_dashboards_dir(services):
    mounts = _compose_mounts(services, "grafana")
    container_provisioning = mounts["./docker/grafana/provisioning"]
    assert container_provisioning == "/etc/grafana/provisioning"
    container_dashboards = mounts["./docker/grafana/dashboards"]
    document = yaml.safe_load((PROVISIONING / "dashboards/tailor.yml").read_text())
    assert document["apiVersion"] == 1
    (provider,) = document["providers"]
    assert provider["type"] == "file"
    assert provider["options"]["path"] == container_dashboards
    home = services["grafana"]["environment"]["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"]
    assert home.startswith(container_dashboards + "/")
    assert (DASHBOARDS_DIR / Path(home).relative_to(container_dashboards)).is_file()
    # the provisioning folders Grafana reads are the ones in the repository
    assert (REPO_ROOT / "docker/grafana/provisioning/datasources").is_dir()
    assert (REPO_ROOT / "docker/grafana/provisioning/dashboards").is_dir()


def test_every_routing_decision_is_explained_on_the_panel_and_in_the_docs():
    """The router's decision label values (``api.replicas.DECISIONS``) are each explained where an
    operator reads them: the engine dashboard's "Routing decisions / s" description and the
    metric's row in docs/observability.md."""
    from api.replicas import DECISIONS

    engine = json.loads((DASHBOARDS_DIR / "engine.json").read_text())
    (panel,) = [p for p in iter_panels(engine["panels"]) if p.get("title") == "Routing decisions / s"]
    (row,) = [line for line in (REPO_ROOT / "docs/observability.md").read_text().splitlines()
              if line.startswith("| `tailor_router_decisions_total`")]
    for decision in DECISIONS:
        assert re.search(rf"\b{decision}\b", panel["description"]), f"panel description: {decision}"
        assert re.search(rf"\b{decision}\b", row), f"docs/observability.md: {decision}"
