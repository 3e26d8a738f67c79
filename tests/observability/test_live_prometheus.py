"""The dashboards and alert rules against a real Prometheus scraping the real services.

The services shape runs (the api in this process over PostgreSQL, SeaweedFS S3 and a Celery worker
on Redis; ``tailor serve inference`` as a subprocess), a real Prometheus (Debian package
``prometheus``) scrapes the three as jobs ``api``, ``inference`` and ``worker`` every second and
evaluates ``docker/prometheus/rules``. Traffic: a tenant with a first-token SLO that every chat
meets, users, an adapter upload that the worker validates, chats (the first through the adapter
loads it cold in inference; one streamed), OpenAI compatible calls, and requests refused with 401,
422 and 404, and a training job in the worker. Then every PromQL expression of every dashboard panel, dashboard variable and alert
rule (``support.promql``) runs against it: each must be valid, each panel and variable query must
return data, each rule must evaluate; the tenants dashboard shows the tenant's name. After a few
quiet seconds the panels run again over a window without traffic: none may show NaN.
"""

from __future__ import annotations

import math
import os
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from openai import OpenAI
from support import promql
from support.live_server import serve_app
from support.platform_flows import (
    OPERATOR_TOKEN,
    adapter_files,
    bearer,
    chat,
    create_key,
    create_tenant,
    create_user,
    parse_sse,
    upload_adapter,
    wait_for_status,
    write_adapter,
)
from support.prometheus import PrometheusServer, run_prometheus
from support.training_flows import add_examples, start_training, wait_for_job
from support.service_fixtures import free_ports, log_tail, stop_process, wait_until

from api.app import create_app
from inference.model_config import ModelConfig
from tenants import migrate
from tenants.settings import Settings

INFERENCE_SECRET = "prom-inference-secret-0123456789"
REPO_ROOT = Path(__file__).resolve().parents[2]
JOBS = ("api", "inference", "worker")
SCRAPES_AFTER_TRAFFIC_S = 3.0  # rate(...[1m]) needs two samples; the last ones must follow the traffic
QUIET_WINDOW = "6s"  # the rate window of the quiet check: no chat, upload or validation in it
QUIET_AFTER_TRAFFIC_S = 8.0  # the quiet check runs this long after the traffic (the window plus scrapes)
TENANT_NAME = "prom-tenant"


def _start_inference(env: dict[str, str], port: int, log: Path) -> subprocess.Popen:
    with open(log, "wb") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", "api.cli", "serve", "inference", "--port", str(port)],
            env={**os.environ, **env, "PYTHONUNBUFFERED": "1"}, cwd=REPO_ROOT, stdout=out, stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    def ready() -> bool:
        try:
            return httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=1).status_code == 200
        except httpx.HTTPError:
            return False

    try:
        wait_until(ready, 120, process, "the inference service", log)
    except BaseException:
        stop_process(process)
        raise
    return process


def _poll(check, timeout_s: float, what: str, interval_s: float = 0.25):
    deadline = time.monotonic() + timeout_s
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s:.0f} s waiting for {what}")
        time.sleep(interval_s)


def _up(prom: PrometheusServer) -> dict[str, float]:
    return {s["metric"].get("job"): float(s["value"][1]) for s in prom.query('up{job=~"api|inference|worker"}')}


def _scraped_since(prom: PrometheusServer, since: float) -> bool:
    """Every job has been scraped at least once after ``since`` (unix seconds)."""
    stamps = {s["metric"]["job"]: float(s["value"][1]) for s in prom.query('timestamp(up{job=~"api|inference|worker"})')}
    return set(stamps) == set(JOBS) and min(stamps.values()) >= since


def _rules_evaluated_since(prom: PrometheusServer, since: float) -> list[dict] | None:
    rules = [rule for group in prom.rules() for rule in group["rules"]]
    if not rules or any(_rfc3339_seconds(rule.get("lastEvaluation")) < since for rule in rules):
        return None
    return rules


