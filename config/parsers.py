"""Parsing one environment variable: a value of the right type and range, or a
``SettingsError`` whose message starts with the variable's name.

``Env`` reads a mapping (``os.environ``); each parser takes the raw text and returns the
value or raises ``ValueError`` saying what is wrong, which ``Env`` turns into a
``SettingsError`` naming the variable. ``config.settings`` says which variable uses which.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TypeVar
from urllib.parse import parse_qs, parse_qsl, urlencode, urlsplit

T = TypeVar("T")

LOG_LEVELS = ("CRITICAL", "ERROR", "WARNING", "INFO", "DEBUG")
DATABASE_POOLERS = ("none", "pgbouncer")
"""``DATABASE_POOLER``: what ``DATABASE_URL`` points at (PostgreSQL itself, or PgBouncer)."""


class SettingsError(ValueError):
    """A variable is missing or malformed; the message names it."""

    def __init__(self, variable: str, problem: str) -> None:
        super().__init__(f"{variable}: {problem}")
        self.variable = variable


# libpq and redis-py both also take the password as a query parameter; the Redis target
# carries the Sentinels' own password as one (``with_sentinels``).
_PASSWORD_PARAM = re.compile(r"((?:^|&)(?:sentinel_)?password=)[^&]*", re.IGNORECASE)


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


class Env:
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


def int_range(low: int, high: int) -> Callable[[str], int]:
    def parse(raw: str) -> int:
        try:
            value = int(raw)
        except ValueError:
            raise ValueError(f"expected an integer, got {raw!r}") from None
        if not low <= value <= high:
            raise ValueError(f"expected an integer from {low} to {high}, got {value}")
        return value

    return parse


def number(low: float, high: float, unit: str) -> Callable[[str], float]:
    def parse(raw: str) -> float:
        try:
            value = float(raw)
        except ValueError:
            raise ValueError(f"expected a number of {unit}, got {raw!r}") from None
        if not low <= value <= high:  # also false for nan
            raise ValueError(f"expected a number of {unit} from {low} to {high}, got {value}")
        return value

    return parse


def seconds(low: float, high: float) -> Callable[[str], float]:
    return number(low, high, "seconds")


def choice(choices: tuple[str, ...]) -> Callable[[str], str]:
    def parse(raw: str) -> str:
        if raw not in choices:
            raise ValueError(f"expected one of {', '.join(choices)}, got {raw!r}")
        return raw

    return parse


def url(schemes: tuple[str, ...], what: str) -> Callable[[str], str]:
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


postgres_url = url(("postgresql", "postgres"), "PostgreSQL")
redis_dsn = url(("redis", "rediss", "unix"), "Redis")

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


def redis_url(raw: str) -> str:
    """A Redis DSN; its TLS options (``redis_tls_params``) are checked here, at start-up."""
    url = redis_dsn(raw)
    redis_tls_params(url)
    given = sorted({k for k, _ in parse_qsl(urlsplit(url).query)} & set(SENTINEL_PARAMS))
    if given:
        raise ValueError(
            f"{', '.join(given)}: name the Sentinels with REDIS_SENTINELS and "
            "REDIS_SENTINEL_MASTER (REDIS_SENTINEL_PASSWORD), not in the URL"
        )
    return url


# --- Redis Sentinel (docs/deployment.md, "Redis Sentinel") ------------------------------

DEFAULT_SENTINEL_PORT = 26379
SENTINEL_PARAMS = ("sentinels", "sentinel_master", "sentinel_password")
"""The query parameters of the Redis target that name the Sentinels (``with_sentinels``)."""

Address = tuple[str, int]


def sentinel_addresses(raw: str) -> tuple[Address, ...]:
    """``REDIS_SENTINELS``: ``host:port`` (or ``host``: port 26379; ``[v6]:port``), by commas."""
    addresses: list[Address] = []
    for part in (p.strip() for p in raw.split(",")):
        if not part:
            continue
        try:
            parts = urlsplit(f"//{part}")
            port = parts.port or DEFAULT_SENTINEL_PORT
        except ValueError:
            raise ValueError(f"not a host:port: {part!r}") from None
        if not parts.hostname or parts.path or parts.query or "@" in part:
            raise ValueError(f"not a host:port: {part!r}")
        address = (parts.hostname, port)
        if address in addresses:
            raise ValueError(f"{part!r} given twice")
        addresses.append(address)
    if not addresses:
        raise ValueError("expected comma-separated host:port of the Sentinels")
    return tuple(addresses)


@dataclass(frozen=True, slots=True)
class SentinelTarget:
    """Where the Sentinels are, which primary to ask them for, and how to talk to it."""

    sentinels: tuple[Address, ...]
    master: str
    password: str | None
    """The Sentinels' own password (``requirepass`` of sentinel.conf), if they have one."""
    url: str
    """``REDIS_URL`` as given: the primary's user, password, database number and TLS."""


