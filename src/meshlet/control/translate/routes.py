"""HTTP routes: VirtualService ``http`` rules -> Envoy routes, and the outbound
route configurations (one per port, named by the port, as Istio names them).

Each HTTPMatchRequest becomes one Envoy route (Envoy ORs routes, Istio ORs
matches); a rule without a match matches everything. Without a VirtualService
a service's virtual host has one route to its default cluster. Routes get
Istio's defaults: no timeout, two retries on connect failures, refused
streams and 503s.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from envoy.config.core.v3 import base_pb2
from envoy.config.route.v3 import route_components_pb2 as rc
from envoy.config.route.v3 import route_pb2
from envoy.extensions.filters.http.fault.v3 import fault_pb2
from envoy.type.matcher.v3 import regex_pb2, string_pb2
from envoy.type.v3 import percent_pb2

from meshlet.control.resources import VirtualService, parse_duration
from meshlet.control.resources.networking import (
    Destination,
    HeaderOperations,
    Headers,
    HTTPFaultInjection,
    HTTPMatchRequest,
    HTTPRetry,
    HTTPRoute,
    PercentValue,
    StringMatch,
)
from meshlet.control.translate.clusters import duration, find_target, outbound_name
from meshlet.control.translate.index import MESH_GATEWAY, MeshService, ResourceSet, labels_match
from meshlet.control.translate.status import TranslationStatus

FAULT_FILTER = "envoy.filters.http.fault"
PREVIOUS_HOSTS = "envoy.retry_host_predicates.previous_hosts"
DEFAULT_RETRY_ON = "connect-failure,refused-stream,retriable-status-codes"
DEFAULT_RETRY_CODES = (503,)
DEFAULT_ATTEMPTS = 2
HOST_SELECTION_ATTEMPTS = 5
_SUPPORTED_RETRY_ON = frozenset({"5xx", "gateway-error", "reset", "connect-failure", "retriable-4xx",
                                 "refused-stream", "retriable-status-codes", "retriable-headers"})
_REDIRECT_CODES = {301: rc.RedirectAction.MOVED_PERMANENTLY, 302: rc.RedirectAction.FOUND,
                   303: rc.RedirectAction.SEE_OTHER, 307: rc.RedirectAction.TEMPORARY_REDIRECT,
                   308: rc.RedirectAction.PERMANENT_REDIRECT}
_PSEUDO_MATCHES = (("method", ":method"), ("authority", ":authority"), ("scheme", ":scheme"))


@dataclass(frozen=True, slots=True)
class RouteContext:
    """Where routes are built: the listener port, the gateway ("mesh" for
    sidecars) and the client proxy's labels and namespace (for sourceLabels)."""

    port: int
    gateway: str
    namespace: str
    labels: tuple[tuple[str, str], ...] = ()


# -- which VirtualService routes a host --------------------------------------------- #


def bound_to(vs: VirtualService, gateway: str) -> bool:
    """Whether ``vs`` applies at ``gateway`` ("mesh" for sidecars; else "ns/name")."""
    gateways = vs.spec.gateways or [MESH_GATEWAY]
    if gateway == MESH_GATEWAY:
        return MESH_GATEWAY in gateways
    return any(_gateway_ref(g, vs.namespace) == gateway for g in gateways)


def _gateway_ref(name: str, namespace: str) -> str:
    return name if name == MESH_GATEWAY or "/" in name else f"{namespace}/{name}"


def host_matches(pattern: str, host: str) -> bool:
    if pattern == "*":
        return True
    if pattern.startswith("*."):
        return host.endswith(pattern[1:])
    return pattern == host


def mesh_virtual_service(rs: ResourceSet, host: str, status: TranslationStatus) -> VirtualService | None:
    """The VirtualService routing ``host`` inside the mesh: the oldest one naming it."""
    by_host, wildcards = rs.memo("mesh_virtual_services", lambda: _index_mesh_virtual_services(rs))
    found = [*by_host.get(host, []),
             *(vs for vs in wildcards if any(host_matches(h, host) for h in vs.spec.hosts))]
    if wildcards:
        position = rs.memo("vs_positions", lambda: {id(vs): i for i, vs in enumerate(rs.virtual_services)})
        found.sort(key=lambda vs: position[id(vs)])
    if len(found) > 1:
        status.warning(found[1].resource_id, f"host {host} is already routed by {found[0].resource_id}; "
                       "only the oldest VirtualService for a host applies")
    return found[0] if found else None


