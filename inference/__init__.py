"""Tailor's inference engine: a Llama-family model on a unified page pool.

This package knows nothing of HTTP or databases; services wrap it.
"""

from inference.engine_config import EngineConfig
from inference.llm import LLM, GenerationError
from inference.request import FinishReason, RequestOutput
from inference.sampling import SamplingParams

__all__ = ["LLM", "EngineConfig", "FinishReason", "GenerationError", "RequestOutput", "SamplingParams"]
