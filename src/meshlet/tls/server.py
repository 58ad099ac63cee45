"""The server handshake (RFC 8446 section 2, server side)."""

from __future__ import annotations

import hmac
import struct
from dataclasses import dataclass
from typing import ClassVar

from meshlet.tls.alerts import AlertDescription, TlsAlertError, illegal_parameter
from meshlet.tls.codec import (
    HRR_RANDOM,
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
    OfferedPsks,
    ServerHello,
    decode_alpn,
    decode_key_share_client,
    decode_offered_psks,
    decode_psk_modes,
    decode_server_name,
    decode_supported_versions_client,
    decode_u16_list,
    encode_alpn,
    encode_key_share_server,
    encode_u16_list,
    find_extension,
    u16,
)
from meshlet.tls.config import TlsConfig
from meshlet.tls.crypto import CIPHER_SUITES, CipherSuite, KeyExchange
from meshlet.tls.keyschedule import KeySchedule, resumption_psk
from meshlet.tls.record import MAX_PLAINTEXT
from meshlet.tls.state import Handler, HandshakeMachine, Output, State
from meshlet.tls.tickets import TicketState

# Rejected 0-RTT data we are willing to skip (we never grant early data).
_EARLY_DATA_SKIP_BUDGET = 1 << 16


@dataclass(frozen=True, slots=True)
class _Offer:
    """The parts of a ClientHello the server's choices depend on."""

    hello: ClientHello
    groups: tuple[int, ...]
    shares: tuple[KeyShareEntry, ...]
    schemes: tuple[int, ...]


