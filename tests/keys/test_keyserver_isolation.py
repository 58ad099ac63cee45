"""The key server as a separate process, with the real ``meshlet proxy``:

- isolation: after a full mTLS exchange through a proxy whose certificate is
  signed by the key server, the proxy's memory (read through /proc/PID/mem)
  holds neither the private key's PEM, its DER, nor its prime factors, and no
  file the proxy has open is the key; the same search does find the key in the
  key server's memory (so the test can fail);
- restart: a handshake whose signature is in flight when the key server dies
  fails cleanly (an alert, that connection only); established connections go
  on; once the server is back, the provider reconnects and handshakes succeed.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import ssl
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from keys_helpers import (
    Echo,
    KeyServerProcess,
    MiniPki,
    client_ssl_context,
    issue_for,
    key_server_process,
    meshlet_serve,
    server_context,
    stdlib_exchange,
)

from meshlet.config.model import PrivateKeyProviderConfig
from meshlet.tls.aio import MeshletTlsSocketFactory

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "interop"))

from interop_helpers import (
    MeshletProcess,
    bootstrap,
    direct,
    hcm,
    listener,
    ports,
    tls_socket,
)

TYPED_STRUCT = "type.googleapis.com/xds.type.v3.TypedStruct"

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="reads another process's memory (needs root)")


# --------------------------------------------------------------------------- #
# What the key looks like in memory
# --------------------------------------------------------------------------- #


def key_needles(key: rsa.RSAPrivateKey) -> dict[str, bytes]:
    """Byte strings any copy of the key would contain."""
    pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    der = key.private_bytes(
        serialization.Encoding.DER, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    numbers = key.private_numbers()
    needles: dict[str, bytes] = {"der": der}
    for name, value in (("p", numbers.p), ("q", numbers.q)):
        size = (value.bit_length() + 7) // 8
        needles[f"{name} big-endian"] = value.to_bytes(size, "big")
        needles[f"{name} little-endian"] = value.to_bytes(size, "little")
    # Every full base64 line of the PEM body (the armour lines are not secret).
    for i, line in enumerate(pem.splitlines()[1:-1]):
        if len(line) == 64:
            needles[f"pem line {i}"] = line
    return needles


def readable_regions(pid: int) -> Iterator[tuple[int, int]]:
    with open(f"/proc/{pid}/maps") as maps:
        for entry in maps:
            fields = entry.split()
            span, perms = fields[0], fields[1]
            name = fields[5] if len(fields) > 5 else ""
            if not perms.startswith("r") or name in ("[vvar]", "[vsyscall]"):
                continue
            start, end = (int(x, 16) for x in span.split("-"))
            yield start, end


def find_in_memory(pid: int, needles: dict[str, bytes]) -> set[str]:
    """Names of the needles found anywhere in ``pid``'s readable memory."""
    found: set[str] = set()
    overlap = max(len(n) for n in needles.values())
    with open(f"/proc/{pid}/mem", "rb", buffering=0) as mem:
        for start, end in readable_regions(pid):
            try:
                mem.seek(start)
                chunk = mem.read(end - start)
            except OSError:  # guard pages and the like
                continue
            if not chunk:
                continue
            for name, needle in needles.items():
                if name not in found and chunk.find(needle) != -1:
                    found.add(name)
            del chunk
    assert overlap > 0
    return found


def open_files(pid: int) -> list[str]:
    targets = []
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            targets.append(os.readlink(f"/proc/{pid}/fd/{fd}"))
        except OSError:
            continue
    return targets


# --------------------------------------------------------------------------- #
# Isolation
# --------------------------------------------------------------------------- #


def provider_block(ks: KeyServerProcess, handle: str) -> dict[str, object]:
    return {
        "provider_name": "meshlet.keyserver",
        "typed_config": {"@type": TYPED_STRUCT, "value": {"socket": str(ks.socket_path), "handle": handle}},
    }


