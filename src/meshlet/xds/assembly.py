"""The proxy side of xDS, sans-IO: resources received -> one whole ``ProxyConfig``.

``ConfigAssembler`` holds the resources the proxy accepted, by type and name.
For each response the ADS client forms a candidate set (``with_update``),
``build``s a config from it with the same compiler as static files
(``compile_resource`` under a ``CompileContext`` that knows the RDS, EDS and
SDS resources), applies it, and ``commit``s the candidate only when both
worked: a rejected response changes nothing.

Resources that name something not received yet (a listener's RDS routes, an
EDS cluster's endpoints, SDS secrets) are warming: the previously applied
version of that resource keeps serving (or it is left out if there is none)
until what it names arrives.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any, TypeVar

from google.protobuf import json_format
from google.protobuf.message import Message

from meshlet.config.compiler import compile_resource, redact
from meshlet.config.context import CompileContext, DynamicResources, compiling, current
from meshlet.config.fields import key
from meshlet.config.model import (
    Cluster,
    ClusterLoadAssignment,
    Listener,
    ProxyConfig,
    RouteConfiguration,
    Secret,
)
from meshlet.errors import ConfigError
from meshlet.proxy.routing.regex import regex_engine
from meshlet.xds.deps import Refs, cluster_refs, listener_refs
from meshlet.xds.snapshot import CLUSTER, ENDPOINT, LISTENER, RESOURCE_TYPES, ROUTE, SECRET, SHORT_NAMES

T = TypeVar("T")

# Names used in error paths and /config_dump.
_KIND = {LISTENER: "listeners", ROUTE: "route_configs", CLUSTER: "clusters", ENDPOINT: "endpoints",
         SECRET: "secrets"}
# The types whose names come from references in listeners and clusters.
REFERENCED_TYPES = (ROUTE, ENDPOINT, SECRET)


@dataclass(frozen=True, slots=True)
class Received:
    """One accepted resource: the message, its version and when it arrived."""

    message: Message
    version: str
    at: float


ResourceSet = Mapping[str, Mapping[str, Received]]


@dataclass
class _Dumped:
    version: str
    data: dict[str, Any]


@dataclass
class ConfigAssembler:
    """Accepted xDS resources on top of a static bootstrap config."""

    static: ProxyConfig
    clock: Callable[[], float] = time.time
    accepted: dict[str, dict[str, Received]] = field(default_factory=lambda: {t: {} for t in RESOURCE_TYPES})
    _applied: ProxyConfig | None = None
    _dumps: dict[tuple[str, str], _Dumped] = field(default_factory=dict)

    # -- candidates --------------------------------------------------------- #

    def with_update(
        self,
        type_url: str,
        updated: Mapping[str, Message],
        version: Callable[[str], str],
        *,
        removed: Iterable[str] = (),
        full_state: bool = False,
    ) -> dict[str, dict[str, Received]]:
        """The accepted set with one response folded in (``full_state``: SotW LDS/CDS)."""
        now = self.clock()
        current = self.accepted.get(type_url, {})
        resources = {} if full_state else {n: r for n, r in current.items() if n not in set(removed)}
        for name, message in updated.items():
            old = current.get(name)
            if old is not None and old.message == message:
                resources[name] = Received(message, version(name), old.at)
            else:
                resources[name] = Received(message, version(name), now)
        candidate = dict(self.accepted)
        candidate[type_url] = resources
        return candidate

    def commit(self, resources: Mapping[str, dict[str, Received]], config: ProxyConfig) -> None:
        """``resources`` built ``config`` and the proxy runs it now."""
        self.accepted = dict(resources)
        self._applied = config

    def prune(self, wanted: Mapping[str, frozenset[str]]) -> None:
        """Forget referenced resources nothing refers to any more."""
        for type_url, names in wanted.items():
            kept = self.accepted.get(type_url, {})
            self.accepted[type_url] = {n: r for n, r in kept.items() if n in names}

    @staticmethod
    def wanted(resources: ResourceSet) -> dict[str, frozenset[str]]:
        """RDS, EDS and SDS names the listeners and clusters of ``resources`` refer to."""
        refs = [listener_refs(r.message) for r in resources.get(LISTENER, {}).values()]
        refs += [cluster_refs(r.message) for r in resources.get(CLUSTER, {}).values()]
        return {
            ROUTE: frozenset().union(*(r.routes for r in refs)),
            ENDPOINT: frozenset().union(*(r.endpoints for r in refs)),
            SECRET: frozenset().union(*(r.secrets for r in refs)),
        }

    # -- building ----------------------------------------------------------- #

    def build(self, resources: ResourceSet) -> ProxyConfig:
        """The whole config for ``resources``; ``ConfigError`` naming the resource if one is bad."""
        static = self.static
        regex = regex_engine(static.settings.get("regex_engine", "re"))
        with compiling(CompileContext(regex=regex)):
            sds = _compile_all(resources, SECRET, Secret)
        secrets = _merge(static.secrets, sds, "secrets")
        with compiling(CompileContext(regex=regex, secrets=secrets)):
            assignments = _compile_all(resources, ENDPOINT, ClusterLoadAssignment)
            routes = _compile_all(resources, ROUTE, RouteConfiguration)
        dynamic = DynamicResources(route_configs=routes, load_assignments=assignments)
        with compiling(CompileContext(regex=regex, secrets=secrets, dynamic=dynamic)):
            clusters = self._compile_ready(resources, CLUSTER, Cluster, cluster_refs, dynamic, sds)
            listeners = self._compile_ready(resources, LISTENER, Listener, listener_refs, dynamic, sds)
        return ProxyConfig(
            listeners=_merge(static.listeners, listeners, "listeners"),
            clusters=_merge(static.clusters, clusters, "clusters"),
            route_configs={**static.route_configs, **routes},
            secrets=secrets,
            admin=static.admin,
            node_id=static.node_id,
            node_cluster=static.node_cluster,
            settings=static.settings,
            ads=static.ads,
            source={**static.source, "dynamic": self._source(resources)},
        )

    def _compile_ready(
        self,
        resources: ResourceSet,
        type_url: str,
        kind: type[T],
        refs_of: Callable[[Any], Refs],
        dynamic: DynamicResources,
        sds: Mapping[str, Secret],
    ) -> dict[str, T]:
        """Compile the resources whose references all arrived; warming ones keep their
        applied version, if any."""
        applied: Mapping[str, Any] = {}
        if self._applied is not None:
            applied = self._applied.listeners if type_url == LISTENER else self._applied.clusters
        out: dict[str, T] = {}
        for name, received in resources.get(type_url, {}).items():
            refs = refs_of(received.message)
            ready = (
                refs.routes <= dynamic.route_configs.keys()
                and refs.endpoints <= dynamic.load_assignments.keys()
                and refs.secrets <= sds.keys()
            )
            if ready:
                out[name] = _compile(type_url, received.message, name, kind)
                continue
            if not refs.secrets - sds.keys():
                _validate_warming(type_url, received.message, name, kind, refs, dynamic)
            if name in applied:
                out[name] = applied[name]
        return out

    # -- /config_dump ------------------------------------------------------- #

    def _source(self, resources: ResourceSet) -> dict[str, object]:
        """Envoy-style dynamic entries per kind: version_info, the resource, last_updated."""
        out: dict[str, object] = {}
        for type_url, kind in _KIND.items():
            entries = {}
            for name, received in resources.get(type_url, {}).items():
                entries[name] = {
                    "version_info": received.version,
                    "resource": self._dump(type_url, name, received),
                    "last_updated": _timestamp(received.at),
                }
            out[kind] = entries
        return out

    def _dump(self, type_url: str, name: str, received: Received) -> dict[str, Any]:
        cached = self._dumps.get((type_url, name))
        if cached is None or cached.version != received.version:
            data = json_format.MessageToDict(received.message, preserving_proto_field_name=True)
            cached = self._dumps[(type_url, name)] = _Dumped(received.version, redact(data))
        return cached.data


def _compile(type_url: str, message: Message, name: str, kind: type[T]) -> T:
    compiled = compile_resource(type_url, message, key(_KIND[type_url], name))
    if not isinstance(compiled, kind):
        raise ConfigError(key(_KIND[type_url], name), f"compiled into {type(compiled).__name__}")
    return compiled


def _validate_warming(
    type_url: str, message: Message, name: str, kind: type[T], refs: Refs, dynamic: DynamicResources
) -> None:
    """Compile a warming resource against empty stand-ins for what it still waits for, so
    a mistake in it is rejected when it arrives, not later when its references do."""
    routes = {n: RouteConfiguration(name=n, virtual_hosts=()) for n in refs.routes}
    assignments = {n: ClusterLoadAssignment(cluster_name=n, localities=()) for n in refs.endpoints}
    stand_ins = DynamicResources(
        route_configs={**routes, **dynamic.route_configs},
        load_assignments={**assignments, **dynamic.load_assignments},
    )
    ctx = current()
    with compiling(replace(ctx, dynamic=stand_ins)):
        _compile(type_url, message, name, kind)


def _compile_all(resources: ResourceSet, type_url: str, kind: type[T]) -> dict[str, T]:
    of_type = resources.get(type_url, {})
    return {name: _compile(type_url, r.message, name, kind) for name, r in of_type.items()}


def _merge(static: Mapping[str, T], dynamic: Mapping[str, T], kind: str) -> dict[str, T]:
    clash = static.keys() & dynamic.keys()
    if clash:
        name = sorted(clash)[0]
        raise ConfigError(key(kind, name), f"{name!r} is already a static resource of the bootstrap")
    return {**static, **dynamic}


def _timestamp(at: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(at)) + f".{int(at * 1000) % 1000:03d}Z"


def short(type_url: str) -> str:
    return SHORT_NAMES.get(type_url, type_url)
