"""Who a proxy is, from its xDS node id.

meshlet's proxies send only ``node.id`` and ``node.cluster`` (no metadata), so
the id carries what the translator needs, in Istio's format::

    <kind>~<address>~<name>.<namespace>~<domain>
    sidecar~127.0.1.5~reviews-v1.default~default.svc.cluster.local
    router~127.0.0.1~ingressgateway.istio-system~istio-system.svc.cluster.local

``kind`` is ``sidecar`` or ``router`` (a gateway). ``name`` is the workload's
name: a sidecar's ``Workload`` in the registry is the one whose ``proxyId`` is
this node id, or else the one called ``name`` in ``namespace``. ``address`` is
where the proxy's listeners bind unless the workload says otherwise. An id not
in this format is a sidecar named by the whole id in the default namespace.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from meshlet.control.resources import CLUSTER_DOMAIN, DEFAULT_NAMESPACE

SIDECAR = "sidecar"
GATEWAY = "router"
KINDS = (SIDECAR, GATEWAY)
DEFAULT_ADDRESS = "127.0.0.1"


@dataclass(frozen=True, slots=True)
class ProxyNode:
    id: str
    kind: str = SIDECAR
    address: str = DEFAULT_ADDRESS
    name: str = ""
    namespace: str = DEFAULT_NAMESPACE
    cluster: str = ""

    @property
    def is_gateway(self) -> bool:
        return self.kind == GATEWAY

    @classmethod
    def parse(cls, node_id: str, cluster: str = "") -> ProxyNode:
        """The node an id names (see the module docstring for the format)."""
        parts = node_id.split("~")
        if len(parts) != 4 or parts[0] not in KINDS or not parts[2]:
            return cls(id=node_id, name=node_id, cluster=cluster)
        kind, address, workload, _domain = parts
        name, _, namespace = workload.partition(".")
        return cls(id=node_id, kind=kind, address=address or DEFAULT_ADDRESS, name=name,
                   namespace=namespace or DEFAULT_NAMESPACE, cluster=cluster)

    @classmethod
    def from_xds(cls, node: Any) -> ProxyNode:
        """From an ``envoy.config.core.v3.Node`` (or anything with ``id`` and ``cluster``)."""
        return cls.parse(str(node.id), str(getattr(node, "cluster", "")))


def node_id(kind: str, address: str, name: str, namespace: str = DEFAULT_NAMESPACE) -> str:
    """The id a proxy of ``kind`` for workload ``name`` should present."""
    if kind not in KINDS:
        raise ValueError(f"proxy kind {kind!r} is not one of {', '.join(KINDS)}")
    return f"{kind}~{address}~{name}.{namespace}~{namespace}.{CLUSTER_DOMAIN}"
