"""DestinationRule traffic policies, HTTP route options, TCP services and ServiceEntries in
the generated resources; everything compiles as the proxy would take it."""

from __future__ import annotations

from typing import Any

from translate_helpers import (
    SERVICES,
    WORKLOADS,
    as_dict,
    bookinfo,
    compile_like_a_proxy,
    load,
    node_of,
    workload_doc,
)

from meshlet.control.translate import ResourceSet, Translation, translate_with_status
from meshlet.xds.snapshot import CLUSTER, ENDPOINT, LISTENER, ROUTE

REVIEWS = "reviews.default.svc.cluster.local"


def find(t: Translation, type_url: str, name: str) -> dict[str, Any]:
    for message in t.messages[type_url]:
        data = as_dict(message)
        if data.get("name", data.get("cluster_name")) == name:
            return data
    raise AssertionError(f"no {name!r}")


def translated(*docs: str) -> Translation:
    t = translate_with_status(node_of("productpage-v1"), bookinfo(*docs))
    compile_like_a_proxy(t.messages)
    return t


POLICY = """
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: reviews}
spec:
  host: reviews
  trafficPolicy:
    loadBalancer: {simple: LEAST_REQUEST}
    connectionPool:
      tcp: {maxConnections: 100, connectTimeout: 3s}
      http: {http1MaxPendingRequests: 10, http2MaxRequests: 50, maxRetries: 3, idleTimeout: 30s}
    outlierDetection: {consecutive5xxErrors: 5, interval: 10s, baseEjectionTime: 30s, maxEjectionPercent: 50}
  subsets:
  - name: v1
    labels: {version: v1}
  - name: v2
    labels: {version: v2}
    trafficPolicy:
      loadBalancer:
        consistentHash: {httpHeaderName: x-user}
"""


def test_destination_rule_traffic_policy_per_cluster() -> None:
    t = translated(POLICY)
    v1 = find(t, CLUSTER, f"outbound|9080|v1|{REVIEWS}")
    assert v1["lb_policy"] == "LEAST_REQUEST"
    assert v1["connect_timeout"] == "3s"
    assert v1["circuit_breakers"]["thresholds"] == [
        {"max_connections": 100, "max_pending_requests": 10, "max_requests": 50, "max_retries": 3}]
    assert v1["outlier_detection"] == {"consecutive_5xx": 5, "enforcing_consecutive_5xx": 100,
                                       "interval": "10s", "base_ejection_time": "30s",
                                       "max_ejection_percent": 50}
    options = v1["typed_extension_protocol_options"]["envoy.extensions.upstreams.http.v3.HttpProtocolOptions"]
    assert options["common_http_protocol_options"]["idle_timeout"] == "30s"
    # The subset's own load balancer wins; the rest of the rule's policy still applies.
    v2 = find(t, CLUSTER, f"outbound|9080|v2|{REVIEWS}")
    assert v2["lb_policy"] == "RING_HASH" and v2["connect_timeout"] == "3s"


def test_consistent_hash_puts_a_hash_policy_on_the_route() -> None:
    vs = """
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: reviews}
spec:
  hosts: [reviews]
  http:
  - route:
    - destination: {host: reviews, subset: v2}
"""
    t = translated(POLICY, vs)
    routes = find(t, ROUTE, "9080")
    (route,) = next(v for v in routes["virtual_hosts"] if v["name"] == f"{REVIEWS}:9080")["routes"]
    assert route["route"]["hash_policy"] == [{"header": {"header_name": "x-user"}}]


def test_route_options() -> None:
    vs = """
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: reviews}
spec:
  hosts: [reviews]
  http:
  - name: legacy
    match:
    - uri: {prefix: /old}
      method: {exact: GET}
      queryParams: {debug: {exact: "1"}}
      ignoreUriCase: true
    redirect: {uri: /new, redirectCode: 302}
  - match:
    - uri: {regex: "/reviews/[0-9]+"}
      withoutHeaders: {x-canary: {exact: "yes"}}
    rewrite: {uri: /v1/reviews, authority: reviews.internal}
    timeout: 2s
    retries: {attempts: 4, perTryTimeout: 500ms, retryOn: "5xx,reset,503,cancelled"}
    headers:
      request: {set: {x-mesh: meshlet}, remove: [x-debug]}
      response: {add: {x-served-by: reviews}}
    route:
    - destination: {host: reviews, subset: v1}
      weight: 90
    - destination: {host: reviews, subset: v2}
  - route:
    - destination: {host: reviews, subset: v1}
    retries: {attempts: 0}
"""
    t = translate_with_status(node_of("productpage-v1"), bookinfo(POLICY, vs))
    compile_like_a_proxy(t.messages)
    routes = find(t, ROUTE, "9080")
    host = next(v for v in routes["virtual_hosts"] if v["name"] == f"{REVIEWS}:9080")
    legacy, main, fallback = host["routes"]
    assert legacy["match"]["case_sensitive"] is False
    assert legacy["match"]["headers"] == [{"name": ":method", "string_match": {"exact": "GET"}}]
    assert legacy["match"]["query_parameters"] == [{"name": "debug", "string_match": {"exact": "1"}}]
    assert legacy["redirect"] == {"path_redirect": "/new", "response_code": "FOUND"}
    assert main["match"]["safe_regex"]["regex"] == "/reviews/[0-9]+"
    assert main["match"]["headers"] == [{"name": "x-canary", "string_match": {"exact": "yes"},
                                         "invert_match": True}]
    action = main["route"]
    assert action["prefix_rewrite"] == "/v1/reviews" and action["host_rewrite_literal"] == "reviews.internal"
    assert action["timeout"] == "2s"
    assert [(c["name"], c["weight"]) for c in action["weighted_clusters"]["clusters"]] == [
        (f"outbound|9080|v1|{REVIEWS}", 90), (f"outbound|9080|v2|{REVIEWS}", 10)]
    retry = action["retry_policy"]
    assert retry["num_retries"] == 4 and retry["per_try_timeout"] == "0.500s"
    assert retry["retry_on"] == "5xx,reset,retriable-status-codes"
    assert retry["retriable_status_codes"] == [503]
    assert main["request_headers_to_add"] == [{"header": {"key": "x-mesh", "value": "meshlet"},
                                               "append_action": "OVERWRITE_IF_EXISTS_OR_ADD"}]
    assert main["request_headers_to_remove"] == ["x-debug"]
    assert "retry_policy" not in fallback["route"]
    # The gRPC-only retry condition is refused by name, not silently dropped.
    assert any("'cancelled'" in n.message for n in t.status.of_level("error"))


