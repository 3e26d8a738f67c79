"""Adapter-affinity routing against round-robin over two replicas: device-tier hit rate and throughput.

Two inference replicas, each an in-process engine behind an ``InferenceCore`` (the inference
service's core, without its HTTP layer), share one object store holding ``--adapters`` rank-r
adapters. Each replica's unified pool is sized to hold ``--room`` adapters next to the KV pages of
a full batch (``--max-num-seqs`` requests of the longest prompt and output). A trace of
``--num-requests`` chat requests picks adapters Zipf-popular (P(rank k) proportional to 1/k^s,
``--zipf``; ranks shuffled over the ids). Both policies serve the same trace with
``--concurrency`` clients in a closed loop:

* affinity: the api's ``api.replicas.ReplicaRouter`` (rendezvous hashing of the adapter id with
  bounded loads), fed with the two cores as its backends;
* round-robin: the next replica in turn, whatever the adapter.

Every run starts from fresh replicas (cold host and device tiers); rounds alternate which policy
runs first. Counts come from the engines' adapter statistics: device hit rate = admissions
served from device pages / all admissions (a count, so machine load does not move it), page-ins
(device loads), fetches from the store (host loads). Throughput is requests / wall time of the
whole trace, side by side in one run; the reported ratio is the median of the rounds' ratios.

    python -m benchmarks.replica_routing                                  # CPU defaults (random:tiny)
    python -m benchmarks.replica_routing --model smollm2-135m --num-requests 600
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import itertools
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from api.replicas import ReplicaRouter
from benchmarks.live_server import write_results
from benchmarks.random_llama import checkpoint_for
from benchmarks.run_report import median_run, report_header
from benchmarks.synthetic_adapters import synthetic_adapter
from inference import LLM
from inference.adapters.object_store import LocalFolderStore
from inference.model_config import ModelConfig
from inference.page_pool import PageGeometry
from inference.service.core import InferenceCore
from inference.service.events import GenerationEnded
from inference.service.protocol import AdapterSpec, ChatTurn, GenerateRequest

RESULTS = Path(__file__).resolve().parent / "results"
POLICIES = ("affinity", "round_robin")
TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="random:tiny", help="a model name, a checkpoint folder or random:<shape>")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="auto")
    p.add_argument("--adapters", type=int, default=200)
    p.add_argument("--replicas", type=int, default=2)
    p.add_argument("--room", type=int, default=40, help="adapters each replica's device tier holds")
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--zipf", type=float, default=1.0, help="Zipf exponent s of adapter popularity")
    p.add_argument("--num-requests", type=int, default=800)
    p.add_argument("--concurrency", type=int, default=8, help="clients in the closed loop (all replicas)")
    p.add_argument("--max-num-seqs", type=int, default=8, help="batch size bound of each replica")
    p.add_argument("--prompt-words", type=int, default=8)
    p.add_argument("--max-tokens", type=int, default=8)
    p.add_argument("--load-factor", type=float, default=1.25, help="the router's bounded-load factor c")
    p.add_argument("--repeats", type=int, default=2, help="rounds; each runs both policies, alternating order")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args(argv)
    for name in ("adapters", "replicas", "room", "num_requests", "concurrency", "repeats", "max_num_seqs"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    if args.zipf <= 0:
        p.error("--zipf must be > 0")
    return args


def zipf_trace(n: int, num_adapters: int, s: float, seed: int) -> list[int]:
    """``n`` adapter indices: rank k (1-based) drawn with probability proportional to ``1/k**s``,
    the ranks assigned to ids in a random order (popularity does not follow the id)."""
    rng = np.random.default_rng(seed)
    weights = 1.0 / np.arange(1, num_adapters + 1) ** s
    ranks = rng.choice(num_adapters, size=n, p=weights / weights.sum())
    ids = rng.permutation(num_adapters)
    return [int(ids[r]) for r in ranks]


def write_adapters(args: argparse.Namespace, model_config: ModelConfig, scratch: Path) -> list[AdapterSpec]:
    """``--adapters`` synthetic adapters in a local object store; their specs."""
    store = LocalFolderStore(scratch / "store")
    specs = []
    for i in range(args.adapters):
        folder = synthetic_adapter(scratch / "files" / f"a{i}", model_config, r=args.rank, targets=TARGETS,
                                   alpha=2.0 * args.rank, seed=args.seed * 100_003 + i, std=0.02)
        config, weights = (folder / "adapter_config.json").read_bytes(), (folder / "adapter_model.safetensors").read_bytes()
        store.put(f"adapters/a{i}/adapter_config.json", config)
        store.put(f"adapters/a{i}/adapter_model.safetensors", weights)
        specs.append(AdapterSpec(id=f"adapter-{i:03d}", config_key=f"adapters/a{i}/adapter_config.json",
                                 weights_key=f"adapters/a{i}/adapter_model.safetensors",
                                 sha256=hashlib.sha256(weights).hexdigest()))
    return specs


def pool_bytes_for(args: argparse.Namespace, checkpoint: Path, layer_elems: int) -> tuple[int, dict]:
    """Pool bytes for ``--room`` adapters of ``layer_elems`` plus a full batch's KV pages."""
    config = ModelConfig.from_checkpoint(checkpoint)
    dtype = torch.float32 if args.dtype == "auto" and args.device == "cpu" else (
        torch.float16 if args.dtype == "auto" else getattr(torch, args.dtype))
    geometry = PageGeometry.for_model(config, 16, dtype)
    adapter_pages = geometry.pages_for_elems(layer_elems)
    longest = 4 * args.prompt_words + 32 + args.max_tokens  # words are one or two tokens; the template adds some
    kv_pages = args.max_num_seqs * geometry.pages_for_tokens(longest)
    pages = args.room * adapter_pages + kv_pages
    return pages * geometry.page_bytes, {"adapter_pages": adapter_pages, "kv_pages": kv_pages, "pool_pages": pages,
                                         "page_bytes": geometry.page_bytes}


