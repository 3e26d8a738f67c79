"""The embedded default validates adapters itself (its in-process task queue), so its /metrics
shows the validation and queue families that the dashboards read, like the worker's does."""

from __future__ import annotations

from support.platform_flows import (
    OPERATOR_TOKEN,
    adapter_files,
    create_tenant,
    upload_adapter,
    wait_for_status,
    write_adapter,
)
from support.worker_flows import metric

FAMILIES = ("tailor_worker_validations_total", "tailor_worker_validation_duration_seconds_count",
            "tailor_worker_queue_lag_seconds_count", "tailor_worker_queue_length")


def test_an_upload_shows_on_the_embedded_metrics(client, tiny_model_config, tmp_path):
    page = client.get("/metrics").text
    assert all(name in page for name in FAMILIES), "validation families missing from the embedded /metrics"
    before = {name: metric(page, name) for name in FAMILIES[1:3]}
    ready_before = metric(page, "tailor_worker_validations_total", outcome="ready")
    error_before = metric(page, "tailor_worker_validations_total", outcome="error")

    _tenant, admin = create_tenant(client, OPERATOR_TOKEN, "metrics-co")
    good = write_adapter(tmp_path / "good", tiny_model_config, seed=5)
    r = upload_adapter(client, admin, "good", adapter_files(good))
    assert r.status_code == 202, r.text
    assert wait_for_status(client, admin, r.json()["id"])["status"] == "ready"

    page = client.get("/metrics").text
    assert metric(page, "tailor_worker_validations_total", outcome="ready") == ready_before + 1
    assert metric(page, "tailor_worker_validations_total", outcome="error") == error_before
    for name, value in before.items():
        assert metric(page, name) >= value + 1, name
    assert metric(page, "tailor_worker_queue_length") == 0
