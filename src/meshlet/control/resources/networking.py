"""networking.istio.io resources: VirtualService, DestinationRule, Gateway,
ServiceEntry and WorkloadEntry (the subset meshlet implements).

Field names and meanings follow Istio's API reference; fields meshlet does not
implement are not modelled, so they are refused as unknown fields rather than
silently ignored.
"""

from __future__ import annotations

from typing import Annotated, ClassVar, Literal

from pydantic import BeforeValidator, Field, model_validator

from meshlet.control.resources.base import (
    Address,
    DnsLabel,
    Duration,
    Host,
    Labels,
    Percent,
    Port,
    Regex,
    Resource,
    Strict,
    Weight,
    check_host,
)

NETWORKING = "networking.istio.io"
NETWORKING_VERSIONS = ("v1", "v1beta1", "v1alpha3")

def _upper(value: object) -> object:
    return value.upper() if isinstance(value, str) else value


# Istio matches protocol names case-insensitively ("http" in its own samples);
# stored upper-case.
Protocol = Annotated[
    Literal["HTTP", "HTTPS", "GRPC", "HTTP2", "TCP", "TLS", "MONGO"], BeforeValidator(_upper)]


class StringMatch(Strict):
    """Exactly one of ``exact``, ``prefix`` or ``regex`` (RE2 syntax in Istio; checked with Python's re)."""

    exact: str | None = None
    prefix: str | None = None
    regex: Regex | None = None

    @model_validator(mode="after")
    def _exactly_one(self) -> StringMatch:
        set_fields = [f for f in ("exact", "prefix", "regex") if getattr(self, f) is not None]
        if len(set_fields) != 1:
            raise ValueError(f"set exactly one of exact, prefix, regex (got {set_fields or 'none'})")
        return self


class PortSelector(Strict):
    number: Port


class Destination(Strict):
    host: Host
    subset: DnsLabel | None = None
    port: PortSelector | None = None


class PercentValue(Strict):
    value: Percent


class HTTPMatchRequest(Strict):
    name: str | None = None
    uri: StringMatch | None = None
    scheme: StringMatch | None = None
    method: StringMatch | None = None
    authority: StringMatch | None = None
    headers: dict[str, StringMatch] = Field(default_factory=dict)
    without_headers: dict[str, StringMatch] = Field(default_factory=dict)
    query_params: dict[str, StringMatch] = Field(default_factory=dict)
    port: Port | None = None
    source_labels: Labels = Field(default_factory=dict)
    source_namespace: DnsLabel | None = None
    gateways: list[str] = Field(default_factory=list)
    ignore_uri_case: bool = False


class HeaderOperations(Strict):
    set: dict[str, str] = Field(default_factory=dict)
    add: dict[str, str] = Field(default_factory=dict)
    remove: list[str] = Field(default_factory=list)


class Headers(Strict):
    request: HeaderOperations | None = None
    response: HeaderOperations | None = None


class HTTPRouteDestination(Strict):
    destination: Destination
    weight: Weight | None = None
    headers: Headers | None = None


class HTTPRetry(Strict):
    attempts: int = Field(ge=0)
    per_try_timeout: Duration | None = None
    retry_on: str | None = None
    retry_remote_localities: bool | None = None


class FaultDelay(Strict):
    fixed_delay: Duration
    percentage: PercentValue | None = None


class FaultAbort(Strict):
    http_status: int = Field(ge=200, le=599)
    percentage: PercentValue | None = None


class HTTPFaultInjection(Strict):
    delay: FaultDelay | None = None
    abort: FaultAbort | None = None

    @model_validator(mode="after")
    def _some_fault(self) -> HTTPFaultInjection:
        if self.delay is None and self.abort is None:
            raise ValueError("a fault needs a delay, an abort or both")
        return self


class HTTPRedirect(Strict):
    uri: str | None = None
    authority: str | None = None
    redirect_code: int | None = Field(default=None, ge=300, le=399)


class HTTPRewrite(Strict):
    uri: str | None = None
    authority: str | None = None


class HTTPRoute(Strict):
    name: str | None = None
    match: list[HTTPMatchRequest] = Field(default_factory=list)
    route: list[HTTPRouteDestination] = Field(default_factory=list)
    redirect: HTTPRedirect | None = None
    rewrite: HTTPRewrite | None = None
    timeout: Duration | None = None
    retries: HTTPRetry | None = None
    fault: HTTPFaultInjection | None = None
    mirror: Destination | None = None
    mirror_percentage: PercentValue | None = None
    headers: Headers | None = None

    @model_validator(mode="after")
    def _route_or_redirect(self) -> HTTPRoute:
        if self.mirror_percentage is not None and self.mirror is None:
            raise ValueError("mirrorPercentage needs a mirror")
        if not self.route and self.redirect is None:
            raise ValueError("an http route needs a route or a redirect")
        if self.route and self.redirect is not None:
            raise ValueError("an http route cannot have both route and redirect")
        return self


