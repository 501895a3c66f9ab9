"""One frozen, typed settings object built from the environment.

Every process (web, worker, beat, release, the CLI) builds exactly one ``Settings`` from
``os.environ`` in its entry module and passes it down. A missing required value
(``DATABASE_URL``, ``REDIS_URL``) or a malformed one raises ``SettingsError`` whose message
starts with the variable's name, so the entry module can print one line and exit.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import logging
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TypeVar
from urllib.parse import parse_qs, urlsplit

T = TypeVar("T")

LOG_LEVELS = ("CRITICAL", "ERROR", "WARNING", "INFO", "DEBUG")
WEB_WORKER_CLASSES = ("gthread", "sync")
DATABASE_POOLERS = ("none", "pgbouncer")
"""``DATABASE_POOLER``: what ``DATABASE_URL`` points at (PostgreSQL itself, or PgBouncer)."""
PSYCOPG_PREPARE_THRESHOLD = 5
"""psycopg's own default: a statement run this many times on a connection is then prepared."""


class SettingsError(ValueError):
    """A variable is missing or malformed; the message names it."""

    def __init__(self, variable: str, problem: str) -> None:
        super().__init__(f"{variable}: {problem}")
        self.variable = variable


@dataclass(frozen=True, slots=True)
class Settings:
    # --- CONTRACT.md ---------------------------------------------------------------
    database_url: str
    """Required; ``scripts/dev`` supplies an embedded local one for local runs."""
    redis_url: str
    """Required; ``scripts/dev`` supplies an embedded local one for local runs."""
    webhook_secrets: tuple[bytes, ...] = ()
    port: int = 8000
    ops_api_token: str | None = None
    """At least ``MIN_TOKEN_CHARS`` characters; without it the ``/ops/`` tree answers 404."""
    max_body_bytes: int = 262_144
    """Real webhooks are 6-10 KB; a larger body is answered 413 before it is read."""
    log_level: str = "INFO"

    # --- receiver --------------------------------------------------------------------
    enqueue_timeout_seconds: float = 5.0
    """Total time the receiver spends retrying a failing broker before answering 503."""
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
    redrive_max_attempts: int = 5
    redrive_interval_seconds: int = 300
    verify_interval_seconds: int = 900
    verify_after_seconds: int = 3600
    drift_interval_seconds: int = 3600
    retention_interval_seconds: int = 86400
    retention_days: int = 30
    retention_event_ids_days: int = 90
    """Event ids (no bodies) are kept this long after an event was last seen, for dedup."""
    verify_batch_size: int = 100
    voucherify_api_url: str | None = None
    voucherify_app_id: str | None = None
    voucherify_app_token: str | None = None
    voucherify_api_rate: float = 5.0
    """Requests per second the verify job may send to Voucherify's API."""

    def __repr__(self) -> str:  # never print secrets
        hidden = {"webhook_secrets", "ops_api_token", "metrics_token", "voucherify_app_token"}
        parts = []
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if field.name in hidden and value:
                value = "***"
            elif field.name in ("database_url", "redis_url") and value:
                value = redact_url(value)
            parts.append(f"{field.name}={value!r}")
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
        env = _Env(environ)
        pool_max_size = env.get("DB_POOL_MAX_SIZE", _int_range(1, 100), 4)
        return cls(
            database_url=env.require(
                "DATABASE_URL",
                _postgres_url,
                "a PostgreSQL DSN (postgresql://user:password@host:5432/db)",
            ),
            redis_url=with_cert_reqs(
                env.require(
                    "REDIS_URL",
                    _redis_url,
                    "a Redis DSN of the Celery broker (redis:// or rediss://)",
                ),
                env.get("REDIS_SSL_CERT_REQS", _choice(REDIS_CERT_REQS), None),
            ),
            webhook_secrets=env.get("VOUCHERIFY_WEBHOOK_SECRET", _secrets, ()),
            port=env.get("PORT", _int_range(1, 65535), 8000),
            ops_api_token=env.get("OPS_API_TOKEN", _long_token, None),
            max_body_bytes=env.get("MAX_BODY_BYTES", _int_range(1, 1 << 30), 262_144),
            log_level=env.get("LOG_LEVEL", _log_level, "INFO"),
            enqueue_timeout_seconds=env.get("ENQUEUE_TIMEOUT_SECONDS", _seconds(0.1, 6.0), 5.0),
            web_concurrency=env.get("WEB_CONCURRENCY", _int_range(1, 64), 2),
            web_worker_class=env.get("WEB_WORKER_CLASS", _choice(WEB_WORKER_CLASSES), "gthread"),
            web_threads=env.get("WEB_THREADS", _int_range(1, 256), 8),
            web_request_timeout_seconds=env.get(
                "WEB_REQUEST_TIMEOUT_SECONDS", _seconds(1.0, 60.0), 10.0
            ),
            forwarded_allow_ips=env.get("FORWARDED_ALLOW_IPS", _address_list, "127.0.0.1,::1"),
            metrics_token=env.get("METRICS_TOKEN", _long_token, None),
            worker_concurrency=env.get("WORKER_CONCURRENCY", _int_range(1, 64), 2),
            db_pool_max_size=pool_max_size,
            event_max_retries=env.get("EVENT_MAX_RETRIES", _int_range(0, 100), 12),
            retry_backoff_max_seconds=env.get(
                "RETRY_BACKOFF_MAX_SECONDS", _int_range(1, 3600), 120
            ),
            broker_visibility_timeout_seconds=env.get(
                "BROKER_VISIBILITY_TIMEOUT_SECONDS", _int_range(10, 86400), 300
            ),
            worker_metrics_port=env.get("WORKER_METRICS_PORT", _int_range(0, 65535), 9808),
            worker_metrics_host=env.get("WORKER_METRICS_HOST", _host, "127.0.0.1"),
            # database connections
            database_pooler=env.get("DATABASE_POOLER", _database_pooler, "none"),
            web_db_pool_max_size=env.get("WEB_DB_POOL_MAX_SIZE", _int_range(1, 100), pool_max_size),
            redrive_after_seconds=env.get("REDRIVE_AFTER_SECONDS", _int_range(1, 10**7), 600),
            redrive_max_attempts=env.get("REDRIVE_MAX_ATTEMPTS", _int_range(1, 1000), 5),
            redrive_interval_seconds=env.get("REDRIVE_INTERVAL_SECONDS", _int_range(1, 10**7), 300),
            verify_interval_seconds=env.get("VERIFY_INTERVAL_SECONDS", _int_range(1, 10**7), 900),
            verify_after_seconds=env.get("VERIFY_AFTER_SECONDS", _int_range(1, 10**7), 3600),
            drift_interval_seconds=env.get("DRIFT_INTERVAL_SECONDS", _int_range(1, 10**7), 3600),
            retention_interval_seconds=env.get(
                "RETENTION_INTERVAL_SECONDS", _int_range(1, 10**7), 86400
            ),
            retention_days=env.get("RETENTION_DAYS", _int_range(7, 36500), 30),
            retention_event_ids_days=env.get("RETENTION_EVENT_IDS_DAYS", _int_range(15, 36500), 90),
            verify_batch_size=env.get("VERIFY_BATCH_SIZE", _int_range(1, 10_000), 100),
            voucherify_api_url=env.get("VOUCHERIFY_API_URL", _http_url, None),
            voucherify_app_id=env.get("VOUCHERIFY_APP_ID", _token, None),
            voucherify_app_token=env.get("VOUCHERIFY_APP_TOKEN", _token, None),
            voucherify_api_rate=env.get(
                "VOUCHERIFY_API_RATE", _number(0.1, 100.0, "requests per second"), 5.0
            ),
        ).checked()

    def checked(self) -> Settings:
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


