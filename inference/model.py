"""A Llama-family decoder that reads and writes its KV cache through the unified page pool.

The model is written once; what depends on the device (attention over the pages, the LoRA
computation, the dense projections' form) comes from its :class:`~inference.backends.Backend`.
The forward pass runs on a *flattened* batch: the new tokens of every scheduled sequence are
concatenated (prefill chunks and single decode tokens alike), so one call serves a mixed batch.
RMSNorm, RoPE (default, linear, llama3), grouped-query attention and SwiGLU follow the Hugging Face
Llama implementation's arithmetic (norms and RoPE tables in fp32) so that greedy outputs match it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from inference.backends import Backend, StepLora, select_backend
from inference.forward_batch import ForwardBatch
from inference.model_config import ModelConfig, RopeConfig
from inference.page_pool import PagePool

__all__ = ["ATTENTION_MODULES", "MLP_MODULES", "ForwardBatch", "LlamaModel", "ParallelContext", "rope_inv_freq"]

ATTENTION_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP_MODULES = ("gate_proj", "up_proj", "down_proj")


def rope_inv_freq(rope: RopeConfig, head_dim: int) -> torch.Tensor:
    """Inverse frequencies [head_dim / 2] in fp32, after the configured scaling."""
    inv_freq = 1.0 / (rope.theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
    if rope.rope_type == "linear":
        return inv_freq / rope.factor
    if rope.rope_type == "llama3":
        low_wavelen = rope.original_max_position_embeddings / rope.low_freq_factor
        high_wavelen = rope.original_max_position_embeddings / rope.high_freq_factor
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > low_wavelen, inv_freq / rope.factor, inv_freq)
        smooth = (rope.original_max_position_embeddings / wavelen - rope.low_freq_factor) / (
            rope.high_freq_factor - rope.low_freq_factor
        )
        smoothed = (1 - smooth) * scaled / rope.factor + smooth * scaled
        is_medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
        return torch.where(is_medium, smoothed, scaled)
    return inv_freq


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


@dataclass(frozen=True)
class ParallelContext:
    """This rank's place in a tensor-parallel group: its communicator, the first id of its
    vocabulary range, and the unpadded vocabulary size (logits are cut back to it)."""

    comm: Any
    vocab_start: int
    vocab_size: int


class LlamaModel:
    """Weights plus the forward pass. Not an ``nn.Module``: inference only, no autograd."""

    def __init__(self, config: ModelConfig, weights: dict[str, torch.Tensor], device: torch.device, dtype: torch.dtype,
                 backend: Backend | None = None, parallel: "ParallelContext | None" = None):
        """``config`` and ``weights`` are this rank's (see ``inference.tensor_parallel.partition``)
        when ``parallel`` is given; None runs the whole model in this process."""
        self.config = config
        self.parallel = parallel
        self.backend = backend if backend is not None else select_backend(device)
        self.device = device
        self.dtype = dtype
        self.embed = weights["model.embed_tokens.weight"]
        self.lm_head = self.embed if config.tie_word_embeddings else weights["lm_head.weight"]
        self.final_norm = weights["model.norm.weight"]
        self.layers: list[dict[str, torch.Tensor]] = []
        for i in range(config.num_layers):
            p = f"model.layers.{i}"
            attn = [weights[f"{p}.self_attn.{m}.weight"] for m in ("q_proj", "k_proj", "v_proj")]
            self.layers.append(
                {
                    "input_norm": weights[f"{p}.input_layernorm.weight"],
                    "post_norm": weights[f"{p}.post_attention_layernorm.weight"],
                    "qkv": torch.cat(attn, dim=0),
                    "o": weights[f"{p}.self_attn.o_proj.weight"],
                    "gate_up": torch.cat(
                        [weights[f"{p}.mlp.gate_proj.weight"], weights[f"{p}.mlp.up_proj.weight"]], dim=0
                    ),
                    "down": weights[f"{p}.mlp.down_proj.weight"],
                }
            )
        self.inv_freq = rope_inv_freq(config.rope, config.head_dim).to(device)
        self._linear = self.backend.linear
        self.scale = config.head_dim**-0.5

    def _rms_norm(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.float32:  # one op call instead of six; the same formula as below
            return F.rms_norm(x, (x.shape[-1],), weight, self.config.rms_norm_eps)
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.config.rms_norm_eps)
        return weight * x32.to(self.dtype)

    def _rope(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin: [N, 1, head_dim] in the model dtype for absolute ``positions`` [N]."""
        freqs = positions.float()[:, None] * self.inv_freq[None, :]
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos().to(self.dtype)[:, None, :], emb.sin().to(self.dtype)[:, None, :]

    @torch.inference_mode()
    def forward(self, batch: ForwardBatch, pool: PagePool, lora: StepLora | None = None) -> torch.Tensor | None:
        """Run one step; write the new tokens' K/V into their pages; return fp32 logits [S, vocab]
        (under tensor parallelism on rank 0 only; None on the other ranks)."""
        cfg = self.config
        attention = self.backend.attention
        n = batch.input_ids.shape[0]
        # The backend may run the dense ops on more rows than tokens (padding rows: token 0 at
        # position 0; attention leaves them zero and they write no K/V).
        rows = self.backend.batch_rows(n)
        input_ids = F.pad(batch.input_ids, (0, rows - n)) if rows != n else batch.input_ids
        positions = F.pad(batch.positions, (0, rows - n)) if rows != n else batch.positions
        hidden = self._embed(input_ids)
        cos, sin = self._rope(positions)
        # every layer attends over the same pages: what the backend derives from them, once
        attn_plan = attention.plan(batch, cfg.num_heads, tuple(pool.kv_layer(0).shape))
        for index, layer in enumerate(self.layers):
            x = self._rms_norm(hidden, layer["input_norm"])
            attn = self._attention(index, layer, x, cos, sin, n, batch, pool, lora, attn_plan)
            o = self._linear(attn, layer["o"])
            if lora is not None:
                lora.apply(index, attn[:n], {"o_proj": o[:n]})
            hidden = hidden + self._reduce(o)
            hidden = hidden + self._reduce(self._mlp(index, layer, self._rms_norm(hidden, layer["post_norm"]), n, lora))
        last = self._rms_norm(hidden[batch.logits_indices], self.final_norm)
        logits = self._linear(last, self.lm_head).float().contiguous()
        if self.parallel is None:
            return logits
        gathered = self.parallel.comm.gather_columns(logits)
        return None if gathered is None else gathered[:, : self.parallel.vocab_size].contiguous()

    def _embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        """[rows, hidden]; under tensor parallelism each rank embeds the ids of its vocabulary
        range and one all-reduce sums the ranks' rows."""
        if self.parallel is None:
            return F.embedding(input_ids, self.embed)
        start = self.parallel.vocab_start
        local = input_ids - start
        inside = (local >= 0) & (local < self.embed.shape[0])
        hidden = F.embedding(torch.where(inside, local, 0), self.embed) * inside[:, None].to(self.dtype)
        return self.parallel.comm.all_reduce(hidden.contiguous(), "all_reduce_embed")

    def _reduce(self, partial: torch.Tensor) -> torch.Tensor:
        """A row-parallel layer's output: the sum of the ranks' partial outputs (with their LoRA
        terms, see ``inference.tensor_parallel.partition``); itself without tensor parallelism."""
        if self.parallel is None:
            return partial
        return self.parallel.comm.all_reduce(partial.contiguous(), "all_reduce_layer")

    def _attention(self, index: int, layer: dict, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, n: int,
                   batch: ForwardBatch, pool: PagePool, lora: StepLora | None, plan) -> torch.Tensor:
        """Q/K/V projections (+ LoRA), RoPE, K/V into the pages, attention: [rows, q_size]."""
        cfg = self.config
        q_size, kv_size = cfg.q_size, cfg.kv_size
        qkv = self._linear(x, layer["qkv"])
        if lora is not None:
            lora.apply(index, x[:n], {"q_proj": qkv[:n, :q_size], "k_proj": qkv[:n, q_size : q_size + kv_size],
                                      "v_proj": qkv[:n, q_size + kv_size :]})
        # RoPE on the query and key heads at once (they are adjacent in the fused output).
        rows = x.shape[0]
        qk = qkv[:, : q_size + kv_size].view(rows, cfg.num_heads + cfg.num_kv_heads, cfg.head_dim)
        qk = qk * cos + _rotate_half(qk) * sin
        q, k = qk[:, : cfg.num_heads], qk[:n, cfg.num_heads :]
        v = qkv[:n, q_size + kv_size :].view(n, cfg.num_kv_heads, cfg.head_dim)
        kv_pages = pool.kv_layer(index)
        attention = self.backend.attention
        attention.write_kv(kv_pages, k, v, batch.slot_mapping)
        return attention.attend(q, kv_pages, batch, self.scale, plan).reshape(rows, q_size)

    def _mlp(self, index: int, layer: dict, x: torch.Tensor, n: int, lora: StepLora | None) -> torch.Tensor:
        """SwiGLU (+ LoRA on gate, up and down): [rows, hidden]."""
        inter = self.config.intermediate_size
        gate_up = self._linear(x, layer["gate_up"])
        if lora is not None:
            lora.apply(index, x[:n], {"gate_proj": gate_up[:n, :inter], "up_proj": gate_up[:n, inter:]})
        mlp_in = F.silu(gate_up[:, :inter]) * gate_up[:, inter:]
        down = self._linear(mlp_in, layer["down"])
        if lora is not None:
            lora.apply(index, mlp_in[:n], {"down_proj": down[:n]})
        return down
