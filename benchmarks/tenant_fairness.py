"""Fair shares across tenants, measured through HTTP (issue 18).

The product as users run it: a ``tailor serve`` process (the embedded default: SQLite, a local
object store, the engine in-process) on loopback, two tenants made with the operator token
(``heavy`` and ``light``), each with a chat key and users. Every request is a streamed
``POST /v1/users/{id}/chat`` (server-sent events), greedy, ``--max-tokens`` (16) tokens, so the
whole platform path is measured and time to first token (TTFT: from sending the request to its
first ``delta`` event) is real; TTFT is split at the ``start`` event, which the api sends once it
has loaded the history, rendered the prompt and submitted it to the engine (before: the api's
path; after: waiting in the engine and the prefill). The light tenant's chats ask for exactly
``--max-tokens``; the backlogged heavy load's lengths are spread uniformly over [max/2, 3 max/2]
(same mean) so that chats admitted together do not all finish together. The load comes from
this process (httpx, one connection per request in flight).

Settings of the server, so that the api's own bounds never throttle the benchmark (printed with
the results): ``TAILOR_RATE_LIMIT_PER_MINUTE=0`` (per-tenant rate limit off),
``TAILOR_MAX_CONCURRENT_PER_TENANT=0`` (generations in flight per tenant unbounded),
``TAILOR_MAX_WAITING=1000000`` (the engine's waiting queue never refuses), and
``TAILOR_HISTORY_MAX_MESSAGES=1``: the newest stored message is always an assistant answer, which
the chat rendering drops (a history does not open with half an exchange), so every prompt is the
tenant's system prompt plus the new message, the same in every phase however many chats a user
has had. ``TAILOR_PREFIX_CACHE=true`` (the default, said explicitly). No other ``TAILOR_*``
variable reaches the server (none inherited from the caller's environment): in particular no
first-token SLO (with one, the api would send ``start`` only at the first token). The engine runs
with the service's defaults (``max_num_seqs`` 128, ``max_num_batched_tokens`` 2048, and
``TAILOR_STEP_TIME_TARGET_S`` 0.15 s: the step's token budget is lowered so that a step lasts about
that long, ``inference.step_budget``; the mean batch and step time per phase show where it settled).

Phases, in one run:

* **Capacity**: the heavy tenant alone, closed loop with ``max_num_seqs`` chats in flight; after
  a warm-up (``--capacity-warmup-s`` and at least ``max_num_seqs`` chats finished: a closed loop
  starts as one wave), the requests the engine finished in ``--capacity-seconds`` (its
  ``tailor_inference_requests_finished`` counter) give its capacity in chats per second for this
  request shape. On a CPU a step that prefills ``max_num_batched_tokens`` takes seconds, so the
  window must hold many steps: it lasts until ``max_num_seqs`` chats have ended in it too.
* **A, light alone**: the light tenant sends ``--light-requests`` chats, open loop (each sent at
  its arrival time whatever is still running; Poisson arrivals at ``--light-fraction`` of the
  capacity, or ``--light-rate``): its p50 / p95 TTFT.
* **B, light during a flood**: the heavy tenant floods, open loop at ``--flood-factor`` (10) times
  the capacity (Poisson). The flood first runs until ``--heavy-max-outstanding`` heavy chats are
  in flight and the engine has a waiting queue (at most ``--flood-warmup-s``); then, the flood
  going on, the light tenant replays the same trace as in A (same arrival times, same messages).
  Light p50 / p95 TTFT and p95(B) / p95(A) (goal <= 2). ``--heavy-max-outstanding`` (1000) bounds
  the heavy chats in flight, a safety valve for client and server: arrivals beyond it are skipped
  and counted, so once the backlog stands the heavy tenant sends as fast as its chats finish. The
  engine's waiting and running gauges are sampled every 0.5 s during the replay to show the flood
  kept it saturated. The heavy chats still in flight at the end are cancelled (closing a stream
  aborts its request).
* **C, weights**: operator-set weights (``--weights HEAVY:LIGHT``, 2:1, through
  ``PATCH /v1/tenants/{id}`` ``{"fair_share_weight": w}``), both tenants backlogged (closed loops
  of ``--phase-c-concurrency`` chats each, more than ``max_num_seqs``, so each always has chats
  waiting). After a warm-up (``--phase-c-warmup-s`` and at least ``2 x max_num_seqs`` chats
  finished, fewer when both loops together hold fewer), the tokens served per tenant over
  ``--phase-c-seconds`` (and until each tenant has ``--phase-c-min-chats`` chats ended in the
  window): the api's ``tailor_tenant_tokens`` counters, prompt and completion tokens of the chats
  that ended in the window; and their ratio against the weights. Where the endpoint is missing
  (404 or 405) the phase runs with both weights at 1 and says so.

Between phases the engine is drained (waiting and running 0). The mean batch per phase comes from
the server's ``/metrics``; the light chats' time per output token after the first is about one
engine step at the batch they ran in, so their wait in the engine can be read in steps (on a CPU
a step with the flood's full batch takes several times a step with one chat, which bounds what
B / A can be there). CPU used by the server, by this process and by other processes is recorded
per phase (on a small machine the load generator and the server compete for the same cores:
other processes should be ~0 for a figure to be quoted).

Not measured here: a FCFS control. The VTC order cannot be switched off by configuration; the
engine-level tests (``tests/inference/test_fairness.py``) compare it with FCFS and no-lift controls.

    python -m benchmarks.tenant_fairness                     # CPU, SmolLM2-135M
    python -m benchmarks.tenant_fairness --light-requests 30 --phase-c-seconds 10   # quicker

Results: a table on stdout and ``benchmarks/results/tenant_fairness-<device>.json``.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import math
import os
import platform
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import numpy as np

from benchmarks.live_server import (cpu_snapshot, cpu_use, free_port, metric, scrape, start_server, stop_server,
                                    wait_ready, write_results)
from benchmarks.workload import gamma_arrivals

RESULTS = Path(__file__).resolve().parent / "results"
OPERATOR_TOKEN = "op_benchmark_tenant_fairness_0123456789"
SERVER_SETTINGS = {
    "TAILOR_RATE_LIMIT_PER_MINUTE": "0",
    "TAILOR_MAX_CONCURRENT_PER_TENANT": "0",
    "TAILOR_MAX_WAITING": "1000000",
    "TAILOR_HISTORY_MAX_MESSAGES": "1",
    "TAILOR_CLEANUP_INTERVAL_S": "0",
    "TAILOR_PREFIX_CACHE": "true",
    "TAILOR_DRAIN_TIMEOUT_S": "5",
}
SYSTEM_PROMPTS = {
    "heavy": "You are the writing assistant of a busy newsroom. Answer at length, in plain prose.",
    "light": "You are the help desk of a small library. Answer briefly and politely, in plain prose.",
}
TOPICS = ["the sea", "mountains", "bread", "rain", "a library", "trains", "the moon", "coffee", "bees", "winter",
          "a garden", "music", "bridges", "clocks", "deserts", "owls", "lighthouses", "maps", "tea", "rivers"]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m", help="bundled model name or HF checkpoint directory")
    p.add_argument("--device", default="cpu", help="TAILOR_DEVICE of the server")
    p.add_argument("--max-tokens", type=int, default=16)
    p.add_argument("--heavy-users", type=int, default=4)
    p.add_argument("--capacity-warmup-s", type=float, default=3.0)
    p.add_argument("--capacity-seconds", type=float, default=30.0)
    p.add_argument("--capacity-concurrency", type=int, default=None, help="default: the engine's max_num_seqs")
    p.add_argument("--light-requests", type=int, default=60)
    p.add_argument("--light-fraction", type=float, default=0.1, help="light rate as a fraction of the capacity")
    p.add_argument("--light-rate", type=float, default=None, help="light rate in requests/s (overrides the fraction)")
    p.add_argument("--flood-factor", type=float, default=10.0, help="heavy rate in phase B, times the capacity")
    p.add_argument("--heavy-max-outstanding", type=int, default=1000)
    p.add_argument("--flood-warmup-s", type=float, default=60.0,
                   help="phase B waits at most this long for the heavy backlog to build (see above)")
    p.add_argument("--weights", default="2:1", help="phase C weights, heavy:light")
    p.add_argument("--phase-c-concurrency", type=int, default=None, help="per tenant; default 2 x max_num_seqs")
    p.add_argument("--phase-c-warmup-s", type=float, default=5.0)
    p.add_argument("--phase-c-seconds", type=float, default=40.0)
    p.add_argument("--phase-c-min-chats", type=int, default=20,
                   help="the window lasts until each tenant has at least this many chats ended in it")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args(argv)
    try:
        args.weights = tuple(float(w) for w in args.weights.split(":"))
    except ValueError:
        p.error("--weights must be HEAVY:LIGHT, e.g. 2:1")
    if len(args.weights) != 2 or min(args.weights) <= 0:
        p.error("--weights must be two positive numbers HEAVY:LIGHT")
    if args.light_requests < 2 or args.max_tokens < 1 or args.heavy_users < 1 or args.heavy_max_outstanding < 1:
        p.error("--light-requests >= 2, --max-tokens, --heavy-users and --heavy-max-outstanding >= 1")
    if min(args.capacity_seconds, args.phase_c_seconds, args.flood_factor, args.light_fraction) <= 0:
        p.error("durations, --flood-factor and --light-fraction must be > 0")
    return args


def max_num_seqs() -> int:
    from inference.engine_config import EngineConfig

    return EngineConfig().max_num_seqs


def step_time_target_s() -> float:
    """The server's default TAILOR_STEP_TIME_TARGET_S (the benchmark does not set it)."""
    from tenants.settings import Settings

    return Settings.model_fields["step_time_target_s"].default


