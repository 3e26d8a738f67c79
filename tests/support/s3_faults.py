"""A SeaweedFS of a test's own, to kill, stop, freeze and restart for store-fault tests.

The session's ``seaweedfs`` fixture (``support.service_fixtures``) is shared by other tests and must
never be killed; ``killable_seaweedfs`` starts a separate ``weed mini`` with the same helpers. Its
command line (data directory and every port) is fixed at the first start, so ``restart`` brings the
same server back with the data it had: what an interrupted upload left behind is still there.
``pause`` freezes it (SIGSTOP: the kernel accepts connections that are never answered, a hung
store) until ``resume``.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from support.service_fixtures import (
    HOST,
    S3_ACCESS_KEY_ID,
    S3_REGION,
    S3_SECRET_ACCESS_KEY,
    S3Server,
    _s3_answers,
    _weed_command,
    service_dir,
    stop_process,
    wait_until,
)

START_TIMEOUT_S = 60.0


class KillableSeaweedFS:
    """One ``weed mini`` on fixed ports and a fixed data directory: ``start``, ``kill`` (SIGKILL,
    nothing flushed), ``restart``, ``stop``."""

    def __init__(self, root: Path):
        self.data_dir = Path(root) / "weed"
        self.data_dir.mkdir(parents=True)
        self.command, s3_port = _weed_command(self.data_dir)
        self.server = S3Server(f"http://{HOST}:{s3_port}", S3_ACCESS_KEY_ID, S3_SECRET_ACCESS_KEY, S3_REGION,
                               self.data_dir)
        self.process: subprocess.Popen | None = None
        self.log = self.data_dir / "weed.log"

    def start(self, timeout: float = START_TIMEOUT_S) -> KillableSeaweedFS:
        """Start the server (again) and wait until its S3 API answers."""
        env = {**os.environ, "AWS_ACCESS_KEY_ID": S3_ACCESS_KEY_ID, "AWS_SECRET_ACCESS_KEY": S3_SECRET_ACCESS_KEY}
        for sock in ("filer.sock", "s3.sock"):  # left behind if the last run did not end cleanly
            (self.data_dir / sock).unlink(missing_ok=True)
        with open(self.log, "ab") as out:
            self.process = subprocess.Popen(self.command, env=env, stdout=out, stderr=subprocess.STDOUT,
                                            cwd=self.data_dir, start_new_session=True)
        try:
            wait_until(lambda: _s3_answers(self.server), timeout, self.process, "SeaweedFS", self.log)
        except RuntimeError:
            stop_process(self.process)
            raise
        return self

    def kill(self) -> None:
        """SIGKILL the server's process group and wait for it to be gone (the port then refuses)."""
        if self.process is not None and self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(10)

    def restart(self, attempts: int = 3) -> None:
        """Start the killed server again on the same ports and data directory (a port can take a
        moment to be free again: retried)."""
        for attempt in range(attempts):
            try:
                self.start()
                return
            except RuntimeError:
                if attempt == attempts - 1:
                    raise
                time.sleep(1.0)

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

    def unfinished_uploads(self, bucket: str) -> list[str]:
        """The keys of the bucket's multipart uploads that were neither completed nor aborted."""
        return [u["Key"] for u in self.server.client().list_multipart_uploads(Bucket=bucket).get("Uploads", [])]

    def object_keys(self, bucket: str) -> list[str]:
        return [o["Key"] for o in self.server.client().list_objects_v2(Bucket=bucket).get("Contents", [])]


@contextmanager
def killable_seaweedfs() -> Iterator[KillableSeaweedFS]:
    """A started ``KillableSeaweedFS`` in its own directory; stopped and removed afterwards."""
    with service_dir("seaweedfs-faults") as root:
        weed = KillableSeaweedFS(root)
        weed.start()
        try:
            yield weed
        finally:
            weed.stop()
