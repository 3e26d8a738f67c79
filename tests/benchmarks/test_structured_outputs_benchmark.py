"""The structured-outputs benchmark runs end to end on the tiny model and reports both sides."""

from __future__ import annotations

import json

import pytest

from benchmarks import structured_outputs

pytest.importorskip("llguidance")


def test_structured_outputs_benchmark_smoke(tmp_path, tiny_checkpoint):
    out = tmp_path / "structured.json"
    assert structured_outputs.main(["--model", str(tiny_checkpoint), "--batch", "4", "--max-tokens", "24",
                                    "--rounds", "1", "--pool-mb", "16", "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    free, constrained = report["results"]
    assert (free["side"], constrained["side"]) == ("free", "constrained")
    assert constrained["constrained_requests"] == 2 and free["constrained_requests"] == 0
    assert free["output_tokens"] == constrained["output_tokens"] > 0  # the same work on both sides
    assert all(r["wall_s"] > 0 and r["tokens_per_s"] > 0 for r in report["results"])
    assert len(report["compile_s"]) == len(structured_outputs.SCHEMAS)
    assert report["slowdown"] == pytest.approx(constrained["wall_s"] / free["wall_s"] - 1)
    assert report["cpu_slowdown"] == pytest.approx(constrained["cpu_s"] / free["cpu_s"] - 1)