# --------------------------------------------------------------------------- server and tenants
@dataclass
class Tenant:
    name: str
    id: str
    chat_key: str
    users: list[str]


def make_tenant(base: str, role: str, users: int) -> Tenant:
    operator = {"Authorization": f"Bearer {OPERATOR_TOKEN}"}
    r = httpx.post(f"{base}/v1/tenants", json={"name": f"{role}-{time.time_ns()}", "system_prompt": SYSTEM_PROMPTS[role]},
                   headers=operator)
    r.raise_for_status()
    tenant = r.json()
    admin = {"Authorization": f"Bearer {tenant['api_key']}"}
    r = httpx.post(f"{base}/v1/api-keys", json={"scope": "chat"}, headers=admin)
    r.raise_for_status()
    ids = []
    for i in range(users):
        u = httpx.post(f"{base}/v1/users", json={"external_id": f"{role}-user-{i}"}, headers=admin)
        u.raise_for_status()
        ids.append(u.json()["id"])
    return Tenant(role, tenant["id"], r.json()["api_key"], ids)


def set_weight(base: str, tenant: Tenant, weight: float) -> dict[str, Any]:
    """The operator sets ``tenant``'s fair-share weight; ``{"status", "ok", "missing", "body"}``."""
    r = httpx.patch(f"{base}/v1/tenants/{tenant.id}", json={"fair_share_weight": weight},
                    headers={"Authorization": f"Bearer {OPERATOR_TOKEN}"})
    try:
        body = r.json()
    except ValueError:
        body = r.text
    return {"status": r.status_code, "ok": r.status_code == 200, "missing": r.status_code in (404, 405), "body": body}


