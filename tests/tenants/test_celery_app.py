"""The Celery app's configuration and the validation task's retry policy and counters (eager mode,
no broker; the worker end to end is in test_worker.py and test_worker_faults.py)."""

from __future__ import annotations

import types

import pytest

import tenants.adapter_validation
from tenants import celery_app
from tenants.settings import Settings
from tenants.storage import StoreUnavailableError
from tenants.worker_metrics import VALIDATIONS

BROKER = "redis://127.0.0.1:1/0"


class FakeClock:
    """``time`` for the task module: wall time moves only when ``advance`` is called."""

    def __init__(self) -> None:
        self.now = 1_000_000.0

    def time(self) -> float:
        return self.now

    def perf_counter(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@pytest.fixture
def clock(monkeypatch) -> FakeClock:
    fake = FakeClock()
    monkeypatch.setattr(celery_app, "time", types.SimpleNamespace(time=fake.time, perf_counter=fake.perf_counter))
    return fake


@pytest.fixture
def given_up(monkeypatch) -> list[tuple[str, str]]:
    calls: list[tuple[str, str]] = []
    monkeypatch.setattr(tenants.adapter_validation, "give_up",
                        lambda _platform, adapter_id, reason: calls.append((adapter_id, reason)) or "failed")
    return calls


@pytest.fixture
def app(monkeypatch):
    app = celery_app.make_celery(Settings(task_mode="celery", redis_url=BROKER))
    app.conf.task_always_eager = True  # retries run at once, whatever their countdown
    monkeypatch.setattr(celery_app, "_platform", object())  # the job below is a stub; no real platform
    yield app
    app.close()


def _count(outcome: str) -> float:
    return VALIDATIONS.labels(outcome=outcome)._value.get()


def _counts() -> dict[str, float]:
    return {outcome: _count(outcome) for outcome in ("ready", "failed", "skipped", "retry", "error")}


def _delta(before: dict[str, float]) -> dict[str, float]:
    return {k: v - before[k] for k, v in _counts().items() if v != before[k]}


def test_configuration_is_json_only_acks_late_prefetch_one_short_visibility():
    settings = Settings(task_mode="celery", redis_url=BROKER, worker_visibility_timeout_s=20)
    app = celery_app.make_celery(settings)
    conf = app.conf
    assert conf.task_serializer == "json" and list(conf.accept_content) == ["json"]
    assert conf.task_acks_late and conf.task_reject_on_worker_lost
    assert conf.worker_prefetch_multiplier == 1
    assert conf.broker_url == conf.result_backend == BROKER
    options = conf.broker_transport_options
    assert options["visibility_timeout"] == 20
    assert options["unacked_restore_throttle"] == 1 and options["unacked_restore_interval"] <= 5
    assert not conf.beat_schedule  # the clean-up is sent by the workers' CleanupScheduler
    task = app.tasks[celery_app.VALIDATE_TASK]
    assert task.acks_late and task.max_retries is None  # bounded by the time budget instead
    assert celery_app.CLEANUP_TASK in app.tasks
    app.close()


def test_transient_errors_are_retried_and_counted_as_retry(app, monkeypatch, given_up):
    calls = []

    def flaky(_platform, adapter_id: str) -> str:
        calls.append(adapter_id)
        if len(calls) < 3:
            raise StoreUnavailableError("S3 is down")
        return "ready"

    monkeypatch.setattr(tenants.adapter_validation, "validate_adapter_job", flaky)
    before = _counts()
    assert app.tasks[celery_app.VALIDATE_TASK].apply(args=["a1"]).get() == "ready"
    assert calls == ["a1"] * 3
    assert _delta(before) == {"retry": 2, "ready": 1}  # no "error": nothing was lost
    assert given_up == []


def test_an_outage_is_retried_for_the_whole_budget_then_the_adapter_fails(app, monkeypatch, clock, given_up):
    """Six attempts in half a minute used to fail a valid adapter; now only the time budget
    (1200 s by default) ends the retries, counted from the first attempt of the chain."""
    attempts = []

    def down(_platform, adapter_id: str) -> str:
        attempts.append(clock.now)
        clock.advance(100)  # each attempt (and its backoff) takes 100 s of wall time
        raise StoreUnavailableError("S3 is down")

    monkeypatch.setattr(tenants.adapter_validation, "validate_adapter_job", down)
    before = _counts()
    with pytest.raises(StoreUnavailableError):
        app.tasks[celery_app.VALIDATE_TASK].apply(args=["a1"]).get()
    assert len(attempts) == 12  # 0, 100, ..., 1100 s: the 12th ends at 1200 s, the budget
    assert attempts[-1] - attempts[0] == 1100
    assert _delta(before) == {"retry": 11, "error": 1}
    assert len(given_up) == 1 and given_up[0][0] == "a1"
    assert "1200 s" in given_up[0][1] and "S3 is down" in given_up[0][1]


def test_other_errors_are_not_retried_and_count_as_error(app, monkeypatch, given_up):
    calls = []

    def broken(_platform, adapter_id: str) -> str:
        calls.append(adapter_id)
        raise KeyError("a bug")

    monkeypatch.setattr(tenants.adapter_validation, "validate_adapter_job", broken)
    before = _counts()
    with pytest.raises(KeyError):
        app.tasks[celery_app.VALIDATE_TASK].apply(args=["a1"]).get()
    assert calls == ["a1"]
    assert _delta(before) == {"error": 1}
    assert [adapter_id for adapter_id, _ in given_up] == ["a1"]


def test_errors_before_the_job_runs_are_counted(app, monkeypatch, given_up):
    """get_platform (database engine, store client) and the queue-lag header are read before the
    job: their errors are attempts too."""
    platforms = []

    def no_platform(_settings):
        platforms.append(1)
        if len(platforms) == 1:
            raise StoreUnavailableError("cannot reach the store at start")
        return object()

    monkeypatch.setattr(celery_app, "get_platform", no_platform)
    monkeypatch.setattr(tenants.adapter_validation, "validate_adapter_job", lambda _p, _id: "skipped")
    before = _counts()
    assert app.tasks[celery_app.VALIDATE_TASK].apply(args=["a1"]).get() == "skipped"
    assert _delta(before) == {"retry": 1, "skipped": 1}

    monkeypatch.setattr(celery_app, "get_platform", lambda _settings: (_ for _ in ()).throw(ValueError("bad")))
    before = _counts()
    with pytest.raises(ValueError):
        app.tasks[celery_app.VALIDATE_TASK].apply(args=["a2"]).get()
    assert _delta(before) == {"error": 1}


def test_settings_refuse_a_retry_budget_beyond_the_pending_timeout():
    with pytest.raises(ValueError, match="TAILOR_VALIDATION_RETRY_BUDGET_S"):
        Settings(validation_retry_budget_s=4000, pending_timeout_s=3600)
    with pytest.raises(ValueError, match="TAILOR_VALIDATION_RETRY_INITIAL_S"):
        Settings(validation_retry_initial_s=10, validation_retry_max_s=5)
