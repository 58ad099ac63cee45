"""The envelope every control-plane resource shares, and the field checks.

A resource is ``apiVersion`` + ``kind`` + ``metadata`` + ``spec`` as
``kubectl`` writes it. Models are strict (unknown fields are refused) and use
Istio's camelCase names on the wire; Python code reads snake_case attributes.
Validation errors become ``ResourceInvalid`` whose lines name the resource and
the field path: ``VirtualService default/reviews: spec.http[0].route[1].weight: ...``.
"""

from __future__ import annotations

import ipaddress
import re
from datetime import datetime
from typing import Annotated, Any, ClassVar, Self

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, field_validator
from pydantic.alias_generators import to_camel

from meshlet.errors import ConfigError

DEFAULT_NAMESPACE = "default"

_DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
_DNS_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
# Hosts as Istio takes them: a DNS name, optionally with a leading "*." or
# a bare "*"; short names ("reviews") are resolved against the namespace.
_HOST_LABEL = r"[A-Za-z0-9]([-A-Za-z0-9_]*[A-Za-z0-9])?"
_HOST = re.compile(rf"^(\*|(\*\.)?{_HOST_LABEL}(\.{_HOST_LABEL})*)$")
_LABEL_NAME = re.compile(r"^([a-z0-9.-]{1,253}/)?[A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?$")
_LABEL_VALUE = re.compile(r"^([A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?)?$")
_DURATION = re.compile(r"^(?P<value>\d+(\.\d+)?)(?P<unit>h|m|s|ms|us|µs|ns)$")
_DURATION_UNITS = {"h": 3600.0, "m": 60.0, "s": 1.0, "ms": 1e-3, "us": 1e-6, "µs": 1e-6, "ns": 1e-9}


class ResourceInvalid(ConfigError):
    """A resource failed validation. ``problems`` holds every (path, message);
    ``lines`` the full messages, each naming the resource and the field path."""

    def __init__(self, resource_id: str, problems: list[tuple[str, str]]) -> None:
        self.resource_id = resource_id
        self.problems = problems
        self.lines = [_problem_line(resource_id, p, m) for p, m in problems]
        path, message = problems[0] if problems else ("", "invalid")
        super().__init__(path, message)

    @classmethod
    def combine(cls, errors: list[ResourceInvalid]) -> ResourceInvalid:
        """One error carrying the problems of several documents."""
        combined = cls(errors[0].resource_id, errors[0].problems)
        combined.lines = [line for error in errors for line in error.lines]
        return combined

    def __str__(self) -> str:
        return "\n".join(self.lines)


def _problem_line(resource_id: str, path: str, message: str) -> str:
    where = f"{resource_id}: " if resource_id else ""
    return f"{where}{path}: {message}" if path else f"{where}{message}"


# -- field checks (used as Annotated validators) ----------------------------- #


def check_dns_label(value: str) -> str:
    if len(value) > 63 or not _DNS_LABEL.match(value):
        raise ValueError(f"{value!r} is not a DNS label (lowercase letters, digits and '-', at most 63)")
    return value


def check_name(value: str) -> str:
    if len(value) > 253 or not _DNS_SUBDOMAIN.match(value):
        raise ValueError(f"{value!r} is not a valid name (lowercase DNS subdomain, at most 253 characters)")
    return value


def check_host(value: str) -> str:
    if len(value) > 253 or not _HOST.match(value):
        raise ValueError(f"{value!r} is not a valid host name (DNS name, optionally '*.' prefixed, or '*')")
    return value


def check_address(value: str) -> str:
    """An IP address or a DNS name (where a workload or endpoint is reached)."""
    try:
        ipaddress.ip_address(value)
    except ValueError:
        if "*" in value or len(value) > 253 or not _HOST.match(value):
            raise ValueError(f"{value!r} is not an IP address or a DNS name") from None
    return value


def check_port(value: int) -> int:
    if not 1 <= value <= 65535:
        raise ValueError(f"port {value} is out of range 1..65535")
    return value


def check_weight(value: int) -> int:
    if not 0 <= value <= 100:
        raise ValueError(f"weight {value} is out of range 0..100")
    return value


def check_percent(value: float) -> float:
    if not 0.0 <= value <= 100.0:
        raise ValueError(f"percentage {value} is out of range 0..100")
    return value


def parse_duration(value: str) -> float:
    """Seconds in an Istio/protobuf duration string: ``"5s"``, ``"250ms"``, ``"1.5s"``, ``"1h"``."""
    match = _DURATION.match(value.strip())
    if match is None:
        raise ValueError(f"{value!r} is not a duration (like '5s', '250ms', '1m')")
    return float(match["value"]) * _DURATION_UNITS[match["unit"]]


