"""Proxy SVIDs signed by the mesh CA for SDS: ``CaIdentity``.

For each proxy the control plane makes a key where ``NodeKeys`` says — inside
a key server the proxy also reaches (the secret then names the key by
handle through ``private_key_provider``; the key never leaves the server), or
in process (the key then travels in the SDS secret, for meshes without a key
server) — and has the CA sign an X.509-SVID for the workload's identity,
``spiffe://<trust domain>/ns/<namespace>/sa/<service account>``. An SVID is
issued again with a new key once ``renew_fraction`` of its lifetime has
passed; the pusher asks ``next_renewal()`` when to rebuild.
"""

from __future__ import annotations

import asyncio
import datetime
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.types import CertificatePublicKeyTypes

from meshlet.control.translate.node import ProxyNode
from meshlet.control.translate.security import KeyProviderRef, WorkloadCertificate
from meshlet.identity.ca import CertificateAuthority
from meshlet.identity.spiffe import SpiffeId

DEFAULT_SVID_TTL = datetime.timedelta(hours=1)
KEYSERVER_PROVIDER = "meshlet.keyserver"


@dataclass(frozen=True, slots=True)
class NewKey:
    """A fresh key: its public half, and either where it lives or its PEM."""

    public_key: CertificatePublicKeyTypes
    provider: KeyProviderRef | None = None
    private_key_pem: bytes | None = None


class NodeKeys(Protocol):
    def new_key(self, label: str) -> NewKey: ...


class InProcessKeys:
    """Keys made here; the SDS secret carries them (no key server in this mesh)."""

    def new_key(self, label: str) -> NewKey:
        key = ec.generate_private_key(ec.SECP256R1())
        pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
        return NewKey(key.public_key(), private_key_pem=pem)


@dataclass(frozen=True, slots=True)
class KeyServerKeys:
    """Keys generated inside the key server at ``socket_path``, named after the proxy;
    the secret names them by handle."""

    socket_path: str
    key_type: str = "p256"

    def new_key(self, label: str) -> NewKey:
        from meshlet.keys.keyserver.client import call, checked, load_public_key
        from meshlet.keys.keyserver.protocol import GenerateRequest

        handle = key_handle(label)
        spki = checked(call(self.socket_path, GenerateRequest(1, self.key_type, handle)))
        provider = KeyProviderRef(KEYSERVER_PROVIDER, {"socket": self.socket_path, "handle": handle})
        return NewKey(load_public_key(spki), provider=provider)


def key_handle(label: str) -> str:
    """A key server key name from ``label``: its allowed characters, at most 64,
    starting with a letter or digit (the tail is kept: it tells renewals apart)."""
    cleaned = re.sub(r"[^A-Za-z0-9_.-]", "-", label)[-64:]
    return re.sub(r"^[^A-Za-z0-9]+", "", cleaned) or "proxy"


@dataclass
class _Issued:
    spiffe_id: str
    certificate: WorkloadCertificate
    renew_at: float


@runtime_checkable
class IssuingIdentity(Protocol):
    """A ``MeshIdentity`` that issues certificates before a translation needs them."""

    async def prepare(self, node: ProxyNode, service_account: str) -> bool: ...

    def next_renewal(self) -> float | None: ...


@dataclass
class CaIdentity:
    ca: CertificateAuthority
    keys: NodeKeys = field(default_factory=InProcessKeys)
    ttl: datetime.timedelta = DEFAULT_SVID_TTL
    renew_fraction: float = 0.5
    clock: Callable[[], float] = time.time
    credentials: dict[str, WorkloadCertificate] = field(default_factory=dict)
    credential_cas: dict[str, bytes] = field(default_factory=dict)
    _issued: dict[str, _Issued] = field(default_factory=dict)

    @property
    def trust_domain(self) -> str:
        return self.ca.trust_domain

    def trust_bundle_pem(self) -> bytes:
        return self.ca.bundle.to_pem()

    def certificate_for(self, node: ProxyNode) -> WorkloadCertificate | None:
        issued = self._issued.get(node.id)
        return issued.certificate if issued is not None else None

    def credential(self, name: str) -> WorkloadCertificate | None:
        return self.credentials.get(name)

    def credential_ca(self, name: str) -> bytes | None:
        return self.credential_cas.get(name)

    async def prepare(self, node: ProxyNode, service_account: str) -> bool:
        """Issue ``node`` an SVID when it has none, its identity changed, or renewal is due.
        True when a new one was issued."""
        spiffe_id = str(SpiffeId.for_workload(self.trust_domain, node.namespace, service_account))
        current = self._issued.get(node.id)
        if current is not None and current.spiffe_id == spiffe_id and self.clock() < current.renew_at:
            return False
        # A new name each time: a renewal gets a new key, the old one serves until then.
        label = f"svid-{node.namespace}-{node.name}-{int(self.clock())}"
        # Making a key may be a blocking call to a key server: off the event loop.
        key = await asyncio.to_thread(self.keys.new_key, label)
        issued = await self.ca.issue(SpiffeId.parse(spiffe_id), key.public_key, ttl=self.ttl)
        chain = issued.chain_pem()
        certificate = (WorkloadCertificate(chain, key_provider=key.provider) if key.provider is not None
                       else WorkloadCertificate(chain, private_key_pem=key.private_key_pem))
        lifetime = self.ttl.total_seconds()
        self._issued[node.id] = _Issued(spiffe_id, certificate, self.clock() + lifetime * self.renew_fraction)
        return True

    def next_renewal(self) -> float | None:
        """When the soonest SVID is due for renewal (clock time), if any was issued."""
        return min((i.renew_at for i in self._issued.values()), default=None)

    def forget(self, node_id: str) -> None:
        self._issued.pop(node_id, None)
