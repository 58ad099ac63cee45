"""Compile route.v3.RouteConfiguration (virtual hosts, routes, actions, header mutations)."""

from __future__ import annotations

import re
from typing import Any, Literal

from envoy.config.core.v3 import base_pb2
from envoy.config.route.v3 import route_components_pb2 as rc
from envoy.config.route.v3 import route_pb2

from meshlet.config import context
from meshlet.config.datasource import read_data_source
from meshlet.config.extensions import unpack_any
from meshlet.config.fields import (
    allow_fields,
    check_enum,
    check_fields,
    duration_field,
    enum_name,
    index,
    join,
    wrapped,
)
from meshlet.config.hash_policy import compile_hash_policies, compile_priority
from meshlet.config.matchers import compile_header_matcher, compile_query_parameter_matcher, compile_regex
from meshlet.config.model import (
    NO_MUTATION,
    AppendAction,
    ClusterAction,
    DirectResponseAction,
    HeaderMutation,
    HeaderValueOption,
    MirrorPolicy,
    PathMatchKind,
    RedirectAction,
    Route,
    RouteActionT,
    RouteConfiguration,
    RouteMatch,
    VirtualHost,
    WeightedCluster,
)
from meshlet.config.retry import compile_retry_policy, compile_runtime_fraction
from meshlet.errors import ConfigError, UnsupportedConfig
from meshlet.proxy.routing.table import RouteTable
from meshlet.registry import registry

# Per-route overrides of HTTP filters (typed_per_filter_config): each filter
# that accepts one registers a compiler ``factory(message, path) -> object``
# under this category, keyed by the override message's type URL.
HTTP_FILTER_PER_ROUTE = "http_filter_per_route"

_MUTATION_FIELDS = (
    "request_headers_to_add",
    "request_headers_to_remove",
    "response_headers_to_add",
    "response_headers_to_remove",
)
allow_fields(
    route_pb2.RouteConfiguration,
    "name",
    "virtual_hosts",
    "max_direct_response_body_size_bytes",
    *_MUTATION_FIELDS,
)
allow_fields(
    rc.VirtualHost,
    "name",
    "domains",
    "routes",
    "require_tls",
    "retry_policy",
    "include_request_attempt_count",
    "include_attempt_count_in_response",
    "typed_per_filter_config",
    "per_request_buffer_limit_bytes",
    *_MUTATION_FIELDS,
)
allow_fields(
    rc.Route,
    "name",
    "match",
    "route",
    "redirect",
    "direct_response",
    "typed_per_filter_config",
    "per_request_buffer_limit_bytes",
    *_MUTATION_FIELDS,
)
allow_fields(
    rc.RouteMatch,
    "prefix",
    "path",
    "safe_regex",
    "case_sensitive",
    "headers",
    "query_parameters",
    "grpc",
    "runtime_fraction",
)
allow_fields(rc.RouteMatch.GrpcRouteMatchOptions)
allow_fields(
    rc.RouteAction,
    "cluster",
    "prefix_rewrite",
    "host_rewrite_literal",
    "auto_host_rewrite",
    "timeout",
    "idle_timeout",
    "upgrade_configs",
    "retry_policy",
    "weighted_clusters",
    "request_mirror_policies",
    "hash_policy",
    "priority",
)
allow_fields(rc.WeightedCluster, "clusters", "total_weight", "runtime_key_prefix")
allow_fields(rc.WeightedCluster.ClusterWeight, "name", "weight", *_MUTATION_FIELDS)
allow_fields(rc.RouteAction.RequestMirrorPolicy, "cluster", "runtime_fraction")
allow_fields(rc.RouteAction.UpgradeConfig, "upgrade_type", "enabled")
allow_fields(
    rc.RedirectAction,
    "https_redirect",
    "scheme_redirect",
    "host_redirect",
    "port_redirect",
    "path_redirect",
    "prefix_rewrite",
    "response_code",
    "strip_query",
)
allow_fields(rc.DirectResponseAction, "status", "body")
allow_fields(base_pb2.HeaderValueOption, "header", "append", "append_action")
allow_fields(base_pb2.HeaderValue, "key", "value")

