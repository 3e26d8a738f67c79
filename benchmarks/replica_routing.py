"""Adapter-affinity routing against round-robin over two replicas: device-tier hit rate and throughput.

Two inference replicas, each an in-process engine behind an ``InferenceCore`` (the inference
service's core, without its HTTP layer), share one object store holding ``--adapters`` rank-r
adapters. Each replica's unified pool is sized to hold ``--room`` adapters next to the KV pages of
a full batch (``--max-num-seqs`` requests of the longest prompt and output). A trace of
``--num-requests`` chat requests picks adapters Zipf-popular (P(rank k) proportional to 1/k^s,
``--zipf``; ranks shuffled over the ids). Both policies serve the same trace with
``--concurrency`` clients in a closed loop:

* affinity: the api's ``api.replicas.ReplicaRouter`` (rendezvous hashing of the adapter id with
  bounded loads, ``--load-factor``; a spill goes to a replica that holds the adapter first), fed
  with the cores as its backends;
* affinity_unbounded: the same router with load factor = the replica count, where the bound
  ``ceil(c * (in flight + 1) / replicas)`` is never below a replica's in-flight count + 1, so
  nothing spills: pure rendezvous placement;
* round-robin: the next replica in turn, whatever the adapter;
* with ``--compare-spill``, also affinity_hash_spill: the router with the spill to the next
  under-bound replica in hash order, whatever holds the adapter (``HashOrderSpill``: the router
  before the holder preference), to measure what that preference brings. With two replicas the
  two are the same policy (a spill has one replica to go to); it takes three or more;
* with ``--load-factors c1,c2,...`` (the load-factor sweep), affinity_c<c> for each c in place of
  the single affinity policy: the bound's trade-off, hit rate against load balance. A c at or
  above the replica count is no bound (the unbounded policy already runs it) and is left out.

Load balance, measured the same way for every policy. ``request_imbalance``: the most requests
one replica served over the mean per replica (1 = even; n at most): the hottest replica's share
of the work, which in an open-loop system at fleet utilization rho puts it at utilization
rho * request_imbalance. ``mm1_wait_ratio``: what that costs in queueing by the M/M/1 model at
rho = ``--model-utilization`` (0.7): the request-weighted mean wait with each replica at its
measured share over the wait with even shares (inf when a replica's share saturates it); a
model, for comparing c values, not a measured latency. And around the replicas
(``LoadTracker``): each replica's generations in flight over the run's wall time.
``load_imbalance``: the largest
replica's time-averaged in-flight count over the mean of all replicas' (1 = even; with n
replicas at most n); ``admit_load_ratio_p99``: at each admission, the chosen replica's in-flight
count (this request included) over the mean across replicas at that moment, its 99th percentile
(the bound caps it near c). The engines run in one process on shared cores, so a busier replica
is not slower here than a quieter one: these are load figures, not latencies (each request's
latency is in the JSON, but on this machine it measures the shared CPU).

Every run starts from fresh replicas (cold host and device tiers); rounds alternate which policy
runs first. Counts come from the engines' adapter statistics: device hit rate = admissions
served from device pages / all admissions (a count, so machine load does not move it), page-ins
(device loads), fetches from the store (host loads). Throughput is requests / wall time of the
whole trace, side by side in one run; the reported ratio is the median of the rounds' ratios.

Next to the measurement, the steady-state model of the same popularity (``steady_state_model``):
each replica's device tier as a cache of ``--room`` adapters under independent Zipf requests.
An ideal cache (the ``--room`` most popular of what it serves: optimal for independent requests)
bounds what any policy reaches; LRU (Che's approximation) is what the engines' tiers do. The
ceiling of the ratio is ideal affinity over LRU round-robin: no affinity cache can do better
against the round-robin replicas as they are. A finite trace starts cold, so a measured ratio can
still sit a little above it (round-robin pays every first fetch on each replica, affinity once).

    python -m benchmarks.replica_routing                                  # CPU defaults (random:tiny)
    python -m benchmarks.replica_routing --model smollm2-135m --num-requests 600
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

from api.replicas import DEFAULT_LOAD_FACTOR, ReplicaRouter
from benchmarks.live_server import write_results
from benchmarks.random_llama import checkpoint_for
from benchmarks.replica_load import HashOrderSpill, LoadTracker, RoundRobin
from benchmarks.replica_routing_model import mm1_wait_ratio, request_imbalance, steady_state_model, zipf_draw
from benchmarks.run_report import median_run, report_header
from benchmarks.synthetic_adapters import synthetic_adapter
from inference import LLM
from inference.adapters.object_store import LocalFolderStore
from inference.engine_config import EngineConfig
from inference.model_config import ModelConfig
from inference.page_pool import PageGeometry
from inference.service.client import rendezvous_order
from inference.service.core import InferenceCore
from inference.service.events import GenerationEnded, is_terminal
from inference.service.protocol import AdapterSpec, ChatTurn, GenerateRequest

RESULTS = Path(__file__).resolve().parent / "results"
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
    p.add_argument("--load-factor", type=float, default=DEFAULT_LOAD_FACTOR,
                   help="the router's bounded-load factor c (default: the router's)")
    p.add_argument("--repeats", type=int, default=2, help="rounds; each runs both policies, alternating order")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--load-factors", type=_load_factors, default=None,
                   help="sweep: comma-separated load factors, one affinity policy each (instead of --load-factor)")
    p.add_argument("--model-utilization", type=float, default=0.7,
                   help="fleet utilization at which mm1_wait_ratio models the queueing cost of the imbalance")
    p.add_argument("--compare-spill", action="store_true",
                   help="also run affinity with the spill in hash order (no holder preference)")
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args(argv)
    for name in ("adapters", "replicas", "room", "num_requests", "concurrency", "repeats", "max_num_seqs"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    if args.zipf <= 0:
        p.error("--zipf must be > 0")
    if not 0 < args.model_utilization < 1:
        p.error("--model-utilization must be in (0, 1)")
    if args.load_factor <= 1:
        p.error("--load-factor must be > 1")
    return args


def _load_factors(text: str) -> tuple[float, ...]:
    """``--load-factors``: distinct values above 1, ascending."""
    try:
        values = sorted({float(x) for x in text.split(",") if x.strip()})
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"not a list of numbers: {text!r}") from exc
    if not values or values[0] <= 1:
        raise argparse.ArgumentTypeError("load factors must be > 1")
    return tuple(values)


def swept_factors(args: argparse.Namespace) -> tuple[float, ...]:
    """The sweep's load factors that bound anything (below the replica count); empty without a sweep."""
    return tuple(c for c in (args.load_factors or ()) if c < args.replicas)


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
    dtype = EngineConfig(device=args.device, dtype=args.dtype).torch_dtype  # the engines' own rule
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


