"""The personalization loop's demonstration (benchmarks/personalization_loop.py) on the tiny model:
a ``tailor serve`` process, corrections through feedback, a training job through HTTP, and a client
streaming chats as the user while the new version is swapped in: every stream succeeds, each comes
from one version, none from the old version after the first from the new one, and both versions
answered. (The style itself is measured on the bundled model: docs/benchmarks.md.)"""

from __future__ import annotations

import json


def test_personalization_loop_smoke(tmp_path, tiny_checkpoint):
    from benchmarks import personalization_loop

    out = tmp_path / "personalization.json"
    code = personalization_loop.main(["--model", str(tiny_checkpoint), "--max-tokens", "4", "--chatter-max-tokens",
                                      "8", "--chatter-pause-s", "0.2", "--chats-after", "2", "--epochs", "4",
                                      "--learning-rate", "0.01", "--out", str(out)])
    result = json.loads(out.read_text())
    job, chatter = result["job"], result["chatter"]
    assert (job["status"], job["promoted"]) == ("succeeded", True), job
    assert code == 0, result
    assert job["eval_loss_after"] < job["eval_loss_before"] and job["example_count"] == 12
    assert result["adapter"]["provenance"]["training_job_id"] == job["id"]
    assert chatter["failed"] == 0 and chatter["one_version_each"] and chatter["old_after_new"] == 0, chatter
    assert set(chatter["answers_by_adapter"]) == {"None", job["adapter_id"]}, chatter
    assert [a["adapter_id"] for a in result["after"]] == [job["adapter_id"]] * len(result["after"])
    assert len(result["before"]) == len(result["after"]) == 8
