"""The Makefile on a fresh machine: ``make test`` first makes sure prometheus and promtool are there
(as root with apt-get it installs Debian's ``prometheus`` package, otherwise it stops at once with
one line naming it, before the long Python install); ``make serve`` does not need them. The tools'
names and apt-get are Makefile variables, so the tests can point them at missing or fake commands."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

from deploy.compose_config import REPO_ROOT

MISSING = {"PROMETHEUS": "tailor-no-such-prometheus", "PROMTOOL": "tailor-no-such-promtool"}


def _make(*targets: str, timeout_s: float = 30.0, **variables: str) -> subprocess.CompletedProcess:
    args = ["make", "--no-print-directory", "-s", *targets, *(f"{k}={v}" for k, v in variables.items())]
    # a top-level make, also when the suite itself runs under `make test` (MAKELEVEL would make it
    # print "make[1]:" and MAKEFLAGS would pass the outer command line's variables down)
    env = {k: v for k, v in os.environ.items() if k not in ("MAKELEVEL", "MAKEFLAGS", "MFLAGS")}
    return subprocess.run(args, cwd=REPO_ROOT, capture_output=True, text=True, timeout=timeout_s, check=False, env=env)


def test_deps_passes_quietly_when_prometheus_and_promtool_are_there():
    result = _make("deps")
    assert result.returncode == 0 and not result.stderr, result.stderr


def test_make_test_without_prometheus_or_apt_stops_at_once_with_one_line(tmp_path):
    venv = tmp_path / "venv"
    result = _make("test", timeout_s=20, VENV=str(venv), APT_GET="tailor-no-such-apt-get", **MISSING)
    assert result.returncode != 0
    ours = [line for line in result.stderr.splitlines() if not line.startswith("make:")]
    assert len(ours) == 1 and "install the Debian package prometheus" in ours[0], result.stderr
    assert not venv.exists(), "make test installed Python packages before stopping"


def test_deps_as_root_installs_the_debian_package_with_apt(tmp_path):
    calls = tmp_path / "apt-calls"
    fake_apt = tmp_path / "apt-get"
    fake_apt.write_text(f'#!/bin/sh\necho "$@" >> {calls}\n')
    fake_apt.chmod(0o755)
    result = _make("deps", APT_GET=str(fake_apt), **MISSING)
    if os.geteuid() == 0:
        assert result.returncode == 0, result.stderr
        lines = calls.read_text().splitlines()
        assert lines[0] == "update -qq" and lines[1].split()[-1] == "prometheus", lines
        assert "install" in lines[1].split() and "-y" in lines[1].split()
    else:
        assert result.returncode != 0 and "sudo apt-get install prometheus" in result.stderr
        assert not calls.exists()


def test_make_serve_does_not_need_prometheus():
    result = _make("-n", "serve", **MISSING)  # -n: print what would run
    assert result.returncode == 0, result.stderr
    assert "promtool" not in result.stdout + result.stderr and "tailor serve" in result.stdout


def test_ci_entry_point_still_runs_make_test():
    ci = Path(REPO_ROOT / ".ci/run").read_text()
    assert "make test" in ci and "prometheus" in ci