def _index_mesh_virtual_services(
        rs: ResourceSet) -> tuple[dict[str, list[VirtualService]], list[VirtualService]]:
    """Mesh VirtualServices by the full host they name, and those naming wildcards."""
    by_host: dict[str, list[VirtualService]] = {}
    wildcards: list[VirtualService] = []
    for vs in rs.virtual_services:
        if not bound_to(vs, MESH_GATEWAY):
            continue
        for host in dict.fromkeys(rs.resolve_host(h, vs.namespace) for h in vs.spec.hosts):
            if host.startswith("*"):
                if vs not in wildcards:
                    wildcards.append(vs)
            else:
                by_host.setdefault(host, []).append(vs)
    return by_host, wildcards


# -- outbound route configurations ---------------------------------------------------- #


def outbound_route_config(rs: ResourceSet, ctx: RouteContext,
                          status: TranslationStatus) -> route_pb2.RouteConfiguration:
    """Route configuration ``"<port>"``: a virtual host per HTTP service on the port."""
    config = route_pb2.RouteConfiguration(name=str(ctx.port))
    used: set[str] = set()
    for host in sorted(rs.services):
        service = rs.services[host]
        port = service.port(ctx.port)
        if port is None or not port.is_http:
            continue
        domains = [d for d in service.domains(ctx.port) if d not in used]
        used.update(domains)
        vhost = config.virtual_hosts.add(name=f"{host}:{ctx.port}", domains=domains)
        vs = mesh_virtual_service(rs, host, status)
        if vs is None:
            vhost.routes.append(default_route(rs, service, ctx.port))
        else:
            vhost.routes.extend(virtual_service_routes(rs, vs, ctx, status))
    return config


def default_route(rs: ResourceSet, service: MeshService, port: int) -> rc.Route:
    route = rc.Route(name="default")
    route.match.prefix = "/"
    action = route.route
    action.cluster = outbound_name(port, "", service.host)
    action.timeout.CopyFrom(duration(0))
    action.retry_policy.CopyFrom(_retry_policy(None, TranslationStatus(""), ""))
    _hash_policy(rs, action, service.host, port, "")
    return route


def virtual_service_routes(rs: ResourceSet, vs: VirtualService, ctx: RouteContext,
                           status: TranslationStatus) -> list[rc.Route]:
    routes: list[rc.Route] = []
    for i, http in enumerate(vs.spec.http):
        where = f"{vs.resource_id} http[{i}]"
        matches: Sequence[HTTPMatchRequest | None] = http.match or [None]
        for match in matches:
            if match is not None and not _match_applies(match, ctx, vs.namespace):
                continue
            route = _route(rs, vs, http, match, ctx, where, status)
            if route is not None:
                routes.append(route)
    return routes


def _match_applies(match: HTTPMatchRequest, ctx: RouteContext, namespace: str) -> bool:
    """Parts of a match that pick the proxy rather than the request."""
    if match.port is not None and match.port != ctx.port:
        return False
    if match.gateways and ctx.gateway not in {_gateway_ref(g, namespace) for g in match.gateways}:
        return False
    if match.source_namespace is not None and match.source_namespace != ctx.namespace:
        return False
    return labels_match(match.source_labels, dict(ctx.labels))


def _route(rs: ResourceSet, vs: VirtualService, http: HTTPRoute, match: HTTPMatchRequest | None,
           ctx: RouteContext, where: str, status: TranslationStatus) -> rc.Route | None:
    route = rc.Route(name=(http.name or "") + (f".{match.name}" if match is not None and match.name else ""))
    _route_match(route.match, match)
    if http.redirect is not None:
        redirect = route.redirect
        if http.redirect.uri is not None:
            redirect.path_redirect = http.redirect.uri
        if http.redirect.authority is not None:
            redirect.host_redirect = http.redirect.authority
        redirect.response_code = _REDIRECT_CODES.get(http.redirect.redirect_code or 301,
                                                     rc.RedirectAction.MOVED_PERMANENTLY)
    elif not _route_action(rs, vs, http, route.route, ctx, where, status):
        return None
    _header_operations(route, http.headers)
    if http.fault is not None:
        route.typed_per_filter_config[FAULT_FILTER].Pack(fault_config(http.fault))
    return route


