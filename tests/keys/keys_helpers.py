"""Shared pieces for the key provider tests: signature checks, a meshlet TLS
server signing through a provider, a stdlib-ssl client, and the key server
as a child process."""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import os
import signal
import socket
import ssl
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, padding, rsa
from cryptography.hazmat.primitives.asymmetric.types import CertificatePublicKeyTypes
from cryptography.x509.oid import NameOID

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tls"))

from tls_helpers import SPIFFE_SERVER, Echo, Leaf, MiniPki, meshlet_serve

from meshlet.config.model import (
    CertificateValidation,
    PrivateKeyProviderConfig,
    TlsCertificate,
    TlsContext,
)
from meshlet.tls.crypto import SignatureScheme

__all__ = ["Echo", "Leaf", "MiniPki", "meshlet_serve"]

_HASHES = {
    SignatureScheme.rsa_pss_rsae_sha256: hashes.SHA256,
    SignatureScheme.rsa_pss_rsae_sha384: hashes.SHA384,
    SignatureScheme.rsa_pss_rsae_sha512: hashes.SHA512,
    SignatureScheme.ecdsa_secp256r1_sha256: hashes.SHA256,
    SignatureScheme.ecdsa_secp384r1_sha384: hashes.SHA384,
}


def verify_tls_signature(
    public_key: CertificatePublicKeyTypes, scheme: int, signature: bytes, data: bytes
) -> None:
    """Independent of meshlet.tls.crypto: RSA-PSS with salt = hash length, ECDSA DER, Ed25519."""
    if isinstance(public_key, rsa.RSAPublicKey):
        algorithm = _HASHES[scheme]()
        pss = padding.PSS(mgf=padding.MGF1(algorithm), salt_length=algorithm.digest_size)
        public_key.verify(signature, data, pss, algorithm)
        # The salt length is exactly the hash length, not merely "some" salt.
        assert len(signature) == public_key.key_size // 8
    elif isinstance(public_key, ec.EllipticCurvePublicKey):
        assert signature[0] == 0x30, "ECDSA signatures in TLS are DER SEQUENCEs"
        public_key.verify(signature, data, ec.ECDSA(_HASHES[scheme]()))
    elif isinstance(public_key, ed25519.Ed25519PublicKey):
        public_key.verify(signature, data)
    else:
        raise AssertionError(f"unexpected key {public_key!r}")


def issue_for(pki: MiniPki, name: str, public_key: CertificatePublicKeyTypes) -> Path:
    """A leaf certificate (PEM file) from the test CA for a key held elsewhere."""
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
        .issuer_name(pki.ca_cert.subject)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(hours=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(True, False, False, False, False, False, False, False, False), critical=True
        )
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.UniformResourceIdentifier(SPIFFE_SERVER)]
            ),
            critical=False,
        )
        .sign(pki.ca_key, hashes.SHA256())
    )
    path = pki.directory / f"{name}.pem"
    path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return path


def server_context(
    pki: MiniPki,
    cert_file: Path,
    provider: PrivateKeyProviderConfig | None,
    *,
    key_file: Path | None = None,
    mtls: bool = True,
) -> TlsContext:
    cert = TlsCertificate(cert_file.read_bytes(), key_file.read_bytes() if key_file else None, provider)
    return TlsContext(
        server_side=True,
        certificates=(cert,),
        validation=CertificateValidation(trusted_ca_pem=pki.ca_file.read_bytes()) if mtls else None,
        require_client_certificate=mtls,
        alpn_protocols=("http/1.1",),
        engine="meshlet",
    )


def client_ssl_context(pki: MiniPki, client: Leaf | None) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.load_verify_locations(cafile=str(pki.ca_file))
    if client is not None:
        ctx.load_cert_chain(str(client.cert_file), str(client.key_file))
    return ctx


def stdlib_exchange(port: int, ctx: ssl.SSLContext, payload: bytes = b"ping\n") -> bytes:
    """Handshake with the stdlib (OpenSSL) client, send ``payload``, read the echo."""
    with (
        socket.create_connection(("127.0.0.1", port), timeout=8) as raw,
        ctx.wrap_socket(raw, server_hostname="localhost") as tls,
    ):
        tls.sendall(payload)
        received = b""
        while len(received) < len(payload):
            chunk = tls.recv(4096)
            if not chunk:
                break
            received += chunk
        assert tls.version() == "TLSv1.3"
        return received


# --------------------------------------------------------------------------- #
# The key server as a child process
# --------------------------------------------------------------------------- #


@dataclass
class KeyServerProcess:
    socket_path: Path
    key_dir: Path
    log_path: Path
    extra: tuple[str, ...] = ()
    proc: subprocess.Popen[bytes] | None = None

    def start(self) -> KeyServerProcess:
        argv = [
            sys.executable,
            "-m",
            "meshlet.cli.main",
            "keyserver",
            "run",
            "--socket",
            str(self.socket_path),
            "--key-dir",
            str(self.key_dir),
            *self.extra,
        ]
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=log)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"key server exited: {self.log_path.read_text()}")
            with contextlib.suppress(OSError), socket.socket(socket.AF_UNIX) as s:
                s.connect(str(self.socket_path))
                return self
            time.sleep(0.05)
        raise AssertionError("key server did not start")

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def signal(self, sig: int) -> None:
        assert self.proc is not None
        os.kill(self.proc.pid, sig)

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.proc.pid, signal.SIGCONT)
        self.proc.kill()
        self.proc.wait(timeout=5)

    def cli(self, *args: str) -> subprocess.CompletedProcess[str]:
        argv = [
            sys.executable,
            "-m",
            "meshlet.cli.main",
            "keyserver",
            *args,
            "--socket",
            str(self.socket_path),
        ]
        return subprocess.run(argv, capture_output=True, text=True, timeout=30, check=False)


@contextlib.contextmanager
def key_server_process(tmp: Path, *extra: str) -> Iterator[KeyServerProcess]:
    server = KeyServerProcess(tmp / "ks.sock", tmp / "keys", tmp / "keyserver.log", extra)
    try:
        yield server.start()
    finally:
        server.stop()


async def wait_until(predicate: object, timeout: float = 5.0) -> None:
    assert callable(predicate)
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(0.02)
