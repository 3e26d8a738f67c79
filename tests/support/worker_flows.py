"""Helpers of the worker tests: pending adapters in the database and the store, and samples of a
/metrics page."""

from __future__ import annotations

import hashlib
import uuid
from pathlib import Path

from tenants import repositories
from tenants.db import session_scope
from tenants.platform import CONFIG_FILE, WEIGHTS_FILE, adapter_prefix


def valid_adapter_dir(checkpoint: Path, root: Path, seed: int = 1) -> Path:
    """A valid rank-4 PEFT adapter (q_proj, v_proj) for the model at ``checkpoint``."""
    from benchmarks.synthetic_adapters import synthetic_adapter
    from inference.model_config import ModelConfig

    model = ModelConfig.from_checkpoint(checkpoint)
    return synthetic_adapter(root / f"adapter-{seed}", model, r=4, targets=("q_proj", "v_proj"), alpha=8, seed=seed)


def pending_adapter(session_factory, store, folder: Path) -> tuple[str, str]:
    """A new tenant with a pending adapter whose two files are in the store: (adapter id, prefix)."""
    weights = folder / WEIGHTS_FILE
    with session_scope(session_factory) as session:
        tenant = repositories.create_tenant(session, f"tenant-{uuid.uuid4().hex[:8]}")
        adapter = repositories.create_adapter(
            session, tenant.id, "personal", 1, size_bytes=weights.stat().st_size,
            sha256=hashlib.sha256(weights.read_bytes()).hexdigest(),
        )
        adapter.storage_key = adapter_prefix(tenant.id, adapter.id)
        adapter_id, prefix = adapter.id, adapter.storage_key
    store.put_file(f"{prefix}/{CONFIG_FILE}", folder / CONFIG_FILE)
    store.put_file(f"{prefix}/{WEIGHTS_FILE}", weights)
    return adapter_id, prefix


def metric(text: str, name: str, **labels: str) -> float:
    """The value of one sample on a /metrics page (0 if absent)."""
    from prometheus_client.parser import text_string_to_metric_families

    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                return sample.value
    return 0.0
