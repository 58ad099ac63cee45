"""The identity agent: first SVID with a bootstrap token, renewals at half
life into live TLS contexts, back-off while the CA is away; and, with real
processes (CA service, key server, proxy), rotations and a root rotation
under continuous mTLS traffic with no failed request."""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import json
import socket
import ssl
import threading
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from ca_helpers import MESHLET, ChildProcess, ca_service, init_ca, key_server, meshlet
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import Encoding

from meshlet.config.model import CertificateValidation, TlsCertificate, TlsContext
from meshlet.errors import UnsupportedConfig
from meshlet.identity.bundle import TrustBundle
from meshlet.identity.ca import CertificateAuthority
from meshlet.identity.cadir import TOKENS_DB, CaDirectory
from meshlet.identity.rotation import IdentityAgent, IdentityError, LocalKeySource, RotationPolicy
from meshlet.identity.service import (
    CaClient,
    CaRefused,
    CaService,
    CertificateRequest,
    CertificateResponse,
    ServiceError,
)
from meshlet.identity.spiffe import SpiffeId
from meshlet.identity.tokens import BootstrapTokens, SqliteTokenStore
from meshlet.proxy.listeners.tls_openssl import OpenSslTransportSocketFactory
from meshlet.proxy.observe.stats import StatsStore
from meshlet.tls.aio import MeshletTlsSocketFactory
from meshlet.tls.keys_local import LocalKey
from meshlet.tls.verify import PeerVerificationError

TD = "example.org"
SERVER = SpiffeId.for_workload(TD, "shop", "cart")
CLIENT = SpiffeId.for_workload(TD, "shop", "frontend")
TYPED_STRUCT = "type.googleapis.com/xds.type.v3.TypedStruct"
DOWNSTREAM_TLS = "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.DownstreamTlsContext"
HCM = "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager"
ROUTER = "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"


class InProcessCa:
    """The CA service called directly (no network), as the agent's signer."""

    def __init__(self, ca_dir: Path) -> None:
        directory = CaDirectory(ca_dir)
        tokens = BootstrapTokens(SqliteTokenStore(ca_dir / TOKENS_DB))
        self.service = CaService(directory.authority, tokens, federation=directory.federated_bundles)
        self.bundle = b""

    async def create_certificate(self, request: CertificateRequest, *, token: str | None = None
                                 ) -> CertificateResponse:
        try:
            return await self.service.create_certificate(request, token)
        except ServiceError as exc:
            raise CaRefused(exc.code.name, exc.message) from None

    def update_trust_bundle(self, bundle_pem: bytes) -> None:
        self.bundle = bundle_pem


def token_for(ca_dir: Path, spiffe_id: SpiffeId) -> str:
    return BootstrapTokens(SqliteTokenStore(ca_dir / TOKENS_DB)).issue(spiffe_id)


def placeholder_factory(ca_dir: Path) -> MeshletTlsSocketFactory:
    """A server context as the bootstrap config would build it, before any rotation."""
    result = meshlet("ca", "issue", "--dir", str(ca_dir), "--spiffe-id", str(SERVER),
                     "--out-cert", str(ca_dir / "first.pem"), "--out-key", str(ca_dir / "first.key"))
    assert result.returncode == 0, result.stderr
    context = TlsContext(
        server_side=True,
        certificates=(TlsCertificate((ca_dir / "first.pem").read_bytes(),
                                     (ca_dir / "first.key").read_bytes()),),
        validation=CertificateValidation(trusted_ca_pem=(ca_dir / "bundle.pem").read_bytes()),
    )
    return MeshletTlsSocketFactory.from_context(context)


@pytest.fixture
def ca_dir(tmp_path: Path) -> Path:
    init_ca(tmp_path / "ca")
    return tmp_path / "ca"


