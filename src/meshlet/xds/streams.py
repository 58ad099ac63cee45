"""The server side of one ADS stream, sans-IO: requests and snapshots in, responses out.

``SotwStream`` speaks state-of-the-world xDS, ``DeltaStream`` incremental
(delta) xDS, both as the xDS REST and gRPC protocol describes:

* A request carrying the nonce of the latest response is an ACK when it has no
  ``error_detail`` and a NACK when it has one. A NACK is recorded with the
  proxy's error and nothing is resent: the proxy keeps its previous config
  until the snapshot changes again.
* A SotW response's nonce is its body's (``SotwBody.nonce``, unique in the
  process): the streams sharing a body share its encoding with the nonce too.
* SotW requests carrying a stale nonce are ignored (a newer response is on
  its way to the proxy, which will answer it with its full subscription).
* Listeners and clusters are full-state in SotW: every response carries all
  subscribed resources, so a name missing from it is a removal. Delta sends
  only what changed and names removals in ``removed_resources``.
* A subscription with no names in its first request, or the name ``*``, is a
  wildcard (what Envoy does for LDS and CDS); otherwise resources are served by
  name (RDS and EDS, and everything from gRPC's xDS client).
"""

from __future__ import annotations

import itertools
from collections import OrderedDict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

from envoy.service.discovery.v3 import discovery_pb2

from meshlet.xds.cache import NodeStatus, SnapshotCache
from meshlet.xds.snapshot import (
    RESOURCE_TYPES,
    Resource,
    Snapshot,
    SotwBody,
    layers_of,
    nonce_field,
    with_nonce,
)

WILDCARD = "*"
# Requests beyond these bounds are refused: one proxy needs far fewer names.
MAX_NAMES_PER_REQUEST = 100_000
MAX_ERROR_DETAIL = 4096


@dataclass(frozen=True, slots=True)
class Outgoing:
    """One response to send: a serialized body (often shared by every stream of a group,
    or in pieces shared by every proxy of the mesh) and this stream's nonce, joined only
    when written (``encode``) so thousands of streams never hold their own copy at once."""

    body: bytes | tuple[bytes, ...]
    nonce: str
    # The SotW body this response sends, when its own nonce is the one sent.
    sotw: SotwBody | None = None

    def encode(self) -> bytes:
        if self.sotw is not None and self.sotw.nonce == self.nonce:
            return self.sotw.encoded()
        body = self.body
        if isinstance(body, bytes):
            return with_nonce(body, self.nonce)
        return b"".join((*body, nonce_field(self.nonce)))


class StreamError(Exception):
    """The peer broke the protocol; the stream ends with INVALID_ARGUMENT."""


def _desired(available: Mapping[str, Resource], scope: frozenset[str] | None) -> Mapping[str, Resource]:
    """The resources a subscription selects: all of them (``scope`` None, a wildcard) or by name."""
    if scope is None:
        return available
    return {name: available[name] for name in scope if name in available}


def _check_type(type_url: str) -> None:
    if not type_url:
        raise StreamError("type_url is required on an aggregated stream")


def _error_text(status: object) -> str:
    message = str(getattr(status, "message", "")) or "rejected without a message"
    return message[:MAX_ERROR_DETAIL]


def _record_reply(
    cache: SnapshotCache, status: NodeStatus, type_url: str, request: Any, *, rejected: str, acked: str
) -> None:
    """Record the proxy's answer to the latest response: a NACK when it carries an error."""
    if request.HasField("error_detail"):
        error = _error_text(request.error_detail)
        cache.record_nack(status, type_url, rejected, request.response_nonce, error)
    else:
        cache.record_ack(status, type_url, acked)


class _Nonces:
    def __init__(self) -> None:
        self._counter = itertools.count(1)

    def next(self) -> str:
        return str(next(self._counter))


# --------------------------------------------------------------------------- #
# State of the world
# --------------------------------------------------------------------------- #


@dataclass(slots=True)
class _SotwType:
    scope: frozenset[str] | None = None  # subscribed names; None: wildcard
    sent: str | None = None  # content digest of the last response
    nonce: str = ""
    version: str = ""
    # (type version, scope) of the last comparison: unchanged means nothing to send.
    basis: tuple[str, frozenset[str] | None] | None = None


def _sotw_scope(names: Iterable[str], first: bool, previous: frozenset[str] | None) -> frozenset[str] | None:
    requested = frozenset(names)
    if WILDCARD in requested or (not requested and (first or previous is None)):
        return None
    return requested


