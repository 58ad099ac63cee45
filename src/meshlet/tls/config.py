"""``TlsConfig``: everything one side of the engine needs, shared by many
connections. Randomness and the clock are injected (tests replay RFC 8448)."""

from __future__ import annotations

import functools
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Protocol, runtime_checkable

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric.types import CertificatePublicKeyTypes

from meshlet.tls.codec import Certificate, CertificateEntry
from meshlet.tls.crypto import (
    CERTIFICATE_SCHEMES,
    CIPHER_SUITES,
    HANDSHAKE_SCHEMES,
    TLS_AES_128_GCM_SHA256,
    TLS_AES_256_GCM_SHA384,
    TLS_CHACHA20_POLY1305_SHA256,
    Group,
    schemes_for_key,
)
from meshlet.tls.record import MAX_PLAINTEXT
from meshlet.tls.tickets import TicketKeys


@runtime_checkable
class KeyHandle(Protocol):
    """A private key the engine never holds: it only asks for signatures.

    ``sign`` is awaited by the asyncio adapter, so a provider may offload,
    batch or forward the operation to an isolated key server."""

    @property
    def public_key(self) -> CertificatePublicKeyTypes: ...

    @property
    def schemes(self) -> Sequence[int]: ...

    async def sign(self, scheme: int, data: bytes) -> bytes: ...


PeerVerifier = Callable[[Sequence[bytes], datetime], object]
"""Checks the peer's chain (DER, leaf first) at ``now``; returns what it
learned (e.g. ``VerifiedPeer``) or raises an error carrying a TLS alert."""


DEFAULT_SUITES = (TLS_AES_128_GCM_SHA256.code, TLS_AES_256_GCM_SHA384.code, TLS_CHACHA20_POLY1305_SHA256.code)
DEFAULT_GROUPS = (Group.x25519, Group.secp256r1, Group.secp384r1)


@dataclass(frozen=True)
class TlsConfig:
    # Our certificate chain (DER, leaf first) and the handle that signs for it.
    certificate_chain: tuple[bytes, ...] = ()
    key: KeyHandle | None = None
    # None: the peer's chain is not verified (Envoy's behaviour without a
    # validation context); the CertificateVerify signature always is.
    verifier: PeerVerifier | None = None
    # Server: ask for a client certificate; and refuse the handshake without one.
    request_client_certificate: bool = False
    require_client_certificate: bool = False
    alpn_protocols: tuple[str, ...] = ()
    cipher_suites: tuple[int, ...] = DEFAULT_SUITES
    groups: tuple[int, ...] = DEFAULT_GROUPS
    # Client: groups we send a key share for up front (others cost an HRR);
    # None: the first of ``groups``.
    key_share_groups: tuple[int, ...] | None = None
    signature_schemes: tuple[int, ...] = tuple(HANDSHAKE_SCHEMES)
    certificate_schemes: tuple[int, ...] = tuple(CERTIFICATE_SCHEMES)
    # Server: issue tickets sealed with these keys (None: no resumption).
    ticket_keys: TicketKeys | None = None
    tickets_per_handshake: int = 1
    # Advertise a record_size_limit (RFC 8449); None: don't send the extension.
    record_size_limit: int | None = None
    # Pad every protected record's inner plaintext to a multiple of this (0: none).
    padding_block: int = 0
    max_handshake_message_size: int = 1 << 17
    clock: Callable[[], float] = time.time
    random: Callable[[int], bytes] = os.urandom
    # Send a change_cipher_spec for middlebox compatibility (RFC 8446 D.4).
    middlebox_compat: bool = True

    def __post_init__(self) -> None:
        for code in self.cipher_suites:
            if code not in CIPHER_SUITES:
                raise ValueError(f"cipher suite {code:#06x} is not supported (TLS 1.3 suites only)")
        for group in self.groups:
            if group not in Group._value2member_map_:
                raise ValueError(f"group {group:#06x} is not supported")
        if not set(self.initial_share_groups) <= set(self.groups):
            raise ValueError("key_share_groups must be a subset of groups")
        if self.record_size_limit is not None and not 64 <= self.record_size_limit <= MAX_PLAINTEXT + 1:
            raise ValueError("record_size_limit must be in [64, 16385]")
        if self.certificate_chain and self.key is None:
            raise ValueError("a certificate chain needs a key handle")
        if self.key is not None and not self.certificate_chain:
            raise ValueError("a key handle needs a certificate chain")
        if self.certificate_chain:
            leaf = x509.load_der_x509_certificate(self.certificate_chain[0])
            usable = set(schemes_for_key(leaf.public_key()))
            if not usable & set(self.signing_schemes):
                raise ValueError("the key handle cannot sign with any scheme this certificate supports")

    @property
    def initial_share_groups(self) -> tuple[int, ...]:
        return self.key_share_groups if self.key_share_groups is not None else self.groups[:1]

    @functools.cached_property
    def signing_schemes(self) -> tuple[int, ...]:
        if self.key is None:
            return ()
        return tuple(s for s in self.key.schemes if s in self.signature_schemes)

    @functools.cached_property
    def certificate_message(self) -> bytes:
        """Our Certificate message (empty context, no per-entry extensions):
        the same bytes for every handshake, so they are built once."""
        entries = tuple(CertificateEntry(der) for der in self.certificate_chain)
        return Certificate(b"", entries).serialize()
