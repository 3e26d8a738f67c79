"""The adapter manager: the one owner of an adapter version's life cycle.

A version is registered (validated completely, once; stored under server-made keys; packed into
host RAM; published as an immutable :class:`AdapterRef`), looked up when a request is made,
acquired when the request is admitted to the engine and released when it finishes; it is
superseded by a new version or unregistered, and its copies leave every tier when its last request
has finished. All of these steps are methods of :class:`AdapterManager`; the tiers below it each
do one job and know nothing of versions:

* ``registry``: current versions per id and per-version request counts (``registry.py``);
* the host tier: packing into host RAM and fetching evicted adapters back from the object store
  on background threads, checking their sha256 instead of validating again (``host_tier.py``);
* the device tier: residency in pool pages, page-in and eviction (``residency.py``).

The engine thread never waits for I/O: a request whose adapter is not in host RAM stays queued
(``COLD``) while requests behind it run. Everything that touches device pages runs on the engine
thread.
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from inference.adapters.host_cache import HostAdapterCache, TierStats
from inference.adapters.host_tier import (  # noqa: F401  (FETCH_RETRY_SECONDS re-exported)
    FETCH_FAILURE_REASONS,
    FETCH_RETRY_SECONDS,
    AdapterChecksumError,
    HostTier,
    fetch_failure_reason,
)
from inference.adapters.object_store import ObjectStore
from inference.adapters.lora_weights import LoraModuleWeights
from inference.adapters.peft_checkpoint import LoraAdapterWeights, adapter_files_from_dir, validate_adapter_files
from inference.adapters.registry import AdapterRef, AdapterRegistry
from inference.adapters.residency import DeviceAdapter, DeviceResidency, module_layout  # noqa: F401
from inference.adapters.storage_keys import adapter_file_keys, engine_adapter_prefix
from inference.device import pins_host_memory
from inference.model_config import ModelConfig
from inference.page_pool import PagePool
from inference.scheduler import Admission

if TYPE_CHECKING:
    from inference.tensor_parallel.partition import TensorParallelLayout

log = logging.getLogger(__name__)


@dataclass
class AdapterStats:
    """Counters of the adapter tiers. ``fetch_failures`` counts failed reads from the object store
    by reason, on both paths that read it: a cold registration (``register_stored``, the platform's
    first use of an adapter) and a re-fetch into host RAM."""

    host: TierStats
    device: TierStats = field(default_factory=TierStats)
    fetch_failures: dict[str, int] = field(default_factory=lambda: dict.fromkeys(FETCH_FAILURE_REASONS, 0))


class AdapterManager:
    """Registry, host tier and device tier of one engine, and every version's life cycle."""

    def __init__(
        self,
        model_config: ModelConfig,
        pool: PagePool,
        store: ObjectStore,
        host_budget_bytes: int,
        max_rank: int = 128,
        fetch_threads: int = 2,
        key_prefix: str = "adapters",
        parallel: TensorParallelLayout | None = None,
    ):
        """``parallel``: the tensor-parallel partition; ``pool`` is then rank 0's, and host RAM
        keeps every rank's share of each adapter (``[ranks, layers, elems]``), which a page-in
        copies into rank 0's pages and hands to :attr:`page_in_listeners` for the other ranks."""
        self.model_config = model_config
        self.parallel = parallel
        self.pool = pool
        self.store = store
        self.max_rank = max_rank
        self.key_prefix = key_prefix
        self.shapes = (parallel.rank_config() if parallel is not None else model_config).linear_shapes()
        self.registry = AdapterRegistry()
        self.device = pool.tensor.device
        self.host = HostAdapterCache(host_budget_bytes)
        self.stats = AdapterStats(host=self.host.stats)
        self.latency_observers: list = []  # callables (tier: str, seconds: float)
        self._host_tier = HostTier(
            store, self.host, pool.geometry, pool.tensor.dtype, pin=pins_host_memory(self.device),
            fetch_failures=self.stats.fetch_failures, observe=self._observe, wanted=self.registry.wanted,
            threads=fetch_threads, split=None if parallel is None else self._split,
        )
        self._device = DeviceResidency(pool, self.shapes, self.stats.device, self.registry.users, self._observe)

    # ------------------------------------------------------------------ registration (any thread)
    def register_dir(self, adapter_id: str, path: str | Path, new_version: bool = False) -> AdapterRef:
        """Validate a PEFT directory and register it under ``adapter_id``."""
        config_bytes, weights_bytes = adapter_files_from_dir(path)
        return self.register_files(adapter_id, config_bytes, weights_bytes, new_version)

    def register_files(self, adapter_id: str, config_bytes: bytes, weights_bytes: bytes, new_version: bool = False) -> AdapterRef:
        """Validate the two PEFT files, store them, and publish a new reference."""
        _check_adapter_id(adapter_id)
        started = time.monotonic()
        weights = validate_adapter_files(config_bytes, weights_bytes, self.model_config, self.max_rank)
        version, existing = self.registry.next_version(adapter_id, weights.sha256, new_version)
        if existing is not None:
            return existing
        config_key, weights_key = adapter_file_keys(
            engine_adapter_prefix(self.key_prefix, _key_safe(adapter_id), weights.sha256))
        self.store.put(config_key, config_bytes)
        self.store.put(weights_key, weights_bytes)
        return self._publish(adapter_id, version, weights, config_key, weights_key, started)

    def register_stored(self, adapter_id: str, config_key: str, weights_key: str, sha256: str | None = None, new_version: bool = False) -> AdapterRef:
        """Register adapter files that already sit in the object store (the platform uploads them)."""
        _check_adapter_id(adapter_id)
        started = time.monotonic()
        try:
            config_bytes, weights_bytes = self.store.get(config_key), self.store.get(weights_key)
            weights = validate_adapter_files(config_bytes, weights_bytes, self.model_config, self.max_rank)
            if sha256 is not None and sha256 != weights.sha256:
                raise AdapterChecksumError(f"stored weights have sha256 {weights.sha256}, expected {sha256}")
        except Exception as exc:
            self._host_tier.count_failure(exc)
            raise
        version, existing = self.registry.next_version(adapter_id, weights.sha256, new_version)
        if existing is not None:
            return existing
        return self._publish(adapter_id, version, weights, config_key, weights_key, started)

    def _publish(self, adapter_id: str, version: int, weights: LoraAdapterWeights, config_key: str, weights_key: str, started: float) -> AdapterRef:
        """Pack freshly validated weights into host RAM, then make their new reference current.
        Superseded versions that no request uses leave the registry and host RAM now (their device
        pages are idle, so eviction takes them first)."""
        ref = AdapterRef(
            adapter_id=adapter_id,
            version=version,
            sha256=weights.sha256,
            uid=AdapterRegistry.new_uid(adapter_id, version),
            rank=weights.rank,
            target_modules=weights.target_modules,
            module_ranks=tuple((name, m.rank) for name, m in weights.modules.items()),
            layer_elems=(weights.layer_elems() if self.parallel is None
                         else self.parallel.rank_layer_elems({n: m.rank for n, m in weights.modules.items()})),
            scaling=weights.scaling,
            config_key=config_key,
            weights_key=weights_key,
        )
        self._host_tier.load(ref, weights.modules, started)
        self.registry.publish(ref)
        for stale in self.registry.stale_versions(adapter_id):
            self.forget_version(stale)
        return ref

    def _split(self, modules: dict[str, LoraModuleWeights]) -> list[dict[str, LoraModuleWeights]]:
        """Every rank's share of an adapter's factors, in rank order."""
        return [self.parallel.shard_lora(modules, rank) for rank in range(self.parallel.size)]

    @property
    def page_in_listeners(self) -> list:
        """Callables ``(pages, packed [ranks, layers, elems])`` told of every page-in."""
        return self._device.page_in_listeners

    def forget_version(self, ref: AdapterRef) -> None:
        """Drop a superseded, unused version from the registry and host RAM (any thread)."""
        self.registry.drop_version(ref)
        self._host_tier.discard(ref.uid)

    # ------------------------------------------------------------------ use by requests
    def lookup(self, adapter_id: str) -> AdapterRef:
        """The current version of ``adapter_id`` (any thread; counts no user).
        UnknownAdapterError if none."""
        return self.registry.current(adapter_id)

    def acquire(self, ref: AdapterRef) -> AdapterRef:
        """A request admitted with ``ref`` starts using that version (engine thread); returns the
        version it holds from now on (the current one if ``ref`` was superseded and dropped
        since :meth:`lookup`). UnknownAdapterError if the adapter was unregistered since."""
        return self.registry.acquire_ref(ref)

    def release(self, ref: AdapterRef) -> None:
        """A request that used ``ref`` finished (engine thread). A superseded version's last user
        frees its device pages and host copy now."""
        self.registry.release(ref)
        if self.registry.get(ref.adapter_id) is not ref and self.registry.users(ref.uid) == 0:
            self.forget_version(ref)
            self.drop([ref])

    # ------------------------------------------------------------------ unregistering
    def unregister(self, adapter_id: str, on_engine_thread: Callable[[Callable[[], None]], None], timeout: float | None = None) -> None:
        """Hide ``adapter_id`` from new requests and registrations at once, wait until no request
        uses any of its versions (TimeoutError after ``timeout`` seconds, the adapter then stays
        registered), delete the objects this manager stored for it, forget it, and drop it from the
        device and host tiers (``on_engine_thread(fn)`` runs ``fn`` on the engine thread and waits)."""
        refs = self.registry.begin_unregister(adapter_id)
        if not self.registry.wait_idle(refs, timeout):
            self.registry.cancel_unregister(adapter_id)
            raise TimeoutError(f"adapter {adapter_id!r} is still used by in-flight requests")
        self._delete_objects(refs)  # before forgetting: a re-registration may store the same keys
        self.registry.forget(adapter_id, refs)
        on_engine_thread(lambda: self.drop(refs))

    def _delete_objects(self, refs: list[AdapterRef]) -> None:
        owned_prefix = self.key_prefix + "/"
        for ref in refs:
            for key in (ref.config_key, ref.weights_key):
                if not key.startswith(owned_prefix):
                    continue  # objects the platform stored itself are the platform's to delete
                try:
                    self.store.delete(key)
                except Exception:
                    log.exception("deleting %s from the object store failed", key)

    def drop(self, refs: list[AdapterRef]) -> None:
        """Remove these versions from the device and host tiers (engine thread; no users left)."""
        for ref in refs:
            self._device.drop(ref.uid)
            self._host_tier.discard(ref.uid)

    # ------------------------------------------------------------------ host tier
    def ensure_host(self, ref: AdapterRef) -> bool:
        """True if ``ref`` is in host RAM; otherwise start (or keep) a background fetch."""
        return self._host_tier.ensure(ref)

    def failure(self, ref: AdapterRef) -> str | None:
        """Why the last fetch of ``ref`` failed, for ``FETCH_RETRY_SECONDS`` after it failed."""
        return self._host_tier.failure(ref)

    def _observe(self, tier: str, seconds: float) -> None:
        for observer in self.latency_observers:
            try:
                observer(tier, seconds)
            except Exception:
                log.exception("adapter latency observer failed")

    # ------------------------------------------------------------------ device tier (engine thread)
    def admit(self, ref: AdapterRef) -> Admission:
        """Make ``ref`` resident on the device if possible, without waiting for I/O."""
        resident = self._device.get(ref.uid)
        if resident is not None:
            self.stats.device.hits += 1
            resident.last_used = time.monotonic()
            return Admission.READY
        if self.failure(ref) is not None:
            return Admission.FAILED
        if not self.ensure_host(ref):
            return Admission.COLD
        packed = self.host.get(ref.uid)
        if packed is None:  # evicted from host RAM since the check: fetch it again
            self.ensure_host(ref)
            return Admission.COLD
        self.stats.device.misses += 1
        return Admission.READY if self._device.page_in(ref, packed, protect=ref.uid) else Admission.NO_ROOM

    def prefetch(self, refs: list[AdapterRef], reserve_pages: int) -> None:
        """Bring queued requests' adapters towards the device ahead of their turn: start host
        fetches, and page in host-resident ones while more than ``reserve_pages`` stay free."""
        for ref in refs:
            if self._device.get(ref.uid) is not None or self.failure(ref) is not None:
                continue
            if not self.ensure_host(ref):
                continue
            needed = self.pool.geometry.pages_for_elems(ref.layer_elems)
            if self.pool.num_free - needed < reserve_pages:
                continue
            packed = self.host.get(ref.uid)
            if packed is not None:
                self._device.page_in(ref, packed, protect=None, evict=False)

    def make_room(self, num_pages: int, protect: str | None = None) -> None:
        """Evict device adapters that no running request uses until ``num_pages`` are free."""
        self._device.make_room(num_pages, protect)

    def on_run(self, ref: AdapterRef) -> None:
        self._device.on_run(ref)

    def on_stop_running(self, ref: AdapterRef) -> None:
        self._device.on_stop_running(ref)

    def drop_device_copies(self) -> None:
        """Free every resident adapter's pages (engine thread; no request may be running): the
        device pools were lost, e.g. a tensor-parallel group restarted. Host RAM keeps them."""
        for uid in list(self._device.adapters):
            self._device.drop(uid)

    def resident(self, uid: str) -> DeviceAdapter | None:
        return self._device.get(uid)

    def resident_uids(self) -> list[str]:
        """The versions now in device pages."""
        return list(self._device.adapters)

    def resident_adapters(self) -> list[DeviceAdapter]:
        """The adapters now in device pages (their references and pages), a copy of the list."""
        return list(self._device.adapters.values())

    def resident_counts(self) -> tuple[int, int]:
        """(adapters in host RAM, adapters in device pages)."""
        return len(self.host), len(self._device.adapters)

    def close(self) -> None:
        self._host_tier.close()


def _check_adapter_id(adapter_id: str) -> None:
    if not isinstance(adapter_id, str) or not adapter_id or len(adapter_id) > 200:
        raise ValueError("adapter id must be a non-empty string of at most 200 characters")


def _key_safe(adapter_id: str) -> str:
    """A store-key segment for an adapter id (ids are user-chosen; keys are not)."""
    return hashlib.sha256(adapter_id.encode()).hexdigest()[:24]
