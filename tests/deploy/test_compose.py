"""docker-compose.yml (and the GPU override) checked without Docker: the settings each Tailor
service gets pass its own checks in production mode, secrets come only from the environment,
files that are built or mounted exist, ports do not clash, the start order is sound."""

from __future__ import annotations

import os
import re
from pathlib import Path
from urllib.parse import urlsplit

import pytest
import yaml
from deploy.compose_config import (
    COMPOSE_FILE,
    ENV_EXAMPLE,
    GPU_COMPOSE_FILE,
    REPO_ROOT,
    MissingVariable,
    environment_of,
    load_compose,
    variable_references,
)

from tenants.settings import Settings, _is_placeholder

TAILOR_SERVICES = ("api", "worker", "inference", "inference-2")
INFERENCE_REPLICAS = ("inference", "inference-2")  # every replica runs the inference service
SECRET_FIELDS = ("operator_token", "api_key_pepper", "inference_secret", "s3_secret_access_key")
# TAILOR_* variables that are not Settings fields but are read elsewhere
NON_SETTINGS_TAILOR_VARIABLES = {"TAILOR_MODEL_CACHE"}
# Compose variables that must never have a default: a missing one must stop `docker compose`
REQUIRED_SECRETS = {"TAILOR_OPERATOR_TOKEN", "TAILOR_API_KEY_PEPPER", "TAILOR_INFERENCE_SECRET",
                    "POSTGRES_PASSWORD", "S3_ACCESS_KEY_ID", "S3_SECRET_ACCESS_KEY", "GRAFANA_ADMIN_PASSWORD"}
HEALTHCHECKED = ("postgres", "redis", "s3", "api", "inference", "inference-2")
CONDITIONS = {"service_started", "service_healthy", "service_completed_successfully"}


def settings_for(env: dict[str, str], monkeypatch) -> Settings:
    """Settings built only from ``env`` (no process environment, no .env file)."""
    for key in list(os.environ):
        if key.startswith("TAILOR_"):
            monkeypatch.delenv(key)
    fields = {key[len("TAILOR_"):].lower(): value for key, value in env.items()
              if key.startswith("TAILOR_") and key not in NON_SETTINGS_TAILOR_VARIABLES}
    return Settings(_env_file=None, **fields)


def command_text(service: dict) -> str:
    command = service.get("command") or ""
    return command if isinstance(command, str) else " ".join(command)


def bind_mounts(service: dict) -> list[tuple[str, str]]:
    """(host source, container target) of each bind mount (short or long syntax)."""
    mounts = []
    for volume in service.get("volumes") or []:
        if isinstance(volume, dict):
            if volume.get("type") == "bind":
                mounts.append((volume["source"], volume["target"]))
            continue
        source, _, rest = volume.partition(":")
        if source.startswith((".", "/", "~")):
            mounts.append((source, rest.split(":")[0]))
    return mounts


def published_ports(service: dict) -> list[tuple[int, str]]:
    """(host port, protocol) of each published port (short or long syntax)."""
    published = []
    for port in service.get("ports") or []:
        if isinstance(port, dict):
            if port.get("published") is not None:
                published.append((int(port["published"]), port.get("protocol", "tcp")))
            continue
        spec, _, proto = str(port).partition("/")
        parts = spec.split(":")
        assert len(parts) >= 2, f"port {port!r} publishes a random host port; give it a fixed one"
        published.append((int(parts[-2]), proto or "tcp"))
    return published


# --- variables and secrets ----------------------------------------------------------------------------

def test_env_example_supplies_every_variable_without_a_default(example_env):
    text = COMPOSE_FILE.read_text() + GPU_COMPOSE_FILE.read_text()
    needed = {name for name, op in variable_references(text) if op not in (":-", "-")}
    missing = needed - set(example_env)
    assert not missing, f".env.example lacks {sorted(missing)}: `cp .env.example .env; docker compose up` would fail"
    used = {name for name, _ in variable_references(text)}
    unused = set(example_env) - used - {"COMPOSE_FILE"}
    assert not unused, f".env.example sets variables docker-compose.yml never uses: {sorted(unused)}"


def test_secrets_have_no_defaults_and_stop_compose_when_missing(example_env):
    references = variable_references(COMPOSE_FILE.read_text())
    for name in REQUIRED_SECRETS:
        ops = {op for ref, op in references if ref == name}
        assert ops == {":?"}, f"{name} must be used only as ${{{name}:?message}}, found operators {ops}"
        env = dict(example_env)
        del env[name]
        with pytest.raises(MissingVariable, match=name):
            load_compose(COMPOSE_FILE, env)


