"""Each malformed or out-of-order input gets the RFC 8446 alert, the
connection closes, and no exception escapes."""

from __future__ import annotations

import datetime
import sys
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes

sys.path.insert(0, str(Path(__file__).parent))

from tls_helpers import MiniPki, pump

from meshlet.identity.spiffe import SpiffeIdMatcher
from meshlet.tls.alerts import AlertDescription
from meshlet.tls.codec import (
    HRR_RANDOM,
    ClientHello,
    EncryptedExtensions,
    ExtensionType,
    Finished,
    HandshakeType,
    ServerHello,
    encode_key_share_client,
    encode_supported_versions_client,
    encode_u16_list,
    u16,
)
from meshlet.tls.config import TlsConfig
from meshlet.tls.connection import TlsConnection
from meshlet.tls.crypto import Group
from meshlet.tls.events import AlertReceived, ConnectionFailed, Event
from meshlet.tls.verify import PeerRole

A = AlertDescription


@pytest.fixture
def pki(tmp_path: Path) -> MiniPki:
    return MiniPki.create(tmp_path)


def _record(content_type: int, payload: bytes) -> bytes:
    return bytes((content_type, 3, 3)) + len(payload).to_bytes(2, "big") + payload


def _handshake(message: bytes) -> bytes:
    return _record(22, message)


def _failure(events: list[Event]) -> ConnectionFailed:
    failures = [e for e in events if isinstance(e, ConnectionFailed)]
    assert failures, f"no failure in {events}"
    return failures[0]


def _sent_alert(conn: TlsConnection) -> bytes:
    """The last record we queued: a plaintext fatal alert."""
    return conn.data_to_send()[-7:]


def _server(pki: MiniPki, **kwargs: object) -> tuple[TlsConnection, list]:
    leaf = pki.issue("server")
    config = TlsConfig(certificate_chain=leaf.chain, key=leaf.local_key, **kwargs)  # type: ignore[arg-type]
    return TlsConnection(config, client=False), [leaf.local_key]


def _client(pki: MiniPki, **kwargs: object) -> TlsConnection:
    config = TlsConfig(verifier=pki.policy(PeerRole.SERVER).verify, **kwargs)  # type: ignore[arg-type]
    return TlsConnection(config, client=True, server_name="localhost")


def _hello(extensions: tuple[tuple[int, bytes], ...], suites: tuple[int, ...] = (0x1301,)) -> bytes:
    return ClientHello(b"\x11" * 32, b"", suites, b"\x00", extensions).serialize()


def _tls13_extensions(*extra: tuple[int, bytes]) -> tuple[tuple[int, bytes], ...]:
    from meshlet.tls.codec import KeyShareEntry

    return (
        (ExtensionType.supported_versions, encode_supported_versions_client([0x0304])),
        (ExtensionType.supported_groups, encode_u16_list([Group.x25519])),
        (ExtensionType.key_share, encode_key_share_client([KeyShareEntry(Group.x25519, b"\x09" * 32)])),
        (ExtensionType.signature_algorithms, encode_u16_list([0x0403])),
        *extra,
    )


# --------------------------------------------------------------------------- #
# Server side: what a client may get wrong
# --------------------------------------------------------------------------- #


def test_client_offering_only_tls12_gets_protocol_version(pki: MiniPki) -> None:
    server, _ = _server(pki)
    hello = _hello(((ExtensionType.supported_groups, encode_u16_list([Group.x25519])),))
    failure = _failure(server.receive_data(_handshake(hello)))
    assert failure.description == A.protocol_version and failure.local
    assert _sent_alert(server) == _record(21, bytes((2, A.protocol_version)))
    assert server.closed


@pytest.mark.parametrize(
    ("message", "alert"),
    [
        (Finished(b"\x00" * 32).serialize(), A.unexpected_message),
        (bytes((HandshakeType.end_of_early_data, 0, 0, 0)), A.unexpected_message),
        (bytes((99, 0, 0, 0)), A.unexpected_message),
        (_hello(())[:40], A.decode_error),  # length field says more than is there
    ],
    ids=["finished-first", "end-of-early-data", "unknown-type", "truncated"],
)
def test_server_refuses_out_of_order_or_malformed_first_message(
    pki: MiniPki, message: bytes, alert: AlertDescription
) -> None:
    server, _ = _server(pki)
    if alert is A.decode_error:
        message = message[:1] + (len(message) - 4).to_bytes(3, "big") + message[4:]
        message = message[:-3]  # body shorter than the fields it declares
        message = message[:1] + (len(message) - 4).to_bytes(3, "big") + message[4:]
    assert _failure(server.receive_data(_handshake(message))).description == alert


