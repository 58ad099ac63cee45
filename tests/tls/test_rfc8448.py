"""Known-answer tests against RFC 8448's traces: key schedule, record
protection, codec round trips, and the server state machine with the RFC's
randomness injected."""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric import ec

sys.path.insert(0, str(Path(__file__).parent))

import rfc8448 as rfc
from tls_helpers import self_signed

from meshlet.tls.codec import HandshakeType, parse_message
from meshlet.tls.config import TlsConfig
from meshlet.tls.connection import TlsConnection
from meshlet.tls.crypto import TLS_AES_128_GCM_SHA256, Group, KeyExchange
from meshlet.tls.events import SignatureRequired
from meshlet.tls.keys_local import LocalKey
from meshlet.tls.keyschedule import (
    KeySchedule,
    Transcript,
    finished_verify_data,
    hkdf_expand_label,
    resumption_psk,
    traffic_key_and_iv,
    transcript_digest,
)
from meshlet.tls.record import ContentType, RecordCipher, RecordLayer
from meshlet.tls.tickets import TicketKeys, TicketState

SUITE = TLS_AES_128_GCM_SHA256
SHA256 = SUITE.hash


def digest(*messages: bytes) -> bytes:
    return transcript_digest(SHA256, b"".join(messages))


def scripted_random(*chunks: bytes) -> Callable[[int], bytes]:
    queue = list(chunks)

    def random(n: int) -> bytes:
        chunk = queue.pop(0)
        assert len(chunk) == n
        return chunk

    return random


# --------------------------------------------------------------------------- #
# Key schedule
# --------------------------------------------------------------------------- #


def test_x25519_exchange_matches_rfc() -> None:
    client = KeyExchange(Group.x25519, scripted_random(rfc.CLIENT_X25519_PRIVATE))
    server = KeyExchange(Group.x25519, scripted_random(rfc.SERVER_X25519_PRIVATE))
    assert client.exchange(server.public_bytes) == rfc.SHARED_SECRET
    assert server.exchange(client.public_bytes) == rfc.SHARED_SECRET


def test_full_handshake_key_schedule() -> None:
    schedule = KeySchedule(SUITE)
    assert schedule.early_secret == rfc.EARLY_SECRET
    schedule.advance(rfc.SHARED_SECRET)
    assert schedule.secret == rfc.HANDSHAKE_SECRET
    hello_hash = digest(rfc.CLIENT_HELLO, rfc.SERVER_HELLO)
    client_hs = schedule.derive(b"c hs traffic", hello_hash)
    server_hs = schedule.derive(b"s hs traffic", hello_hash)
    assert (client_hs, server_hs) == (rfc.CLIENT_HS_TRAFFIC, rfc.SERVER_HS_TRAFFIC)
    assert traffic_key_and_iv(SUITE, server_hs) == (rfc.SERVER_HS_KEY, rfc.SERVER_HS_IV)
    assert traffic_key_and_iv(SUITE, client_hs) == (rfc.CLIENT_HS_KEY, rfc.CLIENT_HS_IV)

    server_flight = (rfc.ENCRYPTED_EXTENSIONS, rfc.CERTIFICATE, rfc.CERTIFICATE_VERIFY)
    before_finished = digest(rfc.CLIENT_HELLO, rfc.SERVER_HELLO, *server_flight)
    assert finished_verify_data(SHA256, server_hs, before_finished) == rfc.SERVER_FINISHED[4:]

    schedule.advance()
    assert schedule.secret == rfc.MASTER_SECRET
    through_server_finished = digest(rfc.CLIENT_HELLO, rfc.SERVER_HELLO, *server_flight, rfc.SERVER_FINISHED)
    client_ap = schedule.derive(b"c ap traffic", through_server_finished)
    server_ap = schedule.derive(b"s ap traffic", through_server_finished)
    assert (client_ap, server_ap) == (rfc.CLIENT_AP_TRAFFIC, rfc.SERVER_AP_TRAFFIC)
    assert schedule.derive(b"exp master", through_server_finished) == rfc.EXPORTER_MASTER
    assert traffic_key_and_iv(SUITE, server_ap) == (rfc.SERVER_AP_KEY, rfc.SERVER_AP_IV)
    assert traffic_key_and_iv(SUITE, client_ap) == (rfc.CLIENT_AP_KEY, rfc.CLIENT_AP_IV)
    assert finished_verify_data(SHA256, client_hs, through_server_finished) == rfc.CLIENT_FINISHED[4:]

    full = digest(
        rfc.CLIENT_HELLO, rfc.SERVER_HELLO, *server_flight, rfc.SERVER_FINISHED, rfc.CLIENT_FINISHED
    )
    resumption_master = schedule.derive(b"res master", full)
    assert resumption_master == rfc.RESUMPTION_MASTER
    assert resumption_psk(SUITE, resumption_master, b"\x00\x00") == rfc.TICKET_PSK