# libpq and redis-py both also take the password as a query parameter.
_PASSWORD_PARAM = re.compile(r"((?:^|&)password=)[^&]*", re.IGNORECASE)


def redact_url(url: str) -> str:
    """The URL without its password (user-info or ``?password=``), for logs."""
    parts = urlsplit(url)
    query = _PASSWORD_PARAM.sub(r"\1***", parts.query)
    if parts.password is None and query == parts.query:
        return url
    netloc = parts.netloc
    if parts.password is not None:
        netloc = netloc.replace(f":{parts.password}@", ":***@")
    return parts._replace(netloc=netloc, query=query).geturl()


class _Env:
    def __init__(self, environ: Mapping[str, str]) -> None:
        self._environ = environ

    def get(self, name: str, parse: Callable[[str], T], default: T) -> T:
        raw = self._environ.get(name)
        if raw is None or raw.strip() == "":
            return default
        return self._parse(name, parse, raw)

    def require(self, name: str, parse: Callable[[str], T], what: str) -> T:
        """A variable without a default: unset or blank stops the process, naming it."""
        raw = self._environ.get(name)
        if raw is None or raw.strip() == "":
            raise SettingsError(
                name,
                f"required: {what}; for local runs scripts/dev supplies one from embedded "
                'servers under .local/ (in another shell: eval "$(scripts/dev env)")',
            )
        return self._parse(name, parse, raw)

    @staticmethod
    def _parse(name: str, parse: Callable[[str], T], raw: str) -> T:
        try:
            return parse(raw.strip())
        except ValueError as exc:
            raise SettingsError(name, str(exc)) from None


