"""Release the calling thread's idle OpenMP worker threads (GNU libgomp, which torch's Linux CPU
wheels bundle).

Why this exists: every thread that runs a parallel CPU op (a GEMM, an elementwise op over more
than about 32K elements) becomes the master of its own libgomp team, whose ``N - 1`` worker threads
stay alive after the op. Once the process holds more such threads than there are CPUs, libgomp
*throttles* its spin-waiting (100 spins instead of about 3 ms) in every team, so the workers fall
asleep between two ops and each following parallel region pays a futex wake-up. On the 2-core CI
machine that turned a 12 us skinny matmul into 110-125 us and a decode step's GEMMs 30% slower, in
the engine thread as soon as any other thread (the one that loaded the model, an adapter fetcher,
the HF baseline in a benchmark) had run one parallel op. Measured numbers and the reasoning:
docs/design.md, "CPU threads".

The fix is to give idle teams back: a thread that hands its work to the engine (or finishes a
burst of CPU work on a helper thread) calls :func:`release_openmp_workers`, and the engine thread
calls it whenever it goes idle. Only the calling thread's own team is released (libgomp's
``omp_pause_resource_all`` is per master thread); the next parallel op in that thread creates a
fresh team (tens of microseconds).

With another OpenMP runtime (LLVM's libomp or Intel's libiomp5, whose pause semantics are
process-wide), or none, this is a no-op that returns False.
"""

from __future__ import annotations

import ctypes
import logging
import os
import functools
import threading
from collections.abc import Callable
from typing import ParamSpec, TypeVar

import torch  # noqa: F401  (loads the OpenMP runtime this module looks for)

log = logging.getLogger(__name__)

__all__ = ["release_openmp_workers", "releases_openmp_workers", "openmp_runtime_path"]

_P = ParamSpec("_P")
_R = TypeVar("_R")

_OMP_PAUSE_SOFT = 1  # omp_pause_resource_t: omp_pause_soft
_lock = threading.Lock()
_resolved = False
_pause: Callable[[int], int] | None = None
_runtime_path: str | None = None


def openmp_runtime_path() -> str | None:
    """Path of the libgomp shared object loaded in this process (after ``import torch``), or None."""
    _resolve()
    return _runtime_path


def release_openmp_workers() -> bool:
    """Terminate the calling thread's idle OpenMP worker threads.

    Returns True when libgomp released (or had nothing to release), False when the runtime is not
    libgomp, lacks ``omp_pause_resource_all`` (GCC < 9), or the call was made inside a parallel
    region. Never raises; costs about a microsecond when the thread holds no team.
    """
    _resolve()
    if _pause is None:
        return False
    return _pause(_OMP_PAUSE_SOFT) == 0


def releases_openmp_workers(fn: Callable[_P, _R]) -> Callable[_P, _R]:
    """Decorator for CPU work that runs on helper threads (adapter validation, for one): the
    calling thread's OpenMP workers are released when ``fn`` returns or raises."""

    @functools.wraps(fn)
    def wrapper(*args: _P.args, **kwargs: _P.kwargs) -> _R:
        try:
            return fn(*args, **kwargs)
        finally:
            release_openmp_workers()

    return wrapper


def _resolve() -> None:
    global _resolved, _pause, _runtime_path
    if _resolved:
        return
    with _lock:
        if _resolved:
            return
        path = _loaded_libgomp()
        if path is not None:
            try:
                lib = ctypes.CDLL(path, mode=os.RTLD_NOLOAD | os.RTLD_LOCAL)
                fn = lib.omp_pause_resource_all
                fn.argtypes = [ctypes.c_int]
                fn.restype = ctypes.c_int
                _pause, _runtime_path = fn, path
            except (OSError, AttributeError) as exc:
                log.info("OpenMP workers cannot be released (%s: %s)", path, exc)
        _resolved = True


def _loaded_libgomp() -> str | None:
    """The first libgomp in this process's memory map (Linux only; None elsewhere)."""
    try:
        with open("/proc/self/maps", encoding="utf-8", errors="replace") as maps:
            for line in maps:
                parts = line.split(maxsplit=5)
                if len(parts) == 6 and os.path.basename(parts[5].strip()).startswith("libgomp"):
                    return parts[5].strip()
    except OSError:
        pass
    return None
