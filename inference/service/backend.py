"""What the api needs from inference, whichever way it runs: ``InferenceCore`` in-process (the
embedded default) or ``RemoteInference`` over HTTP (the inference service). Both satisfy
:class:`InferenceBackend`; the api holds one and never asks which.
"""

from __future__ import annotations

from typing import Protocol

from inference.service.events import GenerationEnded, GenerationEvent
from inference.service.protocol import AdapterSpec, GenerateRequest


class GenerationEvents(Protocol):
    """The typed events of one generation. ``aclose()`` before the last event (also before
    iterating at all) aborts the generation; closing twice is harmless."""

    def __aiter__(self) -> GenerationEvents: ...

    async def __anext__(self) -> GenerationEvent: ...

    async def aclose(self) -> None: ...


class InferenceBackend(Protocol):
    async def start(self, req: GenerateRequest) -> GenerationEvents:
        """Submit ``req`` (InferenceError 422/429/503 before the first event)."""
        ...

    async def generate(self, req: GenerateRequest) -> GenerationEnded:
        """Run ``req`` to its end (InferenceError 503 if it failed)."""
        ...

    async def prefetch(self, spec: AdapterSpec) -> str:
        """Load an adapter ahead of use; the tier it reached (``device`` or ``host``)."""
        ...

    async def drop_adapter(self, adapter_id: str, timeout: float | None = 60.0) -> bool:
        """Forget an adapter once its in-flight requests finish; False when it was not loaded."""
        ...

    async def is_ready(self) -> bool: ...

    async def aclose(self) -> None: ...
