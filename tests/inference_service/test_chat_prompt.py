"""The stepped history window (``inference.service.chat_prompt``) with the bundled SmolLM2 tokenizer:
over a growing conversation most turns' prompts extend the previous turn's exactly (what the prefix
cache reuses), the window jumps by about the step, and everything the exact fit promised still
holds (fits the limit, keeps the last message, opens at a user turn, 422 when the message alone
does not fit)."""

from __future__ import annotations

import random

import pytest
from pydantic import ValidationError

from inference import LLM
from inference.service.chat_prompt import history_anchors, message_weights, render_chat
from inference.service.core import InferenceCore
from inference.service.events import GenerationStarted
from inference.service.protocol import GenerateRequest, InferenceError
from inference.tokenizer import Tokenizer

WORDS = ("the a cache page prompt tenant adapter engine window history budget step token model "
         "reply question answer quickly slowly because while after before every some many few "
         "kept dropped stays moves jumps, fits. why? yes! no: 42 2026 café naïve 東京").split()
SYSTEM = "You are a patient tutor. Answer in plain words and keep every answer short."
BUDGET, STEP = 1536, 512  # the defaults: TAILOR_HISTORY_TOKEN_BUDGET and 1/3 of it (TAILOR_HISTORY_TRIM_STEP_FRACTION)


@pytest.fixture(scope="module")
def tok(bundled_checkpoint) -> Tokenizer:
    return Tokenizer(bundled_checkpoint)


def _text(rng: random.Random, words: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(words))


def _conversation(rng: random.Random, turns: int, user_words=(8, 30), reply_words=(20, 80)) -> list[list[dict]]:
    """The ``messages`` of each turn of one growing conversation: turn n ends with its new user
    message; turn n + 1 adds the reply to it and the next user message."""
    history: list[dict] = []
    out = []
    for _ in range(turns):
        history.append({"role": "user", "content": _text(rng, rng.randint(*user_words))})
        out.append(list(history))
        history.append({"role": "assistant", "content": _text(rng, rng.randint(*reply_words))})
    return out


def _replay(tok: Tokenizer, turns: list[list[dict]], limit: int, step: int | None):
    """Render every turn; returns the prompts and the index of the first kept message per turn."""
    prompts, starts = [], []
    for messages in turns:
        rendered = render_chat(tok, SYSTEM, messages, limit, step)
        prompts.append(rendered.token_ids)
        starts.append(len(messages) - rendered.messages_used)
    return prompts, starts


def _extends(prompts: list[list[int]]) -> list[bool]:
    """For each turn after the first: is the previous turn's prompt an exact token prefix of it?"""
    return [b[:len(a)] == a for a, b in zip(prompts, prompts[1:])]


def test_most_turns_extend_the_previous_prompt_and_the_window_jumps_by_about_the_step(tok):
    rng = random.Random(random.getrandbits(64))
    turns = _conversation(rng, 36)
    prompts, starts = _replay(tok, turns, BUDGET, STEP)
    exact_prompts, exact_starts = _replay(tok, turns, BUDGET, None)
    full = turns[-1]
    weights = message_weights(tok, full)
    exchange_max = max(weights[i] + weights[i + 1] for i in range(0, len(full) - 1, 2))
    trimmed_from = next(n for n, s in enumerate(exact_starts) if s > 0)  # the first turn that must drop
    assert trimmed_from < 20, "the conversation must outgrow the budget early enough to test the window"

    for n, (messages, prompt, start) in enumerate(zip(turns, prompts, starts)):
        assert len(prompt) <= BUDGET
        assert messages[start]["role"] == "user"
        kept = [{"role": "system", "content": SYSTEM}, *messages[start:]]
        assert prompt == tok.apply_chat_template(kept)  # the newest messages, the last one included
        if n >= trimmed_from:  # a full window holds between about B - S and B tokens
            assert len(prompt) >= BUDGET - STEP - 2 * exchange_max
    # the start never moves back, and moves in jumps of about S tokens of history
    jumps = [(a, b) for a, b in zip(starts, starts[1:]) if b != a]
    assert all(b > a for a, b in jumps)
    for a, b in jumps:
        assert STEP - exchange_max <= sum(weights[a:b]) <= STEP + exchange_max, (a, b)

    window = slice(trimmed_from, None)
    stepped = _extends(prompts)[window]
    exact = _extends(exact_prompts)[window]
    # between jumps every turn extends the previous prompt; a jump comes about every S / T turns
    assert all(ok == (a == b) for ok, a, b in zip(_extends(prompts), starts, starts[1:]))
    # (over 40 seeds: 0.76 to 0.86 of the turns with a full window; the exact fit 0.05 to 0.32)
    assert sum(stepped) / len(stepped) >= 0.65, (sum(stepped), len(stepped))
    assert sum(exact) / len(exact) <= 0.45, (sum(exact), len(exact))  # the control: a sliding window


