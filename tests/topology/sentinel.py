"""A Redis primary, its replicas and three Sentinels on loopback, for the Sentinel tests.

Every server is the machine's ``redis-server`` (Debian's 7.x; ``--sentinel`` makes it a
Sentinel, as Debian's ``redis-sentinel`` does), each in a folder of its own, with short
failure detection (``down-after-milliseconds`` 1000, ``failover-timeout`` 3000) so that a
failover takes seconds, not the default half minute. ``SentinelGroup.start`` returns once
every Sentinel sees the primary, every replica and the other Sentinels; ``stop`` ends
every process it started, whatever state it is in.
"""

from __future__ import annotations

import shutil
import signal
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

import redis

from devtools.servers import free_port
from devtools.webhooks import wait_until
from tests.topology.conftest import stop

MASTER = "mymaster"
DOWN_AFTER_MS = 1000
FAILOVER_TIMEOUT_MS = 3000
START_SECONDS = 30.0


def redis_server() -> str | None:
    """The machine's ``redis-server``, or None (then the tests skip and say why)."""
    return shutil.which("redis-server") or shutil.which("/usr/bin/redis-server")


@dataclass
class Node:
    name: str
    port: int
    process: subprocess.Popen[bytes]
    log: Path
    args: list[str] = field(default_factory=list)

    password: str | None = None
    ca: Path | None = None
    """The certificate to trust, when the node speaks TLS."""

    def client(self, timeout: float = 2.0) -> redis.Redis:
        tls: dict[str, object] = {"ssl": True, "ssl_ca_certs": str(self.ca)} if self.ca else {}
        return redis.Redis(
            host="127.0.0.1",
            port=self.port,
            password=self.password,
            socket_timeout=timeout,
            **tls,  # type: ignore[arg-type]
        )

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def alive(self) -> bool:
        return self.process.poll() is None