def policies(args: argparse.Namespace) -> tuple[str, ...]:
    """The policies this run compares, round-robin last."""
    affinity = tuple(f"affinity_c{c:g}" for c in swept_factors(args)) if args.load_factors else ("affinity",)
    return (*affinity, "affinity_unbounded", *(("affinity_hash_spill",) if args.compare_spill else ()),
            "round_robin")


def load_factor_of(name: str, args: argparse.Namespace) -> float:
    """The router's load factor under policy ``name`` (an affinity policy)."""
    if name == "affinity_unbounded":
        return unbounded_factor(args)
    if name.startswith("affinity_c"):
        return float(name.removeprefix("affinity_c"))
    return args.load_factor


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


def replica_names(args: argparse.Namespace) -> list[str]:
    """The replicas' names: what the router hashes adapter ids against."""
    return [f"replica-{i}" for i in range(args.replicas)]


def unbounded_factor(args: argparse.Namespace) -> float:
    """A load factor whose bound never binds: with c = replicas, ceil(c * (in flight + 1) /
    replicas) = in flight + 1, at least any one replica's in-flight count + 1 (above 1, as the
    router requires)."""
    return float(max(2, args.replicas))


def run_policy(name: str, args, checkpoint: Path, store_dir: Path, pool_bytes: int,
               requests: list[GenerateRequest]) -> dict:
    """One policy over the trace on fresh replicas; its counts and throughput."""
    cores = make_replicas(args, checkpoint, store_dir, pool_bytes)
    tracker = LoadTracker(len(cores))
    backends = [tracker.backend(i, core) for i, core in enumerate(cores)]
    try:
        async def go() -> tuple[float, int, dict]:
            if name != "round_robin":
                router = HashOrderSpill if name == "affinity_hash_spill" else ReplicaRouter
                policy = router(list(zip(replica_names(args), backends)), load_factor=load_factor_of(name, args))
                wall, tokens = await serve_trace(policy, requests, args.concurrency)
                decisions = {d: sum(policy.metrics.registry.get_sample_value(
                    "tailor_router_decisions_total", {"replica": r.url, "decision": d}) or 0 for r in policy.replicas)
                    for d in ("home", "spill", "spill_holder")}
                return wall, tokens, decisions
            wall, tokens = await serve_trace(RoundRobin(backends), requests, args.concurrency)
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
            "load_factor": load_factor_of(name, args) if name != "round_robin" else None,
            "spill_fraction": (decisions["spill"] + decisions["spill_holder"]) / len(requests) if decisions else 0.0,
            "request_imbalance": request_imbalance([core.engine.stats.finished_requests for core in cores]),
            "mm1_wait_ratio": mm1_wait_ratio([core.engine.stats.finished_requests for core in cores],
                                             args.model_utilization),
            **tracker.summary(),
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
    popularity, drawn = zipf_draw(args.num_requests, args.adapters, args.zipf, args.seed)
    trace = [int(i) for i in drawn]
    requests = requests_for(trace, specs, args)
    names = replica_names(args)
    homes = [names.index(rendezvous_order(spec.id, names)[0]) for spec in specs]
    model = steady_state_model(popularity, homes, args.replicas, args.room)
    print(f"{args.adapters} adapters (rank {args.rank}), {len(set(trace))} used by {len(trace)} requests; "
          f"{args.replicas} replicas, pool {pool_bytes / 2**20:.1f} MiB each ({sizing})", flush=True)

    compared = policies(args)
    runs: dict[str, list[dict]] = {p: [] for p in compared}
    for repeat in range(args.repeats):
        order = compared if repeat % 2 == 0 else tuple(reversed(compared))
        for name in order:
            run = run_policy(name, args, checkpoint, scratch / "store", pool_bytes, requests)
            runs[name].append(run)
            print(f"round {repeat + 1}/{args.repeats} {name}: hit rate {run['device_hit_rate']:.3f}, "
                  f"{run['requests_per_s']:.2f} req/s", flush=True)

    rows = {name: median_run(runs[name], ("requests_per_s", "device_hit_rate")) for name in compared}
    rr = rows["round_robin"]
    hit_ratios = {name: rows[name]["device_hit_rate"] / max(1e-9, rr["device_hit_rate"]) for name in compared[:-1]}
    throughput_ratios = {name: [a["requests_per_s"] / b["requests_per_s"] for a, b in zip(runs[name], runs["round_robin"])]
                         for name in compared[:-1]}
    print_table(rows, hit_ratios, throughput_ratios, model)
    if args.load_factors:
        print_sweep(sweep_rows(rows, hit_ratios, compared), args)
    report = {
        **report_header("replica_routing", args),
        "sizing": sizing,
        "distinct_adapters_used": len(set(trace)),
        "steady_state_model": model,
        "hit_rate_ratio": hit_ratios[compared[0]],
        "hit_rate_ratio_unbounded": hit_ratios["affinity_unbounded"],
        "throughput_ratio_rounds": throughput_ratios[compared[0]],
        "throughput_ratio_median": statistics.median(throughput_ratios[compared[0]]),
        "throughput_ratio_rounds_unbounded": throughput_ratios["affinity_unbounded"],
        "hit_rate_ratios": hit_ratios,
        "load_factor_sweep": sweep_rows(rows, hit_ratios, compared) if args.load_factors else None,
        "results": [rows[name] for name in compared],
        "runs": runs,
    }
    write_results(report, args.out or RESULTS / f"replica_routing-{args.device.split(':')[0]}.json")
    return 0


