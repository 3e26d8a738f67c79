"""Throughput of Tailor's engine against Hugging Face ``generate`` with static batches.

Run: ``python -m benchmarks.engine_vs_hf`` (or ``make bench``).

Both systems serve the *same* requests (:mod:`benchmarks.workload`: prompts of random ordinary
token ids, input lengths uniform in [--min-input, --max-input], output lengths uniform in
[--min-output, --max-output]) with greedy decoding, in one process, one after the other
(``--repeats N`` interleaves N timed runs of each and reports the median):

* **engine**: every request is submitted at once to ``LLM.generate`` with
  ``SamplingParams(max_tokens=output_len, temperature=0, ignore_eos=True)``: continuous batching
  (``--engine-max-num-seqs`` sequences per step) generates exactly ``output_len`` tokens each.
* **hf**: ``AutoModelForCausalLM.from_pretrained(checkpoint, dtype=<engine dtype>)``; requests are
  cut into static batches of ``--batch-size`` in arrival order, each left-padded (attention mask,
  position ids from the mask) and run with ``generate(do_sample=False)`` with EOS stopping turned
  off. ``generate`` takes one ``max_new_tokens`` per batch (``min_new_tokens`` cannot be set per
  row either), so each batch runs until its *longest* request's ``output_len``: that is what static
  batching costs. Only each request's requested tokens count as useful output, so both systems are
  credited with the same number of output tokens; HF's extra tokens are reported as
  ``computed_tokens`` (batch rows x steps).

Throughput = useful output tokens / wall seconds (time.perf_counter around the generation calls
only; model loading and a small warm-up run of each system are excluded). The ratio is engine
tokens/s over HF tokens/s (equal to the requests/s ratio, since both finish the same requests).

For each timed run the JSON records ``other_cpus``: the average number of CPUs that *other*
processes kept busy (from /proc/stat minus this process's CPU time); a warning is printed when it
shows competition. On a small shared machine a busy neighbour slows both systems, HF's
``generate`` far more than the engine when torch runs as many intra-op threads as there are cores,
so the ratio then means little (see ``--threads``, ``--repeats``).

Correctness is checked cheaply in the same run: greedy tokens of the engine and of HF are compared
over each request's requested length. Left padding and different kernels can legitimately flip a
near-tie argmax, after which the continuations diverge, so mismatches are reported, never fatal.

Results go to stdout (a table) and to ``benchmarks/results/engine_vs_hf-<device>.json``.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

from benchmarks.workload import BenchRequest, make_requests, summarize

RESULTS_DIR = Path(__file__).resolve().parent / "results"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", default="smollm2-135m", help="bundled model name or HF checkpoint directory")
    p.add_argument("--num-requests", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=32, help="HF static batch size")
    p.add_argument("--min-output", type=int, default=8)
    p.add_argument("--max-output", type=int, default=128)
    p.add_argument("--min-input", type=int, default=8)
    p.add_argument("--max-input", type=int, default=64)
    p.add_argument("--device", default="cpu", help="cpu or cuda[:N]")
    p.add_argument("--dtype", default="auto", help="engine dtype (auto: fp32 on CPU, bf16 on CUDA); HF uses the same")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--engine-max-num-seqs", type=int, default=128)
    p.add_argument("--engine-max-num-batched-tokens", type=int, default=2048)
    p.add_argument(
        "--repeats", type=int, default=1,
        help="timed runs of each system, interleaved engine/hf; wall time is the median",
    )
    p.add_argument("--warmup-requests", type=int, default=4, help="requests in each system's warm-up run")
    p.add_argument(
        "--threads", type=int, default=None,
        help="torch.set_num_threads for both systems (default: leave torch's default). On a small shared "
        "CPU, fewer intra-op threads than cores can be much faster when other processes compete.",
    )
    p.add_argument("--skip-hf", action="store_true", help="time the engine only (e.g. for profiling)")
    p.add_argument("--out", type=Path, default=None, help="JSON path (default benchmarks/results/engine_vs_hf-<device>.json)")
    args = p.parse_args(argv)
    problems = []
    if args.num_requests < 1:
        problems.append("--num-requests must be >= 1")
    if args.batch_size < 1:
        problems.append("--batch-size must be >= 1")
    if not 1 <= args.min_output <= args.max_output:
        problems.append("need 1 <= --min-output <= --max-output")
    if not 1 <= args.min_input <= args.max_input:
        problems.append("need 1 <= --min-input <= --max-input")
    if args.repeats < 1:
        problems.append("--repeats must be >= 1")
    if args.threads is not None and args.threads < 1:
        problems.append("--threads must be >= 1")
    if problems:
        p.error("; ".join(problems))
    return args


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ---------------------------------------------------------------------------- engine
def run_engine(llm: Any, requests: list[BenchRequest]) -> tuple[list[list[int]], float, dict[str, int]]:
    """Generate every request through the engine; return token ids, wall seconds, stats delta."""
    from inference import SamplingParams

    prompts = [r.prompt_token_ids for r in requests]
    params = [SamplingParams(max_tokens=r.output_len, temperature=0.0, ignore_eos=True) for r in requests]
    stats = llm.engine.stats
    before = {k: getattr(stats, k) for k in ("steps", "prompt_tokens", "generation_tokens", "preemptions", "batch_size_sum")}
    _sync(llm.engine.device)
    start = time.perf_counter()
    outputs = llm.generate(prompts, params)
    _sync(llm.engine.device)
    wall = time.perf_counter() - start
    delta = {k: getattr(stats, k) - v for k, v in before.items()}
    tokens = [list(o.token_ids) for o in outputs]
    for r, t in zip(requests, tokens):
        if len(t) != r.output_len:
            raise RuntimeError(f"engine request {r.index}: {len(t)} tokens, asked for {r.output_len}")
    return tokens, wall, delta


# ---------------------------------------------------------------------------- HF
def load_hf(checkpoint_dir: Path, device: torch.device, dtype: torch.dtype) -> Any:
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    model = AutoModelForCausalLM.from_pretrained(str(checkpoint_dir), dtype=dtype).to(device)
    model.eval()
    # generate() fills every generation-config field left at None from model.generation_config, so
    # EOS stopping is only off if it is off there too. With it on, a row that emits EOS is padded
    # from then on (and a batch of one stops early), so HF would not compute what the engine does.
    model.generation_config.eos_token_id = None
    return model


def _hf_generation_config(model: Any, max_new_tokens: int, pad_id: int) -> Any:
    """Greedy, exactly ``max_new_tokens`` steps: EOS stopping off (the logits are untouched,
    unlike ``min_new_tokens``, which would forbid EOS and change greedy tokens). Needs
    :func:`load_hf`, which also clears ``eos_token_id`` in the model's own generation config."""
    if model.generation_config.eos_token_id is not None:
        raise RuntimeError("load the HF model with load_hf(): its generation config must not stop at EOS")
    import copy

    config = copy.deepcopy(model.generation_config)
    config.do_sample = False
    config.num_beams = 1
    config.temperature = None
    config.top_p = None
    config.top_k = None
    config.max_new_tokens = max_new_tokens
    config.min_new_tokens = None
    config.max_length = None
    config.eos_token_id = None
    config.pad_token_id = pad_id
    return config


