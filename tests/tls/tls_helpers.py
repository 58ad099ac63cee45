"""Certificates and in-memory connection pairs for the TLS engine's tests."""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import hashlib
import random
import socket
import subprocess
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.hazmat.primitives.asymmetric.types import CertificateIssuerPrivateKeyTypes
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from meshlet.proxy.transport import HandshakeError, SecurityInfo, TransportSocketFactory
from meshlet.tls.connection import TlsConnection
from meshlet.tls.events import ApplicationData, Event, SignatureRequired
from meshlet.tls.keys_local import LocalKey
from meshlet.tls.verify import PeerPolicy, PeerRole


def self_signed(
    key: CertificateIssuerPrivateKeyTypes, name: str = "localhost", *, days: int = 1
) -> tuple[tuple[bytes, ...], bytes]:
    """(DER chain, PEM certificate) of a self-signed certificate for ``name``."""
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = datetime.datetime.now(datetime.UTC)
    algorithm = None if isinstance(key, ed25519.Ed25519PrivateKey) else hashes.SHA256()
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=days))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(name)]), critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, algorithm)  # type: ignore[arg-type]
    )
    return (cert.public_bytes(serialization.Encoding.DER),), cert.public_bytes(serialization.Encoding.PEM)


def rsa_key(bits: int = 2048) -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=bits)


def key_pem(key: CertificateIssuerPrivateKeyTypes) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def pump(
    client: TlsConnection, server: TlsConnection, keys: Sequence[LocalKey], *, rounds: int = 12
) -> list[tuple[str, Event]]:
    """Shuttle bytes both ways, signing whenever asked; returns (side, event)."""
    seen: list[tuple[str, Event]] = []
    for _ in range(rounds):
        moved = False
        for sender, receiver, side in ((client, server, "server"), (server, client, "client")):
            data = sender.data_to_send()
            if not data:
                continue
            moved = True
            events = receiver.receive_data(data)
            while events:
                follow: list[Event] = []
                for event in events:
                    seen.append((side, event))
                    if isinstance(event, SignatureRequired):
                        key = keys[0] if side == "server" else keys[-1]
                        follow += receiver.provide_signature(key.sign_now(event.scheme, event.data))
                events = follow
        if not moved:
            break
    return seen


# --------------------------------------------------------------------------- #
# A small PKI: one ECDSA CA issuing RSA, ECDSA and Ed25519 leaves
# --------------------------------------------------------------------------- #

SPIFFE_SERVER = "spiffe://mesh.local/ns/default/sa/server"
SPIFFE_CLIENT = "spiffe://mesh.local/ns/default/sa/client"


@dataclass(frozen=True)
class Leaf:
    key: CertificateIssuerPrivateKeyTypes
    cert: x509.Certificate
    cert_file: Path
    key_file: Path

    @property
    def chain(self) -> tuple[bytes, ...]:
        return (self.cert.public_bytes(serialization.Encoding.DER),)

    @property
    def local_key(self) -> LocalKey:
        return LocalKey(self.key)  # type: ignore[arg-type]


@dataclass
class MiniPki:
    directory: Path
    ca_key: ec.EllipticCurvePrivateKey
    ca_cert: x509.Certificate
    ca_file: Path

    @classmethod
    def create(cls, directory: Path, name: str = "meshlet test CA") -> MiniPki:
        key = ec.generate_private_key(ec.SECP256R1())
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
        now = datetime.datetime.now(datetime.UTC)
        cert = (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(hours=1))
            .not_valid_after(now + datetime.timedelta(days=2))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(
                x509.KeyUsage(False, False, False, False, False, True, True, False, False), critical=True
            )
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
            .sign(key, hashes.SHA256())
        )
        ca_file = directory / "ca.pem"
        ca_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        return cls(directory, key, cert, ca_file)

    def issue(
        self,
        name: str,
        kind: str = "ecdsa",
        *,
        dns: Sequence[str] = ("localhost",),
        uris: Sequence[str] = (SPIFFE_SERVER,),
        valid_days: float = 1.0,
        not_before_days: float = -1 / 24,
    ) -> Leaf:
        key: CertificateIssuerPrivateKeyTypes
        if kind == "rsa":
            key = rsa_key()
        elif kind == "ed25519":
            key = ed25519.Ed25519PrivateKey.generate()
        elif kind == "p384":
            key = ec.generate_private_key(ec.SECP384R1())
        else:
            key = ec.generate_private_key(ec.SECP256R1())
        now = datetime.datetime.now(datetime.UTC)
        sans: list[x509.GeneralName] = [x509.DNSName(d) for d in dns]
        sans += [x509.UniformResourceIdentifier(u) for u in uris]
        builder = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
            .issuer_name(self.ca_cert.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now + datetime.timedelta(days=not_before_days))
            .not_valid_after(now + datetime.timedelta(days=valid_days))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(
                x509.KeyUsage(True, False, False, False, False, False, False, False, False), critical=True
            )
            .add_extension(
                x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]),
                critical=False,
            )
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(self.ca_key.public_key()), critical=False
            )
        )
        if sans:
            builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
        cert = builder.sign(self.ca_key, hashes.SHA256())
        cert_file = self.directory / f"{name}.pem"
        key_file = self.directory / f"{name}.key"
        cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        key_file.write_bytes(key_pem(key))
        return Leaf(key, cert, cert_file, key_file)

    def policy(self, role: PeerRole, **kwargs: object) -> PeerPolicy:
        return PeerPolicy(role=role, trusted_roots=(self.ca_cert,), **kwargs)  # type: ignore[arg-type]


