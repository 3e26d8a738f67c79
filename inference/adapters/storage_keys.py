"""Object-store keys of adapter files, made in one place and only by the server.

An adapter version lives under a prefix; its two files are ``{prefix}/adapter_config.json`` and
``{prefix}/adapter_model.safetensors``. The platform's prefix is
``tenants/{tenant_id}/adapters/{adapter_id}`` (``tenant_adapter_prefix``); the engine's own
registrations use ``{root}/{safe adapter id}/{sha256[:32]}``. Both the engine (``inference/``)
and the platform (``tenants/``, ``api/``) build keys with these functions; this module imports
nothing, so either side may use it.
"""

from __future__ import annotations

from typing import NamedTuple

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
TENANTS_ROOT = "tenants"


class AdapterFileKeys(NamedTuple):
    config: str
    weights: str


def adapter_file_keys(prefix: str) -> AdapterFileKeys:
    """The keys of an adapter version's two files under ``prefix``."""
    return AdapterFileKeys(f"{prefix}/{CONFIG_FILE}", f"{prefix}/{WEIGHTS_FILE}")


def tenant_adapter_prefix(tenant_id: str, adapter_id: str) -> str:
    """The platform's prefix of one adapter version: ``tenants/{tenant_id}/adapters/{adapter_id}``
    (both ids are server-made)."""
    return f"{TENANTS_ROOT}/{tenant_id}/adapters/{adapter_id}"


def tenant_adapter_of(key: str) -> tuple[str, str] | None:
    """``(prefix, adapter_id)`` of a key under some ``tenant_adapter_prefix`` (a file, or anything
    deeper), else None: the inverse the clean-up job uses to find objects that no row owns."""
    parts = key.split("/")
    if len(parts) < 5 or parts[0] != TENANTS_ROOT or parts[2] != "adapters" or not parts[1] or not parts[3]:
        return None
    return "/".join(parts[:4]), parts[3]


def engine_adapter_prefix(root: str, safe_adapter_id: str, sha256: str) -> str:
    """The engine's prefix of an adapter it stores itself: ``{root}/{safe id}/{sha256[:32]}``."""
    return f"{root}/{safe_adapter_id}/{sha256[:32]}"
