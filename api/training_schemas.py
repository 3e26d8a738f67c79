"""Request and response bodies of the personalization loop: training examples, feedback on chat
answers, adapter training jobs.

Request bodies are strictly typed (``StrictBody``), but the bounds of the values are checked by the
routes, not here, so that one 422 names every problem: an example's every defect
(``tenants.training.examples.message_problems``), or a training's settings out of bounds together
with the user's state (too few examples, a job already running, no adapter to continue from).
"""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Literal

from pydantic import AfterValidator, BaseModel, Field

from api.schemas import StrictBody
from tenants.training.lora_trainer import MAX_EPOCHS, MAX_LEARNING_RATE, MAX_RANK, MIN_EPOCHS, MIN_RANK

TrainingStatusName = Literal["queued", "running", "succeeded", "failed", "cancelled"]
MAX_BODY_MESSAGES = 1000  # a hard cap on the list's length; the example rules allow 200


def _valid_unicode(value: str) -> str:
    """Refuse a lone surrogate (JSON lets ``"\\ud800"`` through; it cannot be stored or trained on)."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError("not valid Unicode (a lone surrogate)") from None
    return value


Text = Annotated[str, AfterValidator(_valid_unicode)]


# --- examples ---------------------------------------------------------------------------------------
class ExampleMessage(StrictBody):
    role: Text = Field(max_length=32, description="system (first only), user or assistant")
    content: Text = Field(description="non-empty text of at most 32,000 characters")


class ExampleCreate(StrictBody):
    """A conversation whose assistant turns are what to learn: user and assistant turns alternate
    from a user turn and the last is an assistant turn; an optional system message first."""

    messages: list[ExampleMessage] = Field(max_length=MAX_BODY_MESSAGES)


class ExamplePublic(BaseModel):
    id: str
    user_id: str
    source: Literal["api", "feedback"]
    message_id: str | None = Field(description="for an example made from feedback: the rated message")
    messages: list[dict[str, str]]
    created_at: datetime


class ExampleList(BaseModel):
    data: list[ExamplePublic]
    limit: int
    offset: int
    total: int = Field(description="the user's examples in all")


# --- feedback ---------------------------------------------------------------------------------------
class FeedbackCreate(StrictBody):
    rating: int = Field(description="1: a good answer (becomes an example); -1: a bad one")
    correction: Text | None = Field(None, description="with rating -1: the answer that should have been given "
                                   "(becomes an example in place of the rated answer)")


class FeedbackPublic(BaseModel):
    id: str
    message_id: str
    rating: int
    correction: str | None
    example: ExamplePublic | None = Field(description="the training example this feedback made (null for a -1 "
                                          "without a correction: recorded, not trained on)")
    created_at: datetime


# --- training jobs ----------------------------------------------------------------------------------
class TrainingCreate(StrictBody):
    """Settings of a training; omitted ones take the defaults (docs/personalization.md)."""

    rank: int | None = Field(None, description=f"LoRA rank, {MIN_RANK}-{MAX_RANK} (default 8; fresh adapters only)")
    target_modules: list[Text] | None = Field(None, max_length=16, description="modules to adapt: q_proj, k_proj, "
                                             "v_proj, o_proj, gate_proj, up_proj, down_proj (default the four "
                                             "attention projections; fresh adapters only)")
    epochs: int | None = Field(None, description=f"{MIN_EPOCHS}-{MAX_EPOCHS} (default 3)")
    learning_rate: float | None = Field(None, description=f"peak learning rate, in (0, {MAX_LEARNING_RATE}] "
                                        "(default 2e-3)")
    start_from: Literal["current", "fresh"] = Field("fresh", description="fresh: a new adapter; current: continue "
                                                    "the user's current adapter (its own rank and modules)")


class TrainingProgress(BaseModel):
    step: int
    total_steps: int = Field(description="0 until the training has started")


class TrainingJobPublic(BaseModel):
    id: str
    user_id: str
    status: TrainingStatusName
    progress: TrainingProgress
    train_loss: float | None = Field(description="the latest step's loss, then the last epoch's (nats per token)")
    eval_loss_before: float | None = Field(description="held-out loss of the starting point")
    eval_loss_after: float | None = Field(description="held-out loss of the trained adapter")
    adapter_id: str | None = Field(description="the new adapter version, once promoted")
    promoted: bool = Field(description="the new version became the user's adapter (its evaluation loss fell)")
    result: str | None = Field(description="what the job did, in words (also why nothing was promoted)")
    error: str | None = Field(description="why the job failed")
    parameters: dict
    example_count: int = Field(description="examples at submission, then the usable ones the job trained on")
    cancel_requested: bool
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None


class TrainingJobList(BaseModel):
    data: list[TrainingJobPublic]
    limit: int
    offset: int
