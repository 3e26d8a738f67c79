"""``python -m benchmarks.gpu_check`` (make gpu-check): refuses to run without CUDA, its CPU smoke
mode runs every section end to end, and its comparisons and section runner report failures."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from benchmarks.gpu_check import report
from benchmarks.gpu_check.cli import SECTIONS
from benchmarks.gpu_check.compare import compare, eps, tolerance

REPO = Path(__file__).resolve().parents[2]


def _run(args: list[str], env_update: dict, timeout: float) -> subprocess.CompletedProcess:
    env = {**os.environ, **env_update}
    return subprocess.run([sys.executable, "-m", "benchmarks.gpu_check", *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=timeout)


def test_without_cuda_it_says_so_and_exits_2(tmp_path):
    proc = _run(["--out", str(tmp_path)], {"CUDA_VISIBLE_DEVICES": ""}, timeout=120)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    said = [line for line in (proc.stdout + proc.stderr).splitlines() if line.startswith("gpu-check:")]
    assert len(said) == 1 and "CUDA is not available" in said[0], proc.stdout + proc.stderr
    assert list(tmp_path.iterdir()) == []  # no report pretends anything was measured


def test_cpu_smoke_runs_every_section_and_reports_pass(tmp_path):
    proc = _run(["--cpu-smoke", "--out", str(tmp_path)], {"CUDA_VISIBLE_DEVICES": ""}, timeout=600)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    data = json.loads((tmp_path / report.JSON_NAME).read_text())
    assert data["mode"] == "smoke" and data["passed"] is True
    for key in ("date", "git_commit", "torch", "triton", "transformers", "peft", "device_name"):
        assert data["environment"][key], key
    assert list(data["sections"]) == [name for name, _, _ in SECTIONS]
    for name, section in data["sections"].items():
        assert section["status"] == "pass", (name, section.get("error"))
        assert section["rows"] and section["columns"] and section["seconds"] >= 0
    kernels = data["sections"]["kernels"]["rows"]
    ran = {(r["case"], r["dtype"]) for r in kernels if r["status"] == "pass"}
    for dtype in ("float16", "float32"):
        for case in ("lora_shrink decode", "lora_shrink prefill", "lora_expand decode", "lora_expand prefill",
                     "write_kv", "paged_attention mixed"):
            assert (case, dtype) in ran
    for row in kernels:
        if row["status"] == "pass":
            assert 0 <= row["max_abs_err"] <= row["max_tol"] and row["worst_ratio"] <= 1
    assert {r["case"] for r in data["sections"]["bandwidth"]["rows"]} == {
        "device copy", "lora_shrink decode", "lora_expand decode", "paged_attention decode"}
    assert all(r["GB_per_s"] > 0 for r in data["sections"]["bandwidth"]["rows"])
    hf = data["sections"]["hf_parity"]["rows"][0]
    assert hf["dtype"] == "float32" and hf["identical"] == hf["prompts"] > 0
    peft = data["sections"]["peft_parity"]
    assert len(peft["rows"]) >= 3 and peft["adapters_changing_outputs"] > 0
    assert [r["batch"] for r in data["sections"]["decode_floor"]["rows"]] == [1, 2]
    assert all(r["step_ms"] > 0 and r["floor_ms"] > 0 for r in data["sections"]["decode_floor"]["rows"])
    throughput = data["sections"]["adapter_throughput"]["rows"]
    assert [r["adapters"] for r in throughput] == [1, 2, 3] and throughput[0]["ratio_vs_1"] == 1.0
    slora = data["sections"]["slora_eval"]["rows"]
    assert [(r["system"], r["adapters"]) for r in slora] == [("tailor", 1), ("peft", 1), ("tailor", 2), ("peft", 2)]
    assert all(r["failed"] == 0 and r["requests"] > 0 and r["requests_per_s"] > 0 for r in slora)
    md = (tmp_path / report.MD_NAME).read_text()
    assert "Overall: **PASS**" in md
    for name, _, _ in SECTIONS:
        assert f"## {name}:" in md


def test_compare_fails_beyond_tolerance_and_passes_within():
    ref = torch.randn(64, 32, dtype=torch.float64)
    mag = ref.abs() * 3
    tol = tolerance(ref, mag, k=32, eps_out=eps(torch.bfloat16), eps_acc=eps(torch.float32))
    close = ref + 0.5 * tol * torch.sign(torch.randn_like(ref))
    assert compare(close.to(torch.float32), ref, tol)["passed"]
    off = close.clone()
    i, j = 17, 5
    off[i, j] = ref[i, j] + 1.5 * tol[i, j]
    result = compare(off, ref, tol)
    assert not result["passed"]
    assert result["worst_ratio"] == pytest.approx(1.5)
    assert result["tol_at_worst"] == pytest.approx(float(tol[i, j]))  # the failing element is named
    # the largest error may sit elsewhere (0.5 of a larger bound), never below the planted one
    assert result["max_abs_err"] >= float(1.5 * tol[i, j]) * (1 - 1e-9)


def test_compare_rejects_nan_and_any_error_where_none_is_allowed():
    ref = torch.randn(8, 8, dtype=torch.float64)
    tol = torch.full_like(ref, 1e-3)
    nan = ref.clone()
    nan[3, 3] = float("nan")
    result = compare(nan, ref, tol)
    assert not result["passed"] and result["nonfinite"] == 1
    tol[0] = 0.0  # e.g. a row without an adapter: it must come back unchanged
    assert compare(ref.clone(), ref, tol)["passed"]
    touched = ref.clone()
    touched[0, 2] += 1e-12
    assert not compare(touched, ref, tol)["passed"]


def test_tolerance_grows_with_eps_and_reduction_length():
    ref = torch.ones(4, dtype=torch.float64)
    mag = torch.ones(4, dtype=torch.float64)
    t16 = tolerance(ref, mag, k=16, eps_out=eps(torch.float16), eps_acc=eps(torch.float16))
    t16_long = tolerance(ref, mag, k=64, eps_out=eps(torch.float16), eps_acc=eps(torch.float16))
    tbf = tolerance(ref, mag, k=16, eps_out=eps(torch.bfloat16), eps_acc=eps(torch.bfloat16))
    assert torch.all(t16_long > t16) and torch.all(tbf > t16)
    assert float(t16[0]) == pytest.approx(4 * eps(torch.float16) * (1 + math.sqrt(16)))


def test_a_section_that_raises_is_an_error_and_the_report_says_why(tmp_path):
    def broken():
        raise RuntimeError("kernel exploded")

    entry = report.run_section("kernels", "title", broken, torch.device("cpu"))
    assert entry["status"] == "error" and "kernel exploded" in entry["error"]
    assert any("broken" in frame for frame in entry["traceback"])
    ok = report.run_section("bandwidth", "title", lambda: {"passed": True, "rows": []}, torch.device("cpu"))
    assert ok["status"] == "pass"
    failed = report.run_section("decode_floor", "title", lambda: {"passed": False, "rows": []}, torch.device("cpu"))
    assert failed["status"] == "fail"
    doc = {"mode": "smoke", "environment": {"device": "cpu"}, "passed": False,
           "sections": {"kernels": entry, "bandwidth": ok, "decode_floor": failed}}
    json_path, md_path = report.write(doc, tmp_path)
    assert json.loads(json_path.read_text())["sections"]["kernels"]["error"] == "RuntimeError: kernel exploded"
    md = md_path.read_text()
    assert "Overall: **FAIL**" in md and "## kernels: title: ERROR" in md and "kernel exploded" in md
    assert "## decode_floor: title: FAIL" in md


def test_tp_section_accepts_a_first_divergence_at_a_near_tie_only():
    from benchmarks.gpu_check.tp_section import NEAR_TIE, _divergences

    ref = [[1, 2, 3], [1, 2, 3], [1, 2, 3], [1, 2, 3]]
    ours = [[1, 2, 3], [1, 5, 6], [9, 2, 3], [1, 2, 3, 4]]
    gaps = [[1.0] * 3, [1.0, NEAR_TIE / 2, 0.0], [0.5, 1.0, 1.0], [1.0] * 3]
    # request 1 first differs at a near-tie (what follows may differ freely), request 2 at a clear
    # gap, request 3 past TP=1's tokens (no gap: a mismatch)
    assert _divergences(ref, ours, gaps) == (2, 1, float("inf"))