def _route_action(rs: ResourceSet, vs: VirtualService, http: HTTPRoute, action: rc.RouteAction,
                  ctx: RouteContext, where: str, status: TranslationStatus) -> bool:
    weighted = _weights([d.weight for d in http.route])
    targets = []
    for dest, weight in zip(http.route, weighted, strict=True):
        if weight == 0:
            continue
        name = _cluster_for(rs, dest.destination, vs.namespace, ctx.port, where, status)
        if name is None:
            continue
        targets.append((name, weight, dest.headers))
    if not targets:
        status.error(where, "no destination with a weight above 0 can be routed to; the rule is left out")
        return False
    if len(targets) == 1:
        name, _, headers = targets[0]
        action.cluster = name
        _destination_headers(action, headers, where, status)
    else:
        for name, weight, headers in targets:
            cluster_weight = action.weighted_clusters.clusters.add(name=name)
            cluster_weight.weight.value = weight
            _weight_headers(cluster_weight, headers)
    action.timeout.CopyFrom(duration(parse_duration(http.timeout) if http.timeout else 0))
    retry = _retry_policy(http.retries, status, where)
    if retry is not None:
        action.retry_policy.CopyFrom(retry)
    if http.mirror is not None:
        mirror_cluster = _cluster_for(rs, http.mirror, vs.namespace, ctx.port, where, status)
        if mirror_cluster is not None:
            mirror = action.request_mirror_policies.add(cluster=mirror_cluster)
            mirror.runtime_fraction.default_value.CopyFrom(_fraction(http.mirror_percentage))
    if http.rewrite is not None:
        if http.rewrite.uri is not None:
            action.prefix_rewrite = http.rewrite.uri
        if http.rewrite.authority is not None:
            action.host_rewrite_literal = http.rewrite.authority
    first = targets[0][0].split("|")
    _hash_policy(rs, action, first[3], int(first[1]), first[2])
    return True


def _weights(weights: Sequence[int | None]) -> list[int]:
    """Weights with unset ones sharing what the set ones leave of 100."""
    if len(weights) == 1:
        return [100 if weights[0] is None else weights[0]]
    unset = [i for i, w in enumerate(weights) if w is None]
    left = max(0, 100 - sum(w for w in weights if w is not None))
    out = [w or 0 for w in weights]
    for n, i in enumerate(unset):
        out[i] = left // len(unset) + (1 if n < left % len(unset) else 0)
    return out


def _cluster_for(rs: ResourceSet, dest: Destination, namespace: str, listener_port: int, where: str,
                 status: TranslationStatus) -> str | None:
    host = rs.resolve_host(dest.host, namespace)
    service = rs.service(host)
    subset = dest.subset or ""
    if dest.port is not None:
        port = dest.port.number
    elif service is not None and len(service.ports) == 1:
        port = service.ports[0].number
    else:
        port = listener_port
    if service is None:
        status.error(where, f"destination host {dest.host} is not a known service (no Service or "
                     "ServiceEntry defines it); the destination is left out")
        return None
    if service.port(port) is None:
        status.error(where, f"destination {host} has no port {port}; the destination is left out")
        return None
    if find_target(rs, host, port, subset) is None:
        status.error(where, f"destination {host} has no subset {subset!r} (no DestinationRule defines it); "
                     "the destination is left out")
        return None
    return outbound_name(port, subset, host)


# -- matches ---------------------------------------------------------------------------- #


def _string_matcher(match: StringMatch) -> string_pb2.StringMatcher:
    if match.exact is not None:
        return string_pb2.StringMatcher(exact=match.exact)
    if match.prefix is not None:
        return string_pb2.StringMatcher(prefix=match.prefix)
    return string_pb2.StringMatcher(safe_regex=regex_pb2.RegexMatcher(regex=match.regex or ""))


def _route_match(out: rc.RouteMatch, match: HTTPMatchRequest | None) -> None:
    uri = match.uri if match is not None else None
    if uri is None or uri.prefix is not None:
        out.prefix = uri.prefix if uri is not None and uri.prefix is not None else "/"
    elif uri.exact is not None:
        out.path = uri.exact
    else:
        out.safe_regex.regex = uri.regex or ""
    if match is None:
        return
    if match.ignore_uri_case:
        out.case_sensitive.value = False
    for attribute, header in _PSEUDO_MATCHES:
        value = getattr(match, attribute)
        if value is not None:
            out.headers.add(name=header, string_match=_string_matcher(value))
    for name, value in sorted(match.headers.items()):
        out.headers.add(name=name.lower(), string_match=_string_matcher(value))
    for name, value in sorted(match.without_headers.items()):
        out.headers.add(name=name.lower(), string_match=_string_matcher(value), invert_match=True)
    for name, value in sorted(match.query_params.items()):
        out.query_parameters.add(name=name, string_match=_string_matcher(value))


# -- policies ------------------------------------------------------------------------------ #


