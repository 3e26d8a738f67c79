"""CPU GEMM time of one decode step's projections against the number of activation rows.

The engine's CPU projections (``inference.backends.cpu.gemm.linear_weight_left``) compute ``x @ W.T`` as
``(W @ x.T).T`` with the rows of ``x`` padded to ``cpu_gemm_rows(rows)``. This script measures why:
for each row count it times every projection of a Llama-shaped model (random weights, all layers,
so the weights stream from memory as in a real step) and the LM head in three forms, interleaved
over ``--repeats`` rounds (the median is reported):

* ``F.linear``: ``torch.nn.functional.linear(x, W)``;
* ``weight-left``: ``torch.mm(W, x.T).T``;
* ``engine``: the engine's form, weight-left with the rows padded.

    python -m benchmarks.cpu_gemm_rows                       # SmolLM2-135M shapes, rows 1..80
    python -m benchmarks.cpu_gemm_rows --rows 1,7,8,15,16 --repeats 5

Results go to stdout and ``benchmarks/results/cpu_gemm_rows-<preset>.json``.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import statistics
import time
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

from benchmarks.decode_step import PRESETS
from benchmarks.engine_vs_hf import device_name
from inference.backends.cpu.gemm import cpu_gemm_rows, linear_weight_left

RESULTS = Path(__file__).resolve().parent / "results"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", choices=sorted(PRESETS), default="smollm2-135m")
    p.add_argument("--rows", default="1-80", help="comma-separated row counts or ranges (a-b)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args(argv)
    try:
        args.row_counts = _parse_rows(args.rows)
    except ValueError as exc:
        p.error(f"--rows: {exc}")
    if args.repeats < 1:
        p.error("--repeats must be >= 1")
    return args


def _parse_rows(spec: str) -> list[int]:
    rows: list[int] = []
    for part in spec.split(","):
        lo, _, hi = part.partition("-")
        first, last = int(lo), int(hi or lo)
        if not 1 <= first <= last:
            raise ValueError(f"bad range {part!r}")
        rows.extend(range(first, last + 1))
    return rows


def projection_weights(preset: str, seed: int = 0) -> list[torch.Tensor]:
    """fp32 weights of every projection of the preset, in forward order, plus the LM head."""
    c = PRESETS[preset]
    hidden, inter = c["hidden_size"], c["intermediate_size"]
    head_dim = hidden // c["num_attention_heads"]
    kv = c["num_key_value_heads"] * head_dim
    gen = torch.Generator().manual_seed(seed)
    shapes = [(hidden + 2 * kv, hidden), (hidden, hidden), (2 * inter, hidden), (hidden, inter)]
    weights = [torch.randn(s, generator=gen) for _ in range(c["num_hidden_layers"]) for s in shapes]
    return weights + [torch.randn((c["vocab_size"], hidden), generator=gen)]


FORMS: dict[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = {
    "F.linear": F.linear,
    "weight-left": lambda x, w: torch.mm(w, x.t()).t(),
    "engine": linear_weight_left,
}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    weights = projection_weights(args.preset)
    inputs = {
        rows: {w.shape[1]: torch.randn(rows, w.shape[1]) for w in weights} for rows in args.row_counts
    }
    times: dict[tuple[int, str], list[float]] = {}
    for _ in range(args.repeats):
        for rows in args.row_counts:
            for name, form in FORMS.items():
                xs = inputs[rows]
                start = time.perf_counter()
                for w in weights:
                    form(xs[w.shape[1]], w)
                times.setdefault((rows, name), []).append(time.perf_counter() - start)
    results = []
    print(f"{'rows':>5} {'padded':>6} " + " ".join(f"{n + ' ms':>15}" for n in FORMS) + f" {'engine/F.linear':>16}")
    for rows in args.row_counts:
        ms = {name: 1000 * statistics.median(times[(rows, name)]) for name in FORMS}
        ratio = ms["engine"] / ms["F.linear"]
        results.append({"rows": rows, "padded_rows": cpu_gemm_rows(rows), "ms": ms, "engine_over_f_linear": ratio})
        print(f"{rows:>5} {cpu_gemm_rows(rows):>6} " + " ".join(f"{ms[n]:>15.1f}" for n in FORMS) + f" {ratio:>16.2f}")
    ratios = [r["engine_over_f_linear"] for r in results]
    print(f"\nengine / F.linear over these row counts: median {statistics.median(ratios):.2f}, "
          f"range {min(ratios):.2f}-{max(ratios):.2f}")
    out = args.out or RESULTS / f"cpu_gemm_rows-{args.preset}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({
        "benchmark": "cpu_gemm_rows",
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "device_name": device_name(torch.device("cpu")),
        "torch_version": torch.__version__,
        "torch_num_threads": torch.get_num_threads(),
        "preset": args.preset,
        "repeats": args.repeats,
        "results": results,
    }, indent=2) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
