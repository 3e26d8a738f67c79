"""Service settings: environment variables, validation at start, placeholder secrets refused
outside development, and what each service needs."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

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