def test_tcp_service_gets_a_tcp_proxy() -> None:
    mongo = """
apiVersion: meshlet.dev/v1
kind: Service
metadata: {name: mongodb}
spec: {ports: [{name: mongo, number: 27017, protocol: TCP}]}
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: mongodb}
spec:
  host: mongodb
  subsets: [{name: v2, labels: {version: v2}}]
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: mongodb}
spec:
  hosts: [mongodb]
  tcp:
  - route:
    - destination: {host: mongodb, subset: v2, port: {number: 27017}}
"""
    t = translated(mongo, workload_doc("mongodb-v2", "mongodb", "v2", "127.0.10.20", port=27017))
    listener = find(t, LISTENER, "outbound_127.0.11.1_27017")
    proxy = listener["filter_chains"][0]["filters"][0]
    assert proxy["name"] == "envoy.filters.network.tcp_proxy"
    assert proxy["typed_config"]["cluster"] == "outbound|27017|v2|mongodb.default.svc.cluster.local"


def test_service_entries() -> None:
    entries = """
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: external-api}
spec:
  hosts: [api.example.com]
  location: MESH_EXTERNAL
  resolution: DNS
  ports: [{number: 443, name: tls, protocol: TLS}]
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: legacy}
spec:
  hosts: [legacy.internal]
  location: MESH_INTERNAL
  resolution: STATIC
  ports: [{number: 8000, name: http, protocol: HTTP}]
  endpoints:
  - {address: 10.9.0.1, ports: {http: 18000}}
  - {address: 10.9.0.2}
"""
    t = translated(entries)
    external = find(t, CLUSTER, "outbound|443||api.example.com")
    assert external["type"] == "STRICT_DNS" and "transport_socket" not in external
    assert external["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]["address"] == {
        "socket_address": {"address": "api.example.com", "port_value": 443}}
    legacy = find(t, ENDPOINT, "outbound|8000||legacy.internal")
    assert [e["endpoint"]["address"]["socket_address"] for e in legacy["endpoints"][0]["lb_endpoints"]] == [
        {"address": "10.9.0.1", "port_value": 18000}, {"address": "10.9.0.2", "port_value": 8000}]
    routes = find(t, ROUTE, "8000")
    (host,) = routes["virtual_hosts"]
    assert host["domains"] == ["legacy.internal", "legacy.internal:8000"]


def test_source_labels_make_routes_per_client() -> None:
    vs = """
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: ratings}
spec:
  hosts: [ratings]
  http:
  - match:
    - sourceLabels: {app: reviews, version: v2}
    route:
    - destination: {host: ratings, subset: v1}
  - route:
    - destination: {host: ratings}
"""
    ratings_rule = "outbound|9080|v1|ratings.default.svc.cluster.local"
    rs = bookinfo(vs)

    def first_cluster(workload: str) -> str:
        t = translate_with_status(node_of(workload), rs)
        routes = find(t, ROUTE, "9080")
        host = next(v for v in routes["virtual_hosts"] if v["name"].startswith("ratings."))
        return str(host["routes"][0]["route"]["cluster"])

    assert first_cluster("reviews-v2") == ratings_rule
    assert first_cluster("reviews-v1") == "outbound|9080||ratings.default.svc.cluster.local"


def test_duplicate_hosts_are_reported() -> None:
    again = """
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: reviews-again}
spec:
  hosts: [reviews.default.svc.cluster.local]
  ports: [{number: 9080, name: http, protocol: HTTP}]
"""
    docs = [workload_doc(n, a, v, addr) for n, a, v, addr in WORKLOADS]
    rs = ResourceSet.of(load(SERVICES, *docs, again))
    t = translate_with_status(node_of("productpage-v1"), rs)
    assert any("already defined" in n.message for n in t.status.notes)