@pytest.mark.parametrize(
    ("extensions", "compression", "alert"),
    [
        (_tls13_extensions(), b"\x00\x01", A.illegal_parameter),
        (_tls13_extensions()[:1] + _tls13_extensions()[3:], b"\x00", A.missing_extension),
        (
            (*_tls13_extensions((ExtensionType.pre_shared_key, b"")), (ExtensionType.padding, b"")),
            b"\x00",
            A.illegal_parameter,
        ),
        (_tls13_extensions()[:3], b"\x00", A.missing_extension),
    ],
    ids=["compression", "no-key-share", "psk-not-last", "no-signature-algorithms"],
)
def test_server_refuses_bad_client_hello(
    pki: MiniPki, extensions: tuple[tuple[int, bytes], ...], compression: bytes, alert: AlertDescription
) -> None:
    server, _ = _server(pki)
    hello = ClientHello(b"\x11" * 32, b"", (0x1301,), compression, extensions).serialize()
    assert _failure(server.receive_data(_handshake(hello))).description == alert


def test_duplicate_extension_is_illegal_parameter(pki: MiniPki) -> None:
    server, _ = _server(pki)
    ext = _tls13_extensions()
    hello = _hello((*ext, ext[0]))
    assert _failure(server.receive_data(_handshake(hello))).description == A.illegal_parameter


def test_no_common_alpn_is_no_application_protocol(pki: MiniPki) -> None:
    server, keys = _server(pki, alpn_protocols=("h2",))
    client = _client(pki, alpn_protocols=("http/1.1",))
    events = pump(client, server, keys)
    assert ("server", ConnectionFailed(A.no_application_protocol, "no common ALPN protocol", True)) in events
    assert ("client", AlertReceived(A.no_application_protocol)) in events


def test_oversized_plaintext_record_is_record_overflow(pki: MiniPki) -> None:
    server, _ = _server(pki)
    record = b"\x16\x03\x03" + (1 << 14 | 1).to_bytes(2, "big")
    assert _failure(server.receive_data(record)).description == A.record_overflow


def test_oversized_encrypted_record_is_record_overflow(pki: MiniPki) -> None:
    server, keys = _server(pki)
    client = _client(pki)
    pump(client, server, keys)
    assert server.handshake_complete
    record = b"\x17\x03\x03" + ((1 << 14) + 257).to_bytes(2, "big")
    assert _failure(server.receive_data(record)).description == A.record_overflow


def test_tampered_record_is_bad_record_mac(pki: MiniPki) -> None:
    server, keys = _server(pki)
    client = _client(pki)
    pump(client, server, keys)
    client.send_application_data(b"hello")
    data = bytearray(client.data_to_send())
    data[-1] ^= 1
    assert _failure(server.receive_data(bytes(data))).description == A.bad_record_mac


def test_application_data_before_handshake_is_unexpected(pki: MiniPki) -> None:
    server, _ = _server(pki)
    assert _failure(server.receive_data(_record(23, b"x" * 40))).description == A.unexpected_message


def test_change_cipher_spec_after_handshake_is_unexpected(pki: MiniPki) -> None:
    server, keys = _server(pki)
    client = _client(pki)
    pump(client, server, keys)
    assert _failure(server.receive_data(_record(20, b"\x01"))).description == A.unexpected_message


def test_malformed_alert_is_decode_error(pki: MiniPki) -> None:
    server, _ = _server(pki)
    assert _failure(server.receive_data(_record(21, b"\x02"))).description == A.decode_error


def test_fatal_alert_from_peer_closes_without_reply(pki: MiniPki) -> None:
    server, _ = _server(pki)
    events = server.receive_data(_record(21, bytes((2, A.handshake_failure))))
    assert events == [
        AlertReceived(A.handshake_failure),
        ConnectionFailed(A.handshake_failure, "alert from peer", local=False),
    ]
    assert server.closed and server.data_to_send() == b""


