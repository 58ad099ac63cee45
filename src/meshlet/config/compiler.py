"""The config compiler: Envoy v3 messages -> the plain objects of ``meshlet.config.model``.

One resource type at a time (``compile_listener``, ``compile_route_configuration``,
``compile_cluster``, ``compile_cluster_load_assignment``, ``compile_secret``),
as xDS delivers them, and ``compile_bootstrap`` for a static bootstrap file.
Everything compiles or a ``ConfigError`` naming the field is raised: a
rejected config leaves the running one in place, so there is never half a
config. Anything meshlet does not implement is refused with its path
(``meshlet.config.fields``), never ignored.

Extensions (network/HTTP/listener filters, transport sockets, access loggers)
compile through the registry; importing this module registers the built-in ones.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any, TypeVar

from envoy.config.bootstrap.v3 import bootstrap_pb2
from envoy.config.core.v3 import base_pb2
from google.protobuf import json_format

from meshlet.config.address import compile_address
from meshlet.config.clusters import compile_cluster, compile_cluster_load_assignment
from meshlet.config.context import CompileContext, compiling
from meshlet.config.dynamic import compile_dynamic_resources
from meshlet.config.fields import allow_fields, check_fields, index, join
from meshlet.config.filters import compile_http_connection_manager, compile_tcp_proxy
from meshlet.config.listeners import compile_listener
from meshlet.config.loader import load_bootstrap
from meshlet.config.model import (
    AdminConfig,
    HttpConnectionManagerConfig,
    Listener,
    ProxyConfig,
    RouteConfiguration,
)
from meshlet.config.routes import compile_route_configuration
from meshlet.config.settings import compile_settings
from meshlet.config.tls import compile_secret
from meshlet.errors import ConfigError
from meshlet.proxy.routing.regex import regex_engine

__all__ = [
    "CompileContext",
    "compile_bootstrap",
    "compile_cluster",
    "compile_cluster_load_assignment",
    "compile_http_connection_manager",
    "compile_listener",
    "compile_resource",
    "compile_route_configuration",
    "compile_secret",
    "compile_tcp_proxy",
    "compiling",
    "load_proxy_config",
    "redact",
]

allow_fields(
    bootstrap_pb2.Bootstrap, "node", "static_resources", "dynamic_resources", "admin", "layered_runtime"
)
allow_fields(bootstrap_pb2.Bootstrap.StaticResources, "listeners", "clusters", "secrets")
allow_fields(bootstrap_pb2.Admin, "address", "access_log_path")
allow_fields(base_pb2.Node, "id", "cluster")

T = TypeVar("T")
REDACTED = "[redacted]"

_TYPE_PREFIX = "type.googleapis.com/"
# xDS resource type URL -> the compiler of one such resource.
RESOURCE_COMPILERS: dict[str, Callable[[Any, str], object]] = {
    _TYPE_PREFIX + "envoy.config.listener.v3.Listener": compile_listener,
    _TYPE_PREFIX + "envoy.config.route.v3.RouteConfiguration": compile_route_configuration,
    _TYPE_PREFIX + "envoy.config.cluster.v3.Cluster": compile_cluster,
    _TYPE_PREFIX + "envoy.config.endpoint.v3.ClusterLoadAssignment": compile_cluster_load_assignment,
    _TYPE_PREFIX + "envoy.extensions.transport_sockets.tls.v3.Secret": compile_secret,
}


def compile_resource(type_url: str, message: Any, path: str = "") -> object:
    """Compile one xDS resource by its type URL (run inside ``compiling(ctx)`` to give it
    the regex engine, known secrets and clusters)."""
    compile_one = RESOURCE_COMPILERS.get(type_url)
    if compile_one is None:
        raise ConfigError(path, f"resource type {type_url!r} is not supported")
    return compile_one(message, path)


def compile_bootstrap(bootstrap: Any, *, settings_overrides: Mapping[str, str] | None = None) -> ProxyConfig:
    """A whole static bootstrap. ``settings_overrides`` (from the CLI) win over the bootstrap's."""
    check_fields(bootstrap, "")
    settings = compile_settings(bootstrap, settings_overrides)
    static = bootstrap.static_resources
    check_fields(static, "static_resources")
    ctx = CompileContext(regex=regex_engine(settings["regex_engine"]))
    with compiling(ctx):
        secrets = _compile_named(static.secrets, "static_resources.secrets", compile_secret)
    with compiling(CompileContext(regex=ctx.regex, secrets=secrets)):
        clusters = _compile_named(static.clusters, "static_resources.clusters", compile_cluster)
    with compiling(CompileContext(regex=ctx.regex, secrets=secrets, clusters=frozenset(clusters))):
        listeners = _compile_named(static.listeners, "static_resources.listeners", compile_listener)
    _check_unique_addresses(listeners)
    ads = None
    if bootstrap.HasField("dynamic_resources"):
        ads = compile_dynamic_resources(bootstrap.dynamic_resources, "dynamic_resources", clusters)
    node_id, node_cluster = _node(bootstrap)
    if ads is not None and not node_id:
        raise ConfigError("node.id", "is required with dynamic_resources (proxies are known by it)")
    return ProxyConfig(
        listeners=listeners,
        clusters=clusters,
        route_configs=_route_configs(listeners),
        secrets=secrets,
        admin=_admin(bootstrap),
        node_id=node_id,
        node_cluster=node_cluster,
        settings=settings,
        ads=ads,
        source=_source(bootstrap),
    )


