"""One frozen, typed settings object built from the environment.

Every process (web, worker, beat, release, the CLI) builds exactly one ``Settings`` from
``os.environ`` in its entry module and passes it down. A missing required value
(``DATABASE_URL``, ``REDIS_URL``) or a malformed one raises ``SettingsError`` whose message
starts with the variable's name, so the entry module can print one line and exit.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from config import parsers as parse
from config.parsers import (
    MIN_TOKEN_CHARS,
    REDIS_CERT_REQS,
    Env,
    SettingsError,
    redact_url,
    redis_tls_params,
    sentinel_target,
    with_cert_reqs,
    with_sentinels,
)

__all__ = [
    "MIN_TOKEN_CHARS",
    "Settings",
    "SettingsError",
    "configure_logging_level",
    "redact_url",
    "redis_tls_params",
    "sentinel_target",
]

WEB_WORKER_CLASSES = ("gthread", "sync")
PSYCOPG_PREPARE_THRESHOLD = 5
"""psycopg's own default: a statement run this many times on a connection is then prepared."""
NO_SECRETS: tuple[bytes, ...] = ()
SECRET_FIELDS = frozenset(
    {"webhook_secrets", "ops_api_token", "metrics_token", "voucherify_app_token"}
)


@dataclass(frozen=True, slots=True)
class Settings:
    # --- docs/contract.md ---------------------------------------------------------------
    database_url: str
    """Required; ``scripts/dev`` supplies an embedded local one for local runs."""
    redis_url: str
    """Required; ``scripts/dev`` supplies an embedded local one for local runs. With
    ``REDIS_SENTINELS`` the Sentinels ride in its query (``config.parsers.with_sentinels``):
    this one string is what every Redis client of every process is made from."""
    webhook_secrets: tuple[bytes, ...] = ()
    port: int = 8000
    ops_api_token: str | None = None
    """At least ``MIN_TOKEN_CHARS`` characters; without it the ``/ops/`` tree answers 404."""
    max_body_bytes: int = 1_048_576
    """Real webhooks are 6-10 KB; a larger body is answered 413 before it is read."""
    log_level: str = "INFO"

    # --- receiver --------------------------------------------------------------------
    enqueue_timeout_seconds: float = 5.0
    """Total time the receiver spends retrying a failing broker before answering 503."""
    enqueue_min_replicas: int = 0
    """Replicas that must confirm each accepted delivery (``WAIT``) before the 202; fewer
    within ``enqueue_replica_timeout_ms``: 503 with ``Retry-After``. 0: no ``WAIT``."""
    enqueue_replica_timeout_ms: int = 500
    """How long the receiver's ``WAIT`` waits for the replicas' confirmation."""
    web_concurrency: int = 2
    """gunicorn worker processes of one ``web``."""
    web_worker_class: str = "gthread"
    web_threads: int = 8
    """Threads per gunicorn worker (gthread); 1 with the sync class."""
    web_request_timeout_seconds: float = 10.0
    """How long a request may take to arrive once its first byte came; then it is dropped."""
    forwarded_allow_ips: str = "127.0.0.1,::1"
    """Peers whose X-Forwarded-Proto/-For gunicorn trusts (the load balancer; ``*``: any)."""
    metrics_token: str | None = None
    """When set, ``/metrics`` answers only ``Authorization: Bearer <token>``."""

    # --- workers ---------------------------------------------------------------------
    worker_concurrency: int = 2
    """Celery prefork processes of one ``worker`` (the Procfile passes it to celery)."""
    db_pool_max_size: int = 4
    """Connections of the pool of one worker process (each prefork process; a job run outside
    a worker), and the default of ``web_db_pool_max_size``."""
    event_max_retries: int = 12
    retry_backoff_max_seconds: int = 120
    broker_visibility_timeout_seconds: int = 300
    worker_batch_size: int = 100
    """Deliveries applied in one PostgreSQL transaction by one batch (``WORKER_BATCH_SIZE``);
    1: no batching, one task and one transaction per delivery, as before issue 12."""
    worker_batch_flush_ms: int = 50
    """Longest wait of a delivery for its batch to fill before the batch is applied anyway
    (``WORKER_BATCH_FLUSH_MS``): the lag a low rate adds."""
    worker_metrics_port: int = 9808
    """Port of the worker's Prometheus endpoint (multi-process mode); 0: none."""
    worker_metrics_host: str = "127.0.0.1"
    """Address the worker's Prometheus endpoint listens on (loopback unless told)."""

    # --- database connections (docs/deployment.md, "Connections and PgBouncer") --------
    database_pooler: str = "none"
    """What ``DATABASE_URL`` points at: ``none``, PostgreSQL itself; ``pgbouncer``, PgBouncer in
    transaction mode, which hands a server connection to another client after each
    transaction: then no connection of ours prepares statements (``db_prepare_threshold``)."""
    web_db_pool_max_size: int = 4
    """Connections of the ops pool of one gunicorn process (``/ops/``, the gauges of
    ``/metrics``); its ``/readyz`` pool adds one. Unset: ``DB_POOL_MAX_SIZE``."""

    # --- reconciliation jobs -----------------------------------------------------------
    redrive_after_seconds: int = 600
    redrive_interval_seconds: int = 60
    verify_interval_seconds: int = 900
    verify_after_seconds: int = 3600
    drift_interval_seconds: int = 3600
    retention_interval_seconds: int = 86400
    retention_days: int = 30
    retention_event_ids_days: int = 90
    """Event ids (no bodies) are kept this long after an event was last seen, for dedup."""
    voucherify_api_url: str | None = None
    voucherify_app_id: str | None = None
    voucherify_app_token: str | None = None
    voucherify_api_calls_per_minute: int = 33
    """Calls all jobs together may make to Voucherify's API per minute (Business: 100)."""
    voucherify_api_calls_per_day: int = 500
    """Calls all jobs together may make per UTC day (Business: 100,000 per billing cycle)."""

    def redacted(self) -> dict[str, Any]:
        """Every setting by name, secrets as ``***`` and URLs without their password:
        what may be printed (``vfy-pipeline config check``, ``repr``)."""
        shown: dict[str, Any] = {}
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if field.name in SECRET_FIELDS and value:
                value = "***"
            elif field.name in ("database_url", "redis_url") and value:
                value = redact_url(value)
            shown[field.name] = value
        return shown

    def __repr__(self) -> str:  # never print secrets
        parts = [f"{name}={value!r}" for name, value in self.redacted().items()]
        return f"Settings({', '.join(parts)})"

    @property
    def db_prepare_threshold(self) -> int | None:
        """psycopg's ``prepare_threshold`` for our connections: None (prepare nothing) behind
        PgBouncer in transaction mode, where a statement prepared on one server connection
        is missing on the next one, or already there under the same name for another
        client; psycopg's default otherwise."""
        return None if self.database_pooler == "pgbouncer" else PSYCOPG_PREPARE_THRESHOLD

    @property
    def voucherify_api_enabled(self) -> bool:
        return bool(
            self.voucherify_api_url and self.voucherify_app_id and self.voucherify_app_token
        )

    def require_webhook_secrets(self) -> tuple[bytes, ...]:
        """The web process cannot verify anything without a secret: fail at start-up."""
        if not self.webhook_secrets:
            raise SettingsError(
                "VOUCHERIFY_WEBHOOK_SECRET",
                "required for the web process (the secret from Voucherify's Project settings "
                "-> Webhooks; several may be given separated by commas)",
            )
        return self.webhook_secrets

    @classmethod
    def from_env(cls, environ: Mapping[str, str]) -> Settings:
        env = Env(environ)
        pool_max_size = env.get("DB_POOL_MAX_SIZE", parse.int_range(1, 100), 4)
        return cls(
            **_contract(env),
            **_web(env, pool_max_size),
            **_workers(env, pool_max_size),
            **_jobs(env),
        ).checked()

    @property
    def redis_sentinel(self) -> parse.SentinelTarget | None:
        """The Sentinels ``redis_url`` names, or None: one Redis at the URL's address."""
        return sentinel_target(self.redis_url)

    def checked(self) -> Settings:
        if (
            self.enqueue_min_replicas
            and self.enqueue_replica_timeout_ms >= self.enqueue_timeout_seconds * 1000
        ):
            raise SettingsError(
                "ENQUEUE_REPLICA_TIMEOUT_MS",
                f"must be below ENQUEUE_TIMEOUT_SECONDS ({self.enqueue_timeout_seconds:g} s): "
                "the WAIT is part of the time a 202 may take",
            )
        if self.web_worker_class == "sync" and self.web_threads != 1:
            # gunicorn silently runs gthread when a sync worker is given threads.
            return dataclasses.replace(self, web_threads=1).checked()
        if self.retry_backoff_max_seconds >= self.broker_visibility_timeout_seconds:
            # A retry countdown longer than the visibility timeout makes Redis hand the
            # waiting message to another worker: the retry would run twice.
            raise SettingsError(
                "RETRY_BACKOFF_MAX_SECONDS",
                f"must be below BROKER_VISIBILITY_TIMEOUT_SECONDS "
                f"({self.broker_visibility_timeout_seconds})",
            )
        return self


