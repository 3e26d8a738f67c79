"""The adapter manager: three tiers (object store -> host RAM -> device pages) and their policies.

* Registration (any thread) validates the PEFT files completely, writes them to the object store
  under server-made keys and publishes an :class:`AdapterRef`. A failed validation publishes
  nothing.
* The fetcher (a background thread pool) brings adapters from the object store into the host
  cache. The engine thread never waits for it: a request whose adapter is cold stays queued
  (``COLD``) while requests behind it run, and is admitted in arrival order once its adapter is
  in host RAM.
* Device residency: an adapter's weights are packed into pages of the unified pool (a virtual
  per-layer buffer, see ``docs/design.md``). Eviction frees the least recently used adapter that no
  running request uses, preferring those that no queued request needs either. Running requests'
  adapters are never evicted.
* Prefetch: after each step, adapters of queued requests are fetched into host RAM and paged into
  free device pages ahead of their turn (on CUDA on a side stream, ordered by an event).

Everything that mutates device residency runs on the engine thread.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import torch

from inference.adapters.host_cache import HostAdapterCache, TierStats
from inference.adapters.object_store import ObjectNotFoundError, ObjectStore
from inference.adapters.peft_checkpoint import (
    MODULE_ORDER,
    AdapterValidationError,
    LoraAdapterWeights,
    adapter_files_from_dir,
    validate_adapter_files,
)
from inference.adapters.registry import AdapterRef, AdapterRegistry
from inference.model_config import ModelConfig
from inference.openmp_workers import releases_openmp_workers
from inference.page_pool import PageKind, PagePool
from inference.scheduler import Admission

log = logging.getLogger(__name__)

# A failed fetch fails the requests waiting for it; requests arriving after this many seconds try
# the object store again (a store outage is usually transient).
FETCH_RETRY_SECONDS = 10.0
# Why a fetch from the object store failed (the ``reason`` label of tailor_adapter_fetch_failures_total):
# missing (no object under the key), checksum (the bytes changed since registration), invalid (the
# stored files no longer pass validation), unavailable (anything else: the store unreachable, a timeout).
FETCH_FAILURE_REASONS = ("missing", "checksum", "invalid", "unavailable")


class AdapterChecksumError(ValueError):
    """Stored adapter weights whose sha256 is not the one registered."""


def fetch_failure_reason(exc: BaseException) -> str:
    """The FETCH_FAILURE_REASONS entry for a fetch that raised ``exc``."""
    if isinstance(exc, ObjectNotFoundError):
        return "missing"
    if isinstance(exc, AdapterChecksumError):
        return "checksum"
    if isinstance(exc, AdapterValidationError):
        return "invalid"
    return "unavailable"


@dataclass
class DeviceAdapter:
    """An adapter resident in pool pages. ``offsets[module] = (a_offset, b_offset, rank)`` in
    elements of the per-layer virtual buffer."""

    ref: AdapterRef
    pages: list[int]
    offsets: dict[str, tuple[int, int, int]]
    shapes: dict[str, tuple[int, int]]
    running: int = 0
    last_used: float = field(default_factory=time.monotonic)
    ready_event: object | None = None

    @functools.cached_property
    def layout(self) -> tuple:
        """Adapters with equal layouts have the same page count and module offsets and ranks (the
        CPU LoRA path computes such adapters together). Pages and offsets never change once paged in."""
        return len(self.pages), tuple(sorted(self.offsets.items()))


@dataclass
class AdapterStats:
    """Counters of the adapter tiers. ``fetch_failures`` counts failed reads from the object store
    by reason, on both paths that read it: a cold registration (``register_stored``, the platform's
    first use of an adapter) and a re-fetch into host RAM (``ensure_host``)."""

    host: TierStats
    device: TierStats = field(default_factory=TierStats)
    fetch_failures: dict[str, int] = field(default_factory=lambda: dict.fromkeys(FETCH_FAILURE_REASONS, 0))


def module_layout(ref: AdapterRef, shapes: dict[str, tuple[int, int]]) -> dict[str, tuple[int, int, int]]:
    """Offsets of each module's A [r, in] and Bt [r, out] in the per-layer virtual buffer."""
    offsets: dict[str, tuple[int, int, int]] = {}
    cursor = 0
    ranks = dict(ref.module_ranks)
    for name in MODULE_ORDER:
        if name not in ranks:
            continue
        rank = ranks[name]
        in_f, out_f = shapes[name]
        offsets[name] = (cursor, cursor + rank * in_f, rank)
        cursor += rank * (in_f + out_f)
    return offsets


