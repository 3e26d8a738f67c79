"""The personalization loop's API on the embedded default (SQLite, local folder, the in-process
task queue with its training thread, the engine in-process) on the tiny test model: examples and
feedback, the training route's 422 naming every problem, the per-tenant job limit, cancellation,
the not-improved case, and a promoted version answering the next chat.

Trainings here are tiny (a handful of short examples, rows of at most 64 tokens, a 2-layer model)
so that each takes a second or two; the heartbeat runs every 0.1 s so that a cancellation lands at
once.
"""

from __future__ import annotations

import pytest
from fastapi.testclient import TestClient

from api.app import create_app
from support.platform_flows import OPERATOR_TOKEN, bearer, chat, create_key, create_tenant, create_user, messages
from support.training_flows import GREETING, add_examples, start_training, style_example, wait_for_job
from tenants import migrate
from tenants.training import jobs as training_jobs
from tenants.training.metrics import ADAPTERS, JOBS

from .conftest import embedded_settings


@pytest.fixture(scope="module")
def settings(tmp_path_factory, tiny_checkpoint):
    settings = embedded_settings(tmp_path_factory.mktemp("personalization"), tiny_checkpoint,
                                 training_heartbeat_s=0.1, training_stale_after_s=1.0, training_max_length=64,
                                 max_training_jobs_per_tenant=1, max_examples_per_user=12)
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    migrate.upgrade(settings.resolved_database_url)
    return settings


@pytest.fixture(scope="module")
def client(settings):
    with TestClient(create_app(settings)) as test_client:
        yield test_client


_tenants = iter(range(1000))


@pytest.fixture
def tenant(client) -> dict:
    """A fresh tenant with an admin key, a chat key and a user."""
    _t, admin = create_tenant(client, OPERATOR_TOKEN, f"personal-{next(_tenants)}")
    return {"admin": admin, "chat": create_key(client, admin, "chat"), "user": create_user(client, admin, "u")["id"]}


def _count(counter, **labels) -> float:
    return counter.labels(**labels)._value.get()


# --- examples and feedback ---------------------------------------------------------------------------


def test_examples_are_checked_paged_and_deleted(client, tenant):
    admin, user = tenant["admin"], tenant["user"]
    bad = {"messages": [{"role": "assistant", "content": "hi"}, {"role": "user", "content": " "},
                        {"role": "wizard", "content": "x" * 32_001}]}
    r = client.post(f"/v1/users/{user}/examples", json=bad, headers=bearer(admin))
    assert r.status_code == 422, r.text
    problems = " | ".join(r.json()["detail"])
    for expected in ("message 0 is an assistant turn where a user turn belongs", "message 1 content is empty",
                     "message 2 role must be one of", "message 2 content is 32001 characters",
                     "must end with an assistant turn"):
        assert expected in problems, problems
    r = client.post(f"/v1/users/{user}/examples", json={"messages": [{"role": "user", "content": 1}]},
                    headers=bearer(admin))
    assert r.status_code == 422 and r.json()["detail"][0]["loc"] == ["body", "messages", 0, "content"], r.text

    ids = add_examples(client, admin, user, 5)
    page = client.get(f"/v1/users/{user}/examples", params={"limit": 2, "offset": 1}, headers=bearer(admin)).json()
    assert [e["id"] for e in page["data"]] == ids[1:3] and page["total"] == 5
    assert page["data"][0]["source"] == "api" and page["data"][0]["message_id"] is None
    assert page["data"][0]["messages"] == style_example(1)["messages"]
    assert client.delete(f"/v1/users/{user}/examples/{ids[0]}", headers=bearer(admin)).status_code == 204
    assert client.delete(f"/v1/users/{user}/examples/{ids[0]}", headers=bearer(admin)).status_code == 404
    assert client.get(f"/v1/users/{user}/examples", headers=bearer(admin)).json()["total"] == 4
    assert client.post(f"/v1/users/{user}/examples", json=style_example(9), headers=bearer(tenant["chat"])).status_code == 403

    add_examples(client, admin, user, 8)  # 12, the limit of this app
    r = client.post(f"/v1/users/{user}/examples", json=style_example(99), headers=bearer(admin))
    assert r.status_code == 409 and "12" in r.json()["detail"], r.text


