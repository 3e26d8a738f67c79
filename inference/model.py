"""A Llama-family decoder that reads and writes its KV cache through the unified page pool.

The forward pass runs on a *flattened* batch: the new tokens of every scheduled sequence are
concatenated (prefill chunks and single decode tokens alike), so one call serves a mixed batch.
RMSNorm, RoPE (default, linear, llama3), grouped-query attention and SwiGLU follow the Hugging Face
Llama implementation's arithmetic (norms and RoPE tables in fp32) so that greedy outputs match it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Protocol

import torch
import torch.nn.functional as F

from inference.model_config import ModelConfig, RopeConfig
from inference.page_pool import PagePool
from kernels.paged_attention import paged_attention, plan_paged_attention, write_kv

ATTENTION_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP_MODULES = ("gate_proj", "up_proj", "down_proj")


@dataclass
class ForwardBatch:
    """Device tensors describing one engine step.

    N = new tokens in the step, B = sequences, S = rows whose logits are wanted.

    * ``input_ids``: [N] int64 token ids; ``positions``: [N] int64 absolute positions.
    * ``slot_mapping``: [N] int64 flat KV slot (``page_id * page_tokens + offset``) for each new token.
    * ``page_table``: [B, max_pages] int32 KV page ids per sequence (padded with 0).
    * ``seq_lens``: [B] int32 context length after this step; ``query_start_loc``: [B+1] int32.
    * ``logits_indices``: [S] int64 rows of the flattened batch to project to logits.
    * ``max_q_len``: host int, the longest new-token run of any sequence.
    """

    input_ids: torch.Tensor
    positions: torch.Tensor
    slot_mapping: torch.Tensor
    page_table: torch.Tensor
    seq_lens: torch.Tensor
    query_start_loc: torch.Tensor
    logits_indices: torch.Tensor
    max_q_len: int


class LoraApplier(Protocol):
    """Adds adapter deltas to a projection's output in place (implemented by the adapter layer)."""

    def apply(self, layer: int, x: torch.Tensor, outs: dict[str, torch.Tensor]) -> None:
        """``out[t] += scale_t * (x[t] @ A_t.T) @ B_t.T`` for each ``module: out`` of ``outs`` and the
        rows that carry an adapter targeting it. The modules share the input: the forward pass passes
        each ``inference.adapters.peft_checkpoint.SHARED_INPUT`` family (q, k, v; gate, up) in one call,
        in family order.

        x: [N, in_features]; each out: [N, out_features] (may be a column slice of a fused output).
        """


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


