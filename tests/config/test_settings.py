"""``Settings.from_env``: the required URLs, defaults, coercion, one clear error per missing
or malformed variable, and no secret in its repr or its error messages."""

from __future__ import annotations

import dataclasses

import pytest

from config.settings import Settings, SettingsError, redact_url

DATABASE_URL = "postgresql://app@db.internal:5432/vfy"
REDIS_URL = "redis://cache.internal:6379/0"
URLS = {"DATABASE_URL": DATABASE_URL, "REDIS_URL": REDIS_URL}
"""The two variables without a default; every other one may be left out."""


def test_the_urls_are_required_fields_and_come_first() -> None:
    first, second, *others = dataclasses.fields(Settings)
    assert (first.name, second.name) == ("database_url", "redis_url")
    for field in (first, second):
        assert field.default is dataclasses.MISSING
        assert field.default_factory is dataclasses.MISSING
    assert all(
        field.default is not dataclasses.MISSING or field.default_factory is not dataclasses.MISSING
        for field in others
    )
    with pytest.raises(TypeError):
        Settings()  # type: ignore[call-arg]


@pytest.mark.parametrize("variable", ["DATABASE_URL", "REDIS_URL"])
@pytest.mark.parametrize("value", [None, "", "   "], ids=["unset", "empty", "blank"])
def test_a_missing_url_is_an_error_naming_it(variable: str, value: str | None) -> None:
    environ = dict(URLS)
    if value is None:
        del environ[variable]
    else:
        environ[variable] = value
    with pytest.raises(SettingsError) as caught:
        Settings.from_env(environ)
    assert caught.value.variable == variable
    message = str(caught.value)
    assert message.startswith(f"{variable}: required: ")
    assert len(message.splitlines()) == 1
    # Tells a newcomer where local ones come from.
    assert "scripts/dev" in message


def test_without_both_urls_the_database_url_is_named_first() -> None:
    with pytest.raises(SettingsError) as caught:
        Settings.from_env({})
    assert caught.value.variable == "DATABASE_URL"
    with pytest.raises(SettingsError) as caught:
        Settings.from_env({"DATABASE_URL": DATABASE_URL})
    assert caught.value.variable == "REDIS_URL"


def test_defaults_of_an_environment_with_only_the_urls() -> None:
    settings = Settings.from_env(URLS)
    assert settings == Settings(database_url=DATABASE_URL, redis_url=REDIS_URL)
    # docs/contract.md's defaults.
    assert settings.database_url == DATABASE_URL
    assert settings.redis_url == REDIS_URL
    assert settings.webhook_secrets == ()
    assert settings.port == 8000
    assert settings.ops_api_token is None
    assert settings.max_body_bytes == 1_048_576  # a 500-item order is about 400 KB
    assert settings.log_level == "INFO"
    # The receiver's and workers' own.
    assert settings.enqueue_timeout_seconds == 5.0
    assert settings.retry_backoff_max_seconds < settings.broker_visibility_timeout_seconds
    assert not settings.voucherify_api_enabled


def test_blank_values_mean_the_default() -> None:
    assert Settings.from_env({**URLS, "PORT": "  ", "LOG_LEVEL": ""}) == Settings(
        database_url=DATABASE_URL, redis_url=REDIS_URL
    )


def test_urls_are_taken_without_surrounding_blanks() -> None:
    settings = Settings.from_env(
        {"DATABASE_URL": f" {DATABASE_URL} ", "REDIS_URL": f"{REDIS_URL}\n"}
    )
    assert (settings.database_url, settings.redis_url) == (DATABASE_URL, REDIS_URL)


def test_values_are_coerced() -> None:
    settings = Settings.from_env(
        {
            "DATABASE_URL": "postgresql://app:pw@db.internal:5432/vfy",
            "REDIS_URL": "rediss://:pw@cache.internal:6380/1",
            "VOUCHERIFY_WEBHOOK_SECRET": " old , new ,",
            "PORT": " 9000 ",
            "OPS_API_TOKEN": LONG_TOKEN,
            "MAX_BODY_BYTES": "2048",
            "LOG_LEVEL": "debug",
            "ENQUEUE_TIMEOUT_SECONDS": "2.5",
        }
    )
    assert settings.database_url == "postgresql://app:pw@db.internal:5432/vfy"
    assert settings.redis_url == "rediss://:pw@cache.internal:6380/1"
    assert settings.webhook_secrets == (b"old", b"new")
    assert settings.port == 9000
    assert settings.ops_api_token == LONG_TOKEN
    assert settings.max_body_bytes == 2048
    assert settings.log_level == "DEBUG"
    assert settings.enqueue_timeout_seconds == 2.5


