"""Registered adapters: immutable references, versions and in-flight counts.

A registration creates an :class:`AdapterRef` with a fresh ``uid``; looking an adapter up and
taking a reference happen under one lock, so an adapter cannot disappear between the two.
Unregistering hides the id at once (new requests are refused) and waits until every request that
holds one of its versions has finished.
"""

from __future__ import annotations

import threading
import uuid
from dataclasses import dataclass


class UnknownAdapterError(ValueError):
    """No adapter is registered under that id (or it is being unregistered)."""


@dataclass(frozen=True)
class AdapterRef:
    """One registered version of an adapter. ``uid`` is unique per registration."""

    adapter_id: str
    version: int
    sha256: str
    uid: str
    rank: int
    target_modules: tuple[str, ...]
    module_ranks: tuple[tuple[str, int], ...]
    layer_elems: int
    scaling: float
    config_key: str
    weights_key: str


class AdapterRegistry:
    """``adapter_id -> current AdapterRef`` plus per-uid in-flight counts. Thread-safe."""

    def __init__(self) -> None:
        self._current: dict[str, AdapterRef] = {}
        self._by_uid: dict[str, AdapterRef] = {}
        self._users: dict[str, int] = {}
        self._closing: set[str] = set()
        self._cond = threading.Condition()

    @staticmethod
    def new_uid(adapter_id: str, version: int) -> str:
        return f"{adapter_id}@{version}#{uuid.uuid4().hex[:12]}"

    def current(self, adapter_id: str) -> AdapterRef:
        with self._cond:
            ref = self._current.get(adapter_id)
            if ref is None or adapter_id in self._closing:
                raise UnknownAdapterError(f"unknown adapter {adapter_id!r}")
            return ref

    def get(self, adapter_id: str) -> AdapterRef | None:
        with self._cond:
            return self._current.get(adapter_id)

    def next_version(self, adapter_id: str, sha256: str, new_version: bool) -> tuple[int, AdapterRef | None]:
        """The version a registration of ``sha256`` gets, or the existing ref if it is identical.

        Same id with the same weights: idempotent. Different weights: an error unless
        ``new_version``.
        """
        with self._cond:
            if adapter_id in self._closing:
                raise ValueError(f"adapter {adapter_id!r} is being unregistered")
            existing = self._current.get(adapter_id)
            if existing is None:
                return 1, None
            if existing.sha256 == sha256 and not new_version:
                return existing.version, existing
            if not new_version:
                raise ValueError(
                    f"adapter {adapter_id!r} is already registered with different weights "
                    f"(sha256 {existing.sha256[:12]}...); register it as a new version"
                )
            return existing.version + 1, None

    def publish(self, ref: AdapterRef) -> AdapterRef | None:
        """Make ``ref`` the current version of its id; returns the version it replaced."""
        with self._cond:
            previous = self._current.get(ref.adapter_id)
            self._current[ref.adapter_id] = ref
            self._by_uid[ref.uid] = ref
            self._users.setdefault(ref.uid, 0)
            return previous

    def acquire_ref(self, ref: AdapterRef) -> AdapterRef:
        """Count one more user of this version and return it. If it was superseded and dropped
        since it was looked up, the current version is taken instead (as a request made a moment
        later would have). UnknownAdapterError if the id is gone or being unregistered."""
        with self._cond:
            if ref.adapter_id in self._closing:
                raise UnknownAdapterError(f"unknown adapter {ref.adapter_id!r}")
            held = ref if self._by_uid.get(ref.uid) is ref else self._current.get(ref.adapter_id)
            if held is None:
                raise UnknownAdapterError(f"unknown adapter {ref.adapter_id!r}")
            self._users[held.uid] += 1
            return held

    def release(self, ref: AdapterRef) -> None:
        with self._cond:
            self._users[ref.uid] -= 1
            if self._users[ref.uid] <= 0:
                self._cond.notify_all()

    def knows(self, uid: str) -> bool:
        """True while the version ``uid`` is registered (current or superseded but still used)."""
        with self._cond:
            return uid in self._by_uid

    def wanted(self, uid: str) -> bool:
        """True while the version ``uid`` may still serve a request: registered, and either not
        being unregistered or still used by one."""
        with self._cond:
            ref = self._by_uid.get(uid)
            if ref is None:
                return False
            return ref.adapter_id not in self._closing or self._users.get(uid, 0) > 0

    def users(self, uid: str) -> int:
        with self._cond:
            return self._users.get(uid, 0)

    def begin_unregister(self, adapter_id: str) -> list[AdapterRef]:
        """Hide ``adapter_id`` from new requests; returns every version of it still known."""
        with self._cond:
            if adapter_id not in self._current:
                raise UnknownAdapterError(f"unknown adapter {adapter_id!r}")
            self._closing.add(adapter_id)
            return [r for r in self._by_uid.values() if r.adapter_id == adapter_id]

    def wait_idle(self, refs: list[AdapterRef], timeout: float | None) -> bool:
        """Block until no request uses any of ``refs``; False on timeout."""
        with self._cond:
            return self._cond.wait_for(lambda: all(self._users.get(r.uid, 0) <= 0 for r in refs), timeout)

    def forget(self, adapter_id: str, refs: list[AdapterRef]) -> None:
        with self._cond:
            self._closing.discard(adapter_id)
            if self._current.get(adapter_id) in refs:
                del self._current[adapter_id]
            for ref in refs:
                self._by_uid.pop(ref.uid, None)
                self._users.pop(ref.uid, None)

    def cancel_unregister(self, adapter_id: str) -> None:
        with self._cond:
            self._closing.discard(adapter_id)

    def stale_versions(self, adapter_id: str) -> list[AdapterRef]:
        """Older versions of ``adapter_id`` that no request uses any more."""
        with self._cond:
            current = self._current.get(adapter_id)
            return [
                r for r in self._by_uid.values()
                if r.adapter_id == adapter_id and r is not current and self._users.get(r.uid, 0) <= 0
            ]

    def drop_version(self, ref: AdapterRef) -> None:
        with self._cond:
            self._by_uid.pop(ref.uid, None)
            self._users.pop(ref.uid, None)

    def __len__(self) -> int:
        with self._cond:
            return len(self._current)