def cpu_gemm_rows(rows: int) -> int:
    """Rows to give MKL's fp32 GEMM on CPU for ``rows`` activation rows (the rest zero padding).

    The GEMM's speed depends on the row count far more than on the work (measured on the CI
    machine for 30 layers of SmolLM2 plus its LM head: ``python -m benchmarks.cpu_gemm_rows``,
    docs/benchmarks.md): 15 rows take 1.8x as long as 16, 47 rows 1.3x as long as 48, one row
    3x as long as two (a single row takes a slow matrix-vector path). So one row becomes two, and
    counts 3-7 past a multiple of 8 are rounded up to the next one; 1 or 2 past one measured
    faster unpadded, as did 2-5 rows.
    """
    if rows == 1:
        return 2
    if rows <= 5 or rows % 8 in (1, 2):
        return rows
    return -(-rows // 8) * 8


def _linear_weight_left(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``x @ weight.T`` computed as ``(weight @ x.T).T``; returns a [N, out] *transposed view*.

    The CPU path of every projection. MKL's sgemm runs this form 8-40% faster than ``F.linear``
    at the engine's batch sizes (the large operand is then the left one), and faster still with
    the rows padded to :func:`cpu_gemm_rows` (the forward pads its rows once, so this pads only
    when called on its own) and ``x`` row-major (a column-major ``x``, which the previous
    projection's transposed output is, is up to 2x slower below 16 rows). Consumers must accept a
    non-contiguous result. See docs/design.md.
    """
    n = x.shape[0]
    rows = cpu_gemm_rows(n)
    if rows != n:
        x = F.pad(x, (0, 0, 0, rows - n))  # a new row-major tensor
    elif n < 16 and not x.is_contiguous():
        x = x.contiguous()
    return torch.mm(weight, x.t()).t()[:n]


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


class LlamaModel:
    """Weights plus the forward pass. Not an ``nn.Module``: inference only, no autograd."""

    def __init__(self, config: ModelConfig, weights: dict[str, torch.Tensor], device: torch.device, dtype: torch.dtype):
        self.config = config
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
        self._linear = _linear_weight_left if device.type == "cpu" else F.linear
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
    def forward(self, batch: ForwardBatch, pool: PagePool, lora: LoraApplier | None = None) -> torch.Tensor:
        """Run one step; write the new tokens' K/V into their pages; return fp32 logits [S, vocab]."""
        cfg = self.config
        n = batch.input_ids.shape[0]
        q_size, kv_size = cfg.q_size, cfg.kv_size
        inter = cfg.intermediate_size
        input_ids, positions = batch.input_ids, batch.positions
        rows = n
        if self._linear is _linear_weight_left:
            # Pad the rows once to the GEMM's fast count (padding rows: token 0 at position 0;
            # attention leaves rows past query_start_loc zero, and they write no K/V) rather
            # than in each of the step's projections.
            rows = cpu_gemm_rows(n)
            input_ids = F.pad(input_ids, (0, rows - n))
            positions = F.pad(positions, (0, rows - n))
        hidden = F.embedding(input_ids, self.embed)
        cos, sin = self._rope(positions)
        # Every layer attends over the same pages: the CPU path's gather plan is built once.
        attn_plan = plan_paged_attention(
            batch.page_table, batch.seq_lens, batch.query_start_loc,
            n_heads=cfg.num_heads, kv_shape=tuple(pool.kv_layer(0).shape),
        )
        for index, layer in enumerate(self.layers):
            x = self._rms_norm(hidden, layer["input_norm"])
            qkv = self._linear(x, layer["qkv"])
            if lora is not None:
                lora.apply(index, x[:n], {"q_proj": qkv[:n, :q_size], "k_proj": qkv[:n, q_size : q_size + kv_size],
                                          "v_proj": qkv[:n, q_size + kv_size :]})
            # RoPE on the query and key heads at once (they are adjacent in the fused output).
            qk = qkv[:, : q_size + kv_size].view(rows, cfg.num_heads + cfg.num_kv_heads, cfg.head_dim)
            qk = qk * cos + _rotate_half(qk) * sin
            q, k = qk[:, : cfg.num_heads], qk[:n, cfg.num_heads :]
            v = qkv[:n, q_size + kv_size :].view(n, cfg.num_kv_heads, cfg.head_dim)
            kv_pages = pool.kv_layer(index)
            write_kv(kv_pages, k, v, batch.slot_mapping)
            attn = paged_attention(
                q, kv_pages, batch.page_table, batch.seq_lens, batch.query_start_loc, self.scale,
                max_q_len=batch.max_q_len, plan=attn_plan,
            ).reshape(rows, q_size)
            o = self._linear(attn, layer["o"])
            if lora is not None:
                lora.apply(index, attn[:n], {"o_proj": o[:n]})
            hidden = hidden + o
            x = self._rms_norm(hidden, layer["post_norm"])
            gate_up = self._linear(x, layer["gate_up"])
            if lora is not None:
                lora.apply(index, x[:n], {"gate_proj": gate_up[:n, :inter], "up_proj": gate_up[:n, inter:]})
            mlp_in = F.silu(gate_up[:, :inter]) * gate_up[:, inter:]
            down = self._linear(mlp_in, layer["down"])
            if lora is not None:
                lora.apply(index, mlp_in[:n], {"down_proj": down[:n]})
            hidden = hidden + down
        last = self._rms_norm(hidden[batch.logits_indices], self.final_norm)
        return self._linear(last, self.lm_head).float().contiguous()
