"""Sans-IO behaviour of ``TlsConnection`` pairs in memory: close_notify,
KeyUpdate, record size limits and padding, tickets and their rotation."""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from tls_helpers import Leaf, MiniPki, pump

from meshlet.tls.alerts import AlertDescription
from meshlet.tls.config import TlsConfig
from meshlet.tls.connection import TlsConnection, TlsStateError
from meshlet.tls.events import (
    AlertReceived,
    ApplicationData,
    ConnectionFailed,
    HandshakeComplete,
    KeyUpdated,
    SessionTicketReceived,
)
from meshlet.tls.tickets import ClientSession, TicketKeys


class Clock:
    def __init__(self, now: float = 1_800_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def pki(tmp_path: Path) -> MiniPki:
    return MiniPki.create(tmp_path)


@pytest.fixture
def leaf(pki: MiniPki) -> Leaf:
    return pki.issue("server")


def _pair(
    leaf: Leaf,
    *,
    server: dict[str, object] | None = None,
    client: dict[str, object] | None = None,
    **kw: object,
) -> tuple[TlsConnection, TlsConnection, list[tuple[str, object]]]:
    s = TlsConnection(
        TlsConfig(certificate_chain=leaf.chain, key=leaf.local_key, **(server or {})),  # type: ignore[arg-type]
        client=False,
    )
    c = TlsConnection(TlsConfig(**(client or {})), client=True, server_name="localhost", **kw)  # type: ignore[arg-type]
    events = pump(c, s, [leaf.local_key])
    assert c.handshake_complete and s.handshake_complete, events
    return c, s, events  # type: ignore[return-value]


def test_close_notify_half_close(leaf: Leaf) -> None:
    client, server, _ = _pair(leaf)
    client.close()
    assert server.receive_data(client.data_to_send()) == [AlertReceived(AlertDescription.close_notify)]
    assert server.peer_closed and not server.closed
    with pytest.raises(TlsStateError):
        client.send_application_data(b"late")
    server.send_application_data(b"still open")
    assert client.receive_data(server.data_to_send()) == [ApplicationData(b"still open")]
    server.close()
    assert client.receive_data(server.data_to_send()) == [AlertReceived(AlertDescription.close_notify)]


def test_key_update_both_ways(leaf: Leaf) -> None:
    client, server, _ = _pair(leaf)
    before = client.machine.application_secrets
    client.update_key(request_peer=True)
    client.send_application_data(b"after client update")
    events = server.receive_data(client.data_to_send())
    assert events == [KeyUpdated(ours=True), ApplicationData(b"after client update")]
    server.send_application_data(b"after server update")
    assert client.receive_data(server.data_to_send()) == [
        KeyUpdated(ours=False),
        ApplicationData(b"after server update"),
    ]
    after = client.machine.application_secrets
    assert before[0] != after[0] and before[1] != after[1]
    assert server.machine.application_secrets == after


def test_peer_record_size_limit_is_honoured(leaf: Leaf) -> None:
    client, server, _ = _pair(leaf, client={"record_size_limit": 512})
    server.send_application_data(b"x" * 5000)
    wire = server.data_to_send()
    lengths = _record_lengths(wire)
    assert max(lengths) <= 512 + 16  # inner plaintext <= limit, plus the AEAD tag
    assert len(lengths) == 10
    assert (
        b"".join(e.data for e in client.receive_data(wire) if isinstance(e, ApplicationData)) == b"x" * 5000
    )


def test_padding_to_a_block(leaf: Leaf) -> None:
    client, server, _ = _pair(leaf, server={"padding_block": 256})
    for size in (1, 255, 256, 1000):
        server.send_application_data(b"p" * size)
        wire = server.data_to_send()
        (length,) = _record_lengths(wire)
        assert (length - 16) % 256 == 0
        assert client.receive_data(wire) == [ApplicationData(b"p" * size)]


def _record_lengths(wire: bytes) -> list[int]:
    lengths, pos = [], 0
    while pos < len(wire):
        length = int.from_bytes(wire[pos + 3 : pos + 5], "big")
        lengths.append(length)
        pos += 5 + length
    return lengths


def _ticket(events: list[tuple[str, object]]) -> ClientSession:
    return next(e.session for _, e in events if isinstance(e, SessionTicketReceived))


def test_resumption_needs_no_signature_and_keeps_the_peer(leaf: Leaf) -> None:
    keys = TicketKeys()
    _, _, events = _pair(leaf, server={"ticket_keys": keys})
    session = _ticket(events)
    client, server, resumed_events = _pair(leaf, server={"ticket_keys": keys}, session=session)
    assert client.resumed and server.resumed
    assert not any(type(e).__name__ == "SignatureRequired" for _, e in resumed_events)
    complete = next(e for side, e in resumed_events if side == "client" and isinstance(e, HandshakeComplete))
    assert complete.peer_chain == leaf.chain


def test_expired_ticket_falls_back_to_a_full_handshake(leaf: Leaf) -> None:
    clock = Clock()
    keys = TicketKeys(lifetime=60, rotation_interval=30, clock=clock)
    config = {"ticket_keys": keys, "clock": clock}
    _, _, events = _pair(leaf, server=config, client={"clock": clock})
    session = _ticket(events)
    clock.now += 61
    stale = dataclasses.replace(session, received_at=clock.now - 1)  # the client still believes in it
    client, server, _ = _pair(leaf, server=config, client={"clock": clock}, session=stale)
    assert not client.resumed and not server.resumed


def test_rotated_out_key_falls_back_to_a_full_handshake(leaf: Leaf) -> None:
    clock = Clock()
    keys = TicketKeys(lifetime=60, rotation_interval=10, clock=clock)
    _, _, events = _pair(leaf, server={"ticket_keys": keys, "clock": clock}, client={"clock": clock})
    session = _ticket(events)
    clock.now += 5
    keys.rotate()  # a newer key seals, the old one still opens
    client, _, events = _pair(
        leaf, server={"ticket_keys": keys, "clock": clock}, client={"clock": clock}, session=session
    )
    assert client.resumed
    clock.now += 100
    keys.rotate()  # now the first key is past rotation + lifetime: dropped
    fresh = dataclasses.replace(session, received_at=clock.now)
    client, _, _ = _pair(
        leaf, server={"ticket_keys": keys, "clock": clock}, client={"clock": clock}, session=fresh
    )
    assert not client.resumed


def test_wrong_binder_is_decrypt_error(leaf: Leaf) -> None:
    keys = TicketKeys()
    _, _, events = _pair(leaf, server={"ticket_keys": keys})
    forged = dataclasses.replace(_ticket(events), psk=b"\x00" * 32)
    server = TlsConnection(
        TlsConfig(certificate_chain=leaf.chain, key=leaf.local_key, ticket_keys=keys), client=False
    )
    client = TlsConnection(TlsConfig(), client=True, server_name="localhost", session=forged)
    events = server.receive_data(client.data_to_send())
    assert events == [
        ConnectionFailed(AlertDescription.decrypt_error, "PSK binder does not match", local=True)
    ]


def test_ticket_for_another_server_name_is_not_used(leaf: Leaf) -> None:
    keys = TicketKeys()
    _, _, events = _pair(leaf, server={"ticket_keys": keys})
    session = _ticket(events)
    server = TlsConnection(
        TlsConfig(certificate_chain=leaf.chain, key=leaf.local_key, ticket_keys=keys), client=False
    )
    client = TlsConnection(TlsConfig(), client=True, server_name="other.local", session=session)
    pump(client, server, [leaf.local_key])
    assert client.handshake_complete and not client.resumed


def test_tickets_are_opaque_and_authenticated() -> None:
    keys = TicketKeys()
    from meshlet.tls.tickets import TicketState

    state = TicketState(0x1301, b"k" * 32, 1, 2, 3, "h2", "localhost", (b"cert",))
    sealed = keys.seal(state)
    assert b"k" * 32 not in sealed and b"localhost" not in sealed
    assert keys.unseal(sealed) == state
    tampered = sealed[:-1] + bytes((sealed[-1] ^ 1,))
    assert keys.unseal(tampered) is None
    assert TicketKeys().unseal(sealed) is None