# --------------------------------------------------------------------------- metrics and CPU
def engine_counters(samples) -> dict[str, float]:
    return {"steps": metric(samples, "tailor_inference_steps_total"),
            "batch_sum": metric(samples, "tailor_inference_batch_size_sum"),
            "generation_tokens": metric(samples, "tailor_inference_generation_tokens_total"),
            "finished": (metric(samples, "tailor_inference_requests_finished_total", finish_reason="stop")
                         + metric(samples, "tailor_inference_requests_finished_total", finish_reason="length")),
            "waiting": metric(samples, "tailor_inference_requests_waiting"),
            "running": metric(samples, "tailor_inference_requests_running")}


def tenant_tokens(samples, tenant: Tenant) -> dict[str, float]:
    return {d: metric(samples, "tailor_tenant_tokens_total", tenant=tenant.id, direction=d)
            for d in ("prompt", "completion")}


# --------------------------------------------------------------------------- one chat
async def chat(client: httpx.AsyncClient, tenant: Tenant, user: str, message: str, max_tokens: int) -> dict[str, Any]:
    """One streamed chat: status, time to the ``start`` event (the api has loaded the history,
    rendered the prompt and submitted it to the engine), TTFT (to the first ``delta``), end-to-end
    time, completion tokens."""
    body = {"message": message, "stream": True, "max_tokens": max_tokens, "temperature": 0}
    sent = time.perf_counter()
    result: dict[str, Any] = {"sent": sent, "status": None, "start_s": None, "ttft_s": None, "prompt_tokens": None,
                              "completion_tokens": None, "error": None}
    try:
        async with client.stream("POST", f"/v1/users/{user}/chat", json=body,
                                 headers={"Authorization": f"Bearer {tenant.chat_key}"}) as r:
            result["status"] = r.status_code
            if r.status_code != 200:
                result["error"] = (await r.aread()).decode(errors="replace")[:300]
            else:
                event = None
                async for line in r.aiter_lines():
                    if line.startswith("event: "):
                        event = line[7:]
                        if event == "start":
                            result["start_s"] = time.perf_counter() - sent
                        elif event == "delta" and result["ttft_s"] is None:
                            result["ttft_s"] = time.perf_counter() - sent
                    elif line.startswith("data: ") and event == "done":
                        usage = json.loads(line[6:])["usage"]
                        result["prompt_tokens"], result["completion_tokens"] = usage["prompt_tokens"], usage["completion_tokens"]
                    elif line.startswith("data: ") and event == "error":
                        result["error"] = line[6:300]
    except httpx.HTTPError as exc:
        result["error"] = f"{type(exc).__name__}: {exc}"
    result["ended"] = time.perf_counter()
    result["e2e_s"] = result["ended"] - sent
    return result