def _contract(env: Env) -> dict[str, Any]:
    """The variables of docs/contract.md."""
    return dict(
        database_url=env.require(
            "DATABASE_URL",
            parse.postgres_url,
            "a PostgreSQL DSN (postgresql://user:password@host:5432/db)",
        ),
        redis_url=_redis_target(env),
        webhook_secrets=env.get("VOUCHERIFY_WEBHOOK_SECRET", parse.secrets, NO_SECRETS),
        port=env.get("PORT", parse.int_range(1, 65535), 8000),
        ops_api_token=env.get("OPS_API_TOKEN", parse.long_token, None),
        max_body_bytes=env.get("MAX_BODY_BYTES", parse.int_range(1, 1 << 30), 1_048_576),
        log_level=env.get("LOG_LEVEL", parse.log_level, "INFO"),
    )


def _redis_target(env: Env) -> str:
    """``REDIS_URL``, with ``REDIS_SSL_CERT_REQS`` applied and the Sentinels, if named, in its
    query (``with_sentinels``)."""
    url = with_cert_reqs(
        env.require(
            "REDIS_URL",
            parse.redis_url,
            "a Redis DSN of the Celery broker (redis:// or rediss://)",
        ),
        env.get("REDIS_SSL_CERT_REQS", parse.choice(REDIS_CERT_REQS), None),
    )
    no_sentinels: tuple[parse.Address, ...] = ()
    sentinels = env.get("REDIS_SENTINELS", parse.sentinel_addresses, no_sentinels)
    master = env.get("REDIS_SENTINEL_MASTER", parse.sentinel_master, "mymaster")
    password = env.get("REDIS_SENTINEL_PASSWORD", parse.token, None)
    if not sentinels and password:
        raise SettingsError("REDIS_SENTINEL_PASSWORD", "given without REDIS_SENTINELS")
    try:
        return with_sentinels(url, sentinels, master, password)
    except ValueError as exc:
        raise SettingsError("REDIS_SENTINELS", str(exc)) from None