class L4MatchAttributes(Strict):
    destination_subnets: list[str] = Field(default_factory=list)
    port: Port | None = None
    source_labels: Labels = Field(default_factory=dict)
    gateways: list[str] = Field(default_factory=list)
    source_namespace: DnsLabel | None = None


class RouteDestination(Strict):
    destination: Destination
    weight: Weight | None = None


class TCPRoute(Strict):
    match: list[L4MatchAttributes] = Field(default_factory=list)
    route: list[RouteDestination] = Field(min_length=1)


class VirtualServiceSpec(Strict):
    hosts: list[Host] = Field(min_length=1)
    gateways: list[str] = Field(default_factory=list)
    http: list[HTTPRoute] = Field(default_factory=list)
    tcp: list[TCPRoute] = Field(default_factory=list)
    export_to: list[str] = Field(default_factory=list)


class VirtualService(Resource):
    KIND: ClassVar[str] = "VirtualService"
    GROUP: ClassVar[str] = NETWORKING
    ACCEPTED_VERSIONS: ClassVar[tuple[str, ...]] = NETWORKING_VERSIONS
    kind: Literal["VirtualService"] = "VirtualService"
    spec: VirtualServiceSpec


# -- DestinationRule --------------------------------------------------------- #


class HTTPCookie(Strict):
    name: str
    path: str | None = None
    ttl: Duration | None = None


class RingHash(Strict):
    minimum_ring_size: int | None = Field(default=None, ge=1)


class Maglev(Strict):
    table_size: int | None = Field(default=None, ge=1)


class ConsistentHashLB(Strict):
    http_header_name: str | None = None
    http_cookie: HTTPCookie | None = None
    use_source_ip: bool | None = None
    http_query_parameter_name: str | None = None
    ring_hash: RingHash | None = None
    maglev: Maglev | None = None
    minimum_ring_size: int | None = Field(default=None, ge=1)

    @model_validator(mode="after")
    def _one_hash_key(self) -> ConsistentHashLB:
        keys = [k for k in ("http_header_name", "http_cookie", "use_source_ip", "http_query_parameter_name")
                if getattr(self, k) not in (None, False)]
        if len(keys) != 1:
            raise ValueError(
                "set exactly one of httpHeaderName, httpCookie, useSourceIp, httpQueryParameterName")
        return self


class LoadBalancerSettings(Strict):
    simple: Literal["UNSPECIFIED", "ROUND_ROBIN", "LEAST_REQUEST", "RANDOM", "PASSTHROUGH",
                    "LEAST_CONN"] | None = None
    consistent_hash: ConsistentHashLB | None = None
    warmup_duration_secs: Duration | None = None

    @model_validator(mode="after")
    def _simple_or_hash(self) -> LoadBalancerSettings:
        if self.simple is not None and self.consistent_hash is not None:
            raise ValueError("set simple or consistentHash, not both")
        return self


class TcpKeepalive(Strict):
    probes: int | None = Field(default=None, ge=0)
    time: Duration | None = None
    interval: Duration | None = None


class TCPSettings(Strict):
    max_connections: int | None = Field(default=None, ge=1)
    connect_timeout: Duration | None = None
    tcp_keepalive: TcpKeepalive | None = None
    max_connection_duration: Duration | None = None


class HTTPSettings(Strict):
    http1_max_pending_requests: int | None = Field(default=None, ge=1)
    http2_max_requests: int | None = Field(default=None, ge=1)
    max_requests_per_connection: int | None = Field(default=None, ge=0)
    max_retries: int | None = Field(default=None, ge=0)
    idle_timeout: Duration | None = None
    h2_upgrade_policy: Literal["DEFAULT", "DO_NOT_UPGRADE", "UPGRADE"] | None = None
    use_client_protocol: bool | None = None
    max_concurrent_streams: int | None = Field(default=None, ge=1)


class ConnectionPoolSettings(Strict):
    tcp: TCPSettings | None = None
    http: HTTPSettings | None = None


class OutlierDetection(Strict):
    consecutive_5xx_errors: int | None = Field(default=None, ge=0, alias="consecutive5xxErrors")
    consecutive_gateway_errors: int | None = Field(default=None, ge=0)
    consecutive_local_origin_failures: int | None = Field(default=None, ge=0)
    split_external_local_origin_errors: bool | None = None
    interval: Duration | None = None
    base_ejection_time: Duration | None = None
    max_ejection_percent: int | None = Field(default=None, ge=0, le=100)
    min_health_percent: int | None = Field(default=None, ge=0, le=100)


class ClientTLSSettings(Strict):
    # meshlet implements mesh mTLS (ISTIO_MUTUAL) and plaintext (DISABLE).
    mode: Literal["DISABLE", "ISTIO_MUTUAL"]
    sni: str | None = None


class PortTrafficPolicy(Strict):
    port: PortSelector
    load_balancer: LoadBalancerSettings | None = None
    connection_pool: ConnectionPoolSettings | None = None
    outlier_detection: OutlierDetection | None = None
    tls: ClientTLSSettings | None = None


