from __future__ import annotations

from meshlet.control.analyze import Finding, Severity, analyze, fqdn
from meshlet.control.resources import load_documents

MESH = """
apiVersion: meshlet.dev/v1
kind: Service
metadata: {name: reviews}
spec: {ports: [{name: http, number: 9080}]}
---
apiVersion: meshlet.dev/v1
kind: Workload
metadata: {name: reviews-v1}
spec: {address: 127.0.0.1, labels: {app: reviews, version: v1}}
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: reviews}
spec:
  host: reviews
  subsets:
  - {name: v1, labels: {version: v1}}
  - {name: v2, labels: {version: v2}}
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: reviews}
spec:
  hosts: [reviews]
  http:
  - route:
    - {destination: {host: reviews, subset: v1}, weight: 50}
    - {destination: {host: reviews.default.svc.cluster.local, subset: v2}, weight: 50}
"""


def codes(findings: list[Finding]) -> list[tuple[str, str, str]]:
    return [(f.code, f.resource, f.path) for f in findings]


def test_a_consistent_mesh_has_only_the_empty_subset_warning() -> None:
    findings = analyze(load_documents(MESH))
    assert codes(findings) == [("IST0173", "DestinationRule default/reviews", "spec.subsets[1]")]
    assert findings[0].severity is Severity.WARNING
    assert str(findings[0]) == ("Warning [IST0173] (DestinationRule default/reviews spec.subsets[1]) "
                                "subset 'v2' selects no workloads of 'reviews' (version=v2)")


def test_registered_workloads_can_come_separately() -> None:
    extra = load_documents("""
apiVersion: meshlet.dev/v1
kind: Workload
metadata: {name: reviews-v2}
spec: {address: 127.0.0.2, labels: {app: reviews, version: v2}}
""")
    assert analyze(load_documents(MESH), extra) == []


def test_unknown_hosts_subsets_and_gateways() -> None:
    text = MESH + """
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: ratings}
spec:
  hosts: [ratings]
  gateways: [bookinfo-gateway, mesh]
  http:
  - route: [{destination: {host: ratings}}]
    mirror: {host: reviews, subset: v9}
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: details}
spec: {host: details.other.svc.cluster.local}
"""
    findings = analyze(load_documents(text))
    found = codes(findings)
    ratings = "VirtualService default/ratings"
    assert ("IST0101", ratings, "spec.http[0].route[0].destination.host") in found
    assert ("IST0101", ratings, "spec.http[0].mirror.subset") in found
    assert ("IST0101", ratings, "spec.gateways[0]") in found
    assert ("IST0101", "DestinationRule default/details", "spec.host") in found
    assert ("MSH0005", ratings, "spec.hosts[0]") in found
    messages = [f.message for f in findings if f.code == "IST0101"]
    assert "referenced host not found: 'ratings' (ratings.default.svc.cluster.local)" in messages
    assert "referenced host+subset in destinationrule not found: 'reviews'+'v9'" in messages


def test_service_entry_hosts_are_known() -> None:
    text = """
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: external}
spec:
  hosts: ["*.example.com"]
  ports: [{number: 443, name: https, protocol: TLS}]
  resolution: DNS
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: api}
spec:
  hosts: [api.example.com]
  tcp: [{route: [{destination: {host: api.example.com}}]}]
"""
    assert analyze(load_documents(text)) == []


def test_gateway_bound_virtual_service_hosts_are_edge_names() -> None:
    text = MESH + """
---
apiVersion: networking.istio.io/v1
kind: Gateway
metadata: {name: bookinfo-gateway}
spec:
  selector: {istio: ingressgateway}
  servers: [{port: {number: 80, name: http, protocol: HTTP}, hosts: ["*"]}]
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: bookinfo}
spec:
  hosts: ["bookinfo.example.com"]
  gateways: [bookinfo-gateway]
  http: [{route: [{destination: {host: reviews, subset: v1}}]}]
"""
    findings = analyze(load_documents(text))
    assert [f.code for f in findings if f.resource == "VirtualService default/bookinfo"] == []


def test_weights_not_summing_to_100() -> None:
    first_route = "weight: 50}\n    - {destination: {host: reviews.default"
    findings = analyze(load_documents(MESH.replace(first_route, first_route.replace("50", "70"))))
    (weights,) = [f for f in findings if f.code == "MSH0001"]
    assert weights.path == "spec.http[0].route" and weights.severity is Severity.ERROR
    assert weights.message == "route weights sum to 120, not 100 (70, 50)"


def test_overlapping_virtual_services_for_one_host() -> None:
    other = MESH.split("---")[-1].replace("name: reviews}", "name: reviews-2}").replace(
        "hosts: [reviews]", "hosts: [reviews.default.svc.cluster.local]")
    findings = analyze(load_documents(MESH + "---" + other))
    overlapping = [f for f in findings if f.code == "IST0109"]
    assert [f.resource for f in overlapping] == ["VirtualService default/reviews",
                                                 "VirtualService default/reviews-2"]
    assert "several VirtualServices" in overlapping[0].message


def test_conflicting_peer_authentications_and_mtls_disabled_under_strict() -> None:
    text = MESH + """
---
apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: {name: strict}
spec: {mtls: {mode: STRICT}}
---
apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: {name: permissive}
spec: {mtls: {mode: PERMISSIVE}}
---
apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: {name: ratings-strict}
spec: {selector: {matchLabels: {app: ratings}}, mtls: {mode: STRICT}}
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: reviews-plain}
spec: {host: reviews, trafficPolicy: {tls: {mode: DISABLE}}}
"""
    findings = analyze(load_documents(text))
    conflicts = [f for f in findings if f.code == "MSH0002"]
    assert [f.resource for f in conflicts] == ["PeerAuthentication default/permissive",
                                               "PeerAuthentication default/strict"]
    assert all(f.severity is Severity.ERROR and "PERMISSIVE, STRICT" in f.message for f in conflicts)
    plain = ("MSH0004", "DestinationRule default/reviews-plain", "spec.trafficPolicy.tls.mode")
    assert plain in codes(findings)
    assert [f.resource for f in findings if f.code == "MSH0003"] == [
        "DestinationRule default/reviews", "DestinationRule default/reviews-plain"]


def test_mesh_wide_strict_from_the_root_namespace() -> None:
    text = MESH + """
---
apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: {name: default, namespace: istio-system}
spec: {mtls: {mode: STRICT}}
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: reviews-plain, namespace: other}
spec: {host: reviews.default.svc.cluster.local, trafficPolicy: {tls: {mode: DISABLE}}}
"""
    found = codes(analyze(load_documents(text)))
    assert ("MSH0004", "DestinationRule other/reviews-plain", "spec.trafficPolicy.tls.mode") in found
    permissive = text + """
---
apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: {name: default}
spec: {mtls: {mode: PERMISSIVE}}
"""
    assert "MSH0004" not in [c for c, _, _ in codes(analyze(load_documents(permissive)))]


def test_fqdn() -> None:
    assert fqdn("reviews", "bookinfo") == "reviews.bookinfo.svc.cluster.local"
    assert fqdn("reviews.other", "bookinfo") == "reviews.other.svc.cluster.local"
    assert fqdn("reviews.other.svc", "bookinfo") == "reviews.other.svc.cluster.local"
    assert fqdn("api.example.com", "bookinfo") == "api.example.com"
