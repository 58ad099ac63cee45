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

Thousands of sidecars hold the same mesh-wide resources (every outbound
cluster, endpoint assignment, listener and route) and differ only in a few of
their own (inbound listeners, secrets). ``SharedParts`` holds the mesh-wide
ones, versioned once per config revision, and ``Snapshot.from_parts(shared,
own)`` joins a proxy's own resources to them without copying: a type only the
shared parts have is served from their ``ResourceTable``, whose encoded SotW
response is made once for every proxy; a type both have is a ``LayeredTable``
whose version and response combine the shared table's (encoded once) with the
proxy's few.
"""

from __future__ import annotations

import hashlib
import itertools
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


class SotwBody:
    """A serialized DiscoveryResponse lacking only its nonce, in pieces (``parts``) that
    are written one after the other: the pieces of a mesh-wide resource set are shared
    by every proxy's response, never copied into one per proxy.

    Each body has its own ``nonce``, unique in the process: every stream sending this
    body sends it with that nonce, so a body shared by thousands of streams is joined
    with its nonce once (``encoded``) rather than once per stream. A nonce names the
    content it came with, which is all a stream needs to match ACKs to responses."""

    __slots__ = ("_wire", "content", "count", "nonce", "parts", "shared")

    def __init__(self, content: str, count: int, parts: tuple[bytes, ...], *, shared: bool = False) -> None:
        self.content = content  # digest of the (name, version) pairs it carries
        self.count = count
        self.parts = parts
        self.shared = shared  # held by a table every proxy may share: keep the encoding
        self.nonce = f"b{next(_BODY_SERIALS)}"
        self._wire: bytes | None = None

    @property
    def data(self) -> bytes:
        """The whole body in one piece (a copy when it has several)."""
        return self.parts[0] if len(self.parts) == 1 else b"".join(self.parts)

    def encoded(self) -> bytes:
        """The body with its own nonce, ready to write (made once when ``shared``)."""
        wire = self._wire
        if wire is None:
            wire = b"".join((*self.parts, nonce_field(self.nonce)))
            if self.shared:
                self._wire = wire
        return wire


_BODY_SERIALS = itertools.count(1)


def with_nonce(data: bytes, nonce: str) -> bytes:
    """``data`` (a serialized Discovery or DeltaDiscovery response) with field 5, nonce, set.

    Protobuf messages may be concatenated: appending one field to a serialized
    message is the same as setting it, so a shared body is never re-encoded.
    """
    return data + nonce_field(nonce)


def nonce_field(nonce: str) -> bytes:
    """Field 5 (nonce) of a Discovery or DeltaDiscovery response, encoded."""
    raw = nonce.encode()
    return _NONCE_TAG + _varint(len(raw)) + raw


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


class ResourceTable:
    """The resources of one type, by name, with the type's version and its encoded SotW
    resources memoized per subscription. A table is immutable: snapshots that hold the
    same one (every sidecar holding the mesh's clusters) share its encodings."""

    __slots__ = ("_bodies", "_chunks", "named", "type_url", "version")

    def __init__(self, type_url: str, resources: Iterable[Resource]) -> None:
        named: dict[str, Resource] = {}
        for resource in resources:
            _check_resource(type_url, resource, named)
            named[resource.name] = resource
        self.type_url = type_url
        self.named: Mapping[str, Resource] = MappingProxyType(named)
        self.version = _type_version(named)
        self._chunks: dict[frozenset[str] | None, _Chunk] = {}
        self._bodies: dict[frozenset[str] | None, SotwBody] = {}

    def chunk(self, names: frozenset[str] | None) -> _Chunk:
        """The resources a wildcard (``None``) or named subscription selects, encoded."""
        chunk = self._chunks.get(names)
        if chunk is None:
            chunk = _encode_chunk(self.named, self.version, names)
            if len(self._chunks) < _MAX_MEMO:
                self._chunks[names] = chunk
        return chunk


@dataclass(frozen=True, slots=True)
class _Chunk:
    """Resources encoded as repeated field 2 of a DiscoveryResponse (and nothing else)."""

    content: str
    count: int
    data: bytes


def _encode_chunk(named: Mapping[str, Resource], version: str, names: frozenset[str] | None) -> _Chunk:
    if names is None:
        chosen = [named[n] for n in sorted(named)]
        content = version
    else:
        chosen = [named[n] for n in sorted(names) if n in named]
        content = _type_version({r.name: r for r in chosen})
    data = discovery_pb2.DiscoveryResponse(resources=[r.body for r in chosen]).SerializeToString()
    return _Chunk(content, len(chosen), data)


class _LayeredMapping(Mapping[str, Resource]):
    """A read-only view of two disjoint mappings as one (no copy of either)."""

    __slots__ = ("_own", "_shared")

    def __init__(self, shared: Mapping[str, Resource], own: Mapping[str, Resource]) -> None:
        self._shared = shared
        self._own = own

    def __getitem__(self, name: str) -> Resource:
        found = self._own.get(name)
        return found if found is not None else self._shared[name]

    def __contains__(self, name: object) -> bool:
        return name in self._own or name in self._shared

    def __iter__(self) -> Iterator[str]:
        yield from self._shared
        yield from self._own

    def __len__(self) -> int:
        return len(self._shared) + len(self._own)


def layers_of(
    mapping: Mapping[str, Resource],
) -> tuple[Mapping[str, Resource], Mapping[str, Resource]] | None:
    """(shared, own) when ``mapping`` is a layered table's resources, else None."""
    if isinstance(mapping, _LayeredMapping):
        return mapping._shared, mapping._own
    return None


class LayeredTable:
    """One type's resources as a shared table (the mesh's) plus a proxy's own: its version
    and encodings combine the two, so the shared table is versioned and encoded once for
    every proxy that holds it."""

    __slots__ = ("_bodies", "named", "own", "shared", "type_url", "version")

    def __init__(self, shared: ResourceTable, own: ResourceTable) -> None:
        for name in own.named:
            if name in shared.named:
                raise ValueError(f"duplicate {SHORT_NAMES.get(own.type_url, own.type_url)} resource {name!r}")
        self.type_url = own.type_url
        self.shared = shared
        self.own = own
        self.named: Mapping[str, Resource] = _LayeredMapping(shared.named, own.named)
        self.version = _digest(f"layers\0{shared.version}\0{own.version}".encode())
        self._bodies: dict[frozenset[str] | None, SotwBody] = {}


_Table = ResourceTable | LayeredTable


def _sotw_body(table: _Table, names: frozenset[str] | None) -> SotwBody:
    header = discovery_pb2.DiscoveryResponse(version_info=table.version, type_url=table.type_url)
    if isinstance(table, ResourceTable):
        chunk = table.chunk(names)
        return SotwBody(chunk.content, chunk.count, (header.SerializeToString(), chunk.data), shared=True)
    shared, own = table.shared.chunk(names), table.own.chunk(names)
    content = table.version if names is None else _digest(f"{shared.content}\0{own.content}".encode())
    return SotwBody(content, shared.count + own.count, (header.SerializeToString(), shared.data, own.data))


class SharedParts:
    """The resources every proxy of a kind holds alike (a mesh's clusters, endpoints and
    outbound listeners and routes), versioned once; ``Snapshot.from_parts`` adds a proxy's
    own resources to them."""

    __slots__ = ("tables",)

    def __init__(self, resources: Mapping[str, Iterable[Resource]]) -> None:
        self.tables: Mapping[str, ResourceTable] = MappingProxyType(
            {type_url: ResourceTable(type_url, items) for type_url, items in resources.items()}
        )

    @classmethod
    def of_tables(cls, tables: Mapping[str, ResourceTable]) -> SharedParts:
        """Parts of tables built already (each may be held by other parts too)."""
        parts = cls({})
        parts.tables = MappingProxyType(dict(tables))
        return parts

    @classmethod
    def build(cls, messages: Mapping[str, Iterable[Message]]) -> SharedParts:
        return cls({type_url: [pack(m) for m in items] for type_url, items in messages.items()})

    def version(self, type_url: str) -> str:
        table = self.tables.get(type_url)
        return table.version if table is not None else _type_version(_EMPTY)

    def carry_over(self, previous: SharedParts | None) -> SharedParts:
        """These parts, holding ``previous``'s table for each type whose version did not
        change: its encodings, made for the proxies already, are used again."""
        if previous is None:
            return self
        tables = dict(self.tables)
        for type_url, table in tables.items():
            old = previous.tables.get(type_url)
            if old is not None and old.version == table.version:
                tables[type_url] = old
        return SharedParts.of_tables(tables)


class Snapshot:
    """Resources per type URL, each by name; immutable once built."""

    __slots__ = ("_tables",)

    def __init__(self, resources: Mapping[str, Iterable[Resource]]) -> None:
        self._tables: dict[str, _Table] = {
            type_url: ResourceTable(type_url, items) for type_url, items in resources.items()
        }

    @classmethod
    def build(cls, messages: Mapping[str, Iterable[Message]]) -> Snapshot:
        """A snapshot of Envoy v3 messages, keyed by type URL."""
        return cls({type_url: [pack(m) for m in items] for type_url, items in messages.items()})

    @classmethod
    def from_parts(cls, shared: SharedParts, own: Mapping[str, Iterable[Resource]]) -> Snapshot:
        """``shared``'s tables (held, not copied) plus one proxy's ``own`` resources: a type
        only ``shared`` has is served from its table, encoded once for every proxy."""
        snapshot = cls({})
        tables: dict[str, _Table] = dict(shared.tables)
        for type_url, items in own.items():
            own_table = ResourceTable(type_url, items)
            base = shared.tables.get(type_url)
            if base is None:
                tables[type_url] = own_table
            elif own_table.named:
                tables[type_url] = LayeredTable(base, own_table)
        snapshot._tables = tables
        return snapshot

    def resources(self, type_url: str) -> Mapping[str, Resource]:
        """The resources of one type by name (empty when the snapshot has none)."""
        table = self._tables.get(type_url)
        return table.named if table is not None else _EMPTY

    def version(self, type_url: str) -> str:
        """The version of one type as a whole (changes when any of its resources does)."""
        table = self._tables.get(type_url)
        return table.version if table is not None else _type_version(_EMPTY)

    def table(self, type_url: str) -> ResourceTable | LayeredTable | None:
        """How one type is held: one table, or a shared table and this proxy's own."""
        return self._tables.get(type_url)

    def get(self, type_url: str, name: str) -> Resource | None:
        return self.resources(type_url).get(name)

    def sotw_body(self, type_url: str, names: frozenset[str] | None) -> SotwBody:
        """The SotW response (without its nonce) for a wildcard (``None``) or named subscription."""
        table = self._tables.get(type_url)
        if table is None:
            table = ResourceTable(type_url, ())
        body = table._bodies.get(names)
        if body is None:
            body = _sotw_body(table, names)
            if len(table._bodies) < _MAX_MEMO:
                table._bodies[names] = body
        return body

    def type_urls(self) -> Iterator[str]:
        return iter(self._tables)

    def __repr__(self) -> str:
        counts = ", ".join(f"{SHORT_NAMES.get(t, t)}={len(r.named)}" for t, r in self._tables.items())
        return f"Snapshot({counts})"