def sweep_rows(rows: dict[str, dict], hit_ratios: dict[str, float], compared: tuple[str, ...]) -> list[dict]:
    """One row per policy for the load-factor sweep: its c, hit rate and ratio to round-robin,
    spill fraction and load-balance figures (round-robin last, ratio 1)."""
    return [{"policy": name, "load_factor": rows[name]["load_factor"],
             "device_hit_rate": rows[name]["device_hit_rate"],
             "device_hit_rate_all_rounds": rows[name]["device_hit_rate_all_rounds"],
             "hit_rate_ratio": hit_ratios.get(name, 1.0), "spill_fraction": rows[name]["spill_fraction"],
             "request_imbalance": rows[name]["request_imbalance"], "mm1_wait_ratio": rows[name]["mm1_wait_ratio"],
             "load_imbalance": rows[name]["load_imbalance"],
             "admit_load_ratio_p99": rows[name]["admit_load_ratio_p99"],
             "peak_in_flight": rows[name]["peak_in_flight"]}
            for name in compared if name != "affinity_hash_spill"]


def print_sweep(sweep: list[dict], args: argparse.Namespace) -> None:
    dropped = [c for c in args.load_factors if c >= args.replicas]
    print(f"\nload-factor sweep ({args.replicas} replicas, {args.concurrency} clients"
          + (f"; c >= {args.replicas} is no bound: {', '.join(f'{c:g}' for c in dropped)} = unbounded" if dropped else "")
          + ")")
    print(f"{'policy':>18} {'c':>5} {'hit rate':>9} {'vs rr':>6} {'spilled':>8} {'req share':>10} "
          f"{'M/M/1 wait':>11} {'in flight':>10} {'p99 admit':>10} {'peak':>5}")
    for r in sweep:
        c = f"{r['load_factor']:g}" if r["load_factor"] is not None else "-"
        print(f"{r['policy']:>18} {c:>5} {r['device_hit_rate']:>9.3f} {r['hit_rate_ratio']:>5.2f}x "
              f"{r['spill_fraction']:>8.3f} {r['request_imbalance']:>10.3f} {r['mm1_wait_ratio']:>10.2f}x "
              f"{r['load_imbalance']:>10.3f} {r['admit_load_ratio_p99']:>10.2f} "
              f"{r['peak_in_flight']:>5}")


