"""Problem sizes for the three modes (full, ``--quick``, ``--cpu-smoke``) and the per-section context."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch


@dataclass(frozen=True)
class Sizes:
    # section kernels: LoRA (T rows, IN -> OUT features, adapter slots, ranks) and attention
    lora_rows: int
    lora_in: int
    lora_out: int
    lora_slots: int
    lora_ranks: tuple[int, ...]
    lora_page: int
    attn_heads: int
    attn_kv_heads: int
    attn_head_dim: int
    attn_page_tokens: int
    attn_decode_seqs: int
    attn_prefill_seqs: int
    attn_max_ctx: int
    attn_max_q: int
    # the small Llama of the HF and PEFT sections
    small_model: dict
    hf_prompts: int
    hf_new_tokens: int
    peft_adapters: int
    peft_prompts: int
    peft_new_tokens: int
    # decode step against the weight-read floor
    decode_preset: str
    decode_batches: tuple[int, ...]
    decode_context: int
    decode_iters: int
    # bandwidth
    copy_bytes: int
    bw_rows: int
    bw_rank: int
    bw_features: int
    bw_attn_seqs: int
    bw_attn_ctx: int
    bw_attn_heads: int
    bw_attn_kv_heads: int
    bw_iters: int
    # throughput with many adapters
    tp_model: dict
    tp_adapters: tuple[int, ...]
    tp_requests: int
    tp_input: tuple[int, int]
    tp_output: tuple[int, int]
    tp_max_num_seqs: int
    # prefix cache: users, turns, shared system prefix tokens, new tokens per turn (range), outputs
    pc_users: int = 4
    pc_turns: int = 6
    pc_prefix: int = 1024
    pc_turn_tokens: tuple[int, int] = (16, 64)
    pc_new_tokens: int = 16
    # a short S-LoRA comparison (benchmarks.slora_eval): model, adapter counts, rate (req/s), arrival
    # span (s), inclusive input and output lengths
    se_model: str = "random:llama-7b"
    se_dtype: str = "float16"
    se_adapters: tuple[int, ...] = (5, 100)
    se_rate: float = 2.0
    se_duration_s: float = 15.0
    se_input: tuple[int, int] = (8, 256)
    se_output: tuple[int, int] = (8, 128)


LLAMA_SMALL = dict(hidden_size=512, intermediate_size=1408, num_hidden_layers=4, num_attention_heads=8,
                   num_key_value_heads=2, vocab_size=32000)
LLAMA_MID = dict(hidden_size=512, intermediate_size=1408, num_hidden_layers=4, num_attention_heads=8,
                 num_key_value_heads=4, vocab_size=32000)
LLAMA_TINY = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, vocab_size=512)

FULL = Sizes(
    lora_rows=256, lora_in=4096, lora_out=4096, lora_slots=8, lora_ranks=(0, 8, 16, 32, 64), lora_page=32768,
    attn_heads=32, attn_kv_heads=8, attn_head_dim=128, attn_page_tokens=16,
    attn_decode_seqs=48, attn_prefill_seqs=8, attn_max_ctx=1024, attn_max_q=96,
    small_model=LLAMA_SMALL, hf_prompts=16, hf_new_tokens=16,
    peft_adapters=4, peft_prompts=6, peft_new_tokens=12,
    decode_preset="llama-7b", decode_batches=(1, 16, 64, 256), decode_context=512, decode_iters=10,
    copy_bytes=4 << 30, bw_rows=256, bw_rank=64, bw_features=4096,
    bw_attn_seqs=128, bw_attn_ctx=1024, bw_attn_heads=32, bw_attn_kv_heads=32, bw_iters=20,
    tp_model=LLAMA_MID, tp_adapters=(1, 100, 1000), tp_requests=1000, tp_input=(8, 32), tp_output=(8, 16),
    tp_max_num_seqs=128,
)

QUICK = Sizes(
    lora_rows=128, lora_in=2048, lora_out=2048, lora_slots=6, lora_ranks=(0, 8, 16, 64), lora_page=16384,
    attn_heads=16, attn_kv_heads=4, attn_head_dim=128, attn_page_tokens=16,
    attn_decode_seqs=24, attn_prefill_seqs=4, attn_max_ctx=512, attn_max_q=48,
    small_model=LLAMA_SMALL, hf_prompts=8, hf_new_tokens=12,
    peft_adapters=3, peft_prompts=4, peft_new_tokens=8,
    decode_preset="llama-7b", decode_batches=(1, 16, 64), decode_context=512, decode_iters=5,
    copy_bytes=2 << 30, bw_rows=256, bw_rank=64, bw_features=4096,
    bw_attn_seqs=64, bw_attn_ctx=1024, bw_attn_heads=32, bw_attn_kv_heads=32, bw_iters=10,
    tp_model=LLAMA_MID, tp_adapters=(1, 100, 1000), tp_requests=400, tp_input=(8, 24), tp_output=(4, 12),
    tp_max_num_seqs=128, pc_users=3, pc_turns=4, pc_prefix=512, se_duration_s=8.0,
)

# For the test suite only: every section at toy sizes on the CPU (kernels under TRITON_INTERPRET=1).
SMOKE = Sizes(
    lora_rows=7, lora_in=24, lora_out=40, lora_slots=3, lora_ranks=(0, 4, 8), lora_page=20,
    attn_heads=4, attn_kv_heads=2, attn_head_dim=16, attn_page_tokens=4,
    attn_decode_seqs=2, attn_prefill_seqs=1, attn_max_ctx=12, attn_max_q=5,
    small_model=LLAMA_TINY, hf_prompts=2, hf_new_tokens=3,
    peft_adapters=2, peft_prompts=3, peft_new_tokens=6,
    decode_preset="tiny", decode_batches=(1, 2), decode_context=16, decode_iters=1,
    copy_bytes=1 << 20, bw_rows=4, bw_rank=4, bw_features=32,
    bw_attn_seqs=2, bw_attn_ctx=8, bw_attn_heads=2, bw_attn_kv_heads=2, bw_iters=1,
    tp_model=LLAMA_TINY, tp_adapters=(1, 2, 3), tp_requests=4, tp_input=(3, 6), tp_output=(2, 2),
    tp_max_num_seqs=8,
    pc_users=2, pc_turns=3, pc_prefix=12, pc_turn_tokens=(2, 5), pc_new_tokens=2,
    se_model="random:tiny", se_dtype="float32", se_adapters=(1, 2), se_rate=8.0, se_duration_s=0.5, se_input=(3, 8),
    se_output=(2, 3),
)

MODES = {"full": FULL, "quick": QUICK, "smoke": SMOKE}


@dataclass
class Context:
    """What a section gets: the device, the sizes, a seed and its own time cap."""

    device: torch.device
    sizes: Sizes
    seed: int
    cap_s: float
    smoke: bool
    started: float = field(default_factory=time.monotonic)

    def time_left(self) -> float:
        return self.cap_s - (time.monotonic() - self.started)

    def expired(self) -> bool:
        return self.time_left() <= 0

    def generator(self, salt: int = 0) -> torch.Generator:
        """A fresh generator on the section's device (random inputs differ per run unless --seed)."""
        return torch.Generator(device=self.device).manual_seed((self.seed * 1_000_003 + salt) & 0x7FFFFFFFFFFF)
