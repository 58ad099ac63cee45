"""asyncio adapter: meshlet's TLS 1.3 engine as a proxy transport socket.

``MeshletTlsSocketFactory`` (registered as ``tls_engine`` "meshlet") builds a
``TlsConfig`` once from a compiled ``TlsContext``; each connection gets a
``TlsConnection`` driven by ``_TlsProtocol``, which sits on the raw transport,
and the application protocol sees a ``_TlsAppTransport`` carrying plaintext.

- Signing is awaited here: ``SignatureRequired`` -> ``key.sign`` -> the
  engine resumes. Reading from the socket is paused meanwhile, so a paused
  handshake holds at most one socket read of buffered input.
- Backpressure: the raw transport's pause/resume_writing reaches the app;
  the app's pause/resume_reading reaches the raw transport.
- Every handshake is bounded by ``handshake_timeout`` (signing included).
"""

from __future__ import annotations

import asyncio
import logging
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import replace
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding

from meshlet.config.model import TlsCertificate, TlsContext
from meshlet.errors import ConfigError, UnsupportedConfig
from meshlet.identity import targets as identity_targets
from meshlet.identity.bundle import TrustBundleSet
from meshlet.keys.base import ProviderUnavailable
from meshlet.proxy.transport import (
    AppProtocolFactory,
    HandshakeError,
    SecurityInfo,
    TransportSocket,
    TransportSocketFactory,
)
from meshlet.registry import registry
from meshlet.tls.alerts import AlertDescription
from meshlet.tls.config import KeyHandle, PeerVerifier, TlsConfig
from meshlet.tls.connection import TlsConnection
from meshlet.tls.crypto import GROUPS_BY_NAME, SUITES_BY_NAME
from meshlet.tls.events import (
    AlertReceived,
    ApplicationData,
    ConnectionFailed,
    Event,
    HandshakeComplete,
    SessionTicketReceived,
    SignatureRequired,
)
from meshlet.tls.keys_local import LocalKey
from meshlet.tls.tickets import ClientSession, TicketKeys
from meshlet.tls.verify import PeerPolicy, PeerRole, VerifiedPeer

log = logging.getLogger("meshlet.tls")

DEFAULT_HANDSHAKE_TIMEOUT = 10.0
_MAX_CACHED_SESSIONS = 1024
_CERTIFICATE_ALERTS = frozenset(
    {
        AlertDescription.bad_certificate,
        AlertDescription.unsupported_certificate,
        AlertDescription.certificate_revoked,
        AlertDescription.certificate_expired,
        AlertDescription.certificate_unknown,
        AlertDescription.unknown_ca,
    }
)


# --------------------------------------------------------------------------- #
# TlsContext -> TlsConfig
# --------------------------------------------------------------------------- #


def config_from_context(context: TlsContext) -> TlsConfig:
    """Compile an Envoy TLS context for this engine; refuses what it cannot do."""
    if context.max_version not in ("", "TLS_AUTO", "TLSv1_3"):
        raise UnsupportedConfig(
            "common_tls_context.tls_params.tls_maximum_protocol_version",
            f"the meshlet TLS engine speaks only TLS 1.3 (got maximum {context.max_version})",
        )
    if len(context.certificates) > 1:
        raise UnsupportedConfig(
            "common_tls_context.tls_certificates", "the meshlet TLS engine takes one certificate per context"
        )
    chain: tuple[bytes, ...] = ()
    key: KeyHandle | None = None
    if context.certificates:
        cert = context.certificates[0]
        chain = tuple(
            c.public_bytes(Encoding.DER) for c in x509.load_pem_x509_certificates(cert.cert_chain_pem)
        )
        key = _key_handle(cert)
    elif context.server_side:
        raise ConfigError("common_tls_context.tls_certificates", "a server TLS context needs a certificate")
    validation = context.validation
    return TlsConfig(
        certificate_chain=chain,
        key=key,
        verifier=_verifier(context),
        request_client_certificate=context.server_side and validation is not None,
        require_client_certificate=context.server_side and context.require_client_certificate,
        alpn_protocols=context.alpn_protocols,
        cipher_suites=_suites(context.cipher_suites),
        groups=_groups(context.ecdh_curves),
        ticket_keys=TicketKeys() if context.server_side else None,
    )


_CERT_PATH = "common_tls_context.tls_certificates[0]"