def heavy_max_tokens(max_tokens: int, i: int) -> int:
    """Output lengths of the backlogged load: uniform over [max/2, 3 max/2] (mean ``max_tokens``),
    deterministic in ``i``, so that chats admitted together do not all finish in the same step
    (equal lengths keep a closed loop in lockstep waves)."""
    lo, hi = max(1, max_tokens // 2), max(1, max_tokens + max_tokens // 2)
    return lo + (i * 7919) % (hi - lo + 1)


def ok(result: dict[str, Any]) -> bool:
    return (result["status"] == 200 and result["error"] is None and result["ttft_s"] is not None
            and result["start_s"] is not None)


def client(base: str, connections: int) -> httpx.AsyncClient:
    limits = httpx.Limits(max_connections=connections, max_keepalive_connections=min(connections, 256))
    return httpx.AsyncClient(base_url=base, timeout=httpx.Timeout(None, connect=30.0), limits=limits)


async def cancel(tasks) -> None:
    tasks = list(tasks)
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)


async def drain(metrics_client: httpx.AsyncClient, timeout_s: float = 300.0) -> float:
    """Wait until the engine has nothing waiting or running; seconds it took."""
    started = time.perf_counter()
    while time.perf_counter() - started < timeout_s:
        counters = engine_counters(await scrape(metrics_client))
        if counters["waiting"] == 0 and counters["running"] == 0:
            return time.perf_counter() - started
        await asyncio.sleep(0.25)
    raise TimeoutError("the engine did not drain")


async def warm_up(metrics_client: httpx.AsyncClient, min_s: float, completions: int, max_s: float = 300.0) -> float:
    """Wait at least ``min_s`` and until the engine has finished ``completions`` more requests
    (closed loops start in one wave: the first wave's end is not a steady state); seconds waited."""
    started = time.perf_counter()
    first = engine_counters(await scrape(metrics_client))["finished"]
    while time.perf_counter() - started < max_s:
        await asyncio.sleep(0.25)
        done = engine_counters(await scrape(metrics_client))["finished"] - first
        if done >= completions and time.perf_counter() - started >= min_s:
            break
    return time.perf_counter() - started


async def hold_window(min_s: float, enough, max_s: float = 600.0) -> None:
    """Sleep at least ``min_s`` seconds and until ``enough()`` (at most ``max_s``)."""
    started = time.perf_counter()
    await asyncio.sleep(min_s)
    while not enough() and time.perf_counter() - started < max_s:
        await asyncio.sleep(0.25)


class ClosedLoop:
    """``concurrency`` workers, each sending its next chat as soon as the last one ended."""

    def __init__(self, http: httpx.AsyncClient, tenant: Tenant, concurrency: int, max_tokens: int, label: str):
        self.http, self.tenant, self.max_tokens, self.label = http, tenant, max_tokens, label
        self.results: list[dict[str, Any]] = []
        self.tasks = [asyncio.create_task(self._worker(w)) for w in range(concurrency)]

    async def _worker(self, w: int) -> None:
        i = 0
        while True:
            user = self.tenant.users[(w + i) % len(self.tenant.users)]
            message = f"Write a long story about {TOPICS[(w + i) % len(TOPICS)]} ({self.label} {w}.{i})."
            self.results.append(await chat(self.http, self.tenant, user, message,
                                           heavy_max_tokens(self.max_tokens, w * 100_003 + i)))
            i += 1

    def ended_between(self, t0: float, t1: float) -> list[dict[str, Any]]:
        return [r for r in self.results if t0 <= r["ended"] < t1]

    async def stop(self) -> None:
        await cancel(self.tasks)


@dataclass
class Flood:
    """Open-loop chats of ``tenant`` at ``rate`` per second (Poisson), at most ``cap`` in flight."""

    http: httpx.AsyncClient
    tenant: Tenant
    rate: float
    cap: int
    max_tokens: int
    seed: int
    sent: int = 0
    skipped: int = 0
    finished: list[dict[str, Any]] = field(default_factory=list)
    in_flight: set = field(default_factory=set)

    async def run(self, stop: asyncio.Event) -> None:
        rng = np.random.default_rng(self.seed)
        next_at = time.perf_counter()
        while not stop.is_set():
            next_at += rng.exponential(1.0 / self.rate)
            delay = next_at - time.perf_counter()
            if delay > 0:
                try:
                    await asyncio.wait_for(stop.wait(), delay)
                    break
                except TimeoutError:
                    pass
            if len(self.in_flight) >= self.cap:
                self.skipped += 1
                continue
            i = self.sent
            message = f"Write a long story about {TOPICS[i % len(TOPICS)]} (flood {i})."
            task = asyncio.create_task(chat(self.http, self.tenant, self.tenant.users[i % len(self.tenant.users)],
                                            message, heavy_max_tokens(self.max_tokens, i)))
            self.in_flight.add(task)
            task.add_done_callback(self._done)
            self.sent += 1

    def _done(self, task: asyncio.Task) -> None:
        self.in_flight.discard(task)
        if not task.cancelled() and task.exception() is None:
            self.finished.append(task.result())


