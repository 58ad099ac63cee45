"""TLS transport sockets on the stdlib ``ssl`` module (tls engine ``"openssl"``).

One ``OpenSslTransportSocketFactory`` per ``TlsContext`` (downstream: per
filter chain; upstream: per cluster) holds the ``ssl.SSLContext``; every
connection gets an ``SSLObject`` on memory BIOs driven by
``ssl_transport.SslConnection``.

Certificates and keys arrive as PEM bytes and never touch a filesystem: the
stdlib can only load them from a path, so they are written to an anonymous
in-memory file (``memfd_create``) that is closed right after loading.

Envoy's ``match_typed_subject_alt_names`` is checked after the handshake
against the peer certificate parsed with ``cryptography`` (URI SANs included,
which OpenSSL's hostname check does not cover).
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import os
import ssl
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding

from meshlet.config.model import SanMatcher, SanType, TlsCertificate, TlsContext
from meshlet.errors import ConfigError, UnsupportedConfig
from meshlet.identity import targets as identity_targets
from meshlet.identity.bundle import TrustBundleSet
from meshlet.proxy.listeners.ssl_transport import SslConnection
from meshlet.proxy.transport import (
    AppProtocolFactory,
    HandshakeError,
    SecurityInfo,
    TransportSocket,
    TransportSocketFactory,
)
from meshlet.registry import registry
from meshlet.tls.config import KeyHandle

log = logging.getLogger(__name__)

DEFAULT_HANDSHAKE_TIMEOUT = 10.0
# Upstream TLS sessions remembered per peer address, for resumption.
MAX_CACHED_SESSIONS = 256

_VERSIONS = {
    "TLS_AUTO": None,
    "TLSv1_0": ssl.TLSVersion.TLSv1,
    "TLSv1_1": ssl.TLSVersion.TLSv1_1,
    "TLSv1_2": ssl.TLSVersion.TLSv1_2,
    "TLSv1_3": ssl.TLSVersion.TLSv1_3,
}

# Envoy (BoringSSL) curve names -> OpenSSL short names.
_CURVES = {"X25519": "X25519", "P-256": "prime256v1", "P-384": "secp384r1", "P-521": "secp521r1"}


# --------------------------------------------------------------------------- #
# Peer certificate facts
# --------------------------------------------------------------------------- #


@dataclass(frozen=True, slots=True)
class CertificateNames:
    dns: tuple[str, ...] = ()
    uri: tuple[str, ...] = ()
    email: tuple[str, ...] = ()
    ip: tuple[str, ...] = ()
    subject: str = ""

    def of_type(self, san_type: SanType) -> tuple[str, ...]:
        if san_type is SanType.DNS:
            return self.dns
        if san_type is SanType.URI:
            return self.uri
        if san_type is SanType.EMAIL:
            return self.email
        return self.ip


def certificate_names(cert: x509.Certificate) -> CertificateNames:
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return CertificateNames(subject=cert.subject.rfc4514_string())
    return CertificateNames(
        dns=tuple(san.get_values_for_type(x509.DNSName)),
        uri=tuple(san.get_values_for_type(x509.UniformResourceIdentifier)),
        email=tuple(san.get_values_for_type(x509.RFC822Name)),
        ip=tuple(str(ip) for ip in san.get_values_for_type(x509.IPAddress)),
        subject=cert.subject.rfc4514_string(),
    )


def san_matches(names: CertificateNames, matchers: tuple[SanMatcher, ...]) -> bool:
    """Envoy semantics: the certificate passes when any matcher matches any SAN of its type."""
    for m in matchers:
        for value in names.of_type(m.san_type):
            if m.san_type is SanType.IP_ADDRESS:
                value = _normalise_ip(value)
            if m.matcher.match(value):
                return True
    return False


def _normalise_ip(value: str) -> str:
    try:
        return str(ipaddress.ip_address(value))
    except ValueError:
        return value


def _peer_chain(sslobj: ssl.SSLObject) -> tuple[bytes, ...]:
    """DER certificates the peer sent, leaf first.

    Python 3.13 exposes ``get_unverified_chain`` publicly; before that it
    lives on the internal ``_sslobj``. Fall back to the leaf alone.
    """
    inner = getattr(sslobj, "_sslobj", None)
    getter = getattr(sslobj, "get_unverified_chain", None) or getattr(inner, "get_unverified_chain", None)
    if getter is not None:
        chain = getter()
        if chain:
            out: list[bytes] = []
            for cert in chain:
                der = cert if isinstance(cert, bytes) else cert.public_bytes(ssl._ssl.ENCODING_DER)  # type: ignore[attr-defined]
                out.append(der)
            return tuple(out)
    leaf = sslobj.getpeercert(binary_form=True)
    return (leaf,) if leaf else ()


# --------------------------------------------------------------------------- #
# SSLContext construction
# --------------------------------------------------------------------------- #


class _SslObject(ssl.SSLObject):
    """Carries the SNI the server-side ``sni_callback`` saw."""

    requested_sni: str = ""


def _record_sni(sslobj: ssl.SSLObject | ssl.SSLSocket, name: str | None, ctx: ssl.SSLContext) -> None:
    if isinstance(sslobj, _SslObject) and name:
        sslobj.requested_sni = name.lower()


def _load_certificate(ctx: ssl.SSLContext, cert: TlsCertificate, path: str) -> None:
    provider = cert.private_key_provider
    # OpenSSL needs the key in process; with fallback the in-process key serves.
    if provider is not None and not (provider.fallback and cert.private_key_pem):
        raise UnsupportedConfig(
            f"{path}.private_key_provider",
            f"private key provider {provider.provider_name!r} needs the meshlet TLS engine "
            "(run the proxy with --tls-engine meshlet); the 'openssl' engine needs the key in process",
        )
    if not cert.private_key_pem:
        raise ConfigError(f"{path}.private_key", "a certificate chain needs its private key")
    fd = os.memfd_create("meshlet-tls-certificate", os.MFD_CLOEXEC)
    try:
        blob = cert.cert_chain_pem.rstrip(b"\n") + b"\n" + cert.private_key_pem
        view = memoryview(blob)
        while view:
            view = view[os.write(fd, view):]
        ctx.load_cert_chain(f"/proc/self/fd/{fd}")
    except ssl.SSLError as exc:
        detail = exc.reason or str(exc)
        raise ConfigError(path, f"certificate chain or private key could not be loaded: {detail}") from None
    finally:
        os.close(fd)


def _apply_versions(ctx: ssl.SSLContext, tls: TlsContext) -> None:
    for field_name, value in (("tls_minimum_protocol_version", tls.min_version),
                              ("tls_maximum_protocol_version", tls.max_version)):
        if value not in _VERSIONS:
            raise UnsupportedConfig(f"tls_params.{field_name}", f"TLS version {value!r} is not supported")
    low, high = _VERSIONS[tls.min_version], _VERSIONS[tls.max_version]
    if low is not None:
        ctx.minimum_version = low
    if high is not None:
        ctx.maximum_version = high
    if low is not None and high is not None and low > high:
        raise ConfigError(
            "tls_params", f"minimum version {tls.min_version} is above maximum {tls.max_version}"
        )


def _apply_ciphers(ctx: ssl.SSLContext, tls: TlsContext) -> None:
    if not tls.cipher_suites:
        return
    # BoringSSL's equal-preference groups "[A|B]" flatten to "A:B" for OpenSSL.
    names = [n for suite in tls.cipher_suites for n in suite.strip("[]").split("|") if n]
    try:
        ctx.set_ciphers(":".join(names))
    except ssl.SSLError:
        raise ConfigError(
            "tls_params.cipher_suites", f"no usable cipher suite in {list(tls.cipher_suites)}"
        ) from None


def _apply_curves(ctx: ssl.SSLContext, tls: TlsContext) -> None:
    if not tls.ecdh_curves:
        return
    if len(tls.ecdh_curves) > 1:
        raise UnsupportedConfig(
            "tls_params.ecdh_curves", "the 'openssl' tls engine accepts a single curve (stdlib ssl limit)"
        )
    name = tls.ecdh_curves[0]
    try:
        ctx.set_ecdh_curve(_CURVES.get(name, name))
    except ValueError:
        raise UnsupportedConfig("tls_params.ecdh_curves", f"curve {name!r} is not supported") from None


def _apply_validation(ctx: ssl.SSLContext, tls: TlsContext) -> None:
    v = tls.validation
    if v is not None and v.trusted_ca_pem:
        try:
            ctx.load_verify_locations(cadata=v.trusted_ca_pem.decode("ascii"))
        except (ssl.SSLError, UnicodeDecodeError, ValueError) as exc:
            raise ConfigError(
                "validation_context.trusted_ca", f"CA certificates could not be loaded: {exc}"
            ) from None
    has_ca = v is not None and bool(v.trusted_ca_pem)
    untrusted = v is not None and v.accept_untrusted
    if tls.server_side:
        if untrusted:
            raise UnsupportedConfig(
                "validation_context.trust_chain_verification",
                "ACCEPT_UNTRUSTED for client certificates is not supported by the 'openssl' tls engine",
            )
        if tls.require_client_certificate and not has_ca:
            raise ConfigError(
                "require_client_certificate",
                "client certificates are required but no trusted_ca is configured",
            )
        if tls.require_client_certificate:
            ctx.verify_mode = ssl.CERT_REQUIRED
        else:
            # With a CA, a client certificate is asked for and verified if sent.
            ctx.verify_mode = ssl.CERT_OPTIONAL if has_ca else ssl.CERT_NONE
    else:
        ctx.check_hostname = False  # Envoy checks SANs by configured matchers, not by SNI
        ctx.verify_mode = ssl.CERT_REQUIRED if has_ca and not untrusted else ssl.CERT_NONE


def build_ssl_context(tls: TlsContext) -> ssl.SSLContext:
    """An ``ssl.SSLContext`` for ``tls``; raises ``ConfigError`` naming the field at fault."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER if tls.server_side else ssl.PROTOCOL_TLS_CLIENT)
    ctx.sslobject_class = _SslObject
    ctx.options |= ssl.OP_NO_RENEGOTIATION | ssl.OP_NO_COMPRESSION
    if tls.server_side:
        ctx.options |= ssl.OP_CIPHER_SERVER_PREFERENCE
        ctx.sni_callback = _record_sni
        if not tls.certificates:
            raise ConfigError(
                "common_tls_context.tls_certificates", "a downstream TLS context needs a certificate"
            )
    _apply_versions(ctx, tls)
    _apply_ciphers(ctx, tls)
    _apply_curves(ctx, tls)
    for i, cert in enumerate(tls.certificates):
        _load_certificate(ctx, cert, f"common_tls_context.tls_certificates[{i}]")
    _apply_validation(ctx, tls)
    if tls.alpn_protocols:
        ctx.set_alpn_protocols(list(tls.alpn_protocols))
    return ctx


