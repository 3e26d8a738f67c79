"""Faults of real services for the worker tests: a throwaway SeaweedFS that a test may stop,
restart (same ports, same data) or freeze (SIGSTOP: connections are accepted by the kernel but
never answered, a hung store), and a look at the processes a worker left behind.

The session-wide ``seaweedfs`` fixture is shared by other tests and is never touched here.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
import uuid
from pathlib import Path

from support.service_fixtures import (
    HOST,
    S3_ACCESS_KEY_ID,
    S3_REGION,
    S3_SECRET_ACCESS_KEY,
    S3Server,
    _s3_answers,
    _weed_command,
    stop_process,
    wait_until,
)


class ThrowawaySeaweed:
    """A ``weed mini`` of its own (command line and ports chosen once, so that a restart comes
    back at the same address with the same buckets and objects)."""

    def __init__(self, root: Path):
        self.data_dir = Path(root) / f"weed-{uuid.uuid4().hex[:8]}"
        self.data_dir.mkdir(parents=True)
        self.command, s3_port = _weed_command(self.data_dir)
        self.server = S3Server(f"http://{HOST}:{s3_port}", S3_ACCESS_KEY_ID, S3_SECRET_ACCESS_KEY, S3_REGION,
                               self.data_dir)
        self.process: subprocess.Popen | None = None
        self.log = self.data_dir / "weed.log"

    def start(self, timeout: float = 60) -> ThrowawaySeaweed:
        """Start the server (again) and wait until S3 answers."""
        env = {**os.environ, "AWS_ACCESS_KEY_ID": S3_ACCESS_KEY_ID, "AWS_SECRET_ACCESS_KEY": S3_SECRET_ACCESS_KEY}
        for sock in ("filer.sock", "s3.sock"):  # left behind if the last run did not end cleanly
            (self.data_dir / sock).unlink(missing_ok=True)
        with open(self.log, "ab") as out:
            self.process = subprocess.Popen(self.command, env=env, stdout=out, stderr=subprocess.STDOUT,
                                            cwd=self.data_dir, start_new_session=True)
        wait_until(lambda: _s3_answers(self.server), timeout, self.process, "SeaweedFS", self.log)
        return self

    def stop(self) -> None:
        """Stop the server (SIGTERM, then SIGKILL): connections are refused until ``start``."""
        if self.process is not None:
            self.resume()
            stop_process(self.process)

    def pause(self) -> None:
        """Freeze the server (SIGSTOP): requests hang until ``resume``."""
        os.kill(self.process.pid, signal.SIGSTOP)

    def resume(self) -> None:
        if self.process is not None and self.process.poll() is None:
            os.kill(self.process.pid, signal.SIGCONT)


def session_processes(session_id: int) -> list[int]:
    """Live processes (zombies excluded) whose session is ``session_id``: everything a process
    started with ``start_new_session=True`` (its pid is the session id) left running."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:  # it ended while we looked
            continue
        fields = stat[stat.rindex(")") + 2:].split()  # after "pid (comm) "
        state, session = fields[0], int(fields[3])
        if session == session_id and state != "Z":
            found.append(int(entry.name))
    return found


def wait_for(check, timeout: float, interval: float = 0.1, what: str = "condition"):
    """Poll ``check()`` until it returns a truthy value (returned); AssertionError after ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} not reached within {timeout} s")
        time.sleep(interval)