async def test_agent_installs_and_renews_into_live_contexts(ca_dir: Path) -> None:
    factory = placeholder_factory(ca_dir)
    stats = StatsStore()
    agent = IdentityAgent(SERVER, LocalKeySource(), InProcessCa(ca_dir), token=token_for(ca_dir, SERVER),
                          stats=stats, policy=RotationPolicy(ttl_seconds=3600), targets=lambda _: [factory])
    first = await agent.bootstrap()
    assert factory.certificate_chain == first.chain
    assert factory.config.key is first.key.handle
    assert 3590 <= stats.value("identity.cert_expiry_seconds") <= 3600  # type: ignore[operator]
    # Renewal point: half the lifetime, within the jitter.
    assert 0.45 * 3600 <= agent.renew_at - time.time() <= 0.55 * 3600

    second = await agent.renew()
    assert x509.load_der_x509_certificate(second.chain[0]).serial_number != first.leaf.serial_number
    assert second.key.handle.public_key != first.key.handle.public_key  # a new key each time
    assert factory.certificate_chain == second.chain
    assert stats.value("identity.rotations") == 1
    assert agent.describe()["serial_number"] == f"{second.leaf.serial_number:x}"
    await agent.stop()


async def test_refused_bootstrap_fails_at_once(ca_dir: Path) -> None:
    agent = IdentityAgent(SERVER, LocalKeySource(), InProcessCa(ca_dir), token="mlt1.forged",
                          policy=RotationPolicy(bootstrap_timeout=30), targets=lambda _: [])
    started = time.monotonic()
    with pytest.raises(IdentityError, match="bootstrap token is not known to this CA"):
        await agent.bootstrap()
    assert time.monotonic() - started < 5


async def test_renewal_failures_keep_the_current_svid_and_back_off(ca_dir: Path, tmp_path: Path) -> None:
    factory = placeholder_factory(ca_dir)
    stats = StatsStore()
    with ca_service(tmp_path, ca_dir) as ca:
        bundle = (ca_dir / "bundle.pem").read_bytes()
        client = CaClient(ca.address, bundle, server_name="127.0.0.1", timeout=2)
        agent = IdentityAgent(SERVER, LocalKeySource(), client, token=token_for(ca_dir, SERVER), stats=stats,
                              policy=RotationPolicy(ttl_seconds=60, retry_initial=0.2, retry_max=0.4),
                              targets=lambda _: [factory])
        first = await agent.bootstrap()
    # The CA is gone: renewals fail, the SVID in use stays, retries come quickly (back-off).
    agent.renew_at = time.time()
    task = agent.start()
    try:
        deadline = time.monotonic() + 8
        while stats.value("identity.renewal_failures") < 3:  # type: ignore[operator]
            assert time.monotonic() < deadline, agent.describe()
            await asyncio.sleep(0.05)
        assert factory.certificate_chain == first.chain
        assert agent.current is first
        assert "UNAVAILABLE" in agent.last_error
        assert agent.renew_at - time.time() <= 0.5
        # The CA comes back (a new process, new port): the next retry succeeds.
        with ca_service(tmp_path, ca_dir) as again:
            client.target = again.address
            deadline = time.monotonic() + 8
            while stats.value("identity.rotations") == 0:
                assert time.monotonic() < deadline, agent.describe()
                await asyncio.sleep(0.05)
        assert factory.certificate_chain != first.chain
    finally:
        await agent.stop()
        await client.close()
        assert task.done()