def test_feedback_makes_examples_from_the_conversation(client, tenant):
    key, user = tenant["chat"], tenant["user"]
    for question in ("What is one plus one?", "And two plus two?"):
        assert chat(client, key, user, question).status_code == 200
    history = messages(client, key, user)["data"]
    question, answer = history[2], history[3]

    def rate(message_id, **body):
        return client.post(f"/v1/users/{user}/messages/{message_id}/feedback", json=body, headers=bearer(key))

    r = rate(answer["id"], rating=1)
    assert r.status_code == 201, r.text
    approval = r.json()["example"]
    assert approval["source"] == "feedback" and approval["message_id"] == answer["id"]
    assert approval["messages"] == [{"role": m["role"], "content": m["content"]} for m in history]

    r = rate(answer["id"], rating=-1, correction="Four, of course.")
    assert r.status_code == 201 and r.json()["rating"] == -1, r.text
    corrected = r.json()["example"]["messages"]
    assert corrected[:3] == approval["messages"][:3] and corrected[3] == {"role": "assistant", "content": "Four, of course."}
    examples = client.get(f"/v1/users/{user}/examples", headers=bearer(tenant["admin"])).json()
    assert [e["id"] for e in examples["data"]] == [r.json()["example"]["id"]]  # the approval was replaced

    r = rate(answer["id"], rating=-1)
    assert r.status_code == 201 and r.json()["example"] is None, r.text  # recorded, not trained on
    assert client.get(f"/v1/users/{user}/examples", headers=bearer(tenant["admin"])).json()["total"] == 0

    r = rate(question["id"], rating=1, correction="no")
    assert r.status_code == 422, r.text
    assert len(r.json()["detail"]) == 2 and "only assistant answers" in r.json()["detail"][0]
    for body in ({"rating": 2}, {"rating": True}, {"rating": 1, "correction": 3}, {}):
        assert rate(answer["id"], **body).status_code == 422, body
    assert rate("0" * 32, rating=1).status_code == 404


# --- the training route --------------------------------------------------------------------------------


def test_training_refusals_name_every_problem(client, tenant):
    admin, user = tenant["admin"], tenant["user"]
    add_examples(client, admin, user, 2)
    r = start_training(client, admin, user, rank=100, epochs=0, learning_rate=0.5, target_modules=["lm_head"],
                       start_from="current")
    assert r.status_code == 422, r.text
    problems = " | ".join(r.json()["detail"])
    for expected in ("rank must be between 1 and 64, got 100", "epochs must be between 1 and 20, got 0",
                     "learning_rate must be in (0.0, 0.01], got 0.5", "target_modules ['lm_head'] are not adaptable",
                     "rank and target_modules cannot be chosen with start_from=current",
                     "no ready adapter to continue from", "the user has 2 training examples; at least 4"):
        assert expected in problems, problems
    assert len(r.json()["detail"]) == 7
    for body in ({"rank": "8"}, {"epochs": 1.5}, {"start_from": "latest"}, {"steps": 3}):
        assert start_training(client, admin, user, **body).status_code == 422, body
    assert start_training(client, tenant["chat"], user).status_code == 403
    assert start_training(client, admin, "0" * 32).status_code == 404
    assert client.get(f"/v1/users/{user}/adapter-trainings", headers=bearer(admin)).json()["data"] == []


