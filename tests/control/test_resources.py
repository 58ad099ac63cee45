from __future__ import annotations

from pathlib import Path

import pytest

from meshlet.control.resources import (
    DestinationRule,
    PeerAuthentication,
    ResourceInvalid,
    ServiceEntry,
    VirtualService,
    Workload,
    dump_yaml,
    load_documents,
    load_path,
    parse_duration,
    parse_resource,
    plural,
    resolve_kind,
)

REVIEWS = """
apiVersion: networking.istio.io/v1alpha3
kind: VirtualService
metadata:
  name: reviews
spec:
  hosts: [reviews]
  http:
  - match:
    - headers:
        end-user: {exact: jason}
    route:
    - destination: {host: reviews, subset: v2}
  - route:
    - destination: {host: reviews, subset: v1}
      weight: 50
    - destination: {host: reviews, subset: v3}
      weight: 50
    timeout: 5s
    retries: {attempts: 3, perTryTimeout: 250ms, retryOn: "5xx,connect-failure"}
    fault:
      delay: {fixedDelay: 7s, percentage: {value: 100}}
    mirror: {host: reviews, subset: v2}
    mirrorPercentage: {value: 50}
---
apiVersion: networking.istio.io/v1beta1
kind: DestinationRule
metadata: {name: reviews, namespace: bookinfo}
spec:
  host: reviews
  trafficPolicy:
    loadBalancer: {simple: LEAST_REQUEST}
    connectionPool: {tcp: {maxConnections: 100}, http: {http1MaxPendingRequests: 10}}
    outlierDetection: {consecutive5xxErrors: 5, interval: 10s, baseEjectionTime: 30s}
    tls: {mode: ISTIO_MUTUAL}
  subsets:
  - {name: v1, labels: {version: v1}}
  - {name: v2, labels: {version: v2}}
"""


def _error(text: str) -> str:
    with pytest.raises(ResourceInvalid) as info:
        load_documents(text, "f.yaml")
    return str(info.value)


def test_multi_document_yaml_loads_typed_models() -> None:
    vs, dr = load_documents(REVIEWS, "reviews.yaml")
    assert isinstance(vs, VirtualService) and isinstance(dr, DestinationRule)
    assert vs.key == ("VirtualService", "default", "reviews")
    assert vs.api_version == "networking.istio.io/v1"  # v1alpha3 stored as v1
    assert dr.api_version == "networking.istio.io/v1"
    assert vs.spec.http[0].match[0].headers["end-user"].exact == "jason"
    assert [d.weight for d in vs.spec.http[1].route] == [50, 50]
    assert vs.spec.http[1].retries is not None and vs.spec.http[1].retries.per_try_timeout == "250ms"
    assert dr.spec.traffic_policy is not None
    assert dr.spec.traffic_policy.outlier_detection is not None
    assert dr.spec.traffic_policy.outlier_detection.consecutive_5xx_errors == 5
    assert [s.name for s in dr.spec.subsets] == ["v1", "v2"]


def test_round_trip_through_yaml_is_identity() -> None:
    resources = load_documents(REVIEWS)
    assert load_documents(dump_yaml(resources)) == resources
    wire = resources[0].to_dict()
    assert wire["apiVersion"] == "networking.istio.io/v1"
    assert wire["spec"]["http"][1]["mirrorPercentage"] == {"value": 50.0}
    assert "gateways" not in wire["spec"]  # defaults are left out


def test_error_names_resource_and_field_path() -> None:
    message = _error(REVIEWS.replace("      weight: 50\n    timeout", "      weight: 150\n    timeout"))
    assert "f.yaml#0: VirtualService default/reviews: spec.http[1].route[1].weight: weight 150 is out of " \
           "range 0..100" in message