def _compile_named(messages: Sequence[Any], path: str, compile_one: Callable[[Any, str], T]) -> dict[str, T]:
    """Compile a list of named resources; names must be unique."""
    compiled: dict[str, T] = {}
    first_index: dict[str, int] = {}
    for i, msg in enumerate(messages):
        item_path = index(path, i)
        resource = compile_one(msg, item_path)
        name = msg.name
        if name in compiled:
            raise ConfigError(
                join(item_path, "name"), f"duplicate name {name!r} (also at {path}[{first_index[name]}])"
            )
        compiled[name] = resource
        first_index[name] = i
    return compiled


def _check_unique_addresses(listeners: Mapping[str, Listener]) -> None:
    bound: dict[tuple[str, int], str] = {}
    for i, listener in enumerate(listeners.values()):
        addr = (listener.address.host, listener.address.port)
        if addr[1] != 0 and addr in bound:
            raise ConfigError(
                join(index("static_resources.listeners", i), "address"),
                f"{listener.address} is already used by listener {bound[addr]!r}",
            )
        bound[addr] = listener.name


def _route_configs(listeners: Mapping[str, Listener]) -> dict[str, RouteConfiguration]:
    """Inline route configurations by name, for the admin endpoint (and RDS later).

    Two listeners may carry inline configs of the same name; the later ones are
    keyed "<listener>/<name>" so none is hidden.
    """
    configs: dict[str, RouteConfiguration] = {}
    for listener in listeners.values():
        chains = [*listener.filter_chains]
        if listener.default_filter_chain is not None:
            chains.append(listener.default_filter_chain)
        for chain in chains:
            for network_filter in chain.filters:
                if isinstance(network_filter, HttpConnectionManagerConfig) and network_filter.route_config:
                    rc = network_filter.route_config
                    name = rc.name if rc.name not in configs else f"{listener.name}/{rc.name}"
                    configs[name] = rc
    return configs


def _admin(bootstrap: Any) -> AdminConfig | None:
    if not bootstrap.HasField("admin"):
        return None
    admin = bootstrap.admin
    check_fields(admin, "admin")
    address = None
    if admin.HasField("address"):
        address = compile_address(admin.address, "admin.address", allow_port_zero=True)
    return AdminConfig(address=address, access_log_path=admin.access_log_path or None)


def _node(bootstrap: Any) -> tuple[str, str]:
    if not bootstrap.HasField("node"):
        return "", ""
    check_fields(bootstrap.node, "node")
    return bootstrap.node.id, bootstrap.node.cluster


# --------------------------------------------------------------------------- #
# /config_dump source
# --------------------------------------------------------------------------- #


def _source(bootstrap: Any) -> dict[str, object]:
    static = bootstrap.static_resources
    return {
        "bootstrap": redact(_to_dict(bootstrap)),
        "listeners": {m.name: redact(_to_dict(m)) for m in static.listeners},
        "clusters": {m.name: redact(_to_dict(m)) for m in static.clusters},
        "secrets": {m.name: redact(_to_dict(m)) for m in static.secrets},
    }


def _to_dict(msg: Any) -> dict[str, Any]:
    return dict(json_format.MessageToDict(msg, preserving_proto_field_name=True))


def redact(data: Any) -> Any:
    """A copy of ``data`` with inline private key material replaced (Envoy redacts it too)."""
    if isinstance(data, dict):
        out: dict[str, Any] = {}
        for k, v in data.items():
            if k == "private_key" and isinstance(v, dict):
                out[k] = {name: (REDACTED if name.startswith("inline") else val) for name, val in v.items()}
            else:
                out[k] = redact(v)
        return out
    if isinstance(data, list):
        return [redact(v) for v in data]
    return data


def load_proxy_config(path: str, *, settings_overrides: Mapping[str, str] | None = None) -> ProxyConfig:
    """Read and compile a static bootstrap file (YAML or JSON) in one step."""
    return compile_bootstrap(load_bootstrap(path), settings_overrides=settings_overrides)
