"""First-token deadlines through HTTP, in both shapes of the platform: the api with the engine in
process (embedded) and the api talking to the inference service (remote), each served by uvicorn
on the tiny test model.

The early-abort path is made deterministic by a real overload: a long OpenAI-compatible stream
(no deadline, a prompt of about 1,800 tokens) runs first, so the engine has measured its prefill
rate, and while it is still generating, a request with a prompt of about 1,500 tokens and a
deadline of 1 ms arrives: the engine predicts that its own prefill alone takes longer than that
(at any rate below 1.5 million tokens/s) and refuses it from the queue. The api answers 503 with
``Retry-After`` (whole seconds) before any byte of a 200, streamed or not, on the per-user chat
(the request's ``ttft_slo_s``) and on the OpenAI-compatible route (the tenant's default); nothing
is stored, the long stream runs to its end, and the refusal is counted (the inference metrics'
``finish_reason="deadline"``, the engine's per-tenant early aborts, the api's rejections).

The effective SLO (the request's, else the tenant's, else ``TAILOR_TTFT_SLO_S``) is checked on
what reaches the engine, through a ``RecordingInference``.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from dataclasses import dataclass

import httpx
import pytest
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families
from pydantic import SecretStr

from api.app import create_app
from inference import LLM
from inference.service.app import create_inference_app
from inference.service.core import InferenceCore
from support.live_server import serve_app
from support.platform_flows import OPERATOR_TOKEN, bearer, create_key, create_tenant, create_user, parse_sse
from support.recording_inference import RecordingInference
from tenants import migrate
from tenants.platform import Platform

from .conftest import embedded_settings

SECRET = "deadline-inference-secret-0123456789"
UNMEETABLE_SLO_S = 0.001  # far below the predicted prefill of LONG_WORDS tokens
GENEROUS_SLO_S = 600.0
LONG_WORDS = 1500  # about one token each
MAX_TOKENS = 8
pytestmark = pytest.mark.timeout(300)


@pytest.fixture(scope="module")
def settings(tmp_path_factory, tiny_checkpoint):
    """The embedded default with room for long chat prompts."""
    settings = embedded_settings(tmp_path_factory.mktemp("deadline-data"), tiny_checkpoint,
                                 history_token_budget=1900, default_max_tokens=MAX_TOKENS)
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    migrate.upgrade(settings.resolved_database_url)
    return settings


@pytest.fixture(scope="module")
def platform(settings):
    platform = Platform.from_settings(settings)
    yield platform
    platform.close()


@pytest.fixture(scope="module")
def core(settings, platform):
    core = InferenceCore(LLM(settings.model, adapter_store=platform.store, **settings.engine_options()))
    yield core
    core.close()


@dataclass
class Shape:
    mode: str
    api_url: str
    inference_metrics_url: str  # where the inference metrics are scraped in this shape


@pytest.fixture(scope="module", params=["embedded", "remote"])
def shape(request, settings, platform, core) -> Iterator[Shape]:
    if request.param == "embedded":
        with serve_app(create_app(settings, inference=core, platform=platform)) as url:
            yield Shape("embedded", url, f"{url}/metrics")
        return
    with serve_app(create_inference_app(core, SECRET)) as inference_url:
        remote = settings.model_copy(update={"inference_mode": "remote", "inference_url": inference_url,
                                             "inference_secret": SecretStr(SECRET)})
        with serve_app(create_app(remote, platform=platform)) as url:  # the api makes its RemoteInference
            yield Shape("remote", url, f"{inference_url}/metrics")


@pytest.fixture
def client(shape) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=shape.api_url, timeout=120) as client:
        yield client


@dataclass
class Tenant:
    id: str
    admin: str
    chat: str
    user_id: str


@pytest.fixture
def tenant(client) -> Tenant:
    created, admin = create_tenant(client, OPERATOR_TOKEN, f"deadline-{uuid.uuid4().hex[:12]}")
    return Tenant(created["id"], admin, create_key(client, admin, "chat"), create_user(client, admin, "u")["id"])


# --------------------------------------------------------------------------- helpers
def long_text(words: int = LONG_WORDS) -> str:
    """A prompt of about ``words`` tokens that no earlier request began with (no prefix-cache hit)."""
    return uuid.uuid4().hex + " " + "word " * words


def _metrics(url: str) -> dict[tuple[str, tuple], float]:
    """{(sample name, sorted labels): value} of one scrape."""
    text = httpx.get(url, timeout=30).text
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def _value(scrape: dict, name: str, **labels) -> float:
    return scrape.get((name, tuple(sorted(labels.items()))), 0.0)


def _counts(shape: Shape, tenant: Tenant) -> tuple[float, float, float]:
    """(finished with reason deadline, the tenant's early aborts, the api's deadline rejections)."""
    inference = _metrics(shape.inference_metrics_url)
    api = inference if shape.mode == "embedded" else _metrics(f"{shape.api_url}/metrics")
    return (_value(inference, "tailor_inference_requests_finished_total", finish_reason="deadline"),
            _value(inference, "tailor_slo_early_aborts_total", tenant=tenant.id),
            _value(api, "tailor_rejected_requests_total", service="api", reason="deadline"))


class LongStream:
    """A long OpenAI-compatible stream of another tenant, without a deadline: it is read up to its
    first text (the engine has prefilled its long prompt, so it knows its prefill rate), left
    generating meanwhile, and read to its end afterwards."""

    def __init__(self, client: httpx.Client, key: str):
        body = {"model": "base", "messages": [{"role": "user", "content": long_text(1800)}], "stream": True,
                "max_tokens": 24, "temperature": 1.0, "seed": 7}
        self._context = client.stream("POST", "/v1/chat/completions", json=body, headers=bearer(key))
        self.response = self._context.__enter__()
        assert self.response.status_code == 200, self.response.read()
        self._lines = self.response.iter_lines()
        for line in self._lines:
            if line.startswith("data: ") and '"content": "' in line and '"content": ""' not in line:
                break

    def finish(self) -> list[str]:
        """The rest of the stream; closes it."""
        try:
            return [line for line in self._lines if line.startswith("data: ")]
        finally:
            self._context.__exit__(None, None, None)


@pytest.fixture
def long_stream(client) -> Iterator[LongStream]:
    _created, admin = create_tenant(client, OPERATOR_TOKEN, f"deadline-load-{uuid.uuid4().hex[:12]}")
    stream = LongStream(client, create_key(client, admin, "chat"))
    yield stream
    rest = stream.finish()
    assert rest[-1] == "data: [DONE]", rest[-3:]
    finish = json.loads(rest[-2][len("data: "):])["choices"][0]["finish_reason"]
    assert finish in ("length", "stop"), rest[-2]  # the refusals beside it did not disturb it


def assert_deadline_refusal(response: httpx.Response) -> None:
    """503, ``Retry-After`` in whole seconds (>= 1), the api's JSON error saying why."""
    assert response.status_code == 503, response.text[:500]
    assert response.headers["content-type"].startswith("application/json"), response.headers
    retry_after = response.headers["Retry-After"]
    assert retry_after.isdigit() and int(retry_after) >= 1, retry_after
    detail = response.json()["detail"]
    assert isinstance(detail, str) and "deadline" in detail, detail


