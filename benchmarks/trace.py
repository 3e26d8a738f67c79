"""S-LoRA's synthetic workload as a trace file, so that every system replays the identical requests.

A trace is the workload of ``benchmarks.workload`` made concrete: ``num_adapters`` adapters, each
with a rank drawn (seeded, uniformly) from ``ranks`` (S-LoRA's setting S1 is ``(8,)``, S2
``(8, 16, 32, 64)``); requests whose adapter follows S-LoRA's power law (``alpha``), arriving as a
gamma process (``rate`` requests/s, coefficient of variation ``cv``) for ``duration_s`` seconds, with
input and output lengths uniform in inclusive ranges, prompts as token ids. ``num_adapters = 0``
makes a base-model trace (every ``adapter`` None) with the same lengths and arrivals.

The file is JSON (``version`` 1): the generator's parameters, ``adapter_ranks`` (rank of adapter i)
and ``requests`` (``prompt_token_ids``, ``output_len``, ``adapter``, ``arrival_time`` in seconds
from the start). ``load_trace(save_trace(t))`` gives back ``t`` exactly.

    python -m benchmarks.trace --num-adapters 100 --ranks 8,16,32,64 --rate 2 --duration-s 60 --out t.json
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.workload import BenchRequest, gamma_arrivals, make_requests, sample_adapters, summarize

TRACE_VERSION = 1


@dataclass(frozen=True)
class Trace:
    """Requests in arrival order, the rank of every adapter, and how they were generated."""

    requests: list[BenchRequest]
    adapter_ranks: list[int] = field(default_factory=list)
    params: dict[str, Any] = field(default_factory=dict)

    @property
    def num_adapters(self) -> int:
        return len(self.adapter_ranks)

    @property
    def duration_s(self) -> float:
        return self.requests[-1].arrival_time if self.requests else 0.0

    def used_adapters(self) -> list[int]:
        """The adapter indices the requests name, ascending."""
        return sorted({r.adapter for r in self.requests if r.adapter is not None})

    def summary(self) -> dict[str, Any]:
        return {**summarize(self.requests), "num_adapters": self.num_adapters,
                "adapters_used": len(self.used_adapters()), "duration_s": self.duration_s}


def synthetic_trace(num_adapters: int, rate: float, duration_s: float, *, ranks: Sequence[int] = (8,),
                    alpha: float = 1.0, cv: float = 1.0, input_len_range: Sequence[int] = (8, 512),
                    output_len_range: Sequence[int] = (8, 512), seed: int = 0, vocab: Any = None,
                    tokenizer: Any = None) -> Trace:
    """Every request that arrives within ``duration_s`` seconds (see the module docstring).

    Lengths, adapters, arrivals and ranks come from independent seeded streams, so a base-model
    trace and an adapter trace with the same seed have the same lengths and arrival times.
    """
    if num_adapters < 0:
        raise ValueError("num_adapters must be >= 0")
    if not ranks or any(int(r) < 1 for r in ranks):
        raise ValueError(f"ranks must be positive integers, got {list(ranks)}")
    if duration_s <= 0:
        raise ValueError("duration_s must be > 0")
    # enough arrivals to pass duration_s (mean rate * duration, plus slack for burstiness)
    capacity = int(rate * duration_s * (2 + cv)) + 16
    arrivals = gamma_arrivals(capacity, rate, cv, seed=seed + 2)
    while arrivals[-1] <= duration_s:
        capacity *= 2
        arrivals = gamma_arrivals(capacity, rate, cv, seed=seed + 2)
    count = int(np.searchsorted(arrivals, duration_s, side="right"))
    requests = make_requests(count, seed=seed, input_len_range=input_len_range, output_len_range=output_len_range,
                             vocab=vocab, tokenizer=tokenizer)
    adapters = sample_adapters(count, num_adapters, alpha, seed=seed + 1) if num_adapters else [None] * count
    rank_choice = np.random.default_rng(seed + 3).choice(np.asarray(ranks, dtype=np.int64), size=num_adapters)
    requests = [BenchRequest(r.index, r.prompt_token_ids, r.output_len,
                             None if adapters[i] is None else int(adapters[i]), float(arrivals[i]))
                for i, r in enumerate(requests)]
    params = {"num_adapters": num_adapters, "ranks": [int(r) for r in ranks], "alpha": alpha, "rate": rate,
              "cv": cv, "duration_s": duration_s, "input_len_range": list(input_len_range),
              "output_len_range": list(output_len_range), "seed": seed}
    return Trace(requests, [int(r) for r in rank_choice], params)


def save_trace(trace: Trace, path: Path) -> Path:
    document = {"version": TRACE_VERSION, "params": trace.params, "adapter_ranks": trace.adapter_ranks,
                "requests": [asdict(r) for r in trace.requests]}
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(document))
    return path


def load_trace(path: Path) -> Trace:
    """The trace in ``path``; ValueError naming what is wrong with a file that is not one."""
    document = json.loads(Path(path).read_text())
    if not isinstance(document, dict) or document.get("version") != TRACE_VERSION:
        raise ValueError(f"{path}: not a version-{TRACE_VERSION} trace file")
    ranks = document.get("adapter_ranks", [])
    requests = []
    for i, item in enumerate(document.get("requests", [])):
        request = BenchRequest(**item)
        if request.adapter is not None and not 0 <= request.adapter < len(ranks):
            raise ValueError(f"{path}: request {i} uses adapter {request.adapter}, the trace has {len(ranks)}")
        requests.append(request)
    if any(b.arrival_time < a.arrival_time for a, b in zip(requests, requests[1:])):
        raise ValueError(f"{path}: requests are not in arrival order")
    return Trace(requests, list(ranks), document.get("params", {}))


def _ints(text: str) -> list[int]:
    return [int(part) for part in text.split(",") if part]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--num-adapters", type=int, required=True)
    p.add_argument("--ranks", default="8", help="comma-separated ranks to draw from (S1: 8; S2: 8,16,32,64)")
    p.add_argument("--alpha", type=float, default=1.0)
    p.add_argument("--rate", type=float, required=True, help="requests per second")
    p.add_argument("--cv", type=float, default=1.0)
    p.add_argument("--duration-s", type=float, required=True)
    p.add_argument("--input", default="8,512", help="inclusive input length range lo,hi")
    p.add_argument("--output", default="8,512", help="inclusive output length range lo,hi")
    p.add_argument("--vocab-size", type=int, default=49152, help="prompt ids are drawn from 0..vocab-1")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args(argv)
    trace = synthetic_trace(args.num_adapters, args.rate, args.duration_s, ranks=_ints(args.ranks), alpha=args.alpha,
                            cv=args.cv, input_len_range=_ints(args.input), output_len_range=_ints(args.output),
                            seed=args.seed, vocab=args.vocab_size)
    save_trace(trace, args.out)
    print(json.dumps(trace.summary()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
