"""How background validations retry transient errors: within a time budget, with capped
exponential backoff and jitter. Both task queues (Celery, in-process) use it.

Why a time budget and not a count of attempts: an outage of the object store or of the database
is not the adapter's fault, and it lasts as long as it lasts. A count of attempts with fast
backoff gives up after half a minute (the old policy: six attempts in 28 s marked a valid adapter
failed for good), while a budget of minutes rides out a restart or a failover of the store. So
an attempt that fails with a transient error is retried after ``delay(n)`` seconds, where ``n``
counts the failed attempts of this chain:

* ``delay(n)`` is ``min(max_s, initial_s * 2**n)`` with "equal jitter": uniform in
  ``[d/2, d]``, so that adapters uploaded together do not retry in lock step, and never 0;
* the chain gives up once ``budget_s`` seconds have passed since its first attempt (the last
  delay is shortened so that one attempt falls at the end of the budget). Only then is the
  adapter marked ``failed``; until then it stays ``pending``.

The budget must stay below ``TAILOR_PENDING_TIMEOUT_S`` (the settings check it): the clean-up job
fails adapters that are still pending then, whatever their retries do.

Errors that are not transient (a bug, a refused request) are never retried: the task marks the
adapter failed with the error at once. Invalid adapter files never raise at all (the job marks
them failed itself).
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from tenants.settings import Settings


def transient_errors() -> tuple[type[BaseException], ...]:
    """Exceptions worth retrying: the store or the database unreachable, or a timeout."""
    from botocore.exceptions import ConnectionError as BotoConnectionError
    from botocore.exceptions import HTTPClientError
    from sqlalchemy.exc import InterfaceError, OperationalError

    from tenants.storage import StoreUnavailableError

    return (
        StoreUnavailableError,
        OperationalError,  # the DBAPI's connection errors (psycopg, sqlite "database is locked")
        InterfaceError,
        BotoConnectionError,
        HTTPClientError,
        ConnectionError,
        TimeoutError,
    )


def is_transient(exc: BaseException) -> bool:
    """Whether ``exc`` is an outage worth retrying (see ``transient_errors``)."""
    return isinstance(exc, transient_errors())


@dataclass(frozen=True)
class RetryPolicy:
    """Capped exponential backoff with jitter inside a time budget (see the module docstring)."""

    budget_s: float = 1200.0
    initial_s: float = 2.0
    max_s: float = 120.0

    def __post_init__(self) -> None:
        if not (self.budget_s > 0 and 0 < self.initial_s <= self.max_s):
            raise ValueError(f"bad retry policy {self}: need budget_s > 0 and 0 < initial_s <= max_s")

    @classmethod
    def from_settings(cls, settings: Settings) -> RetryPolicy:
        """The policy of ``TAILOR_VALIDATION_RETRY_*``."""
        return cls(settings.validation_retry_budget_s, settings.validation_retry_initial_s,
                   settings.validation_retry_max_s)

    def delay(self, failures: int, rng: random.Random | None = None) -> float:
        """Seconds to wait after the ``failures``-th failed attempt (0 for the first): the capped
        exponential ``d`` drawn uniformly from ``[d/2, d]``."""
        ceiling = min(self.max_s, self.initial_s * 2.0 ** min(failures, 64))
        return (rng or random).uniform(ceiling / 2, ceiling)

    def next_delay(self, failures: int, elapsed_s: float, rng: random.Random | None = None) -> float | None:
        """The wait before the next attempt, ``elapsed_s`` seconds after the chain's first attempt
        began; None when the budget is spent (give up)."""
        remaining = self.budget_s - elapsed_s
        if remaining <= 0:
            return None
        return min(self.delay(failures, rng), remaining)

    def retry_after(self, exc: BaseException, failures: int, elapsed_s: float,
                    rng: random.Random | None = None) -> float | None:
        """The wait before retrying after ``exc``; None when no retry follows (``exc`` is not
        transient, or the budget is spent)."""
        if not is_transient(exc):
            return None
        return self.next_delay(failures, elapsed_s, rng)

    def give_up_reason(self, exc: BaseException, elapsed_s: float) -> str:
        """The failure reason stored on an adapter whose validation is abandoned after ``exc``."""
        if is_transient(exc):
            return f"validation could not complete: the store or database stayed unreachable for " \
                   f"{int(elapsed_s)} s (retry budget {int(self.budget_s)} s): {exc}"
        return f"validation could not complete: {exc}"