def print_table(rows: dict[str, dict], hit_ratios: dict[str, float], throughput_ratios: dict[str, list[float]],
                model: dict) -> None:
    """The measured rows, the ratios against round-robin and the steady-state model."""
    print(f"\n{'policy':>18} {'hit rate':>9} {'hits':>6} {'misses':>7} {'page-ins':>9} {'fetches':>8} "
          f"{'spill/holder':>13} {'req/s':>8} {'tok/s':>8} {'wall s':>7}")
    for r in rows.values():
        decisions = r["router_decisions"]
        spills = f"{decisions['spill']:.0f}/{decisions['spill_holder']:.0f}" if decisions else "-"
        print(f"{r['policy']:>18} {r['device_hit_rate']:>9.3f} {r['device_hits']:>6} {r['device_misses']:>7} "
              f"{r['device_loads']:>9} {r['host_loads']:>8} {spills:>13} {r['requests_per_s']:>8.2f} "
              f"{r['tokens_per_s']:>8.1f} {r['wall_s']:>7.1f}")
    for name, ratio in hit_ratios.items():
        rounds = throughput_ratios[name]
        print(f"{name} / round-robin: hit rate {ratio:.2f}x; throughput, median of the rounds "
              f"{statistics.median(rounds):.2f}x (rounds {', '.join(f'{x:.2f}' for x in rounds)})")
    print(f"steady state: hit rate ideal affinity {model['ideal_affinity']:.3f}, LRU affinity {model['lru_affinity']:.3f}, "
          f"ideal round-robin {model['ideal_round_robin']:.3f}, LRU round-robin {model['lru_round_robin']:.3f}; "
          f"ceiling (ideal affinity / LRU round-robin) {model['ceiling_ratio']:.2f}x, LRU / LRU "
          f"{model['lru_ratio']:.2f}x, ideal / ideal {model['ideal_ratio']:.2f}x")


if __name__ == "__main__":
    raise SystemExit(main())
