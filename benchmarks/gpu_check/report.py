"""The report: environment, one entry per section, written as one JSON file and one markdown file
(rewritten after every section, so a run cut short still leaves what it measured)."""

from __future__ import annotations

import datetime as dt
import gc
import importlib.metadata
import json
import math
import platform
import subprocess
import time
import traceback
from collections.abc import Callable
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[2]
JSON_NAME = "gpu_check.json"
MD_NAME = "gpu_check.md"


def error_summary(exc: BaseException, frames: int = 6) -> dict:
    """The error line and the last ``frames`` frames of its traceback, as short strings."""
    tb = traceback.extract_tb(exc.__traceback__)[-frames:]
    return {
        "error": f"{type(exc).__name__}: {exc}"[:2000],
        "traceback": [f"{Path(f.filename).name}:{f.lineno} in {f.name}: {(f.line or '').strip()}"[:300] for f in tb],
    }


def _version(name: str) -> str:
    try:
        return importlib.metadata.version(name)
    except Exception:
        return "not installed"


def git_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True, timeout=10)
        return out.stdout.strip() if out.returncode == 0 and out.stdout.strip() else "unknown"
    except Exception:
        return "unknown"


def environment(device: torch.device) -> dict:
    env = {
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "git_commit": git_commit(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "triton": _version("triton"),
        "transformers": _version("transformers"),
        "peft": _version("peft"),
        "tokenizers": _version("tokenizers"),
        "device": str(device),
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        env.update(device_name=torch.cuda.get_device_name(device), capability=f"{props.major}.{props.minor}",
                   multiprocessors=props.multi_processor_count, memory_bytes=props.total_memory)
    else:
        env.update(device_name=platform.processor() or platform.machine() or "cpu", cpu_threads=torch.get_num_threads())
    return env


def free_device_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()


def run_section(name: str, title: str, fn: Callable[[], dict], device: torch.device) -> dict:
    """Run one section; an exception is recorded as status ``error`` and never propagates."""
    started = time.monotonic()
    entry: dict = {"name": name, "title": title}
    try:
        result = fn()
        entry.update(result)
        entry["status"] = "pass" if result.get("passed") else "fail"
    except Exception as exc:
        entry.update(status="error", passed=False, **error_summary(exc))
    finally:
        try:
            free_device_memory(device)
        except Exception as exc:  # a broken device must not stop the report
            entry.setdefault("cleanup_error", error_summary(exc)["error"])
    entry["seconds"] = round(time.monotonic() - started, 2)
    return entry


def _jsonable(value):
    if isinstance(value, float):
        return value if math.isfinite(value) else str(value)
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, (str, int, bool)) or value is None:
        return value
    return str(value)


def _cell(value) -> str:
    if isinstance(value, float):
        if not math.isfinite(value):
            return str(value)
        return f"{value:.4g}"
    return str(value).replace("|", "\\|").replace("\n", " ")


def markdown(report: dict) -> str:
    env = report["environment"]
    lines = [f"# GPU check ({report['mode']})", "",
             f"Overall: **{'PASS' if report['passed'] else 'FAIL'}**", "",
             "| | |", "| --- | --- |"]
    lines += [f"| {k} | {_cell(v)} |" for k, v in env.items()]
    for entry in report["sections"].values():
        lines += ["", f"## {entry['name']}: {entry['title']}: {entry['status'].upper()} ({entry.get('seconds', 0)} s)", ""]
        for key in ("error",):
            if key in entry:
                lines += [f"Error: `{_cell(entry[key])}`", ""]
        for frame in entry.get("traceback", []):
            lines.append(f"    {frame}")
        columns, rows = entry.get("columns"), entry.get("rows") or []
        if columns and rows:
            lines += ["| " + " | ".join(columns) + " |", "|" + " --- |" * len(columns)]
            for row in rows:
                lines.append("| " + " | ".join(_cell(row.get(c, "")) for c in columns) + " |")
            for row in rows:
                if "error" in row:
                    lines += ["", f"{row.get('case', '')} {row.get('dtype', '')}: `{_cell(row['error'])}`"]
                    lines += [f"    {frame}" for frame in row.get("traceback", [])]
        for note in entry.get("notes", []):
            lines += ["", f"Note: {note}"]
    return "\n".join(lines) + "\n"


def write(report: dict, out_dir: Path) -> tuple[Path, Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    data = _jsonable(report)
    json_path, md_path = out_dir / JSON_NAME, out_dir / MD_NAME
    json_path.write_text(json.dumps(data, indent=2) + "\n")
    md_path.write_text(markdown(data))
    return json_path, md_path
