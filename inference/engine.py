"""The engine: a request's lifecycle, and one ``step()``: schedule, run the model, sample,
post-process.

``LLMEngine`` owns the page pool, the adapter tiers and the scheduler, and delegates the step's
forward pass to the :class:`~inference.model_runner.ModelRunner` and the sampled tokens to the
:class:`~inference.output_processor.OutputProcessor`. The device-specific work lives in the
backend it picks once at start-up (:func:`inference.backends.select_backend`).

It is single-threaded and does no I/O in ``step``. Requests are validated by
:meth:`LLMEngine.make_request` (safe to call from any thread, mutates nothing) before they are
queued, so a bad request is refused with a ValueError and never reaches the loop.
"""

from __future__ import annotations

import itertools
import logging
import shutil
import tempfile
import time
import weakref
from dataclasses import dataclass
from pathlib import Path

import torch

from inference.adapters.manager import AdapterManager
from inference.adapters.object_store import LocalFolderStore, ObjectStore
from inference.adapters.registry import UnknownAdapterError
from inference.backends import select_backend
from inference.bundled_model import BUNDLED_MODEL_NAME, prepare_bundled_model
from inference.device import bind_thread, free_memory_bytes, require_available
from inference.engine_config import EngineConfig
from inference.fairness import admission_order, check_tenant
from inference.model import LlamaModel
from inference.model_config import ModelConfig
from inference.model_runner import ModelRunner
from inference.output_processor import OutputProcessor
from inference.page_pool import PageGeometry, PagePool
from inference.prefix_cache import PrefixCache
from inference.request import FinishReason, Request, RequestOutput, RequestState
from inference.sampling import SamplingParams, sample
from inference.scheduler import Scheduler, SchedulerConfig
from inference.slo import FirstTokenDeadlines, check_ttft_slo
from inference.step_budget import StepTokenBudget
from inference.structured.grammar import StructuredGrammars
from inference.tokenizer import Tokenizer
from inference.tensor_parallel.driver import TensorParallelDriver
from inference.tensor_parallel.group import WorkerGroup
from inference.tensor_parallel.partition import TensorParallelLayout
from inference.weights import load_weights

log = logging.getLogger(__name__)

BUNDLED_MODELS = (BUNDLED_MODEL_NAME,)


def resolve_model(model: str | Path) -> Path:
    """A checkpoint directory for a bundled model name or a path; ValueError if neither."""
    if str(model) in BUNDLED_MODELS:
        return prepare_bundled_model().path
    path = Path(model).expanduser()
    if path.is_dir():
        return path
    raise ValueError(
        f"unknown model {str(model)!r}: not a bundled model name ({', '.join(BUNDLED_MODELS)}) "
        "and not a checkpoint directory"
    )


@dataclass
class EngineStats:
    """Counters since start (read by metrics; written by the engine thread only)."""

    steps: int = 0
    prompt_tokens: int = 0
    generation_tokens: int = 0
    preemptions: int = 0
    finished_requests: int = 0
    last_batch_size: int = 0
    last_step_tokens: int = 0
    batch_size_sum: int = 0


