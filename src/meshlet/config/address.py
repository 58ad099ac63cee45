"""envoy.config.core.v3.Address (socket addresses only)."""

from __future__ import annotations

import ipaddress
from typing import Any

from envoy.config.core.v3 import address_pb2

from meshlet.config.fields import allow_fields, check_enum, check_fields, join
from meshlet.config.model import SocketAddress
from meshlet.errors import ConfigError

allow_fields(address_pb2.Address, "socket_address")
allow_fields(address_pb2.SocketAddress, "protocol", "address", "port_value")


def compile_address(
    msg: Any, path: str, *, allow_hostname: bool = False, allow_port_zero: bool = False
) -> SocketAddress:
    """A TCP socket address. Listeners and STATIC endpoints need an IP; STRICT_DNS a host name."""
    check_fields(msg, path)
    if not msg.HasField("socket_address"):
        raise ConfigError(join(path, "socket_address"), "is required")
    sock_path = join(path, "socket_address")
    sock = msg.socket_address
    check_fields(sock, sock_path)
    check_enum(sock, "protocol", sock_path, ("TCP",))
    host = sock.address
    if not host:
        raise ConfigError(join(sock_path, "address"), "is required")
    if not allow_hostname:
        try:
            ipaddress.ip_address(host)
        except ValueError:
            raise ConfigError(join(sock_path, "address"), f"{host!r} is not an IP address") from None
    port = sock.port_value
    if port == 0 and not allow_port_zero:
        raise ConfigError(join(sock_path, "port_value"), "is required")
    if port > 65535:
        raise ConfigError(join(sock_path, "port_value"), f"{port} is not a TCP port")
    return SocketAddress(host, port)
