"""Multi-turn chat with the prefix cache on and off, in one run (issue 18).

The trace: ``--users`` (4) users of one tenant, ``--turns`` (12) turns each, a long tenant system
prompt (about ``--system-tokens`` (850) tokens of plausible support-desk policy text, generated
deterministically from templates), user messages of varied length (1 to 5 sentences), greedy
decoding, ``--max-tokens`` (32) tokens per answer. Turns are interleaved round-robin (user 0 turn
0, user 1 turn 0, ..., user 0 turn 1, ...), one request at a time, and each answer goes back into
its user's history, so every user's next prompt starts with their previous one.

Two in-process engines serve it, identical but for ``EngineConfig.enable_prefix_cache`` (True /
False), each wrapped in the platform's ``InferenceCore``: every request is a ``GenerateRequest``
with the tenant's ``system_prompt``, the user's history plus the new message, the platform's
``history_token_budget`` and ``history_trim_step_tokens`` the api sends (from
``--history-token-budget``, default the api's 1536, and ``--history-trim-step-fraction``, default
the api's 1/3) and ``tenant``, so the real chat rendering and history trimming apply. When the
history outgrows the budget the oldest turns are dropped; with a trim step the window's start moves
only by about a step at a time, at stable anchors, so most turns still extend the previous prompt,
while at each move only the system prompt is still shared with the cached pages (the table's
``messages used`` column shows where; ``--history-trim-step-fraction 0`` is the exact fit, whose
start moves every turn once the budget is reached). The api's database window
(``TAILOR_HISTORY_MAX_MESSAGES``, 100) does not come into play: a user's history here has at most
``2 x turns - 1`` messages.

Both engines see the same prompts: the answer fed back into the history is the cache-on engine's
(the product's configuration); the cache-off engine's answer to the same prompt is only compared
with it (text equality, turn by turn; a mismatch does not change what follows).

Ordering, and why: the two engines run *alternately, request by request*, not one trace after the
other. On the 2-core CI machine the speed drifts by up to 20% within minutes and other processes
come and go; alternating makes both engines see the same machine state at each turn, so the per
turn ratio compares like with like. Which engine goes first alternates too (on/off, off/on, ...),
cancelling any first-mover effect (caches, OpenMP wake-ups; each engine thread gives its idle
OpenMP team back when it goes idle, see docs/design.md "CPU threads"). Each engine first serves
one warm-up request under another tenant, so the trace's tenant starts with an empty cache.

Per request the script records: prompt tokens (``GenerationStarted``), prompt tokens actually
computed (the engine's ``stats.prompt_tokens`` delta: prompt tokens prefilled), the prefix cache's
per-tenant counters (``engine.prefix_cache.stats[tenant]``: tokens queried and hit), time to first
token as the platform sees it (``InferenceCore.start`` until the first text delta, rendering
included) and as the engine sees it (the core's ``tailor_inference_time_to_first_token_seconds``
observation: submission to first token), and the answer.

Totals: the mean fraction of prompt tokens computed with the cache on for turns after each user's
first (goal < 30%), the TTFT ratio off/on over those turns (ratio of the mean TTFTs; goal >= 3x on
CPU), and how many answers were identical with the cache on and off.

    python -m benchmarks.multi_turn_chat                       # CPU, SmolLM2-135M
    python -m benchmarks.multi_turn_chat --users 2 --turns 4   # a quick look

Results: a table on stdout and ``benchmarks/results/multi_turn_chat-<device>.json``.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import datetime as dt
import os
import platform
import random
import statistics
import time
from pathlib import Path
from typing import Any

from benchmarks.live_server import write_results

RESULTS = Path(__file__).resolve().parent / "results"
TENANT = "bench-multi-turn"
WARMUP_TENANT = "bench-warm-up"
SIDES = ("on", "off")

# --------------------------------------------------------------------------- the trace
PRODUCTS = ["Ridgeline 45 backpack", "Cirrus rain shell", "Tamarack down jacket", "Basalt trail shoe",
            "Aurora headlamp", "Fjord dry bag", "Summit trekking poles", "Larch fleece", "Kestrel tent",
            "Willow sleeping bag", "Granite water filter", "Meridian camp stove"]
CITIES = ["Portland", "Denver", "Halifax", "Tucson", "Duluth", "Asheville", "Boise", "Burlington"]
COLOURS = ["moss green", "slate grey", "rust orange", "glacier blue", "charcoal", "sand", "plum"]
TIERS = ["Trail", "Ridge", "Summit"]
CARRIERS = ["UPS Ground", "FedEx Home", "USPS Priority", "a regional courier"]

POLICY = [
    "Orders of the {p} ship from our {c} warehouse within {n} business days of payment.",
    "A customer may return an unused {p} within {m} days, in its original packaging, for a full refund.",
    "The {p} carries a {y}-year warranty against defects in materials and workmanship.",
    "When a customer asks about the {p}, mention that it comes in {col} and {col2}.",
    "Never promise an exact delivery date for {c}; give the usual range of {n} to {n2} business days.",
    "If a {p} arrived damaged, apologise, ask for one photo of the damage and open a replacement ticket.",
    "Members of the {t} tier get free shipping on orders over {d} dollars and early access to sales.",
    "Parcels to {c} usually travel with {car}; the tracking number arrives by e-mail the same evening.",
    "Do not discuss the internal cost of the {p} or the names of our suppliers.",
    "A worn {p} can still be repaired: our {c} repair bench charges a flat fee of {d2} dollars.",
    "If a customer is upset, acknowledge the problem in one sentence before you offer a solution.",
    "Gift cards never expire and can be combined with one promotional code per order.",
    "Answer in plain language, in at most four sentences, and end with a question only when you need "
    "information to continue.",
    "Escalate to a human agent when a customer mentions an injury, a legal claim or a chargeback.",
    "Price matching applies to the {p} only against authorised retailers, within {m} days of purchase.",
    "Never ask for a full card number; the last four digits and the order number are enough.",
]
QUESTIONS = [
    "I ordered a {p} last week and it still has not shipped.",
    "Can I return the {p} if I already used it once on a short hike?",
    "Does the {p} come in {col}?",
    "My {p} arrived with a torn seam.",
    "How long does delivery to {c} usually take?",
    "Is there a warranty on the {p}, and what does it cover?",
    "I am a member of the {t} tier.",
    "Can you compare the {p} with the {p2} for a three-day trip in the rain?",
    "My tracking number has not updated for four days.",
    "Can I combine a gift card with the spring promotion code?",
    "The zipper of my {p} is stuck and I do not want to break it.",
    "Which is warmer, the {p} or the {p2}?",
    "Could you explain the repair option for an old {p}?",
    "I live in {c} and I need it before the weekend.",
    "Thanks, that helps.",
    "What would you pack for a cold night at the lake?",
]


def _fill(template: str, rng: random.Random) -> str:
    p, p2 = rng.sample(PRODUCTS, 2)
    col, col2 = rng.sample(COLOURS, 2)
    n = rng.randint(1, 4)
    return template.format(p=p, p2=p2, c=rng.choice(CITIES), col=col, col2=col2, n=n, n2=n + rng.randint(2, 5),
                           m=rng.choice([14, 30, 45, 60]), y=rng.randint(1, 5), t=rng.choice(TIERS),
                           d=rng.choice([50, 75, 100]), d2=rng.choice([15, 20, 25, 35]), car=rng.choice(CARRIERS))


def system_prompt(tokenizer, target_tokens: int, seed: int) -> str:
    """About ``target_tokens`` tokens (the first sentence boundary at or past it) of policy text."""
    rng = random.Random(f"system-{seed}")
    parts = ["You are the customer support assistant of Harbor & Pine Outfitters, a shop for hiking and "
             "camping gear. Follow these policies exactly."]
    while len(tokenizer.encode(" ".join(parts))) < target_tokens:
        parts.append(_fill(rng.choice(POLICY), rng))
    return " ".join(parts)


def user_message(user: int, turn: int, seed: int) -> str:
    """One to five sentences, deterministic in ``(seed, user, turn)``."""
    rng = random.Random(f"user-{seed}-{user}-{turn}")
    return " ".join(_fill(q, rng) for q in rng.sample(QUESTIONS, rng.randint(1, 5)))


# --------------------------------------------------------------------------- running one request
def _engine_ttft_sum(core) -> float:
    return core.metrics.registry.get_sample_value("tailor_inference_time_to_first_token_seconds_sum") or 0.0


def _cache_counts(engine, tenant: str) -> tuple[int, int]:
    counts = engine.prefix_cache.stats.get(tenant)
    return (counts.queries, counts.hits) if counts is not None else (0, 0)


async def run_one(core, request) -> dict[str, Any]:
    """Serve ``request`` alone on ``core``; what it cost and what it answered."""
    from inference.service.events import GenerationEnded, GenerationFailed, GenerationStarted, TextDelta

    engine = core.engine
    computed_before = engine.stats.prompt_tokens
    queries_before, hits_before = _cache_counts(engine, request.tenant)
    engine_ttft_before = _engine_ttft_sum(core)
    started = time.perf_counter()
    ttft = None
    result: dict[str, Any] = {}
    stream = await core.start(request)
    try:
        async for event in stream:
            if isinstance(event, GenerationStarted):
                result["prompt_tokens"], result["messages_used"] = event.prompt_tokens, event.messages_used
            elif isinstance(event, TextDelta) and ttft is None:
                ttft = time.perf_counter() - started
            elif isinstance(event, GenerationEnded):
                result.update(text=event.text, completion_tokens=event.completion_tokens,
                              finish_reason=event.finish_reason.value)
            elif isinstance(event, GenerationFailed):
                raise RuntimeError(f"generation failed: {event.message}")
    finally:
        await stream.aclose()
    queries, hits = _cache_counts(engine, request.tenant)
    result.update(
        ttft_s=ttft if ttft is not None else time.perf_counter() - started,  # no text at all: the whole request
        engine_ttft_s=_engine_ttft_sum(core) - engine_ttft_before,
        computed_tokens=engine.stats.prompt_tokens - computed_before,
        cache_queried_tokens=queries - queries_before,
        cache_hit_tokens=hits - hits_before,
    )
    return result


# --------------------------------------------------------------------------- the run
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m", help="bundled model name or HF checkpoint directory")
    p.add_argument("--device", default="cpu")
    p.add_argument("--users", type=int, default=4)
    p.add_argument("--turns", type=int, default=12)
    p.add_argument("--system-tokens", type=int, default=850, help="length of the tenant's system prompt")
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--history-token-budget", type=int, default=None,
                   help="the platform's TAILOR_HISTORY_TOKEN_BUDGET (default: the api's default, 1536)")
    p.add_argument("--history-trim-step-fraction", type=float, default=None,
                   help="the platform's TAILOR_HISTORY_TRIM_STEP_FRACTION (default: the api's, 1/3; 0: exact fit, "
                        "the window slides every turn)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args(argv)
    if args.users < 1 or args.turns < 2 or args.max_tokens < 1 or args.system_tokens < 1:
        p.error("--users >= 1, --turns >= 2, --max-tokens >= 1 and --system-tokens >= 1")
    from tenants.settings import Settings

    if args.history_token_budget is None:
        args.history_token_budget = Settings.model_fields["history_token_budget"].default
    if args.history_trim_step_fraction is None:
        args.history_trim_step_fraction = Settings.model_fields["history_trim_step_fraction"].default
    # what the api sends as GenerateRequest.history_trim_step_tokens for these settings
    args.history_trim_step_tokens = Settings(
        history_token_budget=args.history_token_budget, history_trim_step_fraction=args.history_trim_step_fraction,
    ).history_trim_step_tokens
    return args


def _cpu_snapshot() -> tuple[float, float] | None:
    """(CPU seconds all processes have been busy; CPU seconds of this process), Linux only."""
    try:
        with open("/proc/stat") as f:
            values = [int(v) for v in f.readline().split()[1:9]]
        hz = os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError):
        return None
    own = os.times()
    return (sum(values) - values[3] - values[4]) / hz, own.user + own.system


def build_cores(args: argparse.Namespace) -> dict[str, Any]:
    from inference import LLM
    from inference.engine_config import EngineConfig
    from inference.service.core import InferenceCore

    if "enable_prefix_cache" not in {f.name for f in dataclasses.fields(EngineConfig)}:
        raise SystemExit("this revision's EngineConfig has no enable_prefix_cache: nothing to compare")
    return {side: InferenceCore(LLM(args.model, device=args.device, enable_prefix_cache=(side == "on")))
            for side in SIDES}


async def run_trace(args: argparse.Namespace, cores: dict[str, Any]) -> tuple[str, list[dict[str, Any]]]:
    from inference.service.protocol import ChatTurn, GenerateRequest

    tokenizer = cores["on"].tokenizer
    system = system_prompt(tokenizer, args.system_tokens, args.seed)

    def request(messages: list[ChatTurn], tenant: str) -> GenerateRequest:
        return GenerateRequest(messages=messages, system_prompt=system, history_token_budget=args.history_token_budget,
                               history_trim_step_tokens=args.history_trim_step_tokens, max_tokens=args.max_tokens,
                               temperature=0.0, tenant=tenant)

    for core in cores.values():  # warm-up under another tenant: the trace's tenant starts cold
        await run_one(core, request([ChatTurn(role="user", content="Hello, who are you?")], WARMUP_TENANT))

    histories: list[list[ChatTurn]] = [[] for _ in range(args.users)]
    rows = []
    index = 0
    for turn in range(args.turns):
        for user in range(args.users):
            message = ChatTurn(role="user", content=user_message(user, turn, args.seed))
            req = request([*histories[user], message], TENANT)
            order = SIDES if index % 2 == 0 else SIDES[::-1]
            row: dict[str, Any] = {"turn": turn, "user": user, "first": order[0]}
            for side in order:
                row[side] = await run_one(cores[side], req)
            row["identical"] = row["on"]["text"] == row["off"]["text"]
            rows.append(row)
            histories[user] += [message, ChatTurn(role="assistant", content=row["on"]["text"])]
            index += 1
            print(f"turn {turn:2d} user {user}: prompt {row['on']['prompt_tokens']:5d}, computed on "
                  f"{row['on']['computed_tokens']:5d} / off {row['off']['computed_tokens']:5d}, TTFT on "
                  f"{row['on']['ttft_s'] * 1e3:7.1f} ms / off {row['off']['ttft_s'] * 1e3:7.1f} ms"
                  f"{'' if row['identical'] else '  (answers differ)'}", flush=True)
    return system, rows


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    cores = build_cores(args)
    try:
        cpu_before, wall_before = _cpu_snapshot(), time.perf_counter()
        system, rows = asyncio.run(run_trace(args, cores))
        wall = time.perf_counter() - wall_before
        cpu_after = _cpu_snapshot()
        tokenizer = cores["on"].tokenizer
        engine_config = dataclasses.asdict(cores["on"].engine.config)
    finally:
        for core in cores.values():
            core.close()
    other_cpus = None
    if cpu_before is not None and cpu_after is not None and wall > 0:
        other_cpus = max(0.0, ((cpu_after[0] - cpu_before[0]) - (cpu_after[1] - cpu_before[1])) / wall)
    return report(args, system, len(tokenizer.encode(system)), rows, engine_config, wall, other_cpus)


def _mean(values) -> float:
    values = list(values)
    return sum(values) / len(values) if values else float("nan")


def summarize(rows: list[dict[str, Any]]) -> dict[str, Any]:
    later = [r for r in rows if r["turn"] >= 1]
    fraction = lambda r, side: r[side]["computed_tokens"] / r[side]["prompt_tokens"]  # noqa: E731
    ttft = {side: _mean(r[side]["ttft_s"] for r in later) for side in SIDES}
    engine_ttft = {side: _mean(r[side]["engine_ttft_s"] for r in later) for side in SIDES}
    mismatches = [{"turn": r["turn"], "user": r["user"]} for r in rows if not r["identical"]]
    return {
        "requests": len(rows),
        "later_turn_requests": len(later),
        "computed_fraction_later_turns": {side: _mean(fraction(r, side) for r in later) for side in SIDES},
        "computed_fraction_all_turns": {side: _mean(fraction(r, side) for r in rows) for side in SIDES},
        "prompt_tokens": sum(r["on"]["prompt_tokens"] for r in rows),
        "computed_tokens": {side: sum(r[side]["computed_tokens"] for r in rows) for side in SIDES},
        "cache_hit_tokens": {side: sum(r[side]["cache_hit_tokens"] for r in rows) for side in SIDES},
        "mean_ttft_s_later_turns": ttft,
        "ttft_ratio_off_on_later_turns": ttft["off"] / ttft["on"],
        "ttft_ratio_off_on_per_request_median": statistics.median(r["off"]["ttft_s"] / r["on"]["ttft_s"] for r in later),
        "mean_engine_ttft_s_later_turns": engine_ttft,
        "engine_ttft_ratio_off_on_later_turns": engine_ttft["off"] / engine_ttft["on"],
        "identical_answers": sum(r["identical"] for r in rows),
        "mismatches": mismatches,
        "mismatched_turns_by_index": {t: sum(1 for m in mismatches if m["turn"] == t)
                                      for t in sorted({m["turn"] for m in mismatches})},
    }


def report(args, system: str, system_tokens: int, rows: list[dict[str, Any]], engine_config: dict, wall: float,
           other_cpus: float | None) -> int:
    summary = summarize(rows)
    print(f"\n{args.users} users x {args.turns} turns, round-robin, one request at a time; system prompt "
          f"{system_tokens} tokens; history budget {args.history_token_budget} tokens, trim step "
          f"{args.history_trim_step_tokens or 'none (exact fit)'}; greedy, {args.max_tokens} "
          f"tokens; engines alternate request by request ({args.device})")
    print("| turn | prompt tokens (mean) | messages used (mean) | computed, cache on (mean) | computed, cache off (mean) "
          "| cache hits (mean) | TTFT on ms (median) | TTFT off ms (median) | off / on | identical |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    per_turn = []
    for turn in range(args.turns):
        group = [r for r in rows if r["turn"] == turn]
        line = {
            "turn": turn,
            "prompt_tokens": _mean(r["on"]["prompt_tokens"] for r in group),
            "messages_used": _mean(r["on"]["messages_used"] for r in group),
            "computed_on": _mean(r["on"]["computed_tokens"] for r in group),
            "computed_off": _mean(r["off"]["computed_tokens"] for r in group),
            "cache_hits_on": _mean(r["on"]["cache_hit_tokens"] for r in group),
            "ttft_on_ms": statistics.median(r["on"]["ttft_s"] for r in group) * 1e3,
            "ttft_off_ms": statistics.median(r["off"]["ttft_s"] for r in group) * 1e3,
            "identical": sum(r["identical"] for r in group),
            "users": len(group),
        }
        per_turn.append(line)
        print(f"| {turn} | {line['prompt_tokens']:.0f} | {line['messages_used']:.1f} | {line['computed_on']:.0f} | "
              f"{line['computed_off']:.0f} | {line['cache_hits_on']:.0f} | {line['ttft_on_ms']:.1f} | "
              f"{line['ttft_off_ms']:.1f} | {line['ttft_off_ms'] / line['ttft_on_ms']:.2f} | "
              f"{line['identical']}/{line['users']} |")
    frac = summary["computed_fraction_later_turns"]
    print(f"\nPrompt tokens computed, turns 1..{args.turns - 1}: cache on {frac['on']:.1%} of the prompt "
          f"(goal < 30%), cache off {frac['off']:.1%}")
    print(f"TTFT off / on, turns 1..{args.turns - 1}: {summary['ttft_ratio_off_on_later_turns']:.2f}x by the means "
          f"(goal >= 3x), {summary['ttft_ratio_off_on_per_request_median']:.2f}x median per request; engine-side "
          f"(submission to first token) {summary['engine_ttft_ratio_off_on_later_turns']:.2f}x")
    print(f"Greedy answers identical with the cache on and off: {summary['identical_answers']}/{len(rows)}"
          + (f"; mismatches per turn {summary['mismatched_turns_by_index']}" if summary["mismatches"] else ""))
    if other_cpus is not None:
        print(f"Other processes kept {other_cpus:.2f} CPUs busy on average during the run"
              + (" (the machine was not idle: do not quote these figures)" if other_cpus > 0.2 else ""))
    result = {
        "benchmark": "multi_turn_chat", "date": dt.date.today().isoformat(), "device": args.device,
        "machine": {"cpus": os.cpu_count(), "processor": platform.processor() or platform.machine()},
        "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "engine_config": engine_config, "system_prompt_tokens": system_tokens, "system_prompt": system,
        "wall_s": wall, "other_cpus": other_cpus,
        "summary": summary, "per_turn": per_turn, "requests": rows,
    }
    write_results(result, args.out or RESULTS / f"multi_turn_chat-{args.device.split(':')[0]}.json")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
