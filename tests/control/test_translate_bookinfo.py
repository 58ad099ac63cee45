"""Golden-style checks of the translator on bookinfo's scenarios: all to v1, 50/50 v1/v3,
jason to v2, a 7 s delay on ratings for jason, mirroring v1 to v2, mTLS STRICT; each
snapshot also compiles whole as the proxy would take it over ADS."""

from __future__ import annotations

from typing import Any

import pytest
from translate_helpers import (
    ALL_V1,
    FIFTY_FIFTY,
    GATEWAY,
    JASON_V2,
    MIRROR,
    MTLS_STRICT,
    RATINGS_DELAY,
    TRUST_DOMAIN,
    WORKLOADS,
    SvidIssuer,
    as_dict,
    bookinfo,
    compile_like_a_proxy,
    mesh_identity,
    node_of,
)

from meshlet.control.translate import ProxyNode, Translation, node_id, translate, translate_with_status
from meshlet.xds.snapshot import CLUSTER, ENDPOINT, LISTENER, ROUTE, SECRET

REVIEWS = "reviews.default.svc.cluster.local"
RATINGS = "ratings.default.svc.cluster.local"


def cluster_name(host: str, subset: str = "", port: int = 9080) -> str:
    return f"outbound|{port}|{subset}|{host}"


def find(translation: Translation, type_url: str, name: str) -> dict[str, Any]:
    for message in translation.messages[type_url]:
        data = as_dict(message)
        if data.get("name", data.get("cluster_name")) == name:
            return data
    raise AssertionError(f"no {type_url.rpartition('.')[2]} named {name!r}")


def vhost(translation: Translation, host: str, port: int = 9080) -> dict[str, Any]:
    routes = find(translation, ROUTE, str(port))
    return next(v for v in routes["virtual_hosts"] if v["name"] == f"{host}:{port}")


def productpage(*scenarios: str) -> Translation:
    t = translate_with_status(node_of("productpage-v1"), bookinfo(*scenarios))
    compile_like_a_proxy(t.messages)
    return t


def test_defaults_without_virtual_services() -> None:
    t = productpage()
    listeners = {as_dict(m)["name"] for m in t.messages[LISTENER]}
    assert listeners == {"inbound_127.0.10.1_9080", "outbound_127.0.11.1_9080"}
    reviews = vhost(t, REVIEWS)
    assert "reviews" in reviews["domains"] and f"{REVIEWS}:9080" in reviews["domains"]
    (route,) = reviews["routes"]
    assert route["match"] == {"prefix": "/"}
    assert route["route"]["cluster"] == cluster_name(REVIEWS)
    assert route["route"]["timeout"] == "0s"
    assert route["route"]["retry_policy"]["num_retries"] == 2
    # Every subset is a cluster; its endpoints are the workloads with its labels.
    cla = find(t, ENDPOINT, cluster_name(REVIEWS, "v2"))
    (group,) = cla["endpoints"]
    assert [e["endpoint"]["address"]["socket_address"] for e in group["lb_endpoints"]] == [
        {"address": "127.0.10.4", "port_value": 9080}]
    assert group["lb_endpoints"][0]["health_status"] == "HEALTHY"
    assert len(find(t, ENDPOINT, cluster_name(REVIEWS))["endpoints"][0]["lb_endpoints"]) == 3
    cluster = find(t, CLUSTER, cluster_name(REVIEWS, "v1"))
    assert cluster["type"] == "EDS"
    assert cluster["eds_cluster_config"]["service_name"] == cluster_name(REVIEWS, "v1")
    assert not t.status.notes


def test_all_to_v1() -> None:
    t = productpage(ALL_V1)
    for host in (REVIEWS, RATINGS):
        (route,) = vhost(t, host)["routes"]
        assert route["route"]["cluster"] == cluster_name(host, "v1")
    # No VirtualService for details: its default route stays.
    assert vhost(t, "details.default.svc.cluster.local")["routes"][0]["route"]["cluster"] == cluster_name(
        "details.default.svc.cluster.local")