def _rfc3339_seconds(stamp: str | None) -> float:
    """Unix seconds of Prometheus' RFC 3339 timestamps (nanosecond fractions; 0001-01-01 = never)."""
    from datetime import datetime

    if not stamp or stamp.startswith("0001-"):
        return 0.0
    main, _, rest = stamp.partition(".")
    fraction, zone = "", "Z"
    if rest:
        digits = len(rest) - len(rest.lstrip("0123456789"))
        fraction, zone = rest[:digits], rest[digits:]
    elif main.endswith("Z"):
        main = main[:-1]
    else:
        main, zone = main[:-6], main[-6:]
    zone = "+00:00" if zone == "Z" else zone
    return datetime.fromisoformat(main + zone).timestamp() + (float(f"0.{fraction}") if fraction else 0.0)


def _finite_values(series: list[dict]) -> list[float]:
    values = []
    for s in series:
        points = [s["value"]] if "value" in s else s.get("values", [])
        values += [float(v) for _, v in points if not math.isnan(float(v))]
    return values


def drive_traffic(base_url: str, model_config: ModelConfig, workdir: Path) -> None:
    """Admin calls, an adapter upload validated by the worker, chats (cold adapter load, streamed,
    OpenAI-compatible) and refused requests (401, 422, 404)."""
    with httpx.Client(base_url=base_url, timeout=120) as client:
        _tenant, admin = create_tenant(client, OPERATOR_TOKEN, TENANT_NAME)
        # a first-token deadline that every chat meets: the SLO panels and rule have outcomes to show
        r = client.patch("/v1/tenant", json={"ttft_slo_s": 300.0}, headers=bearer(admin))
        assert r.status_code == 200 and r.json()["ttft_slo_s"] == 300.0, r.text
        chat_key = create_key(client, admin, "chat")
        alice, bob = create_user(client, admin, "alice@prom"), create_user(client, admin, "bob@prom")

        adapter_dir = write_adapter(workdir / "alice-adapter", model_config, seed=21)
        r = upload_adapter(client, admin, "alice-style", adapter_files(adapter_dir), user_id=alice["id"])
        assert r.status_code == 202, r.text
        adapter = wait_for_status(client, admin, r.json()["id"], timeout_s=60)
        assert adapter["status"] == "ready", adapter

        first = chat(client, chat_key, alice["id"], "Write one line about the sea")  # cold adapter load
        assert first.status_code == 200 and first.json()["adapter_id"] == adapter["id"], first.text
        assert chat(client, chat_key, bob["id"], "Write one line about the sea").status_code == 200
        assert chat(client, chat_key, alice["id"], "Another one").status_code == 200
        streamed = chat(client, chat_key, alice["id"], "And a last one", stream=True)
        assert streamed.status_code == 200 and parse_sse(streamed.text)[-1][0] == "done", streamed.text
        assert client.get(f"/v1/users/{alice['id']}/messages", headers=bearer(chat_key)).status_code == 200

        # refused: bad key (401), invalid body (422), unknown user (404)
        assert chat(client, "tlr-not-a-key", alice["id"], "hi").status_code == 401
        assert client.post(f"/v1/users/{alice['id']}/chat", json={"max_tokens": "many"},
                           headers=bearer(chat_key)).status_code == 422
        assert chat(client, chat_key, "00000000-0000-0000-0000-000000000000", "hi").status_code == 404

    oai = OpenAI(base_url=f"{base_url}/v1", api_key=chat_key, max_retries=0)
    assert {m.id for m in oai.models.list().data} == {"base", "alice-style"}
    prompt = [{"role": "user", "content": "Name a colour"}]
    reply = oai.chat.completions.create(model="alice-style", messages=prompt, max_tokens=8, temperature=0)
    assert reply.usage.completion_tokens >= 1
    chunks = oai.chat.completions.create(model="base", messages=prompt, max_tokens=8, temperature=0, stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)

    # a training job in the worker (last: its adapter would join the models listed above)
    with httpx.Client(base_url=base_url, timeout=120) as client:
        carol = create_user(client, admin, "carol@prom")["id"]
        add_examples(client, admin, carol, 4)
        r = start_training(client, admin, carol, epochs=1)
        assert r.status_code == 202, r.text
        job = wait_for_job(client, admin, r.json()["id"], timeout_s=120)
        assert job["status"] == "succeeded", job
        # a chat after the job: on a busy machine the job can outlast the dashboards' 1-minute rate
        # windows, which would then hold no chat (first-token SLO and prefix-cache panels empty)
        assert chat(client, chat_key, bob["id"], "Write one line about the sea").status_code == 200


