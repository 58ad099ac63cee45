"""Sans-IO parts of the connection manager: header policy, codec choice, local replies."""

from __future__ import annotations

import pytest

from meshlet.config.model import CodecType, HttpConnectionManagerConfig
from meshlet.proxy.http.codec_select import H2_PREFACE, HTTP1, HTTP2, choose_codec, sniff
from meshlet.proxy.http.headers import RequestHeaderPolicy, is_internal_address
from meshlet.proxy.http.local_reply import reset_reason, upstream_reset
from meshlet.proxy.http.stream import RequestHead, StreamReset
from meshlet.proxy.observe.access_log import ResponseFlag
from meshlet.proxy.transport import ConnectionInfo


def _apply(peer: str, headers: list[tuple[str, str]], **cfg: object) -> tuple[bool, dict[str, str]]:
    policy = RequestHeaderPolicy(HttpConnectionManagerConfig(stat_prefix="p", **cfg))  # type: ignore[arg-type]
    head = RequestHead("GET", "https", "h", "/", list(headers))
    internal = policy.apply(head, ConnectionInfo(peer=(peer, 1234), local=("10.0.0.1", 80)))
    return internal, dict(head.headers)


@pytest.mark.parametrize(
    ("ip", "internal"),
    [("10.1.2.3", True), ("172.16.0.1", True), ("172.32.0.1", False), ("192.168.1.1", True),
     ("127.0.0.1", True), ("::1", True), ("fd00::1", True), ("8.8.8.8", False), ("::ffff:10.0.0.1", True)],
)
def test_internal_addresses(ip: str, internal: bool) -> None:
    assert is_internal_address(ip) is internal


def test_edge_appends_peer_and_replaces_external_request_id() -> None:
    internal, h = _apply("203.0.113.5", [("x-request-id", "evil"), ("x-envoy-retry-on", "5xx")],
                         use_remote_address=True)
    assert not internal
    assert h["x-forwarded-for"] == "203.0.113.5"
    assert h["x-envoy-external-address"] == "203.0.113.5"
    assert h["x-request-id"] != "evil" and len(h["x-request-id"]) == 36
    assert "x-envoy-retry-on" not in h
    assert h["x-forwarded-proto"] == "https"


def test_edge_preserves_request_id_when_configured() -> None:
    _, h = _apply("203.0.113.5", [("x-request-id", "mine")], use_remote_address=True,
                  preserve_external_request_id=True)
    assert h["x-request-id"] == "mine"


def test_trusted_hops_pick_the_client_from_xff() -> None:
    # Without use_remote_address: the entry xff_num_trusted_hops from the right is the client.
    internal, h = _apply("10.0.0.9", [("x-forwarded-for", "198.51.100.1, 10.0.0.2")], xff_num_trusted_hops=1)
    assert not internal  # the client (198.51.100.1) is external
    assert h["x-forwarded-for"] == "198.51.100.1, 10.0.0.2"  # not appended without use_remote_address
    internal, _ = _apply("10.0.0.9", [("x-forwarded-for", "10.0.0.3")])
    assert internal


def test_skip_xff_append_and_existing_proto_kept() -> None:
    _, h = _apply("10.0.0.9", [("x-forwarded-for", "1.2.3.4"), ("x-forwarded-proto", "http")],
                  use_remote_address=True, skip_xff_append=True)
    assert h["x-forwarded-for"] == "1.2.3.4"
    # use_remote_address: the proxy knows the scheme, the client's claim is replaced.
    assert h["x-forwarded-proto"] == "https"
    _, h = _apply("10.0.0.9", [("x-forwarded-proto", "http")])
    assert h["x-forwarded-proto"] == "http"


def test_request_id_generation_can_be_disabled() -> None:
    _, h = _apply("10.0.0.9", [], generate_request_id=False)
    assert "x-request-id" not in h


def test_codec_choice() -> None:
    assert choose_codec(CodecType.AUTO, "h2") == HTTP2
    assert choose_codec(CodecType.HTTP2, "http/1.1") == HTTP1
    assert choose_codec(CodecType.HTTP1, "") == HTTP1
    assert choose_codec(CodecType.HTTP2, "") == HTTP2
    assert choose_codec(CodecType.AUTO, "") is None


def test_sniff_preface() -> None:
    assert sniff(H2_PREFACE + b"\x00\x00") == HTTP2
    assert sniff(H2_PREFACE[:10]) is None
    assert sniff(b"PRI / HTTP/1.1") == HTTP1
    assert sniff(b"GET / HTTP/1.1\r\n") == HTTP1
    assert sniff(b"P") is None


def test_reset_reasons_and_flags() -> None:
    assert reset_reason(StreamReset("CONNECTION_RESET")) == "connection termination"
    assert reset_reason(StreamReset("CANCEL")) == "remote reset"
    assert reset_reason(StreamReset("CANCEL", local=True)) == "local reset"
    reply = upstream_reset("remote reset")
    assert reply.status == 503 and reply.flag is ResponseFlag.UR
    assert reply.body.endswith(b"before headers. reset reason: remote reset")
    assert upstream_reset("overflow").flag is ResponseFlag.UO
