"""The engine: one ``step()`` is schedule, run the model, sample, post-process.

``LLMEngine`` is single-threaded and does no I/O in ``step``. Requests are validated by
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
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import torch

from inference.adapters.lora_batch import LoraBatch, chunk_order
from inference.adapters.manager import AdapterManager
from inference.adapters.object_store import LocalFolderStore, ObjectStore
from inference.adapters.registry import UnknownAdapterError
from inference.adapters.staging import StagedAdapters
from inference.bundled_model import BUNDLED_MODEL_NAME, prepare_bundled_model
from inference.engine_config import EngineConfig
from inference.model import ForwardBatch, LlamaModel
from inference.model_config import ModelConfig
from inference.page_pool import PageGeometry, PagePool
from inference.request import FinishReason, Request, RequestOutput, RequestState, TokenLogprob
from inference.sampling import SamplingParams, sample
from inference.scheduler import Scheduler, SchedulerConfig, SchedulerOutput
from inference.tokenizer import Tokenizer
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
        self.device = torch.device(self.config.device)
        if self.device.type == "cuda" and not torch.cuda.is_available():
            raise ValueError("device 'cuda' requested but CUDA is not available")
        self.dtype = self.config.torch_dtype
        self.tokenizer = Tokenizer(self.checkpoint_dir)
        weights = load_weights(self.checkpoint_dir, self.model_config, self.device, self.dtype)
        self.model = LlamaModel(self.model_config, weights, self.device, self.dtype)
        del weights
        self.max_model_len = self.config.max_model_len or self.model_config.max_position_embeddings
        geometry = PageGeometry.for_model(self.model_config, self.config.page_tokens, self.dtype)
        self.pool = PagePool.with_bytes(geometry, self._pool_bytes(), self.device, self.dtype)
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
        )
        # the gathered (CPU) LoRA path's copies of grouped adapters, kept from step to step
        self.staged_adapters = StagedAdapters(self.pool)
        self.scheduler = Scheduler(
            SchedulerConfig(self.config.max_num_seqs, self.config.max_num_batched_tokens), self.pool, self.adapters
        )
        eos = set(self.model_config.eos_token_ids)
        if self.tokenizer.eos_token_id is not None:
            eos.add(self.tokenizer.eos_token_id)
        self.eos_token_ids = frozenset(eos)
        self.stats = EngineStats()
        self.step_observers: list = []  # callables (batch_size: requests, num_tokens: tokens) after each step
        self.last_step_ran = False
        self._requests: dict[str, Request] = {}
        self._ids = itertools.count()
        self._seed_source = torch.Generator().manual_seed(int(time.time_ns()) & 0x7FFFFFFF)

    def _pool_bytes(self) -> int:
        if self.config.pool_bytes is not None:
            return self.config.pool_bytes
        if self.device.type == "cuda":
            free, _total = torch.cuda.mem_get_info(self.device)
            return int(free * self.config.pool_fraction)
        return self.config.cpu_pool_bytes

    # ------------------------------------------------------------------ requests
    def make_request(
        self,
        prompt: str | list[int],
        params: SamplingParams,
        request_id: str | None = None,
        adapter_id: str | None = None,
    ) -> Request:
        """Validate and tokenize; raise ValueError naming every problem. Mutates no engine state."""
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
        return self.request_from_ids(token_ids, params, request_id, adapter_id)

    def request_from_ids(
        self, token_ids: list[int], params: SamplingParams, request_id: str | None, adapter_id: str | None
    ) -> Request:
        problems = []
        vocab = self.model_config.vocab_size
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
        if problems:
            raise ValueError("; ".join(problems))
        request = Request(
            request_id=request_id or f"req-{next(self._ids)}",
            prompt_token_ids=list(token_ids),
            params=params,
            adapter_id=adapter_id,
            adapter=ref,
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
        return self._output(request, [], [])

    def fail_all(self, message: str) -> list[RequestOutput]:
        """Finish every live request with an error (used when a step raised); frees all pages."""
        outputs = []
        for request in list(self._requests.values()):
            request.error = message
            self._finish(request, FinishReason.ERROR)
            outputs.append(self._output(request, [], []))
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
        plan = self.scheduler.schedule()
        self.stats.preemptions = self.scheduler.num_preemptions
        self.last_step_ran = bool(plan.chunks)
        outputs: list[RequestOutput] = []
        for request in plan.failed:
            request.error = self.adapters.failure(request.adapter) or "adapter could not be loaded"
            self._finish(request, FinishReason.ERROR)
            outputs.append(self._output(request, [], []))
        if not plan.chunks:
            self._prefetch()
            return outputs
        self._order_chunks(plan)
        batch, sampling_chunks = self._build_batch(plan)
        lora = self._lora_batch(plan)
        logits = self.model.forward(batch, self.pool, lora)
        for chunk in plan.chunks:
            chunk.request.num_computed_tokens += chunk.num_tokens
        prompt_tokens = sum(
            max(0, min(c.start + c.num_tokens, len(c.request.prompt_token_ids)) - c.start) for c in plan.chunks
        )
        self.stats.steps += 1
        self.stats.prompt_tokens += prompt_tokens
        self.stats.last_batch_size = len(plan.chunks)
        self.stats.last_step_tokens = plan.num_tokens
        self.stats.batch_size_sum += len(plan.chunks)
        for observer in self.step_observers:
            observer(len(plan.chunks), plan.num_tokens)
        if sampling_chunks:
            requests = [c.request for c in sampling_chunks]
            result = sample(logits, [r.params for r in requests], [r.generator for r in requests])
            now = time.monotonic()
            for i, request in enumerate(requests):
                top = result.top_logprobs[i] if result.top_logprobs else None
                outputs.append(self._append_token(request, result.token_ids[i], result.logprobs[i], top, now))
            self.stats.generation_tokens += len(requests)
        self._prefetch()
        return outputs

    def _order_chunks(self, plan: SchedulerOutput) -> None:
        """Rows of one adapter next to each other, and adapters the CPU LoRA path computes together
        in one run (``lora_batch.chunk_order``)."""
        rows: Counter[str] = Counter()
        for chunk in plan.chunks:
            if chunk.request.adapter is not None:
                rows[chunk.request.adapter.uid] += chunk.num_tokens

        def key(chunk) -> tuple:
            ref = chunk.request.adapter
            if ref is None:
                return chunk_order(None, 0)
            adapter = self.adapters.resident(ref.uid)
            return chunk_order(adapter, rows[ref.uid], self.staged_adapters.position(adapter))

        plan.chunks.sort(key=key)

    def _lora_batch(self, plan: SchedulerOutput) -> LoraBatch | None:
        """Slots for the distinct adapters of this step, or None when no row has an adapter."""
        slot_of: dict[str, int] = {}
        slots = []
        chunk_slots = []
        for chunk in plan.chunks:
            ref = chunk.request.adapter
            if ref is None:
                chunk_slots.append(-1)
                continue
            if ref.uid not in slot_of:
                resident = self.adapters.resident(ref.uid)
                if resident.ready_event is not None:  # paged in on the side stream
                    torch.cuda.current_stream(self.device).wait_event(resident.ready_event)
                    resident.ready_event = None
                slot_of[ref.uid] = len(slots)
                slots.append(resident)
            chunk_slots.append(slot_of[ref.uid])
        if not slots:
            return None
        return LoraBatch(self.pool, slots, chunk_slots, [c.num_tokens for c in plan.chunks], self.config.use_triton,
                         staging=self.staged_adapters)

    def _prefetch(self) -> None:
        """Start fetches and page-ins for the adapters of the requests next in line."""
        refs = []
        for request in itertools.islice(self.scheduler.waiting, self.config.max_num_seqs):
            if request.adapter is not None:
                refs.append(request.adapter)
        if refs:
            reserve = int(self.pool.num_pages * self.config.prefetch_reserve_fraction) + len(self.scheduler.running)
            self.adapters.prefetch(refs, reserve)

    def _build_batch(self, plan: SchedulerOutput) -> tuple[ForwardBatch, list]:
        page_tokens = self.pool.geometry.page_tokens
        ids: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        seq_lens: list[int] = []
        starts = [0]
        logits_rows: list[int] = []
        sampling_chunks = []
        max_pages = max(len(c.request.kv_pages) for c in plan.chunks)
        table = torch.zeros((len(plan.chunks), max_pages), dtype=torch.int32)
        for row, chunk in enumerate(plan.chunks):
            request = chunk.request
            end = chunk.start + chunk.num_tokens
            ids.extend(request.token_at(chunk.start, end))
            pages = request.kv_pages
            for pos in range(chunk.start, end):
                positions.append(pos)
                slots.append(pages[pos // page_tokens] * page_tokens + pos % page_tokens)
            table[row, : len(pages)] = torch.tensor(pages, dtype=torch.int32)
            seq_lens.append(end)
            starts.append(starts[-1] + chunk.num_tokens)
            if chunk.samples:
                logits_rows.append(starts[-1] - 1)
                sampling_chunks.append(chunk)
        device = self.device
        batch = ForwardBatch(
            input_ids=torch.tensor(ids, dtype=torch.long).to(device, non_blocking=True),
            positions=torch.tensor(positions, dtype=torch.long).to(device, non_blocking=True),
            slot_mapping=torch.tensor(slots, dtype=torch.long).to(device, non_blocking=True),
            page_table=table.to(device, non_blocking=True),
            seq_lens=torch.tensor(seq_lens, dtype=torch.int32).to(device, non_blocking=True),
            query_start_loc=torch.tensor(starts, dtype=torch.int32).to(device, non_blocking=True),
            logits_indices=torch.tensor(logits_rows, dtype=torch.long).to(device, non_blocking=True),
            max_q_len=max(c.num_tokens for c in plan.chunks),
        )
        return batch, sampling_chunks

    # ------------------------------------------------------------------ post-processing
    def _append_token(
        self,
        request: Request,
        token_id: int,
        logprob: float | None,
        top: list[tuple[int, float]] | None,
        now: float,
    ) -> RequestOutput:
        params = request.params
        request.output_token_ids.append(token_id)
        request.output_logprobs.append(logprob)
        request.output_top_logprobs.append(top)
        if request.first_token_time is None:
            request.first_token_time = now
        finish: FinishReason | None = None
        is_stop_token = token_id in params.stop_token_ids or (not params.ignore_eos and token_id in self.eos_token_ids)
        if is_stop_token:
            finish = FinishReason.STOP
        elif len(request.output_token_ids) >= params.max_tokens:
            finish = FinishReason.LENGTH
        self._detokenize(request, upto=len(request.output_token_ids) - (1 if is_stop_token else 0), final=finish is not None)
        if params.stop:
            search_from = max(0, request.emitted_text_len - max(len(s) for s in params.stop))
            hits = [i for s in params.stop if (i := request.text.find(s, search_from)) >= 0]
            if hits:
                request.text = request.text[: min(hits)]
                finish = FinishReason.STOP
        if finish is not None:
            self._finish(request, finish)
        return self._output(request, [token_id], [logprob])

    def _detokenize(self, request: Request, upto: int, final: bool) -> None:
        """Append the text of ``output_token_ids[read_offset:upto]`` to ``request.text``."""
        ids = request.output_token_ids
        window = ids[request.prefix_offset : upto]
        read = request.read_offset - request.prefix_offset
        if len(window) <= read:
            return
        delta = self.tokenizer.decode_window(window, read, request.params.skip_special_tokens, final)
        if delta:
            request.text += delta
            request.prefix_offset, request.read_offset = request.read_offset, upto

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

    def _output(self, request: Request, new_ids: list[int], new_logprobs: list) -> RequestOutput:
        text = request.text
        if not request.finished:
            # hold back a partial UTF-8 character and any tail that may still grow into a stop string
            visible = len(text)
            if text.endswith("\ufffd"):
                visible = len(text.rstrip("\ufffd"))
            if request.params.stop:
                visible = min(visible, len(text) - (max(len(s) for s in request.params.stop) - 1))
            visible = max(visible, request.emitted_text_len)
            text = text[:visible]
        delta = text[request.emitted_text_len :]
        request.emitted_text_len = len(text)
        logprobs = None
        if request.params.logprobs is not None:
            logprobs = [
                TokenLogprob(t, lp if lp is not None else float("nan"), tuple(top or ()))
                for t, lp, top in zip(request.output_token_ids, request.output_logprobs, request.output_top_logprobs)
            ]
        return RequestOutput(
            request_id=request.request_id,
            prompt_token_ids=request.prompt_token_ids,
            text=text,
            token_ids=list(request.output_token_ids),
            delta_text=delta,
            new_token_ids=new_ids,
            finished=request.finished,
            finish_reason=request.finish_reason,
            logprobs=logprobs,
            error=request.error,
            adapter_id=request.adapter_id,
            num_preemptions=request.num_preemptions,
        )
