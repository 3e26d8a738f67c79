"""Section ``adapter_throughput``: tokens/s with 1, 100 and 1000 adapters, the ratio to 1 adapter.

Runs ``benchmarks.adapter_scaling`` (S-LoRA's throughput experiment: the same requests each
time, all submitted at once, adapters drawn uniformly from N registered random rank-8 adapters on
q, k, v, o) on a mid-size random Llama written to a temporary folder. It runs as a child process
so that the section's time cap is a hard limit (the child is killed when it runs past it).
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
import tempfile
from pathlib import Path

from benchmarks.gpu_check.checkpoints import write_llama
from benchmarks.gpu_check.report import REPO
from benchmarks.gpu_check.sizes import Context

COLUMNS = ["adapters", "distinct_used", "requests", "output_tokens", "wall_s", "tokens_per_s", "ratio_vs_1",
           "host_misses", "device_loads", "status"]
RANK = 8


def _command(ctx: Context, checkpoint: Path, out: Path) -> list[str]:
    z = ctx.sizes
    return [
        sys.executable, "-m", "benchmarks.adapter_scaling", "--model", str(checkpoint),
        "--device", ctx.device.type, "--dtype", "auto", "--num-requests", str(z.tp_requests),
        "--adapters", ",".join(str(a) for a in z.tp_adapters), "--rank", str(RANK),
        "--min-input", str(z.tp_input[0]), "--max-input", str(z.tp_input[1]),
        "--min-output", str(z.tp_output[0]), "--max-output", str(z.tp_output[1]),
        "--max-num-seqs", str(z.tp_max_num_seqs), "--repeats", "1", "--seed", str(ctx.seed % 1000),
        "--out", str(out),
    ]


def run(ctx: Context) -> dict:
    z = ctx.sizes
    with tempfile.TemporaryDirectory(prefix="gpu-check-tp-") as tmp:
        checkpoint = write_llama(Path(tmp) / "llama", z.tp_model, seed=ctx.seed + 2)
        out = Path(tmp) / "scaling.json"
        timeout = max(10.0, ctx.time_left())
        try:
            proc = subprocess.run(_command(ctx, checkpoint, out), cwd=REPO, capture_output=True, text=True,
                                  timeout=timeout)
        except subprocess.TimeoutExpired as exc:
            tail = (exc.stdout or b"")[-1500:]
            tail = tail.decode(errors="replace") if isinstance(tail, bytes) else tail
            raise RuntimeError(f"benchmarks.adapter_scaling ran past the section's {timeout:.0f} s cap; "
                               f"its output ended with: {tail}") from None
        if proc.returncode != 0 or not out.is_file():
            raise RuntimeError(f"benchmarks.adapter_scaling exited {proc.returncode}: {proc.stderr[-2000:]}")
        data = json.loads(out.read_text())
    rows = []
    for r in data["results"]:
        ok = r["output_tokens"] > 0 and r["wall_s"] > 0 and math.isfinite(r["ratio_vs_one_adapter"])
        rows.append({"adapters": r["adapters"], "distinct_used": r["distinct_used"], "requests": r["requests"],
                     "output_tokens": r["output_tokens"], "wall_s": r["wall_s"], "tokens_per_s": r["tokens_per_s"],
                     "ratio_vs_1": r["ratio_vs_one_adapter"], "host_misses": r["host_misses"],
                     "device_loads": r["device_loads"], "status": "pass" if ok else "fail", "passed": ok})
    return {
        "passed": len(rows) == len(z.tp_adapters) and all(r["passed"] for r in rows),
        "model": {**z.tp_model, "rank": RANK, "register_seconds": data.get("register_seconds")},
        "workload": data.get("workload"),
        "columns": COLUMNS,
        "rows": rows,
        "notes": ["pass means the runs completed with every requested token (a measurement, no target); "
                  "ratio_vs_1 = this row's requests/s over the 1-adapter row's, one round each"],
    }