# --------------------------------------------------------------------------- phases
async def measure_capacity(args, heavy: Tenant, metrics_client, server_pid: int) -> dict[str, Any]:
    concurrency = args.capacity_concurrency or max_num_seqs()
    async with client(args.base, concurrency) as http:
        loop = ClosedLoop(http, heavy, concurrency, args.max_tokens, "capacity")
        warmup = await warm_up(metrics_client, args.capacity_warmup_s, concurrency)
        m0, cpu0, t0 = await scrape(metrics_client), cpu_snapshot(server_pid), time.perf_counter()
        await hold_window(args.capacity_seconds, lambda: len(loop.ended_between(t0, math.inf)) >= concurrency)
        m1, cpu1, t1 = await scrape(metrics_client), cpu_snapshot(server_pid), time.perf_counter()
        await loop.stop()
    failed = [r for r in loop.results if r["status"] is not None and not ok(r)]
    e0, e1 = engine_counters(m0), engine_counters(m1)
    finished = e1["finished"] - e0["finished"]
    if not finished:
        raise RuntimeError(f"no chat finished in the capacity window; failures: {[r['error'] for r in failed[:3]]}")
    steps = e1["steps"] - e0["steps"]
    return {"concurrency": concurrency, "warmup_s": warmup, "window_s": t1 - t0, "finished": finished,
            "requests_per_s": finished / (t1 - t0),
            "client_chats_ended_in_window": sum(1 for r in loop.ended_between(t0, t1) if ok(r)),
            "completion_tokens_per_s": (e1["generation_tokens"] - e0["generation_tokens"]) / (t1 - t0),
            "mean_step_ms": (t1 - t0) / steps * 1e3 if steps else None,
            "mean_batch": (e1["batch_sum"] - e0["batch_sum"]) / steps if steps else None,
            "failed": len(failed), "cpu": cpu_use(cpu0, cpu1, t1 - t0),
            "drain_s": await drain(metrics_client)}


def light_trace(args, rate: float, light: Tenant) -> list[tuple[float, str, str]]:
    arrivals = gamma_arrivals(args.light_requests, rate=rate, cv=1.0, seed=args.seed + 1)
    arrivals = arrivals - arrivals[0]  # the first one at once
    return [(float(at), light.users[i % len(light.users)], f"Describe {TOPICS[i % len(TOPICS)]} in two sentences "
             f"(question {i}).") for i, at in enumerate(arrivals)]


async def replay(args, light: Tenant, trace) -> list[dict[str, Any]]:
    """Send the light trace open loop: each chat at its arrival time."""
    async with client(args.base, len(trace)) as http:
        t0 = time.perf_counter()
        tasks = []
        for at, user, message in trace:
            delay = t0 + at - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            lag = time.perf_counter() - (t0 + at)
            task = asyncio.create_task(chat(http, light, user, message, args.max_tokens))
            tasks.append((lag, task))
        results = []
        for lag, task in tasks:
            result = await task
            result["send_lag_s"] = lag
            results.append(result)
    return results


async def sample_engine(metrics_client, samples: list[dict[str, float]], stop: asyncio.Event) -> None:
    while not stop.is_set():
        samples.append(engine_counters(await scrape(metrics_client)))
        try:
            await asyncio.wait_for(stop.wait(), 0.5)
        except TimeoutError:
            pass


def light_summary(results: list[dict[str, Any]]) -> dict[str, Any]:
    good = [r for r in results if ok(r)]
    ttft = [r["ttft_s"] for r in good]
    # time per output token after the first: about one engine step at the batch the chat ran in
    tpot = [(r["e2e_s"] - r["ttft_s"]) / (r["completion_tokens"] - 1) for r in good if (r["completion_tokens"] or 0) > 1]
    return {"requests": len(results), "ok": len(good),
            "failed": [{"status": r["status"], "error": r["error"]} for r in results if not ok(r)],
            "ttft_p50_s": float(np.percentile(ttft, 50)) if ttft else None,
            "ttft_p95_s": float(np.percentile(ttft, 95)) if ttft else None,
            "ttft_max_s": max(ttft) if ttft else None,
            "start_p50_s": float(np.percentile([r["start_s"] for r in good], 50)) if good else None,
            "start_p95_s": float(np.percentile([r["start_s"] for r in good], 95)) if good else None,
            "in_engine_p50_s": float(np.percentile([r["ttft_s"] - r["start_s"] for r in good], 50)) if good else None,
            "in_engine_p95_s": float(np.percentile([r["ttft_s"] - r["start_s"] for r in good], 95)) if good else None,
            "e2e_p50_s": float(np.percentile([r["e2e_s"] for r in good], 50)) if good else None,
            "tpot_p50_s": float(np.percentile(tpot, 50)) if tpot else None,
            "send_lag_max_s": max(r["send_lag_s"] for r in results),
            "ttft_s": ttft, "start_s": [r["start_s"] for r in good],
            "prompt_tokens": [r["prompt_tokens"] for r in results]}  # trace order: A's and B's must match


