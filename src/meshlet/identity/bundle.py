"""Trust bundles: the root certificates of SPIFFE trust domains.

A ``TrustBundle`` is one trust domain's roots. It holds several during a root
rotation (old and new overlap until every SVID signed under the old root has
expired). A ``TrustBundleSet`` maps trust domains to bundles: the local one
plus the federated ones. Both are immutable so that a rotation swaps a whole
set atomically, and each bundle builds its ``cryptography`` verification
``Store`` once rather than on every handshake.

Bundles load from PEM (what Istio and Envoy's ``trusted_ca`` carry) and from
the SPIFFE bundle format (a JWK Set whose ``x509-svid`` keys carry the root
in ``x5c``), which is what federation endpoints serve.
"""

from __future__ import annotations

import base64
import binascii
import datetime
import json
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.x509.verification import Store

from meshlet.errors import MeshletError
from meshlet.identity.spiffe import parse_trust_domain

# Bundles come from config and from federation peers; an unbounded PEM or JWKS
# would be an easy way to make every handshake slow.
MAX_ROOTS_PER_BUNDLE = 64
MAX_BUNDLE_BYTES = 1 << 20


class TrustBundleError(MeshletError, ValueError):
    """A trust bundle could not be loaded; the message names the bundle and the problem."""


def _fingerprint(cert: x509.Certificate) -> bytes:
    return cert.fingerprint(hashes.SHA256())


def _check_size(trust_domain: str, document: bytes | str) -> None:
    if len(document) > MAX_BUNDLE_BYTES:
        raise TrustBundleError(f"trust bundle for {trust_domain!r} is larger than {MAX_BUNDLE_BYTES} bytes")


def _check_is_ca(trust_domain: str, cert: x509.Certificate) -> None:
    try:
        constraints = cert.extensions.get_extension_for_class(x509.BasicConstraints).value
    except x509.ExtensionNotFound:
        constraints = None
    if constraints is None or not constraints.ca:
        raise TrustBundleError(
            f"trust bundle for {trust_domain!r}: certificate {cert.subject.rfc4514_string()!r} "
            "is not a CA (basicConstraints cA is not set); a bundle holds root CAs only"
        )


@dataclass(frozen=True, slots=True, eq=False)
class TrustBundle:
    """The root CAs of one trust domain (bare name, e.g. ``cluster.local``)."""

    trust_domain: str
    roots: tuple[x509.Certificate, ...]
    store: Store = field(init=False, repr=False)

    def __post_init__(self) -> None:
        parse_trust_domain(self.trust_domain)
        if not self.roots:
            raise TrustBundleError(f"trust bundle for {self.trust_domain!r} has no root certificates")
        if len(self.roots) > MAX_ROOTS_PER_BUNDLE:
            raise TrustBundleError(
                f"trust bundle for {self.trust_domain!r} has {len(self.roots)} roots"
                f" (at most {MAX_ROOTS_PER_BUNDLE})"
            )
        for root in self.roots:
            _check_is_ca(self.trust_domain, root)
        object.__setattr__(self, "store", Store(list(self.roots)))

    @classmethod
    def of(cls, trust_domain: str, roots: Iterable[x509.Certificate]) -> TrustBundle:
        """A bundle of ``roots`` (duplicates dropped, order kept); ``trust_domain``
        may be bare or ``spiffe://``-prefixed."""
        unique: dict[bytes, x509.Certificate] = {}
        for root in roots:
            unique.setdefault(_fingerprint(root), root)
        return cls(parse_trust_domain(trust_domain), tuple(unique.values()))

    @classmethod
    def from_pem(cls, trust_domain: str, pem: bytes) -> TrustBundle:
        """Every certificate in ``pem`` is a root of ``trust_domain``."""
        _check_size(trust_domain, pem)
        try:
            roots = x509.load_pem_x509_certificates(pem)
        except ValueError as err:
            message = f"trust bundle for {trust_domain!r}: not PEM certificates ({err})"
            raise TrustBundleError(message) from None
        return cls.of(trust_domain, roots)

    @classmethod
    def from_spiffe_json(cls, trust_domain: str, document: bytes | str) -> TrustBundle:
        """The SPIFFE bundle format (SPIFFE Trust Domain and Bundle spec §4): a
        JWK Set; keys with ``"use": "x509-svid"`` carry one root each in
        ``x5c``. JWT authorities (``"use": "jwt-svid"``) are skipped."""
        _check_size(trust_domain, document)
        try:
            parsed = json.loads(document)
        except ValueError as err:
            raise TrustBundleError(f"trust bundle for {trust_domain!r}: not JSON ({err})") from None
        keys = parsed.get("keys") if isinstance(parsed, dict) else None
        if not isinstance(keys, list):
            raise TrustBundleError(f"trust bundle for {trust_domain!r}: no 'keys' array (not a JWK Set)")
        roots = [_root_from_jwk(trust_domain, index, key) for index, key in enumerate(keys)]
        return cls.of(trust_domain, (root for root in roots if root is not None))

    def to_pem(self) -> bytes:
        return b"".join(root.public_bytes(serialization.Encoding.PEM) for root in self.roots)

    def contains(self, cert: x509.Certificate) -> bool:
        return any(root == cert for root in self.roots)

    def with_root(self, root: x509.Certificate) -> TrustBundle:
        """This bundle plus ``root`` (the first step of a root rotation)."""
        return TrustBundle.of(self.trust_domain, (*self.roots, root))

    def without_root(self, root: x509.Certificate) -> TrustBundle:
        """This bundle less ``root`` (the last step of a rotation); refuses to empty the bundle."""
        return TrustBundle.of(self.trust_domain, (r for r in self.roots if r != root))

    def without_expired(self, now: datetime.datetime) -> TrustBundle:
        """The roots still valid at ``now``; refuses to return an empty bundle."""
        return TrustBundle.of(self.trust_domain, (r for r in self.roots if r.not_valid_after_utc > now))

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, TrustBundle):
            return NotImplemented
        return self.trust_domain == other.trust_domain and self.roots == other.roots

    def __hash__(self) -> int:
        return hash((self.trust_domain, self.roots))