class SotwStream:
    """One state-of-the-world ADS stream of one node; responses come out serialized."""

    def __init__(self, cache: SnapshotCache, status: NodeStatus) -> None:
        self._cache = cache
        self.status = status
        self._types: dict[str, _SotwType] = {}

    def on_request(
        self, request: discovery_pb2.DiscoveryRequest, snapshot: Snapshot | None
    ) -> list[Outgoing]:
        type_url = request.type_url
        _check_type(type_url)
        if len(request.resource_names) > MAX_NAMES_PER_REQUEST:
            raise StreamError(f"more than {MAX_NAMES_PER_REQUEST} resource names in one request")
        state = self._types.get(type_url)
        first = state is None
        if state is None:
            state = self._types[type_url] = _SotwType()
        elif request.response_nonce != state.nonce:
            return []  # stale: answers an older response
        if request.response_nonce:
            self._ack_or_nack(request, type_url, state)
        state.scope = _sotw_scope(request.resource_names, first, state.scope)
        if first and snapshot is not None and request.version_info == snapshot.version(type_url):
            # The proxy already runs this version (it reconnected): nothing to send.
            state.sent = snapshot.sotw_body(type_url, state.scope).content
            state.version = request.version_info
            self._cache.record_ack(self.status, type_url, request.version_info)
            return []
        response = self._respond(type_url, state, snapshot, force=first)
        return [response] if response is not None else []

    def on_snapshot(self, snapshot: Snapshot | None) -> list[Outgoing]:
        """The node's snapshot changed: responses for the types whose content did."""
        responses = []
        for type_url in _ordered(self._types):
            response = self._respond(type_url, self._types[type_url], snapshot, force=False)
            if response is not None:
                responses.append(response)
        return responses

    def _ack_or_nack(self, request: discovery_pb2.DiscoveryRequest, type_url: str, state: _SotwType) -> None:
        # A SotW ACK names the version the proxy now runs; a NACK the one it kept.
        acked = request.version_info
        _record_reply(self._cache, self.status, type_url, request, rejected=state.version, acked=acked)

    def _respond(
        self, type_url: str, state: _SotwType, snapshot: Snapshot | None, *, force: bool
    ) -> Outgoing | None:
        if snapshot is None:
            return None
        basis = (snapshot.version(type_url), state.scope)
        if basis == state.basis and not force:
            return None
        state.basis = basis
        body = snapshot.sotw_body(type_url, state.scope)
        if not force and (body.content == state.sent or (body.count == 0 and state.sent is None)):
            return None
        state.sent = body.content
        state.version = snapshot.version(type_url)
        state.nonce = body.nonce
        self._cache.record_sent(self.status, type_url, state.version, state.nonce)
        return Outgoing(body.parts, state.nonce, body)


# --------------------------------------------------------------------------- #
# Delta
# --------------------------------------------------------------------------- #


@dataclass(slots=True)
class _DeltaType:
    wildcard: bool = False
    names: frozenset[str] = frozenset()  # explicit subscriptions
    # What the proxy has: the resources of ``base`` (a snapshot's mapping) within
    # ``base_scope``, except where ``overrides`` says otherwise (None: it has none).
    # Sharing the snapshot's mapping keeps thousands of streams from each holding
    # a copy of every name and version.
    base: Mapping[str, Resource] | None = None
    base_scope: frozenset[str] | None = None
    overrides: dict[str, str | None] = field(default_factory=dict)
    nonce: str = ""
    version: str = ""
    basis: tuple[str, bool, frozenset[str]] | None = None

    @property
    def scope(self) -> frozenset[str] | None:
        return None if self.wildcard else self.names

    def known(self, name: str) -> str | None:
        if name in self.overrides:
            return self.overrides[name]
        base = self.base
        if base is not None and name in base and (self.base_scope is None or name in self.base_scope):
            return base[name].version
        return None

    def held(self) -> set[str]:
        """Every name the proxy has."""
        names = {n for n, v in self.overrides.items() if v is not None}
        if self.base is not None:
            scoped = self.base.keys() if self.base_scope is None else self.base_scope & self.base.keys()
            names.update(n for n in scoped if n not in self.overrides)
        return names