def test_resumed_handshake_key_schedule_and_binder() -> None:
    schedule = KeySchedule(SUITE, rfc.TICKET_PSK)
    assert schedule.early_secret == rfc.RESUMED_EARLY_SECRET
    assert schedule.binder_key() == rfc.RESUMED_BINDER_KEY
    transcript = Transcript()
    assert transcript.digest(SHA256, rfc.RESUMED_CLIENT_HELLO_PREFIX) == rfc.RESUMED_BINDER_HASH
    binder_hash = digest(rfc.RESUMED_CLIENT_HELLO_PREFIX)
    assert finished_verify_data(SHA256, schedule.binder_key(), binder_hash) == rfc.RESUMED_BINDER
    assert (
        hkdf_expand_label(SHA256, rfc.RESUMED_BINDER_KEY, b"finished", b"", 32).hex().startswith("5588673e")
    )

    schedule.advance(rfc.RESUMED_SHARED_SECRET)
    assert schedule.secret == rfc.RESUMED_HANDSHAKE_SECRET
    hello_hash = digest(rfc.RESUMED_CLIENT_HELLO, rfc.RESUMED_SERVER_HELLO)
    assert schedule.derive(b"c hs traffic", hello_hash) == rfc.RESUMED_CLIENT_HS_TRAFFIC
    assert schedule.derive(b"s hs traffic", hello_hash) == rfc.RESUMED_SERVER_HS_TRAFFIC
    schedule.advance()
    assert schedule.secret == rfc.RESUMED_MASTER_SECRET
    through_finished = digest(
        rfc.RESUMED_CLIENT_HELLO,
        rfc.RESUMED_SERVER_HELLO,
        rfc.RESUMED_ENCRYPTED_EXTENSIONS,
        rfc.RESUMED_SERVER_FINISHED,
    )
    assert schedule.derive(b"c ap traffic", through_finished) == rfc.RESUMED_CLIENT_AP_TRAFFIC
    assert schedule.derive(b"s ap traffic", through_finished) == rfc.RESUMED_SERVER_AP_TRAFFIC


# --------------------------------------------------------------------------- #
# Record layer
# --------------------------------------------------------------------------- #

RECORDS = [
    (
        rfc.SERVER_HS_TRAFFIC,
        ContentType.handshake,
        rfc.ENCRYPTED_EXTENSIONS + rfc.CERTIFICATE + rfc.CERTIFICATE_VERIFY + rfc.SERVER_FINISHED,
        rfc.SERVER_FLIGHT_RECORD,
    ),
    (rfc.CLIENT_HS_TRAFFIC, ContentType.handshake, rfc.CLIENT_FINISHED, rfc.CLIENT_FINISHED_RECORD),
    (
        rfc.RESUMED_SERVER_HS_TRAFFIC,
        ContentType.handshake,
        rfc.RESUMED_ENCRYPTED_EXTENSIONS + rfc.RESUMED_SERVER_FINISHED,
        rfc.RESUMED_SERVER_FLIGHT_RECORD,
    ),
]


@pytest.mark.parametrize(("secret", "content_type", "plaintext", "record"), RECORDS)
def test_record_protection_matches_rfc(
    secret: bytes, content_type: int, plaintext: bytes, record: bytes
) -> None:
    assert RecordCipher(SUITE, secret).seal(content_type, plaintext) == record
    assert RecordCipher(SUITE, secret).open(record[:5], record[5:]) == (content_type, plaintext)


