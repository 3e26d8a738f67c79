"""The api in its embedded default (SQLite, local folder, in-process tasks and engine) on the tiny
test model, served through FastAPI's TestClient (lifespan included)."""

from __future__ import annotations

from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from api.app import create_app
from inference.model_config import ModelConfig
from tenants import migrate
from support.platform_flows import OPERATOR_TOKEN
from tenants.settings import Settings


def embedded_settings(data_dir: Path, model: Path, **overrides) -> Settings:
    values = dict(
        data_dir=data_dir,
        model=str(model),
        operator_token=OPERATOR_TOKEN,
        pool_bytes=32 << 20,
        max_upload_bytes=4 << 20,
        history_token_budget=256,
        default_max_tokens=8,
        max_tokens_limit=64,
        rate_limit_per_minute=0,  # the fuzzing test sends hundreds of requests; test_rate_limit covers it
    )
    values.update(overrides)
    return Settings(**values)


@pytest.fixture(scope="module")
def api_settings(tmp_path_factory, tiny_checkpoint) -> Settings:
    settings = embedded_settings(tmp_path_factory.mktemp("api-data"), tiny_checkpoint)
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    migrate.upgrade(settings.resolved_database_url)
    return settings


@pytest.fixture(scope="module")
def client(api_settings):
    with TestClient(create_app(api_settings)) as test_client:
        yield test_client


@pytest.fixture(scope="module")
def tiny_model_config(tiny_checkpoint) -> ModelConfig:
    return ModelConfig.from_checkpoint(tiny_checkpoint)