LONG_TOKEN = "t" * 32


def test_a_short_ops_token_is_refused_with_a_way_to_make_one() -> None:
    with pytest.raises(SettingsError, match="OPS_API_TOKEN: must be at least 32 characters"):
        Settings.from_env({**URLS, "OPS_API_TOKEN": "short-token"})


def test_probe_and_proxy_settings_have_safe_defaults() -> None:
    settings = Settings.from_env(URLS)
    assert settings.max_body_bytes == 1024 * 1024
    assert settings.forwarded_allow_ips == "127.0.0.1,::1"
    assert settings.metrics_token is None
    assert settings.worker_metrics_host == "127.0.0.1"
    assert settings.web_request_timeout_seconds == 10.0
    behind_a_router = Settings.from_env({**URLS, "FORWARDED_ALLOW_IPS": "*"})
    assert behind_a_router.forwarded_allow_ips == "*"
    networks = Settings.from_env({**URLS, "FORWARDED_ALLOW_IPS": " 10.0.0.0/8 , ::1"})
    assert networks.forwarded_allow_ips == "10.0.0.0/8,::1"


def test_settings_are_frozen() -> None:
    with pytest.raises(dataclasses.FrozenInstanceError):
        Settings(database_url=DATABASE_URL, redis_url=REDIS_URL).port = 1  # type: ignore[misc]


@pytest.mark.parametrize(
    ("environ", "variable"),
    [
        ({"DATABASE_URL": "mysql://x"}, "DATABASE_URL"),
        ({"DATABASE_URL": "not a url"}, "DATABASE_URL"),
        ({"DATABASE_URL": "postgresql://db:port/x"}, "DATABASE_URL"),
        ({"DATABASE_URL": "postgresql:///x"}, "DATABASE_URL"),
        ({"REDIS_URL": "http://x"}, "REDIS_URL"),
        ({"REDIS_URL": "redis://"}, "REDIS_URL"),
        ({"PORT": "abc"}, "PORT"),
        ({"PORT": "70000"}, "PORT"),
        ({"PORT": "0"}, "PORT"),
        ({"MAX_BODY_BYTES": "-1"}, "MAX_BODY_BYTES"),
        ({"MAX_BODY_BYTES": "1MB"}, "MAX_BODY_BYTES"),
        ({"LOG_LEVEL": "LOUD"}, "LOG_LEVEL"),
        ({"VOUCHERIFY_WEBHOOK_SECRET": " , ,"}, "VOUCHERIFY_WEBHOOK_SECRET"),
        ({"OPS_API_TOKEN": "two words"}, "OPS_API_TOKEN"),
        ({"OPS_API_TOKEN": "x" * 31}, "OPS_API_TOKEN"),
        ({"METRICS_TOKEN": "short"}, "METRICS_TOKEN"),
        ({"FORWARDED_ALLOW_IPS": "10.0.0.1,router"}, "FORWARDED_ALLOW_IPS"),
        ({"FORWARDED_ALLOW_IPS": " , "}, "FORWARDED_ALLOW_IPS"),
        ({"WORKER_METRICS_HOST": "localhost:9808"}, "WORKER_METRICS_HOST"),
        ({"WEB_REQUEST_TIMEOUT_SECONDS": "0.5"}, "WEB_REQUEST_TIMEOUT_SECONDS"),
        ({"ENQUEUE_TIMEOUT_SECONDS": "soon"}, "ENQUEUE_TIMEOUT_SECONDS"),
        ({"ENQUEUE_TIMEOUT_SECONDS": "30"}, "ENQUEUE_TIMEOUT_SECONDS"),
        ({"VOUCHERIFY_API_URL": "ftp://api"}, "VOUCHERIFY_API_URL"),
        ({"VOUCHERIFY_API_CALLS_PER_MINUTE": "0"}, "VOUCHERIFY_API_CALLS_PER_MINUTE"),
        ({"VOUCHERIFY_API_CALLS_PER_DAY": "many"}, "VOUCHERIFY_API_CALLS_PER_DAY"),
        ({"WEB_CONCURRENCY": "two"}, "WEB_CONCURRENCY"),
        ({"WEB_THREADS": "0"}, "WEB_THREADS"),
        ({"WEB_WORKER_CLASS": "gevent"}, "WEB_WORKER_CLASS"),
        ({"WORKER_CONCURRENCY": "2.5"}, "WORKER_CONCURRENCY"),
        ({"RETRY_BACKOFF_MAX_SECONDS": "300"}, "RETRY_BACKOFF_MAX_SECONDS"),
        (
            {"RETRY_BACKOFF_MAX_SECONDS": "60", "BROKER_VISIBILITY_TIMEOUT_SECONDS": "60"},
            "RETRY_BACKOFF_MAX_SECONDS",
        ),
        (
            {"RETRY_BACKOFF_MAX_SECONDS": "600", "BROKER_VISIBILITY_TIMEOUT_SECONDS": "300"},
            "RETRY_BACKOFF_MAX_SECONDS",
        ),
    ],
)
def test_malformed_variable_is_named_first_in_the_error(
    environ: dict[str, str], variable: str
) -> None:
    with pytest.raises(SettingsError) as caught:
        Settings.from_env({**URLS, **environ})
    assert str(caught.value).startswith(f"{variable}: ")
    assert caught.value.variable == variable
    assert len(str(caught.value).splitlines()) == 1