def check_expressions(prom: PrometheusServer) -> None:
    """Every expression valid; every panel and variable query returns data; every rule evaluates."""
    expressions = promql.all_expressions()
    assert expressions, "no PromQL expression found in the dashboards and rules"
    invalid, empty, results = [], [], {}
    for e in expressions:
        try:
            results[e] = prom.query(e.expr)
        except AssertionError as exc:
            invalid.append(f"{e}\n    -> {exc}")
    for e, series in results.items():
        if e.kind in ("panel", "variable") and not _finite_values(series):
            what = "no series" if not series else f"only NaN ({len(series)} series)"
            empty.append(f"{e}\n    -> {what}")
    # a rule (or panel) on a metric that no service exports would silently never fire (show nothing)
    wanted = set().union(*(promql.metric_names(e.expr) for e in expressions))
    selector = "|".join(sorted(wanted))
    exported = {s["metric"]["__name__"] for s in prom.query(f'count by (__name__) ({{__name__=~"{selector}"}})')}
    missing = []
    for name in sorted(wanted - exported):
        users = sorted({f"{e.source}: {e.where}" for e in expressions if name in promql.metric_names(e.expr)})
        missing.append(f"{name}, used by: {'; '.join(users)}")
    problems = []
    if missing:
        problems.append(f"{len(missing)} metric(s) that no scraped service exports:\n  " + "\n  ".join(missing))
    if invalid:
        problems.append(f"{len(invalid)} expression(s) rejected by Prometheus:\n  " + "\n  ".join(invalid))
    if empty:
        problems.append(f"{len(empty)} dashboard quer(ies) returned no data:\n  " + "\n  ".join(empty))
    assert not problems, "\n".join(problems)
    for e, series in results.items():  # not failures (other series of the query have data): for the log
        nan = [s["metric"] for s in series if e.kind == "panel" and "value" in s and math.isnan(float(s["value"][1]))]
        if nan:
            print(f"note: {e.source}: {e.where}: NaN for {nan}")


def check_tenant_names(prom: PrometheusServer) -> None:
    """The api exports the tenant's name, and the tenants dashboard's per-tenant panels (joined on
    ``tailor_tenant_info``) and its variable carry it."""
    (info,) = prom.query(f'tailor_tenant_info{{tenant_name="{TENANT_NAME}"}}')
    tenant_id = info["metric"]["tenant"]
    for e in promql.dashboard_expressions(promql.DASHBOARDS_DIR / "tenants.json"):
        if "tenant_name" not in e.expr:
            continue
        series = prom.query(e.expr)
        names = {s["metric"].get("tenant_name") for s in series}
        assert TENANT_NAME in names, f"{e}: no series named {TENANT_NAME!r} ({names})"
        # other tests' tenants in the shared database are listed too; ours carries its own name
        assert {s["metric"].get("tenant_name") for s in series if s["metric"].get("tenant") == tenant_id} == {TENANT_NAME}, e


def check_quiet_window(prom: PrometheusServer) -> None:
    """In a window without chats, uploads or validations, no panel shows NaN: quantiles of empty
    histograms and ratios of zero rates give no point (or 0 where 0 is the truth) instead."""
    nan = []
    for e in promql.dashboard_expressions(variables={"__rate_interval": QUIET_WINDOW}):
        if e.kind != "panel":
            continue
        for series in prom.query(e.expr):
            if math.isnan(float(series["value"][1])):
                nan.append(f"{e.source}: {e.where}: {e.expr}\n    -> NaN for {series['metric']}")
    assert not nan, f"{len(nan)} panel series show NaN in a quiet window:\n  " + "\n  ".join(nan)


