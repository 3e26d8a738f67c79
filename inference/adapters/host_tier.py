"""The host tier: registered adapters into host RAM, packed once for the device.

An adapter enters host RAM either at registration (its freshly validated weights) or by a fetch
from the object store after it left the host cache. Either way it is packed once, right then, into
the ``[num_layers, padded_elems]`` form a page-in copies (``lora_weights.pack_layers``), in the
pool's dtype and, when the pool is on CUDA, in pinned memory: a page-in is then one asynchronous
host-to-device copy.

A fetch runs on a background thread pool; the engine thread never waits for it. It reads only the
weights object and checks its sha256 against the registered one, then loads the tensors without
validating them again: bytes with that sha256 are the bytes that were validated at registration,
and the reference carries everything the config said (ranks, targets, scaling).
"""

from __future__ import annotations

import hashlib
import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor

import torch

from inference.adapters.host_cache import HostAdapterCache
from inference.adapters.lora_weights import LoraModuleWeights, pack_layers
from inference.adapters.object_store import ObjectNotFoundError, ObjectStore
from inference.adapters.peft_format import AdapterValidationError
from inference.adapters.peft_tensors import load_registered
from inference.adapters.registry import AdapterRef
from inference.openmp_workers import releases_openmp_workers
from inference.page_pool import PageGeometry

log = logging.getLogger(__name__)

# A failed fetch fails the requests waiting for it; requests arriving after this many seconds try
# the object store again (a store outage is usually transient).
FETCH_RETRY_SECONDS = 10.0
# Why a read of an adapter from the object store failed (the ``reason`` label of
# tailor_adapter_fetch_failures_total): missing (no object under the key), checksum (the bytes
# differ from the sha256 expected), invalid (the files do not pass validation: at a cold
# registration, or, on a re-fetch, weights with the registered sha256 that cannot be loaded),
# unavailable (anything else: the store unreachable, a timeout).
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


class HostTier:
    """Packs adapters into ``cache`` and fetches evicted ones back from ``store``.

    ``wanted(uid)`` says whether a version may still serve a request: a fetch that completes
    after its version was dropped (or while it is being unregistered and unused) takes its result
    out again and records no failure, so nothing is left in host RAM that no one would discard. ``pin`` packs into pinned memory (CUDA pools only).
    """

    def __init__(
        self,
        store: ObjectStore,
        cache: HostAdapterCache,
        geometry: PageGeometry,
        dtype: torch.dtype,
        pin: bool,
        fetch_failures: dict[str, int],
        observe: Callable[[str, float], None],
        wanted: Callable[[str], bool],
        threads: int = 2,
        split: Callable[[dict[str, LoraModuleWeights]], list[dict[str, LoraModuleWeights]]] | None = None,
    ):
        """``split``: under tensor parallelism, every rank's share of an adapter's factors; the
        packed form is then ``[ranks, layers, padded_elems]`` (rank 0 first)."""
        self.split = split
        self.store, self.cache, self.geometry = store, cache, geometry
        self.dtype, self.pin = dtype, pin
        self.fetch_failures = fetch_failures
        self._observe, self._wanted = observe, wanted
        self._fetches: dict[str, Future] = {}
        self._failed: dict[str, tuple[str, float]] = {}  # uid -> (message, monotonic time)
        self._lock = threading.Lock()
        self._executor = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="tailor-fetch")

    def padded_elems(self, ref: AdapterRef) -> int:
        """A layer's row of ``ref``'s packed form: its elements rounded up to whole pages."""
        return self.geometry.pages_for_elems(ref.layer_elems) * self.geometry.page_elems

    @releases_openmp_workers  # runs on fetcher and registering threads, not the engine's
    def load(self, ref: AdapterRef, modules: dict[str, LoraModuleWeights], started: float) -> None:
        """Pack ``ref``'s factors into host RAM (a host load timed from ``started``)."""
        if self.split is None:
            packed = pack_layers(modules, self.padded_elems(ref), self.dtype, self.pin)
        else:
            shards = [pack_layers(m, self.padded_elems(ref), self.dtype, False) for m in self.split(modules)]
            packed = torch.empty((len(shards), *shards[0].shape), dtype=self.dtype, pin_memory=self.pin)
            for rank, shard in enumerate(shards):
                packed[rank].copy_(shard)
        seconds = time.monotonic() - started
        self.cache.put(ref.uid, packed, load_seconds=seconds)
        self._observe("host", seconds)

    def ensure(self, ref: AdapterRef) -> bool:
        """True if ``ref`` is in host RAM; otherwise start (or keep) a background fetch."""
        if self.cache.contains(ref.uid):
            return True
        with self._lock:
            if ref.uid not in self._fetches and ref.uid not in self._failed:
                self.cache.stats.misses += 1  # one miss per fetch started
                self._fetches[ref.uid] = self._executor.submit(self._fetch, ref)
        return False

    def _read_registered(self, ref: AdapterRef) -> dict[str, LoraModuleWeights]:
        """The registered weights of ``ref`` from the store: sha256 checked, then loaded."""
        weights_bytes = self.store.get(ref.weights_key)
        if hashlib.sha256(weights_bytes).hexdigest() != ref.sha256:
            raise AdapterChecksumError("stored adapter weights changed since registration (sha256 mismatch)")
        try:
            return load_registered(weights_bytes, ref.target_modules, self.geometry.num_layers)
        except Exception as exc:  # only a server bug gets here: these bytes passed validation
            raise AdapterValidationError([f"the registered weights could not be loaded: {exc}"]) from exc

    def _fetch(self, ref: AdapterRef) -> None:
        started = time.monotonic()
        try:
            self.load(ref, self._read_registered(ref), started)
            if not self._wanted(ref.uid):  # dropped while it was being fetched
                self.cache.discard(ref.uid)
        except Exception as exc:  # store outage, corruption: fail the requests, keep serving
            if self._wanted(ref.uid):
                log.warning("fetching adapter %s failed: %s", ref.uid, exc)
                with self._lock:
                    self._failed[ref.uid] = (f"loading adapter {ref.adapter_id!r} failed: {exc}", time.monotonic())
                self.count_failure(exc)
        finally:
            with self._lock:
                self._fetches.pop(ref.uid, None)

    def count_failure(self, exc: BaseException) -> None:
        """Count a failed read from the object store under its reason."""
        reason = fetch_failure_reason(exc)
        with self._lock:
            self.fetch_failures[reason] += 1

    def failure(self, ref: AdapterRef) -> str | None:
        """Why the last fetch of ``ref`` failed, for ``FETCH_RETRY_SECONDS`` after it failed."""
        with self._lock:
            entry = self._failed.get(ref.uid)
            if entry is None:
                return None
            message, failed_at = entry
            if time.monotonic() - failed_at > FETCH_RETRY_SECONDS:
                del self._failed[ref.uid]
                return None
            return message

    def discard(self, uid: str) -> None:
        """Forget a version: its host copy and any recorded failure."""
        self.cache.discard(uid)
        with self._lock:
            self._failed.pop(uid, None)

    def close(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)