# --------------------------------------------------------------------------- early abort
@pytest.mark.parametrize("stream", [False, True], ids=["json", "sse"])
def test_a_chat_that_cannot_meet_its_deadline_is_503_with_retry_after(shape, client, tenant, long_stream, stream):
    before = _counts(shape, tenant)
    body = {"message": long_text(), "max_tokens": MAX_TOKENS, "stream": stream, "ttft_slo_s": UNMEETABLE_SLO_S}
    r = client.post(f"/v1/users/{tenant.user_id}/chat", json=body, headers=bearer(tenant.chat))
    assert_deadline_refusal(r)
    history = client.get(f"/v1/users/{tenant.user_id}/messages", headers=bearer(tenant.chat))
    assert history.status_code == 200 and history.json()["data"] == [], history.text  # nothing stored
    after = _counts(shape, tenant)
    assert (after[0] - before[0], after[1] - before[1], after[2] - before[2]) == (1, 1, 1), (before, after)


@pytest.mark.parametrize("stream", [False, True], ids=["json", "sse"])
def test_a_completion_under_the_tenants_unmeetable_slo_is_503_with_retry_after(shape, client, tenant, long_stream,
                                                                                stream):
    r = client.patch("/v1/tenant", json={"ttft_slo_s": UNMEETABLE_SLO_S}, headers=bearer(tenant.admin))
    assert r.status_code == 200, r.text
    before = _counts(shape, tenant)
    body = {"model": "base", "messages": [{"role": "user", "content": long_text()}], "max_tokens": MAX_TOKENS,
            "stream": stream}
    r = client.post("/v1/chat/completions", json=body, headers=bearer(tenant.chat))
    assert_deadline_refusal(r)
    after = _counts(shape, tenant)
    assert (after[0] - before[0], after[1] - before[1], after[2] - before[2]) == (1, 1, 1), (before, after)


