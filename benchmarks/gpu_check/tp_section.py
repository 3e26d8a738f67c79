"""Section ``tp``: tensor parallelism, TP=1 against TP=2 on the same mixed-adapter batch.

Needs two GPUs (NCCL, one rank per GPU); on a machine with one it reports so and runs nothing.
The CPU smoke test runs it with gloo at toy sizes. A random fp32 Llama (8 query heads, 2 KV heads:
one KV head per rank) serves one batch that mixes base-model requests and two adapters of
different ranks and targets (MLP included) on both engines. Reported: greedy tokens identical,
wall time of the batch, and the driver's counted collective bytes against the formula
(``inference.tensor_parallel.traffic``).

Pass: every request's greedy tokens identical, and the counted data bytes equal the formula.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import torch

from benchmarks.gpu_check.checkpoints import engine_greedy, make_engine, write_llama
from benchmarks.gpu_check.sizes import LLAMA_TINY, Context
from benchmarks.synthetic_adapters import synthetic_adapter
from inference.tensor_parallel.traffic import DATA_COLLECTIVES, step_payload_bytes

COLUMNS = ["tp", "requests", "new_tokens", "wall_s", "tokens_per_s", "greedy_mismatches", "data_bytes_counted",
           "data_bytes_formula"]
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
        rows, tokens = [], {}
        for tp in (1, 2):
            engine = make_engine(checkpoint, ctx.device, "float32", pool, tensor_parallel_size=tp,
                                 **({"page_tokens": 4} if ctx.smoke else {}))
            try:
                for name, path in adapters.items():
                    engine.adapters.register_dir(name, path)
                engine_greedy(engine, jobs[:1], 2)  # first-use compilation and group warm-up out of the timing
                counted, formula = _count_bytes(engine, tp)
                started = time.perf_counter()
                results = engine_greedy(engine, jobs, new_tokens)
                wall = time.perf_counter() - started
            finally:
                engine.close()
            tokens[tp] = [r["tokens"] for r in results]
            rows.append({"tp": tp, "requests": requests, "new_tokens": new_tokens, "wall_s": round(wall, 3),
                         "tokens_per_s": round(requests * new_tokens / wall, 1),
                         "data_bytes_counted": sum(counted), "data_bytes_formula": sum(formula)})
    mismatches = sum(a != b for a, b in zip(tokens[1], tokens[2]))
    for row in rows:
        row["greedy_mismatches"] = mismatches if row["tp"] == 2 else 0
    bytes_ok = rows[1]["data_bytes_counted"] == rows[1]["data_bytes_formula"]
    return {
        "passed": mismatches == 0 and bytes_ok,
        "ran": True,
        "model": {**arch, "dtype": "float32"},
        "columns": COLUMNS,
        "rows": rows,
        "notes": [f"greedy tokens identical for {requests - mismatches}/{requests} requests (base and two adapters "
                  f"in one batch); TP=2 data collectives counted {rows[1]['data_bytes_counted']} bytes, formula "
                  f"{rows[1]['data_bytes_formula']}; TP=2 over TP=1 wall time "
                  f"{rows[1]['wall_s'] / max(1e-9, rows[0]['wall_s']):.2f}x"],
    }


def _count_bytes(engine, tp: int) -> tuple[list[int], list[int]]:
    """From now on, each step's counted data bytes and the formula's, appended to two lists."""
    counted: list[int] = []
    formula: list[int] = []
    if engine.workers is None:
        return counted, formula
    comm, run = engine.workers.comm, engine.runner.run
    element_bytes = engine.pool.tensor.element_size()

    def counting(plan):
        comm.log.reset()
        logits, sampling = run(plan)
        counted.append(sum(comm.log.bytes.get(n, 0) for n in DATA_COLLECTIVES))
        expected = step_payload_bytes(engine.model_config, tp, engine.backend.batch_rows(plan.num_tokens),
                                      len(sampling), element_bytes)
        formula.append(sum(expected.values()))
        return logits, sampling

    engine.runner.run = counting
    return counted, formula
