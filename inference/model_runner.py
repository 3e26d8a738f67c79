"""The model runner: a scheduled step in, logits out.

It orders the step's chunks the way the LoRA backend computes them fastest, builds the step's
device tensors (:class:`~inference.forward_batch.ForwardBatch`) and its LoRA mapping from the
requests' adapter references, and runs the model. It knows nothing of sampling or outputs.
"""

from __future__ import annotations

from collections import Counter
from typing import Protocol

import torch

from inference.adapters.manager import AdapterManager
from inference.backends import Backend, StepLora
from inference.device import wait_until_ready
from inference.forward_batch import ForwardBatch
from inference.lora_mapping import LoraMapping
from inference.model import LlamaModel
from inference.page_pool import PagePool
from inference.scheduler import ScheduledChunk, SchedulerOutput


class StepSink(Protocol):
    """Receives each step before rank 0 runs it (``inference.tensor_parallel.group``)."""

    def send_step(self, batch: ForwardBatch, mapping: LoraMapping | None) -> None: ...


class ModelRunner:
    """Runs one step's forward pass (engine thread only)."""

    def __init__(self, model: LlamaModel, pool: PagePool, adapters: AdapterManager, backend: Backend,
                 workers: "StepSink | None" = None):
        """``workers``: under tensor parallelism, the group that receives each step's batch and
        LoRA mapping before this process runs rank 0's share of it."""
        self.workers = workers
        self.model = model
        self.pool = pool
        self.adapters = adapters
        self.backend = backend
        self.device = pool.tensor.device

    def run(self, plan: SchedulerOutput) -> tuple[torch.Tensor, list[ScheduledChunk]]:
        """Forward pass of ``plan`` (reorders ``plan.chunks``). Returns fp32 logits [S, vocab] and
        the S chunks they belong to (the chunks that end in a token to sample), in row order."""
        self.order_chunks(plan)
        host_batch, sampling_chunks = self.build_host_batch(plan)
        mapping = self.lora_mapping(plan)
        if self.workers is not None:  # ranks 1..N-1 get the step before rank 0 runs its share
            self.workers.send_step(host_batch, mapping)
        return self.model.forward(host_batch.to(self.device), self.pool, self.prepare_lora(mapping)), sampling_chunks

    def order_chunks(self, plan: SchedulerOutput) -> None:
        """Each adapter's rows adjacent, in the order the LoRA backend computes fastest."""
        rows: Counter[str] = Counter()
        for chunk in plan.chunks:
            if chunk.request.adapter is not None:
                rows[chunk.request.adapter.uid] += chunk.num_tokens
        key = self.backend.lora.chunk_key

        def order(chunk: ScheduledChunk) -> tuple:
            ref = chunk.request.adapter
            if ref is None:
                return key(None, 0)
            return key(self.adapters.resident(ref.uid), rows[ref.uid])

        plan.chunks.sort(key=order)

    def prepare_lora(self, mapping: LoraMapping | None) -> StepLora | None:
        """The step's LoRA mapping (a slot per distinct adapter version) prepared by the backend,
        or None when no row has an adapter."""
        return None if mapping is None else self.backend.lora.prepare(mapping)

    def lora_mapping(self, plan: SchedulerOutput) -> LoraMapping | None:
        """The step's LoRA mapping, or None when no row has an adapter."""
        slot_of: dict[str, int] = {}
        slots = []
        chunk_slots = []
        for chunk in plan.chunks:
            ref = chunk.request.adapter  # the version acquired when the request was added
            if ref is None:
                chunk_slots.append(-1)
                continue
            if ref.uid not in slot_of:
                resident = self.adapters.resident(ref.uid)
                wait_until_ready(resident.ready_event, self.device)  # its page-in may be in flight
                resident.ready_event = None
                slot_of[ref.uid] = len(slots)
                slots.append(resident)
            chunk_slots.append(slot_of[ref.uid])
        if not slots:
            return None
        return LoraMapping.build(self.pool, slots, chunk_slots, [c.num_tokens for c in plan.chunks])

    def build_batch(self, plan: SchedulerOutput) -> tuple[ForwardBatch, list[ScheduledChunk]]:
        """The step's device tensors, and the chunks whose last row is sampled."""
        batch, sampling_chunks = self.build_host_batch(plan)
        return batch.to(self.device), sampling_chunks

    def build_host_batch(self, plan: SchedulerOutput) -> tuple[ForwardBatch, list[ScheduledChunk]]:
        """The step's tensors in host memory, and the chunks whose last row is sampled."""
        page_tokens = self.pool.geometry.page_tokens
        ids: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        seq_lens: list[int] = []
        starts = [0]
        logits_rows: list[int] = []
        sampling_chunks = []
        table = torch.zeros((len(plan.chunks), max(len(c.request.kv_pages) for c in plan.chunks)), dtype=torch.int32)
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
        batch = ForwardBatch(
            input_ids=torch.tensor(ids, dtype=torch.long),
            positions=torch.tensor(positions, dtype=torch.long),
            slot_mapping=torch.tensor(slots, dtype=torch.long),
            page_table=table,
            seq_lens=torch.tensor(seq_lens, dtype=torch.int32),
            query_start_loc=torch.tensor(starts, dtype=torch.int32),
            logits_indices=torch.tensor(logits_rows, dtype=torch.long),
            max_q_len=max(c.num_tokens for c in plan.chunks),
        )
        return batch, sampling_chunks
