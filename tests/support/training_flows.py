"""Client-side steps of the personalization loop (examples, trainings), shared by the api tests and
the demonstration script's tests."""

from __future__ import annotations

import time

import httpx

from benchmarks.personalization_loop import GREETING
from support.platform_flows import bearer


def style_example(i: int, greeting: str = GREETING) -> dict:
    """A short exchange whose answer starts with ``greeting`` (the style to learn)."""
    return {"messages": [{"role": "user", "content": f"Tell me fact number {i}."},
                         {"role": "assistant", "content": f"{greeting} Fact {i} is that {i} + {i} = {2 * i}."}]}


def add_examples(client: httpx.Client, admin_key: str, user_id: str, count: int, start: int = 0) -> list[str]:
    """Post ``count`` style examples; their ids."""
    ids = []
    for i in range(start, start + count):
        r = client.post(f"/v1/users/{user_id}/examples", json=style_example(i), headers=bearer(admin_key))
        assert r.status_code == 201, r.text
        ids.append(r.json()["id"])
    return ids


def start_training(client: httpx.Client, admin_key: str, user_id: str, **body) -> httpx.Response:
    return client.post(f"/v1/users/{user_id}/adapter-trainings", json=body, headers=bearer(admin_key))


def get_job(client: httpx.Client, admin_key: str, job_id: str) -> dict:
    r = client.get(f"/v1/adapter-trainings/{job_id}", headers=bearer(admin_key))
    assert r.status_code == 200, r.text
    return r.json()


def wait_for_job(client: httpx.Client, admin_key: str, job_id: str, *, until=None, timeout_s: float = 120.0) -> dict:
    """Poll a job until ``until(job)`` (default: it ended); the job as last read."""
    until = until or (lambda job: job["status"] in ("succeeded", "failed", "cancelled"))
    deadline = time.monotonic() + timeout_s
    while True:
        job = get_job(client, admin_key, job_id)
        if until(job):
            return job
        if time.monotonic() > deadline:
            raise AssertionError(f"training job {job_id} did not get there in {timeout_s} s: {job}")
        time.sleep(0.05)
