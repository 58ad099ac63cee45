"""What the client and server handshake machines share.

A machine is driven by ``handle(msg_type, body, raw)``; the transition is
looked up in the subclass's ``TRANSITIONS`` table keyed on
``(state, message type)``, and a pair missing from the table is an
unexpected_message. A machine never does I/O: it talks to its connection
through the small ``Output`` interface. Signing is a state (``SIGNING``): the
machine emits ``SignatureRequired`` and waits for ``provide_signature``.
"""

from __future__ import annotations

import hmac
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from enum import Enum
from typing import Any, ClassVar, Protocol

from cryptography import x509

from meshlet.tls.alerts import AlertDescription, TlsAlertError, illegal_parameter, unexpected_message
from meshlet.tls.codec import (
    KEY_UPDATE_NOT_REQUESTED,
    KEY_UPDATE_REQUESTED,
    Certificate,
    CertificateEntry,
    CertificateVerify,
    ExtensionType,
    Finished,
    HandshakeType,
    KeyUpdate,
    Message,
    decode_record_size_limit,
    parse_message,
)
from meshlet.tls.config import TlsConfig
from meshlet.tls.crypto import CipherSuite, schemes_for_key, signed_content, verify
from meshlet.tls.events import Event, HandshakeComplete, KeyUpdated, SignatureRequired
from meshlet.tls.keyschedule import KeySchedule, Transcript, finished_verify_data, next_traffic_secret
from meshlet.tls.record import MAX_PLAINTEXT


class Output(Protocol):
    """What a handshake machine may ask of its connection."""

    def send_handshake(self, raw: bytes) -> None: ...

    def send_change_cipher_spec(self) -> None: ...

    def set_read_secret(self, suite: CipherSuite, secret: bytes) -> None: ...

    def set_write_secret(self, suite: CipherSuite, secret: bytes) -> None: ...

    def set_max_fragment(self, size: int) -> None: ...

    def allow_early_data_skip(self, budget: int) -> None: ...

    def emit(self, event: Event) -> None: ...


class State(Enum):
    # client
    WAIT_SERVER_HELLO = "wait_server_hello"
    WAIT_ENCRYPTED_EXTENSIONS = "wait_encrypted_extensions"
    WAIT_CERTIFICATE_OR_REQUEST = "wait_certificate_or_request"
    # server
    WAIT_CLIENT_HELLO = "wait_client_hello"
    WAIT_SECOND_CLIENT_HELLO = "wait_second_client_hello"
    # both
    WAIT_CERTIFICATE = "wait_certificate"
    WAIT_CERTIFICATE_VERIFY = "wait_certificate_verify"
    WAIT_FINISHED = "wait_finished"
    SIGNING = "signing"
    CONNECTED = "connected"


Handler = Callable[[Any, Message, bytes], None]

# Extensions a peer may send in each message (RFC 8446 section 4.2 table).
ALLOWED_IN_ENCRYPTED_EXTENSIONS = frozenset(
    {
        ExtensionType.server_name,
        ExtensionType.max_fragment_length,
        ExtensionType.supported_groups,
        ExtensionType.use_srtp,
        ExtensionType.heartbeat,
        ExtensionType.application_layer_protocol_negotiation,
        ExtensionType.client_certificate_type,
        ExtensionType.server_certificate_type,
        ExtensionType.early_data,
        ExtensionType.record_size_limit,
    }
)
ALLOWED_IN_CERTIFICATE_ENTRY = frozenset(
    {ExtensionType.status_request, ExtensionType.signed_certificate_timestamp}
)


def _now(clock: Callable[[], float]) -> datetime:
    return datetime.fromtimestamp(clock(), UTC)


