"""A Redis URL's TLS options: read once (``tls_options``), the same for redis-py and kombu."""

from __future__ import annotations

import ssl

import pytest
import redis

from config.settings import Settings, SettingsError
from workers.celery_app import celery_config
from workers.queue import connect
from workers.queue.client import CERT_REQS as CERT_REQS_OF
from workers.queue.client import tls_options

DATABASE_URL = "postgresql://vfy:pw@db.example:5432/vfy"


def settings_for(redis_url: str) -> Settings:
    return Settings.from_env({"DATABASE_URL": DATABASE_URL, "REDIS_URL": redis_url})


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("redis://127.0.0.1:6379/0", {}),
        ("unix:///run/redis.sock?db=1", {}),
        # Heroku's documented form: a self-signed certificate, not verified.
        (
            "rediss://:pw@ec2-1-2-3-4.compute-1.amazonaws.com:6380?ssl_cert_reqs=none",
            {"ssl_cert_reqs": ssl.CERT_NONE},
        ),
        ("rediss://h:6380/0?ssl_cert_reqs=optional", {"ssl_cert_reqs": ssl.CERT_OPTIONAL}),
        ("rediss://h:6380/0?ssl_cert_reqs=required", {"ssl_cert_reqs": ssl.CERT_REQUIRED}),
        # Told nothing, the certificate is verified (kombu alone would not).
        ("rediss://h:6380/0", {"ssl_cert_reqs": ssl.CERT_REQUIRED}),
        (
            "rediss://h:6380/0?ssl_ca_certs=%2Fetc%2Fssl%2Fredis-ca.pem",
            {"ssl_cert_reqs": ssl.CERT_REQUIRED, "ssl_ca_certs": "/etc/ssl/redis-ca.pem"},
        ),
        (
            "rediss://h:6380/0?ssl_cert_reqs=required&ssl_ca_certs=/ca.pem&ssl_check_hostname=false",
            {
                "ssl_cert_reqs": ssl.CERT_REQUIRED,
                "ssl_ca_certs": "/ca.pem",
                "ssl_check_hostname": False,
            },
        ),
        # Other query parameters are redis-py's business, not TLS.
        ("rediss://h/0?health_check_interval=10", {"ssl_cert_reqs": ssl.CERT_REQUIRED}),
    ],
)
def test_tls_options(url: str, expected: dict[str, object]) -> None:
    assert tls_options(url) == expected
    assert settings_for(url).redis_url == url  # accepted, and passed on unchanged


@pytest.mark.parametrize(
    ("url", "problem"),
    [
        ("rediss://h/0?ssl_cert_reqs=CERT_NONE", "ssl_cert_reqs must be one of none"),
        ("rediss://h/0?ssl_cert_reqs=NONE", "ssl_cert_reqs must be one of none"),
        ("rediss://h/0?ssl_cert_reqs=none&ssl_cert_reqs=required", "given 2 times"),
        ("rediss://h/0?ssl_cert_req=none", "unsupported TLS option 'ssl_cert_req'"),
        ("rediss://h/0?ssl_check_hostname=0", "ssl_check_hostname must be true or false"),
        # On redis:// kombu would turn TLS on where redis-py fails: refused at start-up.
        ("redis://h/0?ssl_cert_reqs=none", "need a rediss:// URL"),
    ],
)
def test_malformed_tls_options_stop_the_process_naming_redis_url(url: str, problem: str) -> None:
    with pytest.raises(SettingsError, match=r"^REDIS_URL: ") as caught:
        settings_for(url)
    assert problem in str(caught.value)
    with pytest.raises(ValueError, match=problem):
        tls_options(url)


def test_the_broker_gets_the_same_options_as_every_redis_py_client() -> None:
    for url in (
        "rediss://:pw@h:6380?ssl_cert_reqs=none",
        "rediss://h:6380/0",
        "rediss://h:6380/0?ssl_ca_certs=/ca.pem",
    ):
        assert celery_config(settings_for(url))["broker_use_ssl"] == tls_options(url)
    # redis://: no TLS at all (kombu turns TLS on for any truthy broker_use_ssl).
    assert celery_config(settings_for("redis://h:6379/0"))["broker_use_ssl"] is False


@pytest.mark.parametrize(
    ("query", "cert_reqs", "check_hostname"),
    [
        ("ssl_cert_reqs=none", ssl.CERT_NONE, False),
        ("", ssl.CERT_REQUIRED, True),
        ("ssl_cert_reqs=required&ssl_check_hostname=false", ssl.CERT_REQUIRED, False),
    ],
)
def test_connect_makes_tls_connections_as_the_url_says(
    query: str, cert_reqs: ssl.VerifyMode, check_hostname: bool
) -> None:
    client = connect("rediss://127.0.0.1:6380/0" + (f"?{query}" if query else ""))
    try:
        pool = client.connection_pool
        connection = pool.make_connection()
        assert isinstance(connection, redis.SSLConnection)
        assert connection.cert_reqs == cert_reqs
        assert connection.check_hostname is check_hostname
    finally:
        client.close()


def test_connect_keeps_redis_urls_plain() -> None:
    client = connect("redis://127.0.0.1:6379/0")
    try:
        connection = client.connection_pool.make_connection()
        assert type(connection) is redis.Connection
    finally:
        client.close()


@pytest.mark.parametrize(
    ("url", "cert_reqs", "effective"),
    [
        ("rediss://:pw@h:6380", "none", "rediss://:pw@h:6380?ssl_cert_reqs=none"),
        (
            "rediss://h:6380/0?ssl_ca_certs=/ca",
            "required",
            "rediss://h:6380/0?ssl_ca_certs=/ca&ssl_cert_reqs=required",
        ),
        (
            "rediss://h:6380?ssl_cert_reqs=required",
            "none",
            "rediss://h:6380?ssl_cert_reqs=required",
        ),
        ("redis://h:6379/0", "none", "redis://h:6379/0"),
        ("rediss://h:6380", None, "rediss://h:6380"),
    ],
    ids=["heroku-form", "added-to-a-query", "the-url-wins", "redis-untouched", "unset"],
)
def test_redis_ssl_cert_reqs_says_what_an_add_on_owned_url_cannot(
    url: str, cert_reqs: str | None, effective: str
) -> None:
    environ = {"DATABASE_URL": "postgresql://p@h/db", "REDIS_URL": url}
    if cert_reqs is not None:
        environ["REDIS_SSL_CERT_REQS"] = cert_reqs
    settings = Settings.from_env(environ)
    assert settings.redis_url == effective
    if url.startswith("rediss"):
        said = "required" if "ssl_cert_reqs" in url else (cert_reqs or "required")
        expected = CERT_REQS_OF[said]
        assert tls_options(settings.redis_url)["ssl_cert_reqs"] == expected


def test_a_bad_redis_ssl_cert_reqs_stops_start_up() -> None:
    with pytest.raises(SettingsError, match="REDIS_SSL_CERT_REQS"):
        Settings.from_env(
            {
                "DATABASE_URL": "postgresql://p@h/db",
                "REDIS_URL": "rediss://h",
                "REDIS_SSL_CERT_REQS": "off",
            }
        )
