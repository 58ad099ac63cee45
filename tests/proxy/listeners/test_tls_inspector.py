"""TLS inspector: ClientHellos from stdlib ssl and from ``openssl s_client``."""

from __future__ import annotations

import shutil
import socket
import ssl
import subprocess

import pytest

from meshlet.proxy.listeners.tls_inspector import (
    MAX_CLIENT_HELLO,
    ClientHelloInspector,
    Inspection,
    Verdict,
)


def stdlib_client_hello(server_name: str | None, alpn: list[str] | None = None) -> bytes:
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    if alpn:
        ctx.set_alpn_protocols(alpn)
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    obj = ctx.wrap_bio(incoming, outgoing, server_hostname=server_name)
    with pytest.raises(ssl.SSLWantReadError):
        obj.do_handshake()
    return outgoing.read()


def openssl_client_hello(server_name: str, alpn: str) -> bytes:
    """The first bytes ``openssl s_client`` sends, captured on a loopback socket."""
    with socket.socket() as srv:
        srv.bind(("127.0.0.1", 0))
        srv.listen(1)
        port = srv.getsockname()[1]
        proc = subprocess.Popen(
            ["openssl", "s_client", "-connect", f"127.0.0.1:{port}", "-servername", server_name,
             "-alpn", alpn],
            stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        try:
            srv.settimeout(5)
            conn, _ = srv.accept()
            with conn:
                conn.settimeout(5)
                data = b""
                inspector = ClientHelloInspector()
                while inspector.feed(chunk := conn.recv(65536)) is None and chunk:
                    data += chunk
                return inspector.data
        finally:
            proc.kill()
            proc.wait(5)


def inspect(data: bytes) -> Inspection | None:
    return ClientHelloInspector().feed(data)


def test_stdlib_hello_gives_sni_and_alpn() -> None:
    hello = stdlib_client_hello("API.Example.com", ["h2", "http/1.1"])
    result = inspect(hello)
    assert result == Inspection(Verdict.TLS, server_name="api.example.com", alpn=("h2", "http/1.1"))
    assert result.transport_protocol == "tls"


def test_hello_without_sni_or_alpn() -> None:
    result = inspect(stdlib_client_hello(None))
    assert result is not None
    assert result.verdict is Verdict.TLS
    assert result.server_name == ""
    assert result.alpn == ()


@pytest.mark.skipif(shutil.which("openssl") is None, reason="openssl CLI not installed")
def test_openssl_s_client_hello() -> None:
    hello = openssl_client_hello("svc.mesh.local", "h2,http/1.1")
    assert inspect(hello) == Inspection(Verdict.TLS, server_name="svc.mesh.local", alpn=("h2", "http/1.1"))


def test_split_at_every_byte_boundary() -> None:
    hello = stdlib_client_hello("split.example", ["http/1.1"])
    expected = inspect(hello)
    for cut in range(1, len(hello)):
        inspector = ClientHelloInspector()
        assert inspector.feed(hello[:cut]) is None, cut
        assert inspector.feed(hello[cut:]) == expected, cut
        assert inspector.data == hello


def test_byte_by_byte() -> None:
    hello = stdlib_client_hello("bytewise.example", ["h2"])
    inspector = ClientHelloInspector()
    results = [inspector.feed(hello[i : i + 1]) for i in range(len(hello))]
    assert results[:-1] == [None] * (len(hello) - 1)
    assert results[-1] is not None and results[-1].server_name == "bytewise.example"


def resplit_into_records(hello: bytes, sizes: list[int]) -> bytes:
    """Re-frame one ClientHello record's handshake bytes into several records."""
    header, payload = hello[:5], hello[5:]
    out = b""
    pos = 0
    for size in [*sizes, len(payload)]:
        chunk = payload[pos : pos + size]
        if not chunk:
            break
        out += header[:3] + len(chunk).to_bytes(2, "big") + chunk
        pos += len(chunk)
    return out


def test_client_hello_across_records() -> None:
    hello = stdlib_client_hello("records.example", ["h2"])
    framed = resplit_into_records(hello, [3, 40, 7])
    assert inspect(framed) == inspect(hello)
    for cut in range(1, len(framed)):
        inspector = ClientHelloInspector()
        inspector.feed(framed[:cut])
        assert inspector.feed(framed[cut:]) == inspect(hello)


@pytest.mark.parametrize(
    "data",
    [
        b"GET / HTTP/1.1\r\nHost: x\r\n\r\n",
        b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n",
        b"\x80\x2e\x01\x03\x01",  # SSLv2-compatible hello: not inspected
        b"\x16\x07\x01\x00\x10",  # handshake type, bad version
        b"\x16\x03\x01\x00\x00",  # empty record
        b"\x16\x03\x01\xff\xff",  # record too long
        b"\x16\x03\x01\x00\x04\x02\x00\x00\x00",  # server hello, not client hello
    ],
)
def test_not_tls(data: bytes) -> None:
    result = inspect(data)
    assert result is not None
    assert result.verdict is Verdict.NOT_TLS
    assert result.transport_protocol == "raw_buffer"


def test_malformed_client_hello_bodies_never_raise() -> None:
    hello = stdlib_client_hello("fuzz.example", ["h2"])
    body_start = 9
    for i in range(body_start, len(hello)):
        for value in (0x00, 0xFF):
            mutated = bytearray(hello)
            mutated[i] = value
            result = inspect(bytes(mutated))
            # Either it still parses (a byte that does not matter) or it is not TLS,
            # or more bytes are needed because a length grew.
            assert result is None or result.verdict in (Verdict.TLS, Verdict.NOT_TLS)


def test_truncated_body_is_malformed() -> None:
    hello = stdlib_client_hello("trunc.example")
    # Shrink the handshake length so the body ends inside the extensions.
    body_len = int.from_bytes(hello[6:9], "big") - 10
    record_len = body_len + 4
    forged = hello[:3] + record_len.to_bytes(2, "big") + b"\x01" + body_len.to_bytes(3, "big")
    forged += hello[9 : 9 + body_len]
    result = inspect(forged)
    assert result is not None and result.verdict is Verdict.NOT_TLS
    assert "malformed" in result.reason


def test_too_large_client_hello_closes() -> None:
    # A handshake header announcing more than the inspector will buffer.
    record = b"\x16\x03\x01\x00\x04" + b"\x01" + (MAX_CLIENT_HELLO + 1).to_bytes(3, "big")
    result = inspect(record)
    assert result is not None and result.verdict is Verdict.CLOSE


def test_buffer_bound_without_complete_hello() -> None:
    inspector = ClientHelloInspector()
    record = b"\x16\x03\x01\x40\x00" + b"\x01\x00\xff\xff" + b"\x00" * (0x4000 - 4)
    result = None
    for i in range(8):
        body = record if i == 0 else b"\x16\x03\x01\x40\x00" + b"\x00" * 0x4000
        result = inspector.feed(body)
        if result is not None:
            break
    assert result is not None and result.verdict is Verdict.CLOSE


def test_end_of_data_before_verdict() -> None:
    inspector = ClientHelloInspector()
    assert inspector.feed(b"\x16\x03") is None
    assert inspector.end_of_data().verdict is Verdict.NOT_TLS