async def phase_light(args, light: Tenant, trace, metrics_client, server_pid: int):
    """Replay the light trace (during ``flood`` if given); what the light tenant saw and the engine did."""
    gauges: list[dict[str, float]] = []
    stop_sampling = asyncio.Event()
    sampler = asyncio.create_task(sample_engine(metrics_client, gauges, stop_sampling))
    m0, cpu0, t0 = await scrape(metrics_client), cpu_snapshot(server_pid), time.perf_counter()
    results = await replay(args, light, trace)
    m1, cpu1, t1 = await scrape(metrics_client), cpu_snapshot(server_pid), time.perf_counter()
    stop_sampling.set()
    await sampler
    e0, e1 = engine_counters(m0), engine_counters(m1)
    steps = e1["steps"] - e0["steps"]
    summary = light_summary(results)
    summary.update(
        wall_s=t1 - t0, cpu=cpu_use(cpu0, cpu1, t1 - t0),
        steps=steps,  # wall / steps is a step's time only while the engine never idles (B, not A)
        mean_batch=(e1["batch_sum"] - e0["batch_sum"]) / steps if steps else None,
        engine_waiting={"min": min(g["waiting"] for g in gauges), "median": statistics.median(g["waiting"] for g in gauges),
                        "max": max(g["waiting"] for g in gauges)} if gauges else None,
        engine_running_median=statistics.median(g["running"] for g in gauges) if gauges else None,
    )
    return summary


async def phase_b(args, heavy: Tenant, light: Tenant, trace, capacity: float, metrics_client, server_pid: int):
    rate = args.flood_factor * capacity
    async with client(args.base, args.heavy_max_outstanding) as http:
        flood = Flood(http, heavy, rate, args.heavy_max_outstanding, args.max_tokens, args.seed + 2)
        stop = asyncio.Event()
        flooding = asyncio.create_task(flood.run(stop))
        started = time.perf_counter()
        backlogged = False
        while time.perf_counter() - started < args.flood_warmup_s:
            await asyncio.sleep(0.25)
            if len(flood.in_flight) >= flood.cap and engine_counters(await scrape(metrics_client))["waiting"] >= 1:
                backlogged = True
                break
        warmup = time.perf_counter() - started
        sent_before_light = flood.sent
        summary = await phase_light(args, light, trace, metrics_client, server_pid)
        stop.set()
        await flooding
        in_flight = len(flood.in_flight)
        await cancel(flood.in_flight)
    summary.update(
        heavy_rate_offered=rate, heavy_sent=flood.sent, heavy_skipped_at_cap=flood.skipped,
        heavy_sent_during_light=flood.sent - sent_before_light,
        heavy_completed=sum(1 for r in flood.finished if ok(r)), heavy_failed=sum(1 for r in flood.finished if not ok(r)),
        heavy_cancelled_at_end=in_flight, flood_warmup_s=warmup, backlogged_before_light=backlogged,
        drain_s=await drain(metrics_client),
    )
    return summary


async def phase_c(args, heavy: Tenant, light: Tenant, metrics_client, server_pid: int) -> dict[str, Any]:
    weights = dict(zip(("heavy", "light"), args.weights))
    answers = {role: set_weight(args.base, tenant, weights[role]) for role, tenant in (("heavy", heavy), ("light", light))}
    if all(a["ok"] for a in answers.values()):
        applied, note = weights, None
    elif any(a["missing"] for a in answers.values()):
        applied = {"heavy": 1.0, "light": 1.0}
        note = ("PATCH /v1/tenants/{id} is not in this revision (HTTP "
                f"{answers['heavy']['status']}): weights cannot be set, both tenants run at weight 1")
    else:
        raise RuntimeError(f"setting the weights failed: {answers}")
    concurrency = args.phase_c_concurrency or 2 * max_num_seqs()
    async with client(args.base, 2 * concurrency) as http:
        loops = {role: ClosedLoop(http, tenant, concurrency, args.max_tokens, f"weights-{role}")
                 for role, tenant in (("heavy", heavy), ("light", light))}
        warmup = await warm_up(metrics_client, args.phase_c_warmup_s, 2 * min(max_num_seqs(), 2 * concurrency))
        m0, cpu0, t0 = await scrape(metrics_client), cpu_snapshot(server_pid), time.perf_counter()
        await hold_window(args.phase_c_seconds, lambda: all(
            sum(1 for r in loop.ended_between(t0, math.inf) if ok(r)) >= args.phase_c_min_chats for loop in loops.values()))
        m1, cpu1, t1 = await scrape(metrics_client), cpu_snapshot(server_pid), time.perf_counter()
        for loop in loops.values():
            await loop.stop()
    tenants = {"heavy": heavy, "light": light}
    served = {}
    for role, tenant in tenants.items():
        before, after = tenant_tokens(m0, tenant), tenant_tokens(m1, tenant)
        prompt, completion = after["prompt"] - before["prompt"], after["completion"] - before["completion"]
        served[role] = {"weight": applied[role], "prompt_tokens": prompt, "completion_tokens": completion,
                        "weighted_service": prompt + 2 * completion,  # the scheduler's w_p = 1, w_q = 2
                        "chats_completed": sum(1 for r in loops[role].ended_between(t0, t1) if ok(r)),
                        "chats_failed": sum(1 for r in loops[role].results if r["status"] is not None and not ok(r))}
    weight_ratio = applied["heavy"] / applied["light"]
    ratio = lambda key: served["heavy"][key] / served["light"][key] if served["light"][key] else None  # noqa: E731
    return {"weights_requested": weights, "weights_applied": applied, "weight_api": answers, "note": note,
            "concurrency_per_tenant": concurrency, "warmup_s": warmup, "window_s": t1 - t0, "cpu": cpu_use(cpu0, cpu1, t1 - t0),
            "served": served, "weight_ratio": weight_ratio,
            "completion_ratio": ratio("completion_tokens"), "weighted_service_ratio": ratio("weighted_service"),
            "drain_s": await drain(metrics_client)}