def _retry_policy(retries: HTTPRetry | None, status: TranslationStatus, where: str) -> rc.RetryPolicy | None:
    if retries is not None and retries.attempts == 0:
        return None
    policy = rc.RetryPolicy()
    policy.num_retries.value = DEFAULT_ATTEMPTS if retries is None else retries.attempts
    conditions: list[str] = []
    codes: list[int] = []
    retry_on = retries.retry_on if retries is not None and retries.retry_on else None
    if retry_on is None:
        conditions, codes = DEFAULT_RETRY_ON.split(","), list(DEFAULT_RETRY_CODES)
    else:
        for part in (p.strip() for p in retry_on.split(",")):
            if part.isdigit():
                codes.append(int(part))
            elif part in _SUPPORTED_RETRY_ON:
                conditions.append(part)
            elif part:
                status.error(where, f"retryOn condition {part!r} is not supported; left out")
        if codes and "retriable-status-codes" not in conditions:
            conditions.append("retriable-status-codes")
        if not conditions:
            return None
    policy.retry_on = ",".join(conditions)
    policy.retriable_status_codes.extend(codes)
    if retries is not None and retries.per_try_timeout is not None:
        policy.per_try_timeout.CopyFrom(duration(parse_duration(retries.per_try_timeout)))
    # By name: Envoy finds the extension by name when typed_config is unset, and
    # PreviousHostsPredicate has no settings to carry.
    policy.retry_host_predicate.add(name=PREVIOUS_HOSTS)
    policy.host_selection_retry_max_attempts = HOST_SELECTION_ATTEMPTS
    return policy


def _fraction(percent: PercentValue | None) -> percent_pb2.FractionalPercent:
    value = 100.0 if percent is None else percent.value
    return percent_pb2.FractionalPercent(numerator=round(value * 10_000),
                                         denominator=percent_pb2.FractionalPercent.MILLION)


def fault_config(fault: HTTPFaultInjection) -> fault_pb2.HTTPFault:
    out = fault_pb2.HTTPFault()
    if fault.delay is not None:
        out.delay.fixed_delay.CopyFrom(duration(parse_duration(fault.delay.fixed_delay)))
        out.delay.percentage.CopyFrom(_fraction(fault.delay.percentage))
    if fault.abort is not None:
        out.abort.http_status = fault.abort.http_status
        out.abort.percentage.CopyFrom(_fraction(fault.abort.percentage))
    return out


def _hash_policy(rs: ResourceSet, action: rc.RouteAction, host: str, port: int, subset: str) -> None:
    target = find_target(rs, host, port, subset)
    lb = target.policy.load_balancer if target is not None else None
    hashing = lb.consistent_hash if lb is not None else None
    if hashing is None:
        return
    policy = action.hash_policy.add()
    if hashing.http_header_name is not None:
        policy.header.header_name = hashing.http_header_name
    elif hashing.http_cookie is not None:
        policy.cookie.name = hashing.http_cookie.name
    elif hashing.use_source_ip:
        policy.connection_properties.source_ip = True
    elif hashing.http_query_parameter_name is not None:
        policy.query_parameter.name = hashing.http_query_parameter_name


# -- header operations ------------------------------------------------------------------------ #


def _add_headers(to_add: object, to_remove: object, ops: HeaderOperations) -> None:
    adds = to_add  # RepeatedCompositeFieldContainer[HeaderValueOption]
    for name, value in sorted(ops.set.items()):
        option = adds.add()  # type: ignore[attr-defined]
        option.header.key, option.header.value = name.lower(), value
        option.append_action = base_pb2.HeaderValueOption.OVERWRITE_IF_EXISTS_OR_ADD
    for name, value in sorted(ops.add.items()):
        option = adds.add()  # type: ignore[attr-defined]
        option.header.key, option.header.value = name.lower(), value
        option.append_action = base_pb2.HeaderValueOption.APPEND_IF_EXISTS_OR_ADD
    to_remove.extend(h.lower() for h in ops.remove)  # type: ignore[attr-defined]


def _header_operations(route: rc.Route, headers: Headers | None) -> None:
    if headers is None:
        return
    if headers.request is not None:
        _add_headers(route.request_headers_to_add, route.request_headers_to_remove, headers.request)
    if headers.response is not None:
        _add_headers(route.response_headers_to_add, route.response_headers_to_remove, headers.response)


def _destination_headers(action: rc.RouteAction, headers: Headers | None, where: str,
                         status: TranslationStatus) -> None:
    # A single destination's headers belong on the route; the caller's route
    # object is the action's parent, which protobuf does not expose, so they
    # are applied as a one-cluster weighted_clusters entry instead.
    if headers is None:
        return
    name = action.cluster
    action.ClearField("cluster")
    entry = action.weighted_clusters.clusters.add(name=name)
    entry.weight.value = 100
    _weight_headers(entry, headers)


def _weight_headers(entry: rc.WeightedCluster.ClusterWeight, headers: Headers | None) -> None:
    if headers is not None and headers.request is not None:
        _add_headers(entry.request_headers_to_add, entry.request_headers_to_remove, headers.request)
    if headers is not None and headers.response is not None:
        _add_headers(entry.response_headers_to_add, entry.response_headers_to_remove, headers.response)


def route_labels(labels: Mapping[str, str]) -> tuple[tuple[str, str], ...]:
    return tuple(sorted(labels.items()))
