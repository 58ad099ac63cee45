"""``TlsConnection``: one TLS 1.3 connection, sans-IO.

Feed it what the network delivered (``receive_data``), act on the events it
returns, and send what ``data_to_send`` gives you. A ``SignatureRequired``
event pauses the handshake until ``provide_signature``; bytes that arrive
meanwhile are kept (bounded by the caller, which stops reading while a
signature is pending). Protocol errors never escape ``receive_data``: they
become a fatal alert queued for the peer and a ``ConnectionFailed`` event.
"""

from __future__ import annotations

from collections.abc import Callable

from meshlet.tls.alerts import AlertDescription, AlertLevel, TlsAlertError, decode_error, unexpected_message
from meshlet.tls.client import ClientHandshake
from meshlet.tls.codec import HandshakeBuffer
from meshlet.tls.config import TlsConfig
from meshlet.tls.crypto import CipherSuite
from meshlet.tls.events import AlertReceived, ApplicationData, ConnectionFailed, Event, KeyUpdated
from meshlet.tls.record import ContentType, RecordLayer
from meshlet.tls.server import ServerHandshake
from meshlet.tls.state import HandshakeMachine
from meshlet.tls.tickets import ClientSession


class TlsStateError(RuntimeError):
    """The caller asked for something the connection's state does not allow."""


