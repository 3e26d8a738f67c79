"""Run a benchmark on two revisions of Tailor side by side, alternating, on the same machine.

    python -m benchmarks.compare_revisions --base cfe99b3 --rounds 2 engine_vs_hf --repeats 2
    python -m benchmarks.compare_revisions --base cfe99b3 adapter_scaling --adapters 1,1000

The base revision is checked out into a temporary git worktree; each round runs the benchmark
module (``benchmarks.<name>`` with the arguments after its name) once in the base tree and once in
this one, in alternating order (base first in even rounds), each writing its own JSON. The figures
each benchmark reports as its result are then printed per revision (median over the rounds, and
every round): ``engine_vs_hf``'s engine tokens/s and engine/HF ratio; ``adapter_scaling``'s
tokens/s per adapter count and its throughput ratio against one adapter. Results also go to
``benchmarks/results/compare_revisions-<benchmark>.json``.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"


def figures(benchmark: str, result: dict) -> dict[str, float]:
    """The headline figures of one run's JSON."""
    if benchmark == "engine_vs_hf":
        engine = next(r for r in result["results"] if r["system"] == "engine")
        out = {"engine tokens/s": engine["tokens_per_s"]}
        if result.get("ratio_engine_over_hf") is not None:
            out["engine / HF"] = result["ratio_engine_over_hf"]
        return out
    if benchmark == "adapter_scaling":
        out = {f"{r['adapters']} adapters tokens/s": r["tokens_per_s"] for r in result["results"]}
        out.update({f"{r['adapters']} adapters / 1": r["ratio_vs_one_adapter"] for r in result["results"]
                    if r.get("ratio_vs_one_adapter") is not None})
        return out
    raise ValueError(f"no figures defined for benchmark {benchmark!r}")


def worktree(revision: str, where: Path) -> Path:
    path = where / f"base-{revision}"
    subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", str(path), revision], check=True,
                   stdout=subprocess.DEVNULL)
    return path


def run_once(tree: Path, benchmark: str, args: list[str], out: Path) -> dict:
    env = dict(os.environ, PYTHONPATH=str(tree))
    command = [sys.executable, "-m", f"benchmarks.{benchmark}", *args, "--out", str(out)]
    subprocess.run(command, cwd=tree, env=env, check=True)
    return json.loads(out.read_text())


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--base", required=True, help="the revision to compare against (a commit or ref)")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--out", type=Path, default=None,
                   help="JSON path (default benchmarks/results/compare_revisions-<benchmark>.json)")
    p.add_argument("benchmark", choices=["engine_vs_hf", "adapter_scaling"])
    p.add_argument("args", nargs=argparse.REMAINDER, help="arguments for the benchmark")
    args = p.parse_args(argv)
    head = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True,
                          text=True, check=True).stdout.strip()
    runs: dict[str, list[dict[str, float]]] = {"base": [], "head": []}
    with tempfile.TemporaryDirectory(prefix="tailor-compare-") as tmp:
        trees = {"base": worktree(args.base, Path(tmp)), "head": ROOT}
        try:
            for round_ in range(args.rounds):
                for name in (("base", "head") if round_ % 2 == 0 else ("head", "base")):
                    print(f"round {round_ + 1}/{args.rounds}: {name}", flush=True)
                    result = run_once(trees[name], args.benchmark, args.args, Path(tmp) / f"{name}-{round_}.json")
                    runs[name].append(figures(args.benchmark, result))
        finally:
            subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(trees["base"])], check=False)
    report(args, head, runs)
    return 0


def report(args: argparse.Namespace, head: str, runs: dict[str, list[dict[str, float]]]) -> None:
    keys = list(runs["head"][0])
    print(f"\n{'figure':<24} {'base ' + args.base:>16} {'head ' + head:>16} {'head / base':>12}")
    table = []
    for key in keys:
        base = statistics.median(r[key] for r in runs["base"])
        new = statistics.median(r[key] for r in runs["head"])
        table.append({"figure": key, "base": base, "head": new, "head_over_base": new / base,
                      "base_rounds": [r[key] for r in runs["base"]], "head_rounds": [r[key] for r in runs["head"]]})
        print(f"{key:<24} {base:>16.3f} {new:>16.3f} {new / base:>12.3f}")
    out = args.out or RESULTS / f"compare_revisions-{args.benchmark}.json"
    out.write_text(json.dumps({
        "benchmark": "compare_revisions", "compared": args.benchmark, "args": args.args, "base": args.base,
        "head": head, "rounds": args.rounds, "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "figures": table,
    }, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    sys.exit(main())
