"""Prometheus metrics of the inference side (names in docs/observability.md).

``InferenceMetrics`` owns one ``CollectorRegistry``: histograms observed as requests and steps
happen (time to first token, time per output token, end-to-end latency, batch size, adapter load
latency), and a collector that reads the engine's counters and gauges at scrape time (tokens,
preemptions, queue lengths, pool pages by kind, staged adapter bytes, adapter cache behaviour per
tier, prefix-cache lookups per tenant, first-token SLO outcomes per tenant).

``GatewayCollector`` adds the gauges Kubernetes' Gateway API inference extension (its endpoint
picker) reads from a model server for queue-depth and LoRA-affinity routing, under vLLM's names:
``vllm:num_requests_waiting``, ``vllm:num_requests_running``, ``vllm:kv_cache_usage_perc`` (and its
older name ``vllm:gpu_cache_usage_perc``), and ``vllm:lora_requests_info`` (value: the time of the
scrape; labels ``running_lora_adapters``, ``waiting_lora_adapters``, ``max_lora``).
"""

from __future__ import annotations

import time

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from inference.engine import LLMEngine
from inference.request import RequestOutput

LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 6.0, 10.0, 30.0, 60.0, 120.0)  # 6 s: the TTFT SLO
TOKEN_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
LOAD_BUCKETS = (0.001, 0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0)


class EngineCollector(Collector):
    """Reads one engine's counters at scrape time (plain int reads; no engine lock needed)."""

    def __init__(self, engine: LLMEngine):
        self.engine = engine

    def collect(self):
        engine, stats = self.engine, self.engine.stats
        yield _counter("tailor_inference_prompt_tokens", "Prompt tokens prefilled.", stats.prompt_tokens)
        yield _counter("tailor_inference_generation_tokens", "Tokens generated.", stats.generation_tokens)
        yield _counter("tailor_inference_preemptions", "Requests preempted (recomputed later) for lack of pages.",
                       engine.scheduler.num_preemptions)
        yield _counter("tailor_inference_steps", "Engine steps that ran a forward pass.", stats.steps)
        yield _gauge("tailor_inference_requests_waiting", "Requests waiting to be scheduled.", engine.num_waiting)
        yield _gauge("tailor_inference_requests_running", "Requests in the running batch.", engine.num_running)

        occupancy = engine.pool.occupancy()
        pages = GaugeMetricFamily("tailor_pool_pages", "Unified pool pages by kind.", labels=["kind"])
        for kind, value in (("kv", occupancy.kv), ("adapter", occupancy.adapter), ("free", occupancy.free),
                            ("cached", occupancy.cached)):
            pages.add_metric([kind], value)
        yield pages
        yield _gauge("tailor_pool_pages_total", "Pages in the unified pool.", occupancy.total)
        yield _gauge("tailor_pool_bytes", "Bytes of the unified pool.", occupancy.total * occupancy.page_bytes)
        yield _gauge("tailor_adapter_staged_bytes",
                     "Bytes of staged adapter copies outside the pool (the CPU LoRA path's groups).",
                     engine.backend.lora.scratch_bytes)

        adapters = engine.adapters.stats
        tiers = (("host", adapters.host), ("device", adapters.device))
        for name, field, help_text in (
            ("hits", "hits", "Adapter lookups served by the tier."),
            ("misses", "misses", "Adapter lookups the tier could not serve."),
            ("loads", "loads", "Adapters loaded into the tier."),
            ("evictions", "evictions", "Adapters evicted from the tier."),
        ):
            family = CounterMetricFamily(f"tailor_adapter_cache_{name}" if name in ("hits", "misses")
                                         else f"tailor_adapter_{name}", help_text, labels=["tier"])
            for tier, tier_stats in tiers:
                family.add_metric([tier], getattr(tier_stats, field))
            yield family
        failures = CounterMetricFamily("tailor_adapter_fetch_failures",
                                       "Adapter reads from the object store that failed (cold registrations and "
                                       "re-fetches), by reason: missing, checksum, invalid, unavailable.",
                                       labels=["reason"])
        for reason, count in sorted(adapters.fetch_failures.items()):
            failures.add_metric([reason], count)
        yield failures
        host, device = engine.adapters.resident_counts()
        resident = GaugeMetricFamily("tailor_adapters_resident", "Adapters resident per tier.", labels=["tier"])
        resident.add_metric(["host"], host)
        resident.add_metric(["device"], device)
        yield resident
        yield _gauge("tailor_adapters_registered", "Adapters known to the engine.", len(engine.adapters.registry))
        yield from _prefix_cache_families(engine)
        yield from _slo_families(engine)
        yield _gauge("tailor_step_token_budget",
                     "Tokens the next engine step may compute (lowered so that a step lasts about "
                     "TAILOR_STEP_TIME_TARGET_S; inference.step_budget).", engine.step_budget.tokens)