# --------------------------------------------------------------------------- #
# The factory and its sockets
# --------------------------------------------------------------------------- #


class OpenSslTransportSocketFactory(TransportSocketFactory):
    name = "envoy.transport_sockets.tls"

    def __init__(
        self, tls: TlsContext, *, handshake_timeout: float | None = DEFAULT_HANDSHAKE_TIMEOUT
    ) -> None:
        self.tls = tls
        self.context = build_ssl_context(tls)
        self.handshake_timeout = handshake_timeout
        self.local_uri_sans = _local_uri_sans(tls)
        # Client side: the last resumable session per (peer, SNI); insertion
        # order doubles as the eviction order.
        self._sessions: dict[tuple[object, str | None], ssl.SSLSession] = {}
        identity_targets.register(self)

    # -- live certificate rotation (meshlet.identity.targets) -------------- #

    @property
    def certificate_chain(self) -> tuple[bytes, ...]:
        if not self.tls.certificates:
            return ()
        pem = self.tls.certificates[0].cert_chain_pem
        return tuple(c.public_bytes(Encoding.DER) for c in x509.load_pem_x509_certificates(pem))

    @property
    def trusted_ca_pem(self) -> bytes | None:
        return self.tls.validation.trusted_ca_pem if self.tls.validation is not None else None

    def replace_certificate(
        self, chain: Sequence[bytes], key: KeyHandle, *, private_key_pem: bytes | None = None
    ) -> None:
        """New handshakes use a fresh ``SSLContext`` with ``chain``; connections
        already set up keep the context they were made from."""
        if private_key_pem is None:
            raise UnsupportedConfig(
                "tls_certificates", "the 'openssl' tls engine needs the private key in process to rotate a "
                "certificate; use the meshlet TLS engine for keys held by a key provider",
            )
        chain_pem = b"".join(
            x509.load_der_x509_certificate(der).public_bytes(Encoding.PEM) for der in chain
        )
        certificate = TlsCertificate(chain_pem, private_key_pem, source="meshlet identity rotation")
        self._rebuild(replace(self.tls, certificates=(certificate,)))

    def replace_trusted_ca(self, pem: bytes, *, federated: TrustBundleSet | None = None) -> None:
        """OpenSSL cannot bind a root to a trust domain: federated roots are
        trusted like local ones (SAN matchers restrict which peers pass)."""
        if self.tls.validation is None:
            raise ValueError("this TLS context does not verify peers; there is no trusted CA to replace")
        roots = pem + b"".join(bundle.to_pem() for bundle in federated or ())
        self._rebuild(replace(self.tls, validation=replace(self.tls.validation, trusted_ca_pem=roots)))

    def _rebuild(self, tls: TlsContext) -> None:
        self.context = build_ssl_context(tls)
        self.tls = tls
        self.local_uri_sans = _local_uri_sans(tls)

    def session_for(self, key: tuple[object, str | None]) -> ssl.SSLSession | None:
        return self._sessions.get(key)

    def remember_session(self, key: tuple[object, str | None], sslobj: ssl.SSLObject) -> None:
        session = sslobj.session
        if session is None or not session.has_ticket:
            return
        self._sessions.pop(key, None)
        self._sessions[key] = session
        if len(self._sessions) > MAX_CACHED_SESSIONS:
            del self._sessions[next(iter(self._sessions))]

    @property
    def is_tls(self) -> bool:
        return True

    def create(self, *, server_hostname: str | None = None) -> TransportSocket:
        return OpenSslTransportSocket(self, server_hostname or self.tls.sni)


