"""Mesh mTLS in xDS: SDS secrets, TLS transport sockets, and PeerAuthentication modes.

Every TLS context names two SDS secrets, as Istio's do: ``default`` (the
proxy's SVID chain) and ``ROOTCA`` (the trust bundle, with a SPIFFE URI SAN
match on the mesh's trust domain so only mesh identities are accepted). The
secrets come from a ``MeshIdentity``. When the proxy's key lives in a key
provider, ``default`` carries a ``private_key_provider`` and never key bytes.

Gateway servers name their certificate with ``credentialName``; its secret is
``<credentialName>`` and, for MUTUAL, its client CA ``<credentialName>-cacert``.

PeerAuthentication: the workload-selector policy of the workload's namespace
wins over the namespace-wide one, which wins over the mesh-wide one (no
selector, in a root namespace); a port-level mode wins over the policy's own.
UNSET inherits; the default is PERMISSIVE, as in Istio.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

from envoy.config.core.v3 import base_pb2, config_source_pb2
from envoy.extensions.transport_sockets.tls.v3 import common_pb2, secret_pb2, tls_pb2
from envoy.type.matcher.v3 import string_pb2
from google.protobuf import any_pb2, struct_pb2
from xds.type.v3 import typed_struct_pb2

from meshlet.control.resources import Workload
from meshlet.control.translate.index import ROOT_NAMESPACES, ResourceSet, labels_match
from meshlet.control.translate.node import ProxyNode
from meshlet.control.translate.status import TranslationStatus

CERT_SECRET = "default"
ROOT_SECRET = "ROOTCA"
CA_CERT_SUFFIX = "-cacert"
TLS_SOCKET = "envoy.transport_sockets.tls"
STRICT = "STRICT"
PERMISSIVE = "PERMISSIVE"
DISABLE = "DISABLE"
DEFAULT_MODE = PERMISSIVE


@dataclass(frozen=True, slots=True)
class KeyProviderRef:
    """A private key held by a provider (``meshlet.keys``): its name and settings."""

    provider_name: str
    settings: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class WorkloadCertificate:
    """A certificate chain (PEM, leaf first) and where its key is: a provider, or
    (only when no provider holds it) the key itself."""

    chain_pem: bytes
    key_provider: KeyProviderRef | None = None
    private_key_pem: bytes | None = None

    def __post_init__(self) -> None:
        if (self.key_provider is None) == (self.private_key_pem is None):
            raise ValueError("a workload certificate needs exactly one of key_provider, private_key_pem")


class MeshIdentity(Protocol):
    """Certificates the control plane hands to proxies over SDS."""

    @property
    def trust_domain(self) -> str: ...

    def trust_bundle_pem(self) -> bytes:
        """The roots every proxy trusts (PEM)."""
        ...

    def certificate_for(self, node: ProxyNode) -> WorkloadCertificate | None:
        """The SVID of ``node``'s workload, or None when there is none (yet)."""
        ...

    def credential(self, name: str) -> WorkloadCertificate | None:
        """A gateway's server certificate named by ``credentialName``."""
        ...

    def credential_ca(self, name: str) -> bytes | None:
        """The client CAs (PEM) of a MUTUAL gateway server's ``credentialName``."""
        ...


@dataclass
class StaticIdentity:
    """A ``MeshIdentity`` from certificates set by whoever issues them (the CA
    mount sets each proxy's SVID as it signs it)."""

    trust_domain: str
    bundle_pem: bytes
    certificates: dict[str, WorkloadCertificate] = field(default_factory=dict)
    credentials: dict[str, WorkloadCertificate] = field(default_factory=dict)
    credential_cas: dict[str, bytes] = field(default_factory=dict)

    def trust_bundle_pem(self) -> bytes:
        return self.bundle_pem

    def certificate_for(self, node: ProxyNode) -> WorkloadCertificate | None:
        return self.certificates.get(node.id)

    def credential(self, name: str) -> WorkloadCertificate | None:
        return self.credentials.get(name)

    def credential_ca(self, name: str) -> bytes | None:
        return self.credential_cas.get(name)


# -- SDS references and transport sockets ------------------------------------- #


def ads_source() -> config_source_pb2.ConfigSource:
    source = config_source_pb2.ConfigSource(resource_api_version=config_source_pb2.V3)
    source.ads.SetInParent()
    return source


def sds(name: str) -> secret_pb2.SdsSecretConfig:
    return secret_pb2.SdsSecretConfig(name=name, sds_config=ads_source())


def _socket(context: tls_pb2.UpstreamTlsContext | tls_pb2.DownstreamTlsContext) -> base_pb2.TransportSocket:
    socket = base_pb2.TransportSocket(name=TLS_SOCKET)
    socket.typed_config.Pack(context)
    return socket


def mesh_common_context() -> tls_pb2.CommonTlsContext:
    common = tls_pb2.CommonTlsContext()
    common.tls_certificate_sds_secret_configs.append(sds(CERT_SECRET))
    common.validation_context_sds_secret_config.CopyFrom(sds(ROOT_SECRET))
    return common


def upstream_mesh_tls(sni: str) -> base_pb2.TransportSocket:
    """ISTIO_MUTUAL toward a mesh workload: present our SVID, verify the peer's."""
    return _socket(tls_pb2.UpstreamTlsContext(common_tls_context=mesh_common_context(), sni=sni))


