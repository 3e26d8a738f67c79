"""Client-side steps of the platform's flows, shared by the embedded and the multi-service tests.

Every function takes an ``httpx.Client`` (FastAPI's TestClient is one) pointed at the api.
"""

from __future__ import annotations

import gzip
import io
import json
import tarfile
import time
import zipfile
from pathlib import Path

import httpx

from benchmarks.synthetic_adapters import synthetic_adapter

OPERATOR_TOKEN = "op-test-token-0123456789abcdef"


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def create_tenant(client: httpx.Client, operator_token: str, name: str, **extra) -> tuple[dict, str]:
    """(tenant, its first admin key)."""
    r = client.post("/v1/tenants", json={"name": name, **extra}, headers=bearer(operator_token))
    assert r.status_code == 201, r.text
    body = r.json()
    return body, body["api_key"]


def create_key(client: httpx.Client, admin_key: str, scope: str) -> str:
    r = client.post("/v1/api-keys", json={"scope": scope}, headers=bearer(admin_key))
    assert r.status_code == 201, r.text
    return r.json()["api_key"]


def create_user(client: httpx.Client, admin_key: str, external_id: str) -> dict:
    r = client.post("/v1/users", json={"external_id": external_id}, headers=bearer(admin_key))
    assert r.status_code == 201, r.text
    return r.json()


def write_adapter(out_dir: Path, model_config, *, seed: int, r: int = 4, std: float = 0.3,
                  targets=("q_proj", "v_proj", "down_proj")) -> Path:
    """A random PEFT adapter strong enough to change greedy tokens of the tiny model."""
    return synthetic_adapter(out_dir, model_config, r=r, targets=targets, alpha=2 * r, seed=seed, std=std)


def adapter_files(adapter_dir: Path) -> list[tuple[str, tuple[str, bytes, str]]]:
    """Multipart ``files`` parts for the two PEFT files of ``adapter_dir``."""
    return [
        ("files", ("adapter_config.json", (adapter_dir / "adapter_config.json").read_bytes(), "application/json")),
        ("files", ("adapter_model.safetensors", (adapter_dir / "adapter_model.safetensors").read_bytes(),
                   "application/octet-stream")),
    ]


def zip_bytes(members: dict[str, bytes], compression: int = zipfile.ZIP_STORED) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression=compression) as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    return buffer.getvalue()


def tar_bytes(members: dict[str, bytes]) -> bytes:
    """An uncompressed tar of ``members``."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tf:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


def tar_gz_bytes(members: dict[str, bytes]) -> bytes:
    return gzip.compress(tar_bytes(members), mtime=0)


def upload_adapter(client: httpx.Client, admin_key: str, name: str, files, user_id: str | None = None) -> httpx.Response:
    data = {"name": name}
    if user_id is not None:
        data["user_id"] = user_id
    return client.post("/v1/adapters", data=data, files=files, headers=bearer(admin_key))


def wait_for_status(client: httpx.Client, admin_key: str, adapter_id: str, timeout_s: float = 60.0) -> dict:
    """Poll an adapter until it leaves ``pending``."""
    deadline = time.monotonic() + timeout_s
    while True:
        r = client.get(f"/v1/adapters/{adapter_id}", headers=bearer(admin_key))
        assert r.status_code == 200, r.text
        body = r.json()
        if body["status"] != "pending" or time.monotonic() > deadline:
            return body
        time.sleep(0.1)


def chat(client: httpx.Client, key: str, user_id: str, message: str, **options) -> httpx.Response:
    body = {"message": message, "max_tokens": 8, "temperature": 0.0, **options}
    return client.post(f"/v1/users/{user_id}/chat", json=body, headers=bearer(key))


def parse_sse(text: str) -> list[tuple[str, dict | str]]:
    """``[(event name, data)]`` from a text/event-stream body (data parsed as JSON when it is)."""
    events = []
    for block in text.strip().split("\n\n"):
        name, data = "message", []
        for line in block.splitlines():
            if line.startswith("event:"):
                name = line[len("event:"):].strip()
            elif line.startswith("data:"):
                data.append(line[len("data:"):].strip())
        raw = "\n".join(data)
        try:
            events.append((name, json.loads(raw)))
        except json.JSONDecodeError:
            events.append((name, raw))
    return events


def messages(client: httpx.Client, key: str, user_id: str, **params) -> dict:
    r = client.get(f"/v1/users/{user_id}/messages", params=params, headers=bearer(key))
    assert r.status_code == 200, r.text
    return r.json()
