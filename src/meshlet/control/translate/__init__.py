"""The translator: Istio-style resources and the registry -> one proxy's xDS snapshot.

    rs = ResourceSet.of(resources)              # once per store revision
    rs.inherit_parts(previous_rs)                # optional: reuse unchanged shared tables
    snapshot = translate(node, rs, identity)     # per proxy (sidecar or gateway)
    result = translate_with_status(node, rs, identity)   # .snapshot and .status

Every resource is an Envoy v3 message with only fields Envoy knows. What the
translator cannot do for a proxy, or does differently from the config
(unknown destinations, unsupported settings, AuthorizationPolicy and
RequestAuthentication that are stored but not enforced yet), is recorded in
the proxy's ``TranslationStatus`` rather than dropped silently.

A snapshot is ``Snapshot.from_parts(shared, own)``: the mesh-wide clusters,
endpoints and (for sidecars) outbound listeners and routes are one
``SharedParts`` per resource set and kind of proxy (``shared_parts``), so
thousands of sidecars hold, version and encode them once; only inbound
listeners and clusters and secrets are the proxy's own.
"""

from __future__ import annotations

from collections.abc import Hashable
from dataclasses import dataclass

from google.protobuf.message import Message

from meshlet.control.translate.clusters import outbound_clusters
from meshlet.control.translate.endpoints import load_assignments
from meshlet.control.translate.gateway import gateway_config
from meshlet.control.translate.index import ResourceSet
from meshlet.control.translate.node import GATEWAY, SIDECAR, ProxyNode, node_id
from meshlet.control.translate.security import (
    KeyProviderRef,
    MeshIdentity,
    StaticIdentity,
    WorkloadCertificate,
    ca_secret,
    certificate_secret,
    has_mesh_certificate,
    mesh_secrets,
    note_unenforced_policies,
)
from meshlet.control.translate.sidecar import Inbound, SidecarConfig, sidecar_config
from meshlet.control.translate.status import Note, TranslationStatus
from meshlet.xds.snapshot import (
    CLUSTER,
    ENDPOINT,
    LISTENER,
    ROUTE,
    SECRET,
    Resource,
    ResourceTable,
    SharedParts,
    Snapshot,
    pack,
)

__all__ = [
    "GATEWAY",
    "SIDECAR",
    "KeyProviderRef",
    "MeshIdentity",
    "Note",
    "OwnParts",
    "ProxyNode",
    "ResourceSet",
    "StaticIdentity",
    "Translation",
    "TranslationStatus",
    "WorkloadCertificate",
    "node_id",
    "translate",
    "translate_with_status",
]


@dataclass(frozen=True, slots=True)
class OwnParts:
    """A sidecar's inbound config with its resources packed. Given back to the next
    translation of the same proxy (``earlier``), it is used again when built from
    equal inputs: a change elsewhere in the mesh costs a proxy no rebuild of its own."""

    inbound: Inbound
    packed: dict[str, list[Resource]]


@dataclass(frozen=True, slots=True)
class Translation:
    snapshot: Snapshot
    status: TranslationStatus
    messages: dict[str, list[Message]]
    own: OwnParts | None = None


def translate(node: ProxyNode, resources: ResourceSet, identity: MeshIdentity | None = None) -> Snapshot:
    """The snapshot ``node`` should run."""
    return translate_with_status(node, resources, identity).snapshot


