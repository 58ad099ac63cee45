"""The live TLS contexts whose certificate and trust bundle an identity agent
keeps current.

TLS transport socket factories (both engines) register here when built. An
agent rotating the SVID of ``spiffe://td/ns/a/sa/b`` updates every live
factory that presents that identity — what Envoy does for the SDS secret all
those contexts name. Existing connections keep the certificate they were set
up with; new handshakes get the new one. The set holds factories weakly, so a
factory dropped by a config update leaves it by itself.
"""

from __future__ import annotations

import weakref
from collections.abc import Sequence
from typing import Protocol, runtime_checkable

from meshlet.identity.bundle import TrustBundleSet
from meshlet.tls.config import KeyHandle


@runtime_checkable
class CertificateTarget(Protocol):
    """A TLS context whose certificate and trusted CAs can be replaced live."""

    @property
    def local_uri_sans(self) -> tuple[str, ...]: ...

    @property
    def certificate_chain(self) -> tuple[bytes, ...]:
        """The chain presented now (DER, leaf first); empty when none."""
        ...

    @property
    def trusted_ca_pem(self) -> bytes | None:
        """The CAs peers are verified against now; None when peers are not verified."""
        ...

    def replace_certificate(
        self, chain: Sequence[bytes], key: KeyHandle, *, private_key_pem: bytes | None = None
    ) -> None:
        """Present ``chain`` (DER, leaf first) signed by ``key`` in new handshakes.
        ``private_key_pem`` is given when the key is in process (engines that
        need the key bytes refuse without it)."""
        ...

    def replace_trusted_ca(self, pem: bytes, *, federated: TrustBundleSet | None = None) -> None:
        """Verify peers of new handshakes against ``pem`` (the local trust
        domain's roots) and the bundles of ``federated`` trust domains. An
        engine that can bind roots to trust domains verifies a SPIFFE peer
        against its own domain's bundle only; others trust every root given."""
        ...


_LIVE: weakref.WeakSet[CertificateTarget] = weakref.WeakSet()


def register(target: CertificateTarget) -> None:
    _LIVE.add(target)


def live_targets() -> list[CertificateTarget]:
    return list(_LIVE)


def presenting(spiffe_id: str) -> list[CertificateTarget]:
    """The live targets whose certificate carries ``spiffe_id``."""
    return [t for t in list(_LIVE) if spiffe_id in t.local_uri_sans]
