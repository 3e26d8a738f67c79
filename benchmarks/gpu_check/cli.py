"""Command line: check CUDA, run the sections in order, write the report, set the exit status."""

from __future__ import annotations

import argparse
import os
import random
import sys
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parents[1] / "results"

# name, title, time cap in seconds (a section checks its cap between cases; the throughput section's
# child process is killed at it)
SECTIONS = (
    ("kernels", "LoRA shrink/expand and paged attention (Triton) vs float64", 120),
    ("bandwidth", "kernels' achieved bandwidth vs a device copy", 60),
    ("hf_parity", "greedy tokens vs HF transformers (small random Llama)", 90),
    ("peft_parity", "mixed-adapter batch vs PEFT per request", 90),
    # tp before the long sections: it returns at once on one GPU and is short on two, and last it
    # could be skipped by --budget-s
    ("tp", "tensor parallelism: TP=1 vs TP=2 greedy tokens and collective bytes (needs 2 GPUs)", 120),
    ("decode_floor", "decode step vs the weight-read floor (Llama-7B shape, random bf16 weights)", 90),
    ("adapter_throughput", "throughput with 1, 100 and 1000 adapters", 180),
    ("prefix_cache", "multi-turn chat with the prefix cache on and off (greedy identical, prompt tokens computed, TTFT)", 90),
    ("slora_eval", "S-LoRA's S1 on a Llama-7B-shaped model: Tailor against PEFT, 5 and 100 adapters, open loop", 200),
)
NO_CUDA_MESSAGE = ("gpu-check: CUDA is not available (torch {torch} sees no GPU); run it on a machine with an "
                   "NVIDIA GPU (`make gpu-check`)")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.gpu_check", description=__package__ and
                                sys.modules[__package__].__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=RESULTS, help="folder for gpu_check.json and gpu_check.md")
    p.add_argument("--quick", action="store_true", help="smaller sizes (same checks)")
    p.add_argument("--sections", default=",".join(s[0] for s in SECTIONS),
                   help="comma-separated subset, in any order (they run in the listed order)")
    p.add_argument("--budget-s", type=float, default=420.0,
                   help="sections that would start after this many seconds are skipped (and count as failed)")
    p.add_argument("--seed", type=int, default=None, help="seed of the random inputs (default: a fresh one)")
    p.add_argument("--cpu-smoke", action="store_true",
                   help="FOR THE TEST SUITE ONLY: every section at toy sizes on the CPU, kernels under "
                        "TRITON_INTERPRET=1; its numbers mean nothing")
    args = p.parse_args(argv)
    unknown = set(args.sections.split(",")) - {s[0] for s in SECTIONS}
    if unknown:
        p.error(f"unknown sections {sorted(unknown)}; choose from {[s[0] for s in SECTIONS]}")
    return args


def _section_fn(name: str):
    """Import a section's module only when it runs (a broken import fails that section alone)."""
    import importlib

    module = importlib.import_module(f"benchmarks.gpu_check.{name}_section")
    return module.run


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.cpu_smoke:
        os.environ["TRITON_INTERPRET"] = "1"  # read by the kernels at dispatch
    import torch

    if not args.cpu_smoke and not torch.cuda.is_available():
        print(NO_CUDA_MESSAGE.format(torch=torch.__version__), file=sys.stderr)
        return 2
    from benchmarks.gpu_check import report as rep
    from benchmarks.gpu_check.sizes import MODES, Context

    device = torch.device("cpu" if args.cpu_smoke else "cuda")
    mode = "smoke" if args.cpu_smoke else ("quick" if args.quick else "full")
    seed = args.seed if args.seed is not None else random.SystemRandom().randrange(2**31)
    chosen = set(args.sections.split(","))
    report = {"mode": mode, "seed": seed, "argv": sys.argv[1:] if argv is None else list(argv),
              "environment": rep.environment(device), "sections": {}, "passed": False}
    started = time.monotonic()
    for name, title, cap in SECTIONS:
        if name not in chosen:
            continue
        elapsed = time.monotonic() - started
        if elapsed > args.budget_s:
            entry = {"name": name, "title": title, "status": "skipped", "passed": False,
                     "notes": [f"not started: {elapsed:.0f} s of the {args.budget_s:.0f} s budget were used"]}
        else:
            cap_s = float(min(cap, max(20.0, args.budget_s - elapsed)))  # no section runs past the budget
            ctx = Context(device=device, sizes=MODES[mode], seed=seed, cap_s=cap_s, smoke=args.cpu_smoke)
            print(f"gpu-check: {name} ...", flush=True)
            entry = rep.run_section(name, title, lambda: _section_fn(name)(ctx), device)
            entry["cap_s"] = cap_s
        report["sections"][name] = entry
        report["passed"] = all(e["status"] == "pass" for e in report["sections"].values())
        json_path, md_path = rep.write(report, args.out)
        print(f"gpu-check: {name}: {entry['status']} ({entry.get('seconds', 0)} s)"
              + (f": {entry['error']}" if "error" in entry else ""), flush=True)
    report["total_seconds"] = round(time.monotonic() - started, 1)
    json_path, md_path = rep.write(report, args.out)
    print(md_path.read_text())
    print(f"gpu-check: {'PASS' if report['passed'] else 'FAIL'} in {report['total_seconds']} s; wrote {json_path} "
          f"and {md_path}")
    return 0 if report["passed"] else 1