def test_a_running_job_refuses_another_and_the_tenant_limit_is_429(client, tenant):
    """This app allows one queued or running job per tenant: a second user of the same tenant gets
    429 with Retry-After, another tenant's user is not counted against it; the same user gets the
    422 that names the running job. Cancelling the running job stores no adapter."""
    admin, user = tenant["admin"], tenant["user"]
    other = create_user(client, admin, "second")["id"]
    for uid in (user, other):
        add_examples(client, admin, uid, 10)
    cancelled_before = _count(JOBS, status="cancelled")
    r = start_training(client, admin, user, epochs=20)
    assert r.status_code == 202 and r.json()["status"] == "queued", r.text
    job = r.json()
    assert job["parameters"] == {"start_from": "fresh", "epochs": 20, "learning_rate": 0.002, "batch_size": 2,
                                 "seed": 0, "rank": 8, "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj"]}
    running = wait_for_job(client, admin, job["id"], until=lambda j: j["progress"]["step"] >= 1)
    assert running["status"] == "running" and running["progress"]["total_steps"] == 80, running
    assert running["train_loss"] is not None and running["example_count"] == 10

    r = start_training(client, admin, user, rank=4)
    assert r.status_code == 422 and f"training job {job['id']} is already running" in r.json()["detail"][0], r.text
    r = start_training(client, admin, other)
    assert r.status_code == 429 and r.headers["Retry-After"] == "30", r.text
    elsewhere = create_tenant(client, OPERATOR_TOKEN, "personal-elsewhere")[1]
    elsewhere_user = create_user(client, elsewhere, "u")["id"]
    add_examples(client, elsewhere, elsewhere_user, 4)
    queued = start_training(client, elsewhere, elsewhere_user)
    assert queued.status_code == 202, queued.text  # queued behind the running one (one training thread)

    r = client.delete(f"/v1/adapter-trainings/{job['id']}", headers=bearer(admin))
    assert r.status_code == 202 and r.json()["cancel_requested"] is True, r.text
    ended = wait_for_job(client, admin, job["id"])
    assert ended["status"] == "cancelled" and ended["adapter_id"] is None and not ended["promoted"], ended
    assert ended["result"].startswith("cancelled after ") and ended["finished_at"] is not None
    assert client.get("/v1/adapters", params={"user_id": user}, headers=bearer(admin)).json()["data"] == []
    assert client.get(f"/v1/users/{user}", headers=bearer(admin)).json()["current_adapter_id"] is None
    assert client.delete(f"/v1/adapter-trainings/{job['id']}", headers=bearer(admin)).status_code == 200
    assert _count(JOBS, status="cancelled") == cancelled_before + 1

    queued_id = queued.json()["id"]  # cancelled before it started: at once, 200
    r = client.delete(f"/v1/adapter-trainings/{queued_id}", headers=bearer(elsewhere))
    if r.json()["status"] == "cancelled":
        assert r.status_code == 200 and r.json()["result"] == "cancelled before it started", r.text
    finished = wait_for_job(client, elsewhere, queued_id)
    assert finished["status"] == "cancelled" and finished["adapter_id"] is None, finished