def _root_from_jwk(trust_domain: str, index: int, key: object) -> x509.Certificate | None:
    where = f"trust bundle for {trust_domain!r}: keys[{index}]"
    if not isinstance(key, dict):
        raise TrustBundleError(f"{where} is not an object")
    use = key.get("use")
    if use != "x509-svid":
        if use == "jwt-svid":
            return None
        raise TrustBundleError(f"{where}: unsupported 'use' {use!r} (expected 'x509-svid' or 'jwt-svid')")
    x5c = key.get("x5c")
    if not isinstance(x5c, list) or len(x5c) != 1 or not isinstance(x5c[0], str):
        raise TrustBundleError(f"{where}: an x509-svid key carries exactly one certificate in 'x5c'")
    try:
        return x509.load_der_x509_certificate(base64.b64decode(x5c[0], validate=True))
    except (ValueError, binascii.Error) as err:
        raise TrustBundleError(f"{where}: 'x5c' is not a base64 DER certificate ({err})") from None


@dataclass(frozen=True, slots=True)
class TrustBundleSet:
    """Trust bundles keyed by trust domain: the local domain's and federated ones."""

    bundles: Mapping[str, TrustBundle] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for trust_domain, bundle in self.bundles.items():
            if bundle.trust_domain != trust_domain:
                raise TrustBundleError(
                    f"trust bundle of {bundle.trust_domain!r} filed under trust domain {trust_domain!r}"
                )
        # A read-only copy: sets are shared between connections and swapped whole.
        object.__setattr__(self, "bundles", MappingProxyType(dict(self.bundles)))

    @classmethod
    def of(cls, bundles: Iterable[TrustBundle]) -> TrustBundleSet:
        """Refuses two bundles for the same trust domain (merge them with ``TrustBundle.of`` first)."""
        by_domain: dict[str, TrustBundle] = {}
        for bundle in bundles:
            if bundle.trust_domain in by_domain:
                raise TrustBundleError(f"two trust bundles for trust domain {bundle.trust_domain!r}")
            by_domain[bundle.trust_domain] = bundle
        return cls(by_domain)

    def bundle_for(self, trust_domain: str) -> TrustBundle | None:
        return self.bundles.get(trust_domain)

    def roots_for(self, trust_domain: str) -> tuple[x509.Certificate, ...]:
        """The roots of ``trust_domain``; empty when it is not trusted at all."""
        bundle = self.bundles.get(trust_domain)
        return bundle.roots if bundle is not None else ()

    def with_bundle(self, bundle: TrustBundle) -> TrustBundleSet:
        """A new set where ``bundle`` replaces any bundle of its trust domain."""
        return TrustBundleSet({**self.bundles, bundle.trust_domain: bundle})

    def without(self, trust_domain: str) -> TrustBundleSet:
        return TrustBundleSet({td: b for td, b in self.bundles.items() if td != trust_domain})

    @property
    def trust_domains(self) -> tuple[str, ...]:
        return tuple(sorted(self.bundles))

    def __iter__(self) -> Iterator[TrustBundle]:
        return iter(self.bundles.values())

    def __len__(self) -> int:
        return len(self.bundles)

    def __contains__(self, trust_domain: object) -> bool:
        return trust_domain in self.bundles