def _key_handle(cert: TlsCertificate) -> KeyHandle:
    """The certificate's signer: its key provider (``key_provider`` registry
    entries are called as ``factory(PrivateKeyProviderConfig) -> KeyHandle``),
    or the in-process key, which also serves as the provider's fallback."""
    provider = cert.private_key_provider
    if provider is not None:
        path = f"{_CERT_PATH}.private_key_provider"
        try:
            ext = registry.lookup("key_provider", name=provider.provider_name, path=path)
        except UnsupportedConfig:
            if not (provider.fallback and cert.private_key_pem):
                raise
        else:
            try:
                handle = ext.factory(provider)
            except ProviderUnavailable as exc:
                # fallback: the provider's backend (a key server, a token) is
                # down at build time; serve with the in-process key meanwhile.
                if not (provider.fallback and cert.private_key_pem):
                    raise
                log.warning("%s; falling back to the certificate's private_key", exc)
                return _local_key(cert)
            if not isinstance(handle, KeyHandle):
                raise ConfigError(path, f"key provider {provider.provider_name!r} did not build a key handle")
            return handle
    return _local_key(cert)


def _local_key(cert: TlsCertificate) -> KeyHandle:
    if cert.private_key_pem is None:
        raise ConfigError(_CERT_PATH, "no private key or key provider")
    try:
        return LocalKey.from_pem(cert.private_key_pem)
    except ValueError as exc:
        raise ConfigError(f"{_CERT_PATH}.private_key", str(exc)) from None


def _verifier(context: TlsContext, bundles: TrustBundleSet | None = None) -> PeerVerifier | None:
    validation = context.validation
    if validation is None or validation.accept_untrusted:
        return None
    role = PeerRole.CLIENT if context.server_side else PeerRole.SERVER
    return PeerPolicy.from_validation(validation, role=role, bundles=bundles).verify


def _suites(names: tuple[str, ...]) -> tuple[int, ...]:
    # Envoy's cipher_suites govern TLS 1.2 and below; TLS 1.3 names are honoured
    # when present, TLS 1.2 names do not apply to this engine.
    chosen = tuple(SUITES_BY_NAME[n].code for n in names if n in SUITES_BY_NAME)
    return chosen or tuple(s.code for s in SUITES_BY_NAME.values())


def _groups(names: tuple[str, ...]) -> tuple[int, ...]:
    if not names:
        return tuple(GROUPS_BY_NAME.values())
    unknown = [n for n in names if n not in GROUPS_BY_NAME]
    if unknown:
        raise UnsupportedConfig(
            "common_tls_context.tls_params.ecdh_curves",
            f"curves {unknown} are not supported by the meshlet TLS engine (X25519, P-256, P-384)",
        )
    return tuple(GROUPS_BY_NAME[n] for n in names)


# --------------------------------------------------------------------------- #
# Factory and socket
# --------------------------------------------------------------------------- #


class MeshletTlsSocketFactory(TransportSocketFactory):
    name = "envoy.transport_sockets.tls"

    def __init__(
        self,
        config: TlsConfig,
        *,
        server_side: bool,
        sni: str | None = None,
        handshake_timeout: float = DEFAULT_HANDSHAKE_TIMEOUT,
        context: TlsContext | None = None,
    ) -> None:
        self.config = config
        self.server_side = server_side
        self.sni = sni
        self.handshake_timeout = handshake_timeout
        self.local_uri_sans = _uri_sans(config.certificate_chain[0]) if config.certificate_chain else ()
        self._sessions: OrderedDict[str, ClientSession] = OrderedDict()
        # Kept to rebuild the peer verifier when the trusted CAs are replaced.
        self._context = context
        identity_targets.register(self)

    @classmethod
    def from_context(cls, context: TlsContext) -> MeshletTlsSocketFactory:
        return cls(config_from_context(context), server_side=context.server_side, sni=context.sni,
                   context=context)

    # -- live certificate rotation (meshlet.identity.targets) -------------- #

    @property
    def certificate_chain(self) -> tuple[bytes, ...]:
        return self.config.certificate_chain

    @property
    def trusted_ca_pem(self) -> bytes | None:
        validation = self._context.validation if self._context is not None else None
        return validation.trusted_ca_pem if validation is not None else None

    def replace_certificate(
        self, chain: Sequence[bytes], key: KeyHandle, *, private_key_pem: bytes | None = None
    ) -> None:
        """New handshakes present ``chain`` signed by ``key``; connections
        already set up keep the config they started with."""
        self.config = replace(self.config, certificate_chain=tuple(chain), key=key)
        self.local_uri_sans = _uri_sans(chain[0]) if chain else ()

    def replace_trusted_ca(self, pem: bytes, *, federated: TrustBundleSet | None = None) -> None:
        """New handshakes verify peers against ``pem`` (same SAN matchers);
        a SPIFFE peer of a ``federated`` trust domain against that domain's
        bundle only."""
        context = self._context
        if context is None or context.validation is None:
            raise ValueError("this TLS context does not verify peers; there is no trusted CA to replace")
        context = replace(context, validation=replace(context.validation, trusted_ca_pem=pem))
        self.config = replace(self.config, verifier=_verifier(context, federated))
        self._context = context

    @property
    def is_tls(self) -> bool:
        return True

    def create(self, *, server_hostname: str | None = None) -> TransportSocket:
        return MeshletTlsSocket(self, server_hostname or self.sni)

    def take_session(self, server_name: str) -> ClientSession | None:
        """A cached ticket for ``server_name`` (each ticket is used once)."""
        return self._sessions.pop(server_name, None)

    def store_session(self, server_name: str, session: ClientSession) -> None:
        self._sessions[server_name] = session
        self._sessions.move_to_end(server_name)
        while len(self._sessions) > _MAX_CACHED_SESSIONS:
            self._sessions.popitem(last=False)


