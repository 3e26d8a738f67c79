"""A multi-turn chat trace for the platform (users with histories), and its replay over HTTP.

S-LoRA's trace is single requests; Tailor's users hold conversations, and every turn's prompt is the
user's history plus the new message (the api loads it from the database and the prefix cache reuses
the pages of the previous turn). This trace is what the platform sees:

* ``num_users`` users; the first ``round(adapter_share * num_users)`` have a personal adapter each
  (user i owns adapter i), with a rank drawn (seeded, uniformly) from ``ranks``; the others use
  the base model.
* Sessions start as a gamma process (``session_rate`` sessions/s, coefficient of variation ``cv``).
* Each session has a number of turns uniform in ``turns_range``; each turn a user message of
  ``message_len_range`` token ids (drawn from 3..vocab-1, decoded to text when sent) and an answer
  bound of ``output_len_range`` tokens; between an answer and the user's next message the user
  thinks for an exponential time of mean ``think_mean_s``.

Open across users, closed within one: a user's turn k+1 is sent ``think_s`` after the answer to
turn k ended (a conversation cannot run ahead of its answers), so the trace fixes session starts and
think times, not every send time.

The file is JSON (``version`` 1, ``kind`` "chat"); ``load_chat_trace(save_chat_trace(t))`` gives
back ``t``. The replay (:func:`replay_chat`) creates the users through the admin API, uploads and
assigns their adapters, then streams every turn through ``POST /v1/users/{id}/chat`` (greedy) and
records per turn: time to first token (from the send), latency, prompt tokens (the history grows),
completion tokens. ``python -m benchmarks.chat_trace`` runs it against ``tailor serve`` started on
loopback and prints a table per turn number and overall.

    python -m benchmarks.chat_trace --users 16 --session-rate 0.5 --turns 3,6
"""

from __future__ import annotations

import argparse
import asyncio
import json
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import httpx
import numpy as np

from benchmarks.http_replay import LocalService, TenantKeys, bearer, create_tenant, json_ok, upload_adapter
from benchmarks.live_server import write_results
from benchmarks.open_loop import RequestTiming, markdown_table, summarize_run
from benchmarks.run_report import report_header
from benchmarks.workload import gamma_arrivals

CHAT_TRACE_VERSION = 1
RESULTS = Path(__file__).resolve().parent / "results"


@dataclass(frozen=True)
class Turn:
    """One user message: its token ids, the answer's token bound, the think time before it (s)."""

    message_token_ids: list[int]
    max_tokens: int
    think_s: float


@dataclass(frozen=True)
class Session:
    """One user's conversation: its adapter index (None: base model) and rank, start time (s), turns."""

    user: int
    adapter: int | None
    rank: int | None
    start_s: float
    turns: list[Turn]


@dataclass(frozen=True)
class ChatTrace:
    sessions: list[Session]
    params: dict[str, Any] = field(default_factory=dict)

    @property
    def num_turns(self) -> int:
        return sum(len(s.turns) for s in self.sessions)


