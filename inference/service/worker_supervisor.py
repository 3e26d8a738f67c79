"""Supervision of a tensor-parallel engine's worker processes, for the inference service.

A thread checks the group every ``interval_s``. When a worker has exited it logs one clear line,
aborts the driver's data group from this thread (``LLMEngine.abort_tensor_parallel``: on NCCL the
engine thread may be waiting on a collective that cannot complete, and would hold the restart
until the NCCL timeout), and asks the engine thread to restart the group (``LLMEngine.restart_workers``): the requests in
flight fail with the worker's failure as their error (the engine's next step meets the dead
worker and fails them; the restart waits for that), and new ones run on the new group. While a
worker is dead and until the new group is up, :meth:`WorkerSupervisor.healthy` is False, which
the service reports as not ready.
"""

from __future__ import annotations

import logging
import threading

from inference.engine_loop import EngineLoop

log = logging.getLogger(__name__)


class WorkerSupervisor:
    """Watches ``loop.engine``'s tensor-parallel group and restarts it when a worker dies."""

    def __init__(self, loop: EngineLoop, interval_s: float = 0.2, restart_timeout_s: float = 600.0):
        self.loop = loop
        self.interval_s = interval_s
        self.restart_timeout_s = restart_timeout_s
        self.restarts = 0
        self._restarting = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="tailor-tp-supervisor", daemon=True)
        self._thread.start()

    def healthy(self) -> bool:
        """Every worker runs and no restart is under way."""
        return not self._restarting.is_set() and self.loop.engine.tensor_parallel_failure() is None

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            failure = self.loop.engine.tensor_parallel_failure()
            if failure is None:
                continue
            self._restarting.set()
            log.error("%s: the inference engine is not ready; restarting the tensor-parallel group", failure)
            try:
                self.loop.engine.abort_tensor_parallel()
            except Exception as exc:  # best effort: the collective's timeout still ends the step
                log.warning("aborting the tensor-parallel data group failed: %s", exc)
            try:
                self.loop.call(lambda engine: engine.restart_workers(), self.restart_timeout_s)
                self.restarts += 1
                log.info("the tensor-parallel group was restarted; the inference engine is ready")
            except Exception as exc:
                if self._stop.is_set():
                    return
                log.warning("restarting the tensor-parallel group failed (%s); retrying", exc)
            finally:
                self._restarting.clear()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)
