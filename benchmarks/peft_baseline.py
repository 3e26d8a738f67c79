"""The Hugging Face PEFT baseline of S-LoRA's evaluation: the same trace, open loop, served as well
as PEFT can serve it.

PEFT has no server, no continuous batching and no paged KV cache; what it does have is mixed-adapter
batches (``generate(..., adapter_names=[...])``, one LoRA per row, ``"__base__"`` for none), which
beat swapping the active adapter per batch whenever a batch holds several adapters (S-LoRA's own
baseline swapped per batch). So the baseline is a static-batching loop: whenever the model is idle
and requests have arrived, the oldest ``max_batch`` of them are left-padded into one batch and
generated greedily until each has its ``output_len`` tokens (a stopping criterion ends every row at
its own length and the batch when all are done; EOS is ignored as in Tailor's runs). Adapters are
loaded into the one ``PeftModel`` the first time a request names them and stay loaded.

Timing per request, from its scheduled arrival (same as ``benchmarks.open_loop``): the first token
when the first decoding step of its batch ends, the last when its row reaches its length.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import torch

from benchmarks.open_loop import RequestTiming
from benchmarks.trace import Trace


class _RowLengths:
    """A stopping criterion: row i is done after ``lengths[i]`` new tokens; records when each row
    got its first and its last token (monotonic seconds)."""

    def __init__(self, prompt_len: int, lengths: list[int]):
        self.prompt_len = prompt_len
        self.lengths = torch.tensor(lengths)
        self.first: float | None = None
        self.last = [None] * len(lengths)

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs) -> torch.Tensor:
        now = time.monotonic()
        generated = input_ids.shape[1] - self.prompt_len
        if self.first is None:
            self.first = now
        done = generated >= self.lengths.to(input_ids.device)
        for i in torch.nonzero(done).flatten().tolist():
            if self.last[i] is None:
                self.last[i] = now
        return done


class PeftServer:
    """One base model from ``checkpoint_dir`` and, once a request names one, the ``PeftModel``
    around it with every adapter loaded so far (kept across replays, as a server would)."""

    def __init__(self, checkpoint_dir: Path, device: str = "cpu", dtype: torch.dtype = torch.float32):
        from transformers import AutoModelForCausalLM

        self.device = device
        self.base = AutoModelForCausalLM.from_pretrained(checkpoint_dir, dtype=dtype).to(device).eval()
        self.model = None
        self.loaded: set[str] = set()
        config = self.base.config
        eos = config.eos_token_id if isinstance(config.eos_token_id, int) else 0
        self.pad = config.pad_token_id if config.pad_token_id is not None else eos

    def adapter(self, index: int, path: Path) -> str:
        """Load adapter ``index`` from ``path`` if it is not loaded yet; its PEFT name."""
        from peft import PeftModel

        name = f"a{index}"
        if name in self.loaded:
            return name
        if self.model is None:
            self.model = PeftModel.from_pretrained(self.base, path, adapter_name=name).eval()
        else:
            self.model.load_adapter(path, adapter_name=name)
        self.loaded.add(name)
        return name

    def generate(self, prompts: list[list[int]], lengths: list[int], names: list[str]) -> tuple[_RowLengths, list[list[int]]]:
        """One static batch, left-padded, greedy, each row ending at its own length: the row
        timings and each row's generated token ids."""
        from transformers import StoppingCriteriaList

        width = max(len(p) for p in prompts)
        input_ids = torch.tensor([[self.pad] * (width - len(p)) + list(p) for p in prompts], device=self.device)
        attention = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=self.device)
        rows = _RowLengths(width, lengths)
        kwargs = dict(input_ids=input_ids, attention_mask=attention, max_new_tokens=max(lengths), do_sample=False,
                      min_new_tokens=max(lengths), pad_token_id=self.pad, stopping_criteria=StoppingCriteriaList([rows]))
        with torch.inference_mode():
            if self.model is None:  # no request has named an adapter yet: the plain base model
                output = self.base.generate(**kwargs)
            else:
                output = self.model.generate(**kwargs, adapter_names=names)
        tokens = [output[row, width:width + length].tolist() for row, length in enumerate(lengths)]
        return rows, tokens

    def replay(self, trace: Trace, adapter_path: Callable[[int], Path], max_batch: int = 32,
               progress: Callable[[int], None] | None = None) -> list[RequestTiming]:
        """Serve ``trace`` open loop (see the module docstring). ``adapter_path(i)`` is the PEFT
        directory of adapter index ``i``."""
        requests = trace.requests
        timings = [RequestTiming(r.index, r.arrival_time) for r in requests]
        start = time.monotonic()
        arrived = 0
        waiting: list[int] = []
        while arrived < len(requests) or waiting:
            now = time.monotonic() - start
            while arrived < len(requests) and requests[arrived].arrival_time <= now:
                waiting.append(arrived)
                arrived += 1
            if not waiting:
                time.sleep(max(0.0, requests[arrived].arrival_time - now))
                continue
            batch, waiting = waiting[:max_batch], waiting[max_batch:]
            names = ["__base__" if requests[i].adapter is None
                     else self.adapter(requests[i].adapter, adapter_path(requests[i].adapter)) for i in batch]
            lengths = [requests[i].output_len for i in batch]
            rows, _ = self.generate([requests[i].prompt_token_ids for i in batch], lengths, names)
            for row, i in enumerate(batch):
                arrival = start + requests[i].arrival_time
                timings[i].first_token_s = rows.first - arrival
                timings[i].latency_s = rows.last[row] - arrival
                timings[i].output_tokens = lengths[row]
                if progress is not None:
                    progress(1)
        return timings
