"""An immutable set of xDS resources for one proxy (or one group of alike proxies).

A ``Snapshot`` holds, per resource type URL, the resources by name, each packed
in a ``google.protobuf.Any`` with its own version. Versions are content hashes:
a resource's version is a digest of its deterministic wire bytes and a type's
version a digest of its (name, version) pairs. So an unchanged resource keeps
its version across rebuilds and across control-plane replicas, and a proxy that
reconnects to another replica is not sent what it already has.

Build one with ``Snapshot.build({LISTENER: [listener, ...], CLUSTER: [...], ...})``
from Envoy v3 messages; the name comes from the message (``cluster_name`` for a
``ClusterLoadAssignment``, ``name`` for the others).
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from types import MappingProxyType

from envoy.service.discovery.v3 import discovery_pb2
from google.protobuf import any_pb2
from google.protobuf.message import Message

TYPE_PREFIX = "type.googleapis.com/"
LISTENER = TYPE_PREFIX + "envoy.config.listener.v3.Listener"
ROUTE = TYPE_PREFIX + "envoy.config.route.v3.RouteConfiguration"
CLUSTER = TYPE_PREFIX + "envoy.config.cluster.v3.Cluster"
ENDPOINT = TYPE_PREFIX + "envoy.config.endpoint.v3.ClusterLoadAssignment"
SECRET = TYPE_PREFIX + "envoy.extensions.transport_sockets.tls.v3.Secret"

# The order in which a change is pushed on one ADS stream: a cluster before the
# endpoints naming it, a listener before the routes it refers to (the xDS
# protocol's "make before break" ordering); secrets first, as both may use them.
RESOURCE_TYPES: tuple[str, ...] = (SECRET, CLUSTER, ENDPOINT, LISTENER, ROUTE)

# Types whose SotW responses carry the full state: a name missing from a
# response means the resource was removed.
FULL_STATE_TYPES = frozenset({LISTENER, CLUSTER})

SHORT_NAMES = {LISTENER: "lds", ROUTE: "rds", CLUSTER: "cds", ENDPOINT: "eds", SECRET: "sds"}

_EMPTY: Mapping[str, Resource] = MappingProxyType({})
# Field 5 (nonce), wire type 2, in both DiscoveryResponse and DeltaDiscoveryResponse.
_NONCE_TAG = bytes([(5 << 3) | 2])
_MAX_MEMO = 256
_DIGEST_CHARS = 16


@dataclass(frozen=True, slots=True)
class Resource:
    """One named resource at one version, ready to send."""

    name: str
    version: str
    body: any_pb2.Any


def resource_name(message: Message) -> str:
    """The xDS name of an Envoy resource message."""
    name_field = "cluster_name" if message.DESCRIPTOR.full_name.endswith("ClusterLoadAssignment") else "name"
    name = getattr(message, name_field, "")
    if not isinstance(name, str) or not name:
        raise ValueError(f"{message.DESCRIPTOR.full_name} has no {name_field}")
    return name


def pack(message: Message) -> Resource:
    """``message`` packed in an ``Any``, versioned by its content."""
    body = any_pb2.Any()
    body.Pack(message, deterministic=True)
    return Resource(resource_name(message), _digest(body.value), body)


def _digest(data: bytes) -> str:
    return hashlib.blake2b(data, digest_size=_DIGEST_CHARS // 2).hexdigest()


def _type_version(resources: Mapping[str, Resource]) -> str:
    h = hashlib.blake2b(digest_size=_DIGEST_CHARS // 2)
    for name in sorted(resources):
        h.update(name.encode())
        h.update(b"\0")
        h.update(resources[name].version.encode())
        h.update(b"\0")
    return h.hexdigest()


def _check_resource(type_url: str, resource: Resource, named: Mapping[str, Resource]) -> None:
    if resource.body.type_url != type_url:
        raise ValueError(f"resource {resource.name!r} is a {resource.body.type_url}, not a {type_url}")
    if resource.name in named:
        raise ValueError(f"duplicate {SHORT_NAMES.get(type_url, type_url)} resource {resource.name!r}")


@dataclass(frozen=True, slots=True)
class SotwBody:
    """A serialized DiscoveryResponse lacking only its nonce (``with_nonce`` appends it)."""

    content: str  # digest of the (name, version) pairs it carries
    count: int
    data: bytes


def with_nonce(data: bytes, nonce: str) -> bytes:
    """``data`` (a serialized Discovery or DeltaDiscovery response) with field 5, nonce, set.

    Protobuf messages may be concatenated: appending one field to a serialized
    message is the same as setting it, so a shared body is never re-encoded.
    """
    raw = nonce.encode()
    return data + _NONCE_TAG + _varint(len(raw)) + raw


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        low = n & 0x7F
        n >>= 7
        if n:
            out.append(low | 0x80)
        else:
            out.append(low)
            return bytes(out)


class Snapshot:
    """Resources per type URL, each by name; immutable once built."""

    __slots__ = ("_memo", "_resources", "_versions")

    def __init__(self, resources: Mapping[str, Iterable[Resource]]) -> None:
        by_type: dict[str, Mapping[str, Resource]] = {}
        versions: dict[str, str] = {}
        for type_url, items in resources.items():
            named: dict[str, Resource] = {}
            for resource in items:
                _check_resource(type_url, resource, named)
                named[resource.name] = resource
            by_type[type_url] = MappingProxyType(named)
            versions[type_url] = _type_version(named)
        self._resources = by_type
        self._versions = versions
        # Serialized SotW responses by (type, subscription): streams of one group share them.
        self._memo: dict[tuple[str, frozenset[str] | None], SotwBody] = {}

    @classmethod
    def build(cls, messages: Mapping[str, Iterable[Message]]) -> Snapshot:
        """A snapshot of Envoy v3 messages, keyed by type URL."""
        return cls({type_url: [pack(m) for m in items] for type_url, items in messages.items()})

    def resources(self, type_url: str) -> Mapping[str, Resource]:
        """The resources of one type by name (empty when the snapshot has none)."""
        return self._resources.get(type_url, _EMPTY)

    def version(self, type_url: str) -> str:
        """The version of one type as a whole (changes when any of its resources does)."""
        version = self._versions.get(type_url)
        return version if version is not None else _type_version(_EMPTY)

    def get(self, type_url: str, name: str) -> Resource | None:
        return self.resources(type_url).get(name)

    def sotw_body(self, type_url: str, names: frozenset[str] | None) -> SotwBody:
        """The SotW response (without its nonce) for a wildcard (``None``) or named subscription."""
        memo_key = (type_url, names)
        body = self._memo.get(memo_key)
        if body is None:
            body = self._sotw_body(type_url, names)
            if len(self._memo) < _MAX_MEMO:
                self._memo[memo_key] = body
        return body

    def _sotw_body(self, type_url: str, names: frozenset[str] | None) -> SotwBody:
        available = self.resources(type_url)
        if names is None:
            chosen = [available[n] for n in sorted(available)]
            content = self.version(type_url)
        else:
            chosen = [available[n] for n in sorted(names) if n in available]
            content = _type_version({r.name: r for r in chosen})
        response = discovery_pb2.DiscoveryResponse(
            version_info=self.version(type_url), type_url=type_url, resources=[r.body for r in chosen]
        )
        return SotwBody(content=content, count=len(chosen), data=response.SerializeToString())

    def type_urls(self) -> Iterator[str]:
        return iter(self._resources)

    def __repr__(self) -> str:
        counts = ", ".join(f"{SHORT_NAMES.get(t, t)}={len(r)}" for t, r in self._resources.items())
        return f"Snapshot({counts})"