def test_record_sequence_numbers_match_rfc() -> None:
    """After the NewSessionTicket (server seq 0) comes application data (seq 1)
    and the close_notify alert (seq 2), all under the application secrets."""
    server = RecordCipher(SUITE, rfc.SERVER_AP_TRAFFIC)
    assert server.seal(ContentType.handshake, rfc.NEW_SESSION_TICKET) == rfc.TICKET_RECORD
    assert server.seal(ContentType.application_data, rfc.APPLICATION_PAYLOAD) == rfc.SERVER_APPLICATION_RECORD
    assert server.seal(ContentType.alert, b"\x01\x00") == rfc.SERVER_ALERT_RECORD
    client = RecordCipher(SUITE, rfc.CLIENT_AP_TRAFFIC)
    assert client.seal(ContentType.application_data, rfc.APPLICATION_PAYLOAD) == rfc.CLIENT_APPLICATION_RECORD
    assert client.seal(ContentType.alert, b"\x01\x00") == rfc.CLIENT_ALERT_RECORD


def test_record_layer_reads_rfc_records_split_anywhere() -> None:
    stream = rfc.TICKET_RECORD + rfc.SERVER_APPLICATION_RECORD + rfc.SERVER_ALERT_RECORD
    for cut in range(0, len(stream), 7):
        layer = RecordLayer()
        layer.set_read_secret(SUITE, rfc.SERVER_AP_TRAFFIC)
        got = []
        for piece in (stream[:cut], stream[cut:]):
            layer.feed(piece)
            while (record := layer.next_record()) is not None:
                got.append(record)
        assert got == [
            (ContentType.handshake, rfc.NEW_SESSION_TICKET),
            (ContentType.application_data, rfc.APPLICATION_PAYLOAD),
            (ContentType.alert, b"\x01\x00"),
        ]


# --------------------------------------------------------------------------- #
# Codec round trips
# --------------------------------------------------------------------------- #

MESSAGES = [
    rfc.CLIENT_HELLO,
    rfc.SERVER_HELLO,
    rfc.ENCRYPTED_EXTENSIONS,
    rfc.CERTIFICATE,
    rfc.CERTIFICATE_VERIFY,
    rfc.SERVER_FINISHED,
    rfc.CLIENT_FINISHED,
    rfc.NEW_SESSION_TICKET,
    rfc.RESUMED_CLIENT_HELLO,
    rfc.RESUMED_SERVER_HELLO,
    rfc.RESUMED_ENCRYPTED_EXTENSIONS,
]


@pytest.mark.parametrize("raw", MESSAGES, ids=lambda raw: HandshakeType(raw[0]).name)
def test_codec_round_trips_rfc_messages(raw: bytes) -> None:
    assert int.from_bytes(raw[1:4], "big") == len(raw) - 4
    message = parse_message(raw[0], raw[4:])
    assert message.serialize() == raw  # type: ignore[union-attr]


# --------------------------------------------------------------------------- #
# The server state machine replays the RFC with its randomness injected
# --------------------------------------------------------------------------- #


def _server_config(random: Callable[[int], bytes], **kwargs: object) -> TlsConfig:
    key = ec.generate_private_key(ec.SECP256R1())
    chain, _ = self_signed(key)
    return TlsConfig(
        certificate_chain=chain,
        key=LocalKey(key),
        random=random,
        clock=lambda: 1_000_000.0,
        **kwargs,  # type: ignore[arg-type]
    )


def _plaintext_record(message: bytes) -> bytes:
    return b"\x16\x03\x01" + len(message).to_bytes(2, "big") + message


def test_server_replays_rfc_server_hello_and_secrets() -> None:
    config = _server_config(scripted_random(rfc.SERVER_X25519_PRIVATE, rfc.SERVER_RANDOM))
    server = TlsConnection(config, client=False)
    events = server.receive_data(_plaintext_record(rfc.CLIENT_HELLO))
    assert [type(e) for e in events] == [SignatureRequired]
    out = server.data_to_send()
    assert out[:5] == b"\x16\x03\x03\x00\x5a"  # RFC 8448: 16 03 03 00 5a
    assert out[5 : 5 + len(rfc.SERVER_HELLO)] == rfc.SERVER_HELLO
    assert server.machine.handshake_secrets == (rfc.CLIENT_HS_TRAFFIC, rfc.SERVER_HS_TRAFFIC)
    assert server.machine.schedule is not None and server.machine.schedule.secret == rfc.HANDSHAKE_SECRET


