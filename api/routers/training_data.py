"""A user's training data: examples posted by the tenant (admin key), and feedback on chat answers
(chat or admin key) that becomes examples.

Feedback: ``rating`` 1 approves the answer: the conversation up to and including it becomes an
example. ``rating`` -1 with a ``correction``: the same conversation with the correction in place of
the answer becomes an example. ``rating`` -1 alone is recorded (the answer was bad) but makes no
example: there is no answer to learn from it. Rating a message again replaces the earlier rating
and the example it made. The conversation is the newest ``MAX_MESSAGES`` messages of the rated
answer's conversation up to it, starting at a user turn.
"""

from __future__ import annotations

from fastapi import APIRouter, HTTPException, Response

from api.deps import AdminDep, ChatDep, PageLimit, PageOffset, SessionDep, StateDep, is_id, not_found
from api.error_responses import errors
from api.routers.users import load_user
from api.training_schemas import ExampleCreate, ExampleList, ExamplePublic, FeedbackCreate, FeedbackPublic
from tenants.models import Message, MessageFeedback, TrainingExample
from tenants.training import repository as training_repo
from tenants.training.examples import MAX_MESSAGES, message_problems

router = APIRouter(tags=["training data"])


def example_public(example: TrainingExample) -> ExamplePublic:
    return ExamplePublic(id=example.id, user_id=example.user_id, source=example.source.value,
                         message_id=example.message_id, messages=example.messages, created_at=example.created_at)


def _room_for_example(state, session, tenant_id: str, user_id: str, freed: int = 0) -> None:
    """409 when the user already has ``TAILOR_MAX_EXAMPLES_PER_USER`` examples (``freed``: ones this
    request replaces)."""
    limit = state.settings.max_examples_per_user
    if training_repo.count_examples(session, tenant_id, user_id) - freed >= limit:
        raise HTTPException(409, f"the user already has {limit} training examples, the most allowed; delete some first")


@router.post("/v1/users/{user_id}/examples", status_code=201, response_model=ExamplePublic,
             responses=errors(401, 403, 404, 409, 413, 422, 429, 503))
def create_example(user_id: str, body: ExampleCreate, caller: AdminDep, session: SessionDep,
                   state: StateDep) -> ExamplePublic:
    """Add a training example: a conversation ending with the assistant turn to learn (every
    assistant turn is trained). 422 names every problem of every message."""
    user = load_user(session, caller.tenant_id, user_id)
    messages = [m.model_dump() for m in body.messages]
    problems = message_problems(messages)
    if problems:
        raise HTTPException(422, [f"messages: {p}" for p in problems])
    _room_for_example(state, session, caller.tenant_id, user.id)
    return example_public(training_repo.add_example(session, caller.tenant_id, user.id, messages))


@router.get("/v1/users/{user_id}/examples", response_model=ExampleList, responses=errors(401, 403, 404, 429, 503))
def list_examples(
    user_id: str,
    caller: AdminDep,
    session: SessionDep,
    limit: PageLimit = 100,
    offset: PageOffset = 0,
) -> ExampleList:
    """The user's examples, oldest first."""
    user = load_user(session, caller.tenant_id, user_id)
    rows = training_repo.list_examples(session, caller.tenant_id, user.id, limit=limit, offset=offset)
    return ExampleList(data=[example_public(e) for e in rows], limit=limit, offset=offset,
                       total=training_repo.count_examples(session, caller.tenant_id, user.id))


@router.delete("/v1/users/{user_id}/examples/{example_id}", status_code=204,
               responses=errors(401, 403, 404, 429, 503))
def delete_example(user_id: str, example_id: str, caller: AdminDep, session: SessionDep) -> Response:
    user = load_user(session, caller.tenant_id, user_id)
    if not (is_id(example_id) and training_repo.delete_example(session, caller.tenant_id, user.id, example_id)):
        raise not_found("example", example_id)
    return Response(status_code=204)


def feedback_example(conversation: list[Message], correction: str | None) -> list[dict[str, str]]:
    """The example a rating makes: the conversation from its first user turn to the rated answer,
    the answer replaced by ``correction`` when there is one."""
    turns = [{"role": m.role, "content": m.content} for m in conversation]
    while turns and turns[0]["role"] != "user":
        turns.pop(0)
    if correction is not None and turns:
        turns[-1] = {"role": "assistant", "content": correction}
    return turns


def feedback_public(feedback: MessageFeedback, example: TrainingExample | None) -> FeedbackPublic:
    return FeedbackPublic(id=feedback.id, message_id=feedback.message_id, rating=feedback.rating,
                          correction=feedback.correction, example=example_public(example) if example else None,
                          created_at=feedback.created_at)


@router.post("/v1/users/{user_id}/messages/{message_id}/feedback", status_code=201, response_model=FeedbackPublic,
             responses=errors(401, 404, 409, 413, 422, 429, 503))
def rate_message(user_id: str, message_id: str, body: FeedbackCreate, caller: ChatDep, session: SessionDep,
                 state: StateDep) -> FeedbackPublic:
    """Rate one of the user's assistant answers (module docstring): 1 or -1, with an optional
    correction for -1. An approval or a correction becomes a training example."""
    user = load_user(session, caller.tenant_id, user_id)
    message = training_repo.get_message(session, caller.tenant_id, user.id, message_id) if is_id(message_id) else None
    if message is None:
        raise not_found("message", message_id)
    problems = []
    if body.rating not in (1, -1):
        problems.append(f"rating must be 1 or -1, got {body.rating}")
    if message.role != "assistant":
        problems.append(f"message {message_id} is a {message.role} message; only assistant answers can be rated")
    if body.rating == 1 and body.correction is not None:
        problems.append("correction: a correction goes with rating -1 (a rating of 1 approves the answer as it is)")
    example_messages = None
    if not problems and (body.rating == 1 or body.correction is not None):
        example_messages = feedback_example(training_repo.conversation_until(session, caller.tenant_id, message,
                                                                             MAX_MESSAGES), body.correction)
        problems.extend(f"the example this makes: {p}" for p in message_problems(example_messages))
    if problems:
        raise HTTPException(422, problems)
    if example_messages is not None:
        earlier = training_repo.feedback_of(session, caller.tenant_id, message.id)
        replaced = 1 if earlier is not None and earlier.example_id is not None else 0
        _room_for_example(state, session, caller.tenant_id, user.id, freed=replaced)
    feedback, example = training_repo.record_feedback(session, caller.tenant_id, message, body.rating, body.correction,
                                                      example_messages)
    return feedback_public(feedback, example)