def test_openssl_engine_rotates_only_with_the_key_in_process(ca_dir: Path) -> None:
    result = meshlet("ca", "issue", "--dir", str(ca_dir), "--spiffe-id", str(SERVER),
                     "--out-cert", str(ca_dir / "a.pem"), "--out-key", str(ca_dir / "a.key"))
    assert result.returncode == 0, result.stderr
    context = TlsContext(server_side=True, certificates=(
        TlsCertificate((ca_dir / "a.pem").read_bytes(), (ca_dir / "a.key").read_bytes()),))
    factory = OpenSslTransportSocketFactory(context)
    old_ssl_context = factory.context
    result = meshlet("ca", "issue", "--dir", str(ca_dir), "--spiffe-id", str(SERVER),
                     "--out-cert", str(ca_dir / "b.pem"), "--out-key", str(ca_dir / "b.key"))
    assert result.returncode == 0, result.stderr
    issued = x509.load_pem_x509_certificates((ca_dir / "b.pem").read_bytes())
    chain = tuple(c.public_bytes(Encoding.DER) for c in issued)
    key = LocalKey.from_pem((ca_dir / "b.key").read_bytes())
    with pytest.raises(UnsupportedConfig, match="needs the private key in process"):
        factory.replace_certificate(chain, key)
    factory.replace_certificate(chain, key, private_key_pem=(ca_dir / "b.key").read_bytes())
    assert factory.certificate_chain == chain
    assert factory.context is not old_ssl_context  # existing connections keep the old one


# --------------------------------------------------------------------------- #
# Real processes: CA service, key server, the proxy with its agent
# --------------------------------------------------------------------------- #


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def proxy_template(port: int, admin_port: int, keyserver_socket: Path | None) -> str:
    certificate: dict[str, object] = {"certificate_chain": {"filename": "${IDENTITY_DIR}/cert-chain.pem"}}
    if keyserver_socket is not None:
        settings = {"socket": str(keyserver_socket), "handle": "${IDENTITY_KEY_HANDLE}"}
        certificate["private_key_provider"] = {"provider_name": "meshlet.keyserver", "typed_config": {
            "@type": TYPED_STRUCT, "value": settings}}
    else:
        certificate["private_key"] = {"filename": "${IDENTITY_DIR}/key.pem"}
    tls = {"name": "envoy.transport_sockets.tls", "typed_config": {
        "@type": DOWNSTREAM_TLS, "require_client_certificate": True,
        "common_tls_context": {
            "tls_certificates": [certificate],
            "validation_context": {"trusted_ca": {"filename": "${IDENTITY_DIR}/root-cert.pem"}},
            "alpn_protocols": ["http/1.1"]}}}
    hcm = {"name": "envoy.filters.network.http_connection_manager", "typed_config": {
        "@type": HCM, "stat_prefix": "ingress",
        "route_config": {"virtual_hosts": [{"name": "all", "domains": ["*"], "routes": [
            {"match": {"prefix": "/"},
             "direct_response": {"status": 200, "body": {"inline_string": "ok"}}}]}]},
        "http_filters": [{"name": "envoy.filters.http.router", "typed_config": {"@type": ROUTER}}]}}
    config = {
        "admin": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": admin_port}}},
        "static_resources": {"listeners": [{
            "name": "mtls", "address": {"socket_address": {"address": "127.0.0.1", "port_value": port}},
            "filter_chains": [{"filters": [hcm], "transport_socket": tls}]}]},
    }
    return json.dumps(config, indent=1)


def admin_get(port: int, path: str) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=3) as response:
        return str(response.read().decode())


@dataclass
class Sidecar:
    child: ChildProcess
    port: int
    admin_port: int
    identity_dir: Path


@contextlib.contextmanager
def sidecar(tmp: Path, ca_dir: Path, ca_address: str, *, ttl: float, engine: str,
            keyserver_socket: Path | None = None) -> Iterator[Sidecar]:
    port, admin_port = free_port(), free_port()
    template = tmp / "proxy.template.json"
    template.write_text(proxy_template(port, admin_port, keyserver_socket))
    token_file = tmp / "token"
    token_file.write_text(token_for(ca_dir, SERVER))
    identity_dir = tmp / "identity"
    argv = [MESHLET[0], "-m", "meshlet.identity.sidecar", "--config", str(template),
            "--identity-dir", str(identity_dir), "--spiffe-id", str(SERVER), "--ca", ca_address,
            "--ca-server-name", "127.0.0.1", "--ca-bundle", str(ca_dir / "bundle.pem"),
            "--token-file", str(token_file), "--svid-ttl", str(ttl), "--tls-engine", engine]
    if keyserver_socket is not None:
        argv += ["--keyserver-socket", str(keyserver_socket)]
    child = ChildProcess(argv, tmp / "sidecar.log").start()
    try:
        deadline = time.monotonic() + 20
        while True:
            child.check_alive()
            with contextlib.suppress(OSError):
                if admin_get(admin_port, "/ready").strip() == "LIVE":
                    break
            assert time.monotonic() < deadline, child.log()
            time.sleep(0.1)
        yield Sidecar(child, port, admin_port, identity_dir)
    finally:
        child.stop()