def translate_with_status(node: ProxyNode, resources: ResourceSet, identity: MeshIdentity | None = None,
                          earlier: OwnParts | None = None) -> Translation:
    """``node``'s snapshot and notes; ``earlier`` is the ``own`` of its last translation."""
    status = TranslationStatus(node.id)
    for problem in resources.problems:
        status.warning("", problem)
    mtls = has_mesh_certificate(node, identity)
    workload = resources.workload_of(node.id, node.name, node.namespace)
    clusters = outbound_clusters(resources, mtls, status)
    assignments = load_assignments(resources)
    # Mesh-wide messages go into parts built and versioned once per resource set and
    # shared by every proxy's snapshot; only the proxy's own are packed here.
    shared: dict[str, list[Message]] = {CLUSTER: list(clusters), ENDPOINT: list(assignments)}
    table_keys: dict[str, Hashable] = {CLUSTER: ("clusters", mtls), ENDPOINT: "endpoints"}
    own: dict[str, list[Message]] = {SECRET: mesh_secrets(node, identity), LISTENER: [], ROUTE: [],
                                     CLUSTER: []}
    packed: dict[str, list[Resource]] = {}
    own_parts: OwnParts | None = None
    if node.kind == GATEWAY:
        labels = dict(workload.spec.labels) if workload is not None else {"istio": node.name}
        gateway = gateway_config(resources, node, labels, identity, status)
        own[LISTENER] += gateway.listeners
        own[ROUTE] += gateway.routes
        own[SECRET] += _credential_secrets(gateway.credentials, identity)
    else:
        labels = dict(workload.spec.labels) if workload is not None else {}
        sidecar = sidecar_config(resources, node, workload, mtls, status,
                                 earlier.inbound if earlier is not None else None)
        own[LISTENER] += sidecar.listeners
        own[CLUSTER] += sidecar.clusters
        own_parts = _own_parts(sidecar, earlier)
        packed = own_parts.packed
        shared[LISTENER] = list(sidecar.outbound_listeners)
        shared[ROUTE] = list(sidecar.routes)
        table_keys[LISTENER] = sidecar.outbound_key
        table_keys[ROUTE] = sidecar.routes_key
    parts = shared_parts(resources, {t: (table_keys[t], items) for t, items in shared.items()})
    own_packed = {t: packed.get(t, []) + [pack(m) for m in items if t not in packed]
                  for t, items in own.items()}
    snapshot = Snapshot.from_parts(parts, own_packed)
    namespace = workload.namespace if workload is not None else node.namespace
    note_unenforced_policies(resources, namespace, labels, status)
    messages = {t: shared.get(t, []) + own.get(t, []) for t in (SECRET, CLUSTER, ENDPOINT, LISTENER, ROUTE)}
    return Translation(snapshot, status, messages, own_parts)


def _own_parts(sidecar: SidecarConfig, earlier: OwnParts | None) -> OwnParts:
    inbound = sidecar.inbound
    assert inbound is not None
    if earlier is not None and earlier.inbound is inbound:
        return earlier
    return OwnParts(inbound, {LISTENER: [pack(m) for m in inbound.listeners],
                              CLUSTER: [pack(m) for m in inbound.clusters]})


def shared_parts(resources: ResourceSet, tables: dict[str, tuple[Hashable, list[Message]]]) -> SharedParts:
    """Shared parts of one table per type, each the same for every proxy asking with its
    key (``tables``: type URL -> (key, messages)). A table is packed and versioned once per
    resource set under its key, whichever proxies hold it alongside which other tables
    (every sidecar holds the one of the mesh's clusters, whatever its outbound address)."""
    key = tuple((type_url, table_key) for type_url, (table_key, _) in tables.items())
    return resources.memo(("parts", key), lambda: SharedParts.of_tables({
        type_url: shared_table(resources, type_url, table_key, messages)
        for type_url, (table_key, messages) in tables.items()
    }))


def shared_table(resources: ResourceSet, type_url: str, key: Hashable,
                 messages: list[Message]) -> ResourceTable:
    """``messages`` packed into one table per resource set under ``key``; the previous
    set's table when its version is the same (its encodings are made already)."""
    def build() -> ResourceTable:
        table = ResourceTable(type_url, [pack(m) for m in messages])
        earlier = resources.previous_parts(("table", type_url, key))
        return earlier if isinstance(earlier, ResourceTable) and earlier.version == table.version else table

    return resources.memo(("parts", ("table", type_url, key)), build)


def _credential_secrets(names: list[str], identity: MeshIdentity | None) -> list[Message]:
    if identity is None:
        return []
    secrets: list[Message] = []
    for name in dict.fromkeys(names):
        certificate = identity.credential(name)
        if certificate is not None:
            secrets.append(certificate_secret(name, certificate))
        ca = identity.credential_ca(name)
        if ca is not None:
            secrets.append(ca_secret(name + "-cacert", ca))
    return secrets