def test_env_example_secrets_are_refused_in_production(example_env, monkeypatch):
    from pydantic import SecretStr

    for name in ("TAILOR_OPERATOR_TOKEN", "TAILOR_API_KEY_PEPPER", "TAILOR_INFERENCE_SECRET", "S3_SECRET_ACCESS_KEY",
                 "POSTGRES_PASSWORD"):
        assert _is_placeholder(SecretStr(example_env[name])), f"{name} in .env.example is published, never secret"
    example_api = environment_of(load_compose(COMPOSE_FILE, example_env)["services"]["api"])
    with pytest.raises(ValueError, match="TAILOR_OPERATOR_TOKEN"):  # `cp .env.example .env` alone does not start
        settings_for(example_api, monkeypatch)
    values = [example_env[name] for name in REQUIRED_SECRETS if name != "S3_ACCESS_KEY_ID"]
    assert len(set(values)) == len(values), ".env.example reuses one secret for two purposes"
    assert re.fullmatch(r"[A-Za-z0-9._~-]+", example_env["POSTGRES_PASSWORD"]), \
        "POSTGRES_PASSWORD goes into a URL: keep it to unreserved characters"


def test_no_secret_is_written_into_the_compose_file(services):
    raw = yaml.safe_load(COMPOSE_FILE.read_text())["services"]
    for name in TAILOR_SERVICES:
        env = environment_of(raw[name])
        for field in SECRET_FIELDS:
            key = f"TAILOR_{field.upper()}"
            if key in env:
                assert env[key].startswith("${") and ":?" in env[key], f"{name}: {key} must come from a variable"


# --- the settings of each Tailor service --------------------------------------------------------------

@pytest.mark.parametrize("name", TAILOR_SERVICES)
def test_service_settings_pass_check_for_in_production(name, services, monkeypatch):
    env = environment_of(services[name])
    unknown = {key for key in env if key.startswith("TAILOR_")} - NON_SETTINGS_TAILOR_VARIABLES - {
        f"TAILOR_{field.upper()}" for field in Settings.model_fields}
    assert not unknown, f"{name}: {sorted(unknown)} are not Settings fields (typo?)"
    settings = settings_for(env, monkeypatch)  # production placeholder checks run here
    settings.check_for("inference" if name in INFERENCE_REPLICAS else name)
    assert settings.mode == "production"
    assert settings.object_store == "s3"
    for field in SECRET_FIELDS:
        assert not _is_placeholder(getattr(settings, field)), f"{name}: {field} is a placeholder"


@pytest.mark.parametrize("name", TAILOR_SERVICES)
def test_service_addresses_point_at_compose_services(name, services, monkeypatch):
    settings = settings_for(environment_of(services[name]), monkeypatch)
    s3 = urlsplit(settings.s3_endpoint_url)
    assert (s3.hostname, s3.port) == ("s3", 8333)
    s3_env = environment_of(services["s3"])
    assert settings.s3_access_key_id == s3_env["AWS_ACCESS_KEY_ID"]
    assert settings.s3_secret_access_key.get_secret_value() == s3_env["AWS_SECRET_ACCESS_KEY"]
    inference_port = int(environment_of(services["inference"])["TAILOR_PORT"])
    if name in ("api", "worker"):
        assert settings.task_mode == "celery"
        assert urlsplit(settings.redis_url).hostname == "redis"
        inference = urlsplit(settings.inference_url)
        assert (inference.hostname, inference.port) == ("inference", inference_port)
        assert settings.inference_replicas == tuple(f"http://{r}:{inference_port}" for r in INFERENCE_REPLICAS)
        database = urlsplit(settings.resolved_database_url)
        pg = environment_of(services["postgres"])
        assert database.hostname == "postgres"
        assert database.username == pg["POSTGRES_USER"] and database.password == pg["POSTGRES_PASSWORD"]
        assert database.path.lstrip("/") == pg["POSTGRES_DB"]
    inference_secret = environment_of(services["inference"])["TAILOR_INFERENCE_SECRET"]
    assert settings.inference_secret.get_secret_value() == inference_secret, "one shared inference secret"