def _web(env: Env, pool_max_size: int) -> dict[str, Any]:
    """The web process."""
    return dict(
        enqueue_timeout_seconds=env.get("ENQUEUE_TIMEOUT_SECONDS", parse.seconds(0.1, 6.0), 5.0),
        enqueue_min_replicas=env.get("ENQUEUE_MIN_REPLICAS", parse.int_range(0, 16), 0),
        enqueue_replica_timeout_ms=env.get(
            "ENQUEUE_REPLICA_TIMEOUT_MS", parse.int_range(1, 5000), 500
        ),
        web_concurrency=env.get("WEB_CONCURRENCY", parse.int_range(1, 64), 2),
        web_worker_class=env.get("WEB_WORKER_CLASS", parse.choice(WEB_WORKER_CLASSES), "gthread"),
        web_threads=env.get("WEB_THREADS", parse.int_range(1, 256), 8),
        web_request_timeout_seconds=env.get(
            "WEB_REQUEST_TIMEOUT_SECONDS", parse.seconds(1.0, 60.0), 10.0
        ),
        forwarded_allow_ips=env.get("FORWARDED_ALLOW_IPS", parse.address_list, "127.0.0.1,::1"),
        metrics_token=env.get("METRICS_TOKEN", parse.long_token, None),
        web_db_pool_max_size=env.get(
            "WEB_DB_POOL_MAX_SIZE", parse.int_range(1, 100), pool_max_size
        ),
    )


