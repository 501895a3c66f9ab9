"""``app.json`` (Heroku's Deploy button) and ``.python-version`` against the code.

The manifest must ask for what ``Settings`` requires and for nothing it does not read: the
required variables are found by asking ``Settings.from_env`` itself, one missing variable
at a time, so a new required variable fails here until the manifest provides it. Pure file
checks: no servers, no processes.
"""

from __future__ import annotations

import json
import re
import secrets
import tomllib
from typing import Any

import yaml
from packaging.specifiers import SpecifierSet

from config.settings import MIN_TOKEN_CHARS, Settings, SettingsError
from tests.config.test_env_example import RecordingEnviron
from tests.conftest import ROOT

MANIFEST = ROOT / "app.json"
PROCFILE = ROOT / "Procfile"

# A valid value for each variable Settings may require, to get past it to the next one.
SAMPLES = {
    "DATABASE_URL": "postgresql://app@127.0.0.1:9/unused",
    "REDIS_URL": "redis://127.0.0.1:9/0",
    "VOUCHERIFY_WEBHOOK_SECRET": "sample-secret",
}
# The variable each add-on sets when attached under its default name (``as`` renames it).
ADDON_VARIABLES = {"heroku-postgresql": "DATABASE_URL", "heroku-redis": "REDIS_URL"}
# Read by libpq (every PostgreSQL connection), not by Settings: the add-on owns
# DATABASE_URL, so TLS is required through libpq's own variable.
LIBPQ_VARIABLES = {"PGSSLMODE"}
HEROKU_SECRET_CHARS = 64
"""Length of what Heroku's ``generator: secret`` makes (hex characters)."""
NAME_MAX, DESCRIPTION_MAX = 30, 140
"""Limits of app.json's ``name`` and ``description`` (Heroku's app.json schema)."""


def manifest() -> dict[str, Any]:
    loaded: dict[str, Any] = json.loads(MANIFEST.read_text(encoding="utf-8"))
    return loaded


def procfile_types() -> dict[str, str]:
    types = {}
    for line in PROCFILE.read_text(encoding="utf-8").splitlines():
        match = re.match(r"^([A-Za-z0-9_-]+):\s*(.+)$", line)
        if match:
            types[match.group(1)] = match.group(2)
    return types


def required_variables() -> list[str]:
    """What the web process needs before it starts, in the order Settings asks for it:
    each ``SettingsError`` names the first missing variable; supply it and ask again."""
    environ: dict[str, str] = {}
    while (missing := _first_missing(environ)) is not None:
        assert missing not in environ, f"{missing}: its sample in SAMPLES is not valid"
        assert missing in SAMPLES, f"{missing} is required: add a valid sample to SAMPLES"
        environ[missing] = SAMPLES[missing]
    return list(environ)


def _first_missing(environ: dict[str, str]) -> str | None:
    try:
        Settings.from_env(environ).require_webhook_secrets()
    except SettingsError as exc:
        return exc.variable
    return None


def addon_variables() -> dict[str, str]:
    """Variable -> the add-on that sets it."""
    provided = {}
    for addon in manifest()["addons"]:
        plan = addon if isinstance(addon, str) else addon["plan"]
        service = plan.split(":", 1)[0]
        alias = None if isinstance(addon, str) else addon.get("as")
        variable = f"{alias}_URL" if alias else ADDON_VARIABLES.get(service)
        if variable:
            provided[variable] = service
    return provided


def test_app_json_is_json_within_the_schema_limits() -> None:
    app = manifest()
    assert 3 <= len(app["name"]) <= NAME_MAX
    assert len(app["description"]) <= DESCRIPTION_MAX
    assert "repository" not in app  # the Deploy button passes the repository it was pressed on
    assert app["buildpacks"] == [{"url": "heroku/python"}]


def test_formation_runs_each_long_running_process_of_the_procfile_and_one_beat() -> None:
    formation = manifest()["formation"]
    long_running = set(procfile_types()) - {"release"}  # release runs once per deploy
    assert set(formation) == long_running == {"web", "worker", "beat"}
    assert formation["beat"]["quantity"] == 1  # a second one sends every job twice, for nothing
    assert formation["web"]["quantity"] >= 1
    assert formation["worker"]["quantity"] >= 1


def test_the_release_phase_applies_the_migrations() -> None:
    """Heroku runs the Procfile's ``release`` before each new release starts its dynos."""
    assert procfile_types()["release"] == "python -m migrations"


def test_every_required_variable_is_asked_for_or_set_by_an_add_on() -> None:
    required = required_variables()
    assert required[:2] == ["DATABASE_URL", "REDIS_URL"]  # the derivation works
    assert "VOUCHERIFY_WEBHOOK_SECRET" in required
    env, provided = manifest()["env"], addon_variables()
    for variable in required:
        if variable in provided:
            continue
        entry = env.get(variable)
        assert isinstance(entry, dict), f"{variable}: required by Settings, absent from app.json"
        assert entry.get("required") is True, (
            f"{variable}: neither set by an add-on nor `required: true` in app.json"
        )
        assert entry.get("description"), f"{variable}: say where its value comes from"


