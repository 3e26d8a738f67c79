"""Counted bytes of every collective of a tensor-parallel step, with and without LoRA, against
the formula of docs/design.md ("Tensor parallelism"; ``inference.tensor_parallel.traffic``).

Runs the same greedy batch twice on a TP=N engine (gloo on CPU, NCCL on CUDA): base model only,
then with every request on one of three adapters of different ranks and targets (MLP included).
Every collective call on the driver (rank 0) is recorded with the bytes of the tensor it
contributes (``inference.tensor_parallel.comm.CollectiveLog``); each step's counts are checked
against the formula for its B tokens and S sampled rows. Prints a table, writes JSON.

    python -m benchmarks.tp_collectives --tp 2 --out benchmarks/results/tp_collectives-cpu.json
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from collections import Counter
from pathlib import Path

from benchmarks.live_server import write_results
from benchmarks.run_report import report_header
from benchmarks.synthetic_adapters import synthetic_adapter
from inference.bundled_model import BUNDLED_MODEL_NAME
from inference.engine import LLMEngine
from inference.engine_config import EngineConfig
from inference.sampling import SamplingParams
from inference.tensor_parallel.traffic import DATA_COLLECTIVES, ring_wire_bytes, step_payload_bytes

ADAPTERS = {"r8-attn": (8, ("q_proj", "k_proj", "v_proj", "o_proj")),
            "r16-all": (16, ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")),
            "r4-mlp": (4, ("gate_proj", "up_proj", "down_proj"))}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=BUNDLED_MODEL_NAME)
    p.add_argument("--device", default="cpu")
    p.add_argument("--tp", type=int, default=3, help="tensor_parallel_size (>= 2; SmolLM2-135M splits over 3)")
    p.add_argument("--batch", type=int, default=6, help="requests")
    p.add_argument("--max-tokens", type=int, default=4)
    p.add_argument("--pool-mb", type=int, default=64, help="page pool per rank, MiB")
    p.add_argument("--out", type=Path, default=None, help="JSON report path")
    args = p.parse_args(argv)
    if args.tp < 2:
        p.error("--tp must be >= 2")
    return args


def count_steps(engine: LLMEngine) -> list[dict]:
    """From now on, one entry per step of a tensor-parallel ``engine``: its rows (``tokens``), the
    rows it sampled, the collectives' counted calls and payload bytes on rank 0, the formula's
    bytes and the number of adapters in it. Empty (and nothing wrapped) without a group."""
    steps: list[dict] = []
    if engine.workers is None:
        return steps
    comm, run = engine.workers.comm, engine.runner.run
    element_bytes = engine.pool.tensor.element_size()

    def counted(plan):
        comm.log.reset()
        logits, sampling = run(plan)
        tokens = engine.backend.batch_rows(plan.num_tokens)
        expected = step_payload_bytes(engine.model_config, engine.parallel.size, tokens, len(sampling), element_bytes)
        steps.append({"tokens": tokens, "sampled": len(sampling), "calls": dict(comm.log.calls),
                      "bytes": dict(comm.log.bytes), "formula": expected,
                      "adapters": len({c.request.adapter.uid for c in plan.chunks if c.request.adapter})})
        return logits, sampling

    engine.runner.run = counted
    return steps


def run_side(args: argparse.Namespace, adapters: dict[str, Path] | None) -> dict:
    """One pass of the batch; per step: B, S, the counted calls and bytes, the formula's bytes."""
    engine = LLMEngine(args.model, EngineConfig(device=args.device, tensor_parallel_size=args.tp,
                                                pool_bytes=args.pool_mb << 20, enable_prefix_cache=False))
    try:
        names = [None]
        for name, path in (adapters or {}).items():
            engine.adapters.register_dir(name, path)
            names = list(adapters)
        steps = count_steps(engine)
        prompt = "Tell me about the history of the printing press and how it changed Europe."
        for i in range(args.batch):
            request = engine.make_request(f"{prompt} ({i})", SamplingParams(max_tokens=args.max_tokens, temperature=0.0),
                                          adapter_id=names[i % len(names)])
            engine.add(request)
        while engine.has_unfinished():
            engine.step()
    finally:
        engine.close()
    return summarize(steps, args.tp)


def summarize(steps: list[dict], size: int) -> dict:
    """Totals per collective, and whether every step's counted data bytes equal the formula's."""
    calls, counted, formula = Counter(), Counter(), Counter()
    mismatches = []
    for index, step in enumerate(steps):
        calls.update(step["calls"])
        counted.update(step["bytes"])
        formula.update(step["formula"])
        for name in DATA_COLLECTIVES:
            if step["bytes"].get(name, 0) != step["formula"][name]:
                mismatches.append((index, name, step["bytes"].get(name, 0), step["formula"][name]))
    tokens = sum(s["tokens"] for s in steps)
    return {"steps": len(steps), "tokens": tokens, "calls": dict(calls), "counted_bytes": dict(counted),
            "formula_bytes": dict(formula), "mismatches": mismatches,
            "all_reduce_wire_bytes_per_rank": ring_wire_bytes(
                counted["all_reduce_embed"] + counted["all_reduce_layer"], size),
            "max_adapters_in_a_step": max((s["adapters"] for s in steps), default=0), "per_step": steps}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from inference.engine import resolve_model
    from inference.model_config import ModelConfig

    config = ModelConfig.from_checkpoint(resolve_model(args.model))
    with tempfile.TemporaryDirectory(prefix="tp-collectives-") as folder:
        adapters = {name: synthetic_adapter(Path(folder) / name, config, r=r, targets=targets, alpha=2 * r, seed=i)
                    for i, (name, (r, targets)) in enumerate(ADAPTERS.items())}
        sides = {"base": run_side(args, None), "lora": run_side(args, adapters)}
    names = sorted({n for side in sides.values() for n in side["counted_bytes"]})
    print(f"TP={args.tp}  {args.model}  payload bytes per rank (counted on rank 0 | formula)")
    print(f"{'collective':<18}" + "".join(f"{s + ' calls':>12}{s + ' counted':>16}{s + ' formula':>16}" for s in sides))
    for name in names:
        row = f"{name:<18}"
        for side in sides.values():
            formula = side["formula_bytes"].get(name)
            row += f"{side['calls'].get(name, 0):>12}{side['counted_bytes'].get(name, 0):>16}"
            row += f"{formula if formula is not None else '-':>16}"
        print(row)
    for label, side in sides.items():
        print(f"{label}: {side['steps']} steps, {side['tokens']} tokens, up to {side['max_adapters_in_a_step']} "
              f"adapters in a step, mismatches with the formula: {len(side['mismatches'])}")
    lora_extra = sum(sides["lora"]["counted_bytes"].get(n, 0) for n in DATA_COLLECTIVES) - \
        sum(sides["lora"]["formula_bytes"].values())
    print(f"data-collective bytes LoRA adds beyond the base formula: {lora_extra}")
    report = {**report_header("tp_collectives", args), "sides": sides, "lora_extra_data_bytes": lora_extra}
    if args.out is not None:
        write_results(report, args.out)
    ok = not any(side["mismatches"] for side in sides.values()) and lora_extra == 0
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