def with_sentinels(
    url: str, sentinels: tuple[Address, ...], master: str, password: str | None
) -> str:
    """The Redis target: ``REDIS_URL``, and when Sentinels are named, them in its query.

    Every Redis client of every process is made from this one string
    (``workers.queue.connect``, and the Celery broker in ``workers.celery_app``), so the
    Sentinel settings reach the receiver, the workers, beat, the jobs and the CLI with the
    URL they already pass around; ``sentinel_target`` reads them back.
    """
    if not sentinels:
        return url
    if urlsplit(url).scheme == "unix":
        raise ValueError("a unix:// REDIS_URL cannot be combined with Sentinels")
    params = [
        ("sentinels", ",".join(_address_text(a) for a in sentinels)),
        ("sentinel_master", master),
    ]
    if password:
        params.append(("sentinel_password", password))
    parts = urlsplit(url)
    extra = urlencode(params, safe=",:[]")
    return parts._replace(query=f"{parts.query}&{extra}" if parts.query else extra).geturl()


def sentinel_target(target: str) -> SentinelTarget | None:
    """The Sentinels a Redis target names (``with_sentinels``), or None: a plain URL."""
    parts = urlsplit(target)
    pairs = parse_qsl(parts.query, keep_blank_values=True)
    named = dict(p for p in pairs if p[0] in SENTINEL_PARAMS)
    if "sentinels" not in named:
        return None
    rest = urlencode([p for p in pairs if p[0] not in SENTINEL_PARAMS])
    return SentinelTarget(
        sentinels=sentinel_addresses(named["sentinels"]),
        master=named.get("sentinel_master", "mymaster"),
        password=named.get("sentinel_password") or None,
        url=parts._replace(query=rest).geturl(),
    )


_MASTER_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")


def sentinel_master(raw: str) -> str:
    """``REDIS_SENTINEL_MASTER``: the name under which the Sentinels monitor the primary."""
    if not _MASTER_NAME.fullmatch(raw):
        raise ValueError(
            f"expected the primary's name in Sentinel (letters, digits, '.', '_', '-'), got {raw!r}"
        )
    return raw


def _address_text(address: Address) -> str:
    host, port = address
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


http_url = url(("http", "https"), "HTTP")


def secrets(raw: str) -> tuple[bytes, ...]:
    secrets = tuple(part.strip().encode() for part in raw.split(",") if part.strip())
    if not secrets:
        raise ValueError("no secret given (only commas and blanks)")
    return secrets


MIN_TOKEN_CHARS = 32


def long_token(raw: str) -> str:
    """A bearer token that guards the ops tools or the metrics: long enough not to guess."""
    given = token(raw)
    if len(given) < MIN_TOKEN_CHARS:
        raise ValueError(
            f"must be at least {MIN_TOKEN_CHARS} characters (it has {len(given)}); "
            "make one with: python3 -c 'import secrets; print(secrets.token_urlsafe(32))'"
        )
    return given


def address_list(raw: str) -> str:
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


def host(raw: str) -> str:
    try:
        ipaddress.ip_address(raw)
    except ValueError:
        raise ValueError(f"expected an IP address to listen on, got {raw!r}") from None
    return raw


def token(raw: str) -> str:
    if any(ch.isspace() for ch in raw):
        raise ValueError("must not contain whitespace")
    return raw


def database_pooler(raw: str) -> str:
    pooler = raw.lower()
    if pooler not in DATABASE_POOLERS:
        raise ValueError(
            f"expected one of {', '.join(DATABASE_POOLERS)} (pgbouncer: PgBouncer in "
            f"transaction mode), got {raw!r}"
        )
    return pooler


def log_level(raw: str) -> str:
    level = raw.upper()
    if level not in LOG_LEVELS:
        raise ValueError(f"expected one of {', '.join(LOG_LEVELS)}, got {raw!r}")
    return level
