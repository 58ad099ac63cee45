"""The key server's wire codec: round trips, bounds, and hostile bytes."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from meshlet.keys.keyserver.protocol import (
    MAX_FRAME,
    FrameDecoder,
    GenerateRequest,
    ImportRequest,
    ListRequest,
    ProtocolError,
    PublicKeyRequest,
    Request,
    Response,
    SignRequest,
    Status,
    decode_request,
    decode_response,
    encode_request,
    encode_response,
    frame,
)

REQUESTS: list[Request] = [
    SignRequest(1, "web", 0x0804, b"\x20" * 130),
    PublicKeyRequest(2, "web"),
    GenerateRequest(3, "p256", "new-key"),
    ImportRequest(4, "imported", b"-----BEGIN PRIVATE KEY-----\n..."),
    ListRequest(0xFFFFFFFF),
]


@pytest.mark.parametrize("request_", REQUESTS, ids=lambda r: type(r).__name__)
def test_requests_round_trip_byte_by_byte(request_: Request) -> None:
    wire = encode_request(request_)
    decoder = FrameDecoder()
    bodies: list[bytes] = []
    for i in range(len(wire)):
        bodies += decoder.feed(wire[i : i + 1])
        assert decoder.partial == (i < len(wire) - 1)
    assert [decode_request(b) for b in bodies] == [request_]


def test_pipelined_frames_split_in_one_read() -> None:
    wire = b"".join(encode_request(r) for r in REQUESTS)
    assert [decode_request(b) for b in FrameDecoder().feed(wire)] == REQUESTS


def test_responses_round_trip() -> None:
    for response in (Response(7, Status.OK, b"sig"), Response(8, Status.NOT_FOUND, b"no key named 'x'")):
        (body,) = FrameDecoder().feed(encode_response(response))
        assert decode_response(body) == response
    assert Response(8, Status.NOT_FOUND, b"no key").message == "no key"


def test_oversized_frame_is_refused_from_its_header() -> None:
    decoder = FrameDecoder()
    with pytest.raises(ProtocolError, match="exceeds"):
        decoder.feed((MAX_FRAME + 1).to_bytes(4, "big"))
    with pytest.raises(ProtocolError, match="exceeds"):
        frame(b"x" * (MAX_FRAME + 1))


@pytest.mark.parametrize(
    ("body", "words"),
    [
        (b"\x01\x00", "shorter than its header"),
        (b"\x09\x00\x00\x00\x01", "unknown operation"),
        (b"\x01\x00\x00\x00\x01\x00\x05ab", "truncated"),
        (b"\x05\x00\x00\x00\x01extra", "trailing bytes"),
        (b"\x02\x00\x00\x00\x01\x00\x02\xff\xfe", "not UTF-8"),
        (b"\x02\x00\x00\x00\x01\x01\x00" + b"a" * 256, "exceeds 64"),
        (b"\x01\x00\x00\x00\x01\x00\x01a\x08\x04\x00\x01\x00\x00", "exceeds 4096"),
    ],
)
def test_malformed_requests_are_protocol_errors(body: bytes, words: str) -> None:
    with pytest.raises(ProtocolError, match=words):
        decode_request(body)


def test_import_request_repr_hides_the_key() -> None:
    assert "SECRET" not in repr(ImportRequest(1, "k", b"SECRET"))


@given(st.binary(max_size=300))
def test_random_bytes_only_ever_raise_protocol_errors(data: bytes) -> None:
    decoder = FrameDecoder(max_frame=256)
    try:
        for body in decoder.feed(data):
            decode_request(body)
    except ProtocolError:
        pass
    try:
        decode_response(data)
    except ProtocolError:
        pass
