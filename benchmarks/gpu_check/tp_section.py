"""Section ``tp``: tensor parallelism, TP=1 against TP=2 on the same mixed-adapter batch.

Needs two GPUs (NCCL, one rank per GPU); on a machine with one it reports so and runs nothing.
The CPU smoke test runs it with gloo at toy sizes. A random fp32 Llama (8 query heads, 2 KV heads:
one KV head per rank) serves one batch that mixes base-model requests and two adapters of
different ranks and targets (MLP included) on both engines. Reported: greedy tokens identical,
wall time of the batch, and the driver's counted collective bytes against the formula
(``inference.tensor_parallel.traffic``).

Pass: every request's greedy tokens identical, or, where they first differ, TP=1's top-2 logit gap
at that position under ``NEAR_TIE`` (fp32 all-reduces and split GEMMs are not bitwise equal to one
GPU's, so a near-tie may flip; such requests are reported apart), and the counted data bytes equal
the formula.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import torch

from benchmarks.gpu_check.checkpoints import engine_greedy, make_engine, write_llama
from benchmarks.gpu_check.sizes import LLAMA_TINY, Context
from benchmarks.synthetic_adapters import synthetic_adapter
from benchmarks.tp_collectives import count_steps
from inference.tensor_parallel.traffic import DATA_COLLECTIVES

COLUMNS = ["tp", "requests", "new_tokens", "wall_s", "tokens_per_s", "greedy_mismatches", "near_ties",
           "data_bytes_counted", "data_bytes_formula"]
NEAR_TIE = 2e-3  # TP=1's top-2 logit gap (fp32) under which a first divergence is a near-tie, not a defect
ADAPTERS = {"r8-attn": (8, ("q_proj", "k_proj", "v_proj", "o_proj")),
            "r16-all": (16, ("q_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"))}


def run(ctx: Context) -> dict:
    if ctx.device.type == "cuda" and torch.cuda.device_count() < 2:
        count = torch.cuda.device_count()
        return {"passed": True, "ran": False,
                "notes": [f"needs 2 GPUs, this machine has {count}: TP=1 vs TP=2 not run"]}
    arch = LLAMA_TINY if ctx.smoke else ctx.sizes.small_model
    requests, new_tokens = (3, 3) if ctx.smoke else (16, 24)
    gen = ctx.generator(salt=20)
    with tempfile.TemporaryDirectory(prefix="gpu-check-tp-") as tmp:
        checkpoint = write_llama(Path(tmp) / "llama", arch, seed=ctx.seed + 20)
        from inference.model_config import ModelConfig

        config = ModelConfig.from_checkpoint(checkpoint)
        adapters = {name: synthetic_adapter(Path(tmp) / name, config, r=r, targets=targets, alpha=2 * r, seed=i)
                    for i, (name, (r, targets)) in enumerate(ADAPTERS.items())}
        names = [None, *adapters]
        jobs = [(torch.randint(3, arch["vocab_size"], (int(torch.randint(8, 40, (1,), generator=gen)),),
                               generator=gen).tolist(), names[i % len(names)]) for i in range(requests)]
        pool = 8 << 20 if ctx.smoke else 256 << 20
        rows, tokens, gaps = [], {}, []
        for tp in (1, 2):
            engine = make_engine(checkpoint, ctx.device, "float32", pool, tensor_parallel_size=tp,
                                 **({"page_tokens": 4} if ctx.smoke else {}))
            try:
                for name, path in adapters.items():
                    engine.adapters.register_dir(name, path)
                engine_greedy(engine, jobs[:1], 2)  # first-use compilation and group warm-up out of the timing
                steps = count_steps(engine)  # empty at TP=1
                started = time.perf_counter()
                results = engine_greedy(engine, jobs, new_tokens, top_logprobs=2)
                wall = time.perf_counter() - started
            finally:
                engine.close()
            tokens[tp] = [r["tokens"] for r in results]
            if tp == 1:  # logprob gaps are logit gaps (one log-normaliser per row)
                gaps = [[_top2_gap(top) for top in r["top"]] for r in results]
            rows.append({"tp": tp, "requests": requests, "new_tokens": new_tokens, "wall_s": round(wall, 3),
                         "tokens_per_s": round(requests * new_tokens / wall, 1),
                         "data_bytes_counted": sum(s["bytes"].get(n, 0) for s in steps for n in DATA_COLLECTIVES),
                         "data_bytes_formula": sum(sum(s["formula"].values()) for s in steps)})
    mismatches, near_ties, worst = _divergences(tokens[1], tokens[2], gaps)
    for row in rows:
        row["greedy_mismatches"] = mismatches if row["tp"] == 2 else 0
        row["near_ties"] = near_ties if row["tp"] == 2 else 0
    bytes_ok = rows[1]["data_bytes_counted"] == rows[1]["data_bytes_formula"]
    identical = requests - mismatches - near_ties
    return {
        "passed": mismatches == 0 and bytes_ok,
        "ran": True,
        "model": {**arch, "dtype": "float32"},
        "columns": COLUMNS,
        "rows": rows,
        "notes": [f"greedy tokens identical for {identical}/{requests} requests (base and two adapters in one "
                  f"batch); {near_ties} diverge at a near-tie (TP=1 top-2 logit gap < {NEAR_TIE:g}), {mismatches} "
                  f"beyond one{f' (largest gap {worst:.4g})' if mismatches else ''}; TP=2 data collectives counted {rows[1]['data_bytes_counted']} bytes, formula "
                  f"{rows[1]['data_bytes_formula']}; TP=2 over TP=1 wall time "
                  f"{rows[1]['wall_s'] / max(1e-9, rows[0]['wall_s']):.2f}x"],
    }


def _top2_gap(top: dict) -> float:
    values = sorted(top.values(), reverse=True)
    return values[0] - values[1] if len(values) > 1 else float("inf")


def _divergences(ref: list[list[int]], ours: list[list[int]], gaps: list[list[float]]) -> tuple[int, int, float]:
    """Requests whose tokens differ beyond a near-tie, those that first differ at one, and the
    largest TP=1 gap among the former (0 if none)."""
    mismatches = near_ties = 0
    worst = 0.0
    for a, b, g in zip(ref, ours, gaps):
        if a == b:
            continue
        k = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
        gap = g[k] if k < len(g) else float("inf")
        if gap < NEAR_TIE:
            near_ties += 1
        else:
            mismatches += 1
            worst = max(worst, gap)
    return mismatches, near_ties, worst
