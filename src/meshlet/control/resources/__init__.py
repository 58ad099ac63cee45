"""The control plane's resource model: Istio's API subset and meshlet's own
Service and Workload, as strict pydantic models.

Load with ``load_documents(text, source)`` (multi-document YAML) or
``parse_resource(dict)``; every resource has ``.key`` = (kind, namespace,
name) and ``.to_dict()`` for its wire form.
"""

from meshlet.control.resources.base import (
    DEFAULT_NAMESPACE,
    Metadata,
    Resource,
    ResourceInvalid,
    parse_duration,
)
from meshlet.control.resources.loader import (
    KINDS,
    RESOURCE_TYPES,
    dump_yaml,
    load_documents,
    load_path,
    parse_resource,
    plural,
    resolve_kind,
)
from meshlet.control.resources.mesh import CLUSTER_DOMAIN, Service, Workload, WorkloadSpec, WorkloadStatus
from meshlet.control.resources.networking import (
    DestinationRule,
    Gateway,
    ServiceEntry,
    VirtualService,
    WorkloadEntry,
)
from meshlet.control.resources.security import (
    AuthorizationPolicy,
    PeerAuthentication,
    RequestAuthentication,
)

__all__ = [
    "CLUSTER_DOMAIN",
    "DEFAULT_NAMESPACE",
    "KINDS",
    "RESOURCE_TYPES",
    "AuthorizationPolicy",
    "DestinationRule",
    "Gateway",
    "Metadata",
    "PeerAuthentication",
    "RequestAuthentication",
    "Resource",
    "ResourceInvalid",
    "Service",
    "ServiceEntry",
    "VirtualService",
    "Workload",
    "WorkloadEntry",
    "WorkloadSpec",
    "WorkloadStatus",
    "dump_yaml",
    "load_documents",
    "load_path",
    "parse_duration",
    "parse_resource",
    "plural",
    "resolve_kind",
]