def check_duration(value: str) -> str:
    parse_duration(value)
    return value


def check_regex(value: str) -> str:
    try:
        re.compile(value)
    except re.error as exc:
        raise ValueError(f"regex {value!r} does not compile: {exc}") from None
    return value


def check_labels(value: dict[str, str]) -> dict[str, str]:
    for key, label in value.items():
        if len(key) > 317 or not _LABEL_NAME.match(key):
            raise ValueError(f"label key {key!r} is not a valid label name")
        if len(label) > 63 or not _LABEL_VALUE.match(label):
            raise ValueError(f"label value {label!r} (key {key!r}) is not a valid label value")
    return value


DnsLabel = Annotated[str, AfterValidator(check_dns_label)]
Name = Annotated[str, AfterValidator(check_name)]
Host = Annotated[str, AfterValidator(check_host)]
Port = Annotated[int, AfterValidator(check_port)]
Address = Annotated[str, AfterValidator(check_address)]
Weight = Annotated[int, AfterValidator(check_weight)]
Percent = Annotated[float, AfterValidator(check_percent)]
Duration = Annotated[str, AfterValidator(check_duration)]
Regex = Annotated[str, AfterValidator(check_regex)]
Labels = Annotated[dict[str, str], AfterValidator(check_labels)]


class Strict(BaseModel):
    """Base of every spec model: unknown fields refused, camelCase on the wire."""

    model_config = ConfigDict(
        extra="forbid",
        alias_generator=to_camel,
        populate_by_name=True,
        frozen=True,
        validate_default=False,
    )


class Metadata(Strict):
    name: Name
    namespace: DnsLabel = DEFAULT_NAMESPACE
    labels: Labels = Field(default_factory=dict)
    annotations: dict[str, str] = Field(default_factory=dict)
    # Set by the store: an opaque version for optimistic concurrency, a
    # counter of spec changes, and when the resource was first stored.
    resource_version: str | None = None
    generation: int | None = None
    creation_timestamp: datetime | None = None
    uid: str | None = None


class Resource(Strict):
    """The common envelope. Subclasses fix ``KIND``, ``GROUP`` and the spec type."""

    KIND: ClassVar[str] = ""
    GROUP: ClassVar[str] = ""
    VERSION: ClassVar[str] = "v1"
    # apiVersions accepted on input besides GROUP/VERSION (stored as VERSION).
    ACCEPTED_VERSIONS: ClassVar[tuple[str, ...]] = ("v1",)

    api_version: str
    kind: str
    metadata: Metadata
    spec: Any

    @field_validator("api_version")
    @classmethod
    def _known_api_version(cls, value: str) -> str:
        group, _, version = value.rpartition("/")
        if group != cls.GROUP or version not in cls.ACCEPTED_VERSIONS:
            accepted = ", ".join(f"{cls.GROUP}/{v}" for v in cls.ACCEPTED_VERSIONS)
            raise ValueError(f"apiVersion {value!r} is not one of {cls.KIND}'s ({accepted})")
        # Older Istio versions are the same schema: stored as the current one.
        return cls.api_version_string()

    @property
    def name(self) -> str:
        return self.metadata.name

    @property
    def namespace(self) -> str:
        return self.metadata.namespace

    @property
    def key(self) -> tuple[str, str, str]:
        """(kind, namespace, name): what identifies a resource in a store."""
        return (self.kind, self.metadata.namespace, self.metadata.name)

    @property
    def resource_id(self) -> str:
        return f"{self.kind} {self.metadata.namespace}/{self.metadata.name}"

    @classmethod
    def api_version_string(cls) -> str:
        return f"{cls.GROUP}/{cls.VERSION}"

    def to_dict(self) -> dict[str, Any]:
        """The wire form (camelCase, unset fields left out), as ``kubectl get -o yaml`` shows it."""
        body = self.model_dump(mode="json", by_alias=True, exclude_none=True, exclude_defaults=True)
        data: dict[str, Any] = {"apiVersion": self.api_version, "kind": self.kind}
        data.update(body)
        data["metadata"] = {"name": self.metadata.name, "namespace": self.metadata.namespace,
                            **body.get("metadata", {})}
        return data

    def with_metadata(self, **changes: Any) -> Self:
        """A copy with metadata fields replaced (used by stores to stamp versions)."""
        return self.model_copy(update={"metadata": self.metadata.model_copy(update=changes)})

    def same_spec(self, other: Resource) -> bool:
        return bool(self.spec == other.spec)
