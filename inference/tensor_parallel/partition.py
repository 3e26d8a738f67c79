"""How a tensor-parallel group of ``size`` ranks splits the model (Megatron-LM) and its adapters.

Base model, rank ``r`` of ``N``:

* q, k, v, gate, up are column-parallel: rank r holds rows ``[r*out/N, (r+1)*out/N)`` of each
  weight ``[out, in]`` (its query heads, its KV heads, its slice of the intermediate width).
* o and down are row-parallel: rank r holds columns ``[r*in/N, (r+1)*in/N)``; their partial
  outputs ``[B, hidden]`` are summed by one all-reduce each.
* The embedding and the lm_head are split over the vocabulary (padded up to a multiple of N with
  zero rows): a rank embeds the ids in its range (zeros elsewhere; one all-reduce), and computes
  the logits of its range (gathered on the driver).
* Norms are replicated. KV heads are split, so ``num_kv_heads`` (and ``num_heads``,
  ``intermediate_size``) must divide by N: a model where they do not is refused with a clear
  error instead of replicating KV heads.

LoRA, matched to the base layer it adapts (A ``[r, in]``, Bᵀ ``[r, out]``):

* column-parallel layer: A whole (every rank computes ``x @ Aᵀ``, ``[B, r]``, from the replicated
  input), Bᵀ split by output columns like the base weight: no communication at all.
* row-parallel layer: A split by input columns like the base weight, Bᵀ whole: rank r adds
  ``scale * (x_r @ A_rᵀ) @ Bᵀ`` to its *partial* output before the base layer's all-reduce, which
  then sums the LoRA term too (the sum over ranks of ``x_r @ A_rᵀ`` is ``x @ Aᵀ``): the LoRA
  update rides on the base collective and adds no byte to it.

Per rank, a LoRA module therefore has the shapes of :meth:`TensorParallelLayout.rank_config`'s
``linear_shapes()``, so the page pool, the adapter tiers and the LoRA backends work per rank
unchanged.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from inference.adapters.lora_weights import LoraModuleWeights
from inference.model_config import ModelConfig

COLUMN_PARALLEL = ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj")
ROW_PARALLEL = ("o_proj", "down_proj")


class TensorParallelConfigError(ValueError):
    """The model cannot be split over the requested number of ranks."""


@dataclass(frozen=True)
class TensorParallelLayout:
    """The partition of ``config`` over ``size`` ranks (validated at construction)."""

    config: ModelConfig
    size: int

    def __post_init__(self) -> None:
        problems = []
        if isinstance(self.size, bool) or not isinstance(self.size, int) or self.size < 1:
            raise TensorParallelConfigError(f"tensor_parallel_size must be an integer >= 1, got {self.size!r}")
        c, n = self.config, self.size
        if c.num_kv_heads % n:
            problems.append(f"num_key_value_heads {c.num_kv_heads} does not divide by {n} (KV heads are split "
                            "across ranks, not replicated)")
        if c.num_heads % n:
            problems.append(f"num_attention_heads {c.num_heads} does not divide by {n}")
        if c.intermediate_size % n:
            problems.append(f"intermediate_size {c.intermediate_size} does not divide by {n}")
        if problems:
            raise TensorParallelConfigError(
                f"cannot split the model over tensor_parallel_size={n}: " + "; ".join(problems))

    # ------------------------------------------------------------------ shapes
    def rank_config(self) -> ModelConfig:
        """The per-rank shapes: ``num_heads/N`` query heads, ``num_kv_heads/N`` KV heads,
        ``intermediate_size/N``; hidden size, vocabulary and everything else unchanged."""
        c, n = self.config, self.size
        return dataclasses.replace(c, num_heads=c.num_heads // n, num_kv_heads=c.num_kv_heads // n,
                                   intermediate_size=c.intermediate_size // n)

    @property
    def vocab_shard(self) -> int:
        """Vocabulary rows per rank (the vocabulary padded up to a multiple of N)."""
        return -(-self.config.vocab_size // self.size)

    def vocab_range(self, rank: int) -> tuple[int, int]:
        """``[start, end)`` of the (padded) vocabulary that ``rank`` embeds and projects."""
        return rank * self.vocab_shard, (rank + 1) * self.vocab_shard

    # ------------------------------------------------------------------ base weights
    def shard_weights(self, weights: dict[str, torch.Tensor], rank: int) -> dict[str, torch.Tensor]:
        """Rank ``rank``'s slices of a full checkpoint's weights (same keys; contiguous copies)."""
        self._check_rank(rank)
        n = self.size
        out: dict[str, torch.Tensor] = {}
        for key, tensor in weights.items():
            module = key.split(".")[-2]
            if key in ("model.embed_tokens.weight", "lm_head.weight"):
                out[key] = self._vocab_rows(tensor, rank)
            elif module in COLUMN_PARALLEL:
                out[key] = _chunk(tensor, 0, n, rank)
            elif module in ROW_PARALLEL:
                out[key] = _chunk(tensor, 1, n, rank)
            else:
                out[key] = tensor
        return out

    def _vocab_rows(self, table: torch.Tensor, rank: int) -> torch.Tensor:
        start, end = self.vocab_range(rank)
        rows = table[start:min(end, table.shape[0])]
        if rows.shape[0] < self.vocab_shard:  # the last rank of a vocabulary that does not divide
            rows = torch.cat([rows, rows.new_zeros((self.vocab_shard - rows.shape[0], table.shape[1]))])
        return rows.contiguous()

    # ------------------------------------------------------------------ LoRA factors
    def shard_lora(self, modules: dict[str, LoraModuleWeights], rank: int) -> dict[str, LoraModuleWeights]:
        """Rank ``rank``'s share of an adapter's factors: Bᵀ split by output for column-parallel
        modules (A whole), A split by input for row-parallel ones (Bᵀ whole)."""
        self._check_rank(rank)
        out = {}
        for name, m in modules.items():
            if name in COLUMN_PARALLEL:
                out[name] = LoraModuleWeights(m.a, _chunk(m.b_t, 2, self.size, rank))
            elif name in ROW_PARALLEL:
                out[name] = LoraModuleWeights(_chunk(m.a, 2, self.size, rank), m.b_t)
            else:
                raise ValueError(f"no tensor-parallel partition for module {name!r}")
        return out

    def rank_layer_elems(self, module_ranks: dict[str, int]) -> int:
        """Elements of one layer of one rank's share of an adapter with these module ranks."""
        shapes = self.rank_config().linear_shapes()
        return sum(r * (shapes[name][0] + shapes[name][1]) for name, r in module_ranks.items())

    def _check_rank(self, rank: int) -> None:
        if not 0 <= rank < self.size:
            raise ValueError(f"rank must be in [0, {self.size}), got {rank}")


def _chunk(tensor: torch.Tensor, dim: int, parts: int, index: int) -> torch.Tensor:
    """The ``index``-th of ``parts`` equal slices of ``tensor`` along ``dim``, contiguous."""
    size = tensor.shape[dim] // parts
    return tensor.narrow(dim, index * size, size).contiguous()