class MeshletTlsSocket(TransportSocket):
    __slots__ = ("_factory", "_protocol", "_server_hostname")

    def __init__(self, factory: MeshletTlsSocketFactory, server_hostname: str | None) -> None:
        self._factory = factory
        self._server_hostname = server_hostname
        self._protocol: _TlsProtocol | None = None

    def start(
        self,
        raw: asyncio.Transport,
        app_factory: AppProtocolFactory,
        *,
        initial_data: bytes = b"",
        on_failure: Callable[[HandshakeError], None] | None = None,
    ) -> None:
        factory = self._factory
        name = self._server_hostname or ""
        if factory.server_side:
            conn = TlsConnection(factory.config, client=False)
        else:
            session = factory.take_session(name) if name else None
            conn = TlsConnection(factory.config, client=True, server_name=name or None, session=session)
        self._protocol = _TlsProtocol(factory, conn, raw, app_factory, on_failure, name)
        self._protocol.start(initial_data)

    @property
    def security(self) -> SecurityInfo:
        if self._protocol is None or self._protocol.security is None:
            return SecurityInfo(tls=False, reason="TLS handshake not complete")
        return self._protocol.security


def _uri_sans(der: bytes) -> tuple[str, ...]:
    try:
        cert = x509.load_der_x509_certificate(der)
        sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except (ValueError, x509.ExtensionNotFound):
        return ()
    return tuple(sans.get_values_for_type(x509.UniformResourceIdentifier))


def _security_info(event: HandshakeComplete, factory: MeshletTlsSocketFactory, sni: str) -> SecurityInfo:
    uri: tuple[str, ...] = ()
    dns: tuple[str, ...] = ()
    subject = ""
    peer = event.peer
    if isinstance(peer, VerifiedPeer):
        uri, dns, subject = peer.uri_sans, peer.dns_sans, peer.subject
    elif event.peer_chain:
        try:
            leaf = x509.load_der_x509_certificate(event.peer_chain[0])
            subject = leaf.subject.rfc4514_string()
            sans = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
            uri = tuple(sans.get_values_for_type(x509.UniformResourceIdentifier))
            dns = tuple(sans.get_values_for_type(x509.DNSName))
        except (ValueError, x509.ExtensionNotFound):
            pass
    return SecurityInfo(
        tls=True,
        version="TLSv1.3",
        cipher=event.cipher_suite,
        alpn=event.alpn,
        sni=event.server_name if factory.server_side else sni,
        peer_certificates=event.peer_chain,
        peer_uri_sans=uri,
        peer_dns_sans=dns,
        peer_subject=subject,
        local_uri_sans=factory.local_uri_sans,
        resumed=event.resumed,
    )


def _handshake_error(failure: ConnectionFailed) -> HandshakeError:
    stat = ""
    if failure.local and failure.description in _CERTIFICATE_ALERTS:
        stat = "fail_verify_error"
    elif failure.local and failure.description == AlertDescription.certificate_required:
        stat = "fail_verify_no_cert"
    where = "sent" if failure.local else "received"
    return HandshakeError(
        f"TLS handshake failed ({where} {failure.description.name}): {failure.message}",
        alert=failure.description.name,
        local=failure.local,
        stat=stat,
    )


