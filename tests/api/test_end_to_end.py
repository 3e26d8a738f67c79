"""The whole product, end to end, in both shapes it ships in:

* the embedded default: one uvicorn process, SQLite, a local folder, in-process tasks and engine;
* the services: the api (uvicorn) talking to real PostgreSQL (pgserver), real S3 (SeaweedFS), a
  real Celery worker over real Redis, and ``tailor serve inference`` as a separate process.

The operator creates two tenants; tenant A uploads a PEFT adapter for a user; it turns ready; the
user's chat is answered through the adapter (tokens differ from the base model's for the same
history); the history grows; a streamed reply arrives as SSE; tenant B sees none of it; the
``openai`` client works against /v1/chat/completions. In the services shape the inference service
is then killed: chat answers 503 with Retry-After and nothing is stored; once it is restarted
the api serves again without being touched.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
from openai import OpenAI

from api.app import create_app
from support.live_server import serve_app
from support.platform_flows import (
    OPERATOR_TOKEN,
    adapter_files,
    bearer,
    chat,
    create_key,
    create_tenant,
    create_user,
    messages,
    parse_sse,
    upload_adapter,
    wait_for_status,
    write_adapter,
)
from support.service_fixtures import free_ports, log_tail, stop_process, wait_until
from tenants import migrate
from tenants.settings import Settings

INFERENCE_SECRET = "e2e-inference-secret-0123456789"
REPO_ROOT = Path(__file__).resolve().parents[2]


def run_product_flow(base_url: str, model_config, workdir: Path) -> dict:
    """The end-to-end scenario against a running api; returns ids for follow-up checks."""
    with httpx.Client(base_url=base_url, timeout=120) as client:
        _ta, admin_a = create_tenant(client, OPERATOR_TOKEN, "e2e-tenant-a", system_prompt="Answer briefly.")
        _tb, admin_b = create_tenant(client, OPERATOR_TOKEN, "e2e-tenant-b")
        chat_a, chat_b = create_key(client, admin_a, "chat"), create_key(client, admin_b, "chat")
        alice, bob = create_user(client, admin_a, "alice@a"), create_user(client, admin_a, "bob@a")

        adapter_dir = write_adapter(workdir / "alice-adapter", model_config, seed=11)
        r = upload_adapter(client, admin_a, "alice-style", adapter_files(adapter_dir), user_id=alice["id"])
        assert r.status_code == 202 and r.json()["status"] == "pending", r.text
        adapter = wait_for_status(client, admin_a, r.json()["id"], timeout_s=120)
        assert adapter["status"] == "ready", adapter
        assert client.get(f"/v1/users/{alice['id']}", headers=bearer(admin_a)).json()["current_adapter_id"] == adapter["id"]

        personal = chat(client, chat_a, alice["id"], "Write one line about the sea")
        base = chat(client, chat_a, bob["id"], "Write one line about the sea")
        assert personal.status_code == 200 and base.status_code == 200, (personal.text, base.text)
        assert personal.json()["adapter_id"] == adapter["id"] and base.json()["adapter_id"] is None
        assert personal.json()["message"]["content"] != base.json()["message"]["content"]

        follow_up = chat(client, chat_a, alice["id"], "Another one")
        assert follow_up.status_code == 200 and follow_up.json()["history_messages_used"] == 3
        streamed = chat(client, chat_a, alice["id"], "And a last one", stream=True)
        events = parse_sse(streamed.text)
        assert [e for e, _ in events][0] == "start" and events[-1][0] == "done", events
        assert "".join(d["text"] for e, d in events if e == "delta") == events[-1][1]["message"]["content"]
        history = messages(client, chat_a, alice["id"])["data"]
        assert [m["role"] for m in history] == ["user", "assistant"] * 3

        # tenant B sees nothing of tenant A
        assert client.get(f"/v1/users/{alice['id']}", headers=bearer(admin_b)).status_code == 404
        assert client.get(f"/v1/adapters/{adapter['id']}", headers=bearer(admin_b)).status_code == 404
        assert client.get("/v1/adapters", headers=bearer(admin_b)).json()["data"] == []
        assert client.get(f"/v1/users/{alice['id']}/messages", headers=bearer(chat_b)).status_code == 404
        assert chat(client, chat_b, alice["id"], "hi").status_code == 404
        openai_b = OpenAI(base_url=f"{base_url}/v1", api_key=chat_b, max_retries=0)
        assert [m.id for m in openai_b.models.list().data] == ["base"]

    # the standard openai client
    openai_a = OpenAI(base_url=f"{base_url}/v1", api_key=chat_a, max_retries=0)
    assert {m.id for m in openai_a.models.list().data} == {"base", "alice-style"}
    prompt = [{"role": "user", "content": "Name a colour"}]
    base_reply = openai_a.chat.completions.create(model="base", messages=prompt, max_tokens=8, temperature=0)
    tuned = openai_a.chat.completions.create(model="alice-style", messages=prompt, max_tokens=8, temperature=0)
    assert base_reply.choices[0].message.content != tuned.choices[0].message.content
    assert tuned.usage.completion_tokens >= 1 and tuned.choices[0].finish_reason in ("stop", "length")
    chunks = openai_a.chat.completions.create(model="alice-style", messages=prompt, max_tokens=8, temperature=0, stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == tuned.choices[0].message.content
    return {"chat_key": chat_a, "alice": alice["id"]}


def test_embedded_default_end_to_end(tmp_path, tiny_checkpoint, tiny_model_config):
    settings = Settings(data_dir=tmp_path / "var", model=str(tiny_checkpoint), operator_token=OPERATOR_TOKEN,
                        pool_bytes=32 << 20, default_max_tokens=8, max_tokens_limit=64)
    settings.data_dir.mkdir()
    migrate.upgrade(settings.resolved_database_url)
    with serve_app(create_app(settings)) as base_url:
        run_product_flow(base_url, tiny_model_config, tmp_path)


def _start_inference(env: dict[str, str], port: int, log: Path) -> subprocess.Popen:
    with open(log, "wb") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", "api.cli", "serve", "inference", "--port", str(port)],
            env={**os.environ, **env, "PYTHONUNBUFFERED": "1"}, cwd=REPO_ROOT, stdout=out, stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    def ready() -> bool:
        try:
            return httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=1).status_code == 200
        except httpx.HTTPError:
            return False

    wait_until(ready, 120, process, "the inference service", log)
    return process


@pytest.mark.timeout(600)
def test_services_end_to_end(tmp_path, tiny_checkpoint, tiny_model_config, postgres_url, seaweedfs, s3_bucket,
                             redis_url, start_worker):
    (inference_port,) = free_ports(1)
    env = {
        "TAILOR_MODE": "development",
        "TAILOR_DATABASE_URL": postgres_url,
        "TAILOR_OBJECT_STORE": "s3",
        "TAILOR_S3_ENDPOINT_URL": seaweedfs.endpoint_url,
        "TAILOR_S3_BUCKET": s3_bucket,
        "TAILOR_S3_REGION": seaweedfs.region,
        "TAILOR_S3_ACCESS_KEY_ID": seaweedfs.access_key_id,
        "TAILOR_S3_SECRET_ACCESS_KEY": seaweedfs.secret_access_key,
        "TAILOR_TASK_MODE": "celery",
        "TAILOR_REDIS_URL": redis_url,
        "TAILOR_INFERENCE_MODE": "remote",
        "TAILOR_INFERENCE_URL": f"http://127.0.0.1:{inference_port}",
        "TAILOR_INFERENCE_SECRET": INFERENCE_SECRET,
        "TAILOR_MODEL": str(tiny_checkpoint),
        "TAILOR_POOL_BYTES": str(32 << 20),
        "TAILOR_OPERATOR_TOKEN": OPERATOR_TOKEN,
        "TAILOR_DEFAULT_MAX_TOKENS": "8",
        "TAILOR_MAX_TOKENS_LIMIT": "64",
        "TAILOR_DATA_DIR": str(tmp_path / "var"),
    }
    migrate.upgrade(postgres_url)
    log = tmp_path / "inference.log"
    inference = _start_inference(env, inference_port, log)
    try:
        settings = Settings(**{k[len("TAILOR_"):].lower(): v for k, v in env.items()})
        settings.check_for("api")
        with start_worker(env) as worker, serve_app(create_app(settings)) as base_url:
            ids = run_product_flow(base_url, tiny_model_config, tmp_path)
            assert 'tailor_worker_validations_total{outcome="ready"}' in worker.metrics()

            # inference killed: 503 JSON with Retry-After on every generation route, nothing stored
            inference.kill()
            inference.wait(10)
            with httpx.Client(base_url=base_url, timeout=30) as client:
                before = messages(client, ids["chat_key"], ids["alice"])["data"]
                for r in (chat(client, ids["chat_key"], ids["alice"], "are you there?"),
                          chat(client, ids["chat_key"], ids["alice"], "are you there?", stream=True),
                          client.post("/v1/chat/completions", headers=bearer(ids["chat_key"]),
                                      json={"model": "base", "messages": [{"role": "user", "content": "hi"}]})):
                    assert r.status_code == 503 and int(r.headers["Retry-After"]) > 0, r.text
                    assert r.headers["content-type"].startswith("application/json")
                assert messages(client, ids["chat_key"], ids["alice"])["data"] == before
                ready = client.get("/readyz")
                assert ready.status_code == 503 and ready.json()["inference"] == "unavailable"

                # restarted on the same address: the api recovers by itself
                inference = _start_inference(env, inference_port, log)
                assert client.get("/readyz").status_code == 200
                r = chat(client, ids["chat_key"], ids["alice"], "are you back?")
                assert r.status_code == 200, r.text
                assert len(messages(client, ids["chat_key"], ids["alice"])["data"]) == len(before) + 2
    except BaseException:
        print(f"--- inference log ---\n{log_tail(log)}")
        raise
    finally:
        stop_process(inference)