def synthetic_chat_trace(num_users: int, session_rate: float, *, turns_range: tuple[int, int] = (2, 6),
                         message_len_range: tuple[int, int] = (8, 48), output_len_range: tuple[int, int] = (8, 32),
                         think_mean_s: float = 2.0, adapter_share: float = 1.0, ranks: tuple[int, ...] = (8,),
                         cv: float = 1.0, vocab: int = 49152, seed: int = 0) -> ChatTrace:
    """A trace as the module docstring describes; ranges are inclusive."""
    problems = []
    if num_users < 1:
        problems.append("num_users must be >= 1")
    if session_rate <= 0 or cv <= 0 or think_mean_s < 0:
        problems.append("session_rate and cv must be > 0, think_mean_s >= 0")
    if not 0 <= adapter_share <= 1:
        problems.append("adapter_share must be in [0, 1]")
    for name, (lo, hi) in (("turns_range", turns_range), ("message_len_range", message_len_range),
                           ("output_len_range", output_len_range)):
        if not 1 <= lo <= hi:
            problems.append(f"{name} must be 1 <= lo <= hi, got {(lo, hi)}")
    if not ranks or min(ranks) < 1 or vocab < 4:
        problems.append("ranks must be positive and vocab >= 4")
    if problems:
        raise ValueError("; ".join(problems))
    rng = np.random.default_rng(seed)
    starts = gamma_arrivals(num_users, session_rate, cv, seed=seed + 1)
    with_adapter = round(adapter_share * num_users)
    rank_of = np.random.default_rng(seed + 2).choice(np.asarray(ranks), size=num_users)
    sessions = []
    for user in range(num_users):
        turns = []
        for k in range(int(rng.integers(turns_range[0], turns_range[1] + 1))):
            length = int(rng.integers(message_len_range[0], message_len_range[1] + 1))
            ids = rng.integers(3, vocab, size=length).tolist()
            max_tokens = int(rng.integers(output_len_range[0], output_len_range[1] + 1))
            think = 0.0 if k == 0 else float(rng.exponential(think_mean_s)) if think_mean_s > 0 else 0.0
            turns.append(Turn(ids, max_tokens, think))
        has = user < with_adapter
        sessions.append(Session(user, user if has else None, int(rank_of[user]) if has else None, float(starts[user]),
                                turns))
    params = {"num_users": num_users, "session_rate": session_rate, "turns_range": list(turns_range),
              "message_len_range": list(message_len_range), "output_len_range": list(output_len_range),
              "think_mean_s": think_mean_s, "adapter_share": adapter_share, "ranks": list(ranks), "cv": cv,
              "vocab": vocab, "seed": seed}
    return ChatTrace(sessions, params)


def save_chat_trace(trace: ChatTrace, path: Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"version": CHAT_TRACE_VERSION, "kind": "chat", "params": trace.params,
                                "sessions": [asdict(s) for s in trace.sessions]}))
    return path


def load_chat_trace(path: Path) -> ChatTrace:
    """The chat trace in ``path``; ValueError naming what is wrong with a file that is not one."""
    document = json.loads(Path(path).read_text())
    if not isinstance(document, dict) or document.get("version") != CHAT_TRACE_VERSION or document.get("kind") != "chat":
        raise ValueError(f"{path}: not a version-{CHAT_TRACE_VERSION} chat trace file")
    sessions = [Session(**{**s, "turns": [Turn(**t) for t in s["turns"]]}) for s in document["sessions"]]
    return ChatTrace(sessions, document.get("params", {}))


# --------------------------------------------------------------------------- replay over HTTP
@dataclass
class TurnTiming(RequestTiming):
    """A turn's :class:`RequestTiming` (``arrival_s``: when it was sent, seconds from the start) plus
    which session and turn it was and the prompt tokens the engine saw."""

    user: int = 0
    turn: int = 0
    prompt_tokens: int | None = None


def create_users(tenant: TenantKeys, trace: ChatTrace, adapter_dir: Callable[[Session], Path]) -> dict[int, str]:
    """A platform user per session, its adapter uploaded and assigned; ``{session.user: user id}``."""
    ids = {}
    for session in trace.sessions:
        user_id = json_ok(httpx.post(f"{tenant.base}/v1/users", json={"external_id": f"chat-trace-{session.user}"},
                                     headers=bearer(tenant.admin_key), timeout=30.0))["id"]
        if session.adapter is not None:
            adapter_id = upload_adapter(tenant, f"user-{session.user}-r{session.rank}", adapter_dir(session))
            json_ok(httpx.put(f"{tenant.base}/v1/users/{user_id}/adapter", json={"adapter_id": adapter_id},
                              headers=bearer(tenant.admin_key), timeout=30.0))
        ids[session.user] = user_id
    return ids