class _TlsProtocol(asyncio.Protocol):
    """Drives one ``TlsConnection`` from the raw transport's callbacks."""

    def __init__(
        self,
        factory: MeshletTlsSocketFactory,
        conn: TlsConnection,
        raw: asyncio.Transport,
        app_factory: AppProtocolFactory,
        on_failure: Callable[[HandshakeError], None] | None,
        sni: str,
    ) -> None:
        self._factory = factory
        self._conn = conn
        self._raw = raw
        self._app_factory = app_factory
        self._on_failure = on_failure
        self._sni = sni
        self._app: asyncio.BaseProtocol | None = None
        self._app_transport: _TlsAppTransport | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._signing: asyncio.Task[None] | None = None
        self._error: Exception | None = None
        self._app_paused_writing = False
        self._raw_paused_writing = False
        self.security: SecurityInfo | None = None

    # -- lifecycle ---------------------------------------------------------- #

    def start(self, initial_data: bytes) -> None:
        loop = asyncio.get_running_loop()
        self._timer = loop.call_later(self._factory.handshake_timeout, self._handshake_timed_out)
        self._raw.set_protocol(self)
        self._flush()
        if initial_data:
            self.data_received(initial_data)

    def _handshake_timed_out(self) -> None:
        self._timer = None
        if self._app is None:
            self._fail(HandshakeError("TLS handshake timed out"))

    def _fail(self, error: HandshakeError) -> None:
        if self._error is not None:
            return
        self._error = error
        self._cancel_pending()
        self._flush()
        self._raw.close()
        if self._on_failure is not None:
            self._on_failure(error)

    def _cancel_pending(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._signing is not None:
            self._signing.cancel()
            self._signing = None

    # -- raw transport callbacks ------------------------------------------- #

    def data_received(self, data: bytes) -> None:
        self._handle(self._conn.receive_data(data))

    def eof_received(self) -> bool | None:
        if self._app is None:
            self._fail(HandshakeError("connection closed during the TLS handshake", local=False))
            return None
        if isinstance(self._app, asyncio.Protocol) and not self._conn.peer_closed:
            # A TCP FIN without close_notify: a truncation the app must know of.
            return self._app.eof_received()
        return None

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_pending()
        if self._app is not None:
            self._app.connection_lost(
                exc or (self._error if not isinstance(self._error, HandshakeError) else None)
            )
        elif self._error is None:
            self._error = HandshakeError("connection lost during the TLS handshake", local=False)
            if self._on_failure is not None:
                self._on_failure(self._error)

    def pause_writing(self) -> None:
        self._raw_paused_writing = True
        if self._app is not None and not self._app_paused_writing:
            self._app_paused_writing = True
            self._app.pause_writing()

    def resume_writing(self) -> None:
        self._raw_paused_writing = False
        if self._app is not None and self._app_paused_writing:
            self._app_paused_writing = False
            self._app.resume_writing()

    # -- engine events ------------------------------------------------------ #

    def _flush(self) -> None:
        data = self._conn.take_outgoing()
        if data and not self._raw.is_closing():
            self._raw.write(data)

    def _handle(self, events: list[Event]) -> None:
        # Records queue in order in the engine, so flushing after the events
        # (not before) sends a flight that was paused for an in-process
        # signature in one write.
        try:
            for event in events:
                if isinstance(event, ApplicationData):
                    self._deliver(event.data)
                elif isinstance(event, SignatureRequired):
                    self._start_signing(event)
                elif isinstance(event, HandshakeComplete):
                    self._established(event)
                elif isinstance(event, SessionTicketReceived):
                    if self._sni:
                        self._factory.store_session(self._sni, event.session)
                elif isinstance(event, ConnectionFailed):
                    self._connection_failed(event)
                elif isinstance(event, AlertReceived) and event.description == AlertDescription.close_notify:
                    self._peer_closed()
        finally:
            self._flush()

    def _deliver(self, data: bytes) -> None:
        app = self._app
        if isinstance(app, asyncio.BufferedProtocol):
            view = memoryview(data)
            while view:
                buf = memoryview(app.get_buffer(len(view)))
                n = min(len(buf), len(view))
                buf[:n] = view[:n]
                app.buffer_updated(n)
                view = view[n:]
        elif isinstance(app, asyncio.Protocol):
            app.data_received(data)

    def _start_signing(self, event: SignatureRequired) -> None:
        # The connection's own config, not the factory's: a certificate rotated
        # mid-handshake must not pair the old chain with the new key.
        key = self._conn.config.key
        if key is None:
            self._handle(self._conn.fail_signature("no key handle configured"))
            return
        if isinstance(key, LocalKey):
            # The key is in this process and signing cannot block on anything
            # but the CPU: answer at once rather than via a task and a loop turn.
            self._sign_inline(key, event)
            return
        self._raw.pause_reading()
        self._signing = asyncio.get_running_loop().create_task(self._sign(key, event))

    def _sign_inline(self, key: LocalKey, event: SignatureRequired) -> None:
        try:
            signature = key.sign_now(event.scheme, event.data)
        except Exception as exc:
            self._handle(self._conn.fail_signature(f"{type(exc).__name__}: {exc}"))
            return
        self._handle(self._conn.provide_signature(signature))

    async def _sign(self, key: KeyHandle, event: SignatureRequired) -> None:
        try:
            signature = await key.sign(event.scheme, event.data)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            self._signing = None
            self._handle(self._conn.fail_signature(f"{type(exc).__name__}: {exc}"))
            return
        self._signing = None
        if self._error is not None:
            return
        events = self._conn.provide_signature(signature)
        if not self._raw.is_closing():
            self._raw.resume_reading()
        self._handle(events)

    def _established(self, event: HandshakeComplete) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self.security = _security_info(event, self._factory, self._sni)
        app = self._app_factory(self.security)
        self._app = app
        self._app_transport = _TlsAppTransport(self._raw, self._conn, self, app)
        app.connection_made(self._app_transport)
        if self._raw_paused_writing:
            self.pause_writing()

    def _connection_failed(self, failure: ConnectionFailed) -> None:
        if self._app is None:
            self._fail(_handshake_error(failure))
            return
        self._error = ConnectionError(f"TLS connection failed: {failure.description.name}: {failure.message}")
        self._raw.close()

    def _peer_closed(self) -> None:
        app = self._app
        keep_open = isinstance(app, asyncio.Protocol) and bool(app.eof_received())
        if not keep_open:
            self.close()

    def close(self) -> None:
        self._conn.close()
        self._flush()
        self._raw.close()

    def flush(self) -> None:
        self._flush()


class _TlsAppTransport(asyncio.Transport):
    """What the application protocol writes plaintext to."""

    def __init__(
        self, raw: asyncio.Transport, conn: TlsConnection, owner: _TlsProtocol, app: asyncio.BaseProtocol
    ) -> None:
        super().__init__()
        self._raw = raw
        self._conn = conn
        self._owner = owner
        self._app = app
        self._closing = False

    def write(self, data: bytes | bytearray | memoryview) -> None:
        if self._closing or self._conn.write_closed or not data:
            return
        self._conn.send_application_data(bytes(data))
        self._owner.flush()

    def writelines(self, list_of_data: Any) -> None:
        self.write(b"".join(list_of_data))

    def write_eof(self) -> None:
        self._conn.close()
        self._owner.flush()

    def can_write_eof(self) -> bool:
        return True

    def close(self) -> None:
        if self._closing:
            return
        self._closing = True
        self._owner.close()

    def abort(self) -> None:
        self._closing = True
        self._raw.abort()

    def is_closing(self) -> bool:
        return self._closing or self._raw.is_closing()

    def pause_reading(self) -> None:
        self._raw.pause_reading()

    def resume_reading(self) -> None:
        self._raw.resume_reading()

    def is_reading(self) -> bool:
        return self._raw.is_reading()

    def get_write_buffer_size(self) -> int:
        return self._raw.get_write_buffer_size()

    def get_write_buffer_limits(self) -> tuple[int, int]:
        return self._raw.get_write_buffer_limits()

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        self._raw.set_write_buffer_limits(high, low)

    def set_protocol(self, protocol: asyncio.BaseProtocol) -> None:
        self._app = protocol
        self._owner._app = protocol

    def get_protocol(self) -> asyncio.BaseProtocol:
        return self._app

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        if name == "security":
            return self._owner.security
        if name == "cipher":
            return self._conn.cipher_suite
        if name == "alpn_protocol":
            return self._conn.alpn or None
        if name == "peercert_chain":
            return self._conn.peer_chain
        if name == "tls_connection":
            return self._conn
        return self._raw.get_extra_info(name, default)


def _meshlet_engine(context: TlsContext) -> TransportSocketFactory:
    return MeshletTlsSocketFactory.from_context(context)


registry.register("tls_engine", "meshlet", _meshlet_engine)
