"""Bookinfo as Istio-style resources, a test mesh identity, and the check that every
generated resource parses and compiles as the proxy would take it over xDS."""

from __future__ import annotations

import datetime
from collections.abc import Iterable, Mapping
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from google.protobuf.message import Message

from meshlet.config.loader import parse_resource
from meshlet.config.model import ProxyConfig
from meshlet.control.resources import Resource, load_documents
from meshlet.control.translate import ProxyNode, ResourceSet, StaticIdentity, WorkloadCertificate, node_id
from meshlet.xds.assembly import ConfigAssembler, Received
from meshlet.xds.snapshot import LISTENER, Snapshot, resource_name
from meshlet.xds.validate import check_snapshot

TRUST_DOMAIN = "cluster.local"

SERVICES = """
apiVersion: meshlet.dev/v1
kind: Service
metadata: {name: productpage}
spec: {ports: [{name: http, number: 9080}]}
---
apiVersion: meshlet.dev/v1
kind: Service
metadata: {name: details}
spec: {ports: [{name: http, number: 9080}]}
---
apiVersion: meshlet.dev/v1
kind: Service
metadata: {name: reviews}
spec: {ports: [{name: http, number: 9080}]}
---
apiVersion: meshlet.dev/v1
kind: Service
metadata: {name: ratings}
spec: {ports: [{name: http, number: 9080}]}
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: reviews}
spec:
  host: reviews
  subsets:
  - {name: v1, labels: {version: v1}}
  - {name: v2, labels: {version: v2}}
  - {name: v3, labels: {version: v3}}
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: ratings}
spec:
  host: ratings
  subsets:
  - {name: v1, labels: {version: v1}}
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: details}
spec:
  host: details
  subsets:
  - {name: v1, labels: {version: v1}}
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: productpage}
spec:
  host: productpage
  subsets:
  - {name: v1, labels: {version: v1}}
"""

ALL_V1 = """
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: reviews}
spec:
  hosts: [reviews]
  http:
  - route:
    - destination: {host: reviews, subset: v1}
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: ratings}
spec:
  hosts: [ratings]
  http:
  - route:
    - destination: {host: ratings, subset: v1}
"""

FIFTY_FIFTY = """
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: reviews}
spec:
  hosts: [reviews]
  http:
  - route:
    - destination: {host: reviews, subset: v1}
      weight: 50
    - destination: {host: reviews, subset: v3}
      weight: 50
"""

JASON_V2 = """
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: reviews}
spec:
  hosts: [reviews]
  http:
  - match:
    - headers:
        cookie: {regex: "^(.*?;)?(user=jason)(;.*)?$"}
    route:
    - destination: {host: reviews, subset: v2}
  - route:
    - destination: {host: reviews, subset: v1}
"""

RATINGS_DELAY = """
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: ratings}
spec:
  hosts: [ratings]
  http:
  - match:
    - headers:
        end-user: {exact: jason}
    fault:
      delay:
        percentage: {value: 100.0}
        fixedDelay: 7s
    route:
    - destination: {host: ratings, subset: v1}
  - route:
    - destination: {host: ratings, subset: v1}
"""

MIRROR = """
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: reviews}
spec:
  hosts: [reviews]
  http:
  - route:
    - destination: {host: reviews, subset: v1}
      weight: 100
    mirror: {host: reviews, subset: v2}
    mirrorPercentage: {value: 100.0}
"""

MTLS_STRICT = """
apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: {name: default}
spec:
  mtls: {mode: STRICT}
"""

GATEWAY = """
apiVersion: networking.istio.io/v1
kind: Gateway
metadata: {name: bookinfo-gateway}
spec:
  selector: {istio: ingressgateway}
  servers:
  - port: {number: 8080, name: http, protocol: HTTP}
    hosts: ["*"]
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: bookinfo}
spec:
  hosts: ["*"]
  gateways: [bookinfo-gateway]
  http:
  - match:
    - uri: {exact: /productpage}
    - uri: {prefix: /static}
    route:
    - destination: {host: productpage, port: {number: 9080}}
"""

# name, app, version, loopback address: one per workload for its inbound port;
# its outbound listeners take 127.0.11.<same last byte>.
WORKLOADS = [
    ("productpage-v1", "productpage", "v1", "127.0.10.1"),
    ("details-v1", "details", "v1", "127.0.10.2"),
    ("reviews-v1", "reviews", "v1", "127.0.10.3"),
    ("reviews-v2", "reviews", "v2", "127.0.10.4"),
    ("reviews-v3", "reviews", "v3", "127.0.10.5"),
    ("ratings-v1", "ratings", "v1", "127.0.10.6"),
]


def outbound_address(address: str) -> str:
    return address.replace("127.0.10.", "127.0.11.")


def load(*texts: str) -> list[Resource]:
    return [r for text in texts for r in load_documents(text, "test")]