def test_a_trained_version_is_promoted_and_answers_the_next_chat(client, tenant):
    admin, key, user = tenant["admin"], tenant["chat"], tenant["user"]
    add_examples(client, admin, user, 6)
    before = chat(client, key, user, "Tell me fact number 40.")
    assert before.json()["adapter_id"] is None and before.json()["adapter_version"] is None
    promoted_before = _count(ADAPTERS, outcome="promoted")
    r = start_training(client, admin, user, epochs=4, learning_rate=0.01)
    assert r.status_code == 202, r.text
    job = wait_for_job(client, admin, r.json()["id"])
    assert job["status"] == "succeeded" and job["promoted"] is True and job["error"] is None, job
    assert job["eval_loss_after"] < job["eval_loss_before"] and job["progress"]["step"] == job["progress"]["total_steps"]
    assert job["example_count"] == 6 and job["started_at"] <= job["finished_at"]
    adapter = client.get(f"/v1/adapters/{job['adapter_id']}", headers=bearer(admin)).json()
    assert adapter["status"] == "ready" and adapter["version"] == 1 and adapter["user_id"] == user
    assert adapter["name"] == f"user-{user}" and adapter["rank"] == 8
    assert adapter["provenance"]["training_job_id"] == job["id"] and adapter["provenance"]["example_count"] == 6
    assert adapter["provenance"]["eval_loss_after"] == job["eval_loss_after"]
    assert client.get(f"/v1/users/{user}", headers=bearer(admin)).json()["current_adapter_id"] == adapter["id"]
    assert _count(ADAPTERS, outcome="promoted") == promoted_before + 1

    after = chat(client, key, user, "Tell me fact number 40.")
    assert after.status_code == 200 and after.json()["adapter_id"] == adapter["id"], after.text
    assert after.json()["adapter_version"] == 1
    stored = messages(client, key, user)["data"]
    assert [m["adapter_id"] for m in stored] == [None, None, None, adapter["id"]]

    # continuing the current adapter: a second version under the same name, from the first one's loss
    r = start_training(client, admin, user, start_from="current", epochs=1, learning_rate=0.01)
    assert r.status_code == 202, r.text
    second = wait_for_job(client, admin, r.json()["id"])
    assert second["status"] == "succeeded", second
    assert second["parameters"]["start_adapter_id"] == adapter["id"] and "rank" not in second["parameters"]
    if second["promoted"]:
        v2 = client.get(f"/v1/adapters/{second['adapter_id']}", headers=bearer(admin)).json()
        assert (v2["name"], v2["version"], v2["provenance"]["started_from"]) == (adapter["name"], 2, "adapter")
        assert second["eval_loss_before"] == pytest.approx(job["eval_loss_after"], rel=1e-4)
    jobs = client.get(f"/v1/users/{user}/adapter-trainings", headers=bearer(admin)).json()["data"]
    assert [j["id"] for j in jobs] == [second["id"], job["id"]]  # newest first
    assert client.delete(f"/v1/adapter-trainings/{job['id']}", headers=bearer(admin)).status_code == 409


def test_a_training_that_does_not_improve_stores_nothing(client, tenant, monkeypatch):
    """The promotion rule: an evaluation loss that did not fall leaves the user's adapter as it was
    and stores no version; the job succeeds and says why. (The trainer's report is made worse
    here: a real run on this data always improves.)"""
    admin, user = tenant["admin"], tenant["user"]
    add_examples(client, admin, user, 4)
    real = training_jobs.train_lora

    def no_better(*args, **kwargs):
        result = real(*args, **kwargs)
        result.eval_loss_after = result.eval_loss_before
        return result

    monkeypatch.setattr(training_jobs, "train_lora", no_better)
    before = _count(ADAPTERS, outcome="not_improved")
    job = wait_for_job(client, admin, start_training(client, admin, user, epochs=1).json()["id"])
    assert job["status"] == "succeeded" and job["promoted"] is False and job["adapter_id"] is None, job
    assert "did not fall" in job["result"] and job["eval_loss_after"] == job["eval_loss_before"]
    assert client.get("/v1/adapters", params={"user_id": user}, headers=bearer(admin)).json()["data"] == []
    assert client.get(f"/v1/users/{user}", headers=bearer(admin)).json()["current_adapter_id"] is None
    assert _count(ADAPTERS, outcome="not_improved") == before + 1


def test_examples_that_cannot_be_trained_fail_the_job_with_the_reason(client, tenant):
    """Four examples are enough to start, but not when truncation leaves fewer usable ones: the job
    fails naming the dropped examples, and stores nothing."""
    admin, user = tenant["admin"], tenant["user"]
    add_examples(client, admin, user, 3)
    long_answer = {"messages": [{"role": "user", "content": "Talk."}, {"role": "assistant", "content": "word " * 200}]}
    assert client.post(f"/v1/users/{user}/examples", json=long_answer, headers=bearer(admin)).status_code == 201
    job = wait_for_job(client, admin, start_training(client, admin, user).json()["id"])
    assert job["status"] == "failed" and "3 usable examples; at least 4 are needed" in job["error"], job
    assert client.get("/v1/adapters", params={"user_id": user}, headers=bearer(admin)).json()["data"] == []
