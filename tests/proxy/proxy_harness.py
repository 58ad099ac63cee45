"""Shared by the server and admin tests: a tiny upstream and bootstrap files."""

from __future__ import annotations

import asyncio
import json
import socket
from pathlib import Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Upstream:
    """HTTP/1.1 keep-alive server: ``/delay/<ms>`` answers after a delay, anything
    else at once; the body names the path."""

    def __init__(self) -> None:
        self.server: asyncio.Server | None = None
        self.port = 0
        self.requests: list[str] = []

    async def __aenter__(self) -> Upstream:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self.server is not None
        self.server.close()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 30)
                path = head.split(b" ", 2)[1].decode()
                self.requests.append(path)
                if path.startswith("/delay/"):
                    await asyncio.sleep(int(path.rsplit("/", 1)[1]) / 1000)
                body = f"upstream saw {path}\n".encode()
                writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\n\r\n%s" % (len(body), body))
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError, TimeoutError):
            pass
        finally:
            writer.close()


HCM_TYPE = (
    "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager"
)


def bootstrap_yaml(
    *, listener_port: int, upstream_port: int, admin_port: int | None = None, hello: str = "v1",
    tls_cert_pem: str | None = None, tls_key_pem: str | None = None,
) -> str:
    admin = ""
    if admin_port is not None:
        admin = f"""
admin:
  address:
    socket_address: {{ address: 127.0.0.1, port_value: {admin_port} }}
"""
    tls = ""
    if tls_cert_pem and tls_key_pem:
        # JSON strings are valid YAML scalars and keep the PEM newlines.
        tls = f"""
      transport_socket:
        name: envoy.transport_sockets.tls
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.DownstreamTlsContext
          common_tls_context:
            tls_certificates:
            - certificate_chain: {{ inline_string: {json.dumps(tls_cert_pem)} }}
              private_key: {{ inline_string: {json.dumps(tls_key_pem)} }}"""
    return f"""{admin}
node: {{ id: test-node, cluster: test-cluster }}
static_resources:
  listeners:
  - name: web
    address:
      socket_address: {{ address: 127.0.0.1, port_value: {listener_port} }}
    filter_chains:
    - {tls}
      filters:
      - name: envoy.filters.network.http_connection_manager
        typed_config:
          "@type": {HCM_TYPE}
          stat_prefix: web
          route_config:
            name: web_routes
            virtual_hosts:
            - name: all
              domains: ["*"]
              routes:
              - match: {{ path: /hello }}
                direct_response: {{ status: 200, body: {{ inline_string: "{hello}" }} }}
              - match: {{ prefix: / }}
                route: {{ cluster: backend, timeout: 10s }}
          http_filters:
          - name: envoy.filters.http.router
            typed_config:
              "@type": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router
  clusters:
  - name: backend
    type: STATIC
    connect_timeout: 1s
    load_assignment:
      cluster_name: backend
      endpoints:
      - lb_endpoints:
        - endpoint:
            address:
              socket_address: {{ address: 127.0.0.1, port_value: {upstream_port} }}
"""


def write_bootstrap(directory: Path, name: str = "bootstrap.yaml", **kw: object) -> Path:
    path = directory / name
    path.write_text(bootstrap_yaml(**kw))  # type: ignore[arg-type]
    return path