def https_get(port: int, ctx: ssl.SSLContext) -> bytes:
    import socket

    with (
        socket.create_connection(("127.0.0.1", port), timeout=8) as raw,
        ctx.wrap_socket(raw, server_hostname="localhost") as tls,
    ):
        assert tls.version() == "TLSv1.3"
        tls.sendall(b"GET /hello HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
        response = b""
        while chunk := tls.recv(65536):
            response += chunk
        return response


def start_meshlet_proxy(
    tmp_path: Path, ks: KeyServerProcess, cert_file: Path, pki: MiniPki
) -> TlsServerProcess:
    """``meshlet proxy --tls-engine meshlet``: HTTPS with mTLS, a direct response."""
    port, admin = ports(2)
    tls = tls_socket(
        {
            "common_tls_context": {
                "tls_certificates": [
                    {
                        "certificate_chain": {"filename": str(cert_file)},
                        "private_key_provider": provider_block(ks, "edge"),
                    }
                ],
                "validation_context": {"trusted_ca": {"filename": str(pki.ca_file)}},
                "alpn_protocols": ["http/1.1"],
            },
            "require_client_certificate": True,
        }
    )
    routes = [direct("/hello", 200, "signed elsewhere")]
    config = bootstrap([listener("https", port, [hcm(routes)], transport_socket=tls)], [], admin)
    workdir = tmp_path / "proxy"
    workdir.mkdir()
    proxy = MeshletProcess(workdir, config, ["--tls-engine", "meshlet"])
    try:
        proxy.start()
    except BaseException:
        proxy.stop()
        raise
    assert proxy.proc is not None

    def exchange(ctx: ssl.SSLContext) -> None:
        try:
            response = https_get(port, ctx)
        except ssl.SSLError as exc:
            raise AssertionError(f"{exc}; proxy log:\n{proxy.log()}") from None
        assert response.startswith(b"HTTP/1.1 200"), response[:200]
        assert response.endswith(b"signed elsewhere")

    return TlsServerProcess(proxy.proc, exchange, proxy.stop)


def start_engine_process(
    tmp_path: Path, ks: KeyServerProcess, cert_file: Path, pki: MiniPki
) -> TlsServerProcess:
    """The TLS engine alone in a process (tls_echo_server.py), echoing."""
    provider = {
        "provider_name": "meshlet.keyserver",
        "settings": {"socket": str(ks.socket_path), "handle": "edge"},
    }
    script = Path(__file__).with_name("tls_echo_server.py")
    proc = subprocess.Popen(
        [sys.executable, str(script), str(cert_file), str(pki.ca_file), json.dumps(provider)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
    )

    def stop() -> None:
        proc.kill()
        proc.wait(timeout=5)

    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        port = int(line)
    except BaseException:
        stop()
        raise

    def exchange(ctx: ssl.SSLContext) -> None:
        assert stdlib_exchange(port, ctx) == b"ping\n"

    return TlsServerProcess(proc, exchange, stop)


@dataclass
class TlsServerProcess:
    proc: subprocess.Popen[bytes]
    exchange: Callable[[ssl.SSLContext], None]
    stop: Callable[[], None]


@pytest.mark.parametrize(
    "start", [start_engine_process, start_meshlet_proxy], ids=["tls-engine", "meshlet-proxy"]
)
def test_server_memory_never_holds_the_key(
    tmp_path: Path, start: Callable[[Path, KeyServerProcess, Path, MiniPki], TlsServerProcess]
) -> None:
    with key_server_process(tmp_path) as ks:
        generated = ks.cli(
            "generate", "--type", "rsa2048", "--name", "edge", "--public-out", str(tmp_path / "edge.pub")
        )
        assert generated.returncode == 0, generated.stderr
        assert generated.stdout.strip() == "edge"
        key_file = ks.key_dir / "edge.key.pem"
        # The auditor (this test) reads the key from the server's store.
        key = serialization.load_pem_private_key(key_file.read_bytes(), None)
        assert isinstance(key, rsa.RSAPrivateKey)
        needles = key_needles(key)

        pki = MiniPki.create(tmp_path)
        public = serialization.load_pem_public_key((tmp_path / "edge.pub").read_bytes())
        cert_file = issue_for(pki, "edge", public)  # type: ignore[arg-type]
        client = pki.issue("client", "ecdsa")

        server = start(tmp_path, ks, cert_file, pki)
        try:
            ctx = client_ssl_context(pki, client)
            for _ in range(3):  # full mTLS handshakes, each signed by the key server
                server.exchange(ctx)
            leaked = find_in_memory(server.proc.pid, needles)
            assert not leaked, f"the TLS server's memory holds the key: {sorted(leaked)}"
            files = open_files(server.proc.pid)
            assert str(key_file) not in files
            assert not [f for f in files if f.startswith(str(ks.key_dir))]
        finally:
            server.stop()

        # Control: the same search finds the key where it does live.
        in_server = find_in_memory(ks.pid, needles)
        assert {"p little-endian", "q little-endian"} & in_server or "der" in in_server, in_server


# --------------------------------------------------------------------------- #
# Restart
# --------------------------------------------------------------------------- #


def expect_handshake_failure(port: int, ctx: ssl.SSLContext) -> str:
    try:
        stdlib_exchange(port, ctx)
    except (ssl.SSLError, ConnectionError) as exc:
        return str(exc)
    raise AssertionError("the handshake succeeded")


async def test_key_server_restart(tmp_path: Path) -> None:
    with key_server_process(tmp_path) as ks:
        assert ks.cli("generate", "--type", "p256", "--name", "web").returncode == 0
        public = serialization.load_pem_public_key(_public_pem(ks, "web"))
        pki = MiniPki.create(tmp_path)
        cert_file = issue_for(pki, "web", public)  # type: ignore[arg-type]
        client = pki.issue("client", "ecdsa")
        provider = PrivateKeyProviderConfig(
            "meshlet.keyserver", {"socket": str(ks.socket_path), "handle": "web", "request_timeout": 3.0}
        )
        factory = MeshletTlsSocketFactory.from_context(server_context(pki, cert_file, provider))
        served = await meshlet_serve(factory, Echo)
        ctx = client_ssl_context(pki, client)
        try:
            assert await asyncio.to_thread(stdlib_exchange, served.port, ctx) == b"ping\n"
            established = await asyncio.to_thread(_open_session, served.port, ctx)

            # Freeze the server so the next signature is in flight when it dies.
            ks.signal(signal.SIGSTOP)
            failing = asyncio.ensure_future(asyncio.to_thread(expect_handshake_failure, served.port, ctx))
            deadline = time.monotonic() + 5
            while factory.config.key.stats()["in_flight"] == 0:  # type: ignore[union-attr]
                assert time.monotonic() < deadline, "the signature never went out"
                await asyncio.sleep(0.01)
            ks.signal(signal.SIGKILL)
            assert ks.proc is not None
            ks.proc.wait(timeout=5)
            error = await asyncio.wait_for(failing, 10)
            assert re.search(r"internal.error", error, re.I), error
            assert served.failures and "internal_error" in str(served.failures[-1])

            # The connection made before the outage still works.
            await asyncio.to_thread(_echo_on, established)

            # While the server is down, handshakes fail fast and cleanly.
            assert re.search(
                r"internal.error", await asyncio.to_thread(expect_handshake_failure, served.port, ctx), re.I
            )

            ks.start()  # same socket, same key directory
            deadline = time.monotonic() + 10
            while True:
                try:
                    assert await asyncio.to_thread(stdlib_exchange, served.port, ctx) == b"ping\n"
                    break
                except (ssl.SSLError, ConnectionError):
                    assert time.monotonic() < deadline, "no successful handshake after the restart"
                    await asyncio.sleep(0.1)
            assert factory.config.key.stats()["reconnects"] >= 1  # type: ignore[union-attr]
            established.close()
        finally:
            served.server.close()
            factory.config.key.close()  # type: ignore[union-attr]


def _public_pem(ks: KeyServerProcess, name: str) -> bytes:
    from meshlet.keys.keyserver.client import call, checked, load_public_key
    from meshlet.keys.keyserver.protocol import PublicKeyRequest

    key = load_public_key(checked(call(str(ks.socket_path), PublicKeyRequest(1, name))))
    return key.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)


def _open_session(port: int, ctx: ssl.SSLContext) -> ssl.SSLSocket:
    import socket

    raw = socket.create_connection(("127.0.0.1", port), timeout=8)
    return ctx.wrap_socket(raw, server_hostname="localhost")


def _echo_on(tls: ssl.SSLSocket) -> None:
    tls.sendall(b"still here\n")
    received = b""
    while len(received) < len(b"still here\n"):
        chunk = tls.recv(4096)
        assert chunk, "the established connection was closed"
        received += chunk
    assert received == b"still here\n"


def test_one_provider_serves_successive_event_loops(tmp_path: Path) -> None:
    from meshlet.keys.keyserver.client import build_keyserver

    with key_server_process(tmp_path) as ks:
        assert ks.cli("generate", "--type", "p256", "--name", "web").returncode == 0
        provider = build_keyserver(
            PrivateKeyProviderConfig("meshlet.keyserver", {"socket": str(ks.socket_path), "handle": "web"})
        )
        try:
            for _ in range(2):  # e.g. a worker restarting its loop: connections follow the loop
                signature = asyncio.run(provider.sign(0x0403, b"data"))
                provider.public_key.verify(signature, b"data", ec.ECDSA(hashes.SHA256()))  # type: ignore[call-arg,union-attr]
        finally:
            provider.close()