def test_the_add_ons_set_the_urls_the_manifest_does_not_ask_for() -> None:
    provided = addon_variables()
    assert provided == {"DATABASE_URL": "heroku-postgresql", "REDIS_URL": "heroku-redis"}
    for variable in provided:
        entry = manifest()["env"].get(variable)
        # An entry only explains (the add-on overwrites it): never one the form insists on.
        assert entry is None or entry.get("required") is False, variable


def test_every_variable_of_app_json_is_one_the_processes_read() -> None:
    environ = RecordingEnviron()
    Settings.from_env(environ)
    unknown = set(manifest()["env"]) - set(environ.asked) - LIBPQ_VARIABLES
    assert not unknown, f"app.json sets variables nothing reads: {', '.join(sorted(unknown))}"


def test_the_values_app_json_sets_are_ones_settings_accepts() -> None:
    values = {
        name: entry["value"]
        for name, entry in manifest()["env"].items()
        if isinstance(entry, dict) and "value" in entry
    }
    assert values, "app.json sets no value"
    settings = Settings.from_env({**SAMPLES, **values})
    assert settings.forwarded_allow_ips == "*"  # the router's address varies


def test_the_tokens_are_generated_long_enough() -> None:
    env = manifest()["env"]
    assert env["OPS_API_TOKEN"]["generator"] == "secret"
    assert HEROKU_SECRET_CHARS >= MIN_TOKEN_CHARS
    token = secrets.token_hex(HEROKU_SECRET_CHARS // 2)  # the form of Heroku's secret
    generated = {name: token for name, entry in env.items() if "generator" in entry}
    assert Settings.from_env({**SAMPLES, **generated}).ops_api_token == token


def test_python_version_file_agrees_with_requires_python() -> None:
    pinned = (ROOT / ".python-version").read_text(encoding="utf-8").strip()
    # "3.N": Heroku's buildpack and Render take the latest patch release of that line.
    assert re.fullmatch(r"3\.\d+", pinned), pinned
    project = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
    requires = SpecifierSet(project["project"]["requires-python"])
    assert requires.contains(f"{pinned}.0"), (pinned, str(requires))
    assert not (ROOT / "runtime.txt").exists()  # deprecated by Heroku; it would win


# --- render.yaml (Render's Blueprint) ----------------------------------------------------

BLUEPRINT = ROOT / "render.yaml"
BUILD = "pip install -r requirements.txt && pip install --no-deps ."
"""The lock's exact versions (hash-checked), then the project itself for the CLI."""


def blueprint() -> dict[str, Any]:
    loaded: dict[str, Any] = yaml.safe_load(BLUEPRINT.read_text(encoding="utf-8"))
    return loaded


def render_services() -> dict[str, dict[str, Any]]:
    """The Python services by the Procfile process each runs (its name after ``vfy-``)."""
    return {
        service["name"].removeprefix("vfy-"): service
        for service in blueprint()["services"]
        if service.get("runtime") == "python"
    }


def test_render_runs_each_procfile_process_with_the_procfiles_command() -> None:
    services, procfile = render_services(), procfile_types()
    assert set(services) == set(procfile) - {"release"}
    for name, service in services.items():
        assert service["startCommand"] == procfile[name], name
        assert service["buildCommand"] == BUILD, name
    assert services["web"]["preDeployCommand"] == procfile["release"]
    assert services["web"]["type"] == "web"
    assert services["worker"]["type"] == services["beat"]["type"] == "worker"
    assert services["beat"]["numInstances"] == 1  # a second one sends every job twice


def test_render_gives_every_service_the_urls_and_the_web_its_required_secret() -> None:
    for name, service in render_services().items():
        keys = {entry["key"] for entry in service["envVars"]}
        assert {"DATABASE_URL", "REDIS_URL"} <= keys, name
    web = {entry["key"]: entry for entry in render_services()["web"]["envVars"]}
    for variable in required_variables():
        assert variable in web, f"{variable}: required by Settings, absent from render.yaml"
    assert web["VOUCHERIFY_WEBHOOK_SECRET"] == {"key": "VOUCHERIFY_WEBHOOK_SECRET", "sync": False}


def test_every_variable_of_render_yaml_is_one_the_processes_read() -> None:
    environ = RecordingEnviron()
    Settings.from_env(environ)
    keys = {e["key"] for s in render_services().values() for e in s["envVars"]}
    unknown = keys - set(environ.asked) - LIBPQ_VARIABLES
    assert not unknown, f"render.yaml sets variables nothing reads: {', '.join(sorted(unknown))}"


def test_render_keeps_the_broker_from_evicting_accepted_webhooks() -> None:
    [broker] = [s for s in blueprint()["services"] if s["type"] == "keyvalue"]
    assert broker["maxmemoryPolicy"] == "noeviction"
    assert broker["ipAllowList"] == []
    [database] = blueprint()["databases"]
    assert database["ipAllowList"] == []
