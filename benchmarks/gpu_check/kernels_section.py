"""Section ``kernels``: every Triton kernel, both launch shapes, fp16 / bf16 / fp32, against float64.

Each case runs in its own try/except: a case that raises is recorded as failed with its error and
the section goes on. Under ``--cpu-smoke`` the kernels run under TRITON_INTERPRET=1, whose bf16
arithmetic is unreliable, so bf16 is skipped there (and only there).
"""

from __future__ import annotations

import torch

from benchmarks.gpu_check.attention_cases import attention_case, write_kv_case
from benchmarks.gpu_check.lora_cases import lora_case
from benchmarks.gpu_check.report import error_summary
from benchmarks.gpu_check.sizes import Context

DTYPES = (torch.float16, torch.bfloat16, torch.float32)
COLUMNS = ["case", "dtype", "shape", "max_abs_err", "tol_at_worst", "worst_ratio", "status"]


def _cases(ctx: Context):
    salt = 0
    for dtype in DTYPES:
        for op in ("shrink", "expand"):
            for shape in ("decode", "prefill"):
                salt += 1
                yield f"lora_{op} {shape}", dtype, (lambda d=dtype, o=op, s=shape, k=salt: lora_case(ctx, d, o, s, k))
        salt += 1
        yield "write_kv", dtype, (lambda d=dtype, k=salt: write_kv_case(ctx, d, k))
        salt += 1
        yield "paged_attention mixed", dtype, (lambda d=dtype, k=salt: attention_case(ctx, d, k))


def run(ctx: Context) -> dict:
    rows = []
    for name, dtype, fn in _cases(ctx):
        label = str(dtype).replace("torch.", "")
        if ctx.smoke and dtype == torch.bfloat16 and name != "write_kv":
            rows.append({"case": name, "dtype": label, "status": "skipped",
                         "note": "the Triton interpreter's bf16 arithmetic is unreliable (CPU smoke run only)"})
            continue
        if ctx.expired():
            rows.append({"case": name, "dtype": label, "status": "skipped", "note": "section time cap reached"})
            continue
        try:
            row = fn()
            row["status"] = "pass" if row["passed"] else "fail"
        except Exception as exc:  # one broken case must not hide the others
            row = {"case": name, "dtype": label, "status": "error", "passed": False, **error_summary(exc)}
        rows.append(row)
    ran = [r for r in rows if r["status"] != "skipped"]
    capped = any(r.get("note") == "section time cap reached" for r in rows)
    return {
        "passed": bool(ran) and all(r["status"] == "pass" for r in ran) and not capped,
        "columns": COLUMNS,
        "rows": rows,
        "notes": [
            "tolerance per element: 4 * (eps_out * |ref| + eps_acc * sqrt(K) * mag), mag = the float64 sum of "
            "|terms| (attention: see benchmarks/gpu_check/attention_cases.py); worst_ratio = max err / tolerance, "
            "pass if <= 1 and every value finite",
        ],
    }
