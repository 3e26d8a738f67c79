"""An inference backend for api tests that records what reaches the model.

``RecordingInference`` wraps a real ``InferenceCore`` and passes everything through. It keeps:

* ``requests``: every ``GenerateRequest`` the api handed to ``start`` (system prompt, messages,
  adapter spec, sampling options), in order;
* ``prompts``: for every request the engine actually accepted, the exact prompt token ids the
  core rendered (system prompt + history + message, with the chat template) and the engine-level
  adapter id (the platform's adapter id, or None for the base model), and (not compared) the
  tenant the engine schedules it as, with the weight and first-token SLO the engine request got.

Use it with ``create_app(settings, inference=RecordingInference(core), platform=platform)``.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field

from inference.service.protocol import GenerateRequest


@dataclass(frozen=True)
class EnginePrompt:
    token_ids: tuple[int, ...]
    adapter_id: str | None
    tenant: str | None = field(default=None, compare=False)
    tenant_weight: float = field(default=1.0, compare=False)
    ttft_slo_s: float | None = field(default=None, compare=False)


class RecordingInference:
    def __init__(self, core):
        self.core = core
        self.requests: list[GenerateRequest] = []
        self.prompts: list[EnginePrompt] = []
        self._lock = threading.Lock()
        engine = core.engine
        submit = engine.request_from_ids

        def recording_request_from_ids(token_ids, params, request_id, adapter_id, tenant=None, tenant_weight=1.0,
                                       ttft_slo_s=None):
            # refused prompts raise: not recorded
            request = submit(token_ids, params, request_id, adapter_id, tenant, tenant_weight, ttft_slo_s)
            with self._lock:
                self.prompts.append(EnginePrompt(tuple(token_ids), adapter_id, request.tenant, request.tenant_weight,
                                                 request.ttft_slo_s))
            return request

        engine.request_from_ids = recording_request_from_ids  # this engine instance only

    def mark(self) -> tuple[int, int]:
        """Where the records end now: pass to ``since`` to get what came after."""
        with self._lock:
            return len(self.requests), len(self.prompts)

    def since(self, mark: tuple[int, int]) -> tuple[list[GenerateRequest], list[EnginePrompt]]:
        with self._lock:
            return self.requests[mark[0]:], self.prompts[mark[1]:]

    async def start(self, req: GenerateRequest):
        with self._lock:
            self.requests.append(req.model_copy(deep=True))
        return await self.core.start(req)

    def __getattr__(self, name):  # everything else (prefetch, drop_adapter, is_ready, aclose...) as is
        return getattr(self.core, name)
