"""Fixtures of the deployment tests: docker-compose.yml as compose would see it."""

from __future__ import annotations

import pytest
from deploy.compose_config import COMPOSE_FILE, ENV_EXAMPLE, load_compose, read_env_file


@pytest.fixture(scope="session")
def example_env() -> dict[str, str]:
    return read_env_file(ENV_EXAMPLE)


@pytest.fixture(scope="session")
def compose(example_env) -> dict:
    """docker-compose.yml as `docker compose config` would see it after `cp .env.example .env`."""
    return load_compose(COMPOSE_FILE, example_env)


@pytest.fixture(scope="session")
def services(compose) -> dict[str, dict]:
    return compose["services"]