@pytest.mark.timeout(300)
def test_dashboards_and_alerts_against_live_prometheus(tmp_path, tiny_checkpoint, postgres_url, seaweedfs,
                                                       s3_bucket, redis_url, start_worker):
    started = time.monotonic()
    (inference_port,) = free_ports(1)
    env = {
        "TAILOR_MODE": "development",
        "TAILOR_DATABASE_URL": postgres_url,
        "TAILOR_OBJECT_STORE": "s3",
        "TAILOR_S3_ENDPOINT_URL": seaweedfs.endpoint_url,
        "TAILOR_S3_BUCKET": s3_bucket,
        "TAILOR_S3_REGION": seaweedfs.region,
        "TAILOR_S3_ACCESS_KEY_ID": seaweedfs.access_key_id,
        "TAILOR_S3_SECRET_ACCESS_KEY": seaweedfs.secret_access_key,
        "TAILOR_TASK_MODE": "celery",
        "TAILOR_REDIS_URL": redis_url,
        "TAILOR_INFERENCE_MODE": "remote",
        "TAILOR_INFERENCE_URL": f"http://127.0.0.1:{inference_port}",
        "TAILOR_INFERENCE_SECRET": INFERENCE_SECRET,
        "TAILOR_MODEL": str(tiny_checkpoint),
        "TAILOR_POOL_BYTES": str(32 << 20),
        "TAILOR_OPERATOR_TOKEN": OPERATOR_TOKEN,
        "TAILOR_DEFAULT_MAX_TOKENS": "8",
        "TAILOR_MAX_TOKENS_LIMIT": "64",
        "TAILOR_DATA_DIR": str(tmp_path / "var"),
    }
    migrate.upgrade(postgres_url)
    log = tmp_path / "inference.log"
    inference = _start_inference(env, inference_port, log)
    try:
        settings = Settings(**{k[len("TAILOR_"):].lower(): v for k, v in env.items()})
        settings.check_for("api")
        with start_worker(env) as worker, serve_app(create_app(settings)) as base_url:
            targets = {"api": f"{base_url}/metrics",
                       "inference": f"http://127.0.0.1:{inference_port}/metrics",
                       "worker": worker.metrics_url}
            rule_files = sorted(promql.RULES_DIR.glob("*.y*ml"))
            with run_prometheus(targets, rule_files, tmp_path / "prometheus") as prom:
                # a first scrape of every job before the traffic, so that rate() sees the increments
                _poll(lambda: _up(prom) == {job: 1.0 for job in JOBS}, 30,
                      f"every job up (targets: {[(t['labels'], t['health'], t['lastError']) for t in prom.targets()]})")
                traffic_started = time.monotonic()
                drive_traffic(base_url, ModelConfig.from_checkpoint(tiny_checkpoint), tmp_path)
                traffic_s = time.monotonic() - traffic_started
                after = time.time()
                _poll(lambda: _scraped_since(prom, after + SCRAPES_AFTER_TRAFFIC_S), 30, "scrapes after the traffic")
                rules = _poll(lambda: _rules_evaluated_since(prom, after), 30, "a rule evaluation after the traffic")

                assert _up(prom) == {job: 1.0 for job in JOBS}
                assert _finite_values(prom.query("sum(rate(tailor_http_requests_total[1m]))"))[0] > 0
                unhealthy = [f"{r['name']}: {r['health']}: {r.get('lastError')}" for r in rules if r["health"] != "ok"]
                assert not unhealthy, "rules that fail to evaluate:\n  " + "\n  ".join(unhealthy)
                check_expressions(prom)
                check_tenant_names(prom)
                time.sleep(max(0.0, after + QUIET_AFTER_TRAFFIC_S - time.time()))
                quiet = prom.query(f"sum(increase(tailor_inference_requests_finished_total[{QUIET_WINDOW}]))")
                assert _finite_values(quiet) == [0.0], f"the quiet window saw requests: {quiet}"
                check_quiet_window(prom)
                print(f"traffic {traffic_s:.1f} s, total {time.monotonic() - started:.1f} s, "
                      f"{len(promql.all_expressions())} expressions checked")
    except BaseException:
        print(f"--- inference log ---\n{log_tail(log)}")
        raise
    finally:
        stop_process(inference)
