"""The training job: a user's examples in, a new version of their adapter out (a Celery task in
``tailor worker``, a thread of its own in the embedded default).

``run_training_job(platform, job_id)``:

1. claims the queued job (queued -> running under this process's name; a job that is not queued,
   or whose cancellation was asked for, is skipped), and starts a ``JobMonitor`` thread that renews
   the job's heartbeat and reads its cancel flag every ``TAILOR_TRAINING_HEARTBEAT_S``;
2. reads the user's examples, the tenant's system prompt and, for ``start_from=current``, the
   user's current adapter (downloaded from the store), and prepares the rows
   (``tenants.training.examples``: the data rules, the split keyed by example ids);
3. trains (``tenants.training.lora_trainer``, ``TAILOR_TRAINING_THREADS`` torch threads), writing
   the step, the loss and the heartbeat to the row as it goes; the cancel flag stops it before the
   next step;
4. promotes only an improvement: when the evaluation loss after training is below the starting
   point's, the adapter goes through the upload's own path (``stage_upload``'s checks against the
   base model, ``adapter_intake``: a pending version under the user's adapter name with the job's
   provenance, its files in the object store; ``validate_adapter_job``: the engine's full
   validation, ready, the user's current adapter, inference told to prefetch it). Otherwise the
   job succeeds with ``promoted`` false, stores nothing and says why in ``result``.

A cancelled or failed job leaves no adapter: the trainer writes nothing until it succeeded, the
job's scratch folder is removed, and an adapter row begun before a failure is given up (marked
failed, its files deleted). A job whose process died mid-run is failed by the clean-up once its
heartbeat is older than ``TAILOR_TRAINING_STALE_AFTER_S`` (``job_state.reap_stale``).
"""

from __future__ import annotations

import enum
import logging
import os
import shutil
import socket
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from inference.adapters.storage_keys import CONFIG_FILE, WEIGHTS_FILE, adapter_file_keys
from tenants import repositories as repo
from tenants.adapter_intake import insert_pending, store_files
from tenants.adapter_uploads import UploadError, UploadLimits, stage_upload
from tenants.adapter_validation import ValidationOutcome, give_up, validate_adapter_job
from tenants.db import session_scope
from tenants.models import Adapter, AdapterStatus, TrainingJob, TrainingStatus
from tenants.platform import Platform
from tenants.training import job_state, metrics
from tenants.training.examples import load_renderer, prepare_training_data
from tenants.training.lora_trainer import LoraTrainingConfig, TrainingCancelled, TrainingDiverged, train_lora
from tenants.training.repository import list_examples

log = logging.getLogger(__name__)

PROGRESS_INTERVAL_S = 0.25  # the step is written at most this often (and always at the last step)


class JobOutcome(enum.StrEnum):
    """What one call of ``run_training_job`` did."""

    PROMOTED = "promoted"  # succeeded: the new version is the user's adapter
    NOT_IMPROVED = "not_improved"  # succeeded: the evaluation loss did not fall, nothing stored
    FAILED = "failed"
    CANCELLED = "cancelled"
    SKIPPED = "skipped"  # not queued (unknown, cancelled before it started, or taken by another process)
    LOST = "lost"  # the job was taken from this process (reaped after a stall) while it ran


class JobFailed(Exception):
    """The job cannot succeed; ``str()`` is the error the job shows."""


def worker_name() -> str:
    """This process and thread, as the job's ``worker`` column shows it."""
    return f"{socket.gethostname()}:{os.getpid()}:{threading.get_ident()}"


def personal_adapter_name(user_id: str, current_name: str | None) -> str:
    """The name a trained version is stored under: the user's own adapter's name when their current
    adapter is personal (a new version of it), else ``user-<user id>``."""
    return current_name or f"user-{user_id}"