DEFAULT_MAX_DIRECT_RESPONSE_BODY = 4096
DEFAULT_ROUTE_TIMEOUT = 15.0
_HEADER_NAME = re.compile(r"^[!#$%&'*+\-.^_`|~0-9a-z]+$")
_BAD_VALUE_CHARS = re.compile(r"[\r\n\x00]")
_REDIRECT_CODES = {
    "MOVED_PERMANENTLY": 301,
    "FOUND": 302,
    "SEE_OTHER": 303,
    "TEMPORARY_REDIRECT": 307,
    "PERMANENT_REDIRECT": 308,
}


def compile_route_configuration(msg: Any, path: str) -> RouteConfiguration:
    """A RouteConfiguration with its RouteTable built (``RouteConfiguration.table``)."""
    check_fields(msg, path)
    body_limit = wrapped(msg, "max_direct_response_body_size_bytes", DEFAULT_MAX_DIRECT_RESPONSE_BODY)
    vhosts = tuple(
        compile_virtual_host(vh, index(join(path, "virtual_hosts"), i), body_limit)
        for i, vh in enumerate(msg.virtual_hosts)
    )
    _check_unique_vhosts(msg, vhosts, path)
    config = RouteConfiguration(
        name=msg.name,
        virtual_hosts=vhosts,
        request_headers=compile_mutation(msg, path, "request"),
        response_headers=compile_mutation(msg, path, "response"),
    )
    object.__setattr__(config, "table", RouteTable.build(config))
    return config


def _check_unique_vhosts(msg: Any, vhosts: tuple[VirtualHost, ...], path: str) -> None:
    names: set[str] = set()
    domains: dict[str, int] = {}
    for i, vh in enumerate(vhosts):
        vh_path = index(join(path, "virtual_hosts"), i)
        if vh.name in names:
            raise ConfigError(join(vh_path, "name"), f"duplicate virtual host name {vh.name!r}")
        names.add(vh.name)
        for j, domain in enumerate(vh.domains):
            if domain in domains:
                raise ConfigError(
                    index(join(vh_path, "domains"), j),
                    f"domain {msg.virtual_hosts[i].domains[j]!r} is already used by "
                    f"virtual_hosts[{domains[domain]}]",
                )
            domains[domain] = i


def compile_virtual_host(msg: Any, path: str, body_limit: int) -> VirtualHost:
    check_fields(msg, path)
    if not msg.name:
        raise ConfigError(join(path, "name"), "is required")
    if not msg.domains:
        raise ConfigError(join(path, "domains"), "at least one domain is required")
    domains = tuple(_domain(d, index(join(path, "domains"), i)) for i, d in enumerate(msg.domains))
    routes = tuple(
        compile_route(r, index(join(path, "routes"), i), i, body_limit) for i, r in enumerate(msg.routes)
    )
    retry = (
        compile_retry_policy(msg.retry_policy, join(path, "retry_policy"))
        if msg.HasField("retry_policy")
        else None
    )
    return VirtualHost(
        name=msg.name,
        domains=domains,
        routes=routes,
        request_headers=compile_mutation(msg, path, "request"),
        response_headers=compile_mutation(msg, path, "response"),
        require_tls=_require_tls(msg, path),
        retry_policy=retry,
        include_request_attempt_count=msg.include_request_attempt_count,
        include_attempt_count_in_response=msg.include_attempt_count_in_response,
        per_filter_config=compile_per_filter_config(msg, path),
        per_request_buffer_limit=wrapped(msg, "per_request_buffer_limit_bytes", None),
    )


def _require_tls(msg: Any, path: str) -> Literal["NONE", "EXTERNAL_ONLY", "ALL"]:
    value = check_enum(msg, "require_tls", path, ("NONE", "EXTERNAL_ONLY", "ALL"))
    if value == "ALL":
        return "ALL"
    return "EXTERNAL_ONLY" if value == "EXTERNAL_ONLY" else "NONE"