def test_services_listen_on_all_interfaces_at_the_scraped_ports(services, monkeypatch):
    api = settings_for(environment_of(services["api"]), monkeypatch)
    inference = settings_for(environment_of(services["inference"]), monkeypatch)
    worker = settings_for(environment_of(services["worker"]), monkeypatch)
    assert (api.host, api.port) == ("0.0.0.0", 8000)
    assert (inference.host, inference.port) == ("0.0.0.0", 8001)
    assert (worker.worker_metrics_host, worker.worker_metrics_port) == ("0.0.0.0", 9101)
    prometheus = yaml.safe_load((REPO_ROOT / "docker/prometheus/prometheus.yml").read_text())
    targets = {job["job_name"]: [t for sc in job["static_configs"] for t in sc["targets"]]
               for job in prometheus["scrape_configs"]}
    assert targets["api"] == [f"api:{api.port}"]
    assert targets["inference"] == [f"{replica}:{inference.port}" for replica in INFERENCE_REPLICAS]
    for replica in INFERENCE_REPLICAS:
        replica_settings = settings_for(environment_of(services[replica]), monkeypatch)
        assert (replica_settings.host, replica_settings.port) == ("0.0.0.0", inference.port)
    assert targets["worker"] == [f"worker:{worker.worker_metrics_port}"]


def test_commands_are_real_cli_commands_and_the_api_migrates_at_start(services, monkeypatch):
    from api.cli import build_parser

    parser = build_parser()
    expected = {"api": ["serve", "api"], "inference": ["serve", "inference"], "inference-2": ["serve", "inference"],
                "worker": ["worker"]}
    for name, argv in expected.items():
        text = command_text(services[name])
        assert "tailor " + " ".join(argv) in text, f"{name} runs {text!r}"
        parser.parse_args(argv)
    parser.parse_args(["db", "upgrade"])
    assert services["api"]["command"] == ["tailor", "serve", "api"], \
        "api: the server itself as the command (exec form), so that it gets SIGTERM and drains"
    assert settings_for(environment_of(services["api"]), monkeypatch).migrate_on_start, \
        "api: `tailor serve api` migrates the schema at start (the worker waits for a healthy api)"


# --- images and builds ---------------------------------------------------------------------------------

def test_every_service_has_an_image_or_a_build(services):
    for name, service in services.items():
        assert service.get("image") or service.get("build"), f"{name} has neither image nor build"
        image = service.get("image", "")
        if image and not service.get("build"):
            assert ":" in image.rsplit("/", 1)[-1] and not image.endswith(":latest"), \
                f"{name}: pin the image tag ({image})"


def test_build_contexts_and_dockerfiles_exist(services):
    builds = {}
    for name, service in services.items():
        build = service.get("build")
        if build is None:
            continue
        if isinstance(build, str):
            build = {"context": build}
        context = (REPO_ROOT / build.get("context", ".")).resolve()
        assert context.is_dir(), f"{name}: build context {context} is missing"
        dockerfile = context / build.get("dockerfile", "Dockerfile")
        assert dockerfile.is_file(), f"{name}: {dockerfile} is missing"
        builds[name] = (context, dockerfile, image := service.get("image"))
        assert image, f"{name}: name the built image so that the three services share it"
    assert {builds[n] for n in TAILOR_SERVICES} == {builds["api"]}, "api, worker and inference run one image"


def test_dockerfile_installs_pinned_torch_first_and_prepares_the_model():
    dockerfile = (REPO_ROOT / "docker/Dockerfile").read_text()
    torch_at = dockerfile.find("torch==2.13.0")
    project_at = dockerfile.find("pip install -e .")
    assert 0 <= torch_at < project_at, "torch==2.13.0 must be installed before the project"
    assert dockerfile.find("tailor models prepare") > project_at
    for line in re.findall(r"^COPY\s+(?!--from)(.+)$", dockerfile, re.M):
        *sources, _destination = line.split()
        for source in sources:
            assert (REPO_ROOT / source).exists(), f"Dockerfile copies {source}, which does not exist"
    for needed in ("migrations", "alembic.ini", "pyproject.toml", "api", "inference", "kernels", "tenants"):
        assert re.search(rf"^COPY\s+.*\b{re.escape(needed)}\b", dockerfile, re.M), f"the image needs {needed}"


# --- ports, mounts, volumes ----------------------------------------------------------------------------

def test_published_host_ports_do_not_clash(services):
    seen: dict[tuple[int, str], str] = {}
    for name, service in services.items():
        for port in published_ports(service):
            assert port not in seen, f"host port {port} published by {seen[port]} and {name}"
            seen[port] = name
    assert (8000, "tcp") in seen and (3000, "tcp") in seen and (9090, "tcp") in seen