def test_fifty_fifty_v1_v3() -> None:
    (route,) = vhost(productpage(FIFTY_FIFTY), REVIEWS)["routes"]
    weighted = route["route"]["weighted_clusters"]["clusters"]
    assert weighted == [{"name": cluster_name(REVIEWS, "v1"), "weight": 50},
                        {"name": cluster_name(REVIEWS, "v3"), "weight": 50}]


def test_jason_to_v2_by_cookie() -> None:
    jason, everyone = vhost(productpage(JASON_V2), REVIEWS)["routes"]
    assert jason["match"]["headers"] == [{
        "name": "cookie", "string_match": {"safe_regex": {"regex": "^(.*?;)?(user=jason)(;.*)?$"}}}]
    assert jason["route"]["cluster"] == cluster_name(REVIEWS, "v2")
    assert everyone["match"] == {"prefix": "/"}
    assert everyone["route"]["cluster"] == cluster_name(REVIEWS, "v1")


def test_ratings_delay_for_jason() -> None:
    t = productpage(RATINGS_DELAY)
    jason, everyone = vhost(t, RATINGS)["routes"]
    assert jason["match"]["headers"] == [{"name": "end-user", "string_match": {"exact": "jason"}}]
    fault = jason["typed_per_filter_config"]["envoy.filters.http.fault"]
    assert fault["delay"]["fixed_delay"] == "7s"
    assert fault["delay"]["percentage"] == {"numerator": 1_000_000, "denominator": "MILLION"}
    assert "typed_per_filter_config" not in everyone
    # The outbound connection manager runs the fault filter before the router.
    listener = find(t, LISTENER, "outbound_127.0.11.1_9080")
    manager = listener["filter_chains"][0]["filters"][0]["typed_config"]
    assert [f["name"] for f in manager["http_filters"]] == [
        "envoy.filters.http.fault", "envoy.filters.http.router"]
    assert manager["rds"]["route_config_name"] == "9080"


def test_mirror_v1_to_v2() -> None:
    (route,) = vhost(productpage(MIRROR), REVIEWS)["routes"]
    assert route["route"]["cluster"] == cluster_name(REVIEWS, "v1")
    (mirror,) = route["route"]["request_mirror_policies"]
    assert mirror["cluster"] == cluster_name(REVIEWS, "v2")
    assert mirror["runtime_fraction"]["default_value"] == {"numerator": 1_000_000, "denominator": "MILLION"}


def test_mtls_strict() -> None:
    rs = bookinfo(ALL_V1, MTLS_STRICT)
    nodes = [node_of(name) for name, *_ in WORKLOADS]
    identity = mesh_identity(SvidIssuer(), nodes)
    t = translate_with_status(node_of("reviews-v1"), rs, identity)
    compile_like_a_proxy(t.messages)
    inbound = find(t, LISTENER, "inbound_127.0.10.3_9080")
    (chain,) = inbound["filter_chains"]
    tls = chain["transport_socket"]["typed_config"]
    assert tls["require_client_certificate"] is True
    common = tls["common_tls_context"]
    assert [s["name"] for s in common["tls_certificate_sds_secret_configs"]] == ["default"]
    assert common["validation_context_sds_secret_config"]["name"] == "ROOTCA"
    assert "listener_filters" not in inbound  # STRICT: no plaintext chain to tell apart
    # Outbound clusters to mesh services originate mTLS (auto mTLS), with Istio's SNI.
    upstream = find(t, CLUSTER, cluster_name(RATINGS, "v1"))["transport_socket"]["typed_config"]
    assert upstream["sni"] == f"outbound_.9080_.v1_.{RATINGS}"
    # SDS: the SVID and the trust bundle with the trust domain's SPIFFE SAN match.
    secrets = {as_dict(m)["name"]: as_dict(m) for m in t.messages[SECRET]}
    assert set(secrets) == {"default", "ROOTCA"}
    san = secrets["ROOTCA"]["validation_context"]["match_typed_subject_alt_names"]
    assert san == [{"san_type": "URI", "matcher": {"prefix": f"spiffe://{TRUST_DOMAIN}/"}}]
    # The inbound cluster leads to the app on loopback, plaintext.
    app = find(t, CLUSTER, f"inbound|9080||{REVIEWS}")
    assert app["type"] == "STATIC" and "transport_socket" not in app
    assert app["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]["address"] == {
        "socket_address": {"address": "127.0.0.1", "port_value": 19080}}


