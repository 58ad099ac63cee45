"""TCP proxy with half-close, and an HTTP/1.1 Upgrade (WebSocket handshake) tunnelled through."""

from __future__ import annotations

import socket
import threading
from collections.abc import Iterator

import pytest
from interop_helpers import StartMeshlet, bootstrap, cluster, hcm, listener, ports, route, tcp_proxy

pytestmark = pytest.mark.interop


@pytest.fixture
def half_close_server() -> Iterator[int]:
    """Reads until the client's FIN, then answers with what it read, reversed, and closes."""
    server = socket.create_server(("127.0.0.1", 0))
    server.settimeout(10)
    port = server.getsockname()[1]

    def serve() -> None:
        try:
            conn, _ = server.accept()
        except OSError:
            return
        with conn:
            conn.settimeout(10)
            received = b""
            while chunk := conn.recv(65536):
                received += chunk
            conn.sendall(received[::-1])

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield port
    finally:
        server.close()
        thread.join(timeout=5)


def recv_all(sock: socket.socket) -> bytes:
    received = b""
    while chunk := sock.recv(65536):
        received += chunk
    return received


def test_tcp_proxy_half_close(start_meshlet: StartMeshlet, half_close_server: int) -> None:
    port, admin = ports(2)
    config = bootstrap([listener("tcp", port, [tcp_proxy("app")])], [cluster("app", half_close_server)],
                       admin)
    start_meshlet(config)
    payload = bytes(range(256)) * 1000
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(payload)
        sock.shutdown(socket.SHUT_WR)  # half-close: the server answers only after our FIN
        assert recv_all(sock) == payload[::-1]


def test_websocket_upgrade(start_meshlet: StartMeshlet, upstream_port: int) -> None:
    port, admin = ports(2)
    http = hcm([route("/")], upgrade_configs=[{"upgrade_type": "websocket"}])
    start_meshlet(bootstrap([listener("http", port, [http])], [cluster("app", upstream_port)], admin))
    handshake = (b"GET /chat HTTP/1.1\r\nHost: localhost\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                 b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n")
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(handshake)
        head = b""
        while b"\r\n\r\n" not in head:
            chunk = sock.recv(4096)
            assert chunk, head
            head += chunk
        status_line, _, rest = head.partition(b"\r\n")
        assert status_line.startswith(b"HTTP/1.1 101")
        assert b"sec-websocket-accept: s3pplmbitxaq9kygzzhzrbk+xoo=" in head.lower()
        leftover = rest.partition(b"\r\n\r\n")[2]
        # After the 101 the connection is a byte tunnel; the sample app echoes.
        sock.sendall(b"\x81\x05hello")
        echoed = leftover
        while len(echoed) < 7:
            chunk = sock.recv(4096)
            assert chunk
            echoed += chunk
        assert echoed == b"\x81\x05hello"


def test_upgrade_not_allowed_without_upgrade_configs(start_meshlet: StartMeshlet, upstream_port: int) -> None:
    port, admin = ports(2)
    plain = hcm([route("/")])
    start_meshlet(bootstrap([listener("http", port, [plain])], [cluster("app", upstream_port)], admin))
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(b"GET /chat HTTP/1.1\r\nHost: localhost\r\nUpgrade: websocket\r\n"
                     b"Connection: Upgrade\r\n\r\n")
        head = b""
        while b"\r\n\r\n" not in head:
            chunk = sock.recv(4096)
            if not chunk:
                break
            head += chunk
    assert head.startswith(b"HTTP/1.1 403"), head  # Envoy: upgrade_failed