# --------------------------------------------------------------------------- #
# Driving a sans-IO connection over a blocking socket, and OpenSSL processes
# --------------------------------------------------------------------------- #


class SocketDriver:
    """Runs a ``TlsConnection`` over a connected blocking socket (timeouts set)."""

    def __init__(self, conn: TlsConnection, sock: socket.socket, key: LocalKey | None = None) -> None:
        self.conn = conn
        self.sock = sock
        self.key = key
        self.events: list[Event] = []
        self.received = bytearray()
        sock.settimeout(5.0)
        self.flush()

    def flush(self) -> None:
        data = self.conn.data_to_send()
        if data:
            self.sock.sendall(data)

    def _feed(self, data: bytes) -> None:
        events = self.conn.receive_data(data)
        while events:
            follow: list[Event] = []
            for event in events:
                self.events.append(event)
                if isinstance(event, SignatureRequired):
                    assert self.key is not None
                    follow += self.conn.provide_signature(self.key.sign_now(event.scheme, event.data))
                elif isinstance(event, ApplicationData):
                    self.received += event.data
            events = follow
        self.flush()

    def pump_until(self, done: Callable[[], bool]) -> None:
        while not done() and not self.conn.closed:
            data = self.sock.recv(1 << 16)
            if not data:
                return
            self._feed(data)

    def handshake(self) -> None:
        self.pump_until(lambda: self.conn.handshake_complete)

    def send(self, data: bytes) -> None:
        self.conn.send_application_data(data)
        self.flush()

    def close(self) -> None:
        self.conn.close()
        self.flush()
        self.sock.close()

    def read_until(self, marker: bytes) -> bytes:
        self.pump_until(lambda: marker in self.received)
        return bytes(self.received)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.contextmanager
