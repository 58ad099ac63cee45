"""The client handshake (RFC 8446 section 2, client side)."""

from __future__ import annotations

import ipaddress
from typing import ClassVar

from meshlet.tls.alerts import (
    AlertDescription,
    TlsAlertError,
    decode_error,
    illegal_parameter,
    unexpected_message,
)
from meshlet.tls.codec import (
    DOWNGRADE_TLS11,
    DOWNGRADE_TLS12,
    PSK_DHE_KE,
    TLS13,
    Certificate,
    CertificateRequest,
    ClientHello,
    EncryptedExtensions,
    Extension,
    ExtensionType,
    HandshakeType,
    KeyShareEntry,
    Message,
    NewSessionTicket,
    PskIdentity,
    ServerHello,
    decode_alpn,
    decode_cookie,
    decode_key_share_hrr,
    decode_key_share_server,
    decode_selected_psk,
    decode_supported_version_server,
    decode_u16_list,
    encode_alpn,
    encode_key_share_client,
    encode_offered_psks,
    encode_server_name,
    encode_supported_versions_client,
    encode_u16_list,
    find_extension,
    vec8,
    vec16,
)
from meshlet.tls.config import TlsConfig
from meshlet.tls.crypto import CIPHER_SUITES, KeyExchange
from meshlet.tls.events import SessionTicketReceived
from meshlet.tls.keyschedule import KeySchedule, resumption_psk
from meshlet.tls.state import ALLOWED_IN_ENCRYPTED_EXTENSIONS, Handler, HandshakeMachine, Output, State
from meshlet.tls.tickets import ClientSession

_ALLOWED_IN_SERVER_HELLO = frozenset(
    {ExtensionType.supported_versions, ExtensionType.key_share, ExtensionType.pre_shared_key}
)
_ALLOWED_IN_RETRY = frozenset(
    {ExtensionType.supported_versions, ExtensionType.key_share, ExtensionType.cookie}
)
_MAX_TICKET_LIFETIME = 7 * 24 * 3600


