"""``meshlet ca serve``: the CA service on its own gRPC server.

The server's TLS certificate is an SVID of the CA's own trust domain
(``spiffe://<td>/ns/meshlet-system/sa/meshlet-ca``, plus the DNS or IP name
clients dial), so clients anchor the connection in the trust bundle they
already hold. The directory is re-read when ``ca.json`` changes (a root
rotation, a new intermediate); the serving certificate is then reissued, and
also at half its lifetime, and handed to gRPC for new handshakes.
"""

from __future__ import annotations

import asyncio
import datetime
import ipaddress
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import grpc
from cryptography.hazmat.primitives.asymmetric import ec

from meshlet.identity.ca import CertificateAuthority
from meshlet.identity.cadir import TOKENS_DB, CaDirectory, pem_of, private_key_pem
from meshlet.identity.service import MAX_MESSAGE_BYTES, CaService
from meshlet.identity.spiffe import SpiffeId
from meshlet.identity.tokens import BootstrapTokens, SqliteTokenStore

log = logging.getLogger(__name__)

SERVING_TTL = datetime.timedelta(hours=24)
RELOAD_CHECK_INTERVAL = 0.5


class ReloadingAuthority:
    """The directory's CA, reloaded when the directory's stamp changes."""

    def __init__(self, directory: CaDirectory) -> None:
        self.directory = directory
        self._stamp = directory.stamp()
        self._authority = directory.authority()
        self._previous: CertificateAuthority | None = None

    def __call__(self) -> CertificateAuthority:
        stamp = self.directory.stamp()
        if stamp != self._stamp:
            fresh = self.directory.authority()
            # The key of the authority before the one being replaced is closed
            # now, a whole reload later, so no issuance is still signing with it.
            if self._previous is not None and self._previous.key is not fresh.key:
                _close_key(self._previous)
            self._previous, self._authority = self._authority, fresh
            self._stamp = stamp
            roots = len(self._authority.bundle.roots)
            log.info("CA directory changed; reloaded (trust bundle: %d roots)", roots)
        return self._authority


def _close_key(authority: CertificateAuthority) -> None:
    close = getattr(authority.key, "close", None)
    if callable(close):
        close()


def ca_service_for(directory: CaDirectory, authority: ReloadingAuthority | None = None) -> CaService:
    """The CA service of a CA directory, ready to mount in any ``grpc.aio``
    server (``ca_service_for(CaDirectory(path)).add_to_server(server)``): it
    follows the directory's changes and redeems tokens from its ``tokens.db``
    (issue them with ``service.tokens.issue(spiffe_id, ttl=...)``)."""
    tokens = BootstrapTokens(SqliteTokenStore(directory.file(TOKENS_DB)))
    authority = authority or ReloadingAuthority(directory)
    return CaService(authority, tokens, federation=directory.federated_bundles)


@dataclass(frozen=True, slots=True)
class ServingCertificate:
    chain_pem: bytes
    key_pem: bytes
    bundle_pem: bytes
    renew_at: float


async def issue_serving_certificate(authority: CertificateAuthority, server_name: str) -> ServingCertificate:
    key = ec.generate_private_key(ec.SECP256R1())
    spiffe_id = SpiffeId.for_workload(authority.trust_domain, "meshlet-system", "meshlet-ca")
    try:
        ips, names = [str(ipaddress.ip_address(server_name))], []
    except ValueError:
        ips, names = [], [server_name]
    ttl = min(SERVING_TTL, authority.policy.max_ttl)
    issued = await authority.issue(spiffe_id, key.public_key(), ttl=ttl, dns_names=names, ip_addresses=ips)
    lifetime = issued.leaf.not_valid_after_utc.timestamp() - time.time()
    return ServingCertificate(issued.chain_pem(), private_key_pem(key), pem_of(*authority.bundle.roots),
                              time.time() + lifetime / 2)


class CaServer:
    """A ``grpc.aio`` server with the CA service, over TLS."""

    def __init__(self, directory: CaDirectory, listen: str, server_name: str) -> None:
        self.directory = directory
        self.listen = listen
        self.server_name = server_name
        self.authority = ReloadingAuthority(directory)
        self.service = ca_service_for(directory, self.authority)
        self.port = 0
        self._server: grpc.aio.Server | None = None
        self._serving: ServingCertificate | None = None
        self._pending: object | None = None
        self._stamp = 0
        self._refresher: asyncio.Task[None] | None = None

    def _fetch_configuration(self) -> object | None:
        # Called by gRPC for each handshake: a new configuration once, then None.
        pending, self._pending = self._pending, None
        return pending

    def _configuration(self, serving: ServingCertificate) -> object:
        return grpc.ssl_server_certificate_configuration([(serving.key_pem, serving.chain_pem)])

    async def start(self) -> int:
        self._stamp = self.directory.stamp()
        self._serving = await issue_serving_certificate(self.authority(), self.server_name)
        credentials = grpc.dynamic_ssl_server_credentials(
            self._configuration(self._serving), self._fetch_configuration, require_client_authentication=False
        )
        self._server = grpc.aio.server(options=[("grpc.max_receive_message_length", MAX_MESSAGE_BYTES)])
        self.service.add_to_server(self._server)
        self.port = self._server.add_secure_port(self.listen, credentials)
        if self.port == 0:
            raise OSError(f"cannot listen on {self.listen}")
        await self._server.start()
        self._refresher = asyncio.get_running_loop().create_task(self._refresh_forever())
        return self.port

    async def _refresh_forever(self) -> None:
        while True:
            await asyncio.sleep(RELOAD_CHECK_INTERVAL)
            stamp = self.directory.stamp()
            serving = self._serving
            if stamp == self._stamp and serving is not None and time.time() < serving.renew_at:
                continue
            try:
                self._serving = await issue_serving_certificate(self.authority(), self.server_name)
            except Exception:
                log.exception("could not reissue the CA service's certificate; keeping the current one")
                continue
            self._stamp = stamp
            self._pending = self._configuration(self._serving)

    async def stop(self, grace: float = 1.0) -> None:
        if self._refresher is not None:
            self._refresher.cancel()
            await asyncio.gather(self._refresher, return_exceptions=True)
        if self._server is not None:
            await self._server.stop(grace)


async def serve(path: Path, listen: str, server_name: str, ready: asyncio.Event | None = None) -> None:
    server = CaServer(CaDirectory(path), listen, server_name)
    port = await server.start()
    host = listen.rsplit(":", 1)[0]
    print(f"CA service listening on {host}:{port}", flush=True)
    if ready is not None:
        ready.set()
    try:
        await asyncio.Event().wait()
    finally:
        await server.stop()