def openssl_server(*args: str) -> Iterator[tuple[int, subprocess.Popen[bytes]]]:
    """``openssl s_server`` on a free loopback port, killed on exit."""
    port = free_port()
    proc = subprocess.Popen(
        ["openssl", "s_server", "-accept", f"127.0.0.1:{port}", "-tls1_3", *args],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    try:
        deadline = time.monotonic() + 5
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
                break
            except OSError:
                if time.monotonic() > deadline or proc.poll() is not None:
                    raise RuntimeError("openssl s_server did not start") from None
                time.sleep(0.05)
        yield port, proc
    finally:
        proc.kill()
        proc.wait(timeout=5)


def openssl_client(port: int, *args: str, stdin: bytes = b"", timeout: float = 8.0) -> str:
    """Run ``openssl s_client`` against ``port``; its combined output."""
    proc = subprocess.run(
        ["openssl", "s_client", "-connect", f"127.0.0.1:{port}", "-tls1_3", *args],
        input=stdin,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        timeout=timeout,
        check=False,
    )
    return proc.stdout.decode(errors="replace")


# --------------------------------------------------------------------------- #
# asyncio: app protocols and meshlet endpoints through the transport socket
# --------------------------------------------------------------------------- #


class Collector(asyncio.Protocol):
    """Counts and hashes what it receives; sends with flow control."""

    def __init__(self, info: SecurityInfo | None = None, *, keep: bool = True) -> None:
        self.info = info
        self.keep = keep
        self.data = bytearray()
        self.count = 0
        self.digest = hashlib.sha256()
        self.transport: asyncio.Transport | None = None
        self.lost: asyncio.Future[Exception | None] = asyncio.get_running_loop().create_future()
        self.eof = False
        self._writable = asyncio.Event()
        self._writable.set()
        self._progress = asyncio.Event()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self.count += len(data)
        self.digest.update(data)
        if self.keep:
            self.data += data
        self._progress.set()

    def eof_received(self) -> bool:
        self.eof = True
        self._progress.set()
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.lost.done():
            self.lost.set_result(exc)
        self._progress.set()
        self._writable.set()

    def pause_writing(self) -> None:
        self._writable.clear()

    def resume_writing(self) -> None:
        self._writable.set()

    async def send_stream(self, total: int, chunk: int = 1 << 16, seed: int = 7) -> str:
        """Send ``total`` pseudo-random bytes honouring backpressure; their sha256."""
        assert self.transport is not None
        digest = hashlib.sha256()
        block = random.Random(seed).randbytes(chunk)
        sent = 0
        while sent < total:
            await asyncio.wait_for(self._writable.wait(), 10)
            piece = block[: min(chunk, total - sent)]
            self.transport.write(piece)
            digest.update(piece)
            sent += len(piece)
        return digest.hexdigest()

    async def wait_count(self, n: int, timeout: float = 10.0) -> None:
        async def loop() -> None:
            while self.count < n and not self.lost.done():
                self._progress.clear()
                await self._progress.wait()

        await asyncio.wait_for(loop(), timeout)

    async def wait_for(self, marker: bytes, timeout: float = 5.0) -> bytes:
        async def loop() -> None:
            while marker not in self.data and not self.lost.done():
                self._progress.clear()
                await self._progress.wait()

        await asyncio.wait_for(loop(), timeout)
        return bytes(self.data)


class Echo(Collector):
    """Writes back whatever it receives; closes after a line when ``upper``."""

    def __init__(self, info: SecurityInfo | None = None, *, upper: bool = False) -> None:
        super().__init__(info, keep=False)
        self.upper = upper

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        assert self.transport is not None
        if self.upper:
            self.transport.write(data.upper())
            if data.endswith(b"\n"):
                self.transport.close()
        else:
            self.transport.write(data)


async def echo_digests(
    reader: asyncio.StreamReader,
    writer: asyncio.StreamWriter,
    block: bytes,
    total: int,
    timeout: float = 90.0,
) -> tuple[str, str]:
    """Write ``total`` bytes (``block`` repeated) to an echoing peer while
    reading as many back; the sha256 of what went out and of what came back."""

    async def send() -> str:
        digest = hashlib.sha256()
        for _ in range(total // len(block)):
            writer.write(block)
            digest.update(block)
            await writer.drain()
        return digest.hexdigest()

    async def receive() -> str:
        digest = hashlib.sha256()
        remaining = total
        while remaining:
            data = await reader.read(min(remaining, 1 << 18))
            assert data, "the peer closed early"
            digest.update(data)
            remaining -= len(data)
        return digest.hexdigest()

    sent, received = await asyncio.wait_for(asyncio.gather(send(), receive()), timeout)
    return sent, received


async def meshlet_connect(
    factory: TransportSocketFactory, port: int, server_hostname: str = "localhost", **kwargs: Any
) -> Collector:
    loop = asyncio.get_running_loop()
    raw, _ = await loop.create_connection(asyncio.Protocol, "127.0.0.1", port)
    proto = await factory.connect(
        raw, lambda info: Collector(info, **kwargs), server_hostname=server_hostname, timeout=5
    )
    assert isinstance(proto, Collector)
    return proto


@dataclass
class MeshletServer:
    server: asyncio.Server
    port: int
    apps: list[Collector]
    failures: list[HandshakeError]


async def meshlet_serve(
    factory: TransportSocketFactory, app: Callable[[SecurityInfo], Collector]
) -> MeshletServer:
    loop = asyncio.get_running_loop()
    apps: list[Collector] = []
    failures: list[HandshakeError] = []

    def build(info: SecurityInfo) -> Collector:
        proto = app(info)
        apps.append(proto)
        return proto

    class Acceptor(asyncio.Protocol):
        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            assert isinstance(transport, asyncio.Transport)
            factory.create().start(transport, build, on_failure=failures.append)

    server = await loop.create_server(Acceptor, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    return MeshletServer(server, port, apps, failures)