@dataclass
class ClientIdentity:
    cert: Path
    key: Path


def issue_client(ca_dir: Path, tmp: Path, name: str) -> ClientIdentity:
    cert, key = tmp / f"{name}.pem", tmp / f"{name}.key"
    result = meshlet("ca", "issue", "--dir", str(ca_dir), "--spiffe-id", str(CLIENT),
                     "--out-cert", str(cert), "--out-key", str(key))
    assert result.returncode == 0, result.stderr
    return ClientIdentity(cert, key)


def client_context(identity: ClientIdentity, bundle: Path) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False  # SVIDs name workloads by URI SAN, not host names
    ctx.load_verify_locations(cafile=str(bundle))
    ctx.load_cert_chain(str(identity.cert), str(identity.key))
    return ctx


def read_response(tls: ssl.SSLSocket) -> bytes:
    """One keep-alive response, read by its content-length (the client then
    closes; waiting for the server to close would time the server's linger)."""
    response = b""
    while b"\r\n\r\n" not in response:
        chunk = tls.recv(65536)
        if not chunk:
            return response
        response += chunk
    head, _, body = response.partition(b"\r\n\r\n")
    length = next((int(line.split(b":", 1)[1]) for line in head.split(b"\r\n")
                   if line.lower().startswith(b"content-length:")), 0)
    while len(body) < length:
        chunk = tls.recv(65536)
        if not chunk:
            break
        body += chunk
    return head + b"\r\n\r\n" + body


def one_request(port: int, ctx: ssl.SSLContext) -> x509.Certificate:
    with socket.create_connection(("127.0.0.1", port), timeout=5) as raw, ctx.wrap_socket(raw) as tls:
        tls.sendall(b"GET / HTTP/1.1\r\nHost: mesh\r\n\r\n")
        response = read_response(tls)
        if not response.startswith(b"HTTP/1.1 200") or not response.endswith(b"ok"):
            raise AssertionError(f"unexpected response {response[:80]!r}")
        peer = tls.getpeercert(binary_form=True)
        assert peer is not None
        return x509.load_der_x509_certificate(peer)


@dataclass
class Traffic:
    """Clients making one mTLS request per connection, in threads, until stopped.
    Each connection reads the current client identity and bundle, so a test can
    switch them as a real workload's agent would."""

    port: int
    identity: ClientIdentity
    bundle: Path
    ok: int = 0
    failures: list[str] = field(default_factory=list)
    server_serials: set[int] = field(default_factory=set)
    server_issuers: list[str] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                leaf = one_request(self.port, client_context(self.identity, self.bundle))
            except Exception as exc:
                with self._lock:
                    self.failures.append(repr(exc))
                continue
            with self._lock:
                self.ok += 1
                self.server_serials.add(leaf.serial_number)
                self.server_issuers.append(leaf.issuer.rfc4514_string())

    @contextlib.contextmanager
    def running(self, clients: int = 3) -> Iterator[Traffic]:
        threads = [threading.Thread(target=self._run, daemon=True) for _ in range(clients)]
        for thread in threads:
            thread.start()
        try:
            yield self
        finally:
            self._stop.set()
            for thread in threads:
                thread.join(timeout=10)