def test_every_problem_in_every_document_is_reported() -> None:
    text = REVIEWS.replace("timeout: 5s", "timeout: 5 seconds").replace("maxConnections: 100",
                                                                        "maxConnections: 100, bogus: 1")
    lines = _error(text).splitlines()
    assert "f.yaml#0: VirtualService default/reviews: spec.http[1].timeout: '5 seconds' is not a duration " \
           "(like '5s', '250ms', '1m')" in lines
    assert "f.yaml#1: DestinationRule bookinfo/reviews: spec.trafficPolicy.connectionPool.tcp.bogus: " \
           "unknown field (or one meshlet does not implement)" in lines


@pytest.mark.parametrize(("snippet", "expected"), [
    ("kind: Nope", "kind: unknown kind 'Nope'"),
    ("apiVersion: networking.istio.io/v2", "apiVersion: apiVersion 'networking.istio.io/v2' is not one of"),
    ("apiVersion: security.istio.io/v1", "apiVersion: apiVersion 'security.istio.io/v1' is not one of"),
])
def test_kind_and_api_version_pairs_are_checked(snippet: str, expected: str) -> None:
    field = snippet.split(":")[0]
    doc = "\n".join(line if not line.startswith(field + ":") else snippet
                    for line in REVIEWS.split("---")[0].splitlines())
    assert expected in _error(doc)


@pytest.mark.parametrize(("spec", "path", "message"), [
    ("hosts: ['bad host']", "spec.hosts[0]", "is not a valid host name"),
    ("hosts: [r]\n  http: [{route: [{destination: {host: r, subset: V_1}}]}]",
     "spec.http[0].route[0].destination.subset", "is not a DNS label"),
    ("hosts: [r]\n  http: [{match: [{uri: {regex: '(['}}], route: [{destination: {host: r}}]}]",
     "spec.http[0].match[0].uri.regex", "does not compile"),
    ("hosts: [r]\n  http: [{match: [{uri: {exact: /a, prefix: /b}}], route: [{destination: {host: r}}]}]",
     "spec.http[0].match[0].uri", "set exactly one of exact, prefix, regex"),
    ("hosts: [r]\n  http: [{route: [{destination: {host: r, port: {number: 70000}}}]}]",
     "spec.http[0].route[0].destination.port.number", "out of range 1..65535"),
    ("hosts: [r]\n  http: [{route: [{destination: {host: r}}], timeout: 5}]",
     "spec.http[0].timeout", "Input should be a valid string"),
    ("hosts: [r]\n  http: [{}]", "spec.http[0]", "needs a route or a redirect"),
    ("hosts: [r]\n  http: [{route: [{destination: {host: r}}], mirrorPercentage: {value: 5}}]",
     "spec.http[0]", "mirrorPercentage needs a mirror"),
    ("hosts: []", "spec.hosts", "at least 1 item"),
    ("hosts: [r]\n  tls: []", "spec.tls", "unknown field (or one meshlet does not implement)"),
])
def test_virtual_service_field_checks(spec: str, path: str, message: str) -> None:
    text = (f"apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {{name: vs}}\n"
            f"spec:\n  {spec}\n")
    error = _error(text)
    assert f"VirtualService default/vs: {path}: " in error and message in error


def test_destination_rule_refuses_unsupported_tls_mode_and_duplicate_subsets() -> None:
    base = ("apiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata: {name: d}\n"
            "spec:\n  host: r\n")
    assert "spec.trafficPolicy.tls.mode: Input should be 'DISABLE' or 'ISTIO_MUTUAL'" in _error(
        base + "  trafficPolicy: {tls: {mode: SIMPLE}}\n")
    assert "subset names must be unique: v1 repeated" in _error(
        base + "  subsets: [{name: v1, labels: {version: v1}}, {name: v1}]\n")
    assert "spec.subsets[0].labels: label value" in _error(
        base + "  subsets: [{name: v1, labels: {a: 'b c'}}]\n")


