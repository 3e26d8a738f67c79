"""What the HTTP path costs: the same chats through the embedded server and through ``LLM.chat``.

The workload of issue 16: ``--concurrency`` (64) conversations, each one user message, greedy,
``--max-tokens`` (32) tokens, model ``base``. The HTTP side is the product as users run it: a
``tailor serve`` process (the embedded default: SQLite, in-process engine, CPU), a tenant with a
chat key, and every conversation sent at once to ``POST /v1/chat/completions`` from this process
(httpx, one connection each). The in-process side is ``LLM.chat`` on the same conversations, in
this process. Rounds alternate between the two so that both see the same machine; the table gives
each side's completion tokens per second (median round) and their ratio.

    python -m benchmarks.http_path                     # CPU, 3 rounds each
    python -m benchmarks.http_path --stream --rounds 5 # SSE streams instead of JSON answers
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import httpx

from benchmarks.live_server import free_port, start_server, stop_server, wait_ready, write_results

RESULTS = Path(__file__).resolve().parent / "results"
OPERATOR_TOKEN = "op_benchmark_http_path_0123456789"
TOPICS = ["the sea", "mountains", "bread", "rain", "a library", "trains", "the moon", "coffee", "bees",
          "winter", "a garden", "music", "bridges", "clocks", "deserts", "owls"]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--concurrency", type=int, default=64)
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--rounds", type=int, default=3, help="timed rounds of each side, alternating")
    p.add_argument("--stream", action="store_true", help="ask for SSE streams (stream: true)")
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args(argv)
    if args.rounds < 1 or args.concurrency < 1:
        p.error("--rounds and --concurrency must be >= 1")
    return args


def conversations(n: int) -> list[list[dict]]:
    return [[{"role": "user", "content": f"Write two sentences about {TOPICS[i % len(TOPICS)]} (note {i})."}]
            for i in range(n)]


# --------------------------------------------------------------------------- the server side
def chat_key(base: str) -> str:
    auth = {"Authorization": f"Bearer {OPERATOR_TOKEN}"}
    admin = httpx.post(f"{base}/v1/tenants", json={"name": f"bench-{time.time_ns()}"}, headers=auth).json()["api_key"]
    r = httpx.post(f"{base}/v1/api-keys", json={"scope": "chat"}, headers={"Authorization": f"Bearer {admin}"})
    return r.json()["api_key"]


async def _one(client: httpx.AsyncClient, key: str, messages: list[dict], max_tokens: int, stream: bool) -> int:
    body = {"model": "base", "messages": messages, "max_tokens": max_tokens, "temperature": 0, "stream": stream}
    headers = {"Authorization": f"Bearer {key}"}
    if not stream:
        r = await client.post("/v1/chat/completions", json=body, headers=headers)
        r.raise_for_status()
        return r.json()["usage"]["completion_tokens"]
    chunks = 0
    async with client.stream("POST", "/v1/chat/completions", json=body, headers=headers) as r:
        r.raise_for_status()
        async for line in r.aiter_lines():
            chunks += line.startswith("data: {") and '"content": ""' not in line and '"delta": {}' not in line
    return chunks  # one content chunk per step that produced text (a lower bound on tokens)


def engine_steps(base: str) -> tuple[float, float]:
    """``(steps, requests summed over steps)`` so far, from the server's batch-size histogram."""
    values = {}
    for line in httpx.get(f"{base}/metrics", timeout=10.0).text.splitlines():
        for name in ("tailor_inference_batch_size_count", "tailor_inference_batch_size_sum"):
            if line.startswith(name + " "):
                values[name] = float(line.split()[1])
    return values["tailor_inference_batch_size_count"], values["tailor_inference_batch_size_sum"]


async def http_round(base: str, key: str, convs: list[list[dict]], max_tokens: int, stream: bool) -> dict:
    limits = httpx.Limits(max_connections=len(convs), max_keepalive_connections=len(convs))
    steps_before, rows_before = engine_steps(base)
    async with httpx.AsyncClient(base_url=base, timeout=600.0, limits=limits) as client:
        started = time.perf_counter()
        tokens = await asyncio.gather(*(_one(client, key, c, max_tokens, stream) for c in convs))
        wall = time.perf_counter() - started
    steps, rows = engine_steps(base)
    return {"wall_s": wall, "completion_tokens": sum(tokens), "steps": steps - steps_before,
            "mean_batch": (rows - rows_before) / max(1.0, steps - steps_before)}