class HandshakeMachine:
    """Shared state and steps of both sides."""

    TRANSITIONS: ClassVar[dict[tuple[State, int], Handler]] = {}
    is_client: ClassVar[bool] = False

    def __init__(self, config: TlsConfig, output: Output) -> None:
        self.config = config
        self.out = output
        self.state = State.WAIT_CLIENT_HELLO
        self.transcript = Transcript()
        self.suite: CipherSuite | None = None
        self.schedule: KeySchedule | None = None
        self.group: int | None = None
        self.handshake_secrets = (b"", b"")  # (client, server)
        self.application_secrets = (b"", b"")  # (client, server)
        self.resumption_master_secret = b""
        self.peer_chain: tuple[bytes, ...] = ()
        self.peer_info: object | None = None
        self.alpn = ""
        self.server_name = ""
        self.resumed = False
        self.sent_change_cipher_spec = False
        self._peer_public_key: object | None = None
        self._signing_scheme = 0
        self._after_signature: Callable[[], None] | None = None

    # -- dispatch --------------------------------------------------------- #

    def transcript_is_empty(self) -> bool:
        return self.transcript.empty

    @property
    def paused(self) -> bool:
        return self.state is State.SIGNING

    @property
    def connected(self) -> bool:
        return self.state is State.CONNECTED

    def handle(self, msg_type: int, body: bytes, raw: bytes) -> None:
        handler = self.TRANSITIONS.get((self.state, msg_type))
        if handler is None:
            name = HandshakeType(msg_type).name if msg_type in HandshakeType._value2member_map_ else msg_type
            raise unexpected_message(f"{name} in state {self.state.value}")
        handler(self, parse_message(msg_type, body), raw)

    def _need_suite(self) -> CipherSuite:
        if self.suite is None or self.schedule is None:
            raise TlsAlertError(AlertDescription.internal_error, "no cipher suite negotiated yet")
        return self.suite

    def _digest(self, extra: bytes = b"") -> bytes:
        return self.transcript.digest(self._need_suite().hash, extra)

    def _send(self, raw: bytes) -> None:
        self.transcript.add(raw)
        self.out.send_handshake(raw)

    def _obey_peer_record_size_limit(self, extension: bytes) -> None:
        """The peer's record_size_limit (RFC 8449) caps the plaintext we send;
        in TLS 1.3 the limit counts the content-type byte, hence the - 1."""
        self.out.set_max_fragment(min(MAX_PLAINTEXT, decode_record_size_limit(extension) - 1))

    def _send_change_cipher_spec_once(self) -> None:
        if self.config.middlebox_compat and not self.sent_change_cipher_spec:
            self.sent_change_cipher_spec = True
            self.out.send_change_cipher_spec()

    # -- key schedule steps ---------------------------------------------- #

    def _enter_handshake_secrets(self, shared_secret: bytes) -> None:
        assert self.schedule is not None
        self.schedule.advance(shared_secret)
        digest = self._digest()
        self.handshake_secrets = (
            self.schedule.derive(b"c hs traffic", digest),
            self.schedule.derive(b"s hs traffic", digest),
        )

    def _enter_application_secrets(self) -> None:
        """After the server Finished is in the transcript."""
        assert self.schedule is not None
        self.schedule.advance()
        digest = self._digest()
        self.application_secrets = (
            self.schedule.derive(b"c ap traffic", digest),
            self.schedule.derive(b"s ap traffic", digest),
        )

    def _derive_resumption_master(self) -> None:
        """After the client Finished is in the transcript."""
        assert self.schedule is not None
        self.resumption_master_secret = self.schedule.derive(b"res master", self._digest())

    def _finished_data(self, *, ours: bool) -> bytes:
        client_side = ours == self.is_client
        base_key = self.handshake_secrets[0] if client_side else self.handshake_secrets[1]
        return finished_verify_data(self._need_suite().hash, base_key, self._digest())

    def _psk_binder(self, schedule: KeySchedule, truncated_hello: bytes) -> bytes:
        """The binder proving a PSK offer (RFC 8446 section 4.2.11.2): a
        Finished-style MAC over the transcript up to the ClientHello's binders,
        keyed from the PSK's early secret in ``schedule``."""
        hash_ = schedule.suite.hash
        digest = self.transcript.digest(hash_, truncated_hello)
        return finished_verify_data(hash_, schedule.binder_key(), digest)

    def _send_finished(self) -> None:
        self._send(Finished(self._finished_data(ours=True)).serialize())

    def _check_peer_finished(self, message: Message, raw: bytes) -> None:
        assert isinstance(message, Finished)
        expected = self._finished_data(ours=False)
        if not hmac.compare_digest(expected, message.verify_data):
            raise TlsAlertError(AlertDescription.decrypt_error, "Finished verify_data does not match")
        self.transcript.add(raw)

    # -- certificates ----------------------------------------------------- #

    def _send_certificate(self, context: bytes = b"") -> None:
        if not context:
            self._send(self.config.certificate_message)
            return
        entries = tuple(CertificateEntry(der) for der in self.config.certificate_chain)
        self._send(Certificate(context, entries).serialize())

    def _signing_scheme_for(self, offered: Sequence[int]) -> int | None:
        """Our most preferred signing scheme the peer accepts, if any."""
        return next((s for s in self.config.signing_schemes if s in offered), None)

    def _request_signature(self, scheme: int, then: Callable[[], None]) -> None:
        """Pause: the caller signs what we emit and calls provide_signature."""
        content = signed_content(self._digest(), server=not self.is_client)
        self._signing_scheme = scheme
        self._after_signature = then
        self.state = State.SIGNING
        self.out.emit(SignatureRequired(scheme, content))

    def provide_signature(self, signature: bytes) -> None:
        if self.state is not State.SIGNING or self._after_signature is None:
            raise TlsAlertError(AlertDescription.internal_error, "no signature was requested")
        if not 0 < len(signature) < 1 << 16:
            raise TlsAlertError(AlertDescription.internal_error, "key handle returned an unusable signature")
        self._send(CertificateVerify(self._signing_scheme, signature).serialize())
        then, self._after_signature = self._after_signature, None
        then()

    def _accept_peer_certificate(self, message: Certificate) -> None:
        """Parse and verify the peer chain (the signature comes with CertificateVerify)."""
        for entry in message.entries:
            for ext_type, _ in entry.extensions:
                if ext_type not in ALLOWED_IN_CERTIFICATE_ENTRY:
                    raise TlsAlertError(
                        AlertDescription.unsupported_extension, f"extension {ext_type} in a CertificateEntry"
                    )
        chain = message.chain
        try:
            leaf = x509.load_der_x509_certificate(chain[0])
            public_key = leaf.public_key()
        except ValueError as exc:
            raise TlsAlertError(AlertDescription.bad_certificate, f"unparsable certificate: {exc}") from None
        if not schemes_for_key(public_key):
            raise TlsAlertError(
                AlertDescription.unsupported_certificate, f"certificate key {type(public_key).__name__}"
            )
        if self.config.verifier is not None:
            self.peer_info = _run_verifier(self.config.verifier, chain, _now(self.config.clock))
        self.peer_chain = chain
        self._peer_public_key = public_key

    def _check_peer_certificate_verify(self, message: Message, raw: bytes) -> None:
        assert isinstance(message, CertificateVerify)
        if message.scheme not in self.config.signature_schemes:
            raise illegal_parameter(f"CertificateVerify with unoffered scheme {message.scheme:#06x}")
        content = signed_content(self._digest(), server=self.is_client)
        verify(self._peer_public_key, message.scheme, message.signature, content)  # type: ignore[arg-type]
        self.transcript.add(raw)

    # -- after the handshake ---------------------------------------------- #

    def _complete(self) -> None:
        self.state = State.CONNECTED
        self.out.emit(
            HandshakeComplete(
                peer_chain=self.peer_chain,
                alpn=self.alpn,
                resumed=self.resumed,
                cipher_suite=self._need_suite().name,
                group=self.group,
                server_name=self.server_name,
                peer=self.peer_info,
            )
        )

    def _peer_application_secret(self) -> bytes:
        return self.application_secrets[1] if self.is_client else self.application_secrets[0]

    def _set_application_secrets(self, *, peer: bytes | None = None, ours: bytes | None = None) -> None:
        client, server = self.application_secrets
        if self.is_client:
            self.application_secrets = (ours or client, peer or server)
        else:
            self.application_secrets = (peer or client, ours or server)

    def _on_key_update(self, message: Message, raw: bytes) -> None:
        assert isinstance(message, KeyUpdate)
        suite = self._need_suite()
        new_peer = next_traffic_secret(suite, self._peer_application_secret())
        self._set_application_secrets(peer=new_peer)
        self.out.set_read_secret(suite, new_peer)
        answered = message.request_update == KEY_UPDATE_REQUESTED
        if answered:
            self.update_write_key(request_peer=False)
        self.out.emit(KeyUpdated(ours=answered))

    def update_write_key(self, *, request_peer: bool) -> None:
        if not self.connected:
            raise TlsAlertError(AlertDescription.internal_error, "KeyUpdate before the handshake completed")
        suite = self._need_suite()
        request = KEY_UPDATE_REQUESTED if request_peer else KEY_UPDATE_NOT_REQUESTED
        self.out.send_handshake(KeyUpdate(request).serialize())
        ours = self.application_secrets[0] if self.is_client else self.application_secrets[1]
        new_ours = next_traffic_secret(suite, ours)
        self._set_application_secrets(ours=new_ours)
        self.out.set_write_secret(suite, new_ours)


def _run_verifier(
    verifier: Callable[[Sequence[bytes], datetime], object], chain: Sequence[bytes], now: datetime
) -> object:
    """Call the peer verifier; whatever it raises becomes a TLS alert."""
    try:
        return verifier(chain, now)
    except TlsAlertError:
        raise
    except Exception as exc:
        raise TlsAlertError(_alert_of(exc), str(exc) or type(exc).__name__) from None


def _alert_of(exc: Exception) -> AlertDescription:
    for attr in ("alert", "description", "alert_description"):
        value = getattr(exc, attr, None)
        if isinstance(value, AlertDescription):
            return value
        if isinstance(value, int) and value in AlertDescription._value2member_map_:
            return AlertDescription(value)
        if isinstance(value, str) and value in AlertDescription.__members__:
            return AlertDescription[value]
    return AlertDescription.bad_certificate