def downstream_mesh_tls() -> base_pb2.TransportSocket:
    """Inbound mesh mTLS: present our SVID, require and verify the client's."""
    context = tls_pb2.DownstreamTlsContext(common_tls_context=mesh_common_context())
    context.require_client_certificate.value = True
    return _socket(context)


def gateway_tls(credential_name: str, mutual: bool) -> base_pb2.TransportSocket:
    """A gateway server's TLS: SIMPLE presents ``credentialName``; MUTUAL also
    requires client certificates signed by its ``-cacert``."""
    common = tls_pb2.CommonTlsContext()
    common.tls_certificate_sds_secret_configs.append(sds(credential_name))
    context = tls_pb2.DownstreamTlsContext(common_tls_context=common)
    if mutual:
        common.validation_context_sds_secret_config.CopyFrom(sds(credential_name + CA_CERT_SUFFIX))
        context.require_client_certificate.value = True
    return _socket(context)


# -- secrets ----------------------------------------------------------------------- #


def certificate_secret(name: str, certificate: WorkloadCertificate) -> secret_pb2.Secret:
    secret = secret_pb2.Secret(name=name)
    tls = secret.tls_certificate
    tls.certificate_chain.inline_bytes = certificate.chain_pem
    if certificate.key_provider is not None:
        provider = tls.private_key_provider
        provider.provider_name = certificate.key_provider.provider_name
        settings = struct_pb2.Struct()
        settings.update(dict(certificate.key_provider.settings))
        provider.typed_config.CopyFrom(_typed_struct(certificate.key_provider.provider_name, settings))
    elif certificate.private_key_pem is not None:
        tls.private_key.inline_bytes = certificate.private_key_pem
    return secret


def _typed_struct(provider_name: str, settings: struct_pb2.Struct) -> any_pb2.Any:
    wrapper = typed_struct_pb2.TypedStruct(type_url=f"type.googleapis.com/meshlet.keys.{provider_name}",
                                           value=settings)
    packed = any_pb2.Any()
    packed.Pack(wrapper)
    return packed


def root_secret(identity: MeshIdentity) -> secret_pb2.Secret:
    secret = secret_pb2.Secret(name=ROOT_SECRET)
    validation = secret.validation_context
    validation.trusted_ca.inline_bytes = identity.trust_bundle_pem()
    san = validation.match_typed_subject_alt_names.add()
    san.san_type = common_pb2.SubjectAltNameMatcher.URI
    san.matcher.CopyFrom(string_pb2.StringMatcher(prefix=f"spiffe://{identity.trust_domain}/"))
    return secret


def ca_secret(name: str, pem: bytes) -> secret_pb2.Secret:
    secret = secret_pb2.Secret(name=name)
    secret.validation_context.trusted_ca.inline_bytes = pem
    return secret


def mesh_secrets(node: ProxyNode, identity: MeshIdentity | None) -> list[secret_pb2.Secret]:
    """``default`` and ``ROOTCA`` for ``node``, or nothing when it has no SVID."""
    if identity is None:
        return []
    certificate = identity.certificate_for(node)
    if certificate is None:
        return []
    return [certificate_secret(CERT_SECRET, certificate), root_secret(identity)]


def has_mesh_certificate(node: ProxyNode, identity: MeshIdentity | None) -> bool:
    return identity is not None and identity.certificate_for(node) is not None


# -- PeerAuthentication ---------------------------------------------------------- #


def mtls_mode(rs: ResourceSet, workload: Workload | None, namespace: str, port: int | None) -> str:
    """The effective inbound mTLS mode of ``workload`` (or of ``namespace``) on ``port``."""
    mode = "UNSET"
    labels = workload.spec.labels if workload is not None else {}
    for policy in _policies_by_precedence(rs, namespace, labels):
        spec = policy.spec
        if port is not None and port in spec.port_level_mtls and mode == "UNSET":
            mode = spec.port_level_mtls[port].mode
        if mode == "UNSET":
            mode = spec.mode
        if mode != "UNSET":
            return mode
    return DEFAULT_MODE


def _policies_by_precedence(rs: ResourceSet, namespace: str, labels: Mapping[str, str]) -> list[Any]:
    policies = rs.peer_authentications
    selected = [p for p in policies if p.namespace == namespace and p.spec.selector is not None
                and p.spec.selector.match_labels and labels_match(p.spec.selector.match_labels, labels)]
    namespace_wide = [p for p in policies if p.namespace == namespace and p.spec.selector is None]
    mesh_wide = [p for p in policies if p.namespace in ROOT_NAMESPACES and p.spec.selector is None
                 and p.namespace != namespace]
    return [*selected, *namespace_wide, *mesh_wide]


def note_unenforced_policies(rs: ResourceSet, namespace: str, labels: Mapping[str, str],
                             status: TranslationStatus) -> None:
    """AuthorizationPolicy and RequestAuthentication that apply to this proxy are
    stored and validated, not enforced yet: say so rather than drop them silently."""
    for policy in [*rs.authorization_policies, *rs.request_authentications]:
        selector = policy.spec.selector.match_labels if policy.spec.selector is not None else {}
        applies = (policy.namespace == namespace and labels_match(selector, labels)) or (
            policy.namespace in ROOT_NAMESPACES and not selector)
        if applies:
            status.warning(policy.resource_id, "stored, not enforced")
