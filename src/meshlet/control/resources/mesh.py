"""meshlet.dev/v1 resources: ``Service`` and ``Workload``, for meshes that run
outside Kubernetes.

A ``Service`` names a host (``<name>.<namespace>.svc.cluster.local`` and the
short forms) and the workload labels that back it. A ``Workload`` is one
running instance with its address, ports and labels; the registry creates and
removes them as sidecars register, and proxies report their health into
``status``.
"""

from __future__ import annotations

from datetime import datetime
from typing import ClassVar, Literal

from pydantic import Field, model_validator

from meshlet.control.resources.base import Address, DnsLabel, Host, Labels, Port, Resource, Strict
from meshlet.control.resources.networking import Protocol

MESHLET = "meshlet.dev"
CLUSTER_DOMAIN = "svc.cluster.local"


class ServicePortSpec(Strict):
    name: DnsLabel
    number: Port
    protocol: Protocol = "HTTP"
    target_port: Port | None = None


class ServiceSpec(Strict):
    ports: list[ServicePortSpec] = Field(min_length=1)
    # Workloads whose labels include all of these back the service; empty
    # means {"app": <service name>}.
    selector: Labels = Field(default_factory=dict)
    # Extra names the service answers to besides its cluster-local host.
    hosts: list[Host] = Field(default_factory=list)

    @model_validator(mode="after")
    def _unique_ports(self) -> ServiceSpec:
        names = [p.name for p in self.ports]
        numbers = [p.number for p in self.ports]
        if len(set(names)) != len(names) or len(set(numbers)) != len(numbers):
            raise ValueError("port names and numbers must be unique")
        return self


class Service(Resource):
    KIND: ClassVar[str] = "Service"
    GROUP: ClassVar[str] = MESHLET
    kind: Literal["Service"] = "Service"
    spec: ServiceSpec

    @property
    def host(self) -> str:
        return f"{self.metadata.name}.{self.metadata.namespace}.{CLUSTER_DOMAIN}"

    def selector_labels(self) -> dict[str, str]:
        return dict(self.spec.selector) or {"app": self.metadata.name}


Health = Literal["UNKNOWN", "HEALTHY", "UNHEALTHY", "DRAINING"]


class WorkloadSpec(Strict):
    address: Address
    # Port name -> port the workload's sidecar (or the app) listens on.
    ports: dict[str, Port] = Field(default_factory=dict)
    labels: Labels = Field(default_factory=dict)
    service_account: DnsLabel = "default"
    # The xDS node id of the workload's proxy, when it has one.
    proxy_id: str | None = None
    locality: str | None = None
    weight: int | None = Field(default=None, ge=1)


class WorkloadStatus(Strict):
    health: Health = "UNKNOWN"
    reason: str | None = None
    reported_at: datetime | None = None
    registered_at: datetime | None = None


class Workload(Resource):
    KIND: ClassVar[str] = "Workload"
    GROUP: ClassVar[str] = MESHLET
    kind: Literal["Workload"] = "Workload"
    spec: WorkloadSpec
    status: WorkloadStatus = Field(default_factory=WorkloadStatus)
