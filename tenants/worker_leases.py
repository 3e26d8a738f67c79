"""Coordination of Celery workers through Redis: message leases and the one clean-up scheduler.

**Redelivery after a crash (``LeaseKeeper``).** Celery's Redis transport (kombu) emulates
acknowledgements: a message it hands to a worker moves into the hash ``unacked`` with an entry
in the sorted set ``unacked_index`` scored by the delivery time. Consumers sweep that index
(``QoS.restore_visible``, every ``unacked_restore_interval`` s, every
``unacked_restore_throttle``-th call) and put back on the queue every message delivered more than
``visibility_timeout`` seconds ago, whoever holds it. kombu (5.7 here) writes the score only once,
at delivery, and never refreshes it while the message is being processed. So the timeout is a
trade-off: long (the old 3600 s) and a message whose worker was SIGKILLed waits an hour; short
and a validation (or a retry waiting for its countdown, which the worker holds unacknowledged
too: kombu#337, celery#5935) that runs longer is redelivered while it still runs, again every
timeout, in a loop.

Tailor takes both: a short ``visibility_timeout`` (``TAILOR_WORKER_VISIBILITY_TIMEOUT_S``, 30 s)
and a lease renewal. Each live worker remembers the delivery tags of the messages it received
(Celery's ``task_received`` signal) and, every fifth of the timeout, re-scores those that are
still unacknowledged to "now" (``ZADD XX``: an entry that the sweep or an ack already removed is
never re-created). A message a live worker holds is therefore never older than a fifth of the
timeout and is never restored; a dead worker renews nothing, so its messages are back on the
queue one timeout (plus one sweep period) after its last renewal. Validation is idempotent (a
conditional UPDATE), so the rare duplicate (a renewal delayed past the timeout) is harmless.

**One clean-up scheduler (``CleanupScheduler``).** Every worker runs a scheduler thread (a thread,
not Celery's embedded beat, which is a child process that a SIGKILLed worker leaves running
without a parent). Time is cut into slots of ``TAILOR_CLEANUP_INTERVAL_S``; at the start of each
slot every worker tries ``SET tailor:cleanup:slot:<n> NX``, and only the one that wins sends the
clean-up task. Any number of workers, restarted as often as they like, send one clean-up per
interval; if all but one die, the survivor keeps it going.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

from kombu.transport.redis import Channel as RedisChannel

log = logging.getLogger(__name__)

UNACKED_INDEX_KEY = RedisChannel.unacked_index_key  # "unacked_index" (no global_keyprefix is set)
RENEWALS_PER_TIMEOUT = 5  # leases are renewed every visibility_timeout / 5 seconds
CLEANUP_SLOT_KEY = "tailor:cleanup:slot"


def transport_options(visibility_timeout_s: float) -> dict:
    """kombu Redis transport options for ``visibility_timeout_s``: the timeout, and a restore
    sweep every few seconds (kombu's default sweeps every 100 s), so that a dead worker's messages
    come back within about ``visibility_timeout_s`` + ``sweep`` seconds."""
    sweep_s = max(1, int(visibility_timeout_s / RENEWALS_PER_TIMEOUT))
    return {
        "visibility_timeout": visibility_timeout_s,
        "unacked_restore_interval": sweep_s,
        "unacked_restore_throttle": 1,
        # the sweep's mutex: a worker killed while holding it blocks the sweeps of the others
        # until it expires (kombu's default: 300 s)
        "unacked_mutex_expire": max(5, int(visibility_timeout_s)),
    }


def _redis(url: str):
    import redis

    return redis.Redis.from_url(url, socket_timeout=5, socket_connect_timeout=5)


class LeaseKeeper:
    """Renews the ``unacked_index`` score of the messages this worker holds (module docstring).

    ``track`` is connected to Celery's ``task_received`` signal; a request is dropped once Celery
    has acknowledged (or rejected) it, or once its entry left the index (restored at shutdown)."""

    def __init__(self, redis_url: str, visibility_timeout_s: float, index_key: str = UNACKED_INDEX_KEY):
        self._client = _redis(redis_url)
        self._index_key = index_key
        self.interval_s = visibility_timeout_s / RENEWALS_PER_TIMEOUT
        self._held: dict[str, object] = {}  # delivery tag -> celery Request
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="tailor-leases", daemon=True)

    def start(self) -> LeaseKeeper:
        self._thread.start()
        return self

    def track(self, sender=None, request=None, **_kwargs) -> None:
        """``task_received`` receiver: remember the request's delivery tag."""
        tag = getattr(getattr(request, "message", None), "delivery_tag", None)
        if tag is not None:
            with self._lock:
                self._held[str(tag)] = request

    def held(self) -> list[str]:
        """Delivery tags currently tracked."""
        with self._lock:
            return list(self._held)

    def renew(self) -> int:
        """Re-score every held, unacknowledged message to now; returns how many were renewed."""
        with self._lock:
            items = list(self._held.items())
        live = [tag for tag, request in items if not getattr(request, "acknowledged", False)]
        gone = {tag for tag, _ in items} - set(live)
        if live:
            scores = self._client.pipeline(transaction=False)
            for tag in live:
                scores.zscore(self._index_key, tag)
            present = [tag for tag, score in zip(live, scores.execute()) if score is not None]
            gone.update(set(live) - set(present))
            if present:
                now = time.time()
                self._client.zadd(self._index_key, dict.fromkeys(present, now), xx=True)
            live = present
        if gone:
            with self._lock:
                for tag in gone:
                    self._held.pop(tag, None)
        return len(live)

    def _loop(self) -> None:
        import redis

        failing = False
        while not self._stop.wait(self.interval_s):
            try:
                self.renew()
                failing = False
            except redis.RedisError as exc:
                if not failing:
                    log.warning("cannot renew message leases (redelivery may duplicate work): %s", exc)
                failing = True

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=self.interval_s + 5)
        self._client.close()


class CleanupScheduler:
    """Sends the clean-up once per ``interval_s`` among all workers (module docstring)."""

    def __init__(self, redis_url: str, interval_s: float, send: Callable[[], object], owner: str,
                 clock: Callable[[], float] = time.time):
        self._client = _redis(redis_url)
        self.interval_s = interval_s
        self._send = send
        self._owner = owner
        self._clock = clock
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="tailor-cleanup-scheduler", daemon=True)

    def start(self) -> CleanupScheduler:
        self._thread.start()
        return self

    def tick(self) -> bool:
        """Claim the current slot; send the clean-up if this worker won it. True when sent."""
        slot = int(self._clock() // self.interval_s)
        won = self._client.set(f"{CLEANUP_SLOT_KEY}:{slot}", self._owner, nx=True,
                               px=max(1000, int(self.interval_s * 2000)))
        if not won:
            return False
        self._send()
        log.info("clean-up of slot %d sent", slot)
        return True

    def _loop(self) -> None:
        failing = False
        while not self._stop.is_set():
            try:
                self.tick()
                failing = False
            except Exception as exc:  # Redis or the broker down: try at the next slot
                if not failing:
                    log.warning("cannot schedule the clean-up: %s", exc)
                failing = True
            now = self._clock()
            next_slot = (int(now // self.interval_s) + 1) * self.interval_s
            self._stop.wait(max(0.05, next_slot - now))

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=10)
        self._client.close()
