"""A generation request's state as the engine loop sees it, and the outputs it reports."""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field

import torch

from inference.adapters.registry import AdapterRef
from inference.sampling import SamplingParams
from inference.structured.grammar import GrammarMatcher


class FinishReason(str, enum.Enum):
    STOP = "stop"  # a stop string, a stop token or EOS
    LENGTH = "length"  # max_tokens reached
    ABORT = "abort"  # cancelled by the caller
    ERROR = "error"  # the engine failed this request (the loop goes on)
    DEADLINE = "deadline"  # refused while queued: its first token could no longer meet its deadline


class RequestState(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass
class Request:
    """One request. Mutated only by the engine thread once submitted.

    ``num_computed_tokens`` counts tokens whose K/V are in ``kv_pages``; after a preemption it
    drops to 0 and the prompt plus the tokens generated so far are recomputed.
    """

    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    adapter_id: str | None = None
    # the adapter version, resolved once when the request is made and counted as in use from
    # LLMEngine.add until the request finishes; everything below (scheduler, residency, the
    # step's LoRA mapping) works from this reference, never from adapter_id
    adapter: AdapterRef | None = None
    # who is served: the scheduler orders admission by each tenant's virtual token counter
    # (inference.fairness); None is one tenant of its own. The weight divides what it is charged.
    tenant: str | None = None
    tenant_weight: float = 1.0
    num_charged_prompt_tokens: int = 0  # prompt tokens already charged to the tenant
    # first-token SLO (seconds after arrival_time), None = none; see inference.slo
    ttft_slo_s: float | None = None
    arrival_time: float = field(default_factory=time.monotonic)
    output_token_ids: list[int] = field(default_factory=list)
    output_logprobs: list[float | None] = field(default_factory=list)
    output_top_logprobs: list[list[tuple[int, float]] | None] = field(default_factory=list)
    kv_pages: list[int] = field(default_factory=list)
    num_computed_tokens: int = 0
    state: RequestState = RequestState.WAITING
    finish_reason: FinishReason | None = None
    error: str | None = None
    generator: torch.Generator | None = None
    text: str = ""
    emitted_text_len: int = 0
    prefix_offset: int = 0  # detokenization window: output_token_ids[prefix_offset:] is re-decoded
    read_offset: int = 0  # tokens before this are already in ``text``
    num_preemptions: int = 0
    first_token_time: float | None = None
    finish_time: float | None = None
    retry_after_s: float | None = None  # set when refused for its deadline: when a retry may be served
    # prefix cache (inference.prefix_cache): the hash chain of its full pages known so far, and how
    # many of its leading KV pages are entered in the cache (or were taken from it)
    page_hashes: list[bytes] = field(default_factory=list)
    num_cached_pages: int = 0
    # a structured output's grammar state (params.structured): it has consumed output_token_ids
    grammar: GrammarMatcher | None = None

    @property
    def ttft_deadline(self) -> float | None:
        """Monotonic time by which the first token is due, or None."""
        return None if self.ttft_slo_s is None else self.arrival_time + self.ttft_slo_s

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    def token_at(self, start: int, end: int) -> list[int]:
        """Token ids at positions [start, end) of prompt + output."""
        prompt_len = len(self.prompt_token_ids)
        if end <= prompt_len:
            return self.prompt_token_ids[start:end]
        return (self.prompt_token_ids + self.output_token_ids)[start:end]

    @property
    def finished(self) -> bool:
        return self.state is RequestState.FINISHED


@dataclass(frozen=True)
class TokenLogprob:
    token_id: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()


@dataclass(frozen=True)
class RequestOutput:
    """What a request has produced so far.

    ``text`` and ``token_ids`` are cumulative; ``delta_text`` and ``new_token_ids`` are what this
    step added (the stream). ``text`` never contains a stop string or held-back text that could
    still turn out to be the start of one.
    """

    request_id: str
    prompt_token_ids: list[int]
    text: str
    token_ids: list[int]
    delta_text: str
    new_token_ids: list[int]
    finished: bool
    finish_reason: FinishReason | None
    logprobs: list[TokenLogprob] | None = None
    error: str | None = None
    adapter_id: str | None = None
    num_preemptions: int = 0
    retry_after_s: float | None = None  # with FinishReason.DEADLINE: seconds until a retry may be served