def test_the_api_budget_defaults_to_a_third_of_the_business_plans_minute() -> None:
    settings = Settings.from_env(URLS)
    assert settings.voucherify_api_calls_per_minute * 3 <= 100
    assert settings.voucherify_api_calls_per_day * 31 <= 100_000 * 0.2  # a fifth of a cycle


def test_a_sync_web_worker_runs_one_thread() -> None:
    # gunicorn would otherwise switch a sync worker given threads to gthread, silently.
    settings = Settings.from_env({**URLS, "WEB_WORKER_CLASS": "sync", "WEB_THREADS": "8"})
    assert (settings.web_worker_class, settings.web_threads) == ("sync", 1)


def test_backoff_just_below_the_visibility_timeout_is_accepted() -> None:
    settings = Settings.from_env(
        {**URLS, "RETRY_BACKOFF_MAX_SECONDS": "59", "BROKER_VISIBILITY_TIMEOUT_SECONDS": "60"}
    )
    assert settings.retry_backoff_max_seconds == 59


def test_require_webhook_secrets_names_the_variable() -> None:
    with pytest.raises(SettingsError, match=r"^VOUCHERIFY_WEBHOOK_SECRET: ") as caught:
        Settings.from_env(URLS).require_webhook_secrets()
    assert caught.value.variable == "VOUCHERIFY_WEBHOOK_SECRET"
    settings = Settings.from_env({**URLS, "VOUCHERIFY_WEBHOOK_SECRET": "a,b"})
    assert settings.require_webhook_secrets() == (b"a", b"b")


def test_repr_shows_no_secret_and_no_password() -> None:
    settings = Settings.from_env(
        {
            "DATABASE_URL": "postgresql://app:db-pass-1@db:5432/vfy?sslmode=require",
            "REDIS_URL": "redis://default:redis-pass-2@cache:6379/0",
            "VOUCHERIFY_WEBHOOK_SECRET": "webhook-secret-3,webhook-secret-4",
            "OPS_API_TOKEN": "ops-token-5-" + "x" * 32,
            "METRICS_TOKEN": "metrics-token-7-" + "y" * 32,
            "VOUCHERIFY_API_URL": "https://api.voucherify.io",
            "VOUCHERIFY_APP_ID": "app-id",
            "VOUCHERIFY_APP_TOKEN": "app-token-6",
        }
    )
    for text in (repr(settings), str(settings)):
        for secret in (
            "db-pass-1",
            "redis-pass-2",
            "webhook-secret-3",
            "webhook-secret-4",
            "ops-token-5",
            "app-token-6",
            "metrics-token-7",
        ):
            assert secret not in text
        # Still useful to an operator: where it connects, as whom.
        assert "postgresql://app:***@db:5432/vfy?sslmode=require" in text
        assert "redis://default:***@cache:6379/0" in text
        assert "app-id" in text