def test_security_resources_and_metadata_checks() -> None:
    text = """
apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: {name: default, namespace: istio-system}
spec: {mtls: {mode: STRICT}}
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: allow-get}
spec:
  selector: {matchLabels: {app: ratings}}
  rules:
  - from: [{source: {principals: ["cluster.local/ns/default/sa/reviews"]}}]
    to: [{operation: {methods: [GET]}}]
---
apiVersion: security.istio.io/v1beta1
kind: RequestAuthentication
metadata: {name: jwt}
spec:
  jwtRules: [{issuer: "https://issuer.example", jwksUri: "https://issuer.example/jwks"}]
"""
    pa, ap, ra = load_documents(text)
    assert isinstance(pa, PeerAuthentication) and pa.spec.mode == "STRICT"
    assert ap.to_dict()["spec"]["rules"][0]["from"][0]["source"]["principals"] == [
        "cluster.local/ns/default/sa/reviews"]
    assert ra.api_version == "security.istio.io/v1"
    bad_name = text.replace("name: jwt", "name: Bad_Name")
    assert "metadata.name: 'Bad_Name' is not a valid name" in _error(bad_name)
    assert "spec.mtls.mode: Input should be" in _error(text.replace("STRICT", "STRICTEST"))


def test_istio_sample_service_entry_with_lowercase_protocol() -> None:
    (entry,) = load_documents("""
apiVersion: networking.istio.io/v1alpha3
kind: ServiceEntry
metadata: {name: googleapis}
spec:
  hosts: [www.googleapis.com]
  ports: [{number: 443, name: https, protocol: http}]
  location: MESH_EXTERNAL
  resolution: DNS
""")
    assert isinstance(entry, ServiceEntry) and entry.spec.ports[0].protocol == "HTTP"


def test_list_kind_and_meshlet_resources() -> None:
    text = """
apiVersion: v1
kind: List
items:
- apiVersion: meshlet.dev/v1
  kind: Service
  metadata: {name: ratings}
  spec: {ports: [{name: http, number: 9080}]}
- apiVersion: meshlet.dev/v1
  kind: Workload
  metadata: {name: ratings-1}
  spec: {address: 127.0.0.1, ports: {http: 19080}, labels: {app: ratings, version: v1}}
"""
    service, workload = load_documents(text)
    assert service.kind == "Service" and isinstance(workload, Workload)
    assert workload.status.health == "UNKNOWN"
    assert "spec.address: 'not an address!' is not an IP address or a DNS name" in _error(
        text.replace("address: 127.0.0.1", "address: 'not an address!'"))
    assert "port names and numbers must be unique" in _error(
        text.replace("ports: [{name: http, number: 9080}]",
                     "ports: [{name: http, number: 9080}, {name: http, number: 9081}]"))


def test_documents_without_a_namespace_take_the_default_given() -> None:
    vs, dr = load_documents(REVIEWS, namespace="shop")
    assert vs.namespace == "shop"
    assert dr.namespace == "bookinfo"  # named in the document: kept


def test_parse_resource_rejects_non_mappings_and_invalid_yaml() -> None:
    with pytest.raises(ResourceInvalid, match="a resource must be a mapping"):
        parse_resource(["x"])
    assert "not valid YAML" in _error("a: [")


def test_load_path_reads_a_directory(tmp_path: Path) -> None:
    docs = REVIEWS.split("---")
    (tmp_path / "a.yaml").write_text(docs[0])
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "b.yml").write_text(docs[1])
    (tmp_path / "notes.txt").write_text("not yaml: [")
    assert [r.kind for r in load_path(tmp_path)] == ["VirtualService", "DestinationRule"]


def test_durations_and_kind_names() -> None:
    assert parse_duration("250ms") == pytest.approx(0.25)
    assert parse_duration("1.5s") == pytest.approx(1.5)
    assert parse_duration("2m") == 120
    with pytest.raises(ValueError):
        parse_duration("5")
    assert resolve_kind("vs") is VirtualService
    assert resolve_kind("virtualservices") is VirtualService
    assert resolve_kind("DestinationRule") is DestinationRule
    assert resolve_kind("serviceentries") is ServiceEntry
    assert resolve_kind("authorizationpolicies").KIND == "AuthorizationPolicy"
    assert plural(ServiceEntry) == "serviceentries" and plural(VirtualService) == "virtualservices"
    with pytest.raises(ResourceInvalid, match="unknown kind 'pods'"):
        resolve_kind("pods")