def _domain(domain: str, path: str) -> str:
    if not domain:
        raise ConfigError(path, "domain must not be empty")
    stars = domain.count("*")
    valid = stars == 0 or (stars == 1 and (domain.startswith("*") or domain.endswith("*")))
    if not valid or any(c.isspace() for c in domain):
        raise ConfigError(
            path, f"invalid domain {domain!r}: a wildcard is only allowed as the first or last character"
        )
    return domain.lower()


def compile_route(msg: Any, path: str, position: int, body_limit: int) -> Route:
    check_fields(msg, path)
    if not msg.HasField("match"):
        raise ConfigError(join(path, "match"), "is required")
    return Route(
        name=msg.name,
        match=compile_route_match(msg.match, join(path, "match")),
        action=_action(msg, path, body_limit),
        request_headers=compile_mutation(msg, path, "request"),
        response_headers=compile_mutation(msg, path, "response"),
        index=position,
        per_filter_config=compile_per_filter_config(msg, path),
        per_request_buffer_limit=wrapped(msg, "per_request_buffer_limit_bytes", None),
    )


def compile_per_filter_config(msg: Any, path: str) -> dict[str, object]:
    """``typed_per_filter_config``: filter name -> the filter's compiled override."""
    compiled: dict[str, object] = {}
    for name, any_config in msg.typed_per_filter_config.items():
        item_path = f'{join(path, "typed_per_filter_config")}["{name}"]'
        ext = registry.lookup(
            HTTP_FILTER_PER_ROUTE, type_url=any_config.type_url, path=join(item_path, "@type")
        )
        compiled[name] = ext.factory(unpack_any(any_config, item_path), item_path)
    return compiled


def compile_route_match(msg: Any, path: str) -> RouteMatch:
    check_fields(msg, path)
    kind = msg.WhichOneof("path_specifier")
    if kind is None:
        raise ConfigError(path, "one of prefix, path, safe_regex is required")
    headers = tuple(
        compile_header_matcher(h, index(join(path, "headers"), i)) for i, h in enumerate(msg.headers)
    )
    queries = tuple(
        compile_query_parameter_matcher(q, index(join(path, "query_parameters"), i))
        for i, q in enumerate(msg.query_parameters)
    )
    regex = compile_regex(msg.safe_regex, join(path, "safe_regex")) if kind == "safe_regex" else None
    fraction = None
    if msg.HasField("runtime_fraction"):
        fraction = compile_runtime_fraction(msg.runtime_fraction, join(path, "runtime_fraction")).default
    return RouteMatch(
        path_kind=PathMatchKind(kind),
        path_value=msg.safe_regex.regex if kind == "safe_regex" else getattr(msg, kind),
        case_sensitive=wrapped(msg, "case_sensitive", True),
        path_regex=regex,
        headers=headers,
        query_parameters=queries,
        grpc_only=msg.HasField("grpc"),
        runtime_fraction=fraction,
    )


def _action(msg: Any, path: str, body_limit: int) -> RouteActionT:
    kind = msg.WhichOneof("action")
    if kind == "route":
        return compile_cluster_action(msg.route, join(path, "route"))
    if kind == "redirect":
        return compile_redirect(msg.redirect, join(path, "redirect"))
    if kind == "direct_response":
        return compile_direct_response(msg.direct_response, join(path, "direct_response"), body_limit)
    raise ConfigError(path, "one of route, redirect, direct_response is required")


def compile_cluster_action(msg: Any, path: str) -> ClusterAction:
    check_fields(msg, path)
    specifier = msg.WhichOneof("cluster_specifier")
    weighted: tuple[WeightedCluster, ...] = ()
    total = 0
    if specifier == "weighted_clusters":
        weighted, total = compile_weighted_clusters(msg.weighted_clusters, join(path, "weighted_clusters"))
    elif not msg.cluster:
        raise ConfigError(join(path, "cluster"), "is required (or weighted_clusters)")
    else:
        _check_cluster(msg.cluster, join(path, "cluster"))
    retry = (
        compile_retry_policy(msg.retry_policy, join(path, "retry_policy"))
        if msg.HasField("retry_policy")
        else None
    )
    return ClusterAction(
        cluster=msg.cluster,
        prefix_rewrite=msg.prefix_rewrite or None,
        host_rewrite_literal=msg.host_rewrite_literal or None,
        auto_host_rewrite=wrapped(msg, "auto_host_rewrite", False),
        timeout=duration_field(msg, "timeout", path, DEFAULT_ROUTE_TIMEOUT),
        idle_timeout=duration_field(msg, "idle_timeout", path, None),
        retry_policy=retry,
        upgrades=_route_upgrades(msg, path),
        weighted_clusters=weighted,
        total_weight=total,
        mirror_policies=_mirror_policies(msg, path),
        hash_policies=compile_hash_policies(msg.hash_policy, join(path, "hash_policy")),
        priority=compile_priority(msg, path),
    )