class JobMonitor:
    """A daemon thread that renews the job's heartbeat and reads its cancel flag; the trainer asks
    ``should_cancel`` before each step. ``stop`` (the process is shutting down) cancels too."""

    def __init__(self, platform: Platform, job_id: str, worker: str, interval_s: float,
                 stop: threading.Event | None = None):
        self.platform, self.job_id, self.worker = platform, job_id, worker
        self.interval_s = interval_s
        self.shutdown = stop or threading.Event()
        self.cancel_requested = False
        self.lost = False
        self._done = threading.Event()
        self._last_progress = 0.0
        self._thread = threading.Thread(target=self._loop, name=f"tailor-training-{job_id[:8]}", daemon=True)

    def start(self) -> JobMonitor:
        self._thread.start()
        return self

    def beat(self) -> None:
        """One heartbeat (a database error is logged and retried at the next one)."""
        try:
            beat = job_state.heartbeat(self.platform, self.job_id, self.worker)
        except Exception as exc:  # noqa: BLE001 - the database away for a moment; the reaper waits longer
            log.warning("heartbeat of training job %s failed: %s", self.job_id, exc)
            return
        self.lost = self.lost or not beat.owned
        self.cancel_requested = self.cancel_requested or beat.cancel_requested

    def _loop(self) -> None:
        while not self._done.wait(self.interval_s):
            self.beat()

    def should_cancel(self) -> bool:
        return self.cancel_requested or self.lost or self.shutdown.is_set()

    def progress(self, step: int, total_steps: int, train_loss: float) -> None:
        """The trainer's progress callback: the step and loss on the row, at most every
        ``PROGRESS_INTERVAL_S`` (the last step always)."""
        now = time.monotonic()
        if step < total_steps and now - self._last_progress < PROGRESS_INTERVAL_S:
            return
        self._last_progress = now
        if not job_state.update_running(self.platform, self.job_id, self.worker, step=step, total_steps=total_steps,
                                        train_loss=train_loss):
            self.lost = True

    def stop(self) -> None:
        self._done.set()
        self._thread.join(timeout=self.interval_s + 10)


@dataclass
class JobInputs:
    """What the training reads from the database, read once at the start."""

    examples: list[list[dict[str, str]]]
    example_ids: list[str]
    system_prompt: str | None
    start_adapter: Adapter | None  # detached: the adapter to continue from
    adapter_name: str


def _load_inputs(platform: Platform, job: TrainingJob) -> JobInputs:
    with session_scope(platform.session_factory) as session:
        tenant = repo.get_tenant(session, job.tenant_id)
        user = repo.get_user(session, job.tenant_id, job.user_id)
        if tenant is None or user is None:
            raise JobFailed("the user no longer exists")
        rows = list_examples(session, job.tenant_id, job.user_id, limit=platform.settings.max_examples_per_user)
        current = repo.get_adapter(session, job.tenant_id, user.current_adapter_id) if user.current_adapter_id else None
        if current is not None:
            session.expunge(current)
        start = None
        if job.parameters.get("start_from") == "current":
            start_id = job.parameters.get("start_adapter_id")
            start = repo.get_adapter(session, job.tenant_id, start_id) if start_id else None
            if start is None or start.status != AdapterStatus.READY:
                raise JobFailed(f"the adapter to continue from ({start_id}) is no longer ready")
            session.expunge(start)
        own = current.name if current is not None and current.owner_user_id == user.id else None
        return JobInputs([r.messages for r in rows], [r.id for r in rows],
                         tenant.system_prompt, start, personal_adapter_name(user.id, own))


def _download(platform: Platform, adapter: Adapter, into: Path) -> Path:
    """The adapter's two files from the object store into ``into``."""
    into.mkdir(parents=True)
    keys = adapter_file_keys(adapter.storage_key)
    (into / CONFIG_FILE).write_bytes(platform.store.get(keys.config))
    (into / WEIGHTS_FILE).write_bytes(platform.store.get(keys.weights))
    return into


def training_config(parameters: dict, threads: int) -> LoraTrainingConfig:
    """The trainer's settings from a job's stored ``parameters`` (absent ones: the defaults; rank
    and modules only for a fresh adapter: a continued one keeps its own)."""
    names = ("epochs", "learning_rate", "batch_size", "seed")
    if parameters.get("start_from") != "current":
        names += ("rank",)
    chosen = {k: parameters[k] for k in names if parameters.get(k) is not None}
    if parameters.get("start_from") != "current" and parameters.get("target_modules") is not None:
        chosen["target_modules"] = tuple(parameters["target_modules"])
    return LoraTrainingConfig(**chosen, max_threads=threads)


