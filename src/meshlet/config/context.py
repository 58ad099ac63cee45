"""What compiling one resource may need from the rest of the config.

Registered extension factories take only ``(message, path)``; the few that need
more (the regex engine for ``safe_regex``, static secrets for SDS references,
the known cluster names) read it from the context of the compilation in
progress.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field

from meshlet.config.model import ClusterLoadAssignment, RouteConfiguration, Secret
from meshlet.proxy.routing.regex import RegexEngine, regex_engine


@dataclass(frozen=True)
class DynamicResources:
    """Resources delivered over xDS that others refer to by name: RDS route
    configurations for ``rds`` and EDS assignments for EDS clusters (SDS secrets
    go into ``CompileContext.secrets``)."""

    route_configs: Mapping[str, RouteConfiguration] = field(default_factory=dict)
    load_assignments: Mapping[str, ClusterLoadAssignment] = field(default_factory=dict)


@dataclass(frozen=True)
class CompileContext:
    regex: RegexEngine
    # Secrets that SDS references by name may resolve to (static_resources.secrets).
    secrets: Mapping[str, Secret] = field(default_factory=dict)
    # Cluster names routes and tcp_proxy may refer to; None: not checked here
    # (xDS delivers clusters separately from listeners and routes).
    clusters: frozenset[str] | None = None
    # Set when compiling resources from xDS: references through an ADS config
    # source (rds, eds_cluster_config, sds_config) resolve here. None for a
    # static bootstrap, which refuses them.
    dynamic: DynamicResources | None = None


_current: ContextVar[CompileContext | None] = ContextVar("meshlet_compile_context", default=None)


def current() -> CompileContext:
    ctx = _current.get()
    if ctx is None:
        return CompileContext(regex=regex_engine())
    return ctx


@contextmanager
def compiling(ctx: CompileContext) -> Iterator[CompileContext]:
    token = _current.set(ctx)
    try:
        yield ctx
    finally:
        _current.reset(token)