def _check_cluster(name: str, path: str) -> None:
    known = context.current().clusters
    if known is not None and name not in known:
        raise ConfigError(path, f"unknown cluster {name!r}")


def compile_weighted_clusters(msg: Any, path: str) -> tuple[tuple[WeightedCluster, ...], int]:
    """The clusters and the sum of their weights. ``total_weight`` (deprecated
    in Envoy) is accepted when it equals that sum."""
    check_fields(msg, path)
    if msg.runtime_key_prefix:
        raise UnsupportedConfig(
            join(path, "runtime_key_prefix"), "runtime overrides of cluster weights are not supported"
        )
    if not msg.clusters:
        raise ConfigError(join(path, "clusters"), "at least one cluster is required")
    clusters = []
    for i, entry in enumerate(msg.clusters):
        entry_path = index(join(path, "clusters"), i)
        check_fields(entry, entry_path)
        if not entry.name:
            raise ConfigError(join(entry_path, "name"), "is required")
        _check_cluster(entry.name, join(entry_path, "name"))
        clusters.append(
            WeightedCluster(
                name=entry.name,
                weight=wrapped(entry, "weight", 0),
                request_headers=compile_mutation(entry, entry_path, "request"),
                response_headers=compile_mutation(entry, entry_path, "response"),
            )
        )
    total = sum(c.weight for c in clusters)
    if total <= 0:
        raise ConfigError(join(path, "clusters"), "the sum of the cluster weights must be positive")
    declared = wrapped(msg, "total_weight", None)
    if declared is not None and declared != total:
        raise ConfigError(
            join(path, "total_weight"), f"is {declared} but the cluster weights add up to {total}"
        )
    return tuple(clusters), total


def _mirror_policies(msg: Any, path: str) -> tuple[MirrorPolicy, ...]:
    policies = []
    for i, mirror in enumerate(msg.request_mirror_policies):
        mirror_path = index(join(path, "request_mirror_policies"), i)
        check_fields(mirror, mirror_path)
        if not mirror.cluster:
            raise ConfigError(join(mirror_path, "cluster"), "is required")
        _check_cluster(mirror.cluster, join(mirror_path, "cluster"))
        fraction = None
        if mirror.HasField("runtime_fraction"):
            runtime = compile_runtime_fraction(mirror.runtime_fraction, join(mirror_path, "runtime_fraction"))
            fraction = runtime.default
        policies.append(MirrorPolicy(cluster=mirror.cluster, fraction=fraction))
    return tuple(policies)


def _route_upgrades(msg: Any, path: str) -> frozenset[str]:
    upgrades: set[str] = set()
    for i, upgrade in enumerate(msg.upgrade_configs):
        upgrade_path = index(join(path, "upgrade_configs"), i)
        check_fields(upgrade, upgrade_path)
        if not upgrade.upgrade_type:
            raise ConfigError(join(upgrade_path, "upgrade_type"), "is required")
        if not wrapped(upgrade, "enabled", True):
            raise UnsupportedConfig(
                join(upgrade_path, "enabled"), "disabling an upgrade per route is not supported yet"
            )
        upgrades.add(upgrade.upgrade_type.lower())
    return frozenset(upgrades)


