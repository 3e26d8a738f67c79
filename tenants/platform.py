"""``Platform``: the shared parts every service builds from its settings (database sessions, the
object store, the base model's configuration) plus the hooks that tell inference about adapters.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cached_property

from sqlalchemy.orm import Session, sessionmaker

from inference.adapters.storage_keys import CONFIG_FILE, WEIGHTS_FILE, adapter_file_keys
from inference.adapters.storage_keys import tenant_adapter_prefix as adapter_prefix
from inference.model_config import ModelConfig
from inference.service.protocol import AdapterSpec
from tenants.db import make_engine, make_session_factory
from tenants.models import Adapter
from tenants.settings import Settings

log = logging.getLogger(__name__)

__all__ = ["CONFIG_FILE", "WEIGHTS_FILE", "Platform", "adapter_prefix", "adapter_spec", "remote_prefetch_hook"]


def adapter_spec(adapter: Adapter) -> AdapterSpec:
    """What inference needs to load a ready adapter from the shared store."""
    if adapter.storage_key is None or adapter.sha256 is None:
        raise ValueError(f"adapter {adapter.id} has no stored files")
    keys = adapter_file_keys(adapter.storage_key)
    return AdapterSpec(id=adapter.id, config_key=keys.config, weights_key=keys.weights, sha256=adapter.sha256)


PREFETCH_TIMEOUT_S = 10.0


def remote_prefetch_hook(settings: Settings) -> Callable[[AdapterSpec], None]:
    """A ready hook that asks the inference service to prefetch the adapter (worker processes).
    With several replicas (``TAILOR_INFERENCE_URLS``) it asks the adapter's home replica (the
    api's router uses the same rendezvous order), and the next one in that order if the home
    does not answer."""
    import httpx

    from inference.service.client import rendezvous_order
    from inference.service.protocol import SECRET_HEADER

    replicas = settings.inference_replicas
    headers = {SECRET_HEADER: settings.inference_secret.get_secret_value()}

    def prefetch(spec: AdapterSpec) -> None:
        for base_url in rendezvous_order(spec.id, replicas):
            try:
                response = httpx.post(base_url + "/internal/adapters/prefetch", json={"adapter": spec.model_dump()},
                                      headers=headers, timeout=PREFETCH_TIMEOUT_S)
            except httpx.HTTPError as exc:  # a cold adapter costs its first request time, nothing more
                log.info("prefetch of adapter %s on %s failed: %s", spec.id, base_url, exc)
                continue
            if response.status_code < 500:
                return
            log.info("prefetch of adapter %s on %s answered %s", spec.id, base_url, response.status_code)

    return prefetch


@dataclass
class Platform:
    """Settings, a session factory, the object store, and callbacks run when an adapter turns
    ready (``ready_hooks``: each gets the adapter's ``AdapterSpec``; failures are logged)."""

    settings: Settings
    session_factory: sessionmaker[Session]
    store: object  # tenants.storage.BlobStore
    ready_hooks: list[Callable[[AdapterSpec], None]] = field(default_factory=list)

    @classmethod
    def from_settings(cls, settings: Settings, store: object | None = None) -> Platform:
        from tenants.storage import make_object_store

        if settings.database_url is None:
            settings.data_dir.mkdir(parents=True, exist_ok=True)
        engine = make_engine(settings.resolved_database_url, **settings.database_engine_options())
        return cls(settings, make_session_factory(engine), store if store is not None else make_object_store(settings))

    @cached_property
    def model_config(self) -> ModelConfig:
        """The base model's configuration (config.json only; no weights are loaded)."""
        from inference.engine import resolve_model

        return ModelConfig.from_checkpoint(resolve_model(self.settings.model))

    def adapter_ready(self, spec: AdapterSpec) -> None:
        for hook in list(self.ready_hooks):
            try:
                hook(spec)
            except Exception:
                log.exception("adapter-ready hook failed for %s", spec.id)

    def close(self) -> None:
        bind = self.session_factory.kw.get("bind")
        if bind is not None:
            bind.dispose()