def _workers(env: Env, pool_max_size: int) -> dict[str, Any]:
    """The workers, and how every process connects to PostgreSQL."""
    return dict(
        worker_concurrency=env.get("WORKER_CONCURRENCY", parse.int_range(1, 64), 2),
        db_pool_max_size=pool_max_size,
        event_max_retries=env.get("EVENT_MAX_RETRIES", parse.int_range(0, 100), 12),
        retry_backoff_max_seconds=env.get(
            "RETRY_BACKOFF_MAX_SECONDS", parse.int_range(1, 3600), 120
        ),
        broker_visibility_timeout_seconds=env.get(
            "BROKER_VISIBILITY_TIMEOUT_SECONDS", parse.int_range(10, 86400), 300
        ),
        worker_batch_size=env.get("WORKER_BATCH_SIZE", parse.int_range(1, 1000), 100),
        worker_batch_flush_ms=env.get("WORKER_BATCH_FLUSH_MS", parse.int_range(1, 10_000), 50),
        worker_metrics_port=env.get("WORKER_METRICS_PORT", parse.int_range(0, 65535), 9808),
        worker_metrics_host=env.get("WORKER_METRICS_HOST", parse.host, "127.0.0.1"),
        database_pooler=env.get("DATABASE_POOLER", parse.database_pooler, "none"),
    )


def _jobs(env: Env) -> dict[str, Any]:
    """The reconciliation jobs."""
    return dict(
        redrive_after_seconds=env.get("REDRIVE_AFTER_SECONDS", parse.int_range(1, 10**7), 600),
        redrive_interval_seconds=env.get("REDRIVE_INTERVAL_SECONDS", parse.int_range(1, 10**7), 60),
        verify_interval_seconds=env.get("VERIFY_INTERVAL_SECONDS", parse.int_range(1, 10**7), 900),
        verify_after_seconds=env.get("VERIFY_AFTER_SECONDS", parse.int_range(1, 10**7), 3600),
        drift_interval_seconds=env.get("DRIFT_INTERVAL_SECONDS", parse.int_range(1, 10**7), 3600),
        retention_interval_seconds=env.get(
            "RETENTION_INTERVAL_SECONDS", parse.int_range(1, 10**7), 86400
        ),
        retention_days=env.get("RETENTION_DAYS", parse.int_range(7, 36500), 30),
        retention_event_ids_days=env.get(
            "RETENTION_EVENT_IDS_DAYS", parse.int_range(15, 36500), 90
        ),
        voucherify_api_url=env.get("VOUCHERIFY_API_URL", parse.http_url, None),
        voucherify_app_id=env.get("VOUCHERIFY_APP_ID", parse.token, None),
        voucherify_app_token=env.get("VOUCHERIFY_APP_TOKEN", parse.token, None),
        voucherify_api_calls_per_minute=env.get(
            "VOUCHERIFY_API_CALLS_PER_MINUTE", parse.int_range(1, 10_000), 33
        ),
        voucherify_api_calls_per_day=env.get(
            "VOUCHERIFY_API_CALLS_PER_DAY", parse.int_range(1, 10_000_000), 500
        ),
    )


def configure_logging_level(settings: Settings) -> int:
    return int(logging.getLevelName(settings.log_level))
