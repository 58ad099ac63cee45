"""The record layer reads records in place from the chunks it is fed: any cut
of a protected stream, in any mix of bytes and bytearray chunks, yields the same
records; a batch of records sealed into one buffer opens record by record."""

from __future__ import annotations

import itertools
import os

from hypothesis import given, settings
from hypothesis import strategies as st

from meshlet.tls.crypto import SUITES_BY_NAME
from meshlet.tls.record import MAX_PLAINTEXT, ContentType, RecordCipher, RecordLayer, sealed_length

SECRET = bytes(range(48))
SUITE_NAMES = sorted(SUITES_BY_NAME)


def layers(suite_name: str, padding_block: int = 0) -> tuple[RecordLayer, RecordLayer]:
    suite = SUITES_BY_NAME[suite_name]
    writer, reader = RecordLayer(padding_block), RecordLayer()
    writer.set_write_secret(suite, SECRET[: suite.hash.digest_size])
    reader.set_read_secret(suite, SECRET[: suite.hash.digest_size])
    return writer, reader


def read_all(reader: RecordLayer) -> list[tuple[int, bytes]]:
    records = []
    while (record := reader.next_record()) is not None:
        records.append(record)
    return records


@settings(max_examples=60, deadline=None)
@given(
    suite_name=st.sampled_from(SUITE_NAMES),
    sizes=st.lists(st.integers(1, 3 * MAX_PLAINTEXT), min_size=1, max_size=4),
    cuts=st.lists(st.integers(0, 1 << 17), max_size=12),
    as_bytearray=st.booleans(),
    padding_block=st.sampled_from([0, 64]),
)
def test_any_cut_of_a_protected_stream_reads_the_same(
    suite_name: str, sizes: list[int], cuts: list[int], as_bytearray: bool, padding_block: int
) -> None:
    writer, reader = layers(suite_name, padding_block)
    messages = [os.urandom(n) for n in sizes]
    wire = b"".join(bytes(writer.protect(ContentType.application_data, m)) for m in messages)
    points = sorted({c % (len(wire) + 1) for c in cuts} | {0, len(wire)})
    records: list[tuple[int, bytes]] = []
    for start, end in itertools.pairwise(points):
        piece = wire[start:end]
        reader.feed(bytearray(piece) if as_bytearray else piece)
        records += read_all(reader)
    assert reader.buffered == 0
    assert {content_type for content_type, _ in records} == {ContentType.application_data}
    assert b"".join(payload for _, payload in records) == b"".join(messages)


def test_a_multi_record_write_is_one_buffer_of_whole_records() -> None:
    writer, reader = layers("TLS_AES_128_GCM_SHA256")
    data = os.urandom(2 * MAX_PLAINTEXT + 5)
    wire = writer.protect(ContentType.application_data, data)
    assert len(wire) == 2 * sealed_length(MAX_PLAINTEXT, 0) + sealed_length(5, 0)
    reader.feed(bytes(wire))
    assert [len(p) for _, p in read_all(reader)] == [MAX_PLAINTEXT, MAX_PLAINTEXT, 5]


def test_unread_input_is_kept_in_order_across_feeds() -> None:
    writer, reader = layers("TLS_CHACHA20_POLY1305_SHA256")
    first = bytes(writer.protect(ContentType.application_data, b"first"))
    second = bytes(writer.protect(ContentType.application_data, b"second"))
    reader.feed(first[:3])
    reader.feed(first[3:] + second[:7])  # nothing read in between
    reader.feed(second[7:])
    assert reader.buffered == len(first) + len(second)
    assert [p for _, p in read_all(reader)] == [b"first", b"second"]


def test_take_buffered_returns_what_was_not_read() -> None:
    writer, reader = layers("TLS_AES_256_GCM_SHA384")
    record = bytes(writer.protect(ContentType.application_data, b"payload"))
    reader.feed(record + b"\x17\x03")
    assert read_all(reader) == [(ContentType.application_data, b"payload")]
    assert reader.take_buffered() == b"\x17\x03"
    assert reader.buffered == 0


def test_sealing_into_a_buffer_matches_seal_with_and_without_encrypt_into() -> None:
    suite = SUITES_BY_NAME["TLS_AES_128_GCM_SHA256"]
    secret = SECRET[:32]
    reference, direct, fallback = (RecordCipher(suite, secret) for _ in range(3))
    fallback._encrypt_into = None  # what cryptography releases without encrypt_into get
    payload = os.urandom(1000)
    expected = reference.seal(ContentType.application_data, payload, 7)
    for cipher in (direct, fallback):
        out = bytearray(sealed_length(len(payload), 7))
        assert cipher.seal_into(memoryview(out), ContentType.application_data, payload, 7) == len(out)
        assert bytes(out) == expected