def test_mounted_host_paths_exist(services):
    mounts = {name: bind_mounts(service) for name, service in services.items()}
    for name, pairs in mounts.items():
        for source, _target in pairs:
            assert (REPO_ROOT / source).exists(), f"{name} mounts {source}, which does not exist"
    prometheus = dict(mounts["prometheus"])
    assert prometheus["./docker/prometheus"] == "/etc/prometheus"
    assert "--config.file=/etc/prometheus/prometheus.yml" in services["prometheus"]["command"]
    grafana = dict(mounts["grafana"])
    assert grafana["./docker/grafana/provisioning"] == "/etc/grafana/provisioning"
    assert "./docker/grafana/dashboards" in grafana


def test_named_volumes_are_declared(compose):
    declared = set(compose.get("volumes") or {})
    for name, service in compose["services"].items():
        for volume in service.get("volumes") or []:
            source = volume.get("source") if isinstance(volume, dict) else volume.split(":")[0]
            if source and not source.startswith((".", "/", "~")):
                assert source in declared, f"{name} uses volume {source}, not declared at the top level"


# --- start order and health ----------------------------------------------------------------------------

def test_healthchecks_exist(services):
    for name in HEALTHCHECKED:
        test = (services[name].get("healthcheck") or {}).get("test")
        assert test and test not in (["NONE"], "NONE"), f"{name} needs a healthcheck"
    assert "pg_isready" in str(services["postgres"]["healthcheck"]["test"])
    assert "redis-cli ping" in str(services["redis"]["healthcheck"]["test"])
    assert "8333" in str(services["s3"]["healthcheck"]["test"])
    assert "127.0.0.1:8000/healthz" in str(services["api"]["healthcheck"]["test"])
    assert "127.0.0.1:8001/healthz" in str(services["inference"]["healthcheck"]["test"])


def test_depends_on_names_services_with_conditions(services):
    for name, service in services.items():
        depends = service.get("depends_on") or {}
        assert isinstance(depends, dict), f"{name}: use the long depends_on syntax with conditions"
        for target, spec in depends.items():
            assert target in services, f"{name} depends on unknown service {target}"
            condition = (spec or {}).get("condition")
            assert condition in CONDITIONS, f"{name} -> {target}: condition {condition!r}"
            if condition == "service_healthy":
                assert services[target].get("healthcheck"), \
                    f"{name} waits for {target} to be healthy; it has no healthcheck"
    api = services["api"]["depends_on"]
    for target in ("postgres", "redis", "s3"):
        assert api[target]["condition"] == "service_healthy"
    assert api["inference"]["condition"] in ("service_started", "service_healthy")


def test_depends_on_has_no_cycle(services):
    state: dict[str, str] = {}

    def visit(name: str, path: list[str]) -> None:
        if state.get(name) == "done":
            return
        assert state.get(name) != "visiting", f"depends_on cycle: {' -> '.join(path + [name])}"
        state[name] = "visiting"
        for target in services[name].get("depends_on") or {}:
            visit(target, path + [name])
        state[name] = "done"

    for name in services:
        visit(name, [])


# --- the GPU override ----------------------------------------------------------------------------------

def test_gpu_override_reserves_a_gpu_for_inference(example_env, services, monkeypatch):
    override = load_compose(GPU_COMPOSE_FILE, example_env)["services"]
    assert set(override) <= set(services), "the override only changes services of docker-compose.yml"
    gpus = []
    for replica in INFERENCE_REPLICAS:
        (device,) = override[replica]["deploy"]["resources"]["reservations"]["devices"]
        assert "gpu" in device.get("capabilities", []) and override[replica]["build"]["args"]["TORCH_VARIANT"] == "cuda"
        gpus.append(tuple(device["device_ids"]))
    assert len(set(gpus)) == len(gpus), f"each inference replica needs a GPU of its own: {gpus}"
    inference = override["inference"]
    assert inference["build"]["args"]["TORCH_VARIANT"] == "cuda"
    assert re.search(r"^ARG TORCH_VARIANT=cpu$", (REPO_ROOT / "docker/Dockerfile").read_text(), re.M)
    assert inference["image"].split(":")[0] != services["inference"]["image"].split(":")[0], \
        "the CUDA image needs its own name, or it would replace the CPU image of api and worker"
    merged = {**environment_of(services["inference"]), **environment_of(inference)}
    settings = settings_for(merged, monkeypatch)
    settings.check_for("inference")
    assert settings.device == "cuda"


def test_compose_files_are_plain_yaml_with_services():
    for path in (COMPOSE_FILE, GPU_COMPOSE_FILE):
        document = yaml.safe_load(path.read_text())
        assert isinstance(document.get("services"), dict), f"{path.name} has no services"
        assert "version" not in document, f"{path.name}: the top-level version key is obsolete"
    assert ENV_EXAMPLE.is_file()
    assert Path(REPO_ROOT / "docs/deployment.md").is_file()
