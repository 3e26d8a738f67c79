"""The fields every benchmark report starts with: what ran, when, on what (one place for them)."""

from __future__ import annotations

import argparse
import datetime as dt
import platform
from pathlib import Path

import torch


def report_header(benchmark: str, args: argparse.Namespace) -> dict:
    """``benchmark``, the UTC date, the device and its name, torch's version and threads, and the
    command-line arguments (paths as strings)."""
    device = getattr(args, "device", "cpu")
    return {
        "benchmark": benchmark,
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "device": device,
        "device_name": torch.cuda.get_device_name() if device.startswith("cuda") else platform.processor() or "cpu",
        "torch_version": torch.__version__,
        "torch_num_threads": torch.get_num_threads(),
        "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
    }
