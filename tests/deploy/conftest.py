"""Fixtures of the deployment tests: docker-compose.yml as compose would see it."""

from __future__ import annotations

import secrets

import pytest
from deploy.compose_config import COMPOSE_FILE, ENV_EXAMPLE, load_compose, read_env_file


@pytest.fixture(scope="session")
def example_env() -> dict[str, str]:
    return read_env_file(ENV_EXAMPLE)


EXAMPLE_SECRETS = ("TAILOR_OPERATOR_TOKEN", "TAILOR_API_KEY_PEPPER", "TAILOR_INFERENCE_SECRET", "POSTGRES_PASSWORD",
                   "S3_SECRET_ACCESS_KEY", "GRAFANA_ADMIN_PASSWORD")


@pytest.fixture(scope="session")
def deployed_env(example_env) -> dict[str, str]:
    """.env as the docs ask for it: .env.example with every secret replaced by a random one (the
    services refuse the published example secrets in production mode)."""
    return {**example_env, **{name: secrets.token_hex(24) for name in EXAMPLE_SECRETS}}


@pytest.fixture(scope="session")
def compose(deployed_env) -> dict:
    """docker-compose.yml as `docker compose config` would see it after `cp .env.example .env` and
    replacing the secrets."""
    return load_compose(COMPOSE_FILE, deployed_env)


@pytest.fixture(scope="session")
def services(compose) -> dict[str, dict]:
    return compose["services"]