def test_the_same_input_renders_the_same_prompt_and_anchors_never_move(tok):
    rng = random.Random(random.getrandbits(64))
    messages = _conversation(rng, 30)[-1]
    assert render_chat(tok, SYSTEM, messages, 900, 300) == render_chat(tok, SYSTEM, list(messages), 900, 300)
    weights = message_weights(tok, messages)
    for i, message in enumerate(messages):  # a message's weight depends on that message alone
        assert weights[i] == message_weights(tok, [message])[0]
    anchors = history_anchors(messages, weights, 300)
    assert anchors[0] == 0 and all(messages[a]["role"] == "user" for a in anchors)
    for k in range(1, len(messages) + 1):  # appending messages keeps every anchor already there
        assert history_anchors(messages[:k], weights[:k], 300) == [a for a in anchors if a < k]
    before = [sum(weights[:a]) for a in anchors]  # about one anchor per 300 tokens
    assert len(anchors) >= sum(weights[:-1]) // 300 - 1
    assert all(b - a >= 300 - max(weights) * 2 for a, b in zip(before, before[1:]))


def test_the_weights_match_the_template(tok):
    rng = random.Random(random.getrandbits(64))
    messages = _conversation(rng, 12)[-1]
    rendered = len(tok.apply_chat_template([{"role": "system", "content": SYSTEM}, *messages]))
    alone = len(tok.apply_chat_template([{"role": "system", "content": SYSTEM}]))
    assert abs(sum(message_weights(tok, messages)) - (rendered - alone)) <= len(messages) // 8 + 1


def test_when_no_anchor_fits_it_falls_back_to_the_exact_fit(tok):
    rng = random.Random(random.getrandbits(64))
    messages = _conversation(rng, 12)[-1]
    limit = len(tok.apply_chat_template([{"role": "system", "content": SYSTEM}, *messages])) // 2
    # a step longer than the whole conversation: the only anchor is the first message, which does not fit
    assert history_anchors(messages, message_weights(tok, messages), 10**6) == [0]
    assert render_chat(tok, SYSTEM, messages, limit, 10**6) == render_chat(tok, SYSTEM, messages, limit, None)
    # a limit just below the suffix from the newest anchor: no anchor fits, the exact fit still does
    turns = [m for m in _conversation(rng, 20) if len(m) >= 7]
    anchored = [(m, history_anchors(m, message_weights(tok, m), 200)) for m in turns]
    messages, anchors = next((m, a) for m, a in anchored if a[-1] < len(m) - 1)  # the new message is no anchor
    limit = len(tok.apply_chat_template([{"role": "system", "content": SYSTEM}, *messages[anchors[-1]:]])) - 1
    stepped = render_chat(tok, SYSTEM, messages, limit, 200)
    exact = render_chat(tok, SYSTEM, messages, limit, None)
    start = len(messages) - stepped.messages_used
    assert stepped == exact and start not in anchors and start > anchors[-1]
    assert len(exact.token_ids) <= limit and messages[start]["role"] == "user"


