"""``LLM``: the public Python interface (offline generation, chat, streaming)."""

from __future__ import annotations

import threading
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any

from inference.adapters.object_store import ObjectStore
from inference.adapters.registry import AdapterRef
from inference.bundled_model import BUNDLED_MODEL_NAME
from inference.engine import LLMEngine
from inference.engine_config import EngineConfig
from inference.engine_loop import EngineLoop, unregister_adapter
from inference.request import FinishReason, Request, RequestOutput
from inference.sampling import SamplingParams

Messages = list[dict[str, Any]]


class GenerationError(RuntimeError):
    """A request failed inside the engine (the engine itself keeps running)."""


class LLM:
    """A base model served by an engine loop thread.

    >>> llm = LLM(model="smollm2-135m")
    >>> llm.generate(["Once upon a time"], SamplingParams(max_tokens=8, temperature=0.0))[0].text
    """

    def __init__(
        self,
        model: str | Path = BUNDLED_MODEL_NAME,
        *,
        device: str = "cpu",
        dtype: str = "auto",
        adapter_store: ObjectStore | None = None,
        **engine_options: Any,
    ):
        """``adapter_store``: where adapters are fetched from (default: a local folder, see
        ``EngineConfig.adapter_store_dir``); ``engine_options``: further ``EngineConfig`` fields."""
        self.engine = LLMEngine(model, EngineConfig(device=device, dtype=dtype, **engine_options), adapter_store)
        self.tokenizer = self.engine.tokenizer
        self._loop = EngineLoop(self.engine)

    # ------------------------------------------------------------ synchronous
    def generate(
        self,
        prompts: Sequence[str | list[int]] | str,
        params: SamplingParams | Sequence[SamplingParams] | None = None,
        adapters: Sequence[str | None] | None = None,
    ) -> list[RequestOutput]:
        """Generate for every prompt (text or token ids); outputs come back in prompt order.

        ``adapters[i]`` names the registered adapter for prompt i (None: the base model). All
        prompts are validated before any is scheduled: one bad prompt raises ValueError and
        nothing runs.
        """
        if isinstance(prompts, str):
            prompts = [prompts]
        adapter_list = list(adapters) if adapters is not None else [None] * len(prompts)
        if len(adapter_list) != len(prompts):
            raise ValueError(f"got {len(adapter_list)} adapters for {len(prompts)} prompts")
        params_list = self._params_list(params, len(prompts))
        requests = [
            self.engine.make_request(p, sp, adapter_id=a) for p, sp, a in zip(prompts, params_list, adapter_list)
        ]
        return self._run(requests)

    def chat(
        self,
        conversations: Sequence[Messages],
        params: SamplingParams | Sequence[SamplingParams] | None = None,
        adapters: Sequence[str | None] | None = None,
    ) -> list[RequestOutput]:
        """Render each conversation with the model's chat template and generate the reply."""
        token_ids = [self.tokenizer.apply_chat_template(list(c)) for c in conversations]
        return self.generate(token_ids, params, adapters)

    # ------------------------------------------------------------ adapters
    def register_adapter(self, adapter_id: str, path: str | Path, *, new_version: bool = False) -> AdapterRef:
        """Validate a PEFT adapter directory and register it (idempotent for identical weights;
        different weights under the same id need ``new_version=True``). Raises
        AdapterValidationError listing every problem."""
        return self.engine.adapters.register_dir(adapter_id, path, new_version=new_version)

    def unregister_adapter(self, adapter_id: str, timeout: float | None = None) -> None:
        """Refuse new requests for ``adapter_id`` at once, wait until in-flight ones finish, then
        drop it from every tier. Raises TimeoutError (and keeps it registered) on timeout."""
        unregister_adapter(self.engine, self._loop, adapter_id, timeout)

    def _params_list(self, params, count: int) -> list[SamplingParams]:
        if params is None:
            return [SamplingParams()] * count
        if isinstance(params, SamplingParams):
            return [params] * count
        params = list(params)
        if len(params) != count:
            raise ValueError(f"got {len(params)} sampling params for {count} prompts")
        return params

    def _run(self, requests: list[Request]) -> list[RequestOutput]:
        done = threading.Event()
        final: dict[str, RequestOutput] = {}
        lock = threading.Lock()

        def on_output(output: RequestOutput) -> None:
            if output.finished:
                with lock:
                    final[output.request_id] = output
                    if len(final) == len(requests):
                        done.set()

        if not requests:
            return []
        submitted = []
        try:
            for request in requests:
                self._loop.submit(request, on_output)
                submitted.append(request)
            done.wait()
        except BaseException:
            for request in submitted:
                self._loop.abort(request.request_id)
            raise
        outputs = [final[r.request_id] for r in requests]
        errors = [o for o in outputs if o.finish_reason is FinishReason.ERROR]
        if errors:
            raise GenerationError("; ".join(f"{o.request_id}: {o.error}" for o in errors))
        return outputs

    # ------------------------------------------------------------ streaming
    async def stream(
        self,
        prompt: str | list[int],
        params: SamplingParams | None = None,
        *,
        request_id: str | None = None,
        adapter: str | None = None,
    ) -> AsyncIterator[RequestOutput]:
        """Yield outputs as tokens are produced; breaking out of the loop or cancelling the task
        aborts the request."""
        request = self.engine.make_request(prompt, params or SamplingParams(), request_id, adapter)
        async for output in self._loop.stream(request):
            yield output

    def abort(self, request_id: str) -> None:
        self._loop.abort(request_id)

    @property
    def loop(self) -> EngineLoop:
        """The engine loop thread (services submit and stream through it)."""
        return self._loop

    def close(self) -> None:
        """Stop the engine thread (in-flight requests finish with an error)."""
        self._loop.stop()
        self.engine.close()

    def __enter__(self) -> "LLM":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