def run_hf(
    model: Any, requests: list[BenchRequest], batch_size: int, pad_id: int, device: torch.device
) -> tuple[list[list[int]], float, dict[str, int]]:
    """Static batches of ``batch_size`` in arrival order, each run to its longest request."""
    tokens: list[list[int]] = []
    computed = 0
    steps = 0
    wall = 0.0
    for first in range(0, len(requests), batch_size):
        batch = requests[first : first + batch_size]
        width = max(r.input_len for r in batch)
        ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for row, r in enumerate(batch):
            ids[row, width - r.input_len :] = torch.tensor(r.prompt_token_ids)
            mask[row, width - r.input_len :] = 1
        ids, mask = ids.to(device), mask.to(device)
        new_tokens = max(r.output_len for r in batch)
        config = _hf_generation_config(model, new_tokens, pad_id)
        _sync(device)
        start = time.perf_counter()
        with torch.inference_mode():
            out = model.generate(input_ids=ids, attention_mask=mask, generation_config=config)
        _sync(device)
        wall += time.perf_counter() - start
        generated = out[:, width:].cpu()
        if generated.shape[1] != new_tokens:
            raise RuntimeError(f"HF generated {generated.shape[1]} tokens, asked for {new_tokens}")
        tokens.extend(generated[row, : r.output_len].tolist() for row, r in enumerate(batch))
        computed += len(batch) * new_tokens
        steps += new_tokens
    return tokens, wall, {"batches": -(-len(requests) // batch_size), "steps": steps, "computed_tokens": computed}


# ---------------------------------------------------------------------------- report
def compare(engine_tokens: list[list[int]], hf_tokens: list[list[int]]) -> dict[str, Any]:
    exact = 0
    prefix_fraction = 0.0
    first_divergence: list[int] = []
    for e, h in zip(engine_tokens, hf_tokens):
        common = next((i for i, (a, b) in enumerate(zip(e, h)) if a != b), len(e))
        if common == len(e) == len(h):
            exact += 1
        else:
            first_divergence.append(common)
        prefix_fraction += common / max(1, len(e))
    n = len(engine_tokens)
    return {
        "requests": n,
        "exact_match": exact,
        "mean_common_prefix_fraction": prefix_fraction / max(1, n),
        "first_divergence_positions": first_divergence,
    }


def _row(name: str, requests: int, tokens: int, wall: float) -> dict[str, Any]:
    return {
        "system": name,
        "requests": requests,
        "output_tokens": tokens,
        "wall_s": wall,
        "tokens_per_s": tokens / wall if wall > 0 else float("nan"),
        "requests_per_s": requests / wall if wall > 0 else float("nan"),
    }


def print_table(rows: list[dict[str, Any]]) -> None:
    header = f"{'system':<8} {'requests':>8} {'output tokens':>13} {'wall s':>9} {'tokens/s':>10} {'requests/s':>10}"
    print(header)
    print("-" * len(header))
    for r in rows:
        print(
            f"{r['system']:<8} {r['requests']:>8d} {r['output_tokens']:>13d} {r['wall_s']:>9.2f} "
            f"{r['tokens_per_s']:>10.1f} {r['requests_per_s']:>10.3f}"
        )


def _git_state() -> dict[str, Any] | None:
    """Commit and dirtiness of the checkout the benchmark runs from (None outside git)."""
    import subprocess

    root = Path(__file__).resolve().parent.parent
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, check=True, timeout=10
        ).stdout.strip()
        status = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no", "--", ".", ":(exclude)benchmarks/results"],
            cwd=root, capture_output=True, text=True, check=True, timeout=10,
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    return {"commit": commit, "dirty": bool(status.strip())}


def _cpu_snapshot() -> tuple[float, float] | None:
    """(CPU seconds all processes have been busy, incl. steal; CPU seconds of this process)."""
    try:
        with open("/proc/stat") as f:
            values = [int(v) for v in f.readline().split()[1:9]]  # user nice system idle iowait irq softirq steal
        hz = os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError):
        return None
    busy = sum(values) - values[3] - values[4]
    own = os.times()
    return busy / hz, own.user + own.system


