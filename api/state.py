"""What the api process holds while it runs (built by the app's lifespan)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from api.admission import TenantConcurrencyLimit
from api.rate_limit import RateLimiter
from inference.service.backend import InferenceBackend
from tenants.platform import Platform
from tenants.settings import Settings

if TYPE_CHECKING:
    from tenants.task_queue import TaskQueue


@dataclass
class AppState:
    """``inference``: an ``InferenceCore`` (embedded) or an ``api.replicas.ReplicaRouter`` over
    the inference services (remote); both are an ``InferenceBackend``."""

    settings: Settings
    platform: Platform
    inference: InferenceBackend
    tasks: "TaskQueue"
    operator_token: str
    rate_limiter: RateLimiter
    generation_slots: TenantConcurrencyLimit