def _int_range(low: int, high: int) -> Callable[[str], int]:
    def parse(raw: str) -> int:
        try:
            value = int(raw)
        except ValueError:
            raise ValueError(f"expected an integer, got {raw!r}") from None
        if not low <= value <= high:
            raise ValueError(f"expected an integer from {low} to {high}, got {value}")
        return value

    return parse


def _number(low: float, high: float, unit: str) -> Callable[[str], float]:
    def parse(raw: str) -> float:
        try:
            value = float(raw)
        except ValueError:
            raise ValueError(f"expected a number of {unit}, got {raw!r}") from None
        if not low <= value <= high:  # also false for nan
            raise ValueError(f"expected a number of {unit} from {low} to {high}, got {value}")
        return value

    return parse


def _seconds(low: float, high: float) -> Callable[[str], float]:
    return _number(low, high, "seconds")


def _choice(choices: tuple[str, ...]) -> Callable[[str], str]:
    def parse(raw: str) -> str:
        if raw not in choices:
            raise ValueError(f"expected one of {', '.join(choices)}, got {raw!r}")
        return raw

    return parse


def _url(schemes: tuple[str, ...], what: str) -> Callable[[str], str]:
    def parse(raw: str) -> str:
        try:
            parts = urlsplit(raw)
            parts.port  # noqa: B018 - raises ValueError on a bad port
        except ValueError:
            # Not urlsplit's message: it quotes the bad "port", which is a piece of the
            # password when the password holds an unencoded '/', '?' or '#'.
            raise ValueError(
                f"not a valid {what} URL (bad host or port; percent-encode special "
                "characters in the user name and password)"
            ) from None
        if parts.scheme not in schemes:
            raise ValueError(
                f"not a valid {what} URL: the scheme must be one of {', '.join(schemes)}"
            )
        if parts.scheme not in ("unix",) and not parts.hostname and "host=" not in parts.query:
            raise ValueError(f"not a valid {what} URL: no host")
        return raw

    return parse


_postgres_url = _url(("postgresql", "postgres"), "PostgreSQL")
_redis_dsn = _url(("redis", "rediss", "unix"), "Redis")

REDIS_TLS_PARAMS = ("ssl_cert_reqs", "ssl_ca_certs", "ssl_check_hostname")
"""The TLS options a ``rediss://`` URL may carry in its query (Heroku: ``?ssl_cert_reqs=none``)."""
REDIS_CERT_REQS = ("none", "optional", "required")


def redis_tls_params(url: str) -> dict[str, str]:
    """The TLS options in a Redis URL's query, checked, as given (``{}`` when none).

    redis-py (every client of ``workers.queue.connect``, and those that read the URL
    themselves) and kombu (the worker's and beat's broker connection) each parse the same
    query their own way, so only what both read alike is accepted: ``ssl_cert_reqs``
    (``none``, ``optional`` or ``required``, lower-case), ``ssl_ca_certs`` (the path of a CA
    bundle), ``ssl_check_hostname`` (``true`` or ``false``), once each, and only with
    ``rediss://`` (on ``redis://`` kombu would turn TLS on where redis-py fails). Anything
    else ``ssl_…`` raises ``ValueError`` naming it; ``workers.queue.tls_options`` turns the
    result into the libraries' options.
    """
    parts = urlsplit(url)
    given = {k: v for k, v in parse_qs(parts.query).items() if k.startswith("ssl_")}
    if not given:
        return {}
    if parts.scheme != "rediss":
        raise ValueError(
            f"{', '.join(sorted(given))}: TLS options need a rediss:// URL (TLS), not "
            f"{parts.scheme}://"
        )
    params: dict[str, str] = {}
    for name, values in sorted(given.items()):
        if name not in REDIS_TLS_PARAMS:
            raise ValueError(
                f"unsupported TLS option {name!r} (supported: {', '.join(REDIS_TLS_PARAMS)})"
            )
        if len(values) > 1:
            raise ValueError(f"TLS option {name!r} given {len(values)} times")
        params[name] = values[0]
    reqs = params.get("ssl_cert_reqs")
    if reqs is not None and reqs not in REDIS_CERT_REQS:
        raise ValueError(f"ssl_cert_reqs must be one of {', '.join(REDIS_CERT_REQS)}, got {reqs!r}")
    hostname = params.get("ssl_check_hostname")
    if hostname is not None and hostname not in ("true", "false"):
        raise ValueError(f"ssl_check_hostname must be true or false, got {hostname!r}")
    return params