class ClientHandshake(HandshakeMachine):
    is_client: ClassVar[bool] = True

    def __init__(
        self,
        config: TlsConfig,
        output: Output,
        *,
        server_name: str | None = None,
        session: ClientSession | None = None,
    ) -> None:
        super().__init__(config, output)
        self.state = State.WAIT_SERVER_HELLO
        self.server_name = server_name or ""
        now = config.clock()
        self.session = session if session is not None and not session.expired(now) else None
        self._random = config.random(32)
        self._session_id = config.random(32) if config.middlebox_compat else b""
        self._key_exchanges: dict[int, KeyExchange] = {}
        self._offered_extensions: frozenset[int] = frozenset()
        self._retried = False
        self._retry_suite = 0
        self._certificate_request: CertificateRequest | None = None
        self._ticket_count = 0

    @property
    def retried(self) -> bool:
        """Whether the server sent a HelloRetryRequest."""
        return self._retried

    # -- ClientHello -------------------------------------------------------- #

    def start(self) -> None:
        for group in self.config.initial_share_groups:
            self._key_exchanges[group] = KeyExchange(group, self.config.random)
        self._send_client_hello(cookie=None)

    def _base_extensions(self, cookie: bytes | None) -> list[Extension]:
        config = self.config
        extensions: list[Extension] = []
        if self.server_name and not _is_ip_address(self.server_name):
            extensions.append((ExtensionType.server_name, encode_server_name(self.server_name)))
        extensions += [
            (ExtensionType.supported_groups, encode_u16_list(config.groups)),
            (
                ExtensionType.key_share,
                encode_key_share_client(
                    [KeyShareEntry(g, kx.public_bytes) for g, kx in self._key_exchanges.items()]
                ),
            ),
            (ExtensionType.supported_versions, encode_supported_versions_client([TLS13])),
            (ExtensionType.signature_algorithms, encode_u16_list(config.signature_schemes)),
            (ExtensionType.signature_algorithms_cert, encode_u16_list(config.certificate_schemes)),
        ]
        if config.alpn_protocols:
            protocols = [p.encode() for p in config.alpn_protocols]
            extensions.append((ExtensionType.application_layer_protocol_negotiation, encode_alpn(protocols)))
        extensions.append((ExtensionType.psk_key_exchange_modes, vec8(bytes((PSK_DHE_KE,)))))
        if config.record_size_limit is not None:
            extensions.append((ExtensionType.record_size_limit, config.record_size_limit.to_bytes(2, "big")))
        if cookie is not None:
            extensions.append((ExtensionType.cookie, vec16(cookie)))
        return extensions

    def _send_client_hello(self, cookie: bytes | None) -> None:
        extensions = self._base_extensions(cookie)
        session = self._usable_session()
        suites = self.config.cipher_suites
        if session is None:
            hello = ClientHello(self._random, self._session_id, suites, b"\x00", tuple(extensions))
            raw = hello.serialize()
        else:
            raw = self._hello_with_binder(extensions, session)
        self._offered_extensions = frozenset(t for t, _ in extensions) | (
            {ExtensionType.pre_shared_key} if session is not None else set()
        )
        self._send(raw)

    def _usable_session(self) -> ClientSession | None:
        session = self.session
        if session is None or session.cipher_suite not in self.config.cipher_suites:
            return None
        if (
            self._retried
            and CIPHER_SUITES[session.cipher_suite].hash_length
            != CIPHER_SUITES[self._retry_suite].hash_length
        ):
            return None
        return session

    def _hello_with_binder(self, extensions: list[Extension], session: ClientSession) -> bytes:
        """ClientHello with pre_shared_key last, its binder over the truncated hello."""
        suite = CIPHER_SUITES[session.cipher_suite]
        identity = PskIdentity(session.ticket, session.obfuscated_age(self.config.clock()))
        placeholder = b"\x00" * suite.hash_length
        psk_ext = (ExtensionType.pre_shared_key, encode_offered_psks([identity], [placeholder]))
        hello = ClientHello(
            self._random, self._session_id, self.config.cipher_suites, b"\x00", (*extensions, psk_ext)
        )
        raw = hello.serialize()
        binders_length = 2 + 1 + suite.hash_length
        truncated = raw[:-binders_length]
        binder = self._psk_binder(KeySchedule(suite, session.psk), truncated)
        return truncated + vec16(vec8(binder))

    # -- ServerHello / HelloRetryRequest ------------------------------------ #

    def _on_server_hello(self, message: Message, raw: bytes) -> None:
        assert isinstance(message, ServerHello)
        self._check_server_version(message)
        if message.session_id != self._session_id:
            raise illegal_parameter("ServerHello session id does not echo ours")
        if message.cipher_suite not in self.config.cipher_suites:
            raise illegal_parameter(f"server chose unoffered cipher suite {message.cipher_suite:#06x}")
        if message.compression_method != 0:
            raise illegal_parameter("ServerHello compression method is not null")
        if message.is_retry_request:
            self._on_retry_request(message, raw)
        else:
            self._on_real_server_hello(message, raw)

    def _check_server_version(self, message: ServerHello) -> None:
        versions = find_extension(message.extensions, ExtensionType.supported_versions)
        if versions is None:
            # A TLS 1.2-or-older answer: check the anti-downgrade sentinel first.
            if message.random[-8:] in (DOWNGRADE_TLS12, DOWNGRADE_TLS11):
                raise illegal_parameter("server random carries the TLS downgrade sentinel")
            raise TlsAlertError(AlertDescription.protocol_version, "server does not speak TLS 1.3")
        if decode_supported_version_server(versions) != TLS13:
            raise illegal_parameter("server selected a version we did not offer")

    def _check_server_extensions(
        self, extensions: tuple[Extension, ...], allowed: frozenset[int], where: str
    ) -> None:
        for ext_type, _ in extensions:
            if ext_type not in self._offered_extensions and ext_type != ExtensionType.cookie:
                raise TlsAlertError(
                    AlertDescription.unsupported_extension, f"unsolicited extension {ext_type} in {where}"
                )
            if ext_type not in allowed:
                raise illegal_parameter(f"extension {ext_type} is not allowed in {where}")

    def _on_retry_request(self, message: ServerHello, raw: bytes) -> None:
        if self._retried:
            raise unexpected_message("second HelloRetryRequest")
        self._check_server_extensions(message.extensions, _ALLOWED_IN_RETRY, "HelloRetryRequest")
        share = find_extension(message.extensions, ExtensionType.key_share)
        cookie_ext = find_extension(message.extensions, ExtensionType.cookie)
        cookie = decode_cookie(cookie_ext) if cookie_ext is not None else None
        if share is None and cookie is None:
            raise illegal_parameter("HelloRetryRequest would not change the ClientHello")
        self._retried = True
        self._retry_suite = message.cipher_suite
        suite = CIPHER_SUITES[message.cipher_suite]
        if share is not None:
            group = decode_key_share_hrr(share)
            if group not in self.config.groups or group in self._key_exchanges:
                raise illegal_parameter(f"HelloRetryRequest asks for group {group:#06x}")
            self._key_exchanges = {group: KeyExchange(group, self.config.random)}
        self.transcript.restart_after_retry(suite.hash)
        self.transcript.add(raw)
        self._send_change_cipher_spec_once()
        self._send_client_hello(cookie)

    def _on_real_server_hello(self, message: ServerHello, raw: bytes) -> None:
        self._check_server_extensions(message.extensions, _ALLOWED_IN_SERVER_HELLO, "ServerHello")
        if self._retried and message.cipher_suite != self._retry_suite:
            raise illegal_parameter("ServerHello cipher suite differs from the HelloRetryRequest's")
        suite = CIPHER_SUITES[message.cipher_suite]
        psk = self._accepted_psk(message, suite.hash_length)
        share_ext = find_extension(message.extensions, ExtensionType.key_share)
        if share_ext is None:
            raise TlsAlertError(AlertDescription.missing_extension, "ServerHello without key_share")
        share = decode_key_share_server(share_ext)
        exchange = self._key_exchanges.get(share.group)
        if exchange is None:
            raise illegal_parameter(f"server key share for unoffered group {share.group:#06x}")
        shared = exchange.exchange(share.key_exchange)
        self.suite, self.group = suite, share.group
        self.schedule = KeySchedule(suite, psk)
        self.transcript.add(raw)
        self._enter_handshake_secrets(shared)
        client_secret, server_secret = self.handshake_secrets
        self.out.set_read_secret(suite, server_secret)
        self._send_change_cipher_spec_once()
        self.out.set_write_secret(suite, client_secret)
        self.state = State.WAIT_ENCRYPTED_EXTENSIONS

    def _accepted_psk(self, message: ServerHello, hash_length: int) -> bytes | None:
        selected = find_extension(message.extensions, ExtensionType.pre_shared_key)
        if selected is None:
            return None
        session = self._usable_session()
        if session is None or decode_selected_psk(selected) != 0:
            raise illegal_parameter("server selected a PSK we did not offer")
        if CIPHER_SUITES[session.cipher_suite].hash_length != hash_length:
            raise illegal_parameter("server selected a PSK with a different hash")
        self.resumed = True
        self.peer_chain = session.peer_chain
        return session.psk

    # -- encrypted server flight --------------------------------------------- #

    def _on_encrypted_extensions(self, message: Message, raw: bytes) -> None:
        assert isinstance(message, EncryptedExtensions)
        self._check_server_extensions(
            message.extensions, ALLOWED_IN_ENCRYPTED_EXTENSIONS, "EncryptedExtensions"
        )
        alpn = find_extension(message.extensions, ExtensionType.application_layer_protocol_negotiation)
        if alpn is not None:
            self.alpn = self._check_alpn(alpn)
        elif self.resumed and self.session is not None:
            self.alpn = ""
        limit = find_extension(message.extensions, ExtensionType.record_size_limit)
        if limit is not None:
            self._obey_peer_record_size_limit(limit)
        self.transcript.add(raw)
        self.state = State.WAIT_FINISHED if self.resumed else State.WAIT_CERTIFICATE_OR_REQUEST

    def _check_alpn(self, data: bytes) -> str:
        protocols = decode_alpn(data)
        if len(protocols) != 1:
            raise illegal_parameter("server selected more than one ALPN protocol")
        try:
            chosen = protocols[0].decode("ascii")
        except UnicodeDecodeError:
            raise illegal_parameter("server selected an unoffered ALPN protocol") from None
        if chosen not in self.config.alpn_protocols:
            raise illegal_parameter(f"server selected unoffered ALPN protocol {chosen!r}")
        return chosen

    def _on_certificate_request(self, message: Message, raw: bytes) -> None:
        assert isinstance(message, CertificateRequest)
        if message.context:
            raise illegal_parameter("handshake CertificateRequest with a non-empty context")
        schemes = find_extension(message.extensions, ExtensionType.signature_algorithms)
        if schemes is None:
            raise TlsAlertError(
                AlertDescription.missing_extension, "CertificateRequest without signature_algorithms"
            )
        decode_u16_list(schemes, "signature_algorithms")
        self._certificate_request = message
        self.transcript.add(raw)
        self.state = State.WAIT_CERTIFICATE

    def _on_server_certificate(self, message: Message, raw: bytes) -> None:
        assert isinstance(message, Certificate)
        if message.context:
            raise illegal_parameter("server Certificate with a non-empty context")
        if not message.entries:
            raise decode_error("server sent an empty Certificate")
        self._accept_peer_certificate(message)
        self.transcript.add(raw)
        self.state = State.WAIT_CERTIFICATE_VERIFY

    def _on_server_certificate_verify(self, message: Message, raw: bytes) -> None:
        self._check_peer_certificate_verify(message, raw)
        self.state = State.WAIT_FINISHED

    def _on_server_finished(self, message: Message, raw: bytes) -> None:
        self._check_peer_finished(message, raw)
        self._enter_application_secrets()
        self.out.set_read_secret(self._need_suite(), self.application_secrets[1])
        request = self._certificate_request
        if request is None:
            self._finish_client_flight()
            return
        self._send_certificate(request.context)
        if not self.config.certificate_chain:
            self._finish_client_flight()
            return
        offered = decode_u16_list(
            find_extension(request.extensions, ExtensionType.signature_algorithms) or b"",
            "signature_algorithms",
        )
        scheme = self._signing_scheme_for(offered)
        if scheme is None:
            raise TlsAlertError(
                AlertDescription.handshake_failure, "no common signature scheme for our certificate"
            )
        self._request_signature(scheme, self._finish_client_flight)

    def _finish_client_flight(self) -> None:
        self._send_finished()
        self.out.set_write_secret(self._need_suite(), self.application_secrets[0])
        self._derive_resumption_master()
        self._complete()

    # -- post-handshake ---------------------------------------------------- #

    def _on_new_session_ticket(self, message: Message, raw: bytes) -> None:
        assert isinstance(message, NewSessionTicket)
        if message.lifetime > _MAX_TICKET_LIFETIME:
            raise illegal_parameter("ticket lifetime over seven days")
        if message.lifetime == 0:
            return
        suite = self._need_suite()
        session = ClientSession(
            ticket=message.ticket,
            psk=resumption_psk(suite, self.resumption_master_secret, message.nonce),
            cipher_suite=suite.code,
            age_add=message.age_add,
            lifetime=message.lifetime,
            received_at=self.config.clock(),
            server_name=self.server_name,
            alpn=self.alpn,
            peer_chain=self.peer_chain,
        )
        self.out.emit(SessionTicketReceived(session))

    TRANSITIONS: ClassVar[dict[tuple[State, int], Handler]] = {
        (State.WAIT_SERVER_HELLO, HandshakeType.server_hello): _on_server_hello,
        (State.WAIT_ENCRYPTED_EXTENSIONS, HandshakeType.encrypted_extensions): _on_encrypted_extensions,
        (State.WAIT_CERTIFICATE_OR_REQUEST, HandshakeType.certificate_request): _on_certificate_request,
        (State.WAIT_CERTIFICATE_OR_REQUEST, HandshakeType.certificate): _on_server_certificate,
        (State.WAIT_CERTIFICATE, HandshakeType.certificate): _on_server_certificate,
        (State.WAIT_CERTIFICATE_VERIFY, HandshakeType.certificate_verify): _on_server_certificate_verify,
        (State.WAIT_FINISHED, HandshakeType.finished): _on_server_finished,
        (State.CONNECTED, HandshakeType.new_session_ticket): _on_new_session_ticket,
        (State.CONNECTED, HandshakeType.key_update): HandshakeMachine._on_key_update,
    }


def _is_ip_address(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True