class LLMEngine:
    """Loads a model, owns the page pool and the scheduler, and advances requests step by step."""

    def __init__(
        self,
        model: str | Path = BUNDLED_MODEL_NAME,
        config: EngineConfig | None = None,
        adapter_store: ObjectStore | None = None,
    ):
        self.config = config or EngineConfig()
        self.checkpoint_dir = resolve_model(model)
        self.model_config = ModelConfig.from_checkpoint(self.checkpoint_dir)
        self.device = require_available(torch.device(self.config.device))
        bind_thread(self.device)  # the start-up warm-up launches kernels from this thread
        self.dtype = self.config.torch_dtype
        self.tokenizer = Tokenizer(self.checkpoint_dir)
        self.backend = select_backend(self.device, self.config.use_triton)
        self.tp: TensorParallelDriver | None = None  # rank 0's side of a tensor-parallel group
        self.max_model_len = self.config.max_model_len or self.model_config.max_position_embeddings
        if self.config.tensor_parallel_size == 1:
            weights = load_weights(self.checkpoint_dir, self.model_config, self.device, self.dtype)
            self.model = LlamaModel(self.model_config, weights, self.device, self.dtype, self.backend)
            del weights
            geometry = PageGeometry.for_model(self.model_config, self.config.page_tokens, self.dtype)
            self.pool = PagePool.with_bytes(geometry, self._pool_bytes(), self.device, self.dtype)
        else:
            self.tp = TensorParallelDriver(self.checkpoint_dir, self.model_config, self.config, self.device,
                                           self.dtype, self.backend, self._pool_bytes())
            self.model, self.pool = self.tp.model, self.tp.pool
        if self.config.warm_up_kernels:
            rank_config = self.model_config if self.parallel is None else self.parallel.rank_config()
            self.backend.warm_up(rank_config, self.pool, self.config.max_lora_rank)
        if adapter_store is None:
            store_dir = self.config.adapter_store_dir
            if store_dir is None:  # a private folder, removed with the engine
                store_dir = tempfile.mkdtemp(prefix="tailor-adapters-")
                weakref.finalize(self, shutil.rmtree, store_dir, True)
            adapter_store = LocalFolderStore(store_dir)
        self.adapters = AdapterManager(
            self.model_config,
            self.pool,
            adapter_store,
            host_budget_bytes=self.config.host_adapter_bytes,
            max_rank=self.config.max_lora_rank,
            fetch_threads=self.config.adapter_fetch_threads,
            parallel=self.parallel,
        )
        if self.workers is not None:
            self.adapters.page_in_listeners.append(self.workers.queue_page_in)
        self.runner = ModelRunner(self.model, self.pool, self.adapters, self.backend, self.workers)
        self.prefix_cache = PrefixCache(self.pool, enabled=self.config.enable_prefix_cache)
        self.scheduler = Scheduler(
            SchedulerConfig(self.config.max_num_seqs, self.config.max_num_batched_tokens,
                            self.config.fairness_input_token_weight, self.config.fairness_output_token_weight),
            self.pool, self.adapters,
            self.prefix_cache,
        )
        eos = set(self.model_config.eos_token_ids)
        if self.tokenizer.eos_token_id is not None:
            eos.add(self.tokenizer.eos_token_id)
        self.eos_token_ids = frozenset(eos)
        self.outputs = OutputProcessor(self.tokenizer, self.eos_token_ids)
        self.grammars = StructuredGrammars(self.checkpoint_dir, self.model_config.vocab_size, self.eos_token_ids)
        self.stats = EngineStats()
        self.deadlines = FirstTokenDeadlines()
        self.step_budget = StepTokenBudget(self.config.max_num_batched_tokens, self.config.step_time_target_s)
        self.step_observers: list = []  # callables (batch_size: requests, num_tokens: tokens) after each step
        self.last_step_ran = False
        self._requests: dict[str, Request] = {}
        self._ids = itertools.count()
        self._seed_source = torch.Generator().manual_seed(int(time.time_ns()) & 0x7FFFFFFF)

    @property
    def parallel(self) -> TensorParallelLayout | None:
        """The tensor-parallel layout (which slice of every matrix rank 0 holds), or None."""
        return None if self.tp is None else self.tp.layout

    @property
    def workers(self) -> WorkerGroup | None:
        """The tensor-parallel worker processes (ranks 1..N-1), or None."""
        return None if self.tp is None else self.tp.workers

    def tensor_parallel_failure(self) -> str | None:
        """Why the tensor-parallel group cannot run a step (a worker exited), or None."""
        return None if self.tp is None else self.tp.failure()

    def abort_tensor_parallel(self) -> None:
        """A worker died (any thread, the supervisor's): abort the driver's data group so a step
        waiting on it ends; that step's outputs are discarded and its requests fail (:meth:`step`)."""
        if self.tp is not None:
            self.tp.abort()

    def restart_workers(self) -> None:
        """Replace a failed tensor-parallel group (engine thread, no live request: a step with a
        dead worker fails its requests with the worker's failure, see :meth:`step`): forget what
        the lost pools held (cached prefixes, resident adapters; host RAM keeps the adapters),
        stop what is left of the old group and start a new one with the same geometry."""
        if self.tp is None:
            raise RuntimeError("the engine has no tensor-parallel group")
        if self._requests:  # the step that meets the failure fails them (and the loop delivers that)
            raise RuntimeError("requests are still in flight; restart once the failed step has failed them")
        self.pool.free(self.prefix_cache.reclaim(self.prefix_cache.num_reclaimable))
        self.adapters.drop_device_copies()
        self.tp.restart(self.adapters.page_in_listeners, self.runner, self.model)

    def close(self) -> None:
        """Stop the adapter fetchers and the tensor-parallel workers (no step may run after)."""
        self.adapters.close()
        if self.tp is not None:
            self.tp.close()

    def _pool_bytes(self) -> int:
        if self.config.pool_bytes is not None:
            return self.config.pool_bytes
        free = free_memory_bytes(self.device)
        if free is not None:
            return int(free * self.config.pool_fraction)
        return self.config.cpu_pool_bytes

    # ------------------------------------------------------------------ requests
    def make_request(
        self,
        prompt: str | list[int],
        params: SamplingParams,
        request_id: str | None = None,
        adapter_id: str | None = None,
        tenant: str | None = None,
        tenant_weight: float = 1.0,
        ttft_slo_s: float | None = None,
    ) -> Request:
        """Validate and tokenize; raise ValueError naming every problem. Mutates no engine state.

        ``tenant`` and ``tenant_weight`` (finite, > 0) set the request's fair share (see
        inference.fairness); ``ttft_slo_s`` (finite, > 0, or None) its first-token deadline in seconds
        from now (see inference.slo)."""
        if not isinstance(params, SamplingParams):
            raise ValueError("params must be a SamplingParams")
        if isinstance(prompt, str):
            if not prompt:
                raise ValueError("prompt is empty")
            token_ids = self.tokenizer.encode(prompt)
        elif isinstance(prompt, (list, tuple)):
            token_ids = list(prompt)
        else:
            raise ValueError(f"prompt must be a string or a list of token ids, got {type(prompt).__name__}")
        return self.request_from_ids(token_ids, params, request_id, adapter_id, tenant, tenant_weight, ttft_slo_s)

    def request_from_ids(
        self,
        token_ids: list[int],
        params: SamplingParams,
        request_id: str | None,
        adapter_id: str | None,
        tenant: str | None = None,
        tenant_weight: float = 1.0,
        ttft_slo_s: float | None = None,
    ) -> Request:
        problems = check_tenant(tenant, tenant_weight) + check_ttft_slo(ttft_slo_s)
        vocab = self.model_config.vocab_size
        problems.extend(params.vocab_problems(vocab))
        if not token_ids:
            problems.append("prompt is empty")
        elif any(not isinstance(t, int) or isinstance(t, bool) or not 0 <= t < vocab for t in token_ids):
            problems.append(f"prompt token ids must be integers in [0, {vocab})")
        total = len(token_ids) + params.max_tokens
        if total > self.max_model_len:
            problems.append(
                f"prompt ({len(token_ids)} tokens) plus max_tokens ({params.max_tokens}) is {total}, "
                f"beyond the context window of {self.max_model_len} tokens"
            )
        pages = self.pool.geometry.pages_for_tokens(total)
        ref = None
        if adapter_id is not None:
            try:
                ref = self.adapters.lookup(adapter_id)
                pages += self.pool.geometry.pages_for_elems(ref.layer_elems)
            except UnknownAdapterError as exc:
                problems.append(str(exc))
        if pages > self.pool.num_pages:
            problems.append(
                f"the request needs up to {pages} pages (KV and adapter) but the pool holds {self.pool.num_pages}"
            )
        if params.structured is not None:  # compiled once per schema, off the engine thread
            problems.extend(self.grammars.problems(params.structured))
        if problems:
            raise ValueError("; ".join(problems))
        request = Request(
            request_id=request_id or f"req-{next(self._ids)}",
            prompt_token_ids=list(token_ids),
            params=params,
            adapter_id=adapter_id,
            adapter=ref,
            tenant=tenant,
            tenant_weight=float(tenant_weight),
            ttft_slo_s=None if ttft_slo_s is None else float(ttft_slo_s),
            grammar=self.grammars.matcher(params.structured) if params.structured is not None else None,
        )
        if not params.greedy:
            seed = params.seed
            if seed is None:
                seed = int(torch.randint(0, 2**62, (1,), generator=self._seed_source))
            request.generator = torch.Generator(device=self.device).manual_seed(seed)
        return request

    def add(self, request: Request) -> None:
        """Queue a validated request (engine thread only)."""
        if request.request_id in self._requests:
            raise ValueError(f"request id {request.request_id!r} is already in use")
        if request.adapter is not None:  # the version resolved when the request was made, exactly
            request.adapter = self.adapters.acquire(request.adapter)
        self._requests[request.request_id] = request
        self.scheduler.add(request)

    def add_request(
        self, prompt: str | list[int], params: SamplingParams, request_id: str | None = None, adapter_id: str | None = None
    ) -> Request:
        request = self.make_request(prompt, params, request_id, adapter_id)
        self.add(request)
        return request

    def abort(self, request_id: str) -> RequestOutput | None:
        """Cancel a request and free its pages now; returns its final output, or None if unknown."""
        request = self._requests.get(request_id)
        if request is None:
            return None
        self._finish(request, FinishReason.ABORT)
        return self.outputs.output(request, [], [])

    def fail_all(self, message: str) -> list[RequestOutput]:
        """Finish every live request with an error (used when a step raised); frees all pages."""
        outputs = []
        for request in list(self._requests.values()):
            request.error = message
            self._finish(request, FinishReason.ERROR)
            outputs.append(self.outputs.output(request, [], []))
        return outputs

    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished()

    @property
    def num_waiting(self) -> int:
        return len(self.scheduler.waiting)

    @property
    def num_running(self) -> int:
        return len(self.scheduler.running)

    # ------------------------------------------------------------------ the step
    def step(self) -> list[RequestOutput]:
        """Schedule, run one forward pass, sample and post-process. Returns outputs of requests
        that produced tokens or finished in this step."""
        started = time.perf_counter()
        outputs = self._refuse_late(time.monotonic())
        # a request alone has nobody to keep waiting: its step is not cut to the target (a long
        # prompt computes in one step instead of many, each paying the step's fixed cost)
        alone = len(self.scheduler.waiting) + len(self.scheduler.running) <= 1
        plan = self.scheduler.schedule(None if alone else self.step_budget.tokens)
        self.stats.preemptions = self.scheduler.num_preemptions
        self.last_step_ran = bool(plan.chunks)
        for request in plan.failed:
            request.error = self.adapters.failure(request.adapter) or "adapter could not be loaded"
            self._finish(request, FinishReason.ERROR)
            outputs.append(self.outputs.output(request, [], []))
        if plan.chunks:
            if self.tp is not None:
                self.tp.check_ready()
            try:
                logits, sampling_chunks = self.runner.run(plan)
                if self.tp is not None:
                    self.tp.check_step(logits)
            except Exception as exc:  # a collective with a worker that died: say so
                if self.tp is not None:
                    self.tp.explain(exc)
                raise
            self.scheduler.computed(plan)
            self._count_step(plan)
            if sampling_chunks:
                outputs.extend(self._sample(logits, [c.request for c in sampling_chunks]))
            seconds = time.perf_counter() - started
            self.deadlines.observe_step(plan.num_tokens, seconds)
            if not alone:
                self.step_budget.observe(plan.num_tokens, seconds, plan.exhausted)
        self._prefetch()
        return outputs

    def _refuse_late(self, now: float) -> list[RequestOutput]:
        """Refuse the waiting requests that can no longer meet their first-token deadline
        (S-LoRA's early abort, inference.slo)."""
        late = self.deadlines.late(self.scheduler.waiting, now)
        if not late:
            return []
        pending = sum(r.num_tokens - r.num_computed_tokens for r in self.scheduler.waiting)
        retry_after = self.deadlines.retry_after(pending)
        outputs = []
        for request in late:
            request.retry_after_s = retry_after
            request.error = (
                f"the first token cannot arrive within the deadline of {request.ttft_slo_s:g} s "
                f"(queued {now - request.arrival_time:.3f} s; {len(self.scheduler.waiting)} requests waiting); "
                f"retry in {retry_after:g} s"
            )
            self.deadlines.on_refused(request)
            self._finish(request, FinishReason.DEADLINE)
            outputs.append(self.outputs.output(request, [], []))
        return outputs

    def _count_step(self, plan) -> None:
        stats = self.stats
        stats.steps += 1
        stats.prompt_tokens += sum(
            max(0, min(c.start + c.num_tokens, len(c.request.prompt_token_ids)) - c.start) for c in plan.chunks
        )
        stats.last_batch_size = len(plan.chunks)
        stats.last_step_tokens = plan.num_tokens
        stats.batch_size_sum += len(plan.chunks)
        for observer in self.step_observers:
            observer(len(plan.chunks), plan.num_tokens)

    def _sample(self, logits: torch.Tensor, requests: list[Request]) -> list[RequestOutput]:
        """Sample a token for each request (row i of ``logits``) and post-process it."""
        result = sample(logits, [r.params for r in requests], [r.generator for r in requests], requests)
        now = time.monotonic()
        outputs = []
        for i, request in enumerate(requests):
            top = result.top_logprobs[i] if result.top_logprobs else None
            token = result.token_ids[i]
            finish = self.outputs.append_token(request, token, result.logprobs[i], top, now)
            if len(request.output_token_ids) == 1:
                self.deadlines.on_first_token(request, now)
            if finish is not None:
                self._finish(request, finish)
            outputs.append(self.outputs.output(request, [token], [result.logprobs[i]]))
        self.stats.generation_tokens += len(requests)
        return outputs

    def _prefetch(self) -> None:
        """Start fetches and page-ins for the adapters of the requests next in line (in the fair
        admission order, so a light tenant's adapter is not stuck behind a heavy tenant's queue)."""
        refs = []
        for request in admission_order(self.scheduler.waiting, self.scheduler.fairness, self.config.max_num_seqs):
            if request.adapter is not None:
                refs.append(request.adapter)
        if refs:
            reserve = int(self.pool.num_pages * self.config.prefetch_reserve_fraction) + len(self.scheduler.running)
            self.adapters.prefetch(refs, reserve)

    def _finish(self, request: Request, reason: FinishReason) -> None:
        if request.finished:
            return
        request.state = RequestState.FINISHED
        request.finish_reason = reason
        request.finish_time = time.monotonic()
        self.scheduler.remove(request)
        self._requests.pop(request.request_id, None)
        if request.adapter is not None:
            self.adapters.release(request.adapter)
        self.stats.finished_requests += 1