def with_cert_reqs(url: str, cert_reqs: str | None) -> str:
    """``REDIS_URL`` with ``REDIS_SSL_CERT_REQS`` applied: for a ``rediss://`` URL whose query
    does not say ``ssl_cert_reqs`` itself (the URL wins), it is added to the query.

    Heroku Redis owns ``REDIS_URL`` (it cannot be overwritten and is rewritten when the
    credentials rotate), and its certificate is self-signed: ``REDIS_SSL_CERT_REQS=none``
    says once what its URL cannot carry. Every process then sees the same URL.
    """
    parts = urlsplit(url)
    if cert_reqs is None or parts.scheme != "rediss" or "ssl_cert_reqs" in redis_tls_params(url):
        return url
    query = (
        f"{parts.query}&ssl_cert_reqs={cert_reqs}" if parts.query else f"ssl_cert_reqs={cert_reqs}"
    )
    return parts._replace(query=query).geturl()


def _redis_url(raw: str) -> str:
    """A Redis DSN; its TLS options (``redis_tls_params``) are checked here, at start-up."""
    url = _redis_dsn(raw)
    redis_tls_params(url)
    return url


_http_url = _url(("http", "https"), "HTTP")


def _secrets(raw: str) -> tuple[bytes, ...]:
    secrets = tuple(part.strip().encode() for part in raw.split(",") if part.strip())
    if not secrets:
        raise ValueError("no secret given (only commas and blanks)")
    return secrets


MIN_TOKEN_CHARS = 32


def _long_token(raw: str) -> str:
    """A bearer token that guards the ops tools or the metrics: long enough not to guess."""
    token = _token(raw)
    if len(token) < MIN_TOKEN_CHARS:
        raise ValueError(
            f"must be at least {MIN_TOKEN_CHARS} characters (it has {len(token)}); "
            "make one with: python3 -c 'import secrets; print(secrets.token_urlsafe(32))'"
        )
    return token


def _address_list(raw: str) -> str:
    """gunicorn's ``forwarded_allow_ips``: ``*`` or comma-separated IP addresses/networks."""
    if raw == "*":
        return raw
    parts = [part.strip() for part in raw.split(",") if part.strip()]
    if not parts:
        raise ValueError("expected * or comma-separated IP addresses")
    for part in parts:
        try:
            ipaddress.ip_network(part, strict=False)
        except ValueError:
            raise ValueError(f"not an IP address or network: {part!r}") from None
    return ",".join(parts)


def _host(raw: str) -> str:
    try:
        ipaddress.ip_address(raw)
    except ValueError:
        raise ValueError(f"expected an IP address to listen on, got {raw!r}") from None
    return raw


def _token(raw: str) -> str:
    if any(ch.isspace() for ch in raw):
        raise ValueError("must not contain whitespace")
    return raw


def _database_pooler(raw: str) -> str:
    pooler = raw.lower()
    if pooler not in DATABASE_POOLERS:
        raise ValueError(
            f"expected one of {', '.join(DATABASE_POOLERS)} (pgbouncer: PgBouncer in "
            f"transaction mode), got {raw!r}"
        )
    return pooler


def _log_level(raw: str) -> str:
    level = raw.upper()
    if level not in LOG_LEVELS:
        raise ValueError(f"expected one of {', '.join(LOG_LEVELS)}, got {raw!r}")
    return level


def configure_logging_level(settings: Settings) -> int:
    return int(logging.getLevelName(settings.log_level))
