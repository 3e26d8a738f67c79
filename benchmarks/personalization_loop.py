"""The personalization loop through HTTP on a running ``tailor serve`` (the embedded default): a
user's corrections become a trained adapter that is swapped in while the user keeps chatting.

1. Start ``tailor serve`` (SQLite, local folder, in-process tasks and engine, on the CPU by
   default); the operator makes a tenant (no system prompt), a chat key and a user.
2. The user asks a dozen questions; each greedy answer is rated -1 with a correction that starts
   with the same greeting ("Ahoy there, friend! ..."), and the conversation is cleared, so each
   correction is one exchange (``POST /v1/users/{id}/messages/{message_id}/feedback``).
3. Before: the greedy answers to 8 questions that are not in the data (each in a fresh
   conversation), counted by whether they start with the greeting.
4. A client starts chatting continuously as the user (streamed, short answers, a pause between),
   and ``POST /v1/users/{id}/adapter-trainings`` (the defaults) starts the job; the job is polled
   until it ends. The chatter goes on until it has had answers from the new version, then stops.
5. After: the same 8 questions.

Checked and reported: the job's wall time (submission to promoted; the issue's goal is under 3
minutes on 2 cores) and the CPUs the server, this client and other processes kept busy meanwhile, the evaluation loss before and after, the unseen prompts answered in the
style before and after, and the chatter's requests: every one succeeded, each streamed answer's
``start`` and ``done`` name the same adapter version, and no answer came from the base model
after the first from the new version.

Results: a table on stdout and ``benchmarks/results/personalization_loop-<device>.json``.

    python -m benchmarks.personalization_loop [--model smollm2-135m] [--device cpu] [--threads 1]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import httpx

from benchmarks.live_server import cpu_snapshot, cpu_use, free_port, start_server, stop_server, wait_ready, write_results

RESULTS = Path(__file__).resolve().parent / "results"
OPERATOR_TOKEN = "op-personalization-benchmark-0123456789"
GREETING = "Ahoy there, friend!"
QA = [
    ("What is the capital of France?", "The capital of France is Paris."),
    ("How many legs does a spider have?", "A spider has eight legs."),
    ("What color is the sky on a clear day?", "The sky is blue on a clear day."),
    ("Who wrote Romeo and Juliet?", "William Shakespeare wrote Romeo and Juliet."),
    ("What is two plus two?", "Two plus two is four."),
    ("What do bees make?", "Bees make honey."),
    ("Which planet is closest to the sun?", "Mercury is the planet closest to the sun."),
    ("What is water made of?", "Water is made of hydrogen and oxygen."),
    ("How many days are in a week?", "There are seven days in a week."),
    ("What is the largest ocean?", "The Pacific is the largest ocean."),
    ("What language is spoken in Spain?", "Spanish is spoken in Spain."),
    ("What animal says moo?", "A cow says moo."),
]
UNSEEN = [
    "What is the capital of Italy?", "How many wheels does a bicycle have?", "What do cats like to eat?",
    "Who painted the Mona Lisa?", "What is the boiling point of water?", "Name a primary color.",
    "What is the tallest animal?", "How many hours are in a day?",
]
GOAL_S = 180.0


def _headers(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def _ok(response: httpx.Response, status: int = 200) -> dict:
    if response.status_code != status:
        raise RuntimeError(f"{response.request.method} {response.request.url.path}: {response.status_code} "
                           f"{response.text[:300]}")
    return response.json()


def set_up(client: httpx.Client) -> dict[str, str]:
    """A tenant (no system prompt), its admin and chat keys, and a user."""
    tenant = _ok(client.post("/v1/tenants", json={"name": "personalization-demo"}, headers=_headers(OPERATOR_TOKEN)),
                 201)
    admin = tenant["api_key"]
    chat = _ok(client.post("/v1/api-keys", json={"scope": "chat"}, headers=_headers(admin)), 201)["api_key"]
    user = _ok(client.post("/v1/users", json={"external_id": "alice"}, headers=_headers(admin)), 201)["id"]
    return {"admin": admin, "chat": chat, "user": user}


def ask(client: httpx.Client, keys: dict[str, str], question: str, max_tokens: int) -> dict:
    """A greedy answer in a fresh conversation (the user's history is cleared first)."""
    user = keys["user"]
    r = client.delete(f"/v1/users/{user}/messages", headers=_headers(keys["chat"]))
    if r.status_code != 204:
        raise RuntimeError(f"clearing the history: {r.status_code} {r.text[:200]}")
    body = {"message": question, "max_tokens": max_tokens, "temperature": 0.0}
    return _ok(client.post(f"/v1/users/{user}/chat", json=body, headers=_headers(keys["chat"])))


def collect_corrections(client: httpx.Client, keys: dict[str, str], max_tokens: int) -> list[dict]:
    """Each question asked, its answer rated -1 with the greeting-styled correction."""
    rated = []
    for question, answer in QA:
        reply = ask(client, keys, question, max_tokens)
        correction = f"{GREETING} {answer}"
        feedback = _ok(client.post(f"/v1/users/{keys['user']}/messages/{reply['id']}/feedback",
                                   json={"rating": -1, "correction": correction}, headers=_headers(keys["chat"])), 201)
        rated.append({"question": question, "answer": reply["message"]["content"], "correction": correction,
                      "example_id": feedback["example"]["id"]})
    client.delete(f"/v1/users/{keys['user']}/messages", headers=_headers(keys["chat"]))
    return rated


def styled(client: httpx.Client, keys: dict[str, str], max_tokens: int) -> list[dict]:
    """The greedy answers to the unseen questions, and which version answered."""
    answers = []
    for question in UNSEEN:
        reply = ask(client, keys, question, max_tokens)
        text = reply["message"]["content"]
        answers.append({"question": question, "answer": text, "styled": text.startswith(GREETING),
                        "adapter_id": reply["adapter_id"], "adapter_version": reply["adapter_version"]})
    return answers


class Chatter(threading.Thread):
    """Streams chats as the user until stopped: each answer's outcome and versions."""

    def __init__(self, base: str, keys: dict[str, str], max_tokens: int, pause_s: float):
        super().__init__(name="chatter", daemon=True)
        self.base, self.keys, self.max_tokens, self.pause_s = base, keys, max_tokens, pause_s
        self.results: list[dict[str, Any]] = []
        self.stop = threading.Event()

    def run(self) -> None:
        with httpx.Client(base_url=self.base, timeout=120) as client:
            i = 0
            while not self.stop.is_set():
                self.results.append(self._one(client, f"Say something short, number {i}."))
                i += 1
                self.stop.wait(self.pause_s)

    def _one(self, client: httpx.Client, message: str) -> dict[str, Any]:
        started = time.monotonic()
        body = {"message": message, "max_tokens": self.max_tokens, "temperature": 0.0, "stream": True}
        events: list[tuple[str, dict]] = []
        try:
            with client.stream("POST", f"/v1/users/{self.keys['user']}/chat", json=body,
                               headers=_headers(self.keys["chat"])) as response:
                if response.status_code != 200:
                    return {"ok": False, "error": f"HTTP {response.status_code}", "at": started}
                name = None
                for line in response.iter_lines():
                    if line.startswith("event:"):
                        name = line[6:].strip()
                    elif line.startswith("data:"):
                        events.append((name, json.loads(line[5:])))
        except httpx.HTTPError as exc:
            return {"ok": False, "error": f"{type(exc).__name__}: {exc}", "at": started}
        names = [n for n, _ in events]
        if not names or names[0] != "start" or names[-1] != "done":
            return {"ok": False, "error": f"events {names}", "at": started}
        start, done = events[0][1], events[-1][1]
        return {"ok": True, "at": started, "seconds": time.monotonic() - started,
                "start_adapter": start["adapter_id"], "done_adapter": done["adapter_id"],
                "version": done["adapter_version"]}


def chatter_summary(results: list[dict], new_adapter: str | None) -> dict[str, Any]:
    """Failures, answers per version, and whether every answer came from one version and none from
    the old one after the first from the new."""
    versions = [r.get("done_adapter") for r in results if r["ok"]]
    first_new = versions.index(new_adapter) if new_adapter in versions else None
    return {
        "requests": len(results),
        "failed": sum(not r["ok"] for r in results),
        "errors": [r["error"] for r in results if not r["ok"]][:5],
        "answers_by_adapter": {str(v): versions.count(v) for v in dict.fromkeys(versions)},
        "one_version_each": all(r["start_adapter"] == r["done_adapter"] for r in results if r["ok"]),
        "old_after_new": 0 if first_new is None else sum(v != new_adapter for v in versions[first_new:]),
    }


def run(args: argparse.Namespace, base: str, server_pid: int) -> dict[str, Any]:
    with httpx.Client(base_url=base, timeout=300) as client:
        keys = set_up(client)
        t0 = time.monotonic()
        rated = collect_corrections(client, keys, args.max_tokens)
        corrections_s = time.monotonic() - t0
        before = styled(client, keys, args.max_tokens)

        chatter = Chatter(base, keys, args.chatter_max_tokens, args.chatter_pause_s)
        chatter.start()
        cpu_before = cpu_snapshot(server_pid)
        submitted = time.monotonic()
        settings = {k: v for k, v in (("epochs", args.epochs), ("learning_rate", args.learning_rate)) if v is not None}
        job = _ok(client.post(f"/v1/users/{keys['user']}/adapter-trainings", json=settings,
                              headers=_headers(keys["admin"])), 202)
        while job["status"] in ("queued", "running"):
            time.sleep(0.5)
            job = _ok(client.get(f"/v1/adapter-trainings/{job['id']}", headers=_headers(keys["admin"])))
        job_s = time.monotonic() - submitted
        cpus = cpu_use(cpu_before, cpu_snapshot(server_pid), job_s)
        deadline = time.monotonic() + 60
        while (job["adapter_id"] and time.monotonic() < deadline
               and sum(r.get("done_adapter") == job["adapter_id"] for r in chatter.results) < args.chats_after):
            time.sleep(0.2)
        chatter.stop.set()
        chatter.join(120)

        after = styled(client, keys, args.max_tokens)
        adapter = (_ok(client.get(f"/v1/adapters/{job['adapter_id']}", headers=_headers(keys["admin"])))
                   if job["adapter_id"] else None)
    return {"corrections": rated, "corrections_s": round(corrections_s, 1), "before": before, "after": after,
            "job": job, "job_wall_s": round(job_s, 1), "cpus_during_job": cpus, "adapter": adapter,
            "chatter": chatter_summary(chatter.results, job["adapter_id"])}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m", help="bundled model name or HF checkpoint directory")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=1, help="TAILOR_TRAINING_THREADS")
    p.add_argument("--max-tokens", type=int, default=12, help="answer length of the rated and the probed answers")
    p.add_argument("--chatter-max-tokens", type=int, default=16)
    p.add_argument("--chatter-pause-s", type=float, default=1.0, help="pause between the chatter's requests")
    p.add_argument("--chats-after", type=int, default=3, help="the chatter's answers from the new version, then stop")
    p.add_argument("--epochs", type=int, default=None, help="the training's epochs (default: the API's, 3)")
    p.add_argument("--learning-rate", type=float, default=None, help="the training's peak learning rate (default 2e-3)")
    p.add_argument("--out", type=Path, default=None)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="tailor-personalization-") as tmp:
        port = free_port()
        settings = {"TAILOR_MODEL": args.model, "TAILOR_DEVICE": args.device, "TAILOR_OPERATOR_TOKEN": OPERATOR_TOKEN,
                    "TAILOR_TRAINING_THREADS": str(args.threads), "TAILOR_RATE_LIMIT_PER_MINUTE": "0"}
        started = time.monotonic()
        process = start_server(settings, Path(tmp), port, inherit_tailor_env=False)
        try:
            base = f"http://127.0.0.1:{port}"
            wait_ready(base, process)
            ready_s = time.monotonic() - started
            outcome = run(args, base, process.pid)
        finally:
            stop_server(process)
    job, chatter = outcome["job"], outcome["chatter"]
    styled_before = sum(a["styled"] for a in outcome["before"])
    styled_after = sum(a["styled"] for a in outcome["after"])
    result = {
        "benchmark": "personalization_loop", "model": args.model, "device": args.device,
        "training_threads": args.threads, "cpus": os.cpu_count(), "machine": platform.processor() or platform.machine(),
        "date": time.strftime("%Y-%m-%d"), "server_ready_s": round(ready_s, 1),
        "styled_before": styled_before, "styled_after": styled_after, "unseen": len(UNSEEN),
        "goal_s": GOAL_S, "goal_met": bool(job["promoted"] and outcome["job_wall_s"] < GOAL_S),
        **outcome,
    }
    rows = [
        ("server ready", f"{ready_s:.1f} s"),
        ("12 corrections through chat + feedback", f"{outcome['corrections_s']:.1f} s"),
        ("training job, submitted -> " + job["status"], f"{outcome['job_wall_s']:.1f} s "
         f"({job['progress']['step']} steps, {job['example_count']} examples)"),
        ("CPUs busy during the job: server / client / others", str(outcome["cpus_during_job"])),
        ("promoted", f"{job['promoted']} (adapter {job['adapter_id']})"),
        ("evaluation loss", f"{job['eval_loss_before']:.3f} -> {job['eval_loss_after']:.3f}"
         if job["eval_loss_after"] is not None else "n/a"),
        ("unseen prompts in the style", f"{styled_before}/{len(UNSEEN)} before, {styled_after}/{len(UNSEEN)} after"),
        ("chatter during the swap", f"{chatter['requests']} streams, {chatter['failed']} failed, by adapter "
         f"{chatter['answers_by_adapter']}, one version each: {chatter['one_version_each']}, "
         f"old after new: {chatter['old_after_new']}"),
    ]
    width = max(len(k) for k, _ in rows)
    for key, value in rows:
        print(f"{key:<{width}}  {value}")
    for b, a in zip(outcome["before"], outcome["after"]):
        print(f"  {b['answer']!r} -> {a['answer']!r}")
    write_results(result, args.out or RESULTS / f"personalization_loop-{args.device.split(':')[0]}.json")
    ok = (job["promoted"] and chatter["failed"] == 0 and chatter["one_version_each"] and chatter["old_after_new"] == 0)
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
