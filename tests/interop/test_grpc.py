"""gRPC through the proxy: grpcio client -> meshlet (h2c) -> HTTP/2 cluster -> grpcio server."""

from __future__ import annotations

from collections.abc import Iterator
from concurrent import futures
from pathlib import Path

import grpc
import pytest
from interop_helpers import (
    MeshletProcess,
    StartMeshlet,
    bootstrap,
    cluster,
    downstream_tls,
    hcm,
    listener,
    ports,
    route,
)

from certs import make_pki

pytestmark = pytest.mark.interop

SERVICE = "meshlet.test.Echo"
NO_PROXY = [("grpc.enable_http_proxy", 0)]


def _unary(request: bytes, context: grpc.ServicerContext) -> bytes:
    context.set_trailing_metadata((("x-served-by", "grpc-upstream"),))
    return b"echo:" + request


def _bidi(requests: Iterator[bytes], context: grpc.ServicerContext) -> Iterator[bytes]:
    for request in requests:
        yield request.upper()


def _server_stream(request: bytes, context: grpc.ServicerContext) -> Iterator[bytes]:
    for i in range(int(request)):
        yield b"%d" % i


def _deny(request: bytes, context: grpc.ServicerContext) -> bytes:
    context.abort(grpc.StatusCode.PERMISSION_DENIED, "denied by the upstream")
    raise AssertionError("abort returns only by raising")


@pytest.fixture
def grpc_upstream() -> Iterator[int]:
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    handlers = {
        "Unary": grpc.unary_unary_rpc_method_handler(_unary),
        "Bidi": grpc.stream_stream_rpc_method_handler(_bidi),
        "ServerStream": grpc.unary_stream_rpc_method_handler(_server_stream),
        "Deny": grpc.unary_unary_rpc_method_handler(_deny),
    }
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, handlers),))
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        yield port
    finally:
        server.stop(grace=None)


@pytest.fixture
def channel(start_meshlet: StartMeshlet, grpc_upstream: int) -> Iterator[grpc.Channel]:
    port, admin = ports(2)
    config = bootstrap([listener("grpc", port, [hcm([route("/")], codec_type="HTTP2")])],
                       [cluster("app", grpc_upstream, http2=True)], admin)
    proxy: MeshletProcess = start_meshlet(config)
    assert proxy.proc is not None
    with grpc.insecure_channel(f"127.0.0.1:{port}", options=NO_PROXY) as ch:
        yield ch


def test_unary_with_trailers(channel: grpc.Channel) -> None:
    call = channel.unary_unary(f"/{SERVICE}/Unary")
    response, info = call.with_call(b"hello", timeout=10)
    assert response == b"echo:hello"
    assert ("x-served-by", "grpc-upstream") in info.trailing_metadata()


def test_bidirectional_streaming(channel: grpc.Channel) -> None:
    call = channel.stream_stream(f"/{SERVICE}/Bidi")
    responses = list(call(iter([b"a", b"bc", b"def" * 10_000]), timeout=10))
    assert responses == [b"A", b"BC", b"DEF" * 10_000]


def test_server_streaming(channel: grpc.Channel) -> None:
    call = channel.unary_stream(f"/{SERVICE}/ServerStream")
    assert list(call(b"100", timeout=10)) == [b"%d" % i for i in range(100)]


def test_non_ok_status_through_trailers(channel: grpc.Channel) -> None:
    call = channel.unary_unary(f"/{SERVICE}/Deny")
    with pytest.raises(grpc.RpcError) as raised:
        call(b"x", timeout=10)
    error = raised.value
    assert error.code() == grpc.StatusCode.PERMISSION_DENIED  # type: ignore[attr-defined]
    assert error.details() == "denied by the upstream"  # type: ignore[attr-defined]


def test_unknown_method_is_unimplemented(channel: grpc.Channel) -> None:
    call = channel.unary_unary(f"/{SERVICE}/Nope")
    with pytest.raises(grpc.RpcError) as raised:
        call(b"x", timeout=10)
    assert raised.value.code() == grpc.StatusCode.UNIMPLEMENTED  # type: ignore[attr-defined]


@pytest.mark.parametrize("engine", ["openssl", "meshlet"])
def test_grpc_over_tls(start_meshlet: StartMeshlet, grpc_upstream: int, tmp_path: Path, engine: str) -> None:
    """grpcio's own TLS stack (BoringSSL) against each of meshlet's TLS engines, ALPN h2."""
    pki = make_pki(tmp_path / "pki")
    port, admin = ports(2)
    tls = downstream_tls(pki.server_cert, pki.server_key, alpn=("h2",))
    config = bootstrap([listener("grpcs", port, [hcm([route("/")])], transport_socket=tls)],
                       [cluster("app", grpc_upstream, http2=True)], admin)
    start_meshlet(config, "--tls-engine", engine)
    credentials = grpc.ssl_channel_credentials(root_certificates=pki.ca_cert.read_bytes())
    with grpc.secure_channel(f"localhost:{port}", credentials, options=NO_PROXY) as channel:
        call = channel.unary_unary(f"/{SERVICE}/Unary")
        assert call(b"over tls", timeout=10) == b"echo:over tls"
        stream = channel.stream_stream(f"/{SERVICE}/Bidi")
        assert list(stream(iter([b"x", b"y"]), timeout=10)) == [b"X", b"Y"]