def test_permissive_serves_both_and_strict_without_certificate_is_refused() -> None:
    nodes = [node_of(name) for name, *_ in WORKLOADS]
    identity = mesh_identity(SvidIssuer(), nodes)
    permissive = translate_with_status(node_of("ratings-v1"), bookinfo(), identity)
    compile_like_a_proxy(permissive.messages)
    inbound = find(permissive, LISTENER, "inbound_127.0.10.6_9080")
    assert [c["filter_chain_match"]["transport_protocol"] for c in inbound["filter_chains"]] == [
        "tls", "raw_buffer"]
    assert inbound["listener_filters"][0]["name"] == "envoy.filters.listener.tls_inspector"

    strict = translate_with_status(node_of("ratings-v1"), bookinfo(MTLS_STRICT))
    assert not any(as_dict(m)["name"].startswith("inbound_") for m in strict.messages[LISTENER])
    assert any("STRICT" in n.message and n.level == "error" for n in strict.status.notes)


def test_disable_by_workload_selector_overrides_namespace_strict() -> None:
    disable_ratings = """
apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: {name: ratings-plain}
spec:
  selector: {matchLabels: {app: ratings}}
  mtls: {mode: DISABLE}
"""
    nodes = [node_of(name) for name, *_ in WORKLOADS]
    identity = mesh_identity(SvidIssuer(), nodes)
    rs = bookinfo(MTLS_STRICT, disable_ratings)
    ratings = translate_with_status(node_of("ratings-v1"), rs, identity)
    (chain,) = find(ratings, LISTENER, "inbound_127.0.10.6_9080")["filter_chains"]
    assert "transport_socket" not in chain
    # Clients see that ratings' workloads disabled mTLS and send plaintext.
    client = translate_with_status(node_of("reviews-v2"), rs, identity)
    assert "transport_socket" not in find(client, CLUSTER, cluster_name(RATINGS, "v1"))
    assert "transport_socket" in find(client, CLUSTER, cluster_name(REVIEWS, "v1"))


def test_ingress_gateway() -> None:
    rs = bookinfo(ALL_V1, GATEWAY)
    gateway = ProxyNode.parse(node_id("router", "127.0.0.1", "ingressgateway", "istio-system"))
    t = translate_with_status(gateway, rs)
    compile_like_a_proxy(t.messages)
    (listener,) = [as_dict(m) for m in t.messages[LISTENER]]
    assert listener["address"]["socket_address"] == {"address": "127.0.0.1", "port_value": 8080}
    routes = find(t, ROUTE, "http.8080")
    (host,) = routes["virtual_hosts"]
    assert host["domains"] == ["*"]
    exact, prefix = host["routes"]
    assert exact["match"] == {"path": "/productpage"} and prefix["match"] == {"prefix": "/static"}
    assert exact["route"]["cluster"] == cluster_name("productpage.default.svc.cluster.local")