def test_deadlines_that_can_be_met_answer_as_before(shape, client, tenant):
    """The same long prompts with a generous deadline (the request's, then the tenant's): 200, the
    SSE frames and the OpenAI chunks as without a deadline, and the first token counted as on
    time for the tenant."""
    slo_before = _metrics(shape.inference_metrics_url)
    for stream in (False, True):
        body = {"message": long_text(), "max_tokens": MAX_TOKENS, "stream": stream, "ttft_slo_s": GENEROUS_SLO_S}
        r = client.post(f"/v1/users/{tenant.user_id}/chat", json=body, headers=bearer(tenant.chat))
        assert r.status_code == 200, r.text[:500]
        if stream:
            events = parse_sse(r.text)
            assert [kind for kind, _ in events][0] == "start" and events[-1][0] == "done", events
            deltas = "".join(data["text"] for kind, data in events if kind == "delta")
            assert deltas == events[-1][1]["message"]["content"]
        else:
            assert r.json()["finish_reason"] in ("length", "stop") and r.json()["message"]["content"]
    assert len(client.get(f"/v1/users/{tenant.user_id}/messages", headers=bearer(tenant.chat)).json()["data"]) == 4
    assert client.patch("/v1/tenant", json={"ttft_slo_s": GENEROUS_SLO_S},
                        headers=bearer(tenant.admin)).status_code == 200
    body = {"model": "base", "messages": [{"role": "user", "content": long_text()}], "max_tokens": MAX_TOKENS,
            "stream": True}
    r = client.post("/v1/chat/completions", json=body, headers=bearer(tenant.chat))
    assert r.status_code == 200, r.text[:500]
    lines = [line for line in r.text.splitlines() if line.startswith("data: ")]
    assert lines[-1] == "data: [DONE]" and json.loads(lines[-2][6:])["choices"][0]["finish_reason"] in ("length", "stop")
    after = _metrics(shape.inference_metrics_url)
    attained = (_value(after, "tailor_slo_ttft_attained_total", tenant=tenant.id)
                - _value(slo_before, "tailor_slo_ttft_attained_total", tenant=tenant.id))
    assert attained == 3
    assert _value(after, "tailor_slo_early_aborts_total", tenant=tenant.id) == 0


# --------------------------------------------------------------------------- which SLO applies
def test_the_request_then_the_tenant_then_the_setting_decide_the_slo(settings, platform, core):
    """``ttft_slo_s`` of a chat request wins; without it the tenant's default, without that
    ``TAILOR_TTFT_SLO_S``; the OpenAI-compatible route has no request field. What reached the
    engine's request is checked, too."""
    recorder = RecordingInference(core)
    with_default = settings.model_copy(update={"ttft_slo_s": 900.0})
    with TestClient(create_app(with_default, inference=recorder, platform=platform)) as client:
        created, admin = create_tenant(client, OPERATOR_TOKEN, f"slo-order-{uuid.uuid4().hex[:12]}")
        chat_key, user_id = create_key(client, admin, "chat"), create_user(client, admin, "u")["id"]

        def slos(request_slo: float | None) -> tuple[list, list]:
            mark = recorder.mark()
            body = {"message": "hi", "max_tokens": 2, **({"ttft_slo_s": request_slo} if request_slo else {})}
            assert client.post(f"/v1/users/{user_id}/chat", json=body, headers=bearer(chat_key)).status_code == 200
            r = client.post("/v1/chat/completions", headers=bearer(chat_key), json={
                "model": "base", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2})
            assert r.status_code == 200, r.text
            requests, prompts = recorder.since(mark)
            return [q.ttft_slo_s for q in requests], [p.ttft_slo_s for p in prompts]

        assert slos(None) == ([900.0, 900.0], [900.0, 900.0])  # the setting
        assert slos(30.0) == ([30.0, 900.0], [30.0, 900.0])  # the request's, on the chat route
        assert client.patch("/v1/tenant", json={"ttft_slo_s": 120.0}, headers=bearer(admin)).status_code == 200
        assert slos(None) == ([120.0, 120.0], [120.0, 120.0])  # the tenant's
        assert slos(30.0) == ([30.0, 120.0], [30.0, 120.0])  # the request's beats the tenant's
        assert client.patch(f"/v1/tenants/{created['id']}", json={"ttft_slo_s": None},
                            headers=bearer(OPERATOR_TOKEN)).status_code == 200
        assert slos(None) == ([900.0, 900.0], [900.0, 900.0])  # the setting again
    with TestClient(create_app(settings, inference=recorder, platform=platform)) as client:  # no setting
        mark = recorder.mark()
        r = client.post(f"/v1/users/{user_id}/chat", json={"message": "hi", "max_tokens": 2}, headers=bearer(chat_key))
        assert r.status_code == 200, r.text
        assert [q.ttft_slo_s for q in recorder.since(mark)[0]] == [None]