async def _turn(client: httpx.AsyncClient, chat_key: str, user_id: str, body: dict, timing: TurnTiming) -> None:
    sent = time.monotonic()
    try:
        async with client.stream("POST", f"/v1/users/{user_id}/chat", json=body, headers=bearer(chat_key)) as r:
            if r.status_code != 200:
                timing.error = f"HTTP {r.status_code}: {(await r.aread()).decode(errors='replace')[:300]}"
                return
            event = None
            async for line in r.aiter_lines():
                if line.startswith("event: "):
                    event = line[7:]
                    if event == "delta" and timing.first_token_s is None:
                        timing.first_token_s = time.monotonic() - sent
                elif line.startswith("data: ") and event == "done":
                    usage = json.loads(line[6:])["usage"]
                    timing.prompt_tokens, timing.output_tokens = usage["prompt_tokens"], usage["completion_tokens"]
                    timing.latency_s = time.monotonic() - sent
                    return
                elif line.startswith("data: ") and event == "error":
                    timing.error = line[6:306]
                    return
            timing.error = "the stream ended without a done event"
    except (httpx.HTTPError, ValueError, KeyError) as exc:
        timing.error = f"{type(exc).__name__}: {exc}"


async def replay_chat(tenant: TenantKeys, trace: ChatTrace, user_ids: dict[int, str], decode: Callable[[list[int]], str],
                      progress: Callable[[int], None] | None = None, timeout_s: float = 3600.0) -> list[TurnTiming]:
    """Every session from its start time, turn after turn (see the module docstring); the timings in
    session order, then turn order. A failed turn ends its session (the rest count as failed)."""
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=64)
    timings = [[TurnTiming(0, 0.0, user=s.user, turn=k) for k in range(len(s.turns))] for s in trace.sessions]
    async with httpx.AsyncClient(base_url=tenant.base, limits=limits, timeout=httpx.Timeout(timeout_s, connect=30.0)) as client:
        start = time.monotonic()

        async def session(s: Session, mine: list[TurnTiming]) -> None:
            await asyncio.sleep(max(0.0, start + s.start_s - time.monotonic()))
            for k, turn in enumerate(s.turns):
                await asyncio.sleep(turn.think_s)
                mine[k].arrival_s = time.monotonic() - start
                body = {"message": decode(turn.message_token_ids), "stream": True, "max_tokens": turn.max_tokens,
                        "temperature": 0}
                await _turn(client, tenant.chat_key, user_ids[s.user], body, mine[k])
                if progress is not None:
                    progress(1)
                if not mine[k].ok:
                    for rest in mine[k + 1:]:
                        rest.error = "an earlier turn of the session failed"
                    return

        await asyncio.wait_for(asyncio.gather(*(session(s, m) for s, m in zip(trace.sessions, timings))), timeout_s)
    return [t for mine in timings for t in mine]


def mean_prompt_tokens(timings: list[TurnTiming]) -> float | None:
    """The mean prompt tokens of the turns that reported them (None when none did)."""
    prompts = [t.prompt_tokens for t in timings if t.prompt_tokens is not None]
    return float(np.mean(prompts)) if prompts else None


def by_turn(timings: list[TurnTiming], slo_ttft_s: float) -> list[dict[str, Any]]:
    """:func:`summarize_run`'s statistics per turn number, with the mean prompt tokens."""
    rows = []
    for k in sorted({t.turn for t in timings}):
        mine = [t for t in timings if t.turn == k]
        rows.append({"turn": k, "prompt_tokens_mean": mean_prompt_tokens(mine),
                     **summarize_run(mine, slo_ttft_s)})
    return rows


COLUMNS = [("turn", "turn", "s"), ("turns", "requests", "d"), ("failed", "failed", "d"),
           ("prompt tokens", "prompt_tokens_mean", ".0f"), ("TTFT mean s", "ttft_s.mean", ".3f"),
           ("TTFT p50", "ttft_s.p50", ".3f"), ("TTFT p90", "ttft_s.p90", ".3f"), ("TTFT p99", "ttft_s.p99", ".3f"),
           ("latency mean s", "latency_s.mean", ".3f"), ("latency p99", "latency_s.p99", ".3f"),
           ("SLO attainment", "slo_attainment", ".1%")]


