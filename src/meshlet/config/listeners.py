"""Compile listener.v3.Listener: address, filter chains and their matches, listener filters."""

from __future__ import annotations

from typing import Any

from envoy.config.listener.v3 import listener_components_pb2 as lc
from envoy.config.listener.v3 import listener_pb2
from envoy.extensions.filters.listener.tls_inspector.v3 import tls_inspector_pb2

from meshlet.config.address import compile_address
from meshlet.config.extensions import compile_extension, type_url_of
from meshlet.config.fields import (
    allow_fields,
    check_fields,
    duration_field,
    index,
    join,
    model_default,
    wrapped,
)
from meshlet.config.filters import compile_network_filters
from meshlet.config.model import PLAINTEXT, FilterChain, FilterChainMatch, Listener
from meshlet.config.tls import compile_transport_socket
from meshlet.errors import ConfigError
from meshlet.registry import registry

LISTENER_FILTER = "listener_filter"
TLS_INSPECTOR = "envoy.filters.listener.tls_inspector"

allow_fields(
    listener_pb2.Listener,
    "name",
    "address",
    "stat_prefix",
    "filter_chains",
    "default_filter_chain",
    "per_connection_buffer_limit_bytes",
    "listener_filters",
    "listener_filters_timeout",
    "enable_reuse_port",
)
allow_fields(lc.FilterChain, "filter_chain_match", "filters", "transport_socket", "name")
allow_fields(
    lc.FilterChainMatch, "server_names", "application_protocols", "transport_protocol", "destination_port"
)
allow_fields(lc.ListenerFilter, "name", "typed_config")
allow_fields(tls_inspector_pb2.TlsInspector)

_DEFAULT_FILTERS_TIMEOUT: float = model_default(Listener, "listener_filters_timeout")
_DEFAULT_BUFFER_LIMIT: int = model_default(Listener, "per_connection_buffer_limit_bytes")
_DEFAULT_REUSE_PORT: bool = model_default(Listener, "reuse_port")
_TRANSPORT_PROTOCOLS = ("", "raw_buffer", "tls")


def compile_listener(msg: Any, path: str) -> Listener:
    check_fields(msg, path)
    if not msg.name:
        raise ConfigError(join(path, "name"), "is required")
    if not msg.HasField("address"):
        raise ConfigError(join(path, "address"), "is required")
    address = compile_address(msg.address, join(path, "address"), allow_port_zero=True)
    listener_filters = _listener_filters(msg, path)
    chains = tuple(
        compile_filter_chain(c, index(join(path, "filter_chains"), i), f"{msg.name}/{i}")
        for i, c in enumerate(msg.filter_chains)
    )
    default = None
    if msg.HasField("default_filter_chain"):
        default = compile_filter_chain(
            msg.default_filter_chain, join(path, "default_filter_chain"), "default"
        )
    if not chains and default is None:
        raise ConfigError(join(path, "filter_chains"), "at least one filter chain is required")
    _check_matches(chains, path, inspects_tls=TLS_INSPECTOR in listener_filters)
    timeout = duration_field(
        msg, "listener_filters_timeout", path, _DEFAULT_FILTERS_TIMEOUT, zero_disables=False
    )
    buffer_limit = wrapped(msg, "per_connection_buffer_limit_bytes", _DEFAULT_BUFFER_LIMIT)
    if buffer_limit < 1:
        raise ConfigError(join(path, "per_connection_buffer_limit_bytes"), "must be at least 1")
    return Listener(
        name=msg.name,
        address=address,
        filter_chains=chains,
        default_filter_chain=default,
        listener_filters=listener_filters,
        listener_filters_timeout=timeout if timeout is not None else _DEFAULT_FILTERS_TIMEOUT,
        per_connection_buffer_limit_bytes=buffer_limit,
        stat_prefix=msg.stat_prefix,
        reuse_port=wrapped(msg, "enable_reuse_port", _DEFAULT_REUSE_PORT),
    )


def _listener_filters(msg: Any, path: str) -> tuple[str, ...]:
    names = []
    for i, f in enumerate(msg.listener_filters):
        filter_path = index(join(path, "listener_filters"), i)
        check_fields(f, filter_path)
        name = compile_extension(LISTENER_FILTER, f, filter_path)
        if name in names:
            raise ConfigError(filter_path, f"listener filter {name!r} is configured twice")
        names.append(name)
    return tuple(names)


def _tls_inspector(msg: Any, path: str) -> str:
    if msg is not None:
        check_fields(msg, path)
    return TLS_INSPECTOR


def compile_filter_chain(msg: Any, path: str, default_name: str) -> FilterChain:
    check_fields(msg, path)
    transport = PLAINTEXT
    if msg.HasField("transport_socket"):
        transport = compile_transport_socket(
            msg.transport_socket, join(path, "transport_socket"), server_side=True
        )
    return FilterChain(
        name=msg.name or default_name,
        match=compile_filter_chain_match(msg.filter_chain_match, join(path, "filter_chain_match")),
        transport_socket=transport,
        filters=compile_network_filters(msg.filters, join(path, "filters")),
    )


def compile_filter_chain_match(msg: Any, path: str) -> FilterChainMatch:
    check_fields(msg, path)
    for i, name in enumerate(msg.server_names):
        stars = name.count("*")
        if not name or (stars and not (stars == 1 and name.startswith("*."))):
            raise ConfigError(index(join(path, "server_names"), i), f"invalid server name {name!r}")
    if msg.transport_protocol not in _TRANSPORT_PROTOCOLS:
        raise ConfigError(
            join(path, "transport_protocol"), f"{msg.transport_protocol!r} is not one of raw_buffer, tls"
        )
    port = wrapped(msg, "destination_port", None)
    if port is not None and not 1 <= port <= 65535:
        raise ConfigError(join(path, "destination_port"), f"{port} is not a TCP port")
    return FilterChainMatch(
        server_names=tuple(n.lower() for n in msg.server_names),
        application_protocols=tuple(msg.application_protocols),
        transport_protocol=msg.transport_protocol,
        destination_port=port,
    )


def _check_matches(chains: tuple[FilterChain, ...], path: str, *, inspects_tls: bool) -> None:
    seen: dict[FilterChainMatch, int] = {}
    for i, chain in enumerate(chains):
        chain_path = index(join(path, "filter_chains"), i)
        match = chain.match
        if match in seen:
            raise ConfigError(
                join(chain_path, "filter_chain_match"), f"same match as filter_chains[{seen[match]}]"
            )
        seen[match] = i
        needs_inspector = match.server_names or match.application_protocols or match.transport_protocol
        if needs_inspector and not inspects_tls:
            raise ConfigError(
                join(chain_path, "filter_chain_match"),
                f"matching on server_names, application_protocols or transport_protocol needs the "
                f"{TLS_INSPECTOR} listener filter",
            )


registry.register(
    LISTENER_FILTER, TLS_INSPECTOR, _tls_inspector, [type_url_of(tls_inspector_pb2.TlsInspector)]
)
