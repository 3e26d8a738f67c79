"""A tensor-parallel engine behind the service: a worker killed for real (SIGKILL) fails the
request in flight with a clear error, takes the service to not-ready, and the group comes back."""

from __future__ import annotations

import asyncio
import os
import signal
import time

from inference.llm import LLM
from inference.service.core import InferenceCore
from inference.service.events import GenerationEnded, GenerationFailed, TextDelta
from inference.service.protocol import GenerateRequest


async def _wait_for(predicate, timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return True
        await asyncio.sleep(0.02)
    return predicate()


def _request(max_tokens: int) -> GenerateRequest:
    return GenerateRequest(messages=[{"role": "user", "content": "count to a thousand"}], max_tokens=max_tokens,
                           temperature=0.0)


async def test_a_killed_worker_fails_the_request_in_flight_and_the_group_restarts(tiny_checkpoint, caplog):
    core = InferenceCore(LLM(str(tiny_checkpoint), page_tokens=4, pool_bytes=2 << 20, tensor_parallel_size=2))
    try:
        assert core.ready()
        before = (await core.generate(_request(6))).text
        stream = await core.start(_request(1500))
        async for event in stream:  # generation is under way
            if isinstance(event, TextDelta):
                break
        worker = core.engine.workers.processes[0]
        os.kill(worker.pid, signal.SIGKILL)
        assert await _wait_for(lambda: not core.ready(), 10), "the service stayed ready with a dead worker"
        events = [e async for e in _bounded(stream, 60)]
        assert isinstance(events[-1], GenerationFailed), events[-1]
        assert f"tensor-parallel worker rank 1 (pid {worker.pid}) exited with code -9" in events[-1].message
        assert await _wait_for(core.ready, 120), "the group did not come back"
        assert any("tensor-parallel worker rank 1" in r.getMessage() and "not ready" in r.getMessage()
                   for r in caplog.records), "no log line about the dead worker"
        assert core.supervisor.restarts == 1
        assert core.engine.workers.processes[0].pid != worker.pid
        after = await core.generate(_request(6))  # the new group serves, with the same answer
        assert isinstance(after, GenerationEnded) and after.text == before
    finally:
        core.close()


async def _bounded(stream, timeout_s: float):
    """The rest of ``stream``; fails the test if it hangs."""
    while True:
        try:
            event = await asyncio.wait_for(anext(stream), timeout_s)
        except StopAsyncIteration:
            return
        yield event


def test_the_supervisor_aborts_the_data_group_before_it_asks_for_a_restart():
    """On NCCL the engine thread may wait on a collective with the dead worker, and the restart
    runs on that thread: the supervisor aborts the group from its own thread first."""
    from inference.service.worker_supervisor import WorkerSupervisor

    calls = []

    class Engine:
        def __init__(self):
            self.failures = ["tensor-parallel worker rank 1 (pid 1) exited with code -9"]

        def tensor_parallel_failure(self):
            return self.failures[0] if self.failures else None

        def abort_tensor_parallel(self):
            calls.append("abort")

        def restart_workers(self):
            calls.append("restart")
            self.failures.clear()

    class Loop:
        engine = Engine()

        def call(self, fn, timeout):
            assert calls == ["abort"], "the restart was asked for before the abort"
            return fn(self.engine)

    supervisor = WorkerSupervisor(Loop(), interval_s=0.01)
    try:
        deadline = time.monotonic() + 5
        while supervisor.restarts == 0 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert calls == ["abort", "restart"] and supervisor.restarts == 1
    finally:
        supervisor.stop()
