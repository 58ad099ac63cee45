"""Plain runtime objects that config compiles into.

The hot path only ever sees these: frozen dataclasses with precompiled
matchers. Nothing here imports protobuf. The config compiler
(``meshlet.config.compiler``) builds them from Envoy v3 messages, for static
bootstrap files and xDS alike.

Durations are float seconds; ``None`` means "no limit" where Envoy uses 0 or
an unset field for that.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Literal

# --------------------------------------------------------------------------- #
# Matchers
# --------------------------------------------------------------------------- #


class StringMatchKind(StrEnum):
    EXACT = "exact"
    PREFIX = "prefix"
    SUFFIX = "suffix"
    CONTAINS = "contains"
    REGEX = "safe_regex"


@dataclass(frozen=True, slots=True)
class StringMatcher:
    """envoy.type.matcher.v3.StringMatcher, compiled.

    ``match`` is the precompiled predicate (for REGEX it wraps the compiled
    pattern of the active regex engine: full match, as Envoy's safe_regex).
    """

    kind: StringMatchKind
    value: str
    ignore_case: bool
    match: Callable[[str], bool] = field(compare=False, repr=False)


class HeaderMatchKind(StrEnum):
    EXACT = "exact"
    PREFIX = "prefix"
    SUFFIX = "suffix"
    CONTAINS = "contains"
    REGEX = "safe_regex"
    PRESENT = "present"
    STRING = "string_match"


@dataclass(frozen=True, slots=True)
class HeaderMatcher:
    """config.route.v3.HeaderMatcher. ``name`` is lower-case; ``:authority``,
    ``:path``, ``:method`` and ``:scheme`` address the request's pseudo-headers."""

    name: str
    kind: HeaderMatchKind
    invert: bool
    # For PRESENT: whether presence is required (present_match value).
    present: bool = True
    # For every other kind: the value predicate (already honouring ignore_case).
    value: StringMatcher | None = None
    # Match when the header is absent (treat_missing_header_as_empty).
    treat_missing_as_empty: bool = False


@dataclass(frozen=True, slots=True)
class QueryParameterMatcher:
    name: str
    # None with present=True: the parameter must be present, any value.
    value: StringMatcher | None
    present: bool = True


class PathMatchKind(StrEnum):
    PREFIX = "prefix"
    PATH = "path"
    REGEX = "safe_regex"


@dataclass(frozen=True, slots=True)
class RouteMatch:
    path_kind: PathMatchKind
    path_value: str
    case_sensitive: bool = True
    # Set for REGEX: full-match predicate over the path without the query string.
    path_regex: Callable[[str], bool] | None = field(default=None, compare=False, repr=False)
    headers: tuple[HeaderMatcher, ...] = ()
    query_parameters: tuple[QueryParameterMatcher, ...] = ()
    grpc_only: bool = False
    # runtime_fraction: the route matches only this share of requests.
    runtime_fraction: FractionalPercent | None = None


# --------------------------------------------------------------------------- #
# Header mutation
# --------------------------------------------------------------------------- #


class AppendAction(StrEnum):
    APPEND_IF_EXISTS_OR_ADD = "APPEND_IF_EXISTS_OR_ADD"
    ADD_IF_ABSENT = "ADD_IF_ABSENT"
    OVERWRITE_IF_EXISTS_OR_ADD = "OVERWRITE_IF_EXISTS_OR_ADD"
    OVERWRITE_IF_EXISTS = "OVERWRITE_IF_EXISTS"


@dataclass(frozen=True, slots=True)
class HeaderValueOption:
    name: str  # lower-case
    value: str
    action: AppendAction = AppendAction.APPEND_IF_EXISTS_OR_ADD


@dataclass(frozen=True, slots=True)
class HeaderMutation:
    add: tuple[HeaderValueOption, ...] = ()
    remove: tuple[str, ...] = ()  # lower-case names

    @property
    def empty(self) -> bool:
        return not self.add and not self.remove


NO_MUTATION = HeaderMutation()

# --------------------------------------------------------------------------- #
# Routes
# --------------------------------------------------------------------------- #


@dataclass(frozen=True, slots=True)
class FractionalPercent:
    """type.v3.FractionalPercent: ``numerator`` out of ``denominator`` (100,
    10000 or 1000000). Matches when a uniform draw in [0, denominator) is below
    the numerator."""

    numerator: int
    denominator: int = 100

    @property
    def always(self) -> bool:
        return self.numerator >= self.denominator

    @property
    def never(self) -> bool:
        return self.numerator <= 0


@dataclass(frozen=True, slots=True)
class RuntimeFraction:
    """core.v3.RuntimeFractionalPercent: ``default`` unless the bootstrap's
    static runtime layer sets ``runtime_key`` (resolved at compile time)."""

    default: FractionalPercent
    runtime_key: str = ""


# Envoy's retry back-off defaults.
DEFAULT_RETRY_BASE_INTERVAL = 0.025
# Bytes of request body kept for a retry or a mirror when the route sets no
# per_request_buffer_limit_bytes: Envoy's default connection buffer limit.
DEFAULT_REQUEST_BUFFER_LIMIT = 1024 * 1024


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """config.route.v3.RetryPolicy, compiled.

    ``retry_on`` holds Envoy's condition names ("5xx", "gateway-error",
    "reset", "connect-failure", "retriable-4xx", "refused-stream",
    "retriable-status-codes", "retriable-headers").
    """

    retry_on: frozenset[str] = frozenset()
    num_retries: int = 1
    per_try_timeout: float | None = None
    retriable_status_codes: frozenset[int] = frozenset()
    # Matched against the upstream response's headers ("retriable-headers").
    retriable_headers: tuple[HeaderMatcher, ...] = ()
    back_off_base: float = DEFAULT_RETRY_BASE_INTERVAL
    back_off_max: float = DEFAULT_RETRY_BASE_INTERVAL * 10
    # envoy.retry_host_predicates.previous_hosts: avoid hosts already tried.
    avoid_previous_hosts: bool = False
    host_selection_retry_max_attempts: int = 1


class HashPolicyKind(StrEnum):
    HEADER = "header"
    COOKIE = "cookie"
    SOURCE_IP = "source_ip"
    QUERY_PARAMETER = "query_parameter"


@dataclass(frozen=True, slots=True)
class HashPolicy:
    """route.v3.RouteAction.HashPolicy: what a consistent-hash load balancer
    (RING_HASH, MAGLEV) hashes. ``name`` is the header (lower-case), cookie or
    query parameter name; unused for SOURCE_IP."""

    kind: HashPolicyKind
    name: str = ""
    terminal: bool = False


@dataclass(frozen=True, slots=True)
class WeightedCluster:
    """One entry of route.v3.WeightedCluster.clusters."""

    name: str
    weight: int
    request_headers: HeaderMutation = NO_MUTATION
    response_headers: HeaderMutation = NO_MUTATION


@dataclass(frozen=True, slots=True)
class MirrorPolicy:
    """route.v3.RouteAction.RequestMirrorPolicy: copies of the request go to
    ``cluster`` (host suffixed "-shadow"); None fraction: every request."""

    cluster: str
    fraction: FractionalPercent | None = None


@dataclass(frozen=True, slots=True)
class ClusterAction:
    """route.v3.RouteAction with a single ``cluster``."""

    cluster: str
    prefix_rewrite: str | None = None
    # regex_rewrite is not supported yet (refused by the compiler).
    host_rewrite_literal: str | None = None
    auto_host_rewrite: bool = False
    timeout: float | None = 15.0  # Envoy's default route timeout
    idle_timeout: float | None = None
    retry_policy: RetryPolicy | None = None
    # Upgrades the route allows (e.g. "websocket"), lower-case.
    upgrades: frozenset[str] = frozenset()
    # weighted_clusters: when set, ``cluster`` is "" and one of these is
    # picked per request in proportion to its weight (sum: ``total_weight``).
    weighted_clusters: tuple[WeightedCluster, ...] = ()
    total_weight: int = 0
    mirror_policies: tuple[MirrorPolicy, ...] = ()
    # Consistent-hash inputs for RING_HASH / MAGLEV clusters, in order.
    hash_policies: tuple[HashPolicy, ...] = ()
    # Circuit-breaker priority of the route's requests (RoutingPriority).
    priority: Literal["DEFAULT", "HIGH"] = "DEFAULT"


@dataclass(frozen=True, slots=True)
class DirectResponseAction:
    status: int
    body: bytes = b""


@dataclass(frozen=True, slots=True)
class RedirectAction:
    """route.v3.RedirectAction. ``None`` fields keep the request's value."""

    scheme: str | None = None
    host: str | None = None
    port: int | None = None
    path: str | None = None
    prefix_rewrite: str | None = None
    response_code: int = 301
    strip_query: bool = False


RouteActionT = ClusterAction | DirectResponseAction | RedirectAction


@dataclass(frozen=True, slots=True)
class Route:
    name: str
    match: RouteMatch
    action: RouteActionT
    request_headers: HeaderMutation = NO_MUTATION
    response_headers: HeaderMutation = NO_MUTATION
    # Index in its virtual host, for stats and first-match-wins ordering.
    index: int = 0
    # typed_per_filter_config: HTTP filter name -> that filter's compiled override.
    per_filter_config: dict[str, object] = field(default_factory=dict, compare=False)
    # None: the virtual host's limit (or DEFAULT_REQUEST_BUFFER_LIMIT).
    per_request_buffer_limit: int | None = None


class DomainKind(StrEnum):
    EXACT = "exact"
    SUFFIX = "suffix"  # "*.example.com" / "*-bar.foo.com"
    PREFIX = "prefix"  # "foo.*"
    ANY = "any"  # "*"


@dataclass(frozen=True, slots=True)
class VirtualHost:
    name: str
    domains: tuple[str, ...]
    routes: tuple[Route, ...]
    request_headers: HeaderMutation = NO_MUTATION
    response_headers: HeaderMutation = NO_MUTATION
    require_tls: Literal["NONE", "EXTERNAL_ONLY", "ALL"] = "NONE"
    # Used by routes that have no retry_policy of their own.
    retry_policy: RetryPolicy | None = None
    include_request_attempt_count: bool = False
    include_attempt_count_in_response: bool = False
    per_filter_config: dict[str, object] = field(default_factory=dict, compare=False)
    per_request_buffer_limit: int | None = None


@dataclass(frozen=True, slots=True)
class RouteConfiguration:
    """route.v3.RouteConfiguration compiled: see ``meshlet.proxy.routing`` for
    the table that selects a virtual host and a route for a request."""

    name: str
    virtual_hosts: tuple[VirtualHost, ...]
    request_headers: HeaderMutation = NO_MUTATION
    response_headers: HeaderMutation = NO_MUTATION
    # The compiled lookup structure (meshlet.proxy.routing.RouteTable); typed
    # loosely here to keep this module free of runtime imports.
    table: object = field(default=None, compare=False, repr=False)


# --------------------------------------------------------------------------- #
# TLS / transport sockets
# --------------------------------------------------------------------------- #


@dataclass(frozen=True, slots=True)
class PrivateKeyProviderConfig:
    """tls.v3.PrivateKeyProvider: provider name and its settings (from a TypedStruct)."""

    provider_name: str
    settings: dict[str, object] = field(default_factory=dict, compare=False)
    fallback: bool = False


@dataclass(frozen=True, slots=True)
class TlsCertificate:
    cert_chain_pem: bytes
    private_key_pem: bytes | None = None
    private_key_provider: PrivateKeyProviderConfig | None = None
    # Where the material came from, for /config_dump and /certs (never the key).
    source: str = ""


class SanType(StrEnum):
    DNS = "DNS"
    URI = "URI"
    EMAIL = "EMAIL"
    IP_ADDRESS = "IP_ADDRESS"


@dataclass(frozen=True, slots=True)
class SanMatcher:
    san_type: SanType
    matcher: StringMatcher


@dataclass(frozen=True, slots=True)
class CertificateValidation:
    trusted_ca_pem: bytes | None = None
    san_matchers: tuple[SanMatcher, ...] = ()
    # Skip chain verification entirely (only with an explicit trust_chain_verification: ACCEPT_UNTRUSTED).
    accept_untrusted: bool = False


@dataclass(frozen=True, slots=True)
class TlsContext:
    """DownstreamTlsContext / UpstreamTlsContext, compiled."""

    server_side: bool
    certificates: tuple[TlsCertificate, ...] = ()
    validation: CertificateValidation | None = None
    require_client_certificate: bool = False
    alpn_protocols: tuple[str, ...] = ()
    sni: str | None = None  # upstream only
    min_version: str = "TLSv1_2"
    max_version: str = "TLSv1_3"
    cipher_suites: tuple[str, ...] = ()
    ecdh_curves: tuple[str, ...] = ()
    # "openssl" (stdlib ssl) or "meshlet" (meshlet.tls); None: the proxy's default.
    engine: str | None = None


@dataclass(frozen=True, slots=True)
class TransportSocketConfig:
    """config.core.v3.TransportSocket: ``raw_buffer`` (plain) or ``tls``."""

    name: str
    tls: TlsContext | None = None


PLAINTEXT = TransportSocketConfig(name="envoy.transport_sockets.raw_buffer")

# --------------------------------------------------------------------------- #
# Access logs
# --------------------------------------------------------------------------- #


@dataclass(frozen=True, slots=True)
class AccessLogConfig:
    """``envoy.access_loggers.file`` / ``envoy.access_loggers.stdout`` / ``stderr``.

    ``path`` is "/dev/stdout" for the stdout logger. Exactly one of
    ``text_format`` (Envoy command operators, e.g. ``%START_TIME%``) and
    ``json_format`` (key -> operator string) is set; neither means Envoy's
    default text format.
    """

    path: str
    text_format: str | None = None
    json_format: dict[str, str] | None = None


# --------------------------------------------------------------------------- #
# Listeners
# --------------------------------------------------------------------------- #


@dataclass(frozen=True, slots=True)
class SocketAddress:
    host: str
    port: int

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


@dataclass(frozen=True, slots=True)
class HttpFilterConfig:
    """One entry of http_connection_manager.http_filters. ``config`` is the
    extension's own compiled object (built by the extension's factory)."""

    name: str
    type_url: str
    config: object = field(compare=False, default=None)
    disabled: bool = False


class CodecType(StrEnum):
    AUTO = "AUTO"
    HTTP1 = "HTTP1"
    HTTP2 = "HTTP2"


@dataclass(frozen=True, slots=True)
class Http2Settings:
    max_concurrent_streams: int = 2147483647
    initial_stream_window_size: int = 268435456
    initial_connection_window_size: int = 268435456
    allow_connect: bool = False


@dataclass(frozen=True, slots=True)
class HttpConnectionManagerConfig:
    stat_prefix: str
    codec_type: CodecType = CodecType.AUTO
    # Inline route_config (RDS later): the route configuration's name.
    route_config_name: str = ""
    route_config: RouteConfiguration | None = None
    http_filters: tuple[HttpFilterConfig, ...] = ()
    access_logs: tuple[AccessLogConfig, ...] = ()
    max_request_headers_kb: int = 60
    request_headers_timeout: float | None = 10.0
    stream_idle_timeout: float | None = 300.0
    request_timeout: float | None = None
    idle_timeout: float | None = 3600.0  # common_http_protocol_options.idle_timeout (connection)
    drain_timeout: float = 5.0
    max_connection_duration: float | None = None
    use_remote_address: bool = False
    xff_num_trusted_hops: int = 0
    skip_xff_append: bool = False
    generate_request_id: bool = True
    preserve_external_request_id: bool = False
    server_name: str = "meshlet"
    http2: Http2Settings = Http2Settings()
    # Upgrades allowed on every route (upgrade_configs), lower-case.
    upgrades: frozenset[str] = frozenset()
    # Reject "headers_with_underscores" etc. are not configurable yet.


@dataclass(frozen=True, slots=True)
class TcpProxyConfig:
    stat_prefix: str
    cluster: str
    idle_timeout: float | None = 3600.0
    access_logs: tuple[AccessLogConfig, ...] = ()
    max_connect_attempts: int = 1


NetworkFilterConfig = HttpConnectionManagerConfig | TcpProxyConfig


@dataclass(frozen=True, slots=True)
class FilterChainMatch:
    server_names: tuple[str, ...] = ()  # exact or "*.suffix"
    application_protocols: tuple[str, ...] = ()
    transport_protocol: str = ""  # "", "raw_buffer" or "tls"
    destination_port: int | None = None


@dataclass(frozen=True, slots=True)
class FilterChain:
    name: str
    match: FilterChainMatch
    transport_socket: TransportSocketConfig
    # In order; the last one is terminal (http_connection_manager or tcp_proxy).
    filters: tuple[NetworkFilterConfig, ...]


@dataclass(frozen=True, slots=True)
class Listener:
    name: str
    address: SocketAddress
    filter_chains: tuple[FilterChain, ...]
    default_filter_chain: FilterChain | None = None
    # Listener filters by name, e.g. "envoy.filters.listener.tls_inspector".
    listener_filters: tuple[str, ...] = ()
    listener_filters_timeout: float = 15.0
    per_connection_buffer_limit_bytes: int = 1024 * 1024
    stat_prefix: str = ""
    # enable_reuse_port: SO_REUSEPORT on the listening socket (several
    # processes accepting on one address).
    reuse_port: bool = False

    @property
    def inspects_tls(self) -> bool:
        return "envoy.filters.listener.tls_inspector" in self.listener_filters


# --------------------------------------------------------------------------- #
# Clusters and endpoints
# --------------------------------------------------------------------------- #


class DiscoveryType(StrEnum):
    STATIC = "STATIC"
    STRICT_DNS = "STRICT_DNS"
    EDS = "EDS"


class LbPolicy(StrEnum):
    ROUND_ROBIN = "ROUND_ROBIN"
    LEAST_REQUEST = "LEAST_REQUEST"
    RANDOM = "RANDOM"
    RING_HASH = "RING_HASH"
    MAGLEV = "MAGLEV"


class HealthStatus(StrEnum):
    UNKNOWN = "UNKNOWN"
    HEALTHY = "HEALTHY"
    UNHEALTHY = "UNHEALTHY"
    DRAINING = "DRAINING"
    TIMEOUT = "TIMEOUT"
    DEGRADED = "DEGRADED"


@dataclass(frozen=True, slots=True)
class Endpoint:
    address: SocketAddress
    weight: int = 1
    health_status: HealthStatus = HealthStatus.UNKNOWN
    hostname: str = ""


@dataclass(frozen=True, slots=True)
class LocalityEndpoints:
    endpoints: tuple[Endpoint, ...]
    locality: str = ""  # "region/zone/sub_zone"
    weight: int | None = None
    priority: int = 0


@dataclass(frozen=True, slots=True)
class ClusterLoadAssignment:
    cluster_name: str
    localities: tuple[LocalityEndpoints, ...]

    def all_endpoints(self) -> tuple[Endpoint, ...]:
        return tuple(ep for loc in self.localities for ep in loc.endpoints)


class UpstreamProtocol(StrEnum):
    HTTP1 = "http1"
    HTTP2 = "http2"
    # auto_config: h2 when ALPN negotiates it over TLS, else HTTP/1.1.
    AUTO = "auto"
    # use_downstream_protocol_config: the same protocol as the downstream request.
    DOWNSTREAM = "downstream"


@dataclass(frozen=True, slots=True)
class SlowStartConfig:
    """Cluster.SlowStartConfig: a new host's weight ramps up over ``window``
    seconds as ``max(min_weight_percent/100, (age/window) ** (1/aggression))``."""

    window: float
    aggression: float = 1.0
    min_weight_percent: float = 10.0


@dataclass(frozen=True, slots=True)
class LbSettings:
    """The load-balancer knobs of a cluster (common_lb_config and the
    per-policy ``*_lb_config`` messages)."""

    healthy_panic_threshold: float = 50.0  # percent; 0 disables panic mode
    locality_weighted: bool = False
    choice_count: int = 2  # LEAST_REQUEST
    active_request_bias: float = 1.0  # LEAST_REQUEST
    slow_start: SlowStartConfig | None = None  # ROUND_ROBIN / LEAST_REQUEST
    ring_min_size: int = 1024  # RING_HASH
    ring_max_size: int = 8 * 1024 * 1024  # RING_HASH
    maglev_table_size: int = 65537  # MAGLEV (must be prime)


class HealthCheckKind(StrEnum):
    HTTP = "http"
    TCP = "tcp"


@dataclass(frozen=True, slots=True)
class HealthCheckConfig:
    """core.v3.HealthCheck (HTTP or TCP), compiled. Durations in seconds."""

    kind: HealthCheckKind
    timeout: float
    interval: float
    unhealthy_threshold: int
    healthy_threshold: int
    initial_jitter: float = 0.0
    interval_jitter: float = 0.0
    interval_jitter_percent: int = 0
    no_traffic_interval: float = 60.0
    no_traffic_healthy_interval: float | None = None  # None: no_traffic_interval
    unhealthy_interval: float | None = None  # None: interval
    # HTTP
    path: str = "/"
    host: str = ""  # empty: the cluster name, as Envoy
    method: str = "GET"
    request_headers: tuple[tuple[str, str], ...] = ()
    request_headers_to_remove: tuple[str, ...] = ()
    # Half-open [start, end) status ranges; Envoy's default is 200 only.
    expected_statuses: tuple[tuple[int, int], ...] = ((200, 201),)
    # TCP: bytes to send, then each of ``receive`` must appear in the reply, in order.
    send: bytes = b""
    receive: tuple[bytes, ...] = ()


@dataclass(frozen=True, slots=True)
class OutlierDetectionConfig:
    """cluster.v3.OutlierDetection with Envoy's defaults. Percentages are 0..100;
    ``success_rate_stdev_factor`` is in thousandths, as in Envoy (1900 = 1.9)."""

    consecutive_5xx: int = 5
    consecutive_gateway_failure: int = 5
    interval: float = 10.0
    base_ejection_time: float = 30.0
    max_ejection_time: float = 300.0
    max_ejection_percent: int = 10
    enforcing_consecutive_5xx: int = 100
    enforcing_consecutive_gateway_failure: int = 0
    enforcing_success_rate: int = 100
    success_rate_minimum_hosts: int = 5
    success_rate_request_volume: int = 100
    success_rate_stdev_factor: int = 1900
    always_eject_one_host: bool = False


@dataclass(frozen=True, slots=True)
class CircuitBreakerThresholds:
    """CircuitBreakers.Thresholds for one priority, with Envoy's defaults."""

    max_connections: int = 1024
    max_pending_requests: int = 1024
    max_requests: int = 1024
    max_retries: int = 3
    track_remaining: bool = False


@dataclass(frozen=True, slots=True)
class CircuitBreakers:
    default: CircuitBreakerThresholds = CircuitBreakerThresholds()
    high: CircuitBreakerThresholds = CircuitBreakerThresholds()


@dataclass(frozen=True, slots=True)
class Cluster:
    name: str
    discovery: DiscoveryType
    lb_policy: LbPolicy = LbPolicy.ROUND_ROBIN
    connect_timeout: float = 5.0
    load_assignment: ClusterLoadAssignment | None = None
    transport_socket: TransportSocketConfig = PLAINTEXT
    protocol: UpstreamProtocol = UpstreamProtocol.HTTP1
    http2: Http2Settings = Http2Settings()
    idle_timeout: float | None = 3600.0  # common_http_protocol_options.idle_timeout
    max_requests_per_connection: int | None = None
    per_connection_buffer_limit_bytes: int = 1024 * 1024
    dns_refresh_rate: float = 5.0
    dns_lookup_family: Literal["AUTO", "V4_ONLY", "V6_ONLY", "V4_PREFERRED", "ALL"] = "AUTO"
    respect_dns_ttl: bool = False
    lb: LbSettings = LbSettings()
    health_checks: tuple[HealthCheckConfig, ...] = ()
    outlier_detection: OutlierDetectionConfig | None = None
    circuit_breakers: CircuitBreakers = CircuitBreakers()


# --------------------------------------------------------------------------- #
# Secrets and the whole snapshot
# --------------------------------------------------------------------------- #


@dataclass(frozen=True, slots=True)
class Secret:
    """tls.v3.Secret: a tls_certificate or a validation_context, by name (SDS)."""

    name: str
    tls_certificate: TlsCertificate | None = None
    validation: CertificateValidation | None = None


@dataclass(frozen=True, slots=True)
class AdminConfig:
    address: SocketAddress | None
    access_log_path: str | None = None


@dataclass(frozen=True, slots=True)
class AdsConfig:
    """``dynamic_resources``: listeners and clusters (and what they name) over one ADS stream."""

    # The static cluster of the management server (envoy_grpc.cluster_name).
    cluster: str
    # api_type DELTA_GRPC; otherwise GRPC (state of the world).
    delta: bool = False
    lds: bool = True  # lds_config: {ads: {}}
    cds: bool = True  # cds_config: {ads: {}}


@dataclass(frozen=True, slots=True)
class ProxyConfig:
    """Everything one proxy runs, as plain objects. Replaced whole, atomically."""

    listeners: dict[str, Listener] = field(default_factory=dict)
    clusters: dict[str, Cluster] = field(default_factory=dict)
    route_configs: dict[str, RouteConfiguration] = field(default_factory=dict)
    secrets: dict[str, Secret] = field(default_factory=dict)
    admin: AdminConfig | None = None
    node_id: str = ""
    node_cluster: str = ""
    # Process-wide settings from the bootstrap's meshlet extension (layered runtime):
    # e.g. {"tls_engine": "openssl", "regex_engine": "re"}.
    settings: dict[str, str] = field(default_factory=dict)
    # The bootstrap's dynamic_resources, when config also comes over xDS.
    ads: AdsConfig | None = None
    # The source config as JSON-ready dicts per resource, for /config_dump.
    source: dict[str, object] = field(default_factory=dict, compare=False, repr=False)


@dataclass(frozen=True, slots=True)
class RouterFilterConfig:
    """``envoy.filters.http.router`` (extensions.filters.http.router.v3.Router), compiled:
    the ``HttpFilterConfig.config`` of the terminal HTTP filter."""

    # Do not add x-envoy-* headers (e.g. x-envoy-upstream-service-time) to responses.
    suppress_envoy_headers: bool = False