# --------------------------------------------------------------------------- the in-process side
def inprocess_round(llm, convs: list[list[dict]], max_tokens: int) -> dict:
    from inference import SamplingParams

    batches: list[int] = []
    observe = lambda batch_size, _tokens: batches.append(batch_size)  # noqa: E731
    llm.engine.step_observers.append(observe)
    try:
        started = time.perf_counter()
        outs = llm.chat(convs, SamplingParams(max_tokens=max_tokens, temperature=0.0))
        wall = time.perf_counter() - started
    finally:
        llm.engine.step_observers.remove(observe)
    return {"wall_s": wall, "completion_tokens": sum(len(o.token_ids) for o in outs), "steps": len(batches),
            "mean_batch": sum(batches) / max(1, len(batches))}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from inference import LLM

    convs = conversations(args.concurrency)
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    with tempfile.TemporaryDirectory(prefix="tailor-bench-http-") as tmp:
        settings = {"TAILOR_MODEL": args.model, "TAILOR_OPERATOR_TOKEN": OPERATOR_TOKEN,
                    "TAILOR_RATE_LIMIT_PER_MINUTE": "0", "TAILOR_CLEANUP_INTERVAL_S": "0"}
        server = start_server(settings, Path(tmp), port)
        try:
            wait_ready(base, server)
            key = chat_key(base)
            llm = LLM(model=args.model)
            try:
                asyncio.run(http_round(base, key, convs[:8], args.max_tokens, args.stream))  # warm-up
                inprocess_round(llm, convs[:8], args.max_tokens)
                rows = {"http": [], "inprocess": []}
                for r in range(args.rounds):
                    rows["http"].append(asyncio.run(http_round(base, key, convs, args.max_tokens, args.stream)))
                    rows["inprocess"].append(inprocess_round(llm, convs, args.max_tokens))
                    print(f"round {r + 1}: " + ", ".join(
                        f"{side} {rate(runs[-1]):.1f} tok/s in {runs[-1]['steps']:.0f} steps" for side, runs in rows.items()),
                        flush=True)
            finally:
                llm.close()
        finally:
            stop_server(server)
    return report(args, rows)


def rate(run: dict) -> float:
    return run["completion_tokens"] / run["wall_s"]


def report(args: argparse.Namespace, rows: dict[str, list[dict]]) -> int:
    rates = {side: [rate(run) for run in runs] for side, runs in rows.items()}
    medians = {side: statistics.median(values) for side, values in rates.items()}
    per_round = [h / i for h, i in zip(rates["http"], rates["inprocess"])]
    print(f"\n{args.concurrency} concurrent chats, {args.max_tokens} tokens, greedy, "
          f"{'SSE streams' if args.stream else 'JSON answers'}, {args.rounds} rounds each")
    print("| path | completion tokens/s (median) | rounds | engine steps per round | mean batch |")
    print("| --- | --- | --- | --- | --- |")
    for side in ("http", "inprocess"):
        steps = ", ".join(f"{run['steps']:.0f}" for run in rows[side])
        batch = statistics.median(run["mean_batch"] for run in rows[side])
        print(f"| {side} | {medians[side]:.1f} | {', '.join(f'{v:.1f}' for v in rates[side])} | {steps} | {batch:.1f} |")
    print(f"\nHTTP / in-process: {medians['http'] / medians['inprocess']:.2f} by the medians; "
          f"per round {', '.join(f'{v:.2f}' for v in per_round)}")
    result = {
        "benchmark": "http_path", "date": dt.date.today().isoformat(), "device": "cpu",
        "machine": {"cpus": os.cpu_count(), "processor": platform.processor() or platform.machine()},
        "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "rounds": rows,
        "tokens_per_s_median": medians, "ratio_median": medians["http"] / medians["inprocess"],
        "ratio_per_round": per_round,
    }
    write_results(result, args.out or RESULTS / f"http_path-cpu{'-stream' if args.stream else ''}.json")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