def test_the_whole_history_when_it_fits_and_422_when_the_message_alone_does_not(tok):
    rng = random.Random(random.getrandbits(64))
    messages = _conversation(rng, 4)[-1]
    everything = render_chat(tok, SYSTEM, messages, 10_000, 64)
    assert everything.messages_used == len(messages)
    assert everything == render_chat(tok, SYSTEM, messages, 10_000, None)
    with pytest.raises(InferenceError) as info:
        render_chat(tok, None, [*messages, {"role": "user", "content": "y " * 500}], 50, 16)
    assert info.value.status == 422 and "at most 50 fit" in str(info.value)


@pytest.mark.parametrize("bad", [0, -5, "64", 64.0, True])
def test_the_request_refuses_a_step_that_is_not_a_positive_integer(bad):
    with pytest.raises(ValidationError) as info:
        GenerateRequest(messages=[{"role": "user", "content": "hi"}], history_trim_step_tokens=bad)
    assert "history_trim_step_tokens" in str(info.value)
    assert GenerateRequest(messages=[{"role": "user", "content": "hi"}], history_trim_step_tokens=64)


async def test_the_core_renders_with_the_requests_step(tiny_checkpoint):
    tok = Tokenizer(tiny_checkpoint)
    rng = random.Random(random.getrandbits(64))
    budget, step = 300, 120
    # the first turn of a growing conversation where the stepped window keeps less than the exact fit
    messages = next(m for m in _conversation(rng, 40, (5, 15), (10, 30))
                    if render_chat(tok, SYSTEM, m, budget, step) != render_chat(tok, SYSTEM, m, budget, None))
    stepped = render_chat(tok, SYSTEM, messages, budget, step)
    core = InferenceCore(LLM(str(tiny_checkpoint), page_tokens=4, pool_bytes=16 << 20))
    try:
        started = []
        for trim in (step, None):
            events = await core.start(GenerateRequest(
                messages=messages, system_prompt=SYSTEM, history_token_budget=budget,
                history_trim_step_tokens=trim, max_tokens=1, temperature=0.0))
            try:
                started.append(await events.__anext__())
            finally:
                await events.aclose()
        assert all(isinstance(s, GenerationStarted) for s in started)
        assert (started[0].prompt_tokens, started[0].messages_used) == (len(stepped.token_ids), stepped.messages_used)
        assert started[1].messages_used > started[0].messages_used
    finally:
        core.close()


def test_a_window_never_opens_at_a_tool_result_and_the_tools_count(tools_checkpoint, random_seed):
    """With tools (a Hermes template): the kept history starts at a user turn, never at an
    assistant's calls or a tool's result, and the tools' listing counts against the limit."""
    tok = Tokenizer(tools_checkpoint)
    rng = random.Random(random_seed)
    call = {"id": "c1", "type": "function", "function": {"name": "lookup", "arguments": {"q": _text(rng, 5)}}}
    exchange = [{"role": "user", "content": _text(rng, 20)},
                {"role": "assistant", "content": None, "tool_calls": [call]},
                {"role": "tool", "tool_call_id": "c1", "content": _text(rng, 40)},
                {"role": "tool", "tool_call_id": "c1", "content": _text(rng, 40)},
                {"role": "assistant", "content": _text(rng, 30)}]
    messages = [*exchange, *exchange, {"role": "user", "content": _text(rng, 10)}]
    tools = [{"type": "function", "function": {"name": "lookup", "description": _text(rng, 30),
                                               "parameters": {"type": "object", "properties": {"q": {"type": "string"}}}}}]
    whole = len(tok.apply_chat_template(messages, tools))
    for limit in range(whole - 200, whole + 1, 7):
        rendered = render_chat(tok, None, messages, limit, None, tools)
        start = len(messages) - rendered.messages_used
        assert len(rendered.token_ids) <= limit
        assert messages[start]["role"] == "user", (limit, start)
        assert rendered.token_ids == tok.apply_chat_template(messages[start:], tools)
    without = render_chat(tok, None, messages, whole, None, None)
    assert len(without.token_ids) < whole  # the tools' listing took room
