"""The bytes each collective of one tensor-parallel step moves, by formula (docs/design.md).

For a step of ``tokens`` new tokens (B, the rows the dense ops run on) of which ``sampled`` (S)
are sampled, over N ranks, a model of L layers, hidden size h, vocabulary V (padded to
``N * ceil(V / N)``) and e bytes per element, each rank contributes (the *payload*):

* ``all_reduce_embed``: one all-reduce of the embedded rows, ``B * h * e``;
* ``all_reduce_layer``: two all-reduces per layer (after o and after down), ``2 * L * B * h * e``;
* ``gather_logits``: this rank's fp32 logits to the driver, ``S * (V_pad / N) * 4``;
* LoRA: nothing. A column-parallel layer's LoRA needs no communication and a row-parallel one's
  partial LoRA output is summed by the base all-reduce (``partition``), whatever the ranks and
  targets of the batch's adapters.

A ring all-reduce of P payload bytes sends ``2 * (N - 1) / N * P`` bytes per rank on the wire.
The control messages (the pickled step, adapter shards on page-in) depend on the batch's contents
and are counted, not predicted.
"""

from __future__ import annotations

from inference.model_config import ModelConfig

DATA_COLLECTIVES = ("all_reduce_embed", "all_reduce_layer", "gather_logits")


def step_payload_bytes(config: ModelConfig, size: int, tokens: int, sampled: int, element_bytes: int) -> dict[str, int]:
    """Payload bytes per rank of each data collective of one step (see the module docstring)."""
    h, layers = config.hidden_size, config.num_layers
    vocab_shard = -(-config.vocab_size // size)
    return {
        "all_reduce_embed": tokens * h * element_bytes,
        "all_reduce_layer": 2 * layers * tokens * h * element_bytes,
        "gather_logits": sampled * vocab_shard * 4 if sampled else 0,
    }


def ring_wire_bytes(payload: int, size: int) -> int:
    """Bytes one rank sends in a ring all-reduce of ``payload`` bytes."""
    return 2 * (size - 1) * payload // size
