"""A TLS-only Redis on loopback with a self-signed certificate, as Heroku Redis serves one.

The certificate is made by the ``openssl`` command, else by the ``cryptography`` package;
the server is the machine's ``redis-server`` (Debian's 7.x is built with TLS; ``scripts/setup``
installs it where it can). Without a TLS-capable ``redis-server`` the tests that need one
skip and say why.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
import shutil
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import redis

from devtools.servers import free_port

REDIS_SERVER_CANDIDATES = ("redis-server", "/usr/bin/redis-server", "/usr/local/bin/redis-server")
START_SECONDS = 15.0


@dataclass(frozen=True)
class Certificate:
    """A self-signed certificate for 127.0.0.1 and localhost, and its key (PEM files)."""

    cert: Path
    key: Path


@dataclass(frozen=True)
class TlsRedis:
    """A running TLS-only ``redis-server`` (no plain-text port) on 127.0.0.1."""

    port: int
    certificate: Certificate
    binary: str

    def url(self, query: str = "") -> str:
        return f"rediss://127.0.0.1:{self.port}/0" + (f"?{query}" if query else "")

    def client(self) -> redis.Redis:
        """A client that trusts the server's own certificate (for the test's reads)."""
        return redis.Redis(
            host="127.0.0.1",
            port=self.port,
            ssl=True,
            ssl_ca_certs=str(self.certificate.cert),
            socket_timeout=5,
        )


def make_certificate(directory: Path) -> Certificate:
    directory.mkdir(parents=True, exist_ok=True)
    cert, key = directory / "redis.crt", directory / "redis.key"
    openssl = shutil.which("openssl")
    if openssl is not None:
        subprocess.run(
            [
                openssl,
                "req",
                "-x509",
                "-newkey",
                "rsa:2048",
                "-nodes",
                "-keyout",
                str(key),
                "-out",
                str(cert),
                "-days",
                "2",
                "-subj",
                "/CN=localhost",
                "-addext",
                "subjectAltName=IP:127.0.0.1,DNS:localhost",
            ],
            check=True,
            capture_output=True,
            timeout=60,
        )
        return Certificate(cert, key)
    return _certificate_with_cryptography(cert, key)


def _certificate_with_cryptography(cert: Path, key: Path) -> Certificate:
    try:
        from cryptography import x509
        from cryptography.hazmat.primitives import hashes, serialization
        from cryptography.hazmat.primitives.asymmetric import rsa
        from cryptography.x509.oid import NameOID
    except ImportError:
        pytest.skip("no openssl command and no cryptography package: cannot make a certificate")
    private = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.UTC)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(private.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=2))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.IPAddress(ipaddress.ip_address("127.0.0.1")), x509.DNSName("localhost")]
            ),
            critical=False,
        )
        .sign(private, hashes.SHA256())
    )
    cert.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    key.write_bytes(
        private.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.TraditionalOpenSSL,
            serialization.NoEncryption(),
        )
    )
    return Certificate(cert, key)


def redis_server_binaries() -> list[str]:
    """The ``redis-server`` executables of this machine, each once."""
    found: dict[str, str] = {}
    for candidate in REDIS_SERVER_CANDIDATES:
        path = shutil.which(candidate)
        if path is not None:
            found.setdefault(os.path.realpath(path), path)
    return list(found.values())


def start_tls_redis(
    binary: str, certificate: Certificate, directory: Path
) -> tuple[subprocess.Popen[bytes], int] | str:
    """The server and its TLS port, or why this binary cannot serve TLS (it has exited)."""
    directory.mkdir(parents=True, exist_ok=True)
    port = free_port()
    log_path = directory / "redis.log"
    args = [
        binary,
        "--bind",
        "127.0.0.1",
        "--port",
        "0",  # no plain-text port: only TLS answers
        "--tls-port",
        str(port),
        "--tls-cert-file",
        str(certificate.cert),
        "--tls-key-file",
        str(certificate.key),
        "--tls-ca-cert-file",
        str(certificate.cert),
        "--tls-auth-clients",
        "no",
        "--save",
        "",
        "--appendonly",
        "no",
        "--dir",
        str(directory),
    ]
    with log_path.open("wb") as log:
        proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT)
    probe = redis.Redis(
        host="127.0.0.1", port=port, ssl=True, ssl_cert_reqs="none", socket_timeout=1
    )
    try:
        deadline = time.monotonic() + START_SECONDS
        while True:
            if proc.poll() is not None:
                output = log_path.read_text(errors="replace").strip().splitlines()
                return f"{binary} did not start with TLS: {output[-1] if output else 'no output'}"
            try:
                probe.ping()
                return proc, port
            except redis.ConnectionError:
                if time.monotonic() > deadline:
                    stop(proc)
                    raise RuntimeError(
                        f"{binary} answered no TLS PING on port {port} within {START_SECONDS}s:\n"
                        + log_path.read_text(errors="replace")[-2000:]
                    ) from None
                time.sleep(0.05)
    finally:
        probe.close()


def stop(proc: subprocess.Popen[bytes]) -> None:
    """Terminate ``proc`` if it still runs: killed if it has not exited within 10 s."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=5)


@pytest.fixture(scope="session")
def certificate(tmp_path_factory: pytest.TempPathFactory) -> Certificate:
    return make_certificate(tmp_path_factory.mktemp("tls"))


@pytest.fixture(scope="session")
def tls_redis_server(
    tmp_path_factory: pytest.TempPathFactory, certificate: Certificate
) -> Iterator[TlsRedis]:
    """One TLS-only Redis for the session, stopped at its end."""
    binaries = redis_server_binaries()
    if not binaries:
        pytest.skip("no redis-server on this machine (scripts/setup installs Debian's as root)")
    reasons = []
    for binary in binaries:
        started = start_tls_redis(binary, certificate, tmp_path_factory.mktemp("redis-tls"))
        if isinstance(started, str):
            reasons.append(started)
            continue
        proc, port = started
        try:
            yield TlsRedis(port, certificate, binary)
        finally:
            stop(proc)
        return
    pytest.skip("no TLS-capable redis-server: " + "; ".join(reasons))


@pytest.fixture
def tls_redis(tls_redis_server: TlsRedis) -> TlsRedis:
    """The session's TLS Redis, emptied before the test."""
    client = tls_redis_server.client()
    try:
        client.flushall()
    finally:
        client.close()
    return tls_redis_server
