"""The server side of one ADS stream, sans-IO: requests and snapshots in, responses out.

``SotwStream`` speaks state-of-the-world xDS, ``DeltaStream`` incremental
(delta) xDS, both as the xDS REST and gRPC protocol describes:

* A request carrying the nonce of the latest response is an ACK when it has no
  ``error_detail`` and a NACK when it has one. A NACK is recorded with the
  proxy's error and nothing is resent: the proxy keeps its previous config
  until the snapshot changes again.
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
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from envoy.service.discovery.v3 import discovery_pb2

from meshlet.xds.cache import NodeStatus, SnapshotCache
from meshlet.xds.snapshot import RESOURCE_TYPES, Resource, Snapshot

WILDCARD = "*"
# Requests beyond these bounds are refused: one proxy needs far fewer names.
MAX_NAMES_PER_REQUEST = 100_000
MAX_ERROR_DETAIL = 4096


class StreamError(Exception):
    """The peer broke the protocol; the stream ends with INVALID_ARGUMENT."""


def _desired(
    snapshot: Snapshot | None, type_url: str, wildcard: bool, names: set[str]
) -> dict[str, Resource]:
    """The resources a subscription selects from ``snapshot``."""
    if snapshot is None:
        return {}
    available = snapshot.resources(type_url)
    if wildcard:
        return dict(available)
    return {name: available[name] for name in names if name in available}


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
    wildcard: bool = False
    names: set[str] = field(default_factory=set)
    # (name, version) pairs of the last response: what the proxy was last sent.
    sent: frozenset[tuple[str, str]] | None = None
    nonce: str = ""
    version: str = ""
    # What the last comparison saw: unchanged means nothing to send, without
    # walking thousands of resources on every push.
    basis: tuple[str, bool, frozenset[str]] | None = None


def _basis(
    snapshot: Snapshot, type_url: str, wildcard: bool, names: set[str]
) -> tuple[str, bool, frozenset[str]]:
    return (snapshot.version(type_url), wildcard, frozenset(names))


class SotwStream:
    """One state-of-the-world ADS stream of one node."""

    def __init__(self, cache: SnapshotCache, status: NodeStatus) -> None:
        self._cache = cache
        self.status = status
        self._types: dict[str, _SotwType] = {}
        self._nonces = _Nonces()

    def on_request(
        self, request: discovery_pb2.DiscoveryRequest, snapshot: Snapshot | None
    ) -> list[discovery_pb2.DiscoveryResponse]:
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
        names = set(request.resource_names)
        state.wildcard = WILDCARD in names or (not names and (first or state.wildcard))
        state.names = names - {WILDCARD}
        if first and snapshot is not None and request.version_info == snapshot.version(type_url):
            # The proxy already runs this version (it reconnected): nothing to send.
            state.sent = self._content(snapshot, type_url, state)
            state.version = request.version_info
            self._cache.record_ack(self.status, type_url, request.version_info)
            return []
        response = self._respond(type_url, state, snapshot, force=first)
        return [response] if response is not None else []

    def on_snapshot(self, snapshot: Snapshot | None) -> list[discovery_pb2.DiscoveryResponse]:
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

    @staticmethod
    def _content(snapshot: Snapshot | None, type_url: str, state: _SotwType) -> frozenset[tuple[str, str]]:
        chosen = _desired(snapshot, type_url, state.wildcard, state.names)
        return frozenset((name, r.version) for name, r in chosen.items())

    def _respond(
        self, type_url: str, state: _SotwType, snapshot: Snapshot | None, *, force: bool
    ) -> discovery_pb2.DiscoveryResponse | None:
        if snapshot is None:
            return None
        basis = _basis(snapshot, type_url, state.wildcard, state.names)
        if basis == state.basis and not force:
            return None
        state.basis = basis
        chosen = _desired(snapshot, type_url, state.wildcard, state.names)
        content = frozenset((name, r.version) for name, r in chosen.items())
        if content == state.sent and not force:
            return None
        if not content and state.sent is None and not state.wildcard and not force:
            return None
        state.sent = content
        state.version = snapshot.version(type_url)
        state.nonce = self._nonces.next()
        self._cache.record_sent(self.status, type_url, state.version, state.nonce)
        return discovery_pb2.DiscoveryResponse(
            version_info=state.version,
            type_url=type_url,
            nonce=state.nonce,
            resources=[chosen[name].body for name in sorted(chosen)],
        )


# --------------------------------------------------------------------------- #
# Delta
# --------------------------------------------------------------------------- #


@dataclass(slots=True)
class _DeltaType:
    wildcard: bool = False
    names: set[str] = field(default_factory=set)
    # name -> version the proxy has (sent to it, or declared on reconnect).
    known: dict[str, str] = field(default_factory=dict)
    nonce: str = ""
    version: str = ""
    basis: tuple[str, bool, frozenset[str]] | None = None


class DeltaStream:
    """One incremental (delta) ADS stream of one node."""

    def __init__(self, cache: SnapshotCache, status: NodeStatus) -> None:
        self._cache = cache
        self.status = status
        self._types: dict[str, _DeltaType] = {}
        self._nonces = _Nonces()

    def on_request(
        self, request: discovery_pb2.DeltaDiscoveryRequest, snapshot: Snapshot | None
    ) -> list[discovery_pb2.DeltaDiscoveryResponse]:
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

    def on_snapshot(self, snapshot: Snapshot | None) -> list[discovery_pb2.DeltaDiscoveryResponse]:
        responses = []
        for type_url in _ordered(self._types):
            response = self._respond(type_url, self._types[type_url], snapshot)
            if response is not None:
                responses.append(response)
        return responses

    @staticmethod
    def _first(request: discovery_pb2.DeltaDiscoveryRequest) -> _DeltaType:
        names = set(request.resource_names_subscribe)
        return _DeltaType(
            wildcard=not names or WILDCARD in names,
            names=names - {WILDCARD},
            known=dict(request.initial_resource_versions),
        )

    @staticmethod
    def _resubscribe(request: discovery_pb2.DeltaDiscoveryRequest, state: _DeltaType) -> None:
        subscribe = set(request.resource_names_subscribe)
        unsubscribe = set(request.resource_names_unsubscribe)
        if WILDCARD in subscribe:
            state.wildcard = True
        if WILDCARD in unsubscribe:
            state.wildcard = False
        state.names |= subscribe - {WILDCARD}
        state.names -= unsubscribe
        for name in unsubscribe:
            # The proxy drops what it unsubscribed from; resubscribing fetches it anew.
            state.known.pop(name, None)

    def _ack_or_nack(
        self, request: discovery_pb2.DeltaDiscoveryRequest, type_url: str, state: _DeltaType
    ) -> None:
        version = state.version
        _record_reply(self._cache, self.status, type_url, request, rejected=version, acked=version)

    def _respond(
        self, type_url: str, state: _DeltaType, snapshot: Snapshot | None
    ) -> discovery_pb2.DeltaDiscoveryResponse | None:
        if snapshot is None:
            return None
        basis = _basis(snapshot, type_url, state.wildcard, state.names)
        if basis == state.basis:
            return None
        state.basis = basis
        desired = _desired(snapshot, type_url, state.wildcard, state.names)
        updated = [r for name, r in sorted(desired.items()) if state.known.get(name) != r.version]
        removed = self._removed(state, desired)
        if not updated and not removed:
            return None
        for resource in updated:
            state.known[resource.name] = resource.version
        for name in removed:
            del state.known[name]
        state.version = snapshot.version(type_url)
        state.nonce = self._nonces.next()
        self._cache.record_sent(self.status, type_url, state.version, state.nonce)
        return discovery_pb2.DeltaDiscoveryResponse(
            system_version_info=state.version,
            type_url=type_url,
            nonce=state.nonce,
            resources=[
                discovery_pb2.Resource(name=r.name, version=r.version, resource=r.body) for r in updated
            ],
            removed_resources=removed,
        )

    @staticmethod
    def _removed(state: _DeltaType, desired: Mapping[str, Resource]) -> list[str]:
        """Names the proxy has that are gone (wildcard) or gone while subscribed (named)."""
        return sorted(
            name for name in state.known
            if name not in desired and (state.wildcard or name in state.names)
        )


def _ordered(types: Mapping[str, object]) -> list[str]:
    known = [t for t in RESOURCE_TYPES if t in types]
    return known + sorted(t for t in types if t not in RESOURCE_TYPES)
