"""References to resources that xDS delivers separately: ``rds``, EDS clusters and SDS.

Only ADS config sources are implemented (``{ads: {}}``, optionally with
``resource_api_version: V3``): every resource comes over the one aggregated
stream of ``dynamic_resources.ads_config``. A reference resolves in the
``DynamicResources`` of the compilation in progress; a static bootstrap has
none and refuses such references.
"""

from __future__ import annotations

from typing import Any

from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.core.v3 import config_source_pb2
from envoy.extensions.filters.network.http_connection_manager.v3 import http_connection_manager_pb2 as hcm

from meshlet.config import context
from meshlet.config.fields import allow_fields, check_enum, check_fields, join
from meshlet.config.model import ClusterLoadAssignment, RouteConfiguration
from meshlet.errors import ConfigError, UnsupportedConfig

allow_fields(config_source_pb2.ConfigSource, "ads", "resource_api_version")
allow_fields(hcm.Rds, "config_source", "route_config_name")
allow_fields(cluster_pb2.Cluster.EdsClusterConfig, "eds_config", "service_name")


def check_ads_source(msg: Any, path: str) -> None:
    """A ConfigSource must be ``ads`` (the aggregated stream)."""
    check_fields(msg, path)
    if msg.WhichOneof("config_source_specifier") != "ads":
        raise UnsupportedConfig(path, "only ads config sources are supported (set ads: {})")
    check_enum(msg, "resource_api_version", path, ("AUTO", "V3"))


def _dynamic(path: str, what: str) -> context.DynamicResources:
    dynamic = context.current().dynamic
    if dynamic is None:
        raise ConfigError(path, f"{what} needs xDS: the bootstrap's dynamic_resources.ads_config")
    return dynamic


def rds_route_config(msg: Any, path: str) -> RouteConfiguration:
    """The RDS route configuration an HCM's ``rds`` names."""
    dynamic = _dynamic(path, "rds")
    check_fields(msg, path)
    if not msg.route_config_name:
        raise ConfigError(join(path, "route_config_name"), "is required")
    if not msg.HasField("config_source"):
        raise ConfigError(join(path, "config_source"), "is required")
    check_ads_source(msg.config_source, join(path, "config_source"))
    found = dynamic.route_configs.get(msg.route_config_name)
    if found is None:
        raise ConfigError(
            join(path, "route_config_name"), f"route configuration {msg.route_config_name!r} was not received"
        )
    return found


def eds_assignment_name(msg: Any) -> str:
    """The EDS resource name of a cluster: ``service_name`` or else the cluster's name."""
    return str(msg.eds_cluster_config.service_name or msg.name)


def eds_load_assignment(msg: Any, path: str) -> ClusterLoadAssignment:
    """The EDS assignment of cluster ``msg`` (type EDS)."""
    eds_path = join(path, "eds_cluster_config")
    dynamic = _dynamic(join(path, "type"), "an EDS cluster")
    if not msg.HasField("eds_cluster_config"):
        raise ConfigError(eds_path, "is required for an EDS cluster")
    check_fields(msg.eds_cluster_config, eds_path)
    if not msg.eds_cluster_config.HasField("eds_config"):
        raise ConfigError(join(eds_path, "eds_config"), "is required")
    check_ads_source(msg.eds_cluster_config.eds_config, join(eds_path, "eds_config"))
    if msg.HasField("load_assignment"):
        raise ConfigError(join(path, "load_assignment"), "an EDS cluster takes its endpoints from EDS")
    name = eds_assignment_name(msg)
    found = dynamic.load_assignments.get(name)
    if found is None:
        raise ConfigError(eds_path, f"cluster load assignment {name!r} was not received")
    return found


def check_sds_source(msg: Any, path: str) -> None:
    """An SdsSecretConfig's ``sds_config`` (secrets then come in ``CompileContext.secrets``)."""
    _dynamic(path, "sds_config")
    check_ads_source(msg, path)