def test_password_given_as_a_query_parameter_is_redacted() -> None:
    settings = Settings.from_env(
        {
            "DATABASE_URL": "postgresql://app@db/vfy?sslmode=require&password=db-pass-1",
            "REDIS_URL": "redis://cache:6379/0?Password=redis-pass-2",
        }
    )
    assert "db-pass-1" not in repr(settings)
    assert "redis-pass-2" not in repr(settings)
    assert redact_url("postgresql://app@db/vfy?password=x&sslmode=require") == (
        "postgresql://app@db/vfy?password=***&sslmode=require"
    )
    assert redact_url("postgresql://app@db/vfy") == "postgresql://app@db/vfy"


@pytest.mark.parametrize(
    "url",
    [
        "postgresql://app:s3cr/et@db:5432/vfy",
        "postgresql://app:s3cr?et@db/vfy",
        "postgresql://app:s3cr#et@db/vfy",
    ],
)
def test_error_on_a_dsn_never_quotes_its_password(url: str) -> None:
    # An unencoded '/', '?' or '#' in the password makes urlsplit read part of it as the
    # port; the error names the variable but must not echo that part.
    with pytest.raises(SettingsError, match=r"^DATABASE_URL: ") as caught:
        Settings.from_env({**URLS, "DATABASE_URL": url})
    assert "s3cr" not in str(caught.value)


# --- database connections (DATABASE_POOLER, WEB_DB_POOL_MAX_SIZE) ----------------------


def test_database_connections_default_to_postgresql_itself_and_one_pool_size() -> None:
    settings = Settings.from_env(URLS)
    assert settings.database_pooler == "none"
    assert settings.db_prepare_threshold == 5  # psycopg's own default
    assert settings.db_pool_max_size == settings.web_db_pool_max_size == 4


def test_behind_pgbouncer_nothing_is_prepared() -> None:
    for given in ("pgbouncer", " PgBouncer "):
        settings = Settings.from_env({**URLS, "DATABASE_POOLER": given})
        assert settings.database_pooler == "pgbouncer"
        assert settings.db_prepare_threshold is None
    assert Settings.from_env({**URLS, "DATABASE_POOLER": "none"}).db_prepare_threshold == 5


def test_db_pool_max_size_is_the_default_of_the_web_pool_size() -> None:
    shared = Settings.from_env({**URLS, "DB_POOL_MAX_SIZE": "2"})
    assert (shared.db_pool_max_size, shared.web_db_pool_max_size) == (2, 2)
    own = Settings.from_env({**URLS, "DB_POOL_MAX_SIZE": "2", "WEB_DB_POOL_MAX_SIZE": " 6 "})
    assert (own.db_pool_max_size, own.web_db_pool_max_size) == (2, 6)
    blank = Settings.from_env({**URLS, "DB_POOL_MAX_SIZE": "3", "WEB_DB_POOL_MAX_SIZE": ""})
    assert blank.web_db_pool_max_size == 3


@pytest.mark.parametrize(
    ("environ", "problem"),
    [
        ({"DATABASE_POOLER": "pgpool"}, "expected one of none, pgbouncer"),
        ({"DATABASE_POOLER": "pgbouncer-session"}, "expected one of none, pgbouncer"),
        ({"WEB_DB_POOL_MAX_SIZE": "0"}, "expected an integer from 1 to 100"),
        ({"WEB_DB_POOL_MAX_SIZE": "101"}, "expected an integer from 1 to 100"),
        ({"WEB_DB_POOL_MAX_SIZE": "four"}, "expected an integer"),
        ({"DB_POOL_MAX_SIZE": "0"}, "expected an integer from 1 to 100"),
    ],
)
def test_malformed_database_connection_settings_are_named(
    environ: dict[str, str], problem: str
) -> None:
    (variable,) = environ
    with pytest.raises(SettingsError) as caught:
        Settings.from_env({**URLS, **environ})
    assert caught.value.variable == variable
    assert str(caught.value).startswith(f"{variable}: {problem}")
    assert len(str(caught.value).splitlines()) == 1
