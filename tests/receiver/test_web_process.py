"""The ``web`` process as the Procfile runs it: gunicorn with web/gunicorn.py serving
web.wsgi:app. Start-up with a bad environment, and a chunked body over a real socket."""

from __future__ import annotations

import json
import os
import socket
import sys
from pathlib import Path

import pytest
import redis

from devtools.servers import free_port
from devtools.webhooks import SECRET, sign
from tests.conftest import ROOT, Processes, process_env, run_captured
from workers.queue import DELIVERY_QUEUE

# Valid DSNs of servers that are never contacted: start-up must fail before any connection.
UNUSED_URLS = {
    "DATABASE_URL": "postgresql://postgres@127.0.0.1:9/unused",
    "REDIS_URL": "redis://127.0.0.1:9/0",
}

COMMANDS = {
    "import": [sys.executable, "-c", "import web.wsgi"],
    # The Procfile's web: checks the environment, then becomes gunicorn.
    "web": [sys.executable, "-m", "web.serve"],
}


def bare_env(tmp_path: Path, **variables: str) -> dict[str, str]:
    """Only what a process needs to run, plus ``variables``: nothing inherited."""
    (tmp_path / "metrics").mkdir(exist_ok=True)
    return {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "PYTHONPATH": str(ROOT),
        "HOME": str(tmp_path),
        "PORT": str(free_port()),
        "PROMETHEUS_MULTIPROC_DIR": str(tmp_path / "metrics"),
        **variables,
    }


@pytest.mark.parametrize("command", list(COMMANDS))
@pytest.mark.parametrize(
    ("variables", "named"),
    [
        ({"MAX_BODY_BYTES": "abc", "VOUCHERIFY_WEBHOOK_SECRET": SECRET}, "MAX_BODY_BYTES"),
        ({"MAX_BODY_BYTES": "1000"}, "VOUCHERIFY_WEBHOOK_SECRET"),
        # Also read by gunicorn itself (bind, log level): still named, in one line.
        ({"PORT": "abc", "VOUCHERIFY_WEBHOOK_SECRET": SECRET}, "PORT"),
        ({"LOG_LEVEL": "LOUD", "VOUCHERIFY_WEBHOOK_SECRET": SECRET}, "LOG_LEVEL"),
        ({"WEB_CONCURRENCY": "two", "VOUCHERIFY_WEBHOOK_SECRET": SECRET}, "WEB_CONCURRENCY"),
    ],
    ids=["bad-max-body-bytes", "no-secret", "bad-port", "bad-log-level", "bad-concurrency"],
)
def test_bad_environment_stops_the_web_process_with_one_line(
    tmp_path: Path, command: str, variables: dict[str, str], named: str
) -> None:
    env = bare_env(tmp_path, **UNUSED_URLS, **variables)
    # A timeout: gunicorn used to respawn failing workers forever.
    result = run_captured(COMMANDS[command], env, tmp_path, timeout=60)
    assert result.returncode == 2, result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith(f"web: configuration error: {named}: ")
    assert SECRET not in result.stderr + result.stdout
    assert not (tmp_path / ".local").exists()


def http_request(port: int, head: str, payload: bytes) -> tuple[int, bytes]:
    """Send a raw request and read the whole answer (the server closes the connection)."""
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        sock.sendall(head.encode() + payload)
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
    status_line, _, rest = answer.partition(b"\r\n")
    _, _, body = rest.partition(b"\r\n\r\n")
    return int(status_line.split()[1]), body


def chunked_head(signature: str) -> str:
    return (
        "POST /webhooks/voucherify HTTP/1.1\r\n"
        "Host: localhost\r\n"
        "Content-Type: application/json\r\n"
        f"x-voucherify-signature: {signature}\r\n"
        "Transfer-Encoding: chunked\r\n"
        "Connection: close\r\n\r\n"
    )


def chunk(data: bytes) -> bytes:
    return f"{len(data):x}\r\n".encode() + data + b"\r\n"


@pytest.mark.e2e
def test_gunicorn_chunked_bodies(
    processes: Processes,
    database_url: str,
    redis_url: str,
    redis_client: redis.Redis,
    tmp_path: Path,
) -> None:
    limit = 1000
    env = process_env(
        DATABASE_URL=database_url,
        REDIS_URL=redis_url,
        VOUCHERIFY_WEBHOOK_SECRET=SECRET,
        MAX_BODY_BYTES=str(limit),
        PROMETHEUS_MULTIPROC_DIR=str(tmp_path / "metrics"),
    )
    _, port = processes.web(env)

    # A chunked body under the limit is read whole and accepted.
    body = b'{"pad":"' + b"x" * 500 + b'"}'
    status, answer = http_request(
        port, chunked_head(sign(body)), chunk(body[:300]) + chunk(body[300:]) + b"0\r\n\r\n"
    )
    assert status == 202, processes.logs()
    assert redis_client.llen(DELIVERY_QUEUE) == 1

    # Over the limit, and never terminated (no last 0-size chunk): answered 413 at once,
    # without waiting for an end that never comes, and nothing enqueued.
    body = b'{"pad":"' + b"x" * 1400 + b'"}'
    status, answer = http_request(port, chunked_head(sign(body)), chunk(body))
    assert status == 413, processes.logs()
    assert json.loads(answer)["error"] == "body_too_large"
    assert redis_client.llen(DELIVERY_QUEUE) == 1


@pytest.mark.e2e
def test_web_removes_the_metrics_folder_it_made_when_it_exits(
    processes: Processes, database_url: str, redis_url: str, tmp_path: Path
) -> None:
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    env = process_env(
        DATABASE_URL=database_url,
        REDIS_URL=redis_url,
        VOUCHERIFY_WEBHOOK_SECRET=SECRET,
        TMPDIR=str(scratch),
    )
    env.pop("PROMETHEUS_MULTIPROC_DIR", None)  # gunicorn makes its own folder
    web, _ = processes.web(env)
    assert [p.name[:16] for p in scratch.iterdir()] == ["vfy-web-metrics-"]
    web.terminate()
    assert web.wait(timeout=30) == 0
    assert list(scratch.iterdir()) == []
