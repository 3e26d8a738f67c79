"""Service settings (pydantic-settings): environment variables ``TAILOR_<FIELD>``, validated at start.

One model serves the three services (api, inference, worker) and the embedded default; each
service checks the fields it needs with :meth:`Settings.check_for`. Outside development mode
placeholder secrets are refused: the operator token, the API-key pepper, the inference shared
secret and S3 credentials must be set to real values, and neither they nor the database password
may be a published value (a placeholder or an example from ``.env.example``).

Defaults are the embedded default of ``make serve``: SQLite under ``./var``, a local folder as the
object store, tasks in-process, the engine in-process on the CPU.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal
from urllib.parse import unquote, urlsplit

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

DEV_PEPPER = "tailor-dev-pepper-change-me"
DEV_INFERENCE_SECRET = "tailor-dev-inference-secret-change-me"
PLACEHOLDERS = {"", "change-me", "changeme", "secret", "password", "minioadmin", DEV_PEPPER, DEV_INFERENCE_SECRET}
# Every secret in .env.example contains this marker: those values are published, so never secret.
EXAMPLE_MARKER = "example-only"
MIN_SECRET_LENGTH = 16
MAX_TTFT_SLO_S = 3600.0  # the largest first-token SLO accepted anywhere (setting, tenant, request)

Service = Literal["api", "inference", "worker", "embedded"]


def _is_published(raw: str) -> bool:
    """A value everyone can read: a known placeholder, a change-me marker, an .env.example value."""
    lowered = raw.strip().lower()
    return lowered in PLACEHOLDERS or "change-me" in lowered or EXAMPLE_MARKER in lowered


def _is_placeholder(value: SecretStr | None) -> bool:
    """Missing, published (see ``_is_published``) or shorter than ``MIN_SECRET_LENGTH``."""
    if value is None:
        return True
    raw = value.get_secret_value()
    return _is_published(raw) or len(raw) < MIN_SECRET_LENGTH


def _url_password_is_published(url: str | None) -> bool:
    """Whether a database URL carries a published password (no password at all is fine: peer or
    certificate authentication)."""
    if not url:
        return False
    try:
        password = urlsplit(url).password
    except ValueError:
        return False
    return password is not None and _is_published(unquote(password))


def _split_urls(raw: str) -> list[str]:
    """Comma-separated URLs, stripped, without trailing slashes; empty entries dropped."""
    return [part.strip().rstrip("/") for part in raw.split(",") if part.strip()]


def _inference_url_problems(raw: str) -> list[str]:
    """What is wrong with ``TAILOR_INFERENCE_URLS``: each entry must be an http(s) URL with a host
    and nothing after the port, and no replica may be listed twice."""
    problems, urls = [], _split_urls(raw)
    if raw.strip() and not urls:
        problems.append("TAILOR_INFERENCE_URLS lists no URL")
    for url in urls:
        try:
            parts = urlsplit(url)
            parts.port  # noqa: B018 (raises ValueError on a malformed port)
        except ValueError as exc:
            problems.append(f"TAILOR_INFERENCE_URLS entry {url!r} is malformed: {exc}")
            continue
        if parts.scheme not in ("http", "https") or not parts.hostname:
            problems.append(f"TAILOR_INFERENCE_URLS entry {url!r} is not an http(s)://host[:port] URL")
        elif parts.query or parts.fragment or parts.username or parts.password:
            problems.append(f"TAILOR_INFERENCE_URLS entry {url!r} may not carry credentials, a query or a fragment")
    duplicates = sorted({url for url in urls if urls.count(url) > 1})
    if duplicates:
        problems.append(f"TAILOR_INFERENCE_URLS lists {', '.join(duplicates)} more than once")
    return problems


class Settings(BaseSettings):
    """Every setting of every Tailor service. See the README's configuration table."""

    model_config = SettingsConfigDict(env_prefix="TAILOR_", extra="ignore", validate_default=True)

    # --- mode and listening address -------------------------------------------------------------
    mode: Literal["development", "production"] = "development"
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=1, le=65535)
    data_dir: Path = Path("var")
    drain_timeout_s: float = Field(30.0, ge=0)  # after SIGTERM: in-flight requests may run this long
    migrate_on_start: bool = True  # the api (and the embedded default) migrate the schema at start

    # --- secrets ----------------------------------------------------------------------------------
    operator_token: SecretStr | None = None
    api_key_pepper: SecretStr = SecretStr(DEV_PEPPER)
    inference_secret: SecretStr = SecretStr(DEV_INFERENCE_SECRET)

    # --- metadata database -------------------------------------------------------------------------
    database_url: str | None = None  # default: sqlite:///<data_dir>/tailor.db
    db_pool_size: int = Field(10, ge=1)  # connections kept open per process
    db_max_overflow: int = Field(10, ge=0)  # extra connections under load, closed when idle
    db_pool_timeout_s: float = Field(5.0, gt=0)  # wait for a free connection, then 503
    db_connect_timeout_s: float = Field(5.0, gt=0)  # PostgreSQL connect timeout

    # --- object store ------------------------------------------------------------------------------
    object_store: Literal["local", "s3"] = "local"
    storage_dir: Path | None = None  # local store root; default <data_dir>/objects
    s3_endpoint_url: str | None = None
    s3_bucket: str = "tailor-adapters"
    s3_region: str = "us-east-1"
    s3_access_key_id: str | None = None
    s3_secret_access_key: SecretStr | None = None
    s3_path_style: bool = True
    s3_create_bucket: bool = True

    # --- background tasks --------------------------------------------------------------------------
    task_mode: Literal["inprocess", "celery"] = "inprocess"
    redis_url: str = "redis://127.0.0.1:6379/0"
    worker_concurrency: int = Field(1, ge=1)  # 1: Celery's solo pool; more: a thread pool
    worker_metrics_host: str = "127.0.0.1"  # 0.0.0.0 in a container, so that Prometheus can scrape
    worker_metrics_port: int = Field(9101, ge=1, le=65535)
    # a message a dead worker held is redelivered after this; live workers renew theirs (see tenants.worker_leases)
    worker_visibility_timeout_s: float = Field(30.0, ge=2)
    worker_drain_timeout_s: float = Field(50.0, gt=0)  # after SIGTERM: the running task may finish this long
    validation_retry_budget_s: float = Field(1200.0, gt=0)  # transient errors retried this long, then failed
    validation_retry_initial_s: float = Field(2.0, gt=0)  # first backoff; doubles per attempt, with jitter
    validation_retry_max_s: float = Field(120.0, gt=0)  # backoff cap

    # --- adapter training (tenants.training.jobs) ----------------------------------------------------
    training_threads: int = Field(1, ge=1)  # torch intra-op threads of one training (1: chat keeps the other cores)
    max_training_jobs_per_tenant: int = Field(2, ge=0)  # queued + running jobs per tenant; 0 disables the limit
    max_examples_per_user: int = Field(1000, ge=4)  # stored training examples per user
    training_max_length: int = Field(1024, ge=32)  # tokens of one example (longer ones keep their end)
    training_heartbeat_s: float = Field(2.0, gt=0)  # a running job renews its heartbeat and reads its cancel flag
    training_stale_after_s: float = Field(60.0, gt=0)  # a running job without a heartbeat this long is failed

    # --- inference ---------------------------------------------------------------------------------
    inference_mode: Literal["embedded", "remote"] = "embedded"
    inference_url: str = "http://127.0.0.1:8001"
    # several inference replicas, comma separated (api/replicas.py routes by adapter affinity);
    # empty: the one TAILOR_INFERENCE_URL
    inference_urls: str = ""
    inference_probe_interval_s: float = Field(2.0, gt=0, allow_inf_nan=False)  # replica health probes
    # a replica takes a request while its in-flight count stays under this many times the mean
    # (consistent hashing with bounded loads); above it the request spills to the next replica
    router_load_factor: float = Field(1.5, gt=1, le=10, allow_inf_nan=False)  # api.replicas.DEFAULT_LOAD_FACTOR
    inference_timeout_s: float = Field(300.0, gt=0)
    model: str = "smollm2-135m"
    device: str = "cpu"
    dtype: str = "auto"
    pool_bytes: int | None = Field(None, gt=0)
    max_waiting: int = Field(256, ge=1)
    host_adapter_bytes: int = Field(2 << 30, gt=0)
    max_lora_rank: int = Field(128, ge=1)
    tensor_parallel_size: int = Field(1, ge=1)  # ranks the model is split over (inference.tensor_parallel)
    prefix_cache: bool = True  # reuse KV pages of earlier requests per tenant and adapter (inference.prefix_cache)
    # steps are kept about this long by lowering their token budget (inference.step_budget); 0 turns it off
    step_time_target_s: float = Field(0.15, ge=0, allow_inf_nan=False)

    # --- limits ------------------------------------------------------------------------------------
    max_upload_bytes: int = Field(256 << 20, gt=0)
    max_body_bytes: int = Field(1 << 20, gt=0)
    max_archive_members: int = Field(16, ge=2)
    history_token_budget: int = Field(1536, ge=64)
    history_max_messages: int = Field(100, ge=1)
    # the history window moves by this share of the budget at a time, for the prefix cache (0: exact fit)
    history_trim_step_fraction: float = Field(1 / 3, ge=0, lt=1, allow_inf_nan=False)
    default_max_tokens: int = Field(256, ge=1)
    max_tokens_limit: int = Field(2048, ge=1)
    rate_limit_per_minute: int = Field(600, ge=0)  # per tenant (and api process with memory storage); 0 disables
    # where the rate-limit counts live: this process (memory) or Redis at TAILOR_REDIS_URL, shared by every api process
    rate_limit_storage: Literal["memory", "redis"] = "memory"
    max_concurrent_per_tenant: int = Field(64, ge=0)  # generations in flight per tenant and api process; 0 disables
    # the default first-token deadline of a chat in seconds (None: none), when neither the request
    # nor its tenant sets one; a queued request that can no longer meet it is refused (503)
    ttft_slo_s: float | None = Field(None, gt=0, le=MAX_TTFT_SLO_S, allow_inf_nan=False)

    # --- clean-up -----------------------------------------------------------------------------------
    cleanup_interval_s: float = Field(300.0, ge=0)  # 0 disables the periodic clean-up
    pending_requeue_s: float = Field(300.0, gt=0)
    pending_timeout_s: float = Field(3600.0, gt=0)

    @field_validator("data_dir", "storage_dir")
    @classmethod
    def _expand(cls, value: Path | None) -> Path | None:
        return None if value is None else value.expanduser()

    @model_validator(mode="after")
    def _check(self) -> Settings:
        problems = []
        if self.mode == "production":
            if _is_placeholder(self.operator_token):
                problems.append("TAILOR_OPERATOR_TOKEN must be set to a secret of at least 16 characters "
                                "(not a placeholder or published example)")
            if _is_placeholder(self.api_key_pepper):
                problems.append("TAILOR_API_KEY_PEPPER is a placeholder; set a random secret of at least 16 characters")
            if self.inference_mode == "remote" and _is_placeholder(self.inference_secret):
                problems.append("TAILOR_INFERENCE_SECRET is a placeholder; set a random secret of at least 16 characters")
            if self.object_store == "s3" and (
                not self.s3_access_key_id or _is_placeholder(self.s3_secret_access_key)
            ):
                problems.append("TAILOR_S3_ACCESS_KEY_ID and TAILOR_S3_SECRET_ACCESS_KEY must be real credentials")
            if _url_password_is_published(self.database_url):
                problems.append("the password in TAILOR_DATABASE_URL is a placeholder or a published example; set a real one")
        if self.default_max_tokens > self.max_tokens_limit:
            problems.append("TAILOR_DEFAULT_MAX_TOKENS exceeds TAILOR_MAX_TOKENS_LIMIT")
        if self.validation_retry_initial_s > self.validation_retry_max_s:
            problems.append("TAILOR_VALIDATION_RETRY_INITIAL_S exceeds TAILOR_VALIDATION_RETRY_MAX_S")
        if self.training_stale_after_s < 3 * self.training_heartbeat_s:
            problems.append("TAILOR_TRAINING_STALE_AFTER_S must be at least 3 times TAILOR_TRAINING_HEARTBEAT_S "
                            "(a live job would be taken for a dead one)")
        if self.validation_retry_budget_s >= self.pending_timeout_s:
            problems.append("TAILOR_VALIDATION_RETRY_BUDGET_S must be below TAILOR_PENDING_TIMEOUT_S "
                            "(the clean-up fails adapters still pending then)")
        problems.extend(_inference_url_problems(self.inference_urls))
        if problems:
            raise ValueError("; ".join(problems))
        return self

    # --- derived values --------------------------------------------------------------------------
    @property
    def resolved_database_url(self) -> str:
        return self.database_url or f"sqlite:///{self.data_dir / 'tailor.db'}"

    def database_engine_options(self) -> dict:
        """Keyword arguments for ``tenants.db.make_engine``: the connection pool's bounds."""
        return {"pool_size": self.db_pool_size, "max_overflow": self.db_max_overflow,
                "pool_timeout": self.db_pool_timeout_s, "connect_timeout_s": self.db_connect_timeout_s}

    @property
    def history_trim_step_tokens(self) -> int | None:
        """Tokens the inference side's history window moves by at a time (``GenerateRequest.
        history_trim_step_tokens``): ``TAILOR_HISTORY_TRIM_STEP_FRACTION`` of the token budget;
        None (exact fit) when that is 0. A fixed number per deployment, so that the anchors of a
        conversation do not move with a request's ``max_tokens``."""
        step = round(self.history_trim_step_fraction * self.history_token_budget)
        return step if step >= 1 else None

    @property
    def history_step_messages(self) -> int:
        """Messages the database's history window moves by at a time (``conversations.history_window``):
        ``TAILOR_HISTORY_TRIM_STEP_FRACTION`` of ``TAILOR_HISTORY_MAX_MESSAGES``, rounded down to
        whole exchanges (even); 1 (slides every turn) when that is under 2."""
        step = round(self.history_trim_step_fraction * self.history_max_messages)
        return max(1, step - step % 2)

    @property
    def inference_replicas(self) -> tuple[str, ...]:
        """The inference services' base URLs: ``TAILOR_INFERENCE_URLS`` split at commas (without
        trailing slashes), else the one ``TAILOR_INFERENCE_URL``."""
        urls = _split_urls(self.inference_urls)
        return tuple(urls) if urls else (self.inference_url.rstrip("/"),)

    @property
    def resolved_storage_dir(self) -> Path:
        return self.storage_dir or self.data_dir / "objects"

    def check_for(self, service: Service) -> None:
        """Raise ValueError naming every setting ``service`` needs but lacks.

        ``api`` alone (``tailor serve api``) talks to a remote inference service; ``worker`` needs
        Celery; in production the separate services must share an S3 store, not a local folder.
        """
        problems = []
        if service == "api" and self.inference_mode != "remote":
            problems.append("the api service needs TAILOR_INFERENCE_MODE=remote and TAILOR_INFERENCE_URL")
        if service == "worker" and self.task_mode != "celery":
            problems.append("the worker needs TAILOR_TASK_MODE=celery and TAILOR_REDIS_URL")
        if service == "inference" and self.mode == "production" and _is_placeholder(self.inference_secret):
            problems.append("TAILOR_INFERENCE_SECRET is a placeholder; set a random secret of at least 16 characters")
        if service != "embedded" and self.mode == "production" and self.object_store == "local":
            problems.append("separate services need TAILOR_OBJECT_STORE=s3 (a local folder is not shared)")
        if problems:
            raise ValueError("; ".join(problems))

    def engine_options(self) -> dict:
        """Keyword arguments for ``EngineConfig`` (device, dtype, pool and adapter budgets, prefix cache)."""
        options = {
            "device": self.device,
            "dtype": self.dtype,
            "max_waiting": self.max_waiting,
            "host_adapter_bytes": self.host_adapter_bytes,
            "max_lora_rank": self.max_lora_rank,
            "tensor_parallel_size": self.tensor_parallel_size,
            "enable_prefix_cache": self.prefix_cache,
            "step_time_target_s": self.step_time_target_s or None,
        }
        if self.pool_bytes is not None:
            options["pool_bytes"] = self.pool_bytes
        return options
