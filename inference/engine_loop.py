"""The engine loop thread and the asyncio-friendly streaming interface around ``LLMEngine``.

All engine state is touched by one thread. Other threads (and event loops) talk to it through a
command queue: submit a validated request with a callback, or abort one. The loop survives any
exception raised inside a step: the requests of that step are failed with the error and the loop
goes on serving new ones.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

from inference.device import bind_thread
from inference.engine import LLMEngine
from inference.openmp_workers import release_openmp_workers
from inference.request import Request, RequestOutput

log = logging.getLogger(__name__)

OutputCallback = Callable[[RequestOutput], None]


class QueueFullError(RuntimeError):
    """The waiting queue is at ``max_waiting``; the caller should retry later (HTTP 429)."""


@dataclass
class _Submit:
    request: Request
    callback: OutputCallback


@dataclass
class _Abort:
    request_id: str


@dataclass
class _Call:
    fn: Callable[[LLMEngine], object]
    done: threading.Event
    result: list


class OutputStream:
    """The outputs of one submitted request, in order, ending with the finished one.

    The one place that aborts a request whose reader went away: closing the stream before its
    last output (even before reading any) aborts the request, once; the layers above (``LLM``, the
    inference core, the HTTP responses) only close the stream they hold."""

    def __init__(self, loop: "EngineLoop", request_id: str, outputs: asyncio.Queue):
        self._loop = loop
        self._request_id = request_id
        self._outputs = outputs
        self._finished = False
        self._closed = False

    def __aiter__(self) -> "OutputStream":
        return self

    async def __anext__(self) -> RequestOutput:
        if self._finished or self._closed:
            raise StopAsyncIteration
        output = await self._outputs.get()
        self._finished = output.finished
        return output

    def close(self) -> None:
        """Stop reading; abort the request if its last output has not been read."""
        if self._closed:
            return
        self._closed = True
        if not self._finished:
            self._loop.abort(self._request_id)

    async def aclose(self) -> None:
        self.close()


class EngineLoop:
    """Runs ``engine.step()`` on a daemon thread whenever there is work."""

    def __init__(self, engine: LLMEngine):
        self.engine = engine
        self._commands: queue.SimpleQueue = queue.SimpleQueue()
        self._wakeup = threading.Event()
        self._callbacks: dict[str, OutputCallback] = {}
        self._stopped = threading.Event()
        self._pending = 0
        self._pending_lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, name="tailor-engine", daemon=True)
        self._thread.start()
        # The thread that built the engine ran parallel ops (loading the weights); its idle OpenMP
        # team would make the engine thread's ops pay a wake-up each (inference/openmp_workers.py).
        release_openmp_workers()

    # ------------------------------------------------------------ called from any thread
    def submit(self, request: Request, callback: OutputCallback) -> None:
        """Queue a validated request; ``callback`` runs on the engine thread for every output.

        The calling thread hands its CPU work to the engine, so its idle OpenMP workers are
        released first (see inference/openmp_workers.py)."""
        release_openmp_workers()
        if self._stopped.is_set():
            raise RuntimeError("the engine loop is stopped")
        with self._pending_lock:
            if self._pending + self.engine.num_waiting >= self.engine.config.max_waiting:
                raise QueueFullError(f"the waiting queue is full ({self.engine.config.max_waiting} requests)")
            self._pending += 1
        self._commands.put(_Submit(request, callback))
        self._wakeup.set()

    def abort(self, request_id: str) -> None:
        """Cancel a request; its pages are freed before the next step runs."""
        self._commands.put(_Abort(request_id))
        self._wakeup.set()

    def call(self, fn: Callable[[LLMEngine], object], timeout: float | None = None) -> object:
        """Run ``fn(engine)`` on the engine thread between steps and return its result."""
        done = threading.Event()
        box: list = []
        self._commands.put(_Call(fn, done, box))
        self._wakeup.set()
        if not done.wait(timeout):
            raise TimeoutError("engine call timed out")
        ok, value = box[0]
        if not ok:
            raise value
        return value

    def stop(self) -> None:
        self._stopped.set()
        self._wakeup.set()
        self._thread.join(timeout=10)

    # ------------------------------------------------------------ asyncio streaming
    async def stream(self, request: Request) -> AsyncIterator[RequestOutput]:
        """Yield the request's outputs as they are produced. Closing or cancelling the iterator
        aborts the request, which frees its pages within one step."""
        outputs = self.open_stream(request)
        try:
            async for output in outputs:
                yield output
        finally:
            outputs.close()

    def open_stream(self, request: Request) -> OutputStream:
        """Submit ``request`` now (raising ``QueueFullError`` at once when the queue is full) and
        return the stream of its outputs; closing the stream early aborts the request.
        Call from a running event loop."""
        loop = asyncio.get_running_loop()
        outputs: asyncio.Queue[RequestOutput] = asyncio.Queue()
        self.submit(request, lambda out: loop.call_soon_threadsafe(outputs.put_nowait, out))
        return OutputStream(self, request.request_id, outputs)

    @property
    def alive(self) -> bool:
        """True while the engine thread runs."""
        return self._thread.is_alive() and not self._stopped.is_set()

    # ------------------------------------------------------------ the thread
    def _drain_commands(self) -> None:
        while True:
            try:
                command = self._commands.get_nowait()
            except queue.Empty:
                return
            if isinstance(command, _Submit):
                with self._pending_lock:
                    self._pending -= 1
                try:
                    self.engine.add(command.request)
                    self._callbacks[command.request.request_id] = command.callback
                except Exception as exc:  # duplicate id: tell the submitter, keep going
                    command.request.error = str(exc)
                    self._deliver_error(command, str(exc))
            elif isinstance(command, _Abort):
                output = self.engine.abort(command.request_id)
                if output is not None:
                    self._emit(output)
            elif isinstance(command, _Call):
                try:
                    command.result.append((True, command.fn(self.engine)))
                except Exception as exc:
                    command.result.append((False, exc))
                command.done.set()

    def _deliver_error(self, command: _Submit, message: str) -> None:
        from inference.request import FinishReason

        request = command.request
        try:
            command.callback(
                RequestOutput(request.request_id, request.prompt_token_ids, "", [], "", [], True,
                              FinishReason.ERROR, error=message, adapter_id=request.adapter_id)
            )
        except Exception:
            log.exception("output callback failed")

    def _emit(self, output: RequestOutput) -> None:
        callback = self._callbacks.get(output.request_id)
        if output.finished:
            self._callbacks.pop(output.request_id, None)
        if callback is None:
            return
        try:
            callback(output)
        except Exception:
            log.exception("output callback for %s failed", output.request_id)

    def _run(self) -> None:
        bind_thread(self.engine.device)  # the kernels launch on this thread's current device
        while not self._stopped.is_set():
            self._drain_commands()
            if not self.engine.has_unfinished():
                release_openmp_workers()  # idle: let other threads' ops run at full speed
                self._wakeup.wait(timeout=0.5)
                self._wakeup.clear()
                continue
            try:
                outputs = self.engine.step()
            except Exception as exc:  # a bug or a device error: fail the batch, keep serving
                log.exception("engine step failed")
                outputs = self.engine.fail_all(f"engine step failed: {exc}")
            for output in outputs:
                self._emit(output)
            if not self.engine.last_step_ran:
                # only requests whose adapters are still being fetched: poll, do not spin
                self._wakeup.wait(timeout=0.002)
                self._wakeup.clear()
        for output in self.engine.fail_all("the engine is shutting down"):
            self._emit(output)


def unregister_adapter(engine: LLMEngine, loop: EngineLoop, adapter_id: str, timeout: float | None = None) -> None:
    """Hide ``adapter_id`` from new requests, wait for in-flight ones, then delete its objects from
    the store and drop it from the device and host tiers (on the engine thread). The adapter
    manager owns these steps (``AdapterManager.unregister``)."""
    engine.adapters.unregister(adapter_id, lambda fn: loop.call(lambda _engine: fn()), timeout)