def _prefix_cache_families(engine: LLMEngine):
    """Prefix-cache lookups per tenant in tokens, and its pages by state (inference.prefix_cache)."""
    cache = engine.prefix_cache
    queries = CounterMetricFamily("tailor_prefix_cache_queries_tokens",
                                  "Tokens of admitted requests looked up in the prefix cache.", labels=["tenant"])
    hits = CounterMetricFamily("tailor_prefix_cache_hits_tokens",
                               "Tokens reused from the prefix cache instead of computed.", labels=["tenant"])
    for tenant, counts in list(cache.stats.items()):
        queries.add_metric([tenant or ""], counts.queries)
        hits.add_metric([tenant or ""], counts.hits)
    yield queries
    yield hits
    pages = GaugeMetricFamily("tailor_prefix_cache_pages",
                              "Pages in the prefix cache: in_use (held by requests) and idle (reclaimable).",
                              labels=["state"])
    pages.add_metric(["in_use"], cache.num_in_use)
    pages.add_metric(["idle"], cache.num_reclaimable)
    yield pages


def _slo_families(engine: LLMEngine):
    """First-token SLO outcomes per tenant (inference.slo); tenant label "" for requests without one."""
    families = {
        "attained": CounterMetricFamily("tailor_slo_ttft_attained", "Requests whose first token met its deadline.",
                                        labels=["tenant"]),
        "missed": CounterMetricFamily("tailor_slo_ttft_missed",
                                      "Requests whose first token missed its deadline, early aborts included.",
                                      labels=["tenant"]),
        "early_aborts": CounterMetricFamily("tailor_slo_early_aborts",
                                            "Queued requests refused because their deadline could no longer be met.",
                                            labels=["tenant"]),
    }
    for tenant, counts in list(engine.deadlines.by_tenant.items()):
        for name, family in families.items():
            family.add_metric([tenant or ""], getattr(counts, name))
    yield from families.values()


def _counter(name: str, help_text: str, value: float) -> CounterMetricFamily:
    return CounterMetricFamily(name, help_text, value=value)


def _gauge(name: str, help_text: str, value: float) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, help_text, value=value)


def _snapshot(read, attempts: int = 5):
    """``read()`` retried when the engine thread changed a container while it was copied (a
    scrape reads without the engine's lock); an empty list if it never settles."""
    for _ in range(attempts):
        try:
            return read()
        except RuntimeError:  # "changed size during iteration" / "deque mutated during iteration"
            continue
    return []