class TrafficPolicy(Strict):
    load_balancer: LoadBalancerSettings | None = None
    connection_pool: ConnectionPoolSettings | None = None
    outlier_detection: OutlierDetection | None = None
    tls: ClientTLSSettings | None = None
    port_level_settings: list[PortTrafficPolicy] = Field(default_factory=list)


class Subset(Strict):
    name: DnsLabel
    labels: Labels = Field(default_factory=dict)
    traffic_policy: TrafficPolicy | None = None


class WorkloadSelector(Strict):
    match_labels: Labels = Field(default_factory=dict)


class DestinationRuleSpec(Strict):
    host: Host
    traffic_policy: TrafficPolicy | None = None
    subsets: list[Subset] = Field(default_factory=list)
    export_to: list[str] = Field(default_factory=list)
    workload_selector: WorkloadSelector | None = None

    @model_validator(mode="after")
    def _unique_subsets(self) -> DestinationRuleSpec:
        names = [s.name for s in self.subsets]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise ValueError(f"subset names must be unique: {', '.join(duplicates)} repeated")
        return self


class DestinationRule(Resource):
    KIND: ClassVar[str] = "DestinationRule"
    GROUP: ClassVar[str] = NETWORKING
    ACCEPTED_VERSIONS: ClassVar[tuple[str, ...]] = NETWORKING_VERSIONS
    kind: Literal["DestinationRule"] = "DestinationRule"
    spec: DestinationRuleSpec


# -- Gateway ----------------------------------------------------------------- #


class ServicePort(Strict):
    number: Port
    protocol: Protocol
    name: str
    target_port: Port | None = None


class ServerTLSSettings(Strict):
    https_redirect: bool | None = None
    mode: Literal["PASSTHROUGH", "SIMPLE", "MUTUAL", "ISTIO_MUTUAL"] | None = None
    credential_name: str | None = None
    server_certificate: str | None = None
    private_key: str | None = None
    ca_certificates: str | None = None
    subject_alt_names: list[str] = Field(default_factory=list)
    min_protocol_version: Literal["TLS_AUTO", "TLSV1_2", "TLSV1_3"] | None = None


class Server(Strict):
    port: ServicePort
    hosts: list[str] = Field(min_length=1)
    tls: ServerTLSSettings | None = None
    name: str | None = None
    bind: str | None = None

    @model_validator(mode="after")
    def _hosts(self) -> Server:
        # Gateway hosts may be namespace-qualified: "ns/host", "./host", "*/host".
        for host in self.hosts:
            check_host(host.rpartition("/")[2])
        return self


class GatewaySpec(Strict):
    selector: Labels = Field(default_factory=dict)
    servers: list[Server] = Field(min_length=1)


class Gateway(Resource):
    KIND: ClassVar[str] = "Gateway"
    GROUP: ClassVar[str] = NETWORKING
    ACCEPTED_VERSIONS: ClassVar[tuple[str, ...]] = NETWORKING_VERSIONS
    kind: Literal["Gateway"] = "Gateway"
    spec: GatewaySpec


# -- WorkloadEntry and ServiceEntry ------------------------------------------ #


class WorkloadEntrySpec(Strict):
    address: Address | None = None
    ports: dict[str, Port] = Field(default_factory=dict)
    labels: Labels = Field(default_factory=dict)
    network: str | None = None
    locality: str | None = None
    weight: int | None = Field(default=None, ge=0)
    service_account: str | None = None


class WorkloadEntry(Resource):
    KIND: ClassVar[str] = "WorkloadEntry"
    GROUP: ClassVar[str] = NETWORKING
    ACCEPTED_VERSIONS: ClassVar[tuple[str, ...]] = NETWORKING_VERSIONS
    kind: Literal["WorkloadEntry"] = "WorkloadEntry"
    spec: WorkloadEntrySpec


class ServiceEntrySpec(Strict):
    hosts: list[Host] = Field(min_length=1)
    addresses: list[str] = Field(default_factory=list)
    ports: list[ServicePort] = Field(default_factory=list)
    location: Literal["MESH_EXTERNAL", "MESH_INTERNAL"] | None = None
    resolution: Literal["NONE", "STATIC", "DNS", "DNS_ROUND_ROBIN"] | None = None
    endpoints: list[WorkloadEntrySpec] = Field(default_factory=list)
    workload_selector: WorkloadSelector | None = None
    export_to: list[str] = Field(default_factory=list)
    subject_alt_names: list[str] = Field(default_factory=list)

    @model_validator(mode="after")
    def _endpoints_or_selector(self) -> ServiceEntrySpec:
        if self.endpoints and self.workload_selector is not None:
            raise ValueError("set endpoints or workloadSelector, not both")
        return self


class ServiceEntry(Resource):
    KIND: ClassVar[str] = "ServiceEntry"
    GROUP: ClassVar[str] = NETWORKING
    ACCEPTED_VERSIONS: ClassVar[tuple[str, ...]] = NETWORKING_VERSIONS
    kind: Literal["ServiceEntry"] = "ServiceEntry"
    spec: ServiceEntrySpec
