"""The Celery app's configuration and the validation task's retry policy (eager mode, no broker)."""

from __future__ import annotations

import pytest

import tenants.adapter_validation
from tenants import celery_app
from tenants.settings import Settings
from tenants.storage import StoreUnavailableError
from tenants.worker_metrics import VALIDATIONS


@pytest.fixture
def app(monkeypatch):
    app = celery_app.make_celery(Settings(task_mode="celery", redis_url="redis://127.0.0.1:1/0"))
    app.conf.task_always_eager = True
    monkeypatch.setattr(celery_app, "_platform", object())  # the job below is a stub; no real platform
    yield app
    app.close()


def _count(outcome: str) -> float:
    return VALIDATIONS.labels(outcome=outcome)._value.get()


def test_configuration_is_json_only_acks_late_prefetch_one():
    app = celery_app.make_celery(Settings(task_mode="celery", redis_url="redis://127.0.0.1:1/0"))
    conf = app.conf
    assert conf.task_serializer == "json" and list(conf.accept_content) == ["json"]
    assert conf.task_acks_late and conf.task_reject_on_worker_lost
    assert conf.worker_prefetch_multiplier == 1
    assert conf.broker_url == conf.result_backend == "redis://127.0.0.1:1/0"
    task = app.tasks[celery_app.VALIDATE_TASK]
    assert task.acks_late and task.max_retries == celery_app.MAX_RETRIES
    assert task.retry_backoff and task.retry_jitter
    assert StoreUnavailableError in task.autoretry_for
    app.close()


def test_transient_errors_are_retried(app, monkeypatch):
    calls = []

    def flaky(_platform, adapter_id: str) -> str:
        calls.append(adapter_id)
        if len(calls) < 3:
            raise StoreUnavailableError("S3 is down")
        return "ready"

    monkeypatch.setattr(tenants.adapter_validation, "validate_adapter_job", flaky)
    errors, ready = _count("error"), _count("ready")
    result = app.tasks[celery_app.VALIDATE_TASK].apply(args=["a1"])
    assert result.get() == "ready"
    assert calls == ["a1"] * 3
    assert _count("error") == errors + 2 and _count("ready") == ready + 1


def test_gives_up_after_max_retries(app, monkeypatch):
    calls = []

    def down(_platform, adapter_id: str) -> str:
        calls.append(adapter_id)
        raise StoreUnavailableError("S3 is down")

    monkeypatch.setattr(tenants.adapter_validation, "validate_adapter_job", down)
    with pytest.raises(StoreUnavailableError):
        app.tasks[celery_app.VALIDATE_TASK].apply(args=["a1"]).get()
    assert len(calls) == celery_app.MAX_RETRIES + 1


def test_other_errors_are_not_retried(app, monkeypatch):
    calls = []

    def broken(_platform, adapter_id: str) -> str:
        calls.append(adapter_id)
        raise KeyError("a bug")

    monkeypatch.setattr(tenants.adapter_validation, "validate_adapter_job", broken)
    with pytest.raises(KeyError):
        app.tasks[celery_app.VALIDATE_TASK].apply(args=["a1"]).get()
    assert calls == ["a1"]
