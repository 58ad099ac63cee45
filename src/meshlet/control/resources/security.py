"""security.istio.io resources: PeerAuthentication, AuthorizationPolicy and
RequestAuthentication. Stored and validated; enforcement lives in the proxy.
"""

from __future__ import annotations

from typing import ClassVar, Literal

from pydantic import Field, model_validator

from meshlet.control.resources.base import Resource, Strict
from meshlet.control.resources.networking import WorkloadSelector

SECURITY = "security.istio.io"
SECURITY_VERSIONS = ("v1", "v1beta1")

MtlsMode = Literal["UNSET", "DISABLE", "PERMISSIVE", "STRICT"]


class MutualTLS(Strict):
    mode: MtlsMode = "UNSET"


class PeerAuthenticationSpec(Strict):
    selector: WorkloadSelector | None = None
    mtls: MutualTLS | None = None
    port_level_mtls: dict[int, MutualTLS] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _ports(self) -> PeerAuthenticationSpec:
        for port in self.port_level_mtls:
            if not 1 <= port <= 65535:
                raise ValueError(f"portLevelMtls: port {port} is out of range 1..65535")
        if self.port_level_mtls and self.selector is None:
            raise ValueError("portLevelMtls needs a selector (Istio ignores it on namespace-wide policies)")
        return self

    @property
    def mode(self) -> str:
        return self.mtls.mode if self.mtls is not None else "UNSET"


class PeerAuthentication(Resource):
    KIND: ClassVar[str] = "PeerAuthentication"
    GROUP: ClassVar[str] = SECURITY
    ACCEPTED_VERSIONS: ClassVar[tuple[str, ...]] = SECURITY_VERSIONS
    kind: Literal["PeerAuthentication"] = "PeerAuthentication"
    spec: PeerAuthenticationSpec


class Source(Strict):
    principals: list[str] = Field(default_factory=list)
    not_principals: list[str] = Field(default_factory=list)
    request_principals: list[str] = Field(default_factory=list)
    not_request_principals: list[str] = Field(default_factory=list)
    namespaces: list[str] = Field(default_factory=list)
    not_namespaces: list[str] = Field(default_factory=list)
    ip_blocks: list[str] = Field(default_factory=list)
    not_ip_blocks: list[str] = Field(default_factory=list)
    remote_ip_blocks: list[str] = Field(default_factory=list)
    not_remote_ip_blocks: list[str] = Field(default_factory=list)


class Operation(Strict):
    hosts: list[str] = Field(default_factory=list)
    not_hosts: list[str] = Field(default_factory=list)
    ports: list[str] = Field(default_factory=list)
    not_ports: list[str] = Field(default_factory=list)
    methods: list[str] = Field(default_factory=list)
    not_methods: list[str] = Field(default_factory=list)
    paths: list[str] = Field(default_factory=list)
    not_paths: list[str] = Field(default_factory=list)


class RuleFrom(Strict):
    source: Source


class RuleTo(Strict):
    operation: Operation


class Condition(Strict):
    key: str = Field(min_length=1)
    values: list[str] = Field(default_factory=list)
    not_values: list[str] = Field(default_factory=list)


class Rule(Strict):
    from_: list[RuleFrom] = Field(default_factory=list, alias="from")
    to: list[RuleTo] = Field(default_factory=list)
    when: list[Condition] = Field(default_factory=list)


class ExtensionProvider(Strict):
    name: str


class AuthorizationPolicySpec(Strict):
    selector: WorkloadSelector | None = None
    action: Literal["ALLOW", "DENY", "AUDIT", "CUSTOM"] = "ALLOW"
    provider: ExtensionProvider | None = None
    rules: list[Rule] = Field(default_factory=list)

    @model_validator(mode="after")
    def _provider_with_custom(self) -> AuthorizationPolicySpec:
        if (self.action == "CUSTOM") != (self.provider is not None):
            raise ValueError("a provider is set exactly when action is CUSTOM")
        return self


class AuthorizationPolicy(Resource):
    KIND: ClassVar[str] = "AuthorizationPolicy"
    GROUP: ClassVar[str] = SECURITY
    ACCEPTED_VERSIONS: ClassVar[tuple[str, ...]] = SECURITY_VERSIONS
    kind: Literal["AuthorizationPolicy"] = "AuthorizationPolicy"
    spec: AuthorizationPolicySpec


class JWTHeader(Strict):
    name: str = Field(min_length=1)
    prefix: str | None = None


class ClaimToHeader(Strict):
    header: str = Field(min_length=1)
    claim: str = Field(min_length=1)


class JWTRule(Strict):
    issuer: str = Field(min_length=1)
    audiences: list[str] = Field(default_factory=list)
    jwks_uri: str | None = None
    jwks: str | None = None
    from_headers: list[JWTHeader] = Field(default_factory=list)
    from_params: list[str] = Field(default_factory=list)
    from_cookies: list[str] = Field(default_factory=list)
    output_payload_to_header: str | None = None
    output_claim_to_headers: list[ClaimToHeader] = Field(default_factory=list)
    forward_original_token: bool | None = None

    @model_validator(mode="after")
    def _one_key_source(self) -> JWTRule:
        if self.jwks_uri is not None and self.jwks is not None:
            raise ValueError("set jwksUri or jwks, not both")
        return self


class RequestAuthenticationSpec(Strict):
    selector: WorkloadSelector | None = None
    jwt_rules: list[JWTRule] = Field(default_factory=list)


class RequestAuthentication(Resource):
    KIND: ClassVar[str] = "RequestAuthentication"
    GROUP: ClassVar[str] = SECURITY
    ACCEPTED_VERSIONS: ClassVar[tuple[str, ...]] = SECURITY_VERSIONS
    kind: Literal["RequestAuthentication"] = "RequestAuthentication"
    spec: RequestAuthenticationSpec