async def run_phases(args, heavy: Tenant, light: Tenant, server_pid: int) -> dict[str, Any]:
    async with httpx.AsyncClient(base_url=args.base, timeout=60.0) as metrics_client:
        print("measuring capacity ...", flush=True)
        capacity = await measure_capacity(args, heavy, metrics_client, server_pid)
        print(f"capacity: {capacity['requests_per_s']:.2f} chats/s ({capacity['completion_tokens_per_s']:.1f} "
              f"completion tokens/s, mean batch {capacity['mean_batch']:.1f})", flush=True)
        rate = args.light_rate or args.light_fraction * capacity["requests_per_s"]
        trace = light_trace(args, rate, light)
        print(f"phase A: light alone, {len(trace)} chats at {rate:.2f}/s ...", flush=True)
        phase_a = await phase_light(args, light, trace, metrics_client, server_pid)
        phase_a["drain_s"] = await drain(metrics_client)
        print(f"phase B: heavy flood at {args.flood_factor:g}x capacity + the same light trace ...", flush=True)
        phase_b_ = await phase_b(args, heavy, light, trace, capacity["requests_per_s"], metrics_client, server_pid)
        print(f"phase C: weights {args.weights[0]:g}:{args.weights[1]:g}, both backlogged ...", flush=True)
        phase_c_ = await phase_c(args, heavy, light, metrics_client, server_pid)
    return {"capacity": capacity, "light_rate": rate, "trace_arrivals_s": [at for at, _u, _m in trace],
            "phase_a": phase_a, "phase_b": phase_b_, "phase_c": phase_c_}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    port = free_port()
    args.base = f"http://127.0.0.1:{port}"
    with tempfile.TemporaryDirectory(prefix="tailor-bench-fairness-") as tmp:
        settings = {**SERVER_SETTINGS, "TAILOR_MODEL": str(args.model), "TAILOR_DEVICE": args.device,
                    "TAILOR_OPERATOR_TOKEN": OPERATOR_TOKEN}
        server = start_server(settings, Path(tmp), port, inherit_tailor_env=False)  # only the settings named here
        try:
            wait_ready(args.base, server)
            heavy = make_tenant(args.base, "heavy", args.heavy_users)
            light = make_tenant(args.base, "light", 1)
            phases = asyncio.run(run_phases(args, heavy, light, server.pid))
        except BaseException:
            log = (Path(tmp) / "server.log").read_text(errors="replace")
            print("--- server log (tail) ---\n" + log[-3000:], file=sys.stderr)
            raise
        finally:
            stop_server(server)
    return report(args, phases)


def _ms(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds * 1e3:.0f}"