@dataclass(frozen=True, slots=True)
class _Delta:
    """A delta response without its nonce, in pieces; no pieces when there is nothing to
    send. For one layer of a layered snapshot (``_layer_diff``): its updated resources
    encoded as DeltaDiscoveryResponse field 2 entries, and the names it removed."""

    parts: tuple[bytes, ...]
    removed: tuple[str, ...] = ()


_MemoKey = tuple[int, int, frozenset[str] | None, str]


class _DeltaMemo:
    """Diffs between two snapshot mappings for one scope, shared by every stream that
    moves between the same two (all the proxies of a group, on each push)."""

    def __init__(self, size: int = 128) -> None:
        self._size = size
        self._entries: OrderedDict[_MemoKey, tuple[object, object, _Delta]] = OrderedDict()

    def get(
        self,
        old: Mapping[str, Resource],
        new: Mapping[str, Resource],
        scope: frozenset[str] | None,
        type_url: str,
    ) -> _Delta | None:
        entry = self._entries.get((id(old), id(new), scope, type_url))
        # The entry holds both mappings, so their ids cannot be reused while it lives.
        return entry[2] if entry is not None and entry[0] is old and entry[1] is new else None

    def put(
        self,
        old: Mapping[str, Resource],
        new: Mapping[str, Resource],
        scope: frozenset[str] | None,
        type_url: str,
        delta: _Delta,
    ) -> None:
        self._entries[(id(old), id(new), scope, type_url)] = (old, new, delta)
        while len(self._entries) > self._size:
            self._entries.popitem(last=False)


_MEMO = _DeltaMemo()
# Diffs of shared layers alone (no header): kept apart from whole responses.
_LAYER_MEMO = _DeltaMemo()
# What a proxy that has nothing yet holds (the memo's "old" side for first responses).
_NOTHING: Mapping[str, Resource] = MappingProxyType({})


class DeltaStream:
    """One incremental (delta) ADS stream of one node; responses come out serialized."""

    def __init__(self, cache: SnapshotCache, status: NodeStatus) -> None:
        self._cache = cache
        self.status = status
        self._types: dict[str, _DeltaType] = {}
        self._nonces = _Nonces()

    def on_request(
        self, request: discovery_pb2.DeltaDiscoveryRequest, snapshot: Snapshot | None
    ) -> list[Outgoing]:
        type_url = request.type_url
        _check_type(type_url)
        changes = len(request.resource_names_subscribe) + len(request.resource_names_unsubscribe)
        if changes > MAX_NAMES_PER_REQUEST:
            raise StreamError(f"more than {MAX_NAMES_PER_REQUEST} resource names in one request")
        state = self._types.get(type_url)
        if state is None:
            state = self._types[type_url] = self._first(request)
        else:
            self._resubscribe(request, state)
        if request.response_nonce and request.response_nonce == state.nonce:
            self._ack_or_nack(request, type_url, state)
        response = self._respond(type_url, state, snapshot)
        return [response] if response is not None else []

    def on_snapshot(self, snapshot: Snapshot | None) -> list[Outgoing]:
        responses = []
        for type_url in _ordered(self._types):
            response = self._respond(type_url, self._types[type_url], snapshot)
            if response is not None:
                responses.append(response)
        return responses

    @staticmethod
    def _first(request: discovery_pb2.DeltaDiscoveryRequest) -> _DeltaType:
        names = frozenset(request.resource_names_subscribe)
        return _DeltaType(
            wildcard=not names or WILDCARD in names,
            names=names - {WILDCARD},
            overrides=dict(request.initial_resource_versions),
        )

    @staticmethod
    def _resubscribe(request: discovery_pb2.DeltaDiscoveryRequest, state: _DeltaType) -> None:
        subscribe = frozenset(request.resource_names_subscribe)
        unsubscribe = frozenset(request.resource_names_unsubscribe)
        if WILDCARD in subscribe:
            state.wildcard = True
        if WILDCARD in unsubscribe:
            state.wildcard = False
        state.names = (state.names | (subscribe - {WILDCARD})) - unsubscribe
        for name in unsubscribe - {WILDCARD}:
            # The proxy drops what it unsubscribed from; resubscribing fetches it anew.
            state.overrides[name] = None

    def _ack_or_nack(
        self, request: discovery_pb2.DeltaDiscoveryRequest, type_url: str, state: _DeltaType
    ) -> None:
        version = state.version
        _record_reply(self._cache, self.status, type_url, request, rejected=version, acked=version)

    def _respond(self, type_url: str, state: _DeltaType, snapshot: Snapshot | None) -> Outgoing | None:
        if snapshot is None:
            return None
        basis = (snapshot.version(type_url), state.wildcard, state.names)
        if basis == state.basis:
            return None
        state.basis = basis
        available = snapshot.resources(type_url)
        delta = self._delta(state, type_url, snapshot.version(type_url), available)
        state.base, state.base_scope, state.overrides = available, state.scope, {}
        if not delta.parts:
            return None
        state.version = snapshot.version(type_url)
        state.nonce = self._nonces.next()
        self._cache.record_sent(self.status, type_url, state.version, state.nonce)
        return Outgoing(delta.parts, state.nonce)

    @staticmethod
    def _delta(state: _DeltaType, type_url: str, version: str, available: Mapping[str, Resource]) -> _Delta:
        """What to send: through the memo when the proxy holds exactly an earlier snapshot
        (or nothing at all), so the proxies of a group share one diff and one encoding."""
        scope = state.scope
        old: Mapping[str, Resource] | None = None
        if not state.overrides and (state.base is None or state.base_scope == scope):
            old = state.base if state.base is not None else _NOTHING
            layered = _layered_delta(old, available, scope, type_url, version)
            if layered is not None:
                return layered
            cached = _MEMO.get(old, available, scope, type_url)
            if cached is not None:
                return cached
        desired = _desired(available, scope)
        updated = [r for name, r in sorted(desired.items()) if state.known(name) != r.version]
        removed = sorted(n for n in state.held() if n not in desired and (scope is None or n in scope))
        body = b""
        if updated or removed:
            body = discovery_pb2.DeltaDiscoveryResponse(
                system_version_info=version,
                type_url=type_url,
                resources=[
                    discovery_pb2.Resource(name=r.name, version=r.version, resource=r.body) for r in updated
                ],
                removed_resources=removed,
            ).SerializeToString()
        delta = _Delta((body,) if body else ())
        if old is not None:
            _MEMO.put(old, available, scope, type_url, delta)
        return delta


