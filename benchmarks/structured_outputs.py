"""Throughput of a batch with half its requests constrained to JSON schemas, against the same batch
unconstrained, in one run.

Each round runs B requests through one engine: the constrained side has every other request under
a JSON schema (``response_format``); the free side is the same batch with no schema, where each of
those requests is held to exactly the tokens its constrained twin produced (``max_tokens`` = that
count, ``ignore_eos``), so both sides compute the same tokens in the same steps and differ only by
the grammar work (mask fill, unpacking, the matcher advancing). Rounds alternate (constrained,
free, constrained, ...) so drift on a shared machine hits both sides alike; the table gives each
side's median wall time, output tokens per second and median CPU seconds of the process (steadier
than wall time on a shared machine), and the slowdown of the medians (goal: at most 10%). Grammars are compiled before the first round (and timed separately): compilation is
once per schema, not per request.

    python -m benchmarks.structured_outputs                       # SmolLM2-135M, B=16, 3 rounds a side
    python -m benchmarks.structured_outputs --model /path/to/ckpt --batch 4 --max-tokens 8 --rounds 1
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

from benchmarks.live_server import write_results
from benchmarks.run_report import report_header
from inference.bundled_model import BUNDLED_MODEL_NAME
from inference.engine import LLMEngine
from inference.engine_config import EngineConfig
from inference.sampling import SamplingParams
from inference.structured import StructuredOutput

RESULTS = Path(__file__).resolve().parent / "results"
NAME = {"type": "string", "maxLength": 16}
SCHEMAS = [
    {"type": "object", "properties": {"name": NAME, "age": {"type": "integer", "minimum": 0, "maximum": 120}},
     "required": ["name", "age"], "additionalProperties": False},
    {"type": "array", "items": {"type": "integer", "minimum": 0, "maximum": 999}, "minItems": 12, "maxItems": 12},
    {"type": "object", "properties": {"items": {"type": "array", "items": {
        "type": "object", "properties": {"id": {"type": "integer", "minimum": 0, "maximum": 50},
                                         "done": {"type": "boolean"}},
        "required": ["id", "done"], "additionalProperties": False}, "minItems": 3, "maxItems": 3}},
     "required": ["items"], "additionalProperties": False},
    {"type": "object", "properties": {"title": NAME, "year": {"type": "integer", "minimum": 1900, "maximum": 2030},
                                      "genres": {"type": "array", "items": {"enum": ["drama", "comedy", "crime"]},
                                                 "minItems": 2, "maxItems": 3}},
     "required": ["title", "year", "genres"], "additionalProperties": False},
]
PROMPTS = ["Describe a person as JSON.", "Tell me a story about the sea.", "List some numbers.",
           "What is the capital of France?", "Describe a film.", "Write a short poem about rain."]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=BUNDLED_MODEL_NAME)
    p.add_argument("--device", default="cpu")
    p.add_argument("--batch", type=int, default=16, help="requests per round; every other one is constrained")
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--rounds", type=int, default=3, help="rounds per side (alternating)")
    p.add_argument("--pool-mb", type=int, default=256)
    p.add_argument("--out", type=Path, default=None)
    return p.parse_args(argv)


def _round(engine: LLMEngine, batch: list[tuple[str, SamplingParams]]) -> tuple[float, float, dict[str, int]]:
    """Run ``batch`` to the end: (wall seconds of the steps, CPU seconds of this process in them,
    generated tokens per request id). On a shared machine the CPU seconds are the steadier figure:
    time spent waiting for a core does not count."""
    requests = [engine.make_request(prompt, params) for prompt, params in batch]  # compiled (or cached) here
    for request in requests:
        engine.add(request)
    started, cpu_started = time.perf_counter(), time.process_time()
    while engine.has_unfinished():
        engine.step()
    wall, cpu = time.perf_counter() - started, time.process_time() - cpu_started
    return wall, cpu, {r.request_id: len(r.output_token_ids) for r in requests}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    engine = LLMEngine(args.model, EngineConfig(device=args.device, pool_bytes=args.pool_mb << 20,
                                                max_num_seqs=max(args.batch, 1), enable_prefix_cache=False))
    specs = [StructuredOutput.json_schema(s, strict=True) for s in SCHEMAS]
    engine.grammars.load()  # the grammar engine's tokenizer, once per engine: not a schema's compile time
    compile_s = []
    for spec in specs:
        started = time.perf_counter()
        problems = engine.grammars.problems(spec)
        compile_s.append(time.perf_counter() - started)
        assert not problems, problems

    def constrained_batch() -> list[tuple[str, SamplingParams]]:
        out = []
        for i in range(args.batch):
            spec = specs[(i // 2) % len(specs)] if i % 2 == 0 else None
            out.append((PROMPTS[i % len(PROMPTS)], SamplingParams(max_tokens=args.max_tokens, temperature=0.0,
                                                                  structured=spec, ignore_eos=spec is None)))
        return out

    def free_batch(lengths: list[int]) -> list[tuple[str, SamplingParams]]:
        return [(prompt, SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True))
                for (prompt, _), n in zip(constrained_batch(), lengths)]

    _round(engine, constrained_batch())  # warm-up (first-touch of the pool, the grammars' lexers)
    walls: dict[str, list[float]] = {"constrained": [], "free": []}
    cpus: dict[str, list[float]] = {"constrained": [], "free": []}
    tokens: dict[str, int] = {}
    for _ in range(args.rounds):
        wall, cpu, produced = _round(engine, constrained_batch())
        lengths = list(produced.values())
        walls["constrained"].append(wall)
        cpus["constrained"].append(cpu)
        tokens["constrained"] = sum(lengths)
        wall, cpu, produced = _round(engine, free_batch(lengths))
        walls["free"].append(wall)
        cpus["free"].append(cpu)
        tokens["free"] = sum(produced.values())
        print(f"round {len(walls['free'])}: constrained {walls['constrained'][-1]:.2f} s wall "
              f"{cpus['constrained'][-1]:.2f} s CPU, free {wall:.2f} s wall {cpu:.2f} s CPU ({tokens['free']} tokens)",
              flush=True)
    assert tokens["free"] == tokens["constrained"], tokens
    rows = []
    for side in ("free", "constrained"):
        median = statistics.median(walls[side])
        rows.append({"side": side, "requests": args.batch, "constrained_requests": args.batch // 2 + args.batch % 2
                     if side == "constrained" else 0, "output_tokens": tokens[side], "wall_s": median,
                     "wall_s_all_rounds": walls[side], "tokens_per_s": tokens[side] / median,
                     "cpu_s": statistics.median(cpus[side]), "cpu_s_all_rounds": cpus[side]})
    slowdown = rows[1]["wall_s"] / rows[0]["wall_s"] - 1.0
    cpu_slowdown = rows[1]["cpu_s"] / rows[0]["cpu_s"] - 1.0
    print(f"{args.model} on {args.device}: batch {args.batch}, {args.rounds} rounds a side, "
          f"{tokens['free']} output tokens a round; compile per schema "
          f"{', '.join(f'{c * 1e3:.1f}' for c in compile_s)} ms")
    print(f"{'side':>12} {'requests':>8} {'json':>5} {'tokens':>7} {'wall s':>8} {'tok/s':>8} {'CPU s':>8}")
    for r in rows:
        print(f"{r['side']:>12} {r['requests']:>8} {r['constrained_requests']:>5} {r['output_tokens']:>7} "
              f"{r['wall_s']:>8.3f} {r['tokens_per_s']:>8.1f} {r['cpu_s']:>8.3f}")
    print(f"constrained half: {slowdown * 100:+.1f}% wall time, {cpu_slowdown * 100:+.1f}% CPU time "
          "(goal: at most +10%)")
    report = {**report_header("structured_outputs", args), "compile_s": compile_s, "results": rows,
              "slowdown": slowdown, "cpu_slowdown": cpu_slowdown}
    write_results(report, args.out or RESULTS / f"structured_outputs-{args.device}.json")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
