"""TLS transport sockets, certificates and SDS secrets.

PEM material is parsed here, at compile time, so a bad certificate or key is a
config error naming its field rather than a handshake failure later.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.types import PrivateKeyTypes
from envoy.config.core.v3 import base_pb2
from envoy.extensions.transport_sockets.raw_buffer.v3 import raw_buffer_pb2
from envoy.extensions.transport_sockets.tls.v3 import common_pb2, secret_pb2, tls_pb2
from google.protobuf import json_format
from udpa.type.v1 import typed_struct_pb2 as udpa_typed_struct_pb2
from xds.type.v3 import typed_struct_pb2

import meshlet.keys  # noqa: F401 - registers the key providers
from meshlet.config import context
from meshlet.config.datasource import describe_data_source, read_data_source
from meshlet.config.dynamic import check_sds_source
from meshlet.config.extensions import compile_extension, type_url_of, unpack_any
from meshlet.config.fields import allow_fields, check_enum, check_fields, index, join
from meshlet.config.matchers import compile_string_matcher
from meshlet.config.model import (
    PLAINTEXT,
    CertificateValidation,
    PrivateKeyProviderConfig,
    SanMatcher,
    SanType,
    Secret,
    TlsCertificate,
    TlsContext,
    TransportSocketConfig,
)
from meshlet.errors import ConfigError, UnsupportedConfig
from meshlet.registry import registry

CATEGORY = "transport_socket"
TLS_SOCKET = "envoy.transport_sockets.tls"
RAW_BUFFER = "envoy.transport_sockets.raw_buffer"
KEY_PROVIDER_CATEGORY = "key_provider"

allow_fields(base_pb2.TransportSocket, "name", "typed_config")
allow_fields(tls_pb2.DownstreamTlsContext, "common_tls_context", "require_client_certificate")
allow_fields(tls_pb2.UpstreamTlsContext, "common_tls_context", "sni")
allow_fields(
    tls_pb2.CommonTlsContext,
    "tls_params",
    "tls_certificates",
    "tls_certificate_sds_secret_configs",
    "validation_context",
    "validation_context_sds_secret_config",
    "alpn_protocols",
)
allow_fields(
    common_pb2.TlsParameters,
    "tls_minimum_protocol_version",
    "tls_maximum_protocol_version",
    "cipher_suites",
    "ecdh_curves",
)
allow_fields(common_pb2.TlsCertificate, "certificate_chain", "private_key", "private_key_provider")
allow_fields(common_pb2.PrivateKeyProvider, "provider_name", "typed_config", "fallback")
allow_fields(
    common_pb2.CertificateValidationContext,
    "trusted_ca",
    "match_typed_subject_alt_names",
    "trust_chain_verification",
)
allow_fields(common_pb2.SubjectAltNameMatcher, "san_type", "matcher")
allow_fields(secret_pb2.SdsSecretConfig, "name", "sds_config")
allow_fields(secret_pb2.Secret, "name", "tls_certificate", "validation_context")
allow_fields(raw_buffer_pb2.RawBuffer)

_TLS_VERSIONS = ("TLS_AUTO", "TLSv1_2", "TLSv1_3")
_TYPED_STRUCTS = (typed_struct_pb2.TypedStruct, udpa_typed_struct_pb2.TypedStruct)


# --------------------------------------------------------------------------- #
# Transport sockets
# --------------------------------------------------------------------------- #


def compile_transport_socket(msg: Any, path: str, *, server_side: bool) -> TransportSocketConfig:
    """A listener's (``server_side``) or a cluster's transport_socket."""
    check_fields(msg, path)
    compiled = compile_extension(CATEGORY, msg, path)
    if not isinstance(compiled, TransportSocketConfig):
        raise ConfigError(path, f"transport socket {msg.name!r} did not compile to a transport socket")
    if compiled.tls is not None and compiled.tls.server_side != server_side:
        wanted = "DownstreamTlsContext" if server_side else "UpstreamTlsContext"
        raise ConfigError(join(path, "typed_config"), f"expected {wanted} here")
    return compiled


def _tls_socket(msg: Any, path: str) -> TransportSocketConfig:
    if isinstance(msg, tls_pb2.DownstreamTlsContext):
        return TransportSocketConfig(name=TLS_SOCKET, tls=compile_downstream_tls_context(msg, path))
    return TransportSocketConfig(name=TLS_SOCKET, tls=compile_upstream_tls_context(msg, path))


def _raw_buffer_socket(msg: Any, path: str) -> TransportSocketConfig:
    if msg is not None:
        check_fields(msg, path)
    return PLAINTEXT


def compile_downstream_tls_context(msg: Any, path: str) -> TlsContext:
    check_fields(msg, path)
    require_client = (
        bool(msg.require_client_certificate.value) if msg.HasField("require_client_certificate") else False
    )
    context_ = _common_tls_context(msg.common_tls_context, join(path, "common_tls_context"), server_side=True)
    if not context_.certificates:
        raise ConfigError(
            join(path, "common_tls_context"), "a server certificate (tls_certificates) is required"
        )
    if require_client and (context_.validation is None or context_.validation.trusted_ca_pem is None):
        raise ConfigError(
            join(path, "require_client_certificate"),
            "requires validation_context.trusted_ca to verify clients",
        )
    return replace(context_, require_client_certificate=require_client)


def compile_upstream_tls_context(msg: Any, path: str) -> TlsContext:
    check_fields(msg, path)
    context_ = _common_tls_context(
        msg.common_tls_context, join(path, "common_tls_context"), server_side=False
    )
    return replace(context_, sni=msg.sni or None)


def _common_tls_context(msg: Any, path: str, *, server_side: bool) -> TlsContext:
    check_fields(msg, path)
    certificates = [
        compile_tls_certificate(c, index(join(path, "tls_certificates"), i))
        for i, c in enumerate(msg.tls_certificates)
    ]
    for i, sds in enumerate(msg.tls_certificate_sds_secret_configs):
        secret = _sds_secret(sds, index(join(path, "tls_certificate_sds_secret_configs"), i))
        if secret.tls_certificate is None:
            raise ConfigError(
                index(join(path, "tls_certificate_sds_secret_configs"), i),
                f"secret {sds.name!r} is not a tls_certificate",
            )
        certificates.append(secret.tls_certificate)
    validation = _validation(msg, path)
    params = _tls_params(msg, path)
    return TlsContext(
        server_side=server_side,
        certificates=tuple(certificates),
        validation=validation,
        alpn_protocols=tuple(msg.alpn_protocols),
        **params,
    )


def _validation(msg: Any, path: str) -> CertificateValidation | None:
    if msg.HasField("validation_context"):
        return compile_validation_context(msg.validation_context, join(path, "validation_context"))
    if msg.HasField("validation_context_sds_secret_config"):
        sds_path = join(path, "validation_context_sds_secret_config")
        secret = _sds_secret(msg.validation_context_sds_secret_config, sds_path)
        if secret.validation is None:
            raise ConfigError(sds_path, f"secret {secret.name!r} is not a validation_context")
        return secret.validation
    return None


def _tls_params(msg: Any, path: str) -> dict[str, Any]:
    if not msg.HasField("tls_params"):
        return {}
    params_path = join(path, "tls_params")
    params = msg.tls_params
    check_fields(params, params_path)
    low = check_enum(params, "tls_minimum_protocol_version", params_path, _TLS_VERSIONS)
    high = check_enum(params, "tls_maximum_protocol_version", params_path, _TLS_VERSIONS)
    result: dict[str, Any] = {
        "cipher_suites": tuple(params.cipher_suites),
        "ecdh_curves": tuple(params.ecdh_curves),
    }
    if low != "TLS_AUTO":
        result["min_version"] = low
    if high != "TLS_AUTO":
        result["max_version"] = high
    if result.get("min_version", "TLSv1_2") > result.get("max_version", "TLSv1_3"):
        raise ConfigError(params_path, "tls_minimum_protocol_version is above tls_maximum_protocol_version")
    return result


def _sds_secret(msg: Any, path: str) -> Secret:
    check_fields(msg, path)
    if not msg.name:
        raise ConfigError(join(path, "name"), "is required")
    if msg.HasField("sds_config"):
        check_sds_source(msg.sds_config, join(path, "sds_config"))
    secret = context.current().secrets.get(msg.name)
    if secret is None:
        dynamic = msg.HasField("sds_config")
        where = "was not received over SDS" if dynamic else "is not defined in static_resources.secrets"
        raise ConfigError(join(path, "name"), f"secret {msg.name!r} {where}")
    return secret


# --------------------------------------------------------------------------- #
# Certificates and validation
# --------------------------------------------------------------------------- #


def compile_tls_certificate(msg: Any, path: str) -> TlsCertificate:
    check_fields(msg, path)
    if not msg.HasField("certificate_chain"):
        raise ConfigError(join(path, "certificate_chain"), "is required")
    chain_path = join(path, "certificate_chain")
    chain_pem = read_data_source(msg.certificate_chain, chain_path)
    chain = parse_certificates(chain_pem, chain_path)
    provider = None
    if msg.HasField("private_key_provider"):
        provider = compile_private_key_provider(msg.private_key_provider, join(path, "private_key_provider"))
    key_pem = None
    if msg.HasField("private_key"):
        if provider is not None and not provider.fallback:
            raise ConfigError(
                join(path, "private_key"),
                "private_key and private_key_provider are both set; "
                "set private_key_provider.fallback to use the key when the provider is unavailable",
            )
        key_path = join(path, "private_key")
        key_pem = read_data_source(msg.private_key, key_path)
        _check_key_matches(parse_private_key(key_pem, key_path), chain[0], key_path)
    elif provider is None:
        raise ConfigError(path, "one of private_key, private_key_provider is required")
    return TlsCertificate(
        cert_chain_pem=chain_pem,
        private_key_pem=key_pem,
        private_key_provider=provider,
        source=describe_data_source(msg.certificate_chain),
    )


def parse_certificates(pem: bytes, path: str) -> list[x509.Certificate]:
    try:
        certificates = x509.load_pem_x509_certificates(pem)
    except ValueError:
        # cryptography's message points at its FAQ; the field path is what helps here.
        raise ConfigError(path, "contains no valid PEM certificate") from None
    if not certificates:
        raise ConfigError(path, "contains no valid PEM certificate")
    return certificates


def parse_private_key(pem: bytes, path: str) -> PrivateKeyTypes:
    try:
        return serialization.load_pem_private_key(pem, password=None)
    except TypeError:
        raise ConfigError(path, "encrypted private keys are not supported yet") from None
    except ValueError:
        raise ConfigError(path, "not a valid PEM private key") from None
    except UnsupportedAlgorithm as exc:
        raise ConfigError(path, f"unsupported private key type: {exc}") from None


def _check_key_matches(key: PrivateKeyTypes, leaf: x509.Certificate, path: str) -> None:
    spki = serialization.PublicFormat.SubjectPublicKeyInfo
    der = serialization.Encoding.DER
    if key.public_key().public_bytes(der, spki) != leaf.public_key().public_bytes(der, spki):
        raise ConfigError(path, "private key does not match the certificate_chain's leaf certificate")


def compile_private_key_provider(msg: Any, path: str) -> PrivateKeyProviderConfig:
    check_fields(msg, path)
    if not msg.provider_name:
        raise ConfigError(join(path, "provider_name"), "is required")
    if msg.provider_name not in registry.names(KEY_PROVIDER_CATEGORY):
        known = ", ".join(registry.names(KEY_PROVIDER_CATEGORY)) or "none"
        raise UnsupportedConfig(
            join(path, "provider_name"),
            f"private key provider {msg.provider_name!r} is not available (available: {known})",
        )
    settings: dict[str, object] = {}
    if msg.HasField("typed_config"):
        settings = _provider_settings(msg, join(path, "typed_config"))
    return PrivateKeyProviderConfig(provider_name=msg.provider_name, settings=settings, fallback=msg.fallback)


def _provider_settings(msg: Any, path: str) -> dict[str, object]:
    config = unpack_any(msg.typed_config, path)
    if isinstance(config, _TYPED_STRUCTS):
        return dict(json_format.MessageToDict(config.value, preserving_proto_field_name=True))
    ext = registry.lookup(KEY_PROVIDER_CATEGORY, name=msg.provider_name, path=path)
    if msg.typed_config.type_url not in ext.type_urls:
        raise UnsupportedConfig(
            join(path, "@type"),
            f"private key provider {msg.provider_name!r} takes a TypedStruct, "
            f"not {msg.typed_config.type_url}",
        )
    return dict(json_format.MessageToDict(config, preserving_proto_field_name=True))


def compile_validation_context(msg: Any, path: str) -> CertificateValidation:
    check_fields(msg, path)
    trusted = None
    if msg.HasField("trusted_ca"):
        trusted = read_data_source(msg.trusted_ca, join(path, "trusted_ca"))
        parse_certificates(trusted, join(path, "trusted_ca"))
    matchers = tuple(
        _san_matcher(m, index(join(path, "match_typed_subject_alt_names"), i))
        for i, m in enumerate(msg.match_typed_subject_alt_names)
    )
    verification = check_enum(
        msg, "trust_chain_verification", path, ("VERIFY_TRUST_CHAIN", "ACCEPT_UNTRUSTED")
    )
    return CertificateValidation(
        trusted_ca_pem=trusted, san_matchers=matchers, accept_untrusted=verification == "ACCEPT_UNTRUSTED"
    )


def _san_matcher(msg: Any, path: str) -> SanMatcher:
    check_fields(msg, path)
    san_type = check_enum(msg, "san_type", path, [t.value for t in SanType])
    if not msg.HasField("matcher"):
        raise ConfigError(join(path, "matcher"), "is required")
    return SanMatcher(SanType(san_type), compile_string_matcher(msg.matcher, join(path, "matcher")))


def compile_secret(msg: Any, path: str) -> Secret:
    """tls.v3.Secret (static_resources.secrets or SDS)."""
    check_fields(msg, path)
    if not msg.name:
        raise ConfigError(join(path, "name"), "is required")
    kind = msg.WhichOneof("type")
    if kind == "tls_certificate":
        return Secret(
            msg.name, tls_certificate=compile_tls_certificate(msg.tls_certificate, join(path, kind))
        )
    if kind == "validation_context":
        return Secret(
            msg.name, validation=compile_validation_context(msg.validation_context, join(path, kind))
        )
    raise ConfigError(path, "one of tls_certificate, validation_context is required")


registry.register(
    CATEGORY,
    TLS_SOCKET,
    _tls_socket,
    [type_url_of(tls_pb2.DownstreamTlsContext), type_url_of(tls_pb2.UpstreamTlsContext)],
)
registry.register(CATEGORY, RAW_BUFFER, _raw_buffer_socket, [type_url_of(raw_buffer_pb2.RawBuffer)])