def _layered_delta(old: Mapping[str, Resource], new: Mapping[str, Resource], scope: frozenset[str] | None,
                   type_url: str, version: str) -> _Delta | None:
    """The delta from ``old`` to a layered ``new`` (a shared table and a proxy's own), for a
    proxy holding exactly ``old``: the shared layer's diff is made and encoded once for
    every proxy moving between the same two shared tables, only the own layer's per proxy.
    None when ``new`` is not layered."""
    new_layers = layers_of(new)
    if new_layers is None:
        return None
    new_shared, new_own = new_layers
    old_shared, old_own = layers_of(old) or (old, _NOTHING)
    shared = _LAYER_MEMO.get(old_shared, new_shared, scope, type_url)
    if shared is None:
        shared = _layer_diff(old_shared, new_shared, scope)
        _LAYER_MEMO.put(old_shared, new_shared, scope, type_url, shared)
    own = _layer_diff(old_own, new_own, scope)
    # A name that moved between layers is updated by one and must not be removed by the other.
    removed = sorted([n for n in shared.removed if n not in new_own] +
                     [n for n in own.removed if n not in new_shared])
    updates = [part for part in (*shared.parts, *own.parts) if part]
    if not updates and not removed:
        return _Delta(())
    header = discovery_pb2.DeltaDiscoveryResponse(
        system_version_info=version, type_url=type_url, removed_resources=removed
    ).SerializeToString()
    return _Delta((header, *updates))


def _layer_diff(old: Mapping[str, Resource], new: Mapping[str, Resource],
                scope: frozenset[str] | None) -> _Delta:
    """What changed from ``old`` to ``new`` within ``scope``: updates encoded, removals named."""
    desired = _desired(new, scope)
    updated = []
    for name in sorted(desired):
        resource = desired[name]
        held = old.get(name)
        if held is None or held.version != resource.version:
            updated.append(resource)
    removed = tuple(sorted(n for n in old if n not in desired and (scope is None or n in scope)))
    data = b""
    if updated:
        data = discovery_pb2.DeltaDiscoveryResponse(resources=[
            discovery_pb2.Resource(name=r.name, version=r.version, resource=r.body) for r in updated
        ]).SerializeToString()
    return _Delta((data,), removed)


def _ordered(types: Mapping[str, object]) -> list[str]:
    known = [t for t in RESOURCE_TYPES if t in types]
    return known + sorted(t for t in types if t not in RESOURCE_TYPES)