class TlsConnection:
    def __init__(
        self,
        config: TlsConfig,
        *,
        client: bool,
        server_name: str | None = None,
        session: ClientSession | None = None,
    ) -> None:
        self.config = config
        self.is_client = client
        self._records = RecordLayer(config.padding_block)
        self._handshake_buffer = HandshakeBuffer(config.max_handshake_message_size)
        # Protected records waiting for ``data_to_send``/``take_outgoing``.
        self._outgoing: list[bytes | bytearray] = []
        # Handshake messages not yet protected: consecutive messages under one
        # key share records (the server's EncryptedExtensions..Finished flight
        # is one AEAD seal, not four).
        self._pending_handshake: list[bytes] = []
        self._events: list[Event] = []
        self._closed = False
        self._peer_closed = False
        self._sent_close = False
        self._seen_change_cipher_spec = False
        self.failure: ConnectionFailed | None = None
        self.key_updates_received = 0
        self._machine: HandshakeMachine
        if client:
            machine = ClientHandshake(config, self, server_name=server_name, session=session)
            self._machine = machine
            self._guarded(machine.start)
        else:
            self._machine = ServerHandshake(config, self)

    # -- the Output interface the handshake machine uses ------------------- #

    def send_handshake(self, raw: bytes) -> None:
        self._pending_handshake.append(raw)

    def _flush_handshake(self) -> None:
        pending = self._pending_handshake
        if pending:
            data = pending[0] if len(pending) == 1 else b"".join(pending)
            self._pending_handshake = []
            self._outgoing.append(self._records.protect(ContentType.handshake, data))

    def send_change_cipher_spec(self) -> None:
        self._flush_handshake()
        self._outgoing.append(b"\x14\x03\x03\x00\x01\x01")

    def set_read_secret(self, suite: CipherSuite, secret: bytes) -> None:
        if not self._handshake_buffer.empty:
            # RFC 8446 section 5.1: a key change must fall on a record boundary.
            raise unexpected_message("handshake data spans a key change")
        self._records.set_read_secret(suite, secret)

    def set_write_secret(self, suite: CipherSuite, secret: bytes) -> None:
        self._flush_handshake()
        self._records.set_write_secret(suite, secret)

    def set_max_fragment(self, size: int) -> None:
        self._records.max_fragment = size

    def allow_early_data_skip(self, budget: int) -> None:
        self._records.early_data_budget = budget

    def emit(self, event: Event) -> None:
        if isinstance(event, KeyUpdated):
            self.key_updates_received += 1
        self._events.append(event)

    # -- state ----------------------------------------------------------------- #

    @property
    def handshake_complete(self) -> bool:
        return self._machine.connected

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def awaiting_signature(self) -> bool:
        return self._machine.paused and not self._closed

    @property
    def write_closed(self) -> bool:
        """No more application data can be sent (close_notify sent, or failed)."""
        return self._closed or self._sent_close

    @property
    def peer_closed(self) -> bool:
        return self._peer_closed

    @property
    def alpn(self) -> str:
        return self._machine.alpn

    @property
    def cipher_suite(self) -> str:
        return self._machine.suite.name if self._machine.suite is not None else ""

    @property
    def server_name(self) -> str:
        return self._machine.server_name

    @property
    def peer_chain(self) -> tuple[bytes, ...]:
        return self._machine.peer_chain

    @property
    def resumed(self) -> bool:
        return self._machine.resumed

    @property
    def machine(self) -> HandshakeMachine:
        return self._machine

    # -- input ----------------------------------------------------------------- #

    def receive_data(self, data: bytes) -> list[Event]:
        if self._closed or self._peer_closed:
            return self._take_events()
        self._records.feed(data)
        self._guarded(self._process)
        return self._take_events()

    def provide_signature(self, signature: bytes) -> list[Event]:
        """Resume a handshake paused on ``SignatureRequired``."""
        if self._closed:
            return self._take_events()
        if not self._machine.paused:
            raise TlsStateError("no signature is pending")
        self._guarded(lambda: self._resume(signature))
        return self._take_events()

    def fail_signature(self, message: str) -> list[Event]:
        """The key handle could not sign: abort with internal_error."""
        self._fail(TlsAlertError(AlertDescription.internal_error, f"signing failed: {message}"))
        return self._take_events()

    def _resume(self, signature: bytes) -> None:
        self._machine.provide_signature(signature)
        self._process()

    def _process(self) -> None:
        self._drain_handshake_messages()
        while not self._closed and not self._peer_closed and not self._machine.paused:
            record = self._records.next_record()
            if record is None:
                return
            self._on_record(*record)

    def _on_record(self, content_type: int, payload: bytes) -> None:
        if content_type == ContentType.application_data:
            self._on_application_data(payload)
        elif content_type == ContentType.handshake:
            if not payload:
                raise unexpected_message("empty handshake record")
            self._handshake_buffer.feed(payload)
            self._drain_handshake_messages()
        elif content_type == ContentType.alert:
            self._on_alert(payload)
        else:
            self._on_change_cipher_spec()

    def _drain_handshake_messages(self) -> None:
        machine = self._machine
        while not machine.paused and not self._closed:
            message = self._handshake_buffer.next_message()
            if message is None:
                return
            machine.handle(*message)

    def _on_application_data(self, payload: bytes) -> None:
        if not self._machine.connected or not self._handshake_buffer.empty:
            raise unexpected_message("application data before the handshake completed")
        if payload:
            self._events.append(ApplicationData(payload))

    def _on_change_cipher_spec(self) -> None:
        # Middlebox compatibility: one CCS is allowed during the handshake only.
        if self._machine.connected or self._seen_change_cipher_spec or not self._handshake_buffer.empty:
            raise unexpected_message("change_cipher_spec outside the handshake")
        if not self.is_client and self._machine.transcript_is_empty():
            raise unexpected_message("change_cipher_spec before ClientHello")
        self._seen_change_cipher_spec = True

    def _on_alert(self, payload: bytes) -> None:
        if len(payload) != 2 or not self._handshake_buffer.empty:
            raise decode_error("malformed alert record")
        code = payload[1]
        if code not in AlertDescription._value2member_map_:
            raise TlsAlertError(AlertDescription.illegal_parameter, f"unknown alert {code}")
        description = AlertDescription(code)
        self._events.append(AlertReceived(description))
        if description == AlertDescription.close_notify:
            self._peer_closed = True
        elif description != AlertDescription.user_canceled:
            self._closed = True
            self._records.take_buffered()
            self.failure = ConnectionFailed(description, "alert from peer", local=False)
            self._events.append(self.failure)

    # -- output ---------------------------------------------------------------- #

    def send_application_data(self, data: bytes) -> None:
        if self._closed or self._sent_close:
            raise TlsStateError("connection is closed for writing")
        if not self._machine.connected:
            raise TlsStateError("handshake not complete")
        if self._records.write_key_exhausted:
            self._machine.update_write_key(request_peer=False)
        self._flush_handshake()
        self._outgoing.append(self._records.protect(ContentType.application_data, data))

    def update_key(self, *, request_peer: bool = True) -> None:
        """Send KeyUpdate and switch our sending key (RFC 8446 section 4.6.3)."""
        if self._closed or self._sent_close or not self._machine.connected:
            raise TlsStateError("KeyUpdate needs an established, open connection")
        self._machine.update_write_key(request_peer=request_peer)

    def close(self) -> None:
        """Send close_notify (once); reading continues until the peer's."""
        if self._closed or self._sent_close:
            return
        self._sent_close = True
        self._send_alert(AlertLevel.WARNING, AlertDescription.close_notify)

    def data_to_send(self) -> bytes:
        data = self.take_outgoing()
        return data if type(data) is bytes else bytes(data)

    def take_outgoing(self) -> bytes | bytearray:
        """``data_to_send`` without a copy: the buffer is handed over (the
        connection keeps no reference to it)."""
        self._flush_handshake()
        pending = self._outgoing
        if not pending:
            return b""
        self._outgoing = []
        return pending[0] if len(pending) == 1 else b"".join(pending)

    def _send_alert(self, level: AlertLevel, description: AlertDescription) -> None:
        self._flush_handshake()
        self._outgoing.append(self._records.protect(ContentType.alert, bytes((level, description))))

    # -- failure ---------------------------------------------------------------- #

    def _guarded(self, step: Callable[[], None]) -> None:
        try:
            step()
        except TlsAlertError as exc:
            self._fail(exc)
        except Exception as exc:  # a bug must not take the process down with it
            self._fail(TlsAlertError(AlertDescription.internal_error, f"{type(exc).__name__}: {exc}"))

    def _fail(self, error: TlsAlertError) -> None:
        if self._closed:
            return
        self._closed = True
        try:
            self._send_alert(AlertLevel.FATAL, error.description)
        except Exception:
            pass
        self._records.take_buffered()
        self.failure = ConnectionFailed(error.description, error.message, local=True)
        self._events.append(self.failure)

    def _take_events(self) -> list[Event]:
        events, self._events = self._events, []
        return events
