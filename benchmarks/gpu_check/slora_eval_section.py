"""Section ``slora_eval``: a short S-LoRA comparison (setting S1) on a Llama-7B-shaped model.

Runs ``benchmarks.slora_eval`` as a child process (the section's time cap is a hard limit: the
child is killed at it) with a random-weight fp16 Llama-7B (``random:llama-7b``, written into a
temporary folder; nothing downloaded), rank-8 adapters on q, k, v and o, n = 5 and 100 adapters,
Tailor in-process against the PEFT baseline on the same open-loop trace. The full tables (n up to
2,000, setting S2, longer traces) are the command in docs/benchmarks.md.

Pass: every request of every row completed. The rows (throughput, latency and first-token
percentiles, SLO attainment) and the ratios Tailor / PEFT and n=100 / n=5 are measurements.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from pathlib import Path

from benchmarks.gpu_check.report import REPO
from benchmarks.gpu_check.sizes import Context

COLUMNS = ["system", "adapters", "requests", "failed", "requests_per_s", "output_tokens_per_s", "latency_mean_s",
           "latency_p99_s", "ttft_p50_s", "ttft_p99_s", "slo_attainment"]


def command(ctx: Context, tmp: Path) -> list[str]:
    z = ctx.sizes
    return [
        sys.executable, "-m", "benchmarks.slora_eval", "--model", z.se_model, "--model-cache", str(tmp / "models"),
        "--random-dtype", z.se_dtype, "--dtype", z.se_dtype, "--device", ctx.device.type, "--systems", "tailor,peft",
        "--adapters", ",".join(str(n) for n in z.se_adapters), "--ranks", "8", "--rate", str(z.se_rate),
        "--duration-s", str(z.se_duration_s), "--input", f"{z.se_input[0]},{z.se_input[1]}",
        "--output", f"{z.se_output[0]},{z.se_output[1]}", "--seed", str(ctx.seed % 1000), "--no-plots",
        "--out-dir", str(tmp / "out"),
    ]


def run(ctx: Context) -> dict:
    with tempfile.TemporaryDirectory(prefix="gpu-check-slora-") as tmp:
        timeout = max(10.0, ctx.time_left())
        try:
            proc = subprocess.run(command(ctx, Path(tmp)), cwd=REPO, capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired as exc:
            tail = exc.stderr or b""
            tail = (tail.decode(errors="replace") if isinstance(tail, bytes) else tail)[-1500:]
            raise RuntimeError(f"benchmarks.slora_eval ran past the section's {timeout:.0f} s cap; its stderr "
                               f"ended with: {tail}") from None
        out = Path(tmp) / "out" / f"slora_eval-{ctx.device.type}.json"
        if proc.returncode != 0 or not out.is_file():
            raise RuntimeError(f"benchmarks.slora_eval exited {proc.returncode}: {proc.stderr[-2000:]}")
        data = json.loads(out.read_text())
    rows = [{"system": r["system"], "adapters": r["adapters"], "requests": r["requests"], "failed": r["failed"],
             "requests_per_s": r["requests_per_s"], "output_tokens_per_s": r["output_tokens_per_s"],
             "latency_mean_s": r["latency_s"]["mean"], "latency_p99_s": r["latency_s"]["p99"],
             "ttft_p50_s": r["ttft_s"]["p50"], "ttft_p99_s": r["ttft_s"]["p99"], "slo_attainment": r["slo_attainment"],
             "passed": r["failed"] == 0 and r["requests"] > 0} for r in data["rows"]]
    rate = {(r["system"], r["adapters"]): r["requests_per_s"] for r in rows}
    notes = ["pass means every request of every row completed; the figures are measurements (no target here)"]
    for n in ctx.sizes.se_adapters:
        if rate.get(("tailor", n)) and rate.get(("peft", n)):
            notes.append(f"n={n}: Tailor / PEFT requests/s = {rate[('tailor', n)] / rate[('peft', n)]:.2f}")
    return {"passed": bool(rows) and all(r["passed"] for r in rows), "model": data.get("model"),
            "args": {k: data["args"][k] for k in ("rate", "duration_s", "input", "output", "ranks")},
            "columns": COLUMNS, "rows": rows, "notes": notes}