def stat(sidecar: Sidecar, name: str) -> int:
    for line in admin_get(sidecar.admin_port, "/stats").splitlines():
        key, _, value = line.partition(": ")
        if key == name:
            return int(value)
    raise AssertionError(f"no stat {name}")


@pytest.mark.slow
def test_rotation_under_traffic_with_key_in_a_key_server(ca_dir: Path, tmp_path: Path) -> None:
    with (
        key_server(tmp_path, "workload-ks") as ks_socket,
        ca_service(tmp_path, ca_dir) as ca,
        sidecar(tmp_path, ca_dir, ca.address, ttl=4, engine="meshlet", keyserver_socket=ks_socket) as proxy,
    ):
        assert not (proxy.identity_dir / "key.pem").exists()  # the key stays in the key server
        client = issue_client(ca_dir, tmp_path, "client")
        traffic = Traffic(proxy.port, client, ca_dir / "bundle.pem")
        with (
            socket.create_connection(("127.0.0.1", proxy.port), timeout=5) as raw,
            client_context(client, ca_dir / "bundle.pem").wrap_socket(raw) as kept,
            traffic.running(),
        ):
            # One connection set up before any rotation stays up through all of them.
            deadline = time.monotonic() + 6.5
            kept_requests = 0
            while time.monotonic() < deadline:
                kept.sendall(b"GET / HTTP/1.1\r\nHost: mesh\r\n\r\n")
                assert read_response(kept).endswith(b"ok")
                kept_requests += 1
                time.sleep(0.1)
        rotations = stat(proxy, "identity.rotations")
        certs = json.loads(admin_get(proxy.admin_port, "/certs"))
        expiry = stat(proxy, "identity.cert_expiry_seconds")
    assert traffic.failures == [], traffic.failures[:5]
    assert traffic.ok > 20
    assert kept_requests > 30
    assert rotations >= 2
    assert len(traffic.server_serials) >= 3  # the first SVID and at least two rotations, seen by clients
    assert 0 < expiry <= 4
    chains = [c["cert_chain"] for c in certs["certificates"] if c["cert_chain"]]
    assert any(chain[0]["subject_alt_names"] == [{"uri": str(SERVER)}] for chain in chains)
    entry = chains[0][0]
    assert {"serial_number", "days_until_expiration", "valid_from", "expiration_time"} <= set(entry)


@pytest.mark.slow
def test_root_rotation_without_an_outage(ca_dir: Path, tmp_path: Path) -> None:
    with (
        ca_service(tmp_path, ca_dir) as ca,
        sidecar(tmp_path, ca_dir, ca.address, ttl=3, engine="openssl") as proxy,
    ):
        old_client = issue_client(ca_dir, tmp_path, "old-client")
        old_root = x509.load_pem_x509_certificate((ca_dir / "root-cert.pem").read_bytes())
        traffic = Traffic(proxy.port, old_client, ca_dir / "bundle.pem")
        with traffic.running():
            time.sleep(1.0)
            # Step 1: the new root joins the bundle; the proxy picks it up at its next renewal.
            result = meshlet("ca", "rotate-root", "--dir", str(ca_dir))
            assert result.returncode == 0, result.stderr
            new_root = x509.load_pem_x509_certificate((ca_dir / "pending-root-cert.pem").read_bytes())
            wait_for(lambda: trusted_roots(proxy) == 2, proxy)
            # Step 2: the new root signs; the proxy's next SVID comes from it.
            result = meshlet("ca", "rotate-root", "--dir", str(ca_dir), "--activate")
            assert result.returncode == 0, result.stderr
            wait_for(lambda: traffic.server_issuers[-1:] == [new_root.subject.rfc4514_string()], proxy)
            # Clients move to SVIDs of the new root.
            traffic.identity = issue_client(ca_dir, tmp_path, "new-client")
            time.sleep(1.0)
            # Step 3: the old root leaves the bundle.
            result = meshlet("ca", "rotate-root", "--dir", str(ca_dir), "--finish")
            assert result.returncode == 0, result.stderr
            wait_for(lambda: trusted_roots(proxy) == 1, proxy)
            time.sleep(0.5)
        # The old root has left the proxy's bundle: its SVIDs are refused now.
        with pytest.raises(ssl.SSLError):
            one_request(proxy.port, client_context(old_client, ca_dir / "bundle.pem"))
    assert traffic.failures == [], traffic.failures[:5]
    assert old_root.subject.rfc4514_string() in traffic.server_issuers
    assert traffic.ok > 20