@dataclass
class SentinelGroup:
    root: Path
    binary: str
    replicas: int = 2
    sentinels: int = 3
    password: str | None = None
    """``requirepass`` (and ``masterauth``) of the data nodes."""
    sentinel_password: str | None = None
    """``requirepass`` of the Sentinels."""
    tls: tuple[Path, Path] | None = None
    """(certificate, key): every server speaks only TLS with this self-signed certificate,
    replication and Sentinel traffic included."""
    nodes: list[Node] = field(default_factory=list)
    """The data nodes, the first started as the primary."""
    watchers: list[Node] = field(default_factory=list)
    """The Sentinels."""

    # -- set-up ----------------------------------------------------------------------

    def start(self) -> SentinelGroup:
        self.root.mkdir(parents=True, exist_ok=True)
        primary = self._data_node("primary", None)
        for i in range(self.replicas):
            self._data_node(f"replica-{i}", primary.port)
        for i in range(self.sentinels):
            self._sentinel(f"sentinel-{i}", primary.port)
        wait_until(self._settled, timeout=START_SECONDS, interval=0.1, what=self.describe)
        return self

    def _spawn(self, name: str, args: list[str]) -> tuple[subprocess.Popen[bytes], Path]:
        log = self.root / f"{name}.log"
        with log.open("ab") as out:
            proc = subprocess.Popen(
                [self.binary, *args], stdout=out, stderr=subprocess.STDOUT, cwd=self.root
            )
        return proc, log

    def _tls_args(self, port: int) -> list[str]:
        """Listen on ``port`` for TLS only; replicate and reach the primary over TLS."""
        if self.tls is None:
            return ["--port", str(port)]
        cert, key = self.tls
        return [
            "--port", "0",
            "--tls-port", str(port),
            "--tls-cert-file", str(cert),
            "--tls-key-file", str(key),
            "--tls-ca-cert-file", str(cert),
            "--tls-auth-clients", "no",
            "--tls-replication", "yes",
        ]  # fmt: skip

    def _data_node(self, name: str, primary_port: int | None) -> Node:
        port = free_port()
        folder = self.root / name
        folder.mkdir()
        args = [
            "--bind", "127.0.0.1",
            *self._tls_args(port),
            "--dir", str(folder),
            "--save", "",
            # The README's broker settings: AOF on, fsync every second, no eviction.
            "--appendonly", "yes",
            "--appendfsync", "everysec",
            "--maxmemory-policy", "noeviction",
            "--repl-diskless-sync-delay", "0",  # no 5 s wait for more replicas to sync
        ]  # fmt: skip
        if primary_port is not None:
            args += ["--replicaof", "127.0.0.1", str(primary_port)]
        if self.password:
            args += ["--requirepass", self.password, "--masterauth", self.password]
        proc, log = self._spawn(name, args)
        node = Node(name, port, proc, log, args, self.password, self._ca)
        self.nodes.append(node)
        return node

    def _sentinel(self, name: str, primary_port: int) -> Node:
        port = free_port()
        folder = self.root / name
        folder.mkdir()
        conf = folder / "sentinel.conf"  # a Sentinel rewrites its own file: one each
        # sentinel.conf takes the same options as the command line, without the dashes.
        tls = self._tls_args(port)
        options = [f"{k[2:]} {v}" for k, v in zip(tls[::2], tls[1::2], strict=True)]
        conf.write_text(
            "\n".join(
                [
                    "bind 127.0.0.1",
                    *options,
                    f"dir {folder}",
                    f"sentinel monitor {MASTER} 127.0.0.1 {primary_port} 2",
                    f"sentinel down-after-milliseconds {MASTER} {DOWN_AFTER_MS}",
                    f"sentinel failover-timeout {MASTER} {FAILOVER_TIMEOUT_MS}",
                    f"sentinel parallel-syncs {MASTER} 1",
                    *([f"sentinel auth-pass {MASTER} {self.password}"] if self.password else []),
                    # Also what a Sentinel uses to reach the other Sentinels.
                    *([f"requirepass {self.sentinel_password}"] if self.sentinel_password else []),
                    "",
                ]
            )
        )
        proc, log = self._spawn(name, [str(conf), "--sentinel"])
        node = Node(name, port, proc, log, password=self.sentinel_password, ca=self._ca)
        self.watchers.append(node)
        return node

    def _settled(self) -> bool:
        """Every replica is in sync, and every Sentinel sees the primary up, every replica
        and the other Sentinels."""
        if self.online_replicas() < self.replicas:
            return False
        for watcher in self.watchers:
            client = watcher.client(timeout=1)
            try:
                state = client.sentinel_master(MASTER)
            except redis.RedisError:
                return False
            finally:
                client.close()
            if (
                state.get("is_sdown")
                or state.get("is_odown")
                or int(state.get("num-slaves", 0)) < self.replicas
                or int(state.get("num-other-sentinels", 0)) < self.sentinels - 1
            ):
                return False
        return True

    @property
    def _ca(self) -> Path | None:
        return self.tls[0] if self.tls else None

    # -- what the tests use ----------------------------------------------------------

    @property
    def sentinel_addresses(self) -> str:
        """``REDIS_SENTINELS``."""
        return ",".join(w.address for w in self.watchers)

    def url(self) -> str:
        """A ``REDIS_URL`` for Sentinel mode: only its password and database number are
        used; its host is the first primary's, which no client reads."""
        auth = f":{self.password}@" if self.password else ""
        if self.tls:
            return f"rediss://{auth}127.0.0.1:{self.nodes[0].port}/0?ssl_ca_certs={self.tls[0]}"
        return f"redis://{auth}127.0.0.1:{self.nodes[0].port}/0"

    def primary(self) -> Node:
        """The data node the Sentinels name as primary now (asked of a live Sentinel)."""
        for watcher in self.watchers:
            client = watcher.client(timeout=1)
            try:
                _, port = client.sentinel_get_master_addr_by_name(MASTER)
            except redis.RedisError:
                continue
            finally:
                client.close()
            return next(n for n in self.nodes if n.port == int(port))
        raise AssertionError("no Sentinel answered")

    def primary_client(self) -> redis.Redis:
        return self.primary().client()

    def online_replicas(self, primary: Node | None = None) -> int:
        """Replicas in sync with the primary (``online`` in its ``INFO replication``)."""
        client = (primary or self.nodes[0]).client(timeout=1)
        try:
            info = client.info("replication")
        except redis.RedisError:
            return 0
        finally:
            client.close()
        count = int(info.get("connected_slaves", 0))
        return sum(info.get(f"slave{i}", {}).get("state") == "online" for i in range(count))

    def kill(self, node: Node) -> None:
        node.process.send_signal(signal.SIGKILL)
        node.process.wait(timeout=10)

    def stop_node(self, node: Node) -> None:
        stop(node.process)

    def restart_node(self, node: Node) -> None:
        """Start a stopped data node again: same port, folder and settings."""
        node.process, _ = self._spawn(node.name, node.args)

    def describe(self) -> str:
        lines = [f"{n.name} :{n.port} alive={n.alive()}" for n in self.nodes + self.watchers]
        for node in self.nodes + self.watchers:
            text = node.log.read_text(errors="replace").splitlines()[-8:]
            lines += [f"--- {node.name}", *text]
        return "\n".join(lines)

    def stop(self) -> None:
        for node in self.watchers + self.nodes:
            stop(node.process)


def elapsed_since(start: float) -> float:
    return time.monotonic() - start