def make_replicas(args, checkpoint: Path, store_dir: Path, pool_bytes: int) -> list[InferenceCore]:
    return [InferenceCore(LLM(str(checkpoint), device=args.device, dtype=args.dtype, pool_bytes=pool_bytes,
                              max_num_seqs=args.max_num_seqs, enable_prefix_cache=False,
                              adapter_store=LocalFolderStore(store_dir), max_lora_rank=args.rank,
                              host_adapter_bytes=4 << 30))
            for _ in range(args.replicas)]


class RoundRobin:
    """The baseline: each request to the next replica in turn."""

    def __init__(self, cores: list[InferenceCore]):
        self._next = itertools.cycle(cores)

    async def start(self, req: GenerateRequest):
        return await next(self._next).start(req)


def requests_for(trace: list[int], specs: list[AdapterSpec], args: argparse.Namespace) -> list[GenerateRequest]:
    rng = np.random.default_rng(args.seed + 1)
    words = ["sea", "sky", "tree", "stone", "river", "light", "song", "road", "cloud", "fire"]
    return [GenerateRequest(messages=[ChatTurn(role="user", content=" ".join(rng.choice(words, args.prompt_words)))],
                            adapter=specs[i], max_tokens=args.max_tokens, temperature=0.0)
            for i in trace]


async def serve_trace(policy, requests: list[GenerateRequest], concurrency: int) -> tuple[float, int]:
    """Serve every request through ``policy`` with ``concurrency`` clients; (wall s, tokens)."""
    queue = iter(requests)
    tokens = 0

    async def client() -> None:
        nonlocal tokens
        for req in queue:
            events = await policy.start(req)
            try:
                async for event in events:
                    if isinstance(event, GenerationEnded):
                        tokens += event.completion_tokens
            finally:
                await events.aclose()

    started = time.perf_counter()
    await asyncio.gather(*(client() for _ in range(concurrency)))
    return time.perf_counter() - started, tokens