def _promote(platform: Platform, job: TrainingJob, monitor: JobMonitor, inputs: JobInputs, result,
             workdir: Path) -> str:
    """Store the trained adapter through the upload's path and validate it (ready: the user's
    adapter, prefetched). Returns the adapter id; raises JobFailed."""
    settings = platform.settings
    output = Path(result.output_dir)
    staging = workdir / "staged"
    staging.mkdir()
    limits = UploadLimits(settings.max_upload_bytes, settings.max_archive_members, settings.max_lora_rank)
    try:
        staged = stage_upload([(CONFIG_FILE, output / CONFIG_FILE), (WEIGHTS_FILE, output / WEIGHTS_FILE)], staging,
                              platform.model_config, limits)
    except UploadError as exc:
        raise JobFailed("the trained adapter was refused: " + "; ".join(exc.problems)) from exc
    if monitor.should_cancel():
        raise TrainingCancelled(result.steps, result.steps)
    provenance = {"training_job_id": job.id, "example_count": result.train_examples + result.eval_examples,
                  "train_examples": result.train_examples, "eval_examples": result.eval_examples,
                  "train_loss": result.train_loss, "eval_loss_before": result.eval_loss_before,
                  "eval_loss_after": result.eval_loss_after, "started_from": result.started_from,
                  "epochs": result.epochs, "steps": result.steps}
    adapter, _created = insert_pending(platform, job.tenant_id, inputs.adapter_name, job.user_id, staged,
                                       provenance=provenance)
    if not job_state.update_running(platform, job.id, monitor.worker, adapter_id=adapter.id):
        give_up(platform, adapter.id, "its training job ended before the adapter was stored")
        raise TrainingCancelled(result.steps, result.steps)
    store_files(platform, adapter, staged)
    outcome = validate_adapter_job(platform, adapter.id)
    if outcome != ValidationOutcome.READY:
        raise JobFailed(f"the trained adapter {adapter.id} did not pass validation ({outcome})")
    return adapter.id


def _train(platform: Platform, job: TrainingJob, monitor: JobMonitor, workdir: Path) -> JobOutcome:
    """Steps 2-4 of the module docstring; the job's end is written here on success."""
    from inference.engine import resolve_model

    settings = platform.settings
    inputs = _load_inputs(platform, job)
    checkpoint = resolve_model(settings.model)
    try:
        data = prepare_training_data(inputs.examples, load_renderer(checkpoint), seed=int(job.parameters.get("seed", 0)),
                                     system_prompt=inputs.system_prompt, max_length=settings.training_max_length,
                                     keys=inputs.example_ids)
    except ValueError as exc:  # InvalidExamplesError too
        raise JobFailed(f"the examples cannot be trained on: {exc}") from exc
    metrics.EXAMPLES.observe(data.example_count)
    job_state.update_running(platform, job.id, monitor.worker, example_count=data.example_count)
    start = _download(platform, inputs.start_adapter, workdir / "start") if inputs.start_adapter is not None else None
    result = train_lora(checkpoint, data.train, data.eval, training_config(job.parameters, settings.training_threads),
                        workdir / "adapter", start_adapter=start, device=settings.device,
                        on_progress=monitor.progress, should_cancel=monitor.should_cancel)
    losses = {"train_loss": result.train_loss, "eval_loss_before": result.eval_loss_before,
              "eval_loss_after": result.eval_loss_after, "step": result.steps, "total_steps": result.steps}
    job_state.update_running(platform, job.id, monitor.worker, **losses)
    if not result.eval_loss_after < result.eval_loss_before:
        note = (f"the evaluation loss did not fall ({result.eval_loss_before:.4f} before, "
                f"{result.eval_loss_after:.4f} after): no adapter was stored and the user's adapter is unchanged")
        job_state.finish(platform, job.id, monitor.worker, TrainingStatus.SUCCEEDED, result=note, promoted=False)
        return JobOutcome.NOT_IMPROVED
    adapter_id = _promote(platform, job, monitor, inputs, result, workdir)
    note = (f"the evaluation loss fell from {result.eval_loss_before:.4f} to {result.eval_loss_after:.4f}: adapter "
            f"{adapter_id} is the user's adapter now")
    job_state.finish(platform, job.id, monitor.worker, TrainingStatus.SUCCEEDED, result=note, promoted=True,
                     adapter_id=adapter_id)
    return JobOutcome.PROMOTED


def _end(platform: Platform, job_id: str, monitor: JobMonitor, status: TrainingStatus, **values) -> JobOutcome:
    """Write a job's unsuccessful end; an adapter row it had begun is given up."""
    with session_scope(platform.session_factory) as session:
        job = session.get(TrainingJob, job_id)
        adapter_id = job.adapter_id if job is not None else None
    if adapter_id is not None:
        give_up(platform, adapter_id, f"its training job ended {status}")
    if not job_state.finish(platform, job_id, monitor.worker, status, adapter_id=None, **values):
        return JobOutcome.LOST
    return JobOutcome.CANCELLED if status == TrainingStatus.CANCELLED else JobOutcome.FAILED