class GatewayCollector(Collector):
    """The model-server gauges of the Gateway API inference extension, vLLM-named (module doc).

    ``running_lora_adapters``: the adapters resident in device pages (ready to serve a batch
    without a page-in); ``waiting_lora_adapters``: adapters of queued requests that are not;
    ``max_lora``: how many adapters the device tier holds now plus how many more of their mean
    size fit in the free pages (unified paging has no fixed adapter slot count; 1 while none is
    resident)."""

    def __init__(self, engine: LLMEngine):
        self.engine = engine

    def collect(self):
        engine = self.engine
        yield _gauge("vllm:num_requests_waiting", "Requests waiting to be scheduled (Gateway API inference "
                     "extension: TotalQueuedRequests).", engine.num_waiting)
        yield _gauge("vllm:num_requests_running", "Requests in the running batch.", engine.num_running)
        occupancy = engine.pool.occupancy()
        used = (occupancy.kv + occupancy.adapter) / occupancy.total if occupancy.total else 0.0
        for name in ("vllm:kv_cache_usage_perc", "vllm:gpu_cache_usage_perc"):
            yield _gauge(name, "Share of the unified page pool held by KV and adapter pages (0 to 1; idle "
                         "prefix-cache pages count as free).", used)
        running, waiting, max_lora = self._adapters(occupancy)
        info = GaugeMetricFamily("vllm:lora_requests_info", "LoRA adapters on this server (value: the scrape time).",
                                 labels=["running_lora_adapters", "waiting_lora_adapters", "max_lora"])
        info.add_metric([",".join(running), ",".join(waiting), str(max_lora)], time.time())
        yield info

    def _adapters(self, occupancy) -> tuple[list[str], list[str], int]:
        engine = self.engine
        device = _snapshot(engine.adapters.resident_adapters)
        running = sorted({d.ref.adapter_id for d in device})
        queued = _snapshot(lambda: [r.adapter_id for r in list(engine.scheduler.waiting)])
        waiting = sorted({a for a in queued if a is not None} - set(running))
        if device:
            mean_pages = max(1, sum(len(d.pages) for d in device) // len(device))
            max_lora = len(running) + occupancy.free // mean_pages
        else:
            max_lora = 1  # nothing resident to measure by: room for at least one
        return running, waiting, max(max_lora, len(running))


class InferenceMetrics:
    """The inference metrics of one engine, in their own registry (several engines may live in
    one test process). Attach once; ``observer()`` feeds per-request histograms."""

    def __init__(self, engine: LLMEngine, registry: CollectorRegistry | None = None):
        self.registry = registry or CollectorRegistry()
        self.ttft = Histogram("tailor_inference_time_to_first_token_seconds", "Time from submission to the first token.",
                              buckets=LATENCY_BUCKETS, registry=self.registry)
        self.tpot = Histogram("tailor_inference_time_per_output_token_seconds",
                              "Mean time per output token after the first, per request.",
                              buckets=TOKEN_LATENCY_BUCKETS, registry=self.registry)
        self.e2e = Histogram("tailor_inference_e2e_latency_seconds", "Time from submission to the last token.",
                             buckets=LATENCY_BUCKETS, registry=self.registry)
        self.batch = Histogram("tailor_inference_batch_size", "Requests per engine step.",
                               buckets=BATCH_BUCKETS, registry=self.registry)
        self.finished = Counter("tailor_inference_requests_finished", "Requests finished, by reason.",
                                ["finish_reason"], registry=self.registry)
        self.load = Histogram("tailor_adapter_load_seconds", "Time to load an adapter into a tier.", ["tier"],
                              buckets=LOAD_BUCKETS, registry=self.registry)
        for reason in ("stop", "length", "abort", "error", "deadline"):
            self.finished.labels(reason)
        for tier in ("host", "device"):
            self.load.labels(tier)
        self.registry.register(EngineCollector(engine))
        self.registry.register(GatewayCollector(engine))
        engine.step_observers.append(lambda batch_size, _tokens: self.batch.observe(batch_size))
        engine.adapters.latency_observers.append(lambda tier, seconds: self.load.labels(tier).observe(seconds))

    def on_first_token(self, seconds: float) -> None:
        self.ttft.observe(seconds)

    def on_finish(self, output: RequestOutput, seconds: float, first_token_seconds: float | None) -> None:
        reason = output.finish_reason.value if output.finish_reason is not None else "error"
        self.finished.labels(reason).inc()
        if reason in ("error", "deadline"):  # no answer: no latency to observe (a deadline: refused while queued)
            return
        self.e2e.observe(seconds)
        generated = len(output.token_ids)
        if generated > 1 and first_token_seconds is not None:
            self.tpot.observe((seconds - first_token_seconds) / (generated - 1))