class ServerHandshake(HandshakeMachine):
    is_client: ClassVar[bool] = False

    def __init__(self, config: TlsConfig, output: Output) -> None:
        super().__init__(config, output)
        self.state = State.WAIT_CLIENT_HELLO
        self._first_hello: ClientHello | None = None
        self._retry_group = 0
        self._requested_client_certificate = False
        self._ticket_state: TicketState | None = None

    @property
    def retried(self) -> bool:
        """Whether we sent a HelloRetryRequest."""
        return self._retry_group != 0

    # -- ClientHello ---------------------------------------------------------- #

    def _on_client_hello(self, message: Message, raw: bytes) -> None:
        assert isinstance(message, ClientHello)
        offer = self._read_offer(message)
        suite = self._choose_suite(message)
        share = self._choose_key_share(offer)
        if share is None:
            self._send_retry_request(message, suite, raw, offer)
            return
        self._check_second_hello(message, suite)
        self.suite = suite
        self.server_name = _server_name(message)
        self.alpn = self._choose_alpn(message)
        if find_extension(message.extensions, ExtensionType.early_data) is not None:
            self.out.allow_early_data_skip(_EARLY_DATA_SKIP_BUDGET)
        psk_ext = self._resumption_psk(message, raw, suite)
        self.transcript.add(raw)
        self._send_server_hello(message, share, psk_ext)
        self._send_encrypted_extensions(message)
        if self.resumed:
            self._finish_server_flight()
            return
        scheme = self._choose_signature_scheme(offer)
        if self.config.request_client_certificate or self.config.require_client_certificate:
            self._requested_client_certificate = True
            request = CertificateRequest(
                b"", ((ExtensionType.signature_algorithms, encode_u16_list(self.config.signature_schemes)),)
            )
            self._send(request.serialize())
        self._send_certificate()
        self._request_signature(scheme, self._finish_server_flight)

    def _read_offer(self, hello: ClientHello) -> _Offer:
        versions = find_extension(hello.extensions, ExtensionType.supported_versions)
        if versions is None or TLS13 not in decode_supported_versions_client(versions):
            raise TlsAlertError(AlertDescription.protocol_version, "client does not offer TLS 1.3")
        if hello.compression_methods != b"\x00":
            raise illegal_parameter("TLS 1.3 ClientHello must offer only null compression")
        for index, (ext_type, _) in enumerate(hello.extensions):
            if ext_type == ExtensionType.pre_shared_key and index != len(hello.extensions) - 1:
                raise illegal_parameter("pre_shared_key is not the last extension")
        groups_ext = find_extension(hello.extensions, ExtensionType.supported_groups)
        shares_ext = find_extension(hello.extensions, ExtensionType.key_share)
        if groups_ext is None or shares_ext is None:
            raise TlsAlertError(
                AlertDescription.missing_extension, "ClientHello lacks supported_groups/key_share"
            )
        groups = decode_u16_list(groups_ext, "supported_groups")
        shares = decode_key_share_client(shares_ext)
        seen: set[int] = set()
        for share in shares:
            if share.group in seen or share.group not in groups:
                raise illegal_parameter(
                    f"key share for group {share.group:#06x} is duplicated or unadvertised"
                )
            seen.add(share.group)
        schemes_ext = find_extension(hello.extensions, ExtensionType.signature_algorithms)
        schemes = decode_u16_list(schemes_ext, "signature_algorithms") if schemes_ext is not None else ()
        return _Offer(hello, groups, shares, schemes)

    def _choose_suite(self, hello: ClientHello) -> CipherSuite:
        if self._retry_group:
            assert self.suite is not None
            return self.suite
        for code in self.config.cipher_suites:
            if code in hello.cipher_suites:
                return CIPHER_SUITES[code]
        raise TlsAlertError(AlertDescription.handshake_failure, "no common cipher suite")

    def _choose_key_share(self, offer: _Offer) -> KeyShareEntry | None:
        """The client's share to use, or None when a HelloRetryRequest is needed."""
        by_group = {s.group: s for s in offer.shares}
        if self._retry_group:
            share = by_group.get(self._retry_group)
            if share is None or len(offer.shares) != 1:
                raise illegal_parameter("second ClientHello lacks the requested key share")
            return share
        for group in self.config.groups:
            if group in by_group:
                return by_group[group]
        if not any(g in offer.groups for g in self.config.groups):
            raise TlsAlertError(AlertDescription.handshake_failure, "no common key exchange group")
        return None

    def _send_retry_request(self, hello: ClientHello, suite: CipherSuite, raw: bytes, offer: _Offer) -> None:
        if self._retry_group:
            raise illegal_parameter("second ClientHello still needs a retry")
        group = next(g for g in self.config.groups if g in offer.groups)
        self._retry_group = group
        self._first_hello = hello
        self.suite = suite
        retry = ServerHello(
            HRR_RANDOM,
            hello.session_id,
            suite.code,
            ((ExtensionType.supported_versions, u16(TLS13)), (ExtensionType.key_share, u16(group))),
        )
        self.transcript.add(raw)
        self.transcript.restart_after_retry(suite.hash)
        self._send(retry.serialize())
        if hello.session_id:
            self._send_change_cipher_spec_once()
        self.state = State.WAIT_SECOND_CLIENT_HELLO

    def _check_second_hello(self, hello: ClientHello, suite: CipherSuite) -> None:
        first = self._first_hello
        if first is None:
            return
        if hello.random != first.random or hello.session_id != first.session_id:
            raise illegal_parameter("second ClientHello changed random or session id")
        if suite.code not in hello.cipher_suites:
            raise illegal_parameter("second ClientHello dropped the chosen cipher suite")
        if find_extension(hello.extensions, ExtensionType.early_data) is not None:
            raise illegal_parameter("early_data after a HelloRetryRequest")

    def _choose_alpn(self, hello: ClientHello) -> str:
        offered = find_extension(hello.extensions, ExtensionType.application_layer_protocol_negotiation)
        if offered is None or not self.config.alpn_protocols:
            return ""
        protocols = decode_alpn(offered)
        for name in self.config.alpn_protocols:
            if name.encode() in protocols:
                return name
        raise TlsAlertError(AlertDescription.no_application_protocol, "no common ALPN protocol")

    def _choose_signature_scheme(self, offer: _Offer) -> int:
        if not offer.schemes:
            raise TlsAlertError(AlertDescription.missing_extension, "ClientHello lacks signature_algorithms")
        scheme = self._signing_scheme_for(offer.schemes)
        if scheme is None:
            raise TlsAlertError(AlertDescription.handshake_failure, "no common signature scheme")
        return scheme

    # -- resumption --------------------------------------------------------- #

    def _resumption_psk(self, hello: ClientHello, raw: bytes, suite: CipherSuite) -> Extension | None:
        """Validate the offered ticket; returns the ServerHello extension accepting it."""
        psk_ext = find_extension(hello.extensions, ExtensionType.pre_shared_key)
        if psk_ext is None:
            self.schedule = KeySchedule(suite)
            return None
        modes_ext = find_extension(hello.extensions, ExtensionType.psk_key_exchange_modes)
        if modes_ext is None:
            raise TlsAlertError(
                AlertDescription.missing_extension, "pre_shared_key without psk_key_exchange_modes"
            )
        offered = decode_offered_psks(psk_ext)
        state = (
            self._live_ticket(offered, suite, hello) if PSK_DHE_KE in decode_psk_modes(modes_ext) else None
        )
        if state is None:
            self.schedule = KeySchedule(suite)
            return None
        schedule = KeySchedule(suite, state.psk)
        truncated = raw[: len(raw) - offered.binders_length]
        if not hmac.compare_digest(self._psk_binder(schedule, truncated), offered.binders[0]):
            raise TlsAlertError(AlertDescription.decrypt_error, "PSK binder does not match")
        self.schedule = schedule
        self.resumed = True
        self._ticket_state = state
        self.peer_chain = state.peer_chain
        return (ExtensionType.pre_shared_key, u16(0))

    def _live_ticket(
        self, offered: OfferedPsks, suite: CipherSuite, hello: ClientHello
    ) -> TicketState | None:
        keys = self.config.ticket_keys
        if keys is None:
            return None
        state = keys.unseal(offered.identities[0].identity)
        if state is None or state.cipher_suite != suite.code:
            return None
        age_ms = int(self.config.clock() * 1000) - state.issued_at_ms
        if not 0 <= age_ms < state.lifetime * 1000:
            return None
        if state.server_name != _server_name(hello):
            return None
        if self.config.require_client_certificate and not state.peer_chain:
            return None
        return state

    # -- server flight ------------------------------------------------------- #

    def _send_server_hello(self, hello: ClientHello, share: KeyShareEntry, psk_ext: Extension | None) -> None:
        suite = self._need_suite()
        exchange = KeyExchange(share.group, self.config.random)
        shared = exchange.exchange(share.key_exchange)
        self.group = share.group
        extensions: list[Extension] = [psk_ext] if psk_ext is not None else []
        extensions += [
            (
                ExtensionType.key_share,
                encode_key_share_server(KeyShareEntry(share.group, exchange.public_bytes)),
            ),
            (ExtensionType.supported_versions, u16(TLS13)),
        ]
        server_hello = ServerHello(self.config.random(32), hello.session_id, suite.code, tuple(extensions))
        self._send(server_hello.serialize())
        if hello.session_id:
            self._send_change_cipher_spec_once()
        self._enter_handshake_secrets(shared)
        client_secret, server_secret = self.handshake_secrets
        self.out.set_write_secret(suite, server_secret)
        self.out.set_read_secret(suite, client_secret)

    def _send_encrypted_extensions(self, hello: ClientHello) -> None:
        extensions: list[Extension] = []
        limit_ext = find_extension(hello.extensions, ExtensionType.record_size_limit)
        if limit_ext is not None:
            self._obey_peer_record_size_limit(limit_ext)
            ours = self.config.record_size_limit or MAX_PLAINTEXT + 1
            extensions.append((ExtensionType.record_size_limit, u16(ours)))
        if self.server_name:
            extensions.append((ExtensionType.server_name, b""))
        if self.alpn:
            extensions.append(
                (ExtensionType.application_layer_protocol_negotiation, encode_alpn([self.alpn.encode()]))
            )
        self._send(EncryptedExtensions(tuple(extensions)).serialize())

    def _finish_server_flight(self) -> None:
        self._send_finished()
        self._enter_application_secrets()
        self.out.set_write_secret(self._need_suite(), self.application_secrets[1])
        self.state = State.WAIT_CERTIFICATE if self._requested_client_certificate else State.WAIT_FINISHED

    # -- client's second flight --------------------------------------------- #

    def _on_client_certificate(self, message: Message, raw: bytes) -> None:
        assert isinstance(message, Certificate)
        if message.context:
            raise illegal_parameter("client Certificate context does not match the request")
        if not message.entries:
            if self.config.require_client_certificate:
                raise TlsAlertError(AlertDescription.certificate_required, "client sent no certificate")
            self.transcript.add(raw)
            self.state = State.WAIT_FINISHED
            return
        self._accept_peer_certificate(message)
        self.transcript.add(raw)
        self.state = State.WAIT_CERTIFICATE_VERIFY

    def _on_client_certificate_verify(self, message: Message, raw: bytes) -> None:
        self._check_peer_certificate_verify(message, raw)
        self.state = State.WAIT_FINISHED

    def _on_client_finished(self, message: Message, raw: bytes) -> None:
        self._check_peer_finished(message, raw)
        suite = self._need_suite()
        self.out.set_read_secret(suite, self.application_secrets[0])
        self._derive_resumption_master()
        self._complete()
        self._send_tickets()

    def _send_tickets(self) -> None:
        keys = self.config.ticket_keys
        if keys is None:
            return
        suite = self._need_suite()
        for index in range(self.config.tickets_per_handshake):
            nonce = struct.pack("!H", index)
            age_add = int.from_bytes(self.config.random(4), "big")
            state = TicketState(
                cipher_suite=suite.code,
                psk=resumption_psk(suite, self.resumption_master_secret, nonce),
                issued_at_ms=int(self.config.clock() * 1000),
                age_add=age_add,
                lifetime=keys.lifetime,
                alpn=self.alpn,
                server_name=self.server_name,
                peer_chain=self.peer_chain,
            )
            ticket = NewSessionTicket(keys.lifetime, age_add, nonce, keys.seal(state))
            self.out.send_handshake(ticket.serialize())

    TRANSITIONS: ClassVar[dict[tuple[State, int], Handler]] = {
        (State.WAIT_CLIENT_HELLO, HandshakeType.client_hello): _on_client_hello,
        (State.WAIT_SECOND_CLIENT_HELLO, HandshakeType.client_hello): _on_client_hello,
        (State.WAIT_CERTIFICATE, HandshakeType.certificate): _on_client_certificate,
        (State.WAIT_CERTIFICATE_VERIFY, HandshakeType.certificate_verify): _on_client_certificate_verify,
        (State.WAIT_FINISHED, HandshakeType.finished): _on_client_finished,
        (State.CONNECTED, HandshakeType.key_update): HandshakeMachine._on_key_update,
    }


def _server_name(hello: ClientHello) -> str:
    data = find_extension(hello.extensions, ExtensionType.server_name)
    return decode_server_name(data) if data is not None else ""