def test_gateway_tls_with_credential() -> None:
    tls_gateway = """
apiVersion: networking.istio.io/v1
kind: Gateway
metadata: {name: secure}
spec:
  selector: {istio: ingressgateway}
  servers:
  - port: {number: 8443, name: https, protocol: HTTPS}
    hosts: [bookinfo.example.com]
    tls: {mode: SIMPLE, credentialName: bookinfo-cert}
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: secure}
spec:
  hosts: [bookinfo.example.com]
  gateways: [secure]
  http:
  - route:
    - destination: {host: productpage}
"""
    ca = SvidIssuer()
    gateway = ProxyNode.parse(node_id("router", "127.0.0.1", "ingressgateway", "istio-system"))
    identity = mesh_identity(ca, [gateway])
    missing = translate_with_status(gateway, bookinfo(tls_gateway), identity)
    assert not missing.messages[LISTENER]
    assert any("bookinfo-cert" in n.message for n in missing.status.notes)

    identity.credentials["bookinfo-cert"] = ca.svid("spiffe://cluster.local/ns/istio-system/sa/gw",
                                                    dns=["bookinfo.example.com"])
    t = translate_with_status(gateway, bookinfo(tls_gateway), identity)
    compile_like_a_proxy(t.messages)
    (chain,) = find(t, LISTENER, "gateway_127.0.0.1_8443")["filter_chains"]
    assert chain["filter_chain_match"]["server_names"] == ["bookinfo.example.com"]
    common = chain["transport_socket"]["typed_config"]["common_tls_context"]
    sds = common["tls_certificate_sds_secret_configs"]
    assert sds[0]["name"] == "bookinfo-cert"
    assert {as_dict(m)["name"] for m in t.messages[SECRET]} == {"default", "ROOTCA", "bookinfo-cert"}
    (host,) = find(t, ROUTE, "http.8443")["virtual_hosts"]
    assert host["domains"] == ["bookinfo.example.com", "bookinfo.example.com:8443"]


def test_unenforced_policies_are_reported() -> None:
    policy = """
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: ratings-viewer}
spec:
  selector: {matchLabels: {app: ratings}}
  rules:
  - from:
    - source: {principals: ["cluster.local/ns/default/sa/bookinfo-reviews"]}
---
apiVersion: security.istio.io/v1
kind: RequestAuthentication
metadata: {name: jwt, namespace: istio-system}
spec:
  jwtRules:
  - {issuer: "https://issuer.example.com"}
"""
    rs = bookinfo(policy)
    ratings = translate_with_status(node_of("ratings-v1"), rs)
    messages = {(n.resource, n.message) for n in ratings.status.notes}
    assert ("AuthorizationPolicy default/ratings-viewer", "stored, not enforced") in messages
    assert ("RequestAuthentication istio-system/jwt", "stored, not enforced") in messages
    reviews = translate_with_status(node_of("reviews-v1"), rs)
    assert [n.resource for n in reviews.status.notes] == ["RequestAuthentication istio-system/jwt"]


def test_unknown_destination_is_reported_not_routed() -> None:
    broken = """
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: reviews}
spec:
  hosts: [reviews]
  http:
  - route:
    - destination: {host: reviews, subset: v9}
"""
    t = productpage(broken)
    assert "routes" not in vhost(t, REVIEWS)
    assert any("subset 'v9'" in n.message for n in t.status.of_level("error"))


def test_versions_are_stable_and_change_with_config() -> None:
    node = node_of("productpage-v1")
    first = translate(node, bookinfo(ALL_V1))
    again = translate(node, bookinfo(ALL_V1))
    changed = translate(node, bookinfo(FIFTY_FIFTY))
    assert first.version(ROUTE) == again.version(ROUTE) and first.version(CLUSTER) == again.version(CLUSTER)
    assert changed.version(ROUTE) != first.version(ROUTE)
    assert changed.version(CLUSTER) == first.version(CLUSTER)


@pytest.mark.parametrize("health", ["UNHEALTHY", "DRAINING"])
def test_reported_health_reaches_eds(health: str) -> None:
    from translate_helpers import SERVICES, load, workload_doc

    from meshlet.control.translate import ResourceSet

    ratings = workload_doc("ratings-v1", "ratings", "v1", "127.0.10.6", health=health)
    rs = ResourceSet.of(load(SERVICES, ratings))
    t = translate_with_status(node_of("productpage-v1"), rs)
    (endpoint,) = find(t, ENDPOINT, cluster_name(RATINGS))["endpoints"][0]["lb_endpoints"]
    assert endpoint["health_status"] == health