def main(argv: list[str] | None = None) -> int:
    from tqdm import tqdm

    from benchmarks.random_llama import checkpoint_for
    from benchmarks.slora_eval import MODEL_CACHE, TARGETS
    from benchmarks.synthetic_adapters import synthetic_adapter
    from inference.model_config import ModelConfig
    from inference.tokenizer import Tokenizer

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m",
                   help="bundled model name, checkpoint directory, or random:llama-7b / random:llama-13b / random:tiny")
    p.add_argument("--model-cache", type=Path, default=MODEL_CACHE, help="where random:* checkpoints are written")
    p.add_argument("--device", default="cpu")
    p.add_argument("--users", type=int, default=16)
    p.add_argument("--session-rate", type=float, default=0.5, help="sessions starting per second")
    p.add_argument("--turns", default="3,6", help="inclusive turns per session lo,hi")
    p.add_argument("--message", default="8,48", help="inclusive user message tokens lo,hi")
    p.add_argument("--output", default="8,32", help="inclusive answer bound lo,hi")
    p.add_argument("--think-mean-s", type=float, default=2.0)
    p.add_argument("--adapter-share", type=float, default=1.0, help="share of users with a personal adapter")
    p.add_argument("--ranks", default="8")
    p.add_argument("--slo-ttft-s", type=float, default=6.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out-dir", type=Path, default=RESULTS)
    args = p.parse_args(argv)

    def pair(text: str) -> tuple[int, int]:
        lo, hi = (int(x) for x in text.split(","))
        return lo, hi

    checkpoint = checkpoint_for(args.model, args.model_cache, generate_on=args.device)
    config = ModelConfig.from_checkpoint(checkpoint)
    try:
        trace = synthetic_chat_trace(args.users, args.session_rate, turns_range=pair(args.turns),
                                     message_len_range=pair(args.message), output_len_range=pair(args.output),
                                     think_mean_s=args.think_mean_s, adapter_share=args.adapter_share,
                                     ranks=tuple(int(r) for r in args.ranks.split(",")), vocab=config.vocab_size,
                                     seed=args.seed)
    except ValueError as exc:
        p.error(str(exc))
    args.out_dir.mkdir(parents=True, exist_ok=True)
    save_chat_trace(trace, args.out_dir / "traces" / f"chat_trace-u{args.users}-seed{args.seed}.json")
    tokenizer = Tokenizer(checkpoint)
    settings = {"TAILOR_MODEL": str(checkpoint), "TAILOR_DEVICE": args.device,
                "TAILOR_MAX_LORA_RANK": str(max(trace.params["ranks"]))}
    with tempfile.TemporaryDirectory(prefix="tailor-chat-trace-") as scratch, LocalService(settings) as service:
        tenant = create_tenant(service.base, f"chat-trace-{time.time_ns()}")

        def adapter_dir(s: Session) -> Path:
            return synthetic_adapter(Path(scratch) / f"u{s.user}", config, r=s.rank, targets=TARGETS,
                                     alpha=2.0 * s.rank, seed=args.seed * 100_003 + s.user, std=0.02)

        user_ids = create_users(tenant, trace, adapter_dir)
        with tqdm(total=trace.num_turns, desc="turns", unit="turn") as bar:
            timings = asyncio.run(replay_chat(tenant, trace, user_ids, tokenizer.decode, progress=bar.update))
    overall = {"turn": "all", **summarize_run(timings, args.slo_ttft_s),
               "prompt_tokens_mean": mean_prompt_tokens(timings)}
    rows = by_turn(timings, args.slo_ttft_s) + [overall]
    for row in rows:
        row["turn"] = str(row["turn"])
    table = markdown_table(rows, COLUMNS)
    print("\n" + table)
    path = args.out_dir / f"chat_trace-{args.device.split(':')[0]}.json"
    write_results({**report_header("chat_trace", args), "trace": trace.params, "rows": rows}, path)
    return 0 if overall["failed"] == 0 else 1


if __name__ == "__main__":
    raise SystemExit(main())
