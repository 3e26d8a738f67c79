"""The fields every benchmark report starts with: what ran, when, on what (one place for them)."""

from __future__ import annotations

import argparse
import datetime as dt
import platform
import subprocess
from pathlib import Path

import torch


def git_commit() -> str | None:
    """The checkout's short commit id (None outside a git checkout)."""
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              cwd=Path(__file__).parent, timeout=10).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def report_header(benchmark: str, args: argparse.Namespace) -> dict:
    """``benchmark``, the UTC date, the commit, the device and its name, torch's version and
    threads, and the command-line arguments (paths as strings)."""
    device = getattr(args, "device", "cpu")
    return {
        "benchmark": benchmark,
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "commit": git_commit(),
        "device": device,
        "device_name": torch.cuda.get_device_name() if device.startswith("cuda") else platform.processor() or "cpu",
        "torch_version": torch.__version__,
        "torch_num_threads": torch.get_num_threads(),
        "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
    }


def median_run(runs: list[dict], keep_all: tuple[str, ...] = ()) -> dict:
    """A copy of the run with the median ``wall_s`` (the lower one of an even count), with
    ``<field>_all_rounds``: every run's value of each field in ``keep_all``, in run order."""
    ordered = sorted(runs, key=lambda r: r["wall_s"])
    row = dict(ordered[(len(ordered) - 1) // 2])
    for field in keep_all:
        row[f"{field}_all_rounds"] = [r[field] for r in runs]
    return row
