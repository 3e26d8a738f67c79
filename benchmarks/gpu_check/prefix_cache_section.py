"""Section ``prefix_cache``: a multi-turn chat trace through two engines, the prefix cache on and off.

Users share a long system prefix; every turn sends the user's whole conversation again (prefix,
earlier turns, the engine's own answers, a new message). The two engines (same random fp32 Llama,
same device) take the turns alternately, so both see the same machine state. Reported: greedy tokens
identical turn by turn, prompt tokens computed against prompt tokens sent (turns after each user's
first), and the median time to first token with the cache on and off.

Pass: every turn's tokens identical, and turns after the first compute under 30% of their prompt
(issue 18's goal; not at the CPU smoke test's toy sizes); the TTFT ratio is a measurement.
"""

from __future__ import annotations

import statistics
import tempfile
import time
from pathlib import Path

import torch

from benchmarks.gpu_check.checkpoints import close_engine, make_engine, write_llama
from benchmarks.gpu_check.sizes import Context
from inference.sampling import SamplingParams

COLUMNS = ["cache", "turns", "prompt_tokens", "computed_tokens", "computed_fraction_after_first",
           "ttft_median_ms", "ttft_median_after_first_ms"]


def _turn(engine, prompt: list[int], tenant: str, new_tokens: int) -> tuple[list[int], float, int]:
    """Run one turn alone; its output ids, seconds to the first token, prompt tokens computed."""
    params = SamplingParams(max_tokens=new_tokens, temperature=0.0, ignore_eos=True)
    before = engine.stats.prompt_tokens
    request = engine.make_request(prompt, params, tenant=tenant)
    engine.add(request)
    started = time.perf_counter()
    first = None
    while engine.has_unfinished():
        engine.step()
        if first is None and request.output_token_ids:
            first = time.perf_counter() - started
    if request.error:
        raise RuntimeError(f"turn failed: {request.error}")
    return list(request.output_token_ids), first or 0.0, engine.stats.prompt_tokens - before


def run(ctx: Context) -> dict:
    z = ctx.sizes
    gen = ctx.generator(salt=7)
    vocab = z.small_model["vocab_size"]

    def ids(n: int) -> list[int]:
        return torch.randint(3, vocab, (n,), generator=gen, device=ctx.device).tolist()

    def turn_len() -> int:
        lo, hi = z.pc_turn_tokens
        return int(torch.randint(lo, hi + 1, (1,), generator=gen, device=ctx.device))

    with tempfile.TemporaryDirectory(prefix="gpu-check-pc-") as tmp:
        checkpoint = write_llama(Path(tmp) / "llama", z.small_model, seed=ctx.seed + 5, max_positions=4096)
        pool = 512 << 20 if not ctx.smoke else 8 << 20
        page = {"page_tokens": 4} if ctx.smoke else {}
        engines = {on: make_engine(checkpoint, ctx.device, "float32", pool, enable_prefix_cache=on, **page)
                   for on in (True, False)}
        try:
            warm = ids(24)
            for engine in engines.values():  # first-use compilation out of the timings
                _turn(engine, warm, "warm-up", 2)
            prefix = ids(z.pc_prefix)
            histories = {u: list(prefix) for u in range(z.pc_users)}
            stats = {on: {"prompt": 0, "computed": 0, "prompt_after": 0, "computed_after": 0, "ttft": [],
                          "ttft_after": []} for on in engines}
            mismatches, turns = 0, 0
            for t in range(z.pc_turns):
                for user in range(z.pc_users):
                    if ctx.expired():
                        raise RuntimeError(f"ran past the section's cap after {turns} turns")
                    prompt = histories[user] + ids(turn_len())
                    outs = {}
                    for on, engine in engines.items():
                        tokens, ttft, computed = _turn(engine, prompt, f"tenant-{user % 2}", z.pc_new_tokens)
                        outs[on] = tokens
                        s = stats[on]
                        s["prompt"] += len(prompt)
                        s["computed"] += computed
                        s["ttft"].append(ttft)
                        if t > 0:
                            s["prompt_after"] += len(prompt)
                            s["computed_after"] += computed
                            s["ttft_after"].append(ttft)
                    mismatches += outs[True] != outs[False]
                    turns += 1
                    histories[user] = prompt + outs[True]
        finally:
            for engine in engines.values():
                close_engine(engine)
    rows = []
    for on in (True, False):
        s = stats[on]
        rows.append({"cache": "on" if on else "off", "turns": turns, "prompt_tokens": s["prompt"],
                     "computed_tokens": s["computed"],
                     "computed_fraction_after_first": round(s["computed_after"] / max(1, s["prompt_after"]), 4),
                     "ttft_median_ms": round(1e3 * statistics.median(s["ttft"]), 2),
                     "ttft_median_after_first_ms": round(1e3 * statistics.median(s["ttft_after"] or [0.0]), 2)})
    fraction = rows[0]["computed_fraction_after_first"]
    ratio = rows[1]["ttft_median_after_first_ms"] / max(1e-9, rows[0]["ttft_median_after_first_ms"])
    return {
        "passed": mismatches == 0 and (ctx.smoke or fraction < 0.3),
        "model": {**z.small_model, "dtype": "float32", "prefix_tokens": z.pc_prefix},
        "columns": COLUMNS,
        "rows": rows,
        "summary": {"greedy_mismatched_turns": mismatches, "turns": turns, "computed_fraction_after_first": fraction,
                    "ttft_ratio_off_over_on_after_first": round(ratio, 2)},
        "notes": [f"greedy tokens identical in {turns - mismatches}/{turns} turns; turns after the first computed "
                  f"{100 * fraction:.1f}% of their prompt tokens with the cache (goal < 30%); median TTFT after the "
                  f"first turn, cache off over on: {ratio:.2f}x"],
    }