def workload_doc(name: str, app: str, version: str, address: str, port: int = 9080,
                 health: str = "HEALTHY", annotations: Mapping[str, str] | None = None) -> str:
    notes = dict(annotations or {})
    return f"""
apiVersion: meshlet.dev/v1
kind: Workload
metadata: {{name: {name}, annotations: {dict(notes) or {}}}}
spec:
  address: {address}
  ports: {{http: {port}}}
  labels: {{app: {app}, version: {version}}}
  serviceAccount: bookinfo-{app}
  proxyId: "{sidecar_id(name, address)}"
status: {{health: {health}}}
"""


def sidecar_id(name: str, address: str) -> str:
    return node_id("sidecar", address, name)


def bookinfo(*scenarios: str, app_ports: Mapping[str, int] | None = None) -> ResourceSet:
    """Bookinfo's services, rules and workloads plus ``scenarios``; workloads listen on
    9080 of their own loopback address and the apps on ``app_ports`` (default 19080)."""
    docs = []
    for name, app, version, address in WORKLOADS:
        annotations = {"meshlet.dev/app-ports": f"http={(app_ports or {}).get(name, 19080)}",
                       "meshlet.dev/outbound-address": outbound_address(address)}
        docs.append(workload_doc(name, app, version, address, annotations=annotations))
    return ResourceSet.of(load(SERVICES, *docs, *scenarios))


def node_of(name: str) -> ProxyNode:
    address = next(addr for n, _a, _v, addr in WORKLOADS if n == name)
    return ProxyNode.parse(sidecar_id(name, address))


# -- identity ------------------------------------------------------------------------- #


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)


def _pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


class SvidIssuer:
    """A root CA issuing SPIFFE SVIDs (for translation tests; the mesh CA is tested elsewhere)."""

    def __init__(self) -> None:
        self.key = ec.generate_private_key(ec.SECP256R1())
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "translate test root")])
        self.cert = (
            x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(self.key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(_now() - datetime.timedelta(minutes=5))
            .not_valid_after(_now() + datetime.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, content_commitment=False,
                                         key_encipherment=False, data_encipherment=False,
                                         key_agreement=False, key_cert_sign=True, crl_sign=True,
                                         encipher_only=False, decipher_only=False), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(self.key.public_key()), critical=False)
            .sign(self.key, hashes.SHA256())
        )

    @property
    def pem(self) -> bytes:
        return _pem(self.cert)

    def svid(self, spiffe_id: str, dns: Iterable[str] = ()) -> WorkloadCertificate:
        key = ec.generate_private_key(ec.SECP256R1())
        sans: list[x509.GeneralName] = [x509.UniformResourceIdentifier(spiffe_id)]
        sans += [x509.DNSName(d) for d in dns]
        cert = (
            x509.CertificateBuilder().subject_name(x509.Name([])).issuer_name(self.cert.subject)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(_now() - datetime.timedelta(minutes=5))
            .not_valid_after(_now() + datetime.timedelta(hours=1))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, content_commitment=False,
                                         key_encipherment=False, data_encipherment=False,
                                         key_agreement=False, key_cert_sign=False, crl_sign=False,
                                         encipher_only=False, decipher_only=False), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH,
                                                  ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
            .add_extension(x509.SubjectAlternativeName(sans), critical=True)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(self.key.public_key()),
                           critical=False)
            .sign(self.key, hashes.SHA256())
        )
        return WorkloadCertificate(chain_pem=_pem(cert), private_key_pem=_key_pem(key))


def mesh_identity(ca: SvidIssuer, nodes: Iterable[ProxyNode]) -> StaticIdentity:
    identity = StaticIdentity(TRUST_DOMAIN, ca.pem)
    for node in nodes:
        identity.certificates[node.id] = ca.svid(f"spiffe://{TRUST_DOMAIN}/ns/{node.namespace}/sa/{node.name}")
    return identity


# -- validation ---------------------------------------------------------------------- #


def compile_like_a_proxy(messages: Mapping[str, list[Message]]) -> ProxyConfig:
    """Every message round-trips through the loader (wire bytes -> message), then the
    whole set compiles as the proxy's ADS client would; every listener and cluster
    must be ready (nothing left warming for a missing route, endpoint or secret)."""
    resources: dict[str, dict[str, Received]] = {}
    for type_url, items in messages.items():
        parsed = {}
        for message in items:
            again = parse_resource(type_url, message.SerializeToString())
            assert again == message
            parsed[resource_name(message)] = Received(again, "v", 0.0)
        resources[type_url] = parsed
    config = ConfigAssembler(ProxyConfig()).build(resources)
    assert set(config.listeners) == set(resources.get(LISTENER, {}))
    # Nothing refers to a route, endpoint or secret the snapshot lacks.
    check_snapshot(Snapshot.build(messages))
    return config


def as_dict(message: Message) -> dict[str, Any]:
    from google.protobuf import json_format

    return json_format.MessageToDict(message, preserving_proto_field_name=True)
