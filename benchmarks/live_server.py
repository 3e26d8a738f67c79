"""A ``tailor serve`` process for the HTTP benchmarks: start it on loopback, wait until it is ready,
stop it, read its /metrics, and what CPU it and the rest of the machine used; and writing a
benchmark's JSON result."""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx

REPO = Path(__file__).resolve().parents[1]
_SAMPLE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})?\s+(\S+)")
_LABEL = re.compile(r'(\w+)="((?:[^"\\]|\\.)*)"')


def free_port() -> int:
    """A loopback port nobody listens on now."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def start_server(settings: dict[str, str], data_dir: Path, port: int, *,
                 inherit_tailor_env: bool = True) -> subprocess.Popen:
    """``tailor serve`` (the embedded default) with ``settings`` (``TAILOR_*`` variables) on
    ``port``, its data and ``server.log`` in ``data_dir``. ``inherit_tailor_env=False`` keeps the
    caller's own ``TAILOR_*`` variables out, so that only ``settings`` configure it."""
    inherited = {k: v for k, v in os.environ.items() if inherit_tailor_env or not k.startswith("TAILOR_")}
    env = {**inherited, **settings, "TAILOR_DATA_DIR": str(data_dir), "TAILOR_PORT": str(port)}
    log = open(data_dir / "server.log", "wb")
    return subprocess.Popen([sys.executable, "-m", "api.cli", "serve"], env=env, stdout=log, stderr=subprocess.STDOUT,
                            cwd=REPO)


def wait_ready(base: str, process: subprocess.Popen, timeout_s: float = 300.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"the server exited with {process.returncode}")
        try:
            if httpx.get(f"{base}/readyz", timeout=2.0).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise TimeoutError("the server did not become ready")


def stop_server(process: subprocess.Popen, timeout_s: float = 60.0) -> None:
    """SIGTERM, then SIGKILL if it has not exited within ``timeout_s``."""
    process.terminate()
    try:
        process.wait(timeout_s)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


async def scrape(client: httpx.AsyncClient) -> list[tuple[str, dict[str, str], float]]:
    """The samples of ``GET /metrics``: (name, labels, value)."""
    text = (await client.get("/metrics", timeout=30.0)).text
    samples = []
    for line in text.splitlines():
        m = _SAMPLE.match(line)
        if m and not line.startswith("#"):
            samples.append((m.group(1), dict(_LABEL.findall(m.group(2) or "")), float(m.group(3))))
    return samples


def metric(samples, name: str, **labels: str) -> float:
    """The sum of ``name``'s samples whose labels include ``labels``."""
    return sum(v for n, lab, v in samples if n == name and all(lab.get(k) == x for k, x in labels.items()))


def cpu_snapshot(server_pid: int) -> tuple[float, float, float] | None:
    """(CPU seconds all processes were busy, this process's, the server's), Linux only."""
    try:
        with open("/proc/stat") as f:
            values = [int(v) for v in f.readline().split()[1:9]]
        with open(f"/proc/{server_pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        hz = os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError):
        return None
    own = os.times()
    return ((sum(values) - values[3] - values[4]) / hz, own.user + own.system,
            (int(fields[11]) + int(fields[12])) / hz)


def cpu_use(before, after, wall: float) -> dict[str, float] | None:
    """Average CPUs kept busy over ``wall`` seconds by the server, this process and the rest."""
    if before is None or after is None or wall <= 0:
        return None
    total, own, server = ((a - b) / wall for a, b in zip(after, before))
    return {"server": round(server, 3), "client": round(own, 3), "others": round(max(0.0, total - own - server), 3)}


def write_results(result: dict[str, Any], out: Path) -> Path:
    """Write a benchmark's result as indented JSON (folders made as needed) and say where."""
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")
    return out
