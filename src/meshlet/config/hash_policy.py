"""Compile route.v3.RouteAction.hash_policy (consistent-hash inputs) and the
route's circuit-breaker ``priority``."""

from __future__ import annotations

from typing import Any, Literal

from envoy.config.route.v3 import route_components_pb2 as rc

from meshlet.config.fields import allow_fields, check_enum, check_fields, index, join
from meshlet.config.model import HashPolicy, HashPolicyKind
from meshlet.errors import ConfigError, UnsupportedConfig

_HP = rc.RouteAction.HashPolicy
allow_fields(_HP, "header", "cookie", "connection_properties", "query_parameter", "terminal")
allow_fields(_HP.Header, "header_name")
# ttl/path/attributes make Envoy generate the cookie; meshlet refuses them
# (see _cookie) rather than silently not setting one.
allow_fields(_HP.Cookie, "name")
allow_fields(_HP.ConnectionProperties, "source_ip")
allow_fields(_HP.QueryParameter, "name")


def compile_hash_policies(messages: Any, path: str) -> tuple[HashPolicy, ...]:
    return tuple(compile_hash_policy(m, index(path, i)) for i, m in enumerate(messages))


def compile_hash_policy(msg: Any, path: str) -> HashPolicy:
    if msg.HasField("cookie"):
        _refuse_cookie_generation(msg.cookie, join(path, "cookie"))
    check_fields(msg, path)
    kind = msg.WhichOneof("policy_specifier")
    if kind is None:
        raise ConfigError(path, "one of header, cookie, connection_properties, query_parameter is required")
    sub_path = join(path, kind)
    sub = getattr(msg, kind)
    check_fields(sub, sub_path)
    terminal = bool(msg.terminal)
    if kind == "header":
        name = sub.header_name.lower()
        if not name:
            raise ConfigError(join(sub_path, "header_name"), "is required")
        return HashPolicy(HashPolicyKind.HEADER, name, terminal)
    if kind == "cookie":
        if not sub.name:
            raise ConfigError(join(sub_path, "name"), "is required")
        return HashPolicy(HashPolicyKind.COOKIE, sub.name, terminal)
    if kind == "connection_properties":
        if not sub.source_ip:
            raise ConfigError(join(sub_path, "source_ip"), "must be true")
        return HashPolicy(HashPolicyKind.SOURCE_IP, "", terminal)
    if not sub.name:
        raise ConfigError(join(sub_path, "name"), "is required")
    return HashPolicy(HashPolicyKind.QUERY_PARAMETER, sub.name, terminal)


def _refuse_cookie_generation(msg: Any, path: str) -> None:
    for name in ("ttl", "path", "attributes"):
        if msg.HasField(name) if name == "ttl" else getattr(msg, name):
            raise UnsupportedConfig(
                join(path, name), "generating the hash cookie (ttl, path, attributes) is not supported yet"
            )


def compile_priority(msg: Any, path: str) -> Literal["DEFAULT", "HIGH"]:
    """RouteAction.priority: which circuit breakers the route's requests count against."""
    return "HIGH" if check_enum(msg, "priority", path, ("DEFAULT", "HIGH")) == "HIGH" else "DEFAULT"