def _stopped(platform: Platform, job_id: str, monitor: JobMonitor, exc: TrainingCancelled) -> JobOutcome:
    if monitor.lost:
        return JobOutcome.LOST
    if monitor.cancel_requested or not monitor.shutdown.is_set():
        return _end(platform, job_id, monitor, TrainingStatus.CANCELLED,
                    result=f"cancelled after {exc.step} of {exc.total_steps} steps; no adapter was stored")
    return _end(platform, job_id, monitor, TrainingStatus.FAILED,
                error=f"the process running the job shut down after {exc.step} of {exc.total_steps} steps; "
                      "no adapter was stored")


def run_training_job(platform: Platform, job_id: str, *, stop: threading.Event | None = None) -> JobOutcome:
    """Run the queued job ``job_id`` to its end (the module docstring). Never raises for the job's
    own failures (they are written to the job); ``stop`` set by a shutting-down process ends the
    job as failed at the next step."""
    worker = worker_name()
    job = job_state.claim(platform, job_id, worker)
    if job is None:
        return JobOutcome.SKIPPED
    monitor = JobMonitor(platform, job_id, worker, platform.settings.training_heartbeat_s, stop).start()
    metrics.RUNNING.inc()
    started = time.monotonic()
    workdir = Path(tempfile.mkdtemp(prefix="tailor-train-"))
    try:
        outcome = _train(platform, job, monitor, workdir)
    except TrainingCancelled as exc:
        outcome = _stopped(platform, job_id, monitor, exc)
    except (JobFailed, TrainingDiverged) as exc:
        outcome = _end(platform, job_id, monitor, TrainingStatus.FAILED, error=str(exc))
    except Exception as exc:  # noqa: BLE001 - a fault of this platform (store, database, a bug): the job says so
        log.exception("training job %s failed", job_id)
        try:
            outcome = _end(platform, job_id, monitor, TrainingStatus.FAILED,
                           error=f"internal error: {type(exc).__name__}: {exc}")
        except Exception:  # the database is down too: the reaper fails the job once its heartbeat is stale
            log.exception("recording the failure of training job %s failed", job_id)
            outcome = JobOutcome.FAILED
    finally:
        monitor.stop()
        metrics.RUNNING.dec()
        shutil.rmtree(workdir, ignore_errors=True)
    status = {JobOutcome.PROMOTED: "succeeded", JobOutcome.NOT_IMPROVED: "succeeded",
              JobOutcome.FAILED: "failed", JobOutcome.CANCELLED: "cancelled"}.get(outcome)
    if status is not None:
        metrics.observe_end(status, time.monotonic() - started,
                            promoted=outcome == JobOutcome.PROMOTED if status == "succeeded" else None)
    log.info("training job %s: %s", job_id, outcome)
    return outcome


def reap_stale_jobs(platform: Platform, stale_after_s: float | None = None,
                    queued_timeout_s: float | None = None) -> list[str]:
    """Fail the running jobs whose process died (no heartbeat for ``stale_after_s``, default
    ``TAILOR_TRAINING_STALE_AFTER_S``; ``job_state.reap_stale``) and give up the adapters they had
    begun to store, and the jobs still queued after ``queued_timeout_s`` (default
    ``TAILOR_PENDING_TIMEOUT_S``: their message was lost); returns the failed jobs' ids."""
    settings = platform.settings
    stale_after_s = stale_after_s if stale_after_s is not None else settings.training_stale_after_s
    queued_timeout_s = queued_timeout_s if queued_timeout_s is not None else settings.pending_timeout_s
    reaped = job_state.reap_stale(platform, stale_after_s)
    for job_id, adapter_id in reaped:
        if adapter_id is not None:
            give_up(platform, adapter_id, f"its training job {job_id} stopped")
    never_started = job_state.fail_queued(platform, None, f"the job did not start within {queued_timeout_s:.0f} s "
                                          "(its queue message was lost); no adapter was stored",
                                          older_than_s=queued_timeout_s)
    failed = [job_id for job_id, _ in reaped] + never_started
    for _job in failed:
        metrics.observe_end("failed", None)
    return failed


def fail_unstarted(platform: Platform, job_id: str, reason: str) -> bool:
    """Fail a queued job that this process will not start (it is shutting down)."""
    failed = job_state.fail_queued(platform, job_id, reason)
    for _job in failed:
        metrics.observe_end("failed", None)
    return bool(failed)