def test_missing_client_certificate_is_certificate_required(pki: MiniPki) -> None:
    server, keys = _server(pki, require_client_certificate=True)
    client = _client(pki)
    events = pump(client, server, keys)
    assert any(
        side == "server" and e == ConnectionFailed(A.certificate_required, "client sent no certificate", True)
        for side, e in events
    )


# --------------------------------------------------------------------------- #
# Client side: what a server may get wrong
# --------------------------------------------------------------------------- #


def _server_hello(
    client: TlsConnection, *extensions: tuple[int, bytes], random: bytes = b"\x22" * 32
) -> bytes:
    session_id = client.machine._session_id  # type: ignore[attr-defined]
    return ServerHello(random, session_id, 0x1301, tuple(extensions)).serialize()


def _retry_request(client: TlsConnection, group: int) -> bytes:
    """A HelloRetryRequest asking the client for a key share in ``group``."""
    return _server_hello(
        client,
        (ExtensionType.supported_versions, u16(0x0304)),
        (ExtensionType.key_share, u16(group)),
        random=HRR_RANDOM,
    )


def test_tls12_server_hello_is_protocol_version(pki: MiniPki) -> None:
    client = _client(pki)
    client.data_to_send()
    assert _failure(client.receive_data(_handshake(_server_hello(client)))).description == A.protocol_version


@pytest.mark.parametrize("sentinel", [b"DOWNGRD\x01", b"DOWNGRD\x00"])
def test_downgrade_sentinel_is_illegal_parameter(pki: MiniPki, sentinel: bytes) -> None:
    client = _client(pki)
    client.data_to_send()
    hello = _server_hello(client, random=b"\x22" * 24 + sentinel)
    failure = _failure(client.receive_data(_handshake(hello)))
    assert failure.description == A.illegal_parameter
    assert "downgrade" in failure.message


def test_second_hello_retry_request_is_unexpected(pki: MiniPki) -> None:
    client = _client(pki)
    client.data_to_send()
    retry = _retry_request(client, Group.secp256r1)
    assert client.receive_data(_handshake(retry)) == []
    assert client.data_to_send()  # ClientHello 2
    retry2 = _retry_request(client, Group.secp384r1)
    assert _failure(client.receive_data(_handshake(retry2))).description == A.unexpected_message


def test_retry_for_a_group_already_shared_is_illegal(pki: MiniPki) -> None:
    client = _client(pki)
    client.data_to_send()
    retry = _retry_request(client, Group.x25519)
    assert _failure(client.receive_data(_handshake(retry))).description == A.illegal_parameter


def test_unsolicited_extension_in_server_hello_is_unsupported_extension(pki: MiniPki) -> None:
    client = _client(pki)
    client.data_to_send()
    hello = _server_hello(client, (ExtensionType.supported_versions, u16(0x0304)), (0xFF00, b""))
    assert _failure(client.receive_data(_handshake(hello))).description == A.unsupported_extension


def test_plaintext_encrypted_extensions_is_unexpected(pki: MiniPki) -> None:
    client = _client(pki)
    client.data_to_send()
    message = EncryptedExtensions(()).serialize()
    assert _failure(client.receive_data(_handshake(message))).description == A.unexpected_message


def test_unsolicited_extension_in_encrypted_extensions(pki: MiniPki) -> None:
    server, keys = _server(pki)
    client = _client(pki)
    machine = server.machine

    def with_unknown_extension(hello: ClientHello) -> None:
        machine._send(EncryptedExtensions(((0xFF01, b"\x00"), (0x7777, b"x"))).serialize())

    machine._send_encrypted_extensions = with_unknown_extension  # type: ignore[attr-defined]
    events = pump(client, server, keys)
    failure = next(e for side, e in events if side == "client" and isinstance(e, ConnectionFailed))
    assert failure.description == A.unsupported_extension
    assert ("server", AlertReceived(A.unsupported_extension)) in events