def compile_redirect(msg: Any, path: str) -> RedirectAction:
    check_fields(msg, path)
    scheme: str | None = None
    if msg.WhichOneof("scheme_rewrite_specifier") == "https_redirect":
        scheme = "https" if msg.https_redirect else None
    elif msg.scheme_redirect:
        scheme = msg.scheme_redirect.lower()
        if scheme not in ("http", "https"):
            raise ConfigError(
                join(path, "scheme_redirect"), f"scheme {msg.scheme_redirect!r} must be http or https"
            )
    path_kind = msg.WhichOneof("path_rewrite_specifier")
    if path_kind == "path_redirect" and not msg.path_redirect.startswith("/"):
        raise ConfigError(join(path, "path_redirect"), "must start with '/'")
    code_name = enum_name(msg, "response_code")
    if code_name not in _REDIRECT_CODES:
        raise UnsupportedConfig(join(path, "response_code"), f"{code_name} is not supported yet")
    return RedirectAction(
        scheme=scheme,
        host=msg.host_redirect or None,
        port=msg.port_redirect or None,
        path=msg.path_redirect if path_kind == "path_redirect" else None,
        prefix_rewrite=msg.prefix_rewrite if path_kind == "prefix_rewrite" else None,
        response_code=_REDIRECT_CODES[code_name],
        strip_query=msg.strip_query,
    )


def compile_direct_response(msg: Any, path: str, body_limit: int) -> DirectResponseAction:
    check_fields(msg, path)
    if not 200 <= msg.status < 600:
        raise ConfigError(join(path, "status"), f"{msg.status} is not an HTTP status in [200, 600)")
    body = b""
    if msg.HasField("body"):
        body = read_data_source(msg.body, join(path, "body"), limit=body_limit)
    return DirectResponseAction(status=msg.status, body=body)


# --------------------------------------------------------------------------- #
# Header mutations
# --------------------------------------------------------------------------- #


def compile_mutation(msg: Any, path: str, direction: str) -> HeaderMutation:
    """``{direction}_headers_to_add`` / ``_to_remove`` of a route, virtual host or route config."""
    add_field = f"{direction}_headers_to_add"
    remove_field = f"{direction}_headers_to_remove"
    options = []
    for i, option in enumerate(getattr(msg, add_field)):
        compiled = compile_header_value_option(option, index(join(path, add_field), i))
        if compiled is not None:
            options.append(compiled)
    removals = tuple(
        _modifiable_name(name, index(join(path, remove_field), i))
        for i, name in enumerate(getattr(msg, remove_field))
    )
    if not options and not removals:
        return NO_MUTATION
    return HeaderMutation(add=tuple(options), remove=removals)


def compile_header_value_option(msg: Any, path: str) -> HeaderValueOption | None:
    """None when the value is empty: Envoy does not add empty headers by default."""
    check_fields(msg, path)
    if not msg.HasField("header"):
        raise ConfigError(join(path, "header"), "is required")
    header_path = join(path, "header")
    check_fields(msg.header, header_path)
    name = _modifiable_name(msg.header.key, join(header_path, "key"))
    value = _literal_value(msg.header.value, join(header_path, "value"))
    if msg.HasField("append") and msg.append_action != 0:
        raise ConfigError(join(path, "append"), "append and append_action cannot both be set")
    if msg.HasField("append"):
        action = (
            AppendAction.APPEND_IF_EXISTS_OR_ADD
            if msg.append.value
            else AppendAction.OVERWRITE_IF_EXISTS_OR_ADD
        )
    else:
        action = AppendAction(enum_name(msg, "append_action"))
    if not value:
        return None
    return HeaderValueOption(name=name, value=value, action=action)


def _modifiable_name(name: str, path: str) -> str:
    lowered = name.lower()
    if not lowered:
        raise ConfigError(path, "header name must not be empty")
    if lowered.startswith(":") or lowered == "host":
        raise ConfigError(path, f"header {name!r} cannot be added or removed")
    if not _HEADER_NAME.match(lowered):
        raise ConfigError(path, f"invalid header name {name!r}")
    return lowered


def _literal_value(value: str, path: str) -> str:
    if _BAD_VALUE_CHARS.search(value):
        raise ConfigError(path, "header value must not contain CR, LF or NUL")
    # "%%" is a literal percent sign; any other "%" starts a substitution formatter.
    if "%" in value.replace("%%", ""):
        raise UnsupportedConfig(path, f"header value formatters ({value!r}) are not supported yet")
    return value.replace("%%", "%")
