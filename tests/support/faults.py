"""For the worker fault tests: a look at the processes a worker left behind, and polling. (The
SeaweedFS they stop, restart or freeze is ``support.s3_faults.KillableSeaweedFS``.)"""

from __future__ import annotations

import time
from pathlib import Path


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