class AdapterManager:
    """Registry, host cache, fetcher and device residency for one engine."""

    def __init__(
        self,
        model_config: ModelConfig,
        pool: PagePool,
        store: ObjectStore,
        host_budget_bytes: int,
        max_rank: int = 128,
        fetch_threads: int = 2,
        key_prefix: str = "adapters",
    ):
        self.model_config = model_config
        self.pool = pool
        self.store = store
        self.max_rank = max_rank
        self.key_prefix = key_prefix
        self.shapes = model_config.linear_shapes()
        self.registry = AdapterRegistry()
        self.device = pool.tensor.device
        self.host = HostAdapterCache(host_budget_bytes, pin_memory=self.device.type == "cuda")
        self.stats = AdapterStats(host=self.host.stats)
        self._resident: dict[str, DeviceAdapter] = {}
        self._fetches: dict[str, Future] = {}
        self._failed: dict[str, tuple[str, float]] = {}  # uid -> (message, monotonic time)
        self._fetch_lock = threading.Lock()
        self._executor = ThreadPoolExecutor(max_workers=fetch_threads, thread_name_prefix="tailor-fetch")
        self._copy_stream = torch.cuda.Stream(self.device) if self.device.type == "cuda" else None
        self.latency_observers: list = []  # callables (tier: str, seconds: float)

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
        digest = weights.sha256
        base = f"{self.key_prefix}/{_key_safe(adapter_id)}/{digest[:32]}"
        config_key, weights_key = f"{base}/adapter_config.json", f"{base}/adapter_model.safetensors"
        self.store.put(config_key, config_bytes)
        self.store.put(weights_key, weights_bytes)
        ref = self._make_ref(adapter_id, version, weights, config_key, weights_key)
        self._load_host(ref, weights, started)
        return ref

    def _load_host(self, ref: AdapterRef, weights: LoraAdapterWeights, started: float) -> None:
        """Put freshly validated weights into host RAM (a timed host load) and publish ``ref``."""
        seconds = time.monotonic() - started
        self.host.put(ref.uid, self._host_copy(weights), load_seconds=seconds)
        self._observe("host", seconds)
        self._publish(ref)

    def _publish(self, ref: AdapterRef) -> None:
        """Make ``ref`` current; superseded versions that no request uses leave the registry and
        host RAM now (their device pages are idle, so eviction takes them first)."""
        self.registry.publish(ref)
        for stale in self.registry.stale_versions(ref.adapter_id):
            self.forget_version(stale)

    def forget_version(self, ref: AdapterRef) -> None:
        """Drop a superseded, unused version from the registry and host RAM (any thread)."""
        self.registry.drop_version(ref)
        self.host.discard(ref.uid)

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
            self._count_fetch_failure(exc)
            raise
        version, existing = self.registry.next_version(adapter_id, weights.sha256, new_version)
        if existing is not None:
            return existing
        ref = self._make_ref(adapter_id, version, weights, config_key, weights_key)
        self._load_host(ref, weights, started)
        return ref

    def _make_ref(self, adapter_id: str, version: int, weights: LoraAdapterWeights, config_key: str, weights_key: str) -> AdapterRef:
        module_ranks = tuple((name, m.rank) for name, m in weights.modules.items())
        return AdapterRef(
            adapter_id=adapter_id,
            version=version,
            sha256=weights.sha256,
            uid=AdapterRegistry.new_uid(adapter_id, version),
            rank=weights.rank,
            target_modules=weights.target_modules,
            module_ranks=module_ranks,
            layer_elems=weights.layer_elems(),
            scaling=weights.scaling,
            config_key=config_key,
            weights_key=weights_key,
        )

    @releases_openmp_workers  # runs on fetcher and registering threads, not the engine's
    def _host_copy(self, weights: LoraAdapterWeights) -> LoraAdapterWeights:
        """Host weights in the pool's dtype (halves host RAM for half-precision pools)."""
        from dataclasses import replace

        dtype = self.pool.tensor.dtype
        if all(m.a.dtype == dtype for m in weights.modules.values()):
            return weights
        modules = {n: replace(m, a=m.a.to(dtype), b_t=m.b_t.to(dtype)) for n, m in weights.modules.items()}
        return replace(weights, modules=modules)

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
            self.drop([ref])
            self.forget_version(ref)

    # ------------------------------------------------------------------ the fetcher (background)
    def ensure_host(self, ref: AdapterRef) -> bool:
        """True if ``ref`` is in host RAM; otherwise start (or keep) a background fetch."""
        if self.host.contains(ref.uid):
            return True
        with self._fetch_lock:
            if ref.uid not in self._fetches and ref.uid not in self._failed:
                self.host.stats.misses += 1  # one miss per fetch started
                self._fetches[ref.uid] = self._executor.submit(self._fetch, ref)
        return False

    def _fetch(self, ref: AdapterRef) -> None:
        started = time.monotonic()
        try:
            config_bytes = self.store.get(ref.config_key)
            weights_bytes = self.store.get(ref.weights_key)
            if hashlib.sha256(weights_bytes).hexdigest() != ref.sha256:
                raise AdapterChecksumError("stored adapter weights changed since registration (sha256 mismatch)")
            weights = validate_adapter_files(config_bytes, weights_bytes, self.model_config, self.max_rank)
            seconds = time.monotonic() - started
            self.host.put(ref.uid, self._host_copy(weights), load_seconds=seconds)
            self._observe("host", seconds)
        except Exception as exc:  # store outage, corruption: fail the requests, keep serving
            log.warning("fetching adapter %s failed: %s", ref.uid, exc)
            with self._fetch_lock:
                self._failed[ref.uid] = (f"loading adapter {ref.adapter_id!r} failed: {exc}", time.monotonic())
            self._count_fetch_failure(exc)
        finally:
            with self._fetch_lock:
                self._fetches.pop(ref.uid, None)

    def _count_fetch_failure(self, exc: BaseException) -> None:
        reason = fetch_failure_reason(exc)
        with self._fetch_lock:
            self.stats.fetch_failures[reason] += 1

    def _observe(self, tier: str, seconds: float) -> None:
        for observer in self.latency_observers:
            try:
                observer(tier, seconds)
            except Exception:
                log.exception("adapter latency observer failed")

    def failure(self, ref: AdapterRef) -> str | None:
        """Why the last fetch of ``ref`` failed, for ``FETCH_RETRY_SECONDS`` after it failed."""
        with self._fetch_lock:
            entry = self._failed.get(ref.uid)
            if entry is None:
                return None
            message, failed_at = entry
            if time.monotonic() - failed_at > FETCH_RETRY_SECONDS:
                del self._failed[ref.uid]
                return None
            return message

    # ------------------------------------------------------------------ device tier (engine thread)
    def admit(self, ref: AdapterRef) -> Admission:
        """Make ``ref`` resident on the device if possible, without waiting for I/O."""
        resident = self._resident.get(ref.uid)
        if resident is not None:
            self.stats.device.hits += 1
            resident.last_used = time.monotonic()
            return Admission.READY
        if self.failure(ref) is not None:
            return Admission.FAILED
        if not self.ensure_host(ref):
            return Admission.COLD
        self.stats.device.misses += 1
        return Admission.READY if self._page_in(ref, protect=ref.uid) else Admission.NO_ROOM

    def _page_in(self, ref: AdapterRef, protect: str | None, evict: bool = True) -> bool:
        weights = self.host.get(ref.uid)
        if weights is None:  # evicted from host between the check and now
            self.ensure_host(ref)
            return False
        num_pages = self.pool.geometry.pages_for_elems(ref.layer_elems)
        if not self.pool.can_allocate(num_pages) and evict:
            self.make_room(num_pages, protect=protect)
        if not self.pool.can_allocate(num_pages):
            return False
        started = time.monotonic()
        pages = self.pool.allocate(num_pages, PageKind.ADAPTER)
        event = self._copy_into_pages(weights, pages)
        layout = module_layout(ref, self.shapes)
        shapes = {name: self.shapes[name] for name in layout}
        self._resident[ref.uid] = DeviceAdapter(ref, pages, layout, shapes, ready_event=event)
        seconds = time.monotonic() - started
        self.stats.device.loads += 1
        self.stats.device.load_seconds_sum += seconds
        self._observe("device", seconds)
        return True

    def _copy_into_pages(self, weights: LoraAdapterWeights, pages: list[int]) -> object | None:
        """Write the packed ``[layers, layer_elems]`` buffer into ``pages`` (all layers at once)."""
        parts = []
        for name in MODULE_ORDER:
            module = weights.modules.get(name)
            if module is not None:
                parts.append(module.a.reshape(module.a.shape[0], -1))
                parts.append(module.b_t.reshape(module.b_t.shape[0], -1))
        packed = torch.cat(parts, dim=1)
        layers, elems = packed.shape
        page_elems = self.pool.geometry.page_elems
        padded = torch.zeros((layers, len(pages) * page_elems), dtype=self.pool.tensor.dtype, pin_memory=packed.is_pinned())
        padded[:, :elems] = packed
        index = torch.tensor(pages, dtype=torch.long, device=self.device)
        if self._copy_stream is None:
            self.pool.tensor.index_copy_(1, index, padded.view(layers, len(pages), page_elems))
            return None
        with torch.cuda.stream(self._copy_stream):  # side stream: overlaps the running batch
            staged = padded.to(self.device, non_blocking=True)
            self.pool.tensor.index_copy_(1, index, staged.view(layers, len(pages), page_elems))
            event = torch.cuda.Event()
            event.record(self._copy_stream)
        return event

    def make_room(self, num_pages: int, protect: str | None = None) -> None:
        """Evict device adapters that no running request uses until ``num_pages`` are free:
        idle ones (no request at all) first, then those only queued requests need, LRU order."""
        if self.pool.can_allocate(num_pages):
            return
        candidates = [d for uid, d in self._resident.items() if d.running == 0 and uid != protect]
        candidates.sort(key=lambda d: (self.registry.users(d.ref.uid) > 0, d.last_used))
        for victim in candidates:
            if self.pool.can_allocate(num_pages):
                return
            self._evict(victim)

    def _evict(self, resident: DeviceAdapter) -> None:
        if resident.ready_event is not None:
            resident.ready_event.synchronize()
        del self._resident[resident.ref.uid]
        self.pool.free(resident.pages)
        self.stats.device.evictions += 1

    def on_run(self, ref: AdapterRef) -> None:
        self._resident[ref.uid].running += 1

    def on_stop_running(self, ref: AdapterRef) -> None:
        resident = self._resident.get(ref.uid)
        if resident is not None:
            resident.running -= 1
            resident.last_used = time.monotonic()

    def resident(self, uid: str) -> DeviceAdapter | None:
        return self._resident.get(uid)

    def prefetch(self, refs: list[AdapterRef], reserve_pages: int) -> None:
        """Bring queued requests' adapters towards the device ahead of their turn: start host
        fetches, and page in host-resident ones while more than ``reserve_pages`` stay free."""
        for ref in refs:
            if ref.uid in self._resident or self.failure(ref) is not None:
                continue
            if not self.ensure_host(ref):
                continue
            needed = self.pool.geometry.pages_for_elems(ref.layer_elems)
            if self.pool.num_free - needed < reserve_pages:
                continue
            self._page_in(ref, protect=None, evict=False)

    def drop(self, refs: list[AdapterRef]) -> None:
        """Remove these versions from the device and host tiers (engine thread; no users left)."""
        for ref in refs:
            resident = self._resident.get(ref.uid)
            if resident is not None:
                self._evict(resident)
            self.host.discard(ref.uid)
            with self._fetch_lock:
                self._failed.pop(ref.uid, None)

    def resident_counts(self) -> tuple[int, int]:
        """(adapters in host RAM, adapters in device pages)."""
        return len(self.host), len(self._resident)

    def close(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)


def _check_adapter_id(adapter_id: str) -> None:
    if not isinstance(adapter_id, str) or not adapter_id or len(adapter_id) > 200:
        raise ValueError("adapter id must be a non-empty string of at most 200 characters")


def _key_safe(adapter_id: str) -> str:
    """A store-key segment for an adapter id (ids are user-chosen; keys are not)."""
    return hashlib.sha256(adapter_id.encode()).hexdigest()[:24]
