"""Property tests: no input makes the codec or the state machine raise
anything but a TLS alert, and any split of a valid flight parses the same."""

from __future__ import annotations

import random
import sys
from collections.abc import Callable
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric import ec
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

sys.path.insert(0, str(Path(__file__).parent))

import itertools

import rfc8448 as rfc
from tls_helpers import self_signed

from meshlet.tls.alerts import (
    AlertDescription,
    TlsAlertError,
)
from meshlet.tls.codec import PARSERS, HandshakeBuffer, parse_message
from meshlet.tls.config import TlsConfig
from meshlet.tls.connection import TlsConnection
from meshlet.tls.events import ConnectionFailed, Event, HandshakeComplete, SignatureRequired
from meshlet.tls.keys_local import LocalKey

FAST = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])

_KEY = ec.generate_private_key(ec.SECP256R1())
_CHAIN, _ = self_signed(_KEY)
_LOCAL = LocalKey(_KEY)


def seeded(seed: int) -> Callable[[int], bytes]:
    rng = random.Random(seed)
    return rng.randbytes


def server_config(seed: int = 1) -> TlsConfig:
    return TlsConfig(certificate_chain=_CHAIN, key=_LOCAL, random=seeded(seed), clock=lambda: 1_800_000_000.0)


def client_config(seed: int = 2) -> TlsConfig:
    return TlsConfig(random=seeded(seed), clock=lambda: 1_800_000_000.0)


def drive(conn: TlsConnection, data: bytes) -> list[Event]:
    events = conn.receive_data(data)
    out = list(events)
    for event in events:
        if isinstance(event, SignatureRequired) and not conn.closed:
            out += conn.provide_signature(_LOCAL.sign_now(event.scheme, event.data))
    return out


def assert_no_internal_error(events: list[Event]) -> None:
    for event in events:
        if isinstance(event, ConnectionFailed):
            assert event.description != AlertDescription.internal_error, event.message


# --------------------------------------------------------------------------- #
# Codec
# --------------------------------------------------------------------------- #


@FAST
@given(st.sampled_from(sorted(PARSERS)), st.binary(max_size=600))
def test_parsers_raise_only_alerts(msg_type: int, body: bytes) -> None:
    try:
        message = parse_message(msg_type, body)
    except TlsAlertError:
        return
    # What parses must serialize back to the same bytes.
    if not isinstance(message, bytes):
        assert message.serialize()[4:] == body


RFC_MESSAGES = [
    rfc.CLIENT_HELLO,
    rfc.SERVER_HELLO,
    rfc.ENCRYPTED_EXTENSIONS,
    rfc.CERTIFICATE,
    rfc.CERTIFICATE_VERIFY,
]


def _mutated(data: st.DataObject, original: bytes, most: int) -> bytes:
    """``original`` with 1 to ``most`` bytes overwritten at drawn positions."""
    mutated = bytearray(original)
    for _ in range(data.draw(st.integers(1, most))):
        index = data.draw(st.integers(0, len(mutated) - 1))
        mutated[index] = data.draw(st.integers(0, 255))
    return bytes(mutated)


@FAST
@given(st.sampled_from(RFC_MESSAGES), st.data())
def test_mutated_rfc_messages_raise_only_alerts(raw: bytes, data: st.DataObject) -> None:
    try:
        parse_message(raw[0], _mutated(data, raw[4:], 4))
    except TlsAlertError:
        pass


@FAST
@given(st.lists(st.integers(0, len(rfc.CLIENT_HELLO) * 3), max_size=8))
def test_any_split_of_messages_reassembles_the_same(cuts: list[int]) -> None:
    stream = rfc.CLIENT_HELLO + rfc.SERVER_HELLO + rfc.ENCRYPTED_EXTENSIONS
    buffer = HandshakeBuffer()
    got = []
    points = sorted({0, len(stream), *(c % (len(stream) + 1) for c in cuts)})
    for start, end in itertools.pairwise(points):
        buffer.feed(stream[start:end])
        while (message := buffer.next_message()) is not None:
            got.append(message[2])
    assert got == [rfc.CLIENT_HELLO, rfc.SERVER_HELLO, rfc.ENCRYPTED_EXTENSIONS]


# --------------------------------------------------------------------------- #
# State machine
# --------------------------------------------------------------------------- #


@FAST
@given(st.binary(max_size=2000))
def test_server_survives_any_bytes(data: bytes) -> None:
    conn = TlsConnection(server_config(), client=False)
    assert_no_internal_error(drive(conn, data))


@FAST
@given(st.binary(max_size=2000))
def test_client_survives_any_bytes(data: bytes) -> None:
    conn = TlsConnection(client_config(), client=True, server_name="localhost")
    conn.data_to_send()
    assert_no_internal_error(drive(conn, data))


def _client_hello_record() -> bytes:
    return TlsConnection(client_config(), client=True, server_name="localhost").data_to_send()


CLIENT_FLIGHT = _client_hello_record()


@FAST
@given(st.data())
def test_server_survives_mutated_client_hello(data: st.DataObject) -> None:
    mutated = _mutated(data, CLIENT_FLIGHT, 6)
    conn = TlsConnection(server_config(), client=False)
    assert_no_internal_error(drive(conn, mutated))


def _server_flight() -> bytes:
    """The full server flight answering the seeded client's hello."""
    server = TlsConnection(server_config(), client=False)
    drive(server, CLIENT_FLIGHT)
    return server.data_to_send()


SERVER_FLIGHT = _server_flight()


def _client_outcome(pieces: list[bytes]) -> tuple[list[str], bytes]:
    conn = TlsConnection(client_config(), client=True, server_name="localhost")
    conn.data_to_send()
    events: list[Event] = []
    for piece in pieces:
        events += drive(conn, piece)
    names = [type(e).__name__ for e in events]
    return names, conn.data_to_send()


EXPECTED = _client_outcome([SERVER_FLIGHT])


def test_server_flight_completes_the_handshake() -> None:
    names, finished = EXPECTED
    assert names == [HandshakeComplete.__name__]
    assert finished


@FAST
@given(st.lists(st.integers(0, len(SERVER_FLIGHT)), max_size=12))
def test_every_split_of_the_server_flight_parses_the_same(cuts: list[int]) -> None:
    points = sorted({0, len(SERVER_FLIGHT), *cuts})
    pieces = [SERVER_FLIGHT[a:b] for a, b in itertools.pairwise(points)]
    assert _client_outcome(pieces) == EXPECTED


@FAST
@given(st.data())
def test_client_survives_mutated_server_flight(data: st.DataObject) -> None:
    mutated = _mutated(data, SERVER_FLIGHT, 4)
    conn = TlsConnection(client_config(), client=True, server_name="localhost")
    conn.data_to_send()
    assert_no_internal_error(drive(conn, mutated))


@FAST
@given(st.binary(min_size=0, max_size=40), st.sampled_from([1, 2]))
def test_hellos_without_extensions_round_trip(tail: bytes, msg_type: int) -> None:
    if msg_type == 1:
        body = b"\x03\x03" + b"\x01" * 32 + b"\x00" + b"\x00\x02\x13\x01" + b"\x01\x00"
    else:
        body = b"\x03\x03" + b"\x01" * 32 + b"\x00" + b"\x13\x01" + b"\x00"
    try:
        message = parse_message(msg_type, body + tail)
    except TlsAlertError:
        return
    assert not isinstance(message, bytes)
    assert message.serialize()[4:] == body + tail
