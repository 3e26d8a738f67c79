"""A real Prometheus server for tests, scraping local services.

    from support.prometheus import run_prometheus
    with run_prometheus({"api": "http://127.0.0.1:8000/metrics"}, rule_files, tmp_path) as prom:
        prom.query('up{job="api"}')   # -> [{"metric": {...}, "value": [ts, "1"]}, ...]

Needs the ``prometheus`` binary (Debian package ``prometheus``; CI installs it). Its absence is a
test failure, not a skip: the observability checks must not silently stop running.
"""

from __future__ import annotations

import shutil
import signal
import subprocess
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import pytest
import yaml

from support.service_fixtures import HOST, free_ports, log_tail

START_ATTEMPTS = 3
READY_TIMEOUT_S = 60.0
MISSING_BINARY = ("the `prometheus` binary is not on PATH: install the Debian package `prometheus` "
                  "(`apt-get install prometheus`; CI installs it) to run the live Prometheus tests")


class PrometheusQueryError(AssertionError):
    """The query API answered with an error (invalid expression, execution error...)."""


@dataclass
class PrometheusServer:
    url: str
    process: subprocess.Popen
    log_path: Path
    config_path: Path

    def _api(self, path: str, data: Mapping[str, str] | None = None, timeout: float = 30.0):
        if data is None:
            response = httpx.get(f"{self.url}{path}", timeout=timeout)
        else:
            response = httpx.post(f"{self.url}{path}", data=data, timeout=timeout)
        try:
            body = response.json()
        except ValueError as exc:
            raise PrometheusQueryError(f"{path}: HTTP {response.status_code}, not JSON: {response.text[:500]}") from exc
        if body.get("status") != "success":
            raise PrometheusQueryError(f"{body.get('errorType', 'error')}: {body.get('error', body)}")
        return body["data"]

    def query(self, expr: str, time_s: float | None = None) -> list[dict]:
        """Instant query; the result's series (``[{"metric": {...}, "value": [ts, "v"]}]``, or a
        one-element list ``[{"metric": {}, "value": [ts, "v"]}]`` for a scalar). Raises
        :class:`PrometheusQueryError` with Prometheus' message when the query fails."""
        data = {"query": expr}
        if time_s is not None:
            data["time"] = f"{time_s:.3f}"
        result = self._api("/api/v1/query", data)
        if result["resultType"] in ("scalar", "string"):
            return [{"metric": {}, "value": result["result"]}]
        return result["result"]

    def query_range(self, expr: str, start_s: float, end_s: float, step_s: float = 1.0) -> list[dict]:
        """Range query (as Grafana runs a time series panel): ``[{"metric", "values": [[ts, "v"], ...]}]``."""
        data = {"query": expr, "start": f"{start_s:.3f}", "end": f"{end_s:.3f}", "step": f"{step_s}"}
        return self._api("/api/v1/query_range", data)["result"]

    def targets(self) -> list[dict]:
        """The active scrape targets (``labels``, ``health``, ``lastError``, ``lastScrape`` ...)."""
        return self._api("/api/v1/targets", None)["activeTargets"]

    def rules(self) -> list[dict]:
        """The loaded rule groups with each rule's ``health`` and ``lastError``."""
        return self._api("/api/v1/rules", None)["groups"]

    def log(self) -> str:
        return log_tail(self.log_path)


def _target(url: str) -> tuple[str, str, str]:
    """(scheme, host:port, metrics path) of a metrics URL."""
    parts = urlsplit(url if "://" in url else f"http://{url}")
    return parts.scheme or "http", parts.netloc, parts.path or "/metrics"


def write_config(path: Path, targets: Mapping[str, str], rule_files: Sequence[Path], scrape_interval: str) -> Path:
    """A prometheus.yml with one job per ``targets`` entry (job name -> metrics URL)."""
    jobs = []
    for job, url in targets.items():
        scheme, address, metrics_path = _target(url)
        jobs.append({"job_name": job, "scheme": scheme, "metrics_path": metrics_path,
                     "static_configs": [{"targets": [address]}]})
    config = {
        "global": {"scrape_interval": scrape_interval, "scrape_timeout": scrape_interval,
                   "evaluation_interval": scrape_interval},
        "rule_files": [str(Path(f).resolve()) for f in rule_files],
        "scrape_configs": jobs,
    }
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def _stop(process: subprocess.Popen, timeout: float = 10.0) -> None:
    if process.poll() is not None:
        return
    process.send_signal(signal.SIGTERM)
    try:
        process.wait(timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(5)


def _ready(url: str) -> bool:
    try:
        return httpx.get(f"{url}/-/ready", timeout=1).status_code == 200
    except httpx.HTTPError:
        return False


def _start(binary: str, config: Path, workdir: Path, attempt: int) -> PrometheusServer:
    (port,) = free_ports(1)
    data_dir = workdir / f"data-{attempt}"
    log = workdir / f"prometheus-{attempt}.log"
    command = [binary, f"--config.file={config}", f"--storage.tsdb.path={data_dir}",
               f"--web.listen-address={HOST}:{port}", "--log.level=info"]
    with open(log, "wb") as out:
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, cwd=workdir,
                                   start_new_session=True)
    server = PrometheusServer(f"http://{HOST}:{port}", process, log, config)
    deadline = time.monotonic() + READY_TIMEOUT_S
    while not _ready(server.url):
        if process.poll() is not None:
            raise RuntimeError(f"prometheus exited with {process.returncode} while starting:\n{log_tail(log)}")
        if time.monotonic() > deadline:
            _stop(process)
            raise RuntimeError(f"prometheus not ready after {READY_TIMEOUT_S:.0f} s:\n{log_tail(log)}")
        time.sleep(0.1)
    return server


@contextmanager
def run_prometheus(targets: Mapping[str, str], rule_files: Sequence[Path], workdir: Path,
                   scrape_interval: str = "1s") -> Iterator[PrometheusServer]:
    """Run Prometheus scraping ``targets`` (job name -> metrics URL, e.g.
    ``http://127.0.0.1:8000/metrics``) and evaluating ``rule_files``, every ``scrape_interval``;
    yield it once ``/-/ready`` answers; stop it at the end (SIGTERM, then SIGKILL). Its log is
    printed if the block raises."""
    binary = shutil.which("prometheus")
    if binary is None:
        pytest.fail(MISSING_BINARY, pytrace=False)
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    config = write_config(workdir / "prometheus.yml", targets, rule_files, scrape_interval)
    promtool = shutil.which("promtool")
    if promtool is not None:
        check = subprocess.run([promtool, "check", "config", str(config)], check=False, capture_output=True, text=True)
        assert check.returncode == 0, f"promtool check config failed:\n{check.stdout}\n{check.stderr}"
    error: Exception | None = None
    for attempt in range(START_ATTEMPTS):  # a free port can be taken before prometheus binds it
        try:
            server = _start(binary, config, workdir, attempt)
            break
        except RuntimeError as exc:
            error = exc
    else:
        raise RuntimeError(f"could not start prometheus: {error}")
    try:
        yield server
    except BaseException:
        print(f"--- prometheus log ({server.log_path}) ---\n{server.log()}")
        raise
    finally:
        _stop(server.process)
