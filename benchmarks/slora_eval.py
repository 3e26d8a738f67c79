"""S-LoRA's evaluation on Tailor: open-loop traces with n adapters, one command, table and plots.

For each adapter count n (``--adapters``, 0 = the base model alone) a trace is generated with
``benchmarks.trace.synthetic_trace`` (the same seed for every n, so every row replays the same
lengths and arrival times; only the adapters differ) and saved next to the results, the trace's
adapters among the n (ranks drawn from ``--ranks``: S-LoRA's S1 is ``8``, S2 ``8,16,32,64``, on
q, k, v and o) are registered (see ``AdapterFarm.register``), and the trace is replayed open loop against the engine in-process
(``benchmarks.open_loop``). Each row: throughput, mean / p50 / p90 / p99 latency and first-token
latency, SLO attainment (first token within ``--slo-ttft-s``). With ``--rates``, a second sweep
replays traces at those request rates with ``--sweep-adapters`` adapters (latency against rate).

Outputs (``--out-dir``, default ``benchmarks/results``): ``slora_eval-<device>.json``, ``.md`` (the
tables), ``-throughput.png`` and ``-ttft.png`` against n, ``-rate.png`` against the rate.

    python -m benchmarks.slora_eval                                  # CPU, SmolLM2-135M, n = 0, 1, 10, 100
    python -m benchmarks.slora_eval --adapters 0,1,10,100,1000 --rate 1.5 --duration-s 60
    python -m benchmarks.slora_eval --device cuda --ranks 8,16,32,64 --adapters 5,100,1000,2000 --rate 10

Systems (``--systems``): ``tailor`` (the engine in-process; n = 0 is Tailor on the base model alone),
``peft``, the Hugging Face PEFT baseline on the same trace (``benchmarks.peft_baseline``: static
mixed-adapter batches, as well as PEFT can serve), and ``http``: the product itself, ``tailor
serve`` started on loopback with the same model, device and engine limits, the adapters the trace
uses uploaded through the admin API, the trace replayed through ``/v1/chat/completions`` streamed
(``benchmarks.http_replay``; first-token latency as a client sees it). The service keeps the
in-process engine's step budget (none), so the two rows differ only by the service path.

Models (``--model``): a bundled name, a checkpoint directory, or ``random:llama-7b``,
``random:llama-13b`` (S-LoRA's shapes, random fp16 weights written once into ``--model-cache``,
nothing downloaded; ``benchmarks.random_llama``) and ``random:tiny``. The GPU tables of S-LoRA's
settings S1 and S2 (``--ranks 8`` and ``--ranks 8,16,32,64``):

    python -m benchmarks.slora_eval --device cuda --model random:llama-7b --ranks 8 \
        --adapters 5,100,1000,2000 --rate 10 --input 8,512 --output 8,512 --duration-s 60

The multi-turn chat trace (users with histories, through the per-user chat endpoint) has its own
command, ``python -m benchmarks.chat_trace``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

from tqdm import tqdm

from benchmarks.http_replay import LocalService, TenantKeys, create_tenant, replay_http, upload_adapter
from benchmarks.open_loop import dotted, markdown_table, replay_in_process, summarize_run
from benchmarks.peft_baseline import PeftServer
from benchmarks.random_llama import checkpoint_for
from benchmarks.run_report import report_header
from benchmarks.synthetic_adapters import synthetic_adapter
from benchmarks.trace import Trace, save_trace, synthetic_trace
from inference import LLM
from inference.engine_config import EngineConfig

RESULTS = Path(__file__).resolve().parent / "results"
MODEL_CACHE = Path.home() / ".cache" / "tailor" / "random-models"
SYSTEMS = ("tailor", "peft", "http")
TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj")
COLUMNS = [
    ("system", "system", "s"), ("adapters", "adapters", "d"), ("rate req/s", "rate", "g"), ("requests", "requests", "d"),
    ("failed", "failed", "d"), ("req/s", "requests_per_s", ".3f"), ("tok/s", "output_tokens_per_s", ".1f"),
    ("latency mean s", "latency_s.mean", ".2f"), ("p50", "latency_s.p50", ".2f"), ("p90", "latency_s.p90", ".2f"),
    ("p99", "latency_s.p99", ".2f"), ("TTFT mean s", "ttft_s.mean", ".2f"), ("TTFT p50", "ttft_s.p50", ".2f"),
    ("TTFT p90", "ttft_s.p90", ".2f"), ("TTFT p99", "ttft_s.p99", ".2f"), ("SLO attainment", "slo_attainment", ".1%"),
]


def _ints(text: str) -> list[int]:
    return [int(part) for part in text.split(",") if part.strip()]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m",
                   help="bundled model name, checkpoint directory, or random:llama-7b / random:llama-13b / random:tiny")
    p.add_argument("--model-cache", type=Path, default=MODEL_CACHE, help="where random:* checkpoints are written")
    p.add_argument("--random-dtype", default="float16", help="weights of random:* checkpoints")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="auto")
    p.add_argument("--adapters", default="0,1,10,100", help="comma-separated adapter counts; 0 = base model")
    p.add_argument("--ranks", default="8", help="ranks drawn per adapter (S1: 8; S2: 8,16,32,64)")
    p.add_argument("--alpha", type=float, default=1.0, help="power-law popularity exponent (S-LoRA's rule)")
    p.add_argument("--rate", type=float, default=1.0, help="requests per second of the adapter sweep")
    p.add_argument("--cv", type=float, default=1.0, help="coefficient of variation of the gaps (1: Poisson)")
    p.add_argument("--duration-s", type=float, default=30.0, help="arrivals span this long")
    p.add_argument("--input", default="8,128", help="inclusive input length range lo,hi")
    p.add_argument("--output", default="8,64", help="inclusive output length range lo,hi")
    p.add_argument("--slo-ttft-s", type=float, default=6.0, help="first-token SLO (S-LoRA: 6 s)")
    p.add_argument("--rates", default="", help="optional rate sweep, comma-separated requests/s")
    p.add_argument("--sweep-adapters", type=int, default=10, help="adapters in the rate sweep")
    p.add_argument("--systems", default="tailor,peft", help="comma-separated: tailor, peft, http")
    p.add_argument("--peft-max-batch", type=int, default=32, help="the PEFT baseline's batch bound")
    p.add_argument("--host-mib", type=int, default=1024, help="host-RAM adapter cache budget")
    p.add_argument("--pool-mib", type=int, default=None,
                   help="unified page pool of each engine (default: the engine's; on a GPU that is most free "
                        "memory, so --systems http there needs it: two engines share the device)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out-dir", type=Path, default=RESULTS)
    p.add_argument("--no-plots", action="store_true")
    args = p.parse_args(argv)
    args.adapter_counts = _ints(args.adapters)
    args.rank_set = _ints(args.ranks)
    args.rate_list = [float(r) for r in args.rates.split(",") if r.strip()]
    problems = []
    if not args.adapter_counts or min(args.adapter_counts) < 0:
        problems.append("--adapters: counts >= 0")
    if not args.rank_set or min(args.rank_set) < 1:
        problems.append("--ranks: ranks >= 1")
    if args.rate <= 0 or args.duration_s <= 0 or args.cv <= 0 or args.slo_ttft_s <= 0:
        problems.append("--rate, --duration-s, --cv and --slo-ttft-s must be > 0")
    if any(r <= 0 for r in args.rate_list):
        problems.append("--rates must be > 0")
    args.system_list = [part.strip() for part in args.systems.split(",") if part.strip()]
    if not args.system_list or set(args.system_list) - set(SYSTEMS):
        problems.append(f"--systems: one or more of {', '.join(SYSTEMS)}")
    if args.peft_max_batch < 1:
        problems.append("--peft-max-batch must be >= 1")
    if args.pool_mib is not None and args.pool_mib < 1:
        problems.append("--pool-mib must be >= 1")
    if "http" in args.system_list and args.device.startswith("cuda") and args.pool_mib is None:
        problems.append("--systems http on cuda needs --pool-mib (the service's engine and the in-process one "
                        "share the GPU)")
    if problems:
        p.error("; ".join(problems))
    return args


def make_trace(args: argparse.Namespace, num_adapters: int, rate: float, vocab: int) -> Trace:
    return synthetic_trace(num_adapters, rate, args.duration_s, ranks=args.rank_set, alpha=args.alpha, cv=args.cv,
                           input_len_range=_ints(args.input), output_len_range=_ints(args.output), seed=args.seed,
                           vocab=vocab)


class AdapterFarm:
    """Synthetic adapters written on demand (adapter i of rank r is ``a{i}-r{r}``, in the engine's
    dtype) and registered with Tailor's engine on demand. Registering copies an adapter into the
    engine's object store, so its directory is deleted then and written again (the same weights:
    seeded) only if another system asks for it: 2,000 Llama-7B adapters would otherwise be on disk
    twice (34 GB each time at rank 8 in fp16; the GPU machine has 64 GB)."""

    def __init__(self, llm: LLM, scratch: Path, seed: int):
        self.llm, self.scratch, self.seed = llm, scratch, seed
        self.written: set[str] = set()
        self.registered: set[str] = set()

    def path(self, index: int, rank: int) -> Path:
        """The PEFT directory of adapter ``index`` (written when it is not on disk)."""
        name = self.name(index, rank)
        if name not in self.written:
            synthetic_adapter(self.scratch / name, self.llm.engine.model_config, r=rank, targets=TARGETS,
                              alpha=2.0 * rank, seed=self.seed * 100_003 + index, std=0.02,
                              dtype=self.llm.engine.dtype)
            self.written.add(name)
        return self.scratch / name

    def register(self, trace: Trace) -> float:
        """Register with Tailor the adapters the trace's requests use; returns the seconds it took.
        The others of the n would sit in the object store and never be fetched (the engine pages
        an adapter in from the store when a request names it), so registering them changes nothing
        that is served, only the disk used: 2,000 adapters of S2 on Llama-7B are 126 GB."""
        started = time.perf_counter()
        for i in trace.used_adapters():
            rank = trace.adapter_ranks[i]
            name = self.name(i, rank)
            if name not in self.registered:
                self.llm.register_adapter(name, self.path(i, rank))
                self.registered.add(name)
                shutil.rmtree(self.scratch / name)  # the engine's store has its copy now
                self.written.discard(name)
        return time.perf_counter() - started

    @staticmethod
    def name(index: int, rank: int) -> str:
        return f"a{index}-r{rank}"


class HttpSystem:
    """``tailor serve`` on loopback with the in-process engine's model, device and limits, one tenant,
    adapters uploaded on demand (see the module docstring)."""

    def __init__(self, llm: LLM, checkpoint: Path, args: argparse.Namespace):
        config = llm.engine.config
        self.service = LocalService({
            "TAILOR_MODEL": str(checkpoint), "TAILOR_DEVICE": args.device, "TAILOR_DTYPE": args.dtype,
            "TAILOR_MAX_LORA_RANK": str(max(args.rank_set)), "TAILOR_HOST_ADAPTER_BYTES": str(args.host_mib << 20),
            "TAILOR_PREFIX_CACHE": str(config.enable_prefix_cache).lower(),
            "TAILOR_STEP_TIME_TARGET_S": str(config.step_time_target_s or 0),
            **({} if args.pool_mib is None else {"TAILOR_POOL_BYTES": str(args.pool_mib << 20)}),
        })
        self.tokenizer = llm.tokenizer
        self.eos_ids = sorted(llm.engine.eos_token_ids)
        self.tenant: TenantKeys | None = None
        self.uploaded: set[str] = set()

    def __enter__(self) -> HttpSystem:
        self.service.__enter__()
        self.tenant = create_tenant(self.service.base, f"slora-eval-{time.time_ns()}")
        return self

    def __exit__(self, *exc) -> None:
        self.service.__exit__(*exc)

    def upload(self, farm: AdapterFarm, trace: Trace) -> None:
        """Upload the adapters the trace uses (an adapter nobody asks for never leaves the object store,
        so uploading the other n - used would only grow the catalog, at seconds per upload)."""
        for i in trace.used_adapters():
            name = farm.name(i, trace.adapter_ranks[i])
            if name not in self.uploaded:
                upload_adapter(self.tenant, name, farm.path(i, trace.adapter_ranks[i]))
                self.uploaded.add(name)

    def replay(self, farm: AdapterFarm, trace: Trace, progress) -> list:
        ranks = trace.adapter_ranks

        def model_of(request) -> str:
            return "base" if request.adapter is None else farm.name(request.adapter, ranks[request.adapter])

        def prompt_text(request) -> str:
            return self.tokenizer.decode(list(request.prompt_token_ids))

        return asyncio.run(replay_http(self.service.base, self.tenant.chat_key, trace, model_of, prompt_text,
                                       self.eos_ids, progress=progress))


def run_row(system: str, llm: LLM, farm: AdapterFarm, trace: Trace, args: argparse.Namespace, label: str,
            peft: PeftServer | None = None, http: HttpSystem | None = None) -> dict[str, Any]:
    """Replay ``trace`` on ``system`` (tailor, peft or http) and summarize it."""
    ranks = trace.adapter_ranks
    started = time.perf_counter()
    if system == "peft":
        for i, rank in enumerate(ranks):
            farm.path(i, rank)
    elif system == "http":
        http.upload(farm, trace)
    else:
        farm.register(trace)
    setup_s = time.perf_counter() - started
    with tqdm(total=len(trace.requests), desc=f"{system} {label}", unit="req", leave=False) as bar:
        if system == "peft":
            timings = peft.replay(trace, lambda i: farm.path(i, ranks[i]), args.peft_max_batch, progress=bar.update)
        elif system == "http":
            timings = http.replay(farm, trace, bar.update)
        else:
            timings = replay_in_process(llm, trace, lambda i: farm.name(i, ranks[i]), progress=bar.update)
    return {"system": system, "adapters": trace.num_adapters, "rate": trace.params["rate"], "setup_s": setup_s,
            "trace": trace.summary(), **summarize_run(timings, args.slo_ttft_s)}


def plot(rows: list[dict[str, Any]], sweep: list[dict[str, Any]], prefix: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    systems = list(dict.fromkeys(r["system"] for r in rows))
    for name, key, label in (("throughput", "requests_per_s", "requests / s"), ("ttft", "ttft_s.p50", "TTFT p50 (s)")):
        fig, ax = plt.subplots(figsize=(5, 3.5))
        for system in systems:
            mine = [r for r in rows if r["system"] == system]
            # the base model (0 adapters) is drawn at 1 on the log axis
            ax.plot([max(r["adapters"], 1) for r in mine], [dotted(r, key) for r in mine], marker="o", label=system)
        ax.set_xscale("log")
        written.append(_finish(fig, ax, "adapters (0 drawn at 1)", label, prefix.with_name(f"{prefix.name}-{name}.png")))
    if sweep:
        fig, ax = plt.subplots(figsize=(5, 3.5))
        for system in dict.fromkeys(r["system"] for r in sweep):
            mine = [r for r in sweep if r["system"] == system]
            for key, label in (("latency_s.mean", "latency mean"), ("ttft_s.p90", "TTFT p90")):
                ax.plot([r["rate"] for r in mine], [dotted(r, key) for r in mine], marker="o", label=f"{system} {label}")
        written.append(_finish(fig, ax, "request rate (req/s)", "seconds", prefix.with_name(f"{prefix.name}-rate.png")))
    return written


def _finish(fig, ax, xlabel: str, ylabel: str, path: Path) -> Path:
    """Label, grid and legend ``ax``, save ``fig`` as a PNG at ``path`` and close it."""
    import matplotlib.pyplot as plt

    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(True, alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    device = args.device.split(":")[0]
    args.out_dir.mkdir(parents=True, exist_ok=True)
    prefix = args.out_dir / f"slora_eval-{device}"
    checkpoint = checkpoint_for(args.model, args.model_cache, dtype=args.random_dtype, seed=args.seed,
                                generate_on=args.device)
    # PEFT's model first: on a GPU the engine sizes its page pool from the memory left after it
    dtype = EngineConfig(device=args.device, dtype=args.dtype).torch_dtype
    peft = PeftServer(checkpoint, args.device, dtype) if "peft" in args.system_list else None
    with contextlib.ExitStack() as stack:
        scratch = stack.enter_context(tempfile.TemporaryDirectory(prefix="tailor-slora-eval-"))
        llm = stack.enter_context(LLM(str(checkpoint), device=args.device, dtype=args.dtype,
                                      host_adapter_bytes=args.host_mib << 20,
                                      adapter_store_dir=str(Path(scratch) / "store"), max_lora_rank=max(args.rank_set),
                                      **({} if args.pool_mib is None else {"pool_bytes": args.pool_mib << 20})))
        vocab = llm.engine.model_config.vocab_size
        farm = AdapterFarm(llm, Path(scratch) / "adapters", args.seed)
        http = stack.enter_context(HttpSystem(llm, checkpoint, args)) if "http" in args.system_list else None
        warm = make_trace(args, min(1, max(args.adapter_counts)), args.rate, vocab)
        warm = Trace(warm.requests[:4], warm.adapter_ranks, warm.params)
        for system in args.system_list:
            run_row(system, llm, farm, warm, args, "warm-up", peft, http)
        rows, sweep = [], []
        for count in tqdm(args.adapter_counts, desc="adapter counts", unit="run"):
            trace = make_trace(args, count, args.rate, vocab)
            save_trace(trace, args.out_dir / "traces" / f"slora_eval-n{count}-rate{args.rate:g}.json")
            rows += [run_row(system, llm, farm, trace, args, f"n={count}", peft, http) for system in args.system_list]
        for rate in tqdm(args.rate_list, desc="rates", unit="run"):
            trace = make_trace(args, args.sweep_adapters, rate, vocab)
            sweep += [run_row(system, llm, farm, trace, args, f"rate={rate:g}", peft, http)
                      for system in args.system_list]
    tables = f"Adapters (rate {args.rate:g} req/s, {args.duration_s:g} s of arrivals, ranks {args.ranks}):\n\n"
    tables += markdown_table(rows, COLUMNS) + "\n"
    if sweep:
        tables += f"\nRequest rate ({args.sweep_adapters} adapters):\n\n" + markdown_table(sweep, COLUMNS) + "\n"
    print("\n" + tables)
    report = {**report_header("slora_eval", args), "model": args.model, "checkpoint": str(checkpoint),
              "rows": rows, "rate_sweep": sweep}
    prefix.with_suffix(".json").write_text(json.dumps(report, indent=2) + "\n")
    prefix.with_suffix(".md").write_text(tables)
    written = [] if args.no_plots else plot(rows, sweep, prefix)
    print("wrote " + ", ".join(str(p) for p in [prefix.with_suffix(".json"), prefix.with_suffix(".md"), *written]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
