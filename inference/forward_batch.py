"""The device tensors that describe one engine step to the model and its backends."""

from __future__ import annotations

from dataclasses import dataclass

import torch


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

    def to(self, device: torch.device) -> "ForwardBatch":
        """The same batch on ``device`` (asynchronous copies from host tensors)."""
        return ForwardBatch(*(getattr(self, name).to(device, non_blocking=True) for name in _TENSORS),
                            max_q_len=self.max_q_len)


_TENSORS = ("input_ids", "positions", "slot_mapping", "page_table", "seq_lens", "query_start_loc", "logits_indices")