def trusted_roots(proxy: Sidecar) -> int:
    """How many CA certificates the proxy's mTLS listener trusts now (from /certs)."""
    certs = json.loads(admin_get(proxy.admin_port, "/certs"))["certificates"]
    return max((len(c["ca_cert"]) for c in certs if c["cert_chain"]), default=0)


def wait_for(condition: object, proxy: Sidecar, timeout: float = 10.0) -> None:
    assert callable(condition)
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, proxy.child.log()
        time.sleep(0.05)



async def test_federated_bundles_reach_the_tls_contexts(ca_dir: Path, tmp_path: Path) -> None:
    partner_dir = tmp_path / "partner"
    init_ca(partner_dir, trust_domain="partner.org")
    result = meshlet("ca", "federate", "--dir", str(ca_dir), "--trust-domain", "partner.org",
                     "--bundle", str(partner_dir / "bundle.pem"))
    assert result.returncode == 0, result.stderr
    factory = placeholder_factory(ca_dir)
    agent = IdentityAgent(SERVER, LocalKeySource(), InProcessCa(ca_dir), token=token_for(ca_dir, SERVER),
                          policy=RotationPolicy(ttl_seconds=600), targets=lambda _: [factory])
    issued = await agent.bootstrap()
    assert issued.federated.trust_domains == ("partner.org",)

    verifier = factory.config.verifier
    assert verifier is not None
    now = datetime.datetime.now(datetime.UTC)
    partner_ca = CaDirectory(partner_dir).authority()
    public = ec.generate_private_key(ec.SECP256R1()).public_key()
    # A partner workload's SVID verifies against the partner's bundle...
    partner_svid = await partner_ca.issue(SpiffeId.for_workload("partner.org", "pay", "api"), public)
    assert str(verifier(partner_svid.chain_der(), now).spiffe_id) == "spiffe://partner.org/ns/pay/sa/api"
    # ...and each root vouches for its own trust domain only.
    local_ca = CaDirectory(ca_dir).authority()
    ours_as_partner = CertificateAuthority("partner.org", local_ca.certificate, local_ca.key,
                                           TrustBundle.of("partner.org", [local_ca.certificate]))
    fake_partner = await ours_as_partner.issue(SpiffeId.for_workload("partner.org", "pay", "api"), public)
    with pytest.raises(PeerVerificationError, match=r"trust bundle of 'partner\.org'"):
        verifier(fake_partner.chain_der(), now)
    partner_as_ours = CertificateAuthority(TD, partner_ca.certificate, partner_ca.key,
                                           TrustBundle.of(TD, [partner_ca.certificate]))
    fake_local = await partner_as_ours.issue(CLIENT, public)
    with pytest.raises(PeerVerificationError):
        verifier(fake_local.chain_der(), now)
    genuine = await local_ca.issue(CLIENT, public)
    assert verifier(genuine.chain_der(), now).spiffe_id == CLIENT

    result = meshlet("ca", "federate", "--dir", str(ca_dir), "--trust-domain", "partner.org", "--remove")
    assert result.returncode == 0, result.stderr
    await agent.renew()
    with pytest.raises(PeerVerificationError, match="does not chain to the trusted CA roots"):
        factory.config.verifier(partner_svid.chain_der(), now)  # type: ignore[misc]
    await agent.stop()
