"""Idle OpenMP teams are given back: by the helper, by decorated helper-thread work, by the thread
that builds or feeds the engine, and by the engine thread when it goes idle.

Each scenario runs in a fresh interpreter so that the count of native threads
(``/proc/self/task``) starts from a known state; a team of ``n`` OpenMP threads adds ``n - 1``
native worker threads to the process while it lives.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from inference.openmp_workers import openmp_runtime_path

ROOT = Path(__file__).resolve().parents[2]

pytestmark = [
    pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="needs Linux /proc to count threads"),
    pytest.mark.skipif(openmp_runtime_path() is None, reason="needs torch built with GNU OpenMP (libgomp)"),
    pytest.mark.skipif(torch.get_num_threads() < 2, reason="needs at least 2 CPU threads for an OpenMP team"),
]

PRELUDE = """
import json, os, sys, threading, time
import torch
from inference.openmp_workers import release_openmp_workers, releases_openmp_workers

def native_threads():
    return len(os.listdir("/proc/self/task"))

def parallel_op():
    # 8M elements: far above ATen's grain size, so the op runs as an OpenMP parallel region
    torch.ones(8_000_000).mul_(2.0)

def settle(expected, seconds=10.0):
    deadline = time.monotonic() + seconds
    while native_threads() != expected and time.monotonic() < deadline:
        time.sleep(0.02)
    return native_threads()

workers = torch.get_num_threads() - 1
"""


def _run(body: str, *args: str) -> dict:
    code = PRELUDE + textwrap.dedent(body)
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    done = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, env=env,
                          timeout=300, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-4000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_release_ends_the_calling_threads_team_only():
    out = _run("""
        release_openmp_workers()
        base = native_threads()
        parallel_op()
        with_team = native_threads()
        released = release_openmp_workers()
        after = native_threads()

        # a helper thread's team: the main thread's release must not touch it
        ready, finish = threading.Event(), threading.Event()
        def helper():
            parallel_op(); ready.set(); finish.wait()
        t = threading.Thread(target=helper); t.start(); ready.wait()
        helper_alive = native_threads()
        release_openmp_workers()
        after_main_release = native_threads()
        finish.set(); t.join()
        print(json.dumps(dict(workers=workers, base=base, with_team=with_team, released=released, after=after,
                              helper_alive=helper_alive, after_main_release=after_main_release)))
    """)
    w = out["workers"]
    assert out["with_team"] == out["base"] + w
    assert out["released"] is True
    assert out["after"] == out["base"]
    # the helper thread itself plus its team's workers, untouched by the main thread's release
    assert out["helper_alive"] == out["base"] + 1 + w
    assert out["after_main_release"] == out["helper_alive"]


def test_decorated_helper_thread_work_leaves_no_team():
    out = _run("""
        release_openmp_workers()
        base = native_threads()
        seen = {}

        @releases_openmp_workers
        def work():
            parallel_op()
            seen["during"] = native_threads()
            raise ValueError("bad adapter")  # released on the error path too

        done = threading.Event(), threading.Event()
        def helper():
            try:
                work()
            except ValueError:
                pass
            seen["after"] = native_threads()
            done[0].set(); done[1].wait()
        t = threading.Thread(target=helper); t.start(); done[0].wait()
        out = dict(workers=workers, base=base, **seen)
        done[1].set(); t.join()
        print(json.dumps(out))
    """)
    assert out["during"] == out["base"] + 1 + out["workers"]
    assert out["after"] == out["base"] + 1  # the helper thread alone


def test_engine_loop_gives_teams_back(tiny_checkpoint):
    out = _run("""
        from inference import LLM, SamplingParams
        release_openmp_workers()
        before = native_threads()
        parallel_op()  # the building thread holds a team (loading a large model runs parallel ops)
        llm = LLM(sys.argv[1], page_tokens=4, cpu_pool_bytes=16 << 20, max_model_len=256)
        built = settle(before + 1)  # the engine thread only: the builder's team was released
        parallel_op()  # the main thread holds a team again ...
        first = llm.generate([[1, 2, 3]], SamplingParams(max_tokens=2, temperature=0.0))
        idle = settle(before + 1)  # ... released on submit; the engine thread's one when it went idle
        parallel_op()
        main_team = native_threads()
        outs = llm.generate([[5, 6, 7, 8], [9, 10]], SamplingParams(max_tokens=6, temperature=0.0))
        after = settle(before + 1)
        llm.close()
        print(json.dumps(dict(workers=workers, before=before, built=built, idle=idle, main_team=main_team,
                              after=after, tokens=[len(o.token_ids) for o in first + outs])))
    """, str(tiny_checkpoint))
    engine_thread_only = out["before"] + 1
    assert out["tokens"] == [2, 6, 6]
    assert out["built"] == engine_thread_only
    assert out["idle"] == engine_thread_only
    assert out["main_team"] == engine_thread_only + out["workers"]  # a fresh team: none was held
    assert out["after"] == engine_thread_only
