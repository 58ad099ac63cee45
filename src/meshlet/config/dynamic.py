"""References to resources that xDS delivers separately: ``rds``, EDS clusters and SDS.

Only ADS config sources are implemented (``{ads: {}}``, optionally with
``resource_api_version: V3``): every resource comes over the one aggregated
stream of ``dynamic_resources.ads_config``. A reference resolves in the
``DynamicResources`` of the compilation in progress; a static bootstrap has
none and refuses such references.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from envoy.config.bootstrap.v3 import bootstrap_pb2
from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.core.v3 import config_source_pb2, grpc_service_pb2
from envoy.extensions.filters.network.http_connection_manager.v3 import http_connection_manager_pb2 as hcm

from meshlet.config import context
from meshlet.config.fields import allow_fields, check_enum, check_fields, join
from meshlet.config.model import AdsConfig, Cluster, ClusterLoadAssignment, RouteConfiguration
from meshlet.errors import ConfigError, UnsupportedConfig

allow_fields(config_source_pb2.ConfigSource, "ads", "resource_api_version")
allow_fields(hcm.Rds, "config_source", "route_config_name")
allow_fields(cluster_pb2.Cluster.EdsClusterConfig, "eds_config", "service_name")
allow_fields(bootstrap_pb2.Bootstrap.DynamicResources, "ads_config", "lds_config", "cds_config")
allow_fields(
    config_source_pb2.ApiConfigSource,
    "api_type",
    "transport_api_version",
    "grpc_services",
    "set_node_on_first_message_only",
)
allow_fields(grpc_service_pb2.GrpcService, "envoy_grpc")
allow_fields(grpc_service_pb2.GrpcService.EnvoyGrpc, "cluster_name")


def compile_dynamic_resources(msg: Any, path: str, clusters: Mapping[str, Cluster]) -> AdsConfig:
    """The bootstrap's ``dynamic_resources``: an ADS stream to a static cluster."""
    check_fields(msg, path)
    ads_path = join(path, "ads_config")
    if not msg.HasField("ads_config"):
        raise ConfigError(ads_path, "is required (meshlet takes dynamic resources over ADS)")
    ads = msg.ads_config
    check_fields(ads, ads_path)
    api_type = check_enum(ads, "api_type", ads_path, ("GRPC", "DELTA_GRPC"))
    check_enum(ads, "transport_api_version", ads_path, ("AUTO", "V3"))
    if len(ads.grpc_services) != 1:
        raise ConfigError(join(ads_path, "grpc_services"), "exactly one gRPC service is required")
    service_path = join(ads_path, "grpc_services[0]")
    service = ads.grpc_services[0]
    check_fields(service, service_path)
    if not service.HasField("envoy_grpc"):
        raise ConfigError(join(service_path, "envoy_grpc"), "is required")
    check_fields(service.envoy_grpc, join(service_path, "envoy_grpc"))
    cluster = service.envoy_grpc.cluster_name
    if cluster not in clusters:
        raise ConfigError(
            join(service_path, "envoy_grpc.cluster_name"), f"{cluster!r} is not a static cluster"
        )
    for name in ("lds_config", "cds_config"):
        if msg.HasField(name):
            check_ads_source(getattr(msg, name), join(path, name))
    return AdsConfig(
        cluster=cluster,
        delta=api_type == "DELTA_GRPC",
        lds=msg.HasField("lds_config"),
        cds=msg.HasField("cds_config"),
    )


def check_ads_source(msg: Any, path: str) -> None:
    """A ConfigSource must be ``ads`` (the aggregated stream)."""
    if msg.WhichOneof("config_source_specifier") != "ads":
        raise UnsupportedConfig(path, "only ads config sources are supported (set ads: {})")
    check_fields(msg, path)
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
