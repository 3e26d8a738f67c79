"""Open-loop replay of a trace against the engine in-process, and the statistics S-LoRA reports.

Open loop: each request is submitted at its arrival time, whatever is still running (a closed loop,
every request at once or one after another, hides queueing). The requests go through the engine loop
thread that the services use (``inference.engine_loop.EngineLoop``), with their ``arrival_time``
set to the scheduled time, so a request that arrives during a step is counted from its arrival, not
from when the step ended. Greedy, EOS ignored: every request generates exactly its ``output_len``.

Per request: time to first token (TTFT, arrival to the first token) and latency (arrival to the
last token). Per run (:func:`summarize_run`): throughput (requests and output tokens per second,
from the first arrival to the last finish), mean / p50 / p90 / p99 of latency and TTFT, and SLO
attainment: the share of requests whose first token came within ``slo_ttft_s`` (S-LoRA's SLO is
on the first token, 6 s in its paper); failed requests count as missed.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from benchmarks.trace import Trace
from inference import LLM, SamplingParams
from inference.request import RequestOutput

PERCENTILES = (50, 90, 99)


@dataclass
class RequestTiming:
    """One replayed request; times in seconds, ``first_token_s`` and ``latency_s`` from its arrival."""

    index: int
    arrival_s: float
    first_token_s: float | None = None
    latency_s: float | None = None
    output_tokens: int = 0
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None and self.latency_s is not None


def replay_in_process(llm: LLM, trace: Trace, adapter_name: Callable[[int], str] | None = None,
                      progress: Callable[[int], None] | None = None, timeout_s: float = 3600.0) -> list[RequestTiming]:
    """Submit every request of ``trace`` at its arrival time and wait for all of them.

    ``adapter_name(i)`` names the registered adapter for adapter index ``i`` (requests without an
    adapter use the base model). ``progress(1)`` is called as each request finishes.
    """
    engine = llm.engine
    timings = [RequestTiming(r.index, r.arrival_time) for r in trace.requests]
    remaining = len(timings)
    done = threading.Event()
    lock = threading.Lock()
    if remaining == 0:
        return timings

    def on_output(timing: RequestTiming, arrival: float, output: RequestOutput) -> None:
        nonlocal remaining
        now = time.monotonic()
        if output.token_ids and timing.first_token_s is None:
            timing.first_token_s = now - arrival
        timing.output_tokens = len(output.token_ids)  # cumulative
        if output.finished:
            if output.error:
                timing.error = output.error
            timing.latency_s = now - arrival
            if progress is not None:
                progress(1)
            with lock:
                remaining -= 1
                if remaining == 0:
                    done.set()

    start = time.monotonic()
    for request, timing in zip(trace.requests, timings):
        delay = start + request.arrival_time - time.monotonic()
        if delay > 0:
            time.sleep(delay)
        name = None if request.adapter is None or adapter_name is None else adapter_name(request.adapter)
        params = SamplingParams(max_tokens=request.output_len, temperature=0.0, ignore_eos=True)
        made = engine.request_from_ids(list(request.prompt_token_ids), params, None, name)
        made.arrival_time = start + request.arrival_time
        llm.loop.submit(made, lambda out, t=timing, a=made.arrival_time: on_output(t, a, out))
    if not done.wait(timeout_s):
        raise TimeoutError(f"{remaining} requests still running after {timeout_s} s")
    return timings


def _stats(values: Sequence[float]) -> dict[str, float | None]:
    if not values:
        return {"mean": None, **{f"p{p}": None for p in PERCENTILES}}
    array = np.asarray(values, dtype=np.float64)
    return {"mean": float(array.mean()), **{f"p{p}": float(np.percentile(array, p)) for p in PERCENTILES}}


def summarize_run(timings: Sequence[RequestTiming], slo_ttft_s: float) -> dict[str, Any]:
    """Throughput, latency and TTFT statistics and SLO attainment of one replay (seconds)."""
    ok = [t for t in timings if t.ok]
    if ok:
        span = max(t.arrival_s + t.latency_s for t in ok) - min(t.arrival_s for t in timings)
    else:
        span = 0.0
    tokens = sum(t.output_tokens for t in ok)
    attained = sum(1 for t in ok if t.first_token_s is not None and t.first_token_s <= slo_ttft_s)
    return {
        "requests": len(timings),
        "failed": len(timings) - len(ok),
        "span_s": span,
        "requests_per_s": len(ok) / span if span > 0 else None,
        "output_tokens_per_s": tokens / span if span > 0 else None,
        "latency_s": _stats([t.latency_s for t in ok]),
        "ttft_s": _stats([t.first_token_s for t in ok if t.first_token_s is not None]),
        "slo_ttft_s": slo_ttft_s,
        "slo_attainment": attained / len(timings) if timings else None,
    }


def dotted(row: dict[str, Any], key: str) -> Any:
    """``row["a"]["b"]`` for ``key`` "a.b"; None where a part is missing."""
    value: Any = row
    for part in key.split("."):
        value = value.get(part) if isinstance(value, dict) else None
    return value


def markdown_table(rows: Sequence[dict[str, Any]], columns: Sequence[tuple[str, str, str]]) -> str:
    """A markdown table of ``rows``: ``columns`` are (header, dotted key, format spec)."""

    def cell(row: dict[str, Any], key: str, spec: str) -> str:
        value = dotted(row, key)
        return "-" if value is None else format(value, spec)

    lines = ["| " + " | ".join(h for h, _, _ in columns) + " |", "|" + " --- |" * len(columns)]
    lines += ["| " + " | ".join(cell(r, k, s) for _, k, s in columns) + " |" for r in rows]
    return "\n".join(lines)
