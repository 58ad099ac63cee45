"""A small gRPC upstream for trying meshlet with gRPC (HTTP/2 cluster, trailers).

Service ``meshlet.example.Echo`` on raw bytes (no .proto needed; any gRPC
client can call it with identity serializers):

  /meshlet.example.Echo/Unary         returns b"echo:" + request, trailer x-served-by
  /meshlet.example.Echo/Bidi          streams each request back upper-cased
  /meshlet.example.Echo/Count         request b"<n>": streams b"0" .. b"<n-1>"
  /meshlet.example.Echo/Fail          request b"<code name>": fails with that status

Run: ``python examples/apps/grpc_echo.py --port 50051`` (``--port 0`` picks a
free port). The first line on stdout is ``listening on grpc://HOST:PORT``.
Put it behind the proxy with a cluster using ``http2_protocol_options``.
"""

from __future__ import annotations

import argparse
import signal
import sys
import threading
from collections.abc import Iterator
from concurrent import futures

import grpc

SERVICE = "meshlet.example.Echo"
MAX_STREAMED = 10_000


def unary(request: bytes, context: grpc.ServicerContext) -> bytes:
    context.set_trailing_metadata((("x-served-by", "grpc-echo"),))
    return b"echo:" + request


def bidi(requests: Iterator[bytes], context: grpc.ServicerContext) -> Iterator[bytes]:
    for request in requests:
        yield request.upper()


def count(request: bytes, context: grpc.ServicerContext) -> Iterator[bytes]:
    try:
        n = min(int(request), MAX_STREAMED)
    except ValueError:
        context.abort(grpc.StatusCode.INVALID_ARGUMENT, "the request must be a decimal count")
    for i in range(n):
        yield b"%d" % i


def fail(request: bytes, context: grpc.ServicerContext) -> bytes:
    name = request.decode("ascii", errors="replace").upper() or "INTERNAL"
    code = getattr(grpc.StatusCode, name, grpc.StatusCode.INTERNAL)
    context.abort(code, f"failed as asked: {name}")
    raise AssertionError("context.abort always raises")


def build_server(host: str, port: int) -> tuple[grpc.Server, int]:
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=8))
    handlers = {
        "Unary": grpc.unary_unary_rpc_method_handler(unary),
        "Bidi": grpc.stream_stream_rpc_method_handler(bidi),
        "Count": grpc.unary_stream_rpc_method_handler(count),
        "Fail": grpc.unary_unary_rpc_method_handler(fail),
    }
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, handlers),))
    bound = server.add_insecure_port(f"{host}:{port}")
    if bound == 0:
        raise OSError(f"cannot listen on {host}:{port}")
    return server, bound


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="meshlet sample gRPC upstream")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=50051, help="0 picks a free port")
    args = parser.parse_args(argv)
    try:
        server, port = build_server(args.host, args.port)
    except (OSError, RuntimeError) as exc:
        print(f"grpc_echo: error: {exc}", file=sys.stderr)
        return 2
    server.start()
    print(f"listening on grpc://{args.host}:{port}", flush=True)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    while not stop.wait(0.5):
        pass
    server.stop(grace=2).wait(timeout=5)
    return 0


if __name__ == "__main__":
    sys.exit(main())
