"""The stepped history window of the database (``conversations.history_window``) on SQLite and
PostgreSQL: at most N messages, the newest ones, starting at a multiple of the step counted from
the user's first message, so the window's start stays put for a step's worth of turns instead of
shifting by one exchange every turn (the prefix cache then reuses the previous turn's prompt)."""

from __future__ import annotations

import uuid
import pytest

from tenants import repositories as repo
from tenants.conversations import history_window, load_chat_context, record_exchange
from tenants.db import session_scope
from tenants.settings import Settings


def _user(factory) -> tuple[str, str]:
    with session_scope(factory) as s:
        tenant = repo.create_tenant(s, f"window-{uuid.uuid4().hex[:8]}", system_prompt="Be brief.")
        return tenant.id, repo.create_user(s, tenant.id, "alice").id


def _turns(factory, tenant_id: str, user_id: str, exchanges: int, max_messages: int, step: int):
    """Record ``exchanges`` exchanges one by one; after each, the window as ``(first position,
    contents)`` next to every message so far."""
    windows = []
    for n in range(exchanges):
        with session_scope(factory) as s:
            record_exchange(s, tenant_id, user_id, f"question {n}", f"answer {n}", 3)
        with session_scope(factory) as s:
            window = [m.content for m in history_window(s, tenant_id, user_id, max_messages, step)]
        everything = [text for i in range(n + 1) for text in (f"question {i}", f"answer {i}")]
        windows.append((len(everything) - len(window), window, everything))
    return windows


@pytest.mark.parametrize("max_messages,step", [(10, 4), (7, 3), (12, 6)])
def test_the_window_holds_the_newest_messages_and_moves_in_steps(session_factory, max_messages, step):
    tenant_id, user_id = _user(session_factory)
    windows = _turns(session_factory, tenant_id, user_id, 20, max_messages, step)
    for start, window, everything in windows:
        assert window == everything[start:]  # the newest messages, in order
        assert start % step == 0
        assert min(len(everything), max_messages - step + 1) <= len(window) <= max_messages
    starts = [start for start, _, _ in windows]
    moves = [(a, b) for a, b in zip(starts, starts[1:]) if a != b]
    assert all(b - a == step for a, b in moves)
    # the start stays put for step / 2 exchanges at a time, so most turns extend the previous window
    extended = sum(1 for (a, w, _), (b, v, _) in zip(windows, windows[1:]) if v[:len(w)] == w)
    assert len(moves) == -(-(len(windows) * 2 - max_messages) // step)  # ceil((messages - N) / step)
    assert extended == len(windows) - 1 - len(moves)
    if step % 2 == 0:  # whole exchanges: the window opens with a question
        assert all(w[0].startswith("question") for _, w, _ in windows)


def test_step_one_is_the_newest_n_and_slides_every_turn(session_factory):
    tenant_id, user_id = _user(session_factory)
    windows = _turns(session_factory, tenant_id, user_id, 12, 6, 1)
    with session_scope(session_factory) as s:
        newest = [m.content for m in repo.recent_messages(s, tenant_id, user_id, 6)]
    assert windows[-1][1] == newest
    starts = [start for start, _, _ in windows]
    assert starts[3:] == [2 * n - 4 for n in range(3, 12)]  # full from the third exchange on: moves every turn


def test_the_window_counts_only_this_users_messages(session_factory):
    tenant_id, alice = _user(session_factory)
    other_tenant, mallory = _user(session_factory)
    with session_scope(session_factory) as s:
        bob = repo.create_user(s, tenant_id, "bob").id
    for n in range(7):
        for who, tenant in ((bob, tenant_id), (mallory, other_tenant), (alice, tenant_id)):
            with session_scope(session_factory) as s:
                record_exchange(s, tenant, who, f"{who} q{n}", f"{who} a{n}", 2)
    with session_scope(session_factory) as s:
        window = [m.content for m in history_window(s, tenant_id, alice, 8, 4)]
        assert history_window(s, other_tenant, alice, 8, 4) == []  # another tenant never sees alice's
    # 14 messages of alice's: the window starts at 8 (the smallest multiple of 4 leaving at most 8)
    assert window == [text for i in range(4, 7) for text in (f"{alice} q{i}", f"{alice} a{i}")]


def test_the_chat_context_uses_the_stepped_window(session_factory):
    tenant_id, user_id = _user(session_factory)
    _turns(session_factory, tenant_id, user_id, 9, 10, 4)  # 18 messages: the window starts at 8
    with session_scope(session_factory) as s:
        user = repo.get_user(s, tenant_id, user_id)
        stepped = load_chat_context(s, tenant_id, user, 10, 4)
        sliding = load_chat_context(s, tenant_id, user, 10)
    assert stepped.system_prompt == "Be brief."
    assert [t.content for t in stepped.history][0] == "question 4" and len(stepped.history) == 10
    assert [t.content for t in sliding.history][0] == "question 4"
    with session_scope(session_factory) as s:
        record_exchange(s, tenant_id, user_id, "question 9", "answer 9", 3)
    with session_scope(session_factory) as s:
        user = repo.get_user(s, tenant_id, user_id)
        assert load_chat_context(s, tenant_id, user, 10, 4).history[0].content == "question 6"  # 20: starts at 12
        assert load_chat_context(s, tenant_id, user, 10).history[0].content == "question 5"


def test_bad_window_sizes_are_refused(session_factory):
    tenant_id, user_id = _user(session_factory)
    with session_scope(session_factory) as s:
        for bad in ((0, 1), (5, 0), (-1, -1)):
            with pytest.raises(ValueError, match="max_messages and step_messages"):
                history_window(s, tenant_id, user_id, *bad)


@pytest.mark.parametrize("fraction,budget,messages,tokens,step", [
    (1 / 3, 1536, 100, 512, 32),  # the defaults
    (0.0, 1536, 100, None, 1),  # off: exact fit, and the newest N messages
    (0.25, 256, 6, 64, 2),
    (0.2, 64, 4, 13, 1),
])
def test_the_steps_follow_the_fraction_setting(fraction, budget, messages, tokens, step):
    settings = Settings(history_trim_step_fraction=fraction, history_token_budget=budget,
                        history_max_messages=messages)
    assert (settings.history_trim_step_tokens, settings.history_step_messages) == (tokens, step)


@pytest.mark.parametrize("bad", [1, 1.5, -0.1, "nan", "inf"])
def test_a_fraction_outside_zero_to_one_is_refused(bad):
    with pytest.raises(ValueError, match="history_trim_step_fraction"):
        Settings(history_trim_step_fraction=bad)