def _local_uri_sans(tls: TlsContext) -> tuple[str, ...]:
    if not tls.certificates:
        return ()
    try:
        cert = x509.load_pem_x509_certificate(tls.certificates[0].cert_chain_pem)
    except ValueError:
        return ()
    return certificate_names(cert).uri


class OpenSslTransportSocket(TransportSocket):
    __slots__ = ("_conn", "_factory", "_server_hostname")

    def __init__(self, factory: OpenSslTransportSocketFactory, server_hostname: str | None) -> None:
        self._factory = factory
        self._server_hostname = server_hostname
        self._conn: SslConnection | None = None

    def start(
        self,
        raw: asyncio.Transport,
        app_factory: AppProtocolFactory,
        *,
        initial_data: bytes = b"",
        on_failure: Callable[[HandshakeError], None] | None = None,
    ) -> None:
        factory = self._factory
        tls = factory.tls
        incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
        session_key = (raw.get_extra_info("peername"), self._server_hostname)
        sslobj = factory.context.wrap_bio(
            incoming, outgoing, server_side=tls.server_side,
            server_hostname=None if tls.server_side else self._server_hostname,
            session=None if tls.server_side else factory.session_for(session_key),
        )
        on_closed = None
        if not tls.server_side:
            def on_closed(obj: ssl.SSLObject) -> None:
                factory.remember_session(session_key, obj)

        self._conn = SslConnection(
            sslobj, incoming, outgoing,
            app_factory=app_factory,
            verify=self._verify,
            on_failure=on_failure,
            handshake_timeout=factory.handshake_timeout,
            on_closed=on_closed,
        )
        self._conn.start(raw, initial_data)

    @property
    def security(self) -> SecurityInfo:
        if self._conn is None or self._conn.security is None:
            return SecurityInfo(tls=False, reason="TLS handshake not complete")
        return self._conn.security

    def _verify(self, sslobj: ssl.SSLObject) -> SecurityInfo:
        tls = self._factory.tls
        chain = _peer_chain(sslobj)
        names = CertificateNames()
        if chain:
            try:
                names = certificate_names(x509.load_der_x509_certificate(chain[0]))
            except ValueError as exc:
                raise HandshakeError(
                    f"peer certificate could not be parsed: {exc}", stat="fail_verify_error"
                ) from None
        matchers = tls.validation.san_matchers if tls.validation is not None else ()
        if matchers and (chain or not tls.server_side) and not san_matches(names, matchers):
            raise HandshakeError(
                f"peer certificate SANs {list(names.dns + names.uri + names.ip + names.email)} "
                "match none of match_typed_subject_alt_names",
                alert="bad_certificate", stat="fail_verify_san",
            )
        sni = sslobj.requested_sni if isinstance(sslobj, _SslObject) else ""
        cipher = sslobj.cipher()
        return SecurityInfo(
            tls=True,
            version=sslobj.version() or "",
            cipher=cipher[0] if cipher else "",
            alpn=sslobj.selected_alpn_protocol() or "",
            sni=sni if tls.server_side else (self._server_hostname or ""),
            peer_certificates=chain,
            peer_uri_sans=names.uri,
            peer_dns_sans=names.dns,
            peer_subject=names.subject,
            local_uri_sans=self._factory.local_uri_sans,
            resumed=sslobj.session_reused,
        )


def _openssl_engine(context: TlsContext) -> TransportSocketFactory:
    return OpenSslTransportSocketFactory(context)


registry.register("tls_engine", "openssl", _openssl_engine)