def _contention(before: tuple[float, float] | None, wall: float) -> dict[str, Any]:
    """How many CPUs, on average over ``wall`` seconds, other processes kept busy (None off Linux)."""
    after = _cpu_snapshot()
    others = None
    if before is not None and after is not None and wall > 0:
        others = max(0.0, ((after[0] - before[0]) - (after[1] - before[1])) / wall)
    try:
        load = [round(x, 2) for x in os.getloadavg()]
    except OSError:
        load = None
    return {"other_cpus": None if others is None else round(others, 3), "loadavg_after": load}


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    name = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    name = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return f"{name} ({os.cpu_count()} logical CPUs)"


def _timed_row(name: str, requests: int, useful: int, walls: list[float], loads: list[dict]) -> dict[str, Any]:
    row = _row(name, requests, useful, statistics.median(walls))
    row["wall_s_all"] = walls
    row["contention"] = loads
    return row


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from inference import LLM

    torch.manual_seed(args.seed)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    print(f"loading engine ({args.model}, device={args.device}, dtype={args.dtype}) ...", flush=True)
    llm = LLM(
        args.model,
        device=args.device,
        dtype=args.dtype,
        max_num_seqs=args.engine_max_num_seqs,
        max_num_batched_tokens=args.engine_max_num_batched_tokens,
    )
    try:
        device = llm.engine.device
        dtype = llm.engine.dtype
        checkpoint_dir = llm.engine.checkpoint_dir
        requests = make_requests(
            args.num_requests,
            seed=args.seed,
            input_len_range=(args.min_input, args.max_input),
            output_len_range=(args.min_output, args.max_output),
            tokenizer=llm.tokenizer,
        )
        workload = summarize(requests)
        useful = workload["output_tokens"]
        print(
            f"workload: {workload['requests']} requests, {workload['input_tokens']} prompt tokens, {useful} output "
            f"tokens (input {args.min_input}-{args.max_input}, output {args.min_output}-{args.max_output})",
            flush=True,
        )
        warmup = make_requests(
            max(1, args.warmup_requests), seed=args.seed + 1, input_len_range=(8, 16), output_len_range=(4, 8),
            tokenizer=llm.tokenizer,
        )
        model = None
        pad_id = 0
        if not args.skip_hf:
            print(f"loading HF model ({checkpoint_dir}, {dtype}) ...", flush=True)
            model = load_hf(checkpoint_dir, device, dtype)
            pad_id = model.generation_config.pad_token_id
            if pad_id is None:
                pad_id = llm.tokenizer.eos_token_id or 0

        run_engine(llm, warmup)
        if model is not None:
            run_hf(model, warmup, min(args.batch_size, len(warmup)), pad_id, device)

        # Interleaved repeats (engine, hf, engine, hf, ...) so that a change in background load
        # affects both systems alike; the engine thread idles (blocked on an event) during HF runs.
        engine_walls: list[float] = []
        engine_loads: list[dict] = []
        hf_walls: list[float] = []
        hf_loads: list[dict] = []
        engine_tokens = hf_tokens = None
        engine_deterministic = True
        for repeat in range(args.repeats):
            tag = f" (repeat {repeat + 1}/{args.repeats})" if args.repeats > 1 else ""
            print(f"engine: running{tag} ...", flush=True)
            before = _cpu_snapshot()
            tokens, wall, engine_stats = run_engine(llm, requests)
            engine_walls.append(wall)
            engine_loads.append(_contention(before, wall))
            print(f"engine: {wall:.2f} s, {engine_stats['steps']} steps", flush=True)
            if engine_tokens is None:
                engine_tokens = tokens
            elif tokens != engine_tokens:
                engine_deterministic = False
            if model is not None:
                print(f"hf: running{tag} ...", flush=True)
                before = _cpu_snapshot()
                tokens, wall, hf_stats = run_hf(model, requests, args.batch_size, pad_id, device)
                hf_walls.append(wall)
                hf_loads.append(_contention(before, wall))
                print(f"hf: {wall:.2f} s, {hf_stats['steps']} steps", flush=True)
                if hf_tokens is None:
                    hf_tokens = tokens
    finally:
        llm.close()

    engine_row = _timed_row("engine", len(requests), useful, engine_walls, engine_loads)
    steps = max(1, engine_stats["steps"])
    engine_row["stats"] = dict(
        engine_stats, mean_batch_size=engine_stats["batch_size_sum"] / steps, deterministic=engine_deterministic
    )
    rows = [engine_row]
    correctness = None
    if model is not None:
        hf_row = _timed_row("hf", len(requests), useful, hf_walls, hf_loads)
        hf_row["stats"] = dict(hf_stats, wasted_tokens=hf_stats["computed_tokens"] - useful)
        rows.append(hf_row)
        correctness = compare(engine_tokens, hf_tokens)
        del model

    print()
    if args.repeats > 1:
        print(f"(median of {args.repeats} interleaved runs)")
    print_table(rows)
    ratio = None
    if len(rows) == 2:
        ratio = rows[0]["tokens_per_s"] / rows[1]["tokens_per_s"]
        hf_stats = rows[1]["stats"]
        print(f"\nengine / hf throughput: {ratio:.2f}x (goal >= 2x: {'met' if ratio >= 2 else 'NOT met'})")
        print(
            f"engine: {engine_stats['steps']} steps, mean batch {engine_row['stats']['mean_batch_size']:.1f}, "
            f"{engine_stats['preemptions']} preemptions; hf static batches of {args.batch_size}: {hf_stats['steps']} "
            f"steps, computed {hf_stats['computed_tokens']} tokens for {useful} useful "
            f"({hf_stats['wasted_tokens']} past a request's length)"
        )
        print(
            f"greedy agreement: {correctness['exact_match']}/{correctness['requests']} requests identical over their "
            f"requested length (mean common prefix {100 * correctness['mean_common_prefix_fraction']:.1f}%)"
        )
    others = [x["other_cpus"] for x in engine_loads + hf_loads if x["other_cpus"] is not None]
    if device.type == "cpu" and others and max(others) > 0.25:
        print(
            f"warning: other processes kept up to {max(others):.2f} of {os.cpu_count()} CPUs busy during a timed run; "
            "these timings (HF's especially) are unreliable"
        )

    import transformers

    out_path = args.out or RESULTS_DIR / f"engine_vs_hf-{str(device).replace(':', '-')}.json"
    report = {
        "benchmark": "engine_vs_hf",
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "device": str(device),
        "device_name": device_name(device),
        "dtype": str(dtype).removeprefix("torch."),
        "torch_version": torch.__version__,
        "transformers_version": transformers.__version__,
        "python_version": platform.python_version(),
        "torch_num_threads": torch.get_num_threads(),
        "git": _git_state(),
        "checkpoint_dir": str(checkpoint_dir),
        "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "workload": workload,
        "results": rows,
        "ratio_engine_over_hf": ratio,
        "correctness": correctness,
    }
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_text(json.dumps(report, indent=2) + "\n")
    print(f"\nwrote {out_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