class _RfcTicketKeys(TicketKeys):
    """Opens the RFC's opaque ticket into the state RFC 8448's server kept."""

    def unseal(self, ticket: bytes) -> TicketState | None:
        if ticket != rfc.NEW_SESSION_TICKET[17 : 17 + 0xB2]:
            return None
        return TicketState(0x1301, rfc.TICKET_PSK, 1_000_000_000 - 5000, 0, 30, "", "server", ())


def test_server_replays_rfc_resumption() -> None:
    assert rfc.NEW_SESSION_TICKET[15:17] == b"\x00\xb2"
    config = _server_config(
        scripted_random(rfc.RESUMED_SERVER_X25519_PRIVATE, rfc.RESUMED_SERVER_RANDOM),
        ticket_keys=_RfcTicketKeys(lifetime=30),
    )
    server = TlsConnection(config, client=False)
    events = server.receive_data(_plaintext_record(rfc.RESUMED_CLIENT_HELLO))
    assert events == []  # no signature: a resumed handshake is authenticated by the PSK
    out = server.data_to_send()
    assert out[5 : 5 + len(rfc.RESUMED_SERVER_HELLO)] == rfc.RESUMED_SERVER_HELLO
    assert server.resumed
    assert server.machine.handshake_secrets == (rfc.RESUMED_CLIENT_HS_TRAFFIC, rfc.RESUMED_SERVER_HS_TRAFFIC)


def test_client_replays_rfc_handshake_byte_for_byte() -> None:
    """Our client, with the RFC's randomness, decrypts the RFC's server flight
    and answers with the RFC's client Finished record, then derives the RFC's
    ticket PSK. Our own ClientHello differs from the RFC's in extensions we do
    not offer (ffdhe groups, renegotiation_info, session_ticket), so the RFC's
    hello stands in for ours in the transcript."""
    config = TlsConfig(
        random=scripted_random(rfc.CLIENT_HELLO[6:38], rfc.CLIENT_X25519_PRIVATE),
        middlebox_compat=False,
        record_size_limit=0x4001,
    )
    client = TlsConnection(config, client=True, server_name="server")
    ours = client.data_to_send()
    assert ours[5:][6:38] == rfc.CLIENT_HELLO[6:38]  # same random
    # Same key share as the RFC's client.
    assert rfc.CLIENT_HELLO[109:141] in ours
    client.machine.transcript._messages[0] = rfc.CLIENT_HELLO  # type: ignore[attr-defined]

    events = client.receive_data(_plaintext_record(rfc.SERVER_HELLO) + rfc.SERVER_FLIGHT_RECORD)
    assert [type(e).__name__ for e in events] == ["HandshakeComplete"]
    assert client.machine.handshake_secrets == (rfc.CLIENT_HS_TRAFFIC, rfc.SERVER_HS_TRAFFIC)
    assert client.machine.application_secrets == (rfc.CLIENT_AP_TRAFFIC, rfc.SERVER_AP_TRAFFIC)
    assert client.data_to_send() == rfc.CLIENT_FINISHED_RECORD
    assert client.machine.resumption_master_secret == rfc.RESUMPTION_MASTER

    (ticket,) = client.receive_data(rfc.TICKET_RECORD)
    assert ticket.session.psk == rfc.TICKET_PSK  # type: ignore[union-attr]
    client.send_application_data(rfc.APPLICATION_PAYLOAD)
    assert client.data_to_send() == rfc.CLIENT_APPLICATION_RECORD
    assert client.receive_data(rfc.SERVER_APPLICATION_RECORD)[0].data == rfc.APPLICATION_PAYLOAD  # type: ignore[union-attr]
    client.close()
    assert client.data_to_send() == rfc.CLIENT_ALERT_RECORD
