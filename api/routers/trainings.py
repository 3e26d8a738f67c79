"""Adapter training jobs of the caller's tenant (admin key): start, read, list, cancel.

``POST /v1/users/{id}/adapter-trainings`` checks everything before anything is stored and answers
one 422 naming every problem: settings out of bounds, ``rank`` or ``target_modules`` with
``start_from=current`` (continuing keeps the adapter's own), ``start_from=current`` without a ready
current adapter, fewer than ``MIN_EXAMPLES`` examples, a job already queued or running for the
user. Then the tenant's queued and running jobs are counted against
``TAILOR_MAX_TRAINING_JOBS_PER_TENANT`` (429 with ``Retry-After`` beyond it). The job row is
committed ``queued`` before it is handed to the task queue (a thread of its own in the embedded
default, the Celery worker otherwise); if the queue cannot take it, the job is failed at once and
the answer is 503 with ``Retry-After``. The job itself is ``tenants.training.jobs``.
"""

from __future__ import annotations

import asyncio
import logging

from fastapi import APIRouter, HTTPException
from fastapi.responses import JSONResponse
from sqlalchemy.exc import IntegrityError

from api.deps import AdminDep, PageLimit, PageOffset, SessionDep, StateDep, is_id, not_found
from api.error_responses import errors
from api.routers.users import load_user
from api.training_schemas import TrainingCreate, TrainingJobList, TrainingJobPublic, TrainingProgress
from tenants import repositories as repo
from tenants.db import session_scope
from tenants.models import AdapterStatus, TrainingJob, TrainingStatus
from tenants.training import metrics
from tenants.training import repository as training_repo
from tenants.training.examples import MIN_EXAMPLES
from tenants.training.jobs import fail_unstarted
from tenants.training.lora_trainer import LoraTrainingConfig

log = logging.getLogger(__name__)
router = APIRouter(tags=["adapter trainings"])

LIMIT_RETRY_AFTER_S = 30  # a training takes minutes; ask again in a while
QUEUE_RETRY_AFTER_S = 10
QUEUE_TIMEOUT_S = 5.0


def job_public(job: TrainingJob) -> TrainingJobPublic:
    return TrainingJobPublic(
        id=job.id, user_id=job.user_id, status=TrainingStatus(job.status).value,
        progress=TrainingProgress(step=job.step, total_steps=job.total_steps), train_loss=job.train_loss,
        eval_loss_before=job.eval_loss_before, eval_loss_after=job.eval_loss_after, adapter_id=job.adapter_id,
        promoted=job.promoted, result=job.result, error=job.error, parameters=job.parameters,
        example_count=job.example_count, cancel_requested=job.cancel_requested, created_at=job.created_at,
        started_at=job.started_at, finished_at=job.finished_at,
    )


def _parameters(body: TrainingCreate, current_adapter_id: str | None) -> tuple[dict, list[str]]:
    """The job's stored parameters (the defaults filled in) and every problem of the settings."""
    given = {k: v for k, v in (("rank", body.rank), ("epochs", body.epochs), ("learning_rate", body.learning_rate))
             if v is not None}
    if body.target_modules is not None:
        given["target_modules"] = tuple(body.target_modules)
    problems = LoraTrainingConfig(**given).problems()
    config = LoraTrainingConfig(**given) if not problems else LoraTrainingConfig()
    parameters = {"start_from": body.start_from, "epochs": config.epochs, "learning_rate": config.learning_rate,
                  "batch_size": config.batch_size, "seed": config.seed}
    if body.start_from == "current":
        chosen = [name for name in ("rank", "target_modules") if getattr(body, name) is not None]
        if chosen:
            problems.append(f"{' and '.join(chosen)} cannot be chosen with start_from=current: continuing an "
                            "adapter keeps its own rank and target modules (use start_from=fresh)")
        if current_adapter_id is None:
            problems.append("start_from is current but the user has no ready adapter to continue from "
                            "(use start_from=fresh)")
        parameters["start_adapter_id"] = current_adapter_id
    else:
        parameters.update(rank=config.rank, target_modules=list(config.target_modules))
    return parameters, problems