def run_policy(name: str, args, checkpoint: Path, store_dir: Path, pool_bytes: int,
               requests: list[GenerateRequest]) -> dict:
    """One policy over the trace on fresh replicas; its counts and throughput."""
    cores = make_replicas(args, checkpoint, store_dir, pool_bytes)
    try:
        async def go() -> tuple[float, int, dict]:
            if name == "affinity":
                policy = ReplicaRouter([(f"replica-{i}", core) for i, core in enumerate(cores)],
                                       load_factor=args.load_factor)
                wall, tokens = await serve_trace(policy, requests, args.concurrency)
                decisions = {d: sum(policy.metrics.registry.get_sample_value(
                    "tailor_router_decisions_total", {"replica": r.url, "decision": d}) or 0 for r in policy.replicas)
                    for d in ("home", "spill")}
                return wall, tokens, decisions
            wall, tokens = await serve_trace(RoundRobin(cores), requests, args.concurrency)
            return wall, tokens, {}

        wall, tokens, decisions = asyncio.run(go())
        stats = [core.engine.adapters.stats for core in cores]
        hits = sum(s.device.hits for s in stats)
        misses = sum(s.device.misses for s in stats)
        resident = [core.engine.adapters.resident_counts() for core in cores]
        return {
            "policy": name, "requests": len(requests), "output_tokens": tokens, "wall_s": wall,
            "requests_per_s": len(requests) / wall, "tokens_per_s": tokens / wall,
            "device_hits": hits, "device_misses": misses, "device_hit_rate": hits / max(1, hits + misses),
            "device_loads": sum(s.device.loads for s in stats), "host_loads": sum(s.host.loads for s in stats),
            "per_replica_requests": [core.engine.stats.finished_requests for core in cores],
            "host_resident_at_end": [h for h, _d in resident], "device_resident_at_end": [d for _h, d in resident],
            "router_decisions": decisions,
        }
    finally:
        for core in cores:
            core.close()


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="tailor-routing-") as scratch:
        return _main(args, Path(scratch))


def _main(args: argparse.Namespace, scratch: Path) -> int:
    checkpoint = checkpoint_for(args.model, scratch / "models", dtype="float32")
    model_config = ModelConfig.from_checkpoint(checkpoint)
    specs = write_adapters(args, model_config, scratch)
    probe = LLM(str(checkpoint), device=args.device, dtype=args.dtype, adapter_store=LocalFolderStore(scratch / "store"),
                max_lora_rank=args.rank)
    try:
        ref = probe.engine.adapters.register_stored(specs[0].id, specs[0].config_key, specs[0].weights_key)
        pool_bytes, sizing = pool_bytes_for(args, checkpoint, ref.layer_elems)
    finally:
        probe.close()
    trace = zipf_trace(args.num_requests, args.adapters, args.zipf, args.seed)
    requests = requests_for(trace, specs, args)
    print(f"{args.adapters} adapters (rank {args.rank}), {len(set(trace))} used by {len(trace)} requests; "
          f"{args.replicas} replicas, pool {pool_bytes / 2**20:.1f} MiB each ({sizing})", flush=True)

    runs: dict[str, list[dict]] = {p: [] for p in POLICIES}
    for repeat in range(args.repeats):
        order = POLICIES if repeat % 2 == 0 else tuple(reversed(POLICIES))
        for name in order:
            run = run_policy(name, args, checkpoint, scratch / "store", pool_bytes, requests)
            runs[name].append(run)
            print(f"round {repeat + 1}/{args.repeats} {name}: hit rate {run['device_hit_rate']:.3f}, "
                  f"{run['requests_per_s']:.2f} req/s", flush=True)

    rows = [median_run(runs[name], ("requests_per_s", "device_hit_rate")) for name in POLICIES]
    affinity, rr = rows
    throughput_ratios = [a["requests_per_s"] / b["requests_per_s"] for a, b in zip(runs["affinity"], runs["round_robin"])]
    hit_ratio = affinity["device_hit_rate"] / max(1e-9, rr["device_hit_rate"])
    print(f"\n{'policy':>12} {'hit rate':>9} {'hits':>6} {'misses':>7} {'page-ins':>9} {'fetches':>8} "
          f"{'req/s':>8} {'tok/s':>8} {'wall s':>7}")
    for r in rows:
        print(f"{r['policy']:>12} {r['device_hit_rate']:>9.3f} {r['device_hits']:>6} {r['device_misses']:>7} "
              f"{r['device_loads']:>9} {r['host_loads']:>8} {r['requests_per_s']:>8.2f} {r['tokens_per_s']:>8.1f} "
              f"{r['wall_s']:>7.1f}")
    print(f"hit rate affinity / round-robin: {hit_ratio:.2f}x; throughput affinity / round-robin, median of the "
          f"rounds: {statistics.median(throughput_ratios):.2f}x (rounds {', '.join(f'{x:.2f}' for x in throughput_ratios)})")
    report = {
        **report_header("replica_routing", args),
        "sizing": sizing,
        "distinct_adapters_used": len(set(trace)),
        "hit_rate_ratio": hit_ratio,
        "throughput_ratio_rounds": throughput_ratios,
        "throughput_ratio_median": statistics.median(throughput_ratios),
        "results": rows,
        "runs": runs,
    }
    write_results(report, args.out or RESULTS / f"replica_routing-{args.device.split(':')[0]}.json")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
