"""What a ``TlsConnection`` reports to its caller."""

from __future__ import annotations

from dataclasses import dataclass, field

from meshlet.tls.alerts import AlertDescription
from meshlet.tls.tickets import ClientSession


@dataclass(frozen=True, slots=True)
class SignatureRequired:
    """The handshake is paused until ``provide_signature`` is called with the
    signature of ``data`` under ``scheme`` by the configured key handle."""

    scheme: int
    data: bytes


@dataclass(frozen=True, slots=True)
class HandshakeComplete:
    peer_chain: tuple[bytes, ...]
    alpn: str
    resumed: bool
    cipher_suite: str = ""
    group: int | None = None
    server_name: str = ""
    # Whatever the peer verifier returned (meshlet.tls.verify.VerifiedPeer), if it ran.
    peer: object | None = field(default=None, compare=False)


@dataclass(frozen=True, slots=True)
class ApplicationData:
    data: bytes


@dataclass(frozen=True, slots=True)
class AlertReceived:
    """The peer sent an alert. ``close_notify`` ends its direction cleanly;
    anything else (but user_canceled) ended the connection."""

    description: AlertDescription


@dataclass(frozen=True, slots=True)
class ConnectionFailed:
    """The connection is over because of ``description``: sent by us when
    ``local``, received from the peer otherwise."""

    description: AlertDescription
    message: str
    local: bool


@dataclass(frozen=True, slots=True)
class SessionTicketReceived:
    """Client side: a ticket to resume with (pass it as ``session`` next time)."""

    session: ClientSession


@dataclass(frozen=True, slots=True)
class KeyUpdated:
    """The peer's sending key changed; ``ours`` tells whether ours did too."""

    ours: bool


Event = (
    SignatureRequired
    | HandshakeComplete
    | ApplicationData
    | AlertReceived
    | ConnectionFailed
    | SessionTicketReceived
    | KeyUpdated
)
