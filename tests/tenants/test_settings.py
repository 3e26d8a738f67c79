"""Service settings: environment variables, validation at start, placeholder secrets refused
outside development, and what each service needs."""

from __future__ import annotations

import re
from urllib.parse import quote

import pytest
from deploy.compose_config import ENV_EXAMPLE, read_env_file
from pydantic import SecretStr, ValidationError

from tenants.settings import Settings

REAL = "a-real-secret-0123456789abcdef"


def test_environment_variables_are_read(monkeypatch):
    monkeypatch.setenv("TAILOR_PORT", "9000")
    monkeypatch.setenv("TAILOR_OBJECT_STORE", "s3")
    monkeypatch.setenv("TAILOR_S3_PATH_STYLE", "false")
    settings = Settings()
    assert (settings.port, settings.object_store, settings.s3_path_style) == (9000, "s3", False)
    assert settings.resolved_database_url.startswith("sqlite:///") and settings.resolved_database_url.endswith("tailor.db")


def test_bad_values_are_refused_naming_each(monkeypatch):
    monkeypatch.setenv("TAILOR_PORT", "0")
    monkeypatch.setenv("TAILOR_OBJECT_STORE", "ftp")
    with pytest.raises(ValidationError) as info:
        Settings()
    text = str(info.value)
    assert "port" in text and "object_store" in text


def test_production_refuses_placeholder_secrets():
    with pytest.raises(ValidationError) as info:
        Settings(mode="production", inference_mode="remote", object_store="s3", s3_access_key_id="k",
                 s3_secret_access_key="change-me")
    text = str(info.value)
    for name in ("TAILOR_OPERATOR_TOKEN", "TAILOR_API_KEY_PEPPER", "TAILOR_INFERENCE_SECRET", "TAILOR_S3_SECRET_ACCESS_KEY"):
        assert name in text
    with pytest.raises(ValidationError):
        Settings(mode="production", operator_token="short", api_key_pepper=REAL)
    ok = Settings(mode="production", operator_token=REAL, api_key_pepper=REAL)
    assert ok.operator_token.get_secret_value() == REAL
    assert REAL not in repr(ok)  # secrets never print


def test_development_accepts_the_defaults():
    assert Settings(mode="development").api_key_pepper.get_secret_value()


def test_each_service_names_what_it_lacks():
    embedded = Settings()
    embedded.check_for("embedded")
    with pytest.raises(ValueError, match="TAILOR_INFERENCE_MODE=remote"):
        embedded.check_for("api")
    with pytest.raises(ValueError, match="TAILOR_TASK_MODE=celery"):
        embedded.check_for("worker")
    production = Settings(mode="production", operator_token=REAL, api_key_pepper=REAL, inference_secret=REAL,
                          inference_mode="remote", task_mode="celery")
    with pytest.raises(ValueError, match="TAILOR_OBJECT_STORE=s3"):
        production.check_for("inference")


# --- the published example secrets of .env.example ------------------------------------------------

SECRET_NAME = re.compile(r"SECRET|PASSWORD|TOKEN|PEPPER")


def example_secrets() -> dict[str, str]:
    """The secrets in the repository's .env.example (parsed, so a new one is covered at once)."""
    return {name: value for name, value in read_env_file(ENV_EXAMPLE).items() if SECRET_NAME.search(name)}


def _production(**fields) -> Settings:
    base = {"mode": "production", "operator_token": REAL, "api_key_pepper": REAL + "-pepper",
            "inference_secret": REAL + "-inference", "inference_mode": "remote", "object_store": "s3",
            "s3_access_key_id": "tailor", "s3_secret_access_key": REAL + "-s3",
            "database_url": f"postgresql+psycopg://tailor:{REAL}-db@postgres:5432/tailor"}
    return Settings(_env_file=None, **{**base, **fields})


def test_production_refuses_every_example_secret_of_env_example():
    secrets = example_secrets()
    assert {"TAILOR_OPERATOR_TOKEN", "POSTGRES_PASSWORD", "S3_SECRET_ACCESS_KEY"} <= set(secrets), secrets
    _production()  # real values pass
    for name, value in secrets.items():
        for field, env_name in (("operator_token", "TAILOR_OPERATOR_TOKEN"), ("api_key_pepper", "TAILOR_API_KEY_PEPPER"),
                                ("inference_secret", "TAILOR_INFERENCE_SECRET"),
                                ("s3_secret_access_key", "TAILOR_S3_SECRET_ACCESS_KEY")):
            with pytest.raises(ValidationError, match=env_name):
                _production(**{field: value})
        with pytest.raises(ValidationError, match="TAILOR_DATABASE_URL") as info:
            _production(database_url=f"postgresql+psycopg://tailor:{quote(value, safe='')}@postgres:5432/tailor")
        assert value not in str(info.value), f"{name}: the error message must not print the password"


def test_the_compose_settings_with_env_example_values_are_refused_naming_each():
    env = read_env_file(ENV_EXAMPLE)
    with pytest.raises(ValidationError) as info:
        _production(operator_token=env["TAILOR_OPERATOR_TOKEN"], api_key_pepper=env["TAILOR_API_KEY_PEPPER"],
                     inference_secret=env["TAILOR_INFERENCE_SECRET"], s3_access_key_id=env["S3_ACCESS_KEY_ID"],
                     s3_secret_access_key=env["S3_SECRET_ACCESS_KEY"],
                     database_url=f"postgresql+psycopg://tailor:{env['POSTGRES_PASSWORD']}@postgres:5432/tailor")
    text = str(info.value)
    for name in ("TAILOR_OPERATOR_TOKEN", "TAILOR_API_KEY_PEPPER", "TAILOR_INFERENCE_SECRET",
                 "TAILOR_S3_SECRET_ACCESS_KEY", "TAILOR_DATABASE_URL"):
        assert name in text, name


def test_development_still_accepts_the_example_values():
    env = read_env_file(ENV_EXAMPLE)
    settings = Settings(_env_file=None, operator_token=env["TAILOR_OPERATOR_TOKEN"],
                        database_url=f"postgresql+psycopg://tailor:{env['POSTGRES_PASSWORD']}@postgres:5432/tailor")
    assert settings.mode == "development"


def test_the_inference_service_in_production_refuses_the_development_secret():
    """The inference service authenticates callers with TAILOR_INFERENCE_SECRET whatever its
    TAILOR_INFERENCE_MODE says; in production it must not run with the published default."""
    settings = Settings(_env_file=None, mode="production", operator_token=REAL, api_key_pepper=REAL,
                        object_store="s3", s3_access_key_id="tailor", s3_secret_access_key=REAL + "-s3")
    with pytest.raises(ValueError, match="TAILOR_INFERENCE_SECRET"):
        settings.check_for("inference")
    settings.model_copy(update={"inference_secret": SecretStr(REAL + "-inference")}).check_for("inference")


def test_the_ttft_slo_setting_is_off_by_default_and_validated(monkeypatch):
    assert Settings().ttft_slo_s is None
    monkeypatch.setenv("TAILOR_TTFT_SLO_S", "2.5")
    assert Settings().ttft_slo_s == 2.5
    for bad in ("0", "-1", "nan", "inf", "3601", "soon"):
        monkeypatch.setenv("TAILOR_TTFT_SLO_S", bad)
        with pytest.raises(ValidationError, match="ttft_slo_s"):
            Settings()