def report(args: argparse.Namespace, phases: dict[str, Any]) -> int:
    cap, a, b, c = phases["capacity"], phases["phase_a"], phases["phase_b"], phases["phase_c"]
    ratio = b["ttft_p95_s"] / a["ttft_p95_s"] if a["ttft_p95_s"] and b["ttft_p95_s"] else None
    print(f"\nServer settings: {', '.join(f'{k}={v}' for k, v in SERVER_SETTINGS.items())}; service defaults "
          f"(max_num_seqs {max_num_seqs()}, step time target {step_time_target_s()} s); model {args.model}, device {args.device}; streamed per-user chats, "
          f"greedy, {args.max_tokens} tokens")
    print(f"Capacity (heavy alone, {cap['concurrency']} chats in flight, {cap['window_s']:.1f} s): "
          f"{cap['requests_per_s']:.2f} chats/s, {cap['completion_tokens_per_s']:.1f} completion tokens/s, "
          f"mean step {cap['mean_step_ms']:.0f} ms at mean batch {cap['mean_batch']:.1f}")
    print(f"Light trace: {args.light_requests} chats, Poisson at {phases['light_rate']:.2f}/s; "
          f"phase B flood offered {b['heavy_rate_offered']:.1f} chats/s ({args.flood_factor:g}x capacity), at most "
          f"{args.heavy_max_outstanding} in flight")
    print("\n| phase | light chats ok | light TTFT p50 ms | light TTFT p95 ms | max ms | of which to `start` p50 / p95 ms "
          "| of which `start` to first token p50 / p95 ms | light ms per output token p50 | engine waiting (min / median) "
          "| engine running (median) | mean batch | heavy sent / skipped at cap | CPUs: server / client / others |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for label, ph, heavy in (("A: light alone", a, "-"),
                             ("B: light + heavy flood", b, f"{b['heavy_sent']} / {b['heavy_skipped_at_cap']}")):
        waiting = ph["engine_waiting"]
        cpu = ph["cpu"]
        print(f"| {label} | {ph['ok']}/{ph['requests']} | {_ms(ph['ttft_p50_s'])} | {_ms(ph['ttft_p95_s'])} | "
              f"{_ms(ph['ttft_max_s'])} | {_ms(ph['start_p50_s'])} / {_ms(ph['start_p95_s'])} | "
              f"{_ms(ph['in_engine_p50_s'])} / {_ms(ph['in_engine_p95_s'])} | {_ms(ph['tpot_p50_s'])} | "
              f"{waiting['min']:.0f} / {waiting['median']:.0f} | "
              f"{ph['engine_running_median']:.0f} | {ph['mean_batch'] or 0:.1f} | {heavy} | "
              + (f"{cpu['server']:.2f} / {cpu['client']:.2f} / {cpu['others']:.2f} |" if cpu else "- |"))
    print(f"\nLight p95 TTFT, B / A: {ratio:.2f} (goal <= 2)" if ratio is not None else "\nLight p95 TTFT, B / A: n/a")
    for label, ph in (("A", a), ("B", b)):
        if ph["tpot_p50_s"] and ph["in_engine_p50_s"] is not None:
            print(f"{label}: the light chats' p50 wait in the engine (start to first token) is "
                  f"{ph['in_engine_p50_s'] / ph['tpot_p50_s']:.1f} times their p50 time per output token "
                  f"({_ms(ph['tpot_p50_s'])} ms, about one engine step at the batch they ran in)")
    if not b["backlogged_before_light"]:
        print(f"(the engine had no waiting queue after {b['flood_warmup_s']:.1f} s of flood: the heavy tenant was "
              "not backlogged when the light trace started)")
    print(f"\nPhase C: weights heavy:light {c['weights_applied']['heavy']:g}:{c['weights_applied']['light']:g}, "
          f"{c['concurrency_per_tenant']} chats in flight per tenant, {c['window_s']:.1f} s window")
    if c["note"]:
        print(f"NOTE: {c['note']}")
    print("| tenant | weight | chats completed | prompt tokens | completion tokens | weighted service (p + 2c) |")
    print("| --- | --- | --- | --- | --- | --- |")
    for role, s in c["served"].items():
        print(f"| {role} | {s['weight']:g} | {s['chats_completed']} | {s['prompt_tokens']:.0f} | "
              f"{s['completion_tokens']:.0f} | {s['weighted_service']:.0f} |")
    fmt = lambda x: "n/a" if x is None else f"{x:.2f}"  # noqa: E731
    print(f"heavy / light: completion tokens {fmt(c['completion_ratio'])}, weighted service "
          f"{fmt(c['weighted_service_ratio'])}, against weights {c['weight_ratio']:.2f}")
    others = max((ph["cpu"] or {}).get("others", 0.0) for ph in (cap, a, b, c))
    if others > 0.2:
        print(f"WARNING: other processes kept up to {others:.2f} CPUs busy during a phase: do not quote these figures")
    result = {
        "benchmark": "tenant_fairness", "date": dt.date.today().isoformat(), "device": args.device,
        "machine": {"cpus": os.cpu_count(), "processor": platform.processor() or platform.machine()},
        "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "server_settings": SERVER_SETTINGS, "max_num_seqs": max_num_seqs(), "step_time_target_s": step_time_target_s(),
        **phases, "ttft_p95_ratio_b_over_a": ratio,
    }
    write_results(result, args.out or RESULTS / f"tenant_fairness-{args.device.split(':')[0]}.json")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