def _create_job(state, tenant_id: str, user_id: str, body: TrainingCreate) -> TrainingJob:
    """Check everything (module docstring), then commit the queued job; returns it detached."""
    with session_scope(state.platform.session_factory) as session:
        user = load_user(session, tenant_id, user_id)
        current = repo.get_adapter(session, tenant_id, user.current_adapter_id) if user.current_adapter_id else None
        ready = current is not None and current.status == AdapterStatus.READY
        parameters, problems = _parameters(body, current.id if ready else None)
        examples = training_repo.count_examples(session, tenant_id, user.id)
        if examples < MIN_EXAMPLES:
            problems.append(f"the user has {examples} training examples; at least {MIN_EXAMPLES} are needed "
                            f"(POST /v1/users/{user.id}/examples, or rate chat answers)")
        running = training_repo.active_job(session, tenant_id, user.id)
        if running is not None:
            problems.append(f"training job {running.id} is already {running.status} for this user; wait for it "
                            "or cancel it")
        if problems:
            raise HTTPException(422, problems)
        limit = state.settings.max_training_jobs_per_tenant
        if limit and training_repo.active_job_count(session, tenant_id) >= limit:
            raise HTTPException(429, f"this tenant already has {limit} training jobs queued or running, the most "
                                     "allowed; retry when one has finished",
                                headers={"Retry-After": str(LIMIT_RETRY_AFTER_S)})
        try:
            with session.begin_nested():
                job = training_repo.create_job(session, tenant_id, user.id, parameters, examples)
        except IntegrityError:  # another request queued one for this user a moment ago
            raise HTTPException(422, ["a training job is already queued or running for this user; wait for it or "
                                      "cancel it"]) from None
        session.expunge(job)
        return job


@router.post("/v1/users/{user_id}/adapter-trainings", status_code=202, response_model=TrainingJobPublic,
             responses=errors(401, 403, 404, 413, 422, 429, 503))
async def start_training(user_id: str, body: TrainingCreate, caller: AdminDep, state: StateDep) -> TrainingJobPublic:
    """Train a new version of the user's adapter from their examples; answers 202 with the queued
    job (poll ``GET /v1/adapter-trainings/{id}``). The new version becomes the user's adapter only
    if its evaluation loss is below the starting point's."""
    job = await asyncio.to_thread(_create_job, state, caller.tenant_id, user_id, body)
    try:
        await asyncio.wait_for(asyncio.to_thread(state.tasks.submit_training, job.id), QUEUE_TIMEOUT_S)
    except Exception as exc:  # noqa: BLE001 - any broker failure: the job cannot run
        log.warning("queueing training job %s failed: %s", job.id, exc)
        await asyncio.to_thread(fail_unstarted, state.platform, job.id,
                                f"the job could not be queued ({type(exc).__name__}); nothing was trained")
        raise HTTPException(503, "the task queue is unavailable; the job was not started",
                            headers={"Retry-After": str(QUEUE_RETRY_AFTER_S)}) from None
    return job_public(job)


def _load_job(session, tenant_id: str, job_id: str) -> TrainingJob:
    job = training_repo.get_job(session, tenant_id, job_id) if is_id(job_id) else None
    if job is None:
        raise not_found("training job", job_id)
    return job


@router.get("/v1/adapter-trainings/{job_id}", response_model=TrainingJobPublic,
            responses=errors(401, 403, 404, 429, 503))
def get_training(job_id: str, caller: AdminDep, session: SessionDep) -> TrainingJobPublic:
    return job_public(_load_job(session, caller.tenant_id, job_id))


@router.get("/v1/users/{user_id}/adapter-trainings", response_model=TrainingJobList,
            responses=errors(401, 403, 404, 429, 503))
def list_trainings(
    user_id: str,
    caller: AdminDep,
    session: SessionDep,
    limit: PageLimit = 100,
    offset: PageOffset = 0,
) -> TrainingJobList:
    """The user's training jobs, newest first."""
    user = load_user(session, caller.tenant_id, user_id)
    jobs = training_repo.list_jobs(session, caller.tenant_id, user.id, limit=limit, offset=offset)
    return TrainingJobList(data=[job_public(j) for j in jobs], limit=limit, offset=offset)


@router.delete("/v1/adapter-trainings/{job_id}", response_model=TrainingJobPublic,
               responses={202: {"model": TrainingJobPublic, "description": "cancellation asked of a running job"},
                          **errors(401, 403, 404, 409, 429, 503)})
def cancel_training(job_id: str, caller: AdminDep, session: SessionDep):
    """Cancel a job: a queued one at once (200, ``cancelled``), a running one at its next step (202,
    ``cancel_requested``; it ends ``cancelled`` and stores nothing). A job that already ended
    answers 409, except a cancelled one (200)."""
    before = _load_job(session, caller.tenant_id, job_id).status
    job = training_repo.request_cancel(session, caller.tenant_id, job_id)
    if before == TrainingStatus.QUEUED and job.status == TrainingStatus.CANCELLED:
        metrics.observe_end("cancelled", None)
    if job.status == TrainingStatus.RUNNING:
        return JSONResponse(job_public(job).model_dump(mode="json"), status_code=202)
    if job.status != TrainingStatus.CANCELLED:
        raise HTTPException(409, f"training job {job.id} already {job.status}")
    return job_public(job)