def test_bad_finished_is_decrypt_error(pki: MiniPki) -> None:
    server, keys = _server(pki)
    client = _client(pki)
    (request,) = server.receive_data(client.data_to_send())  # paused on the signature now
    client_secret, _ = server.machine.handshake_secrets
    # The server's Finished will be computed from the wrong base key.
    server.machine.handshake_secrets = (client_secret, b"\x00" * 32)
    server.provide_signature(keys[0].sign_now(request.scheme, request.data))  # type: ignore[union-attr]
    events = pump(client, server, keys)
    failure = next(e for side, e in events if side == "client" and isinstance(e, ConnectionFailed))
    assert failure.description == A.decrypt_error
    assert ("server", AlertReceived(A.decrypt_error)) in events


def test_bad_certificate_verify_is_decrypt_error(pki: MiniPki) -> None:
    server, keys = _server(pki)
    client = _client(pki)
    events = server.receive_data(client.data_to_send())
    (request,) = events
    server.provide_signature(keys[0].sign_now(request.scheme, request.data + b"tampered"))  # type: ignore[union-attr]
    failure = _failure(client.receive_data(server.data_to_send()))
    assert failure.description == A.decrypt_error


def _run_with_server_leaf(pki: MiniPki, leaf_kwargs: dict[str, object], **policy: object) -> ConnectionFailed:
    leaf = pki.issue("server", **leaf_kwargs)  # type: ignore[arg-type]
    server = TlsConnection(TlsConfig(certificate_chain=leaf.chain, key=leaf.local_key), client=False)
    client = TlsConnection(
        TlsConfig(verifier=pki.policy(PeerRole.SERVER, **policy).verify), client=True, server_name="localhost"
    )
    events = pump(client, server, [leaf.local_key])
    failure = next(e for side, e in events if side == "client" and isinstance(e, ConnectionFailed))
    assert ("server", AlertReceived(failure.description)) in events
    return failure


def test_expired_certificate(pki: MiniPki) -> None:
    failure = _run_with_server_leaf(pki, {"valid_days": -0.5, "not_before_days": -2})
    assert failure.description == A.certificate_expired


def test_untrusted_certificate(pki: MiniPki, tmp_path: Path) -> None:
    (tmp_path / "other").mkdir()
    other = MiniPki.create(tmp_path / "other", name="some other CA")
    leaf = other.issue("server")
    server = TlsConnection(TlsConfig(certificate_chain=leaf.chain, key=leaf.local_key), client=False)
    events = pump(_client(pki), server, [leaf.local_key])
    failure = next(e for side, e in events if side == "client" and isinstance(e, ConnectionFailed))
    assert failure.description == A.unknown_ca


def test_wrong_spiffe_id(pki: MiniPki) -> None:
    failure = _run_with_server_leaf(
        pki, {}, spiffe_ids=SpiffeIdMatcher.of(["spiffe://mesh.local/ns/default/sa/someone-else"])
    )
    assert failure.description == A.access_denied


def test_unknown_critical_certificate_extension(pki: MiniPki) -> None:
    leaf = pki.issue("server")
    now = datetime.datetime.now(datetime.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(leaf.cert.subject)
        .issuer_name(pki.ca_cert.subject)
        .public_key(leaf.cert.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(hours=1))
        .not_valid_after(now + datetime.timedelta(days=1))
    )
    for ext in leaf.cert.extensions:
        builder = builder.add_extension(ext.value, ext.critical)
    unknown = x509.UnrecognizedExtension(x509.ObjectIdentifier("1.3.6.1.4.1.99999.1"), b"\x05\x00")
    cert = builder.add_extension(unknown, critical=True).sign(pki.ca_key, hashes.SHA256())
    from cryptography.hazmat.primitives.serialization import Encoding

    server = TlsConnection(
        TlsConfig(certificate_chain=(cert.public_bytes(Encoding.DER),), key=leaf.local_key), client=False
    )
    events = pump(_client(pki), server, [leaf.local_key])
    failure = next(e for side, e in events if side == "client" and isinstance(e, ConnectionFailed))
    assert failure.description in (A.bad_certificate, A.unsupported_certificate)


def test_zero_rtt_is_refused_and_skipped(pki: MiniPki) -> None:
    """A client offering early data gets a 1-RTT handshake; its 0-RTT records are skipped."""
    server, _keys = _server(pki)
    hello = _hello(_tls13_extensions((ExtensionType.early_data, b"")))
    events = server.receive_data(_handshake(hello) + _record(23, b"\x42" * 100))
    assert [type(e).__name__ for e in events] == ["SignatureRequired"]
    assert not server.closed
