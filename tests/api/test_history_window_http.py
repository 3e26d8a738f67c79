"""The stepped history window through the api (embedded, tiny model, a recording backend): the chat
route loads the database window in steps and sends the token step, the OpenAI-compatible route
sends the step too, and over a long conversation most turns' prompts extend the previous turn's
exactly (what the prefix cache reuses), where a sliding window would extend almost none."""

from __future__ import annotations

import pytest
from fastapi.testclient import TestClient

from api.app import create_app
from inference import LLM
from inference.service.core import InferenceCore
from support.platform_flows import OPERATOR_TOKEN, bearer, chat, create_key, create_tenant, create_user
from support.recording_inference import RecordingInference
from tenants import migrate
from tenants.platform import Platform

from .conftest import embedded_settings

TOPICS = ("atlases", "dictionaries", "maps of the old harbour", "the rare book room", "opening hours",
          "the reading lamps", "lost library cards", "the quiet floor")


def _app(tmp_path_factory, tiny_checkpoint, fraction: float):
    settings = embedded_settings(tmp_path_factory.mktemp("window"), tiny_checkpoint, history_max_messages=20,
                                 history_trim_step_fraction=fraction)
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    migrate.upgrade(settings.resolved_database_url)
    platform = Platform.from_settings(settings)
    core = InferenceCore(LLM(settings.model, adapter_store=platform.store, **settings.engine_options()))
    return settings, platform, core


@pytest.mark.parametrize("fraction", [0.5, 0.0])
def test_a_long_conversation_keeps_its_prompt_prefix(tmp_path_factory, tiny_checkpoint, fraction):
    settings, platform, core = _app(tmp_path_factory, tiny_checkpoint, fraction)
    recorder = RecordingInference(core)
    try:
        with TestClient(create_app(settings, inference=recorder, platform=platform)) as client:
            _tenant, admin = create_tenant(client, OPERATOR_TOKEN, f"window-{fraction}",
                                           system_prompt="You are the librarian.")
            key, user = create_key(client, admin, "chat"), create_user(client, admin, "reader")["id"]
            mark = recorder.mark()
            for n in range(20):
                message = f"Turn {n}: where do I find {TOPICS[n % len(TOPICS)]} and who looks after them?"
                assert chat(client, key, user, message, max_tokens=4).status_code == 200
            requests, prompts = recorder.since(mark)
            r = client.post("/v1/chat/completions", headers=bearer(key),
                            json={"model": "base", "max_tokens": 4, "messages": [{"role": "user", "content": "hi"}]})
            assert r.status_code == 200, r.text
            openai_request = recorder.requests[-1]
    finally:
        core.close()
        platform.close()

    step = settings.history_trim_step_tokens
    assert step == (128 if fraction else None)  # half of the 256-token budget of the api tests
    assert all(req.history_trim_step_tokens == step for req in [*requests, openai_request])
    assert len(prompts) == 20 and all(len(p.token_ids) <= settings.history_token_budget for p in prompts)
    # the database window: at most 20 messages, starting at a multiple of the message step
    message_step = settings.history_step_messages
    assert message_step == (10 if fraction else 1)
    for n, req in enumerate(requests):
        history = len(req.messages) - 1
        stored = 2 * n
        assert history <= 20 and (stored - history) % message_step == 0
        assert req.messages[-1].content.startswith(f"Turn {n}:")
    extends = [b.token_ids[:len(a.token_ids)] == a.token_ids for a, b in zip(prompts, prompts[1:])]
    later = extends[7:]  # the window is full from about the seventh turn on
    if fraction:  # 8 of 12: the token window jumps every few turns, and the database window at turns 11 and 16
        assert sum(later) >= 0.5 * len(later), extends
    else:
        assert sum(later) <= 0.2 * len(later), extends
