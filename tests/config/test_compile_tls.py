"""TLS transport sockets, certificates, validation, SDS secrets and key providers."""

from __future__ import annotations

import base64
import copy
from pathlib import Path
from typing import Any

import pytest
import yaml

import meshlet.config.tls as tls_module
from certs import CLIENT_SPIFFE_ID, Pki, make_pki
from meshlet.config.compiler import compile_bootstrap, compile_secret
from meshlet.config.loader import parse_bootstrap_text, parse_resource
from meshlet.config.model import (
    PrivateKeyProviderConfig,
    ProxyConfig,
    SanType,
    StringMatchKind,
    TlsContext,
)
from meshlet.errors import ConfigError, UnsupportedConfig
from meshlet.registry import Registry

DOWNSTREAM = "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.DownstreamTlsContext"
UPSTREAM = "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext"
HCM = "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager"
CTX_PATH = "static_resources.listeners[0].filter_chains[0].transport_socket.typed_config"
COMMON_PATH = f"{CTX_PATH}.common_tls_context"


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


def file_cert(pki: Pki) -> dict[str, Any]:
    return {
        "certificate_chain": {"filename": str(pki.server_cert)},
        "private_key": {"filename": str(pki.server_key)},
    }


def bootstrap(
    downstream: dict[str, Any],
    *,
    secrets: list[dict[str, Any]] | None = None,
    cluster_socket: dict[str, Any] | None = None,
) -> dict[str, Any]:
    cluster: dict[str, Any] = {
        "name": "app",
        "connect_timeout": "1s",
        "load_assignment": {
            "endpoints": [
                {
                    "lb_endpoints": [
                        {
                            "endpoint": {
                                "address": {"socket_address": {"address": "127.0.0.1", "port_value": 8443}}
                            }
                        }
                    ]
                }
            ]
        },
    }
    if cluster_socket is not None:
        cluster["transport_socket"] = cluster_socket
    return {
        "static_resources": {
            "secrets": secrets or [],
            "clusters": [cluster],
            "listeners": [
                {
                    "name": "https",
                    "address": {"socket_address": {"address": "127.0.0.1", "port_value": 10443}},
                    "filter_chains": [
                        {
                            "transport_socket": {
                                "name": "envoy.transport_sockets.tls",
                                "typed_config": {"@type": DOWNSTREAM, **downstream},
                            },
                            "filters": [
                                {
                                    "name": "envoy.filters.network.http_connection_manager",
                                    "typed_config": {
                                        "@type": HCM,
                                        "stat_prefix": "https",
                                        "route_config": {
                                            "virtual_hosts": [
                                                {
                                                    "name": "v",
                                                    "domains": ["*"],
                                                    "routes": [
                                                        {
                                                            "match": {"prefix": "/"},
                                                            "route": {"cluster": "app"},
                                                        }
                                                    ],
                                                }
                                            ]
                                        },
                                        "http_filters": [{"name": "envoy.filters.http.router"}],
                                    },
                                }
                            ],
                        }
                    ],
                }
            ],
        }
    }


def compile_data(data: dict[str, Any]) -> ProxyConfig:
    return compile_bootstrap(parse_bootstrap_text(yaml.safe_dump(data)))


def refusal(data: dict[str, Any]) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        compile_data(data)
    return info.value


def server_tls(config: ProxyConfig) -> TlsContext:
    tls = config.listeners["https"].filter_chains[0].transport_socket.tls
    assert tls is not None
    return tls


def test_downstream_context_with_every_supported_field(pki: Pki) -> None:
    downstream = {
        "require_client_certificate": True,
        "common_tls_context": {
            "tls_certificates": [file_cert(pki)],
            "validation_context": {
                "trusted_ca": {"filename": str(pki.ca_cert)},
                "match_typed_subject_alt_names": [
                    {"san_type": "URI", "matcher": {"exact": CLIENT_SPIFFE_ID}},
                    {"san_type": "DNS", "matcher": {"suffix": ".mesh.local"}},
                ],
            },
            "alpn_protocols": ["h2", "http/1.1"],
            "tls_params": {
                "tls_minimum_protocol_version": "TLSv1_3",
                "tls_maximum_protocol_version": "TLSv1_3",
                "cipher_suites": ["TLS_AES_128_GCM_SHA256"],
                "ecdh_curves": ["X25519", "P-256"],
            },
        },
    }
    tls = server_tls(compile_data(bootstrap(downstream)))
    assert tls.server_side is True
    assert tls.require_client_certificate is True
    assert tls.certificates[0].cert_chain_pem == pki.server.cert_pem
    assert tls.certificates[0].private_key_pem == pki.server.key_pem
    assert tls.certificates[0].source == f"file:{pki.server_cert}"
    assert tls.validation is not None and tls.validation.trusted_ca_pem == pki.ca_pem
    uri, dns = tls.validation.san_matchers
    assert uri.san_type is SanType.URI and uri.matcher.kind is StringMatchKind.EXACT
    assert uri.matcher.match(CLIENT_SPIFFE_ID) and not uri.matcher.match(CLIENT_SPIFFE_ID + "x")
    assert dns.san_type is SanType.DNS and dns.matcher.match("client.mesh.local")
    assert tls.alpn_protocols == ("h2", "http/1.1")
    assert (tls.min_version, tls.max_version) == ("TLSv1_3", "TLSv1_3")
    assert tls.cipher_suites == ("TLS_AES_128_GCM_SHA256",)
    assert tls.ecdh_curves == ("X25519", "P-256")


def test_inline_string_and_inline_bytes(pki: Pki) -> None:
    cert = {
        "certificate_chain": {"inline_string": pki.server.cert_pem.decode()},
        "private_key": {"inline_bytes": base64.b64encode(pki.server.key_pem).decode()},
    }
    tls = server_tls(compile_data(bootstrap({"common_tls_context": {"tls_certificates": [cert]}})))
    assert tls.certificates[0].cert_chain_pem == pki.server.cert_pem
    assert tls.certificates[0].private_key_pem == pki.server.key_pem


def test_sds_references_resolve_to_static_secrets(pki: Pki) -> None:
    secrets = [
        {"name": "server-cert", "tls_certificate": file_cert(pki)},
        {"name": "mesh-ca", "validation_context": {"trusted_ca": {"filename": str(pki.ca_cert)}}},
    ]
    downstream = {
        "common_tls_context": {
            "tls_certificate_sds_secret_configs": [{"name": "server-cert"}],
            "validation_context_sds_secret_config": {"name": "mesh-ca"},
        }
    }
    config = compile_data(bootstrap(downstream, secrets=secrets))
    tls = server_tls(config)
    assert tls.certificates == (config.secrets["server-cert"].tls_certificate,)
    assert tls.validation == config.secrets["mesh-ca"].validation


def test_secrets_are_redacted_in_the_config_source(pki: Pki) -> None:
    inline = {
        "certificate_chain": {"inline_string": pki.server.cert_pem.decode()},
        "private_key": {"inline_string": pki.server.key_pem.decode()},
    }
    data = bootstrap(
        {"common_tls_context": {"tls_certificates": [inline]}},
        secrets=[{"name": "s", "tls_certificate": inline}],
    )
    config = compile_data(data)
    dumped = yaml.safe_dump(config.source)
    assert "PRIVATE KEY" not in dumped
    assert "[redacted]" in dumped
    assert "BEGIN CERTIFICATE" in dumped


@pytest.mark.parametrize(
    ("change", "path", "message"),
    [
        (
            {"tls_certificate_sds_secret_configs": [{"name": "nope"}]},
            "tls_certificate_sds_secret_configs[0].name",
            "secret 'nope' is not defined in static_resources.secrets",
        ),
        (
            {"tls_certificate_sds_secret_configs": [{"name": "s", "sds_config": {"ads": {}}}]},
            "tls_certificate_sds_secret_configs[0].sds_config",
            "sds_config needs xDS: the bootstrap's dynamic_resources.ads_config",
        ),
        (
            {"tls_params": {"tls_minimum_protocol_version": "TLSv1_0"}},
            "tls_params.tls_minimum_protocol_version",
            "TLSv1_0 is not supported yet",
        ),
        (
            {
                "tls_params": {
                    "tls_minimum_protocol_version": "TLSv1_3",
                    "tls_maximum_protocol_version": "TLSv1_2",
                }
            },
            "tls_params",
            "tls_minimum_protocol_version is above tls_maximum_protocol_version",
        ),
        (
            {"tls_certificate_provider_instance": {"instance_name": "x"}},
            "tls_certificate_provider_instance",
            "is not supported yet",
        ),
        (
            {"validation_context": {"trusted_ca": {"inline_string": "garbage"}}},
            "validation_context.trusted_ca",
            "contains no valid PEM certificate",
        ),
        (
            {"validation_context": {"match_typed_subject_alt_names": [{"matcher": {"exact": "x"}}]}},
            "validation_context.match_typed_subject_alt_names[0].san_type",
            "SAN_TYPE_UNSPECIFIED is not supported yet",
        ),
        (
            {"validation_context": {"crl": {"inline_string": "x"}}},
            "validation_context.crl",
            "is not supported yet",
        ),
    ],
)
def test_common_context_refusals(pki: Pki, change: dict[str, Any], path: str, message: str) -> None:
    data = bootstrap({"common_tls_context": {"tls_certificates": [file_cert(pki)], **change}})
    error = refusal(data)
    assert error.path == f"{COMMON_PATH}.{path}"
    assert message in error.message


def test_certificate_errors_name_the_field(pki: Pki, tmp_path: Path) -> None:
    junk = tmp_path / "junk.pem"
    junk.write_text("not a certificate")
    other = pki.issue("other", dns=["other.test"])
    cases = [
        (
            {
                "certificate_chain": {"filename": str(tmp_path / "missing.pem")},
                "private_key": {"filename": str(pki.server_key)},
            },
            "tls_certificates[0].certificate_chain.filename",
            "missing.pem: no such file",
        ),
        (
            {"certificate_chain": {"filename": str(junk)}, "private_key": {"filename": str(pki.server_key)}},
            "tls_certificates[0].certificate_chain",
            "PEM certificate",
        ),
        (
            {"certificate_chain": {"filename": str(pki.server_cert)}, "private_key": {"filename": str(junk)}},
            "tls_certificates[0].private_key",
            "not a valid PEM private key",
        ),
        (
            {
                "certificate_chain": {"filename": str(pki.server_cert)},
                "private_key": {"filename": str(other.key)},
            },
            "tls_certificates[0].private_key",
            "private key does not match the certificate_chain's leaf",
        ),
        (
            {"certificate_chain": {"filename": str(pki.server_cert)}},
            "tls_certificates[0]",
            "one of private_key, private_key_provider is required",
        ),
        (
            {"private_key": {"filename": str(pki.server_key)}},
            "tls_certificates[0].certificate_chain",
            "is required",
        ),
        (
            {
                "certificate_chain": {"environment_variable": "CERT"},
                "private_key": {"filename": str(pki.server_key)},
            },
            "tls_certificates[0].certificate_chain.environment_variable",
            "is not supported yet",
        ),
    ]
    for cert, path, message in cases:
        error = refusal(bootstrap({"common_tls_context": {"tls_certificates": [cert]}}))
        assert error.path == f"{COMMON_PATH}.{path}", cert
        assert message in error.message, cert


def test_server_needs_a_certificate_and_client_validation_needs_a_ca(pki: Pki) -> None:
    error = refusal(bootstrap({"common_tls_context": {}}))
    assert (error.path, error.message) == (COMMON_PATH, "a server certificate (tls_certificates) is required")
    error = refusal(
        bootstrap(
            {"require_client_certificate": True, "common_tls_context": {"tls_certificates": [file_cert(pki)]}}
        )
    )
    assert error.path == f"{CTX_PATH}.require_client_certificate"


def test_accept_untrusted(pki: Pki) -> None:
    ctx = {
        "tls_certificates": [file_cert(pki)],
        "validation_context": {"trust_chain_verification": "ACCEPT_UNTRUSTED"},
    }
    tls = server_tls(compile_data(bootstrap({"common_tls_context": ctx})))
    assert tls.validation is not None and tls.validation.accept_untrusted


def test_upstream_context_in_a_cluster(pki: Pki) -> None:
    upstream = {
        "name": "envoy.transport_sockets.tls",
        "typed_config": {
            "@type": UPSTREAM,
            "sni": "app.mesh.local",
            "common_tls_context": {
                "tls_certificates": [
                    {
                        "certificate_chain": {"filename": str(pki.client_cert)},
                        "private_key": {"filename": str(pki.client_key)},
                    }
                ],
                "validation_context": {"trusted_ca": {"filename": str(pki.ca_cert)}},
                "alpn_protocols": ["h2"],
            },
        },
    }
    config = compile_data(
        bootstrap({"common_tls_context": {"tls_certificates": [file_cert(pki)]}}, cluster_socket=upstream)
    )
    tls = config.clusters["app"].transport_socket.tls
    assert tls is not None
    assert (tls.server_side, tls.sni, tls.alpn_protocols) == (False, "app.mesh.local", ("h2",))
    assert tls.certificates[0].cert_chain_pem == pki.client.cert_pem


def test_wrong_context_kind_is_refused(pki: Pki) -> None:
    downstream_in_cluster = {
        "name": "envoy.transport_sockets.tls",
        "typed_config": {"@type": DOWNSTREAM, "common_tls_context": {"tls_certificates": [file_cert(pki)]}},
    }
    error = refusal(
        bootstrap(
            {"common_tls_context": {"tls_certificates": [file_cert(pki)]}},
            cluster_socket=downstream_in_cluster,
        )
    )
    assert (error.path, error.message) == (
        "static_resources.clusters[0].transport_socket.typed_config",
        "expected UpstreamTlsContext here",
    )


def test_raw_buffer_and_unknown_transport_sockets(pki: Pki) -> None:
    raw = {"name": "envoy.transport_sockets.raw_buffer"}
    config = compile_data(
        bootstrap({"common_tls_context": {"tls_certificates": [file_cert(pki)]}}, cluster_socket=raw)
    )
    assert config.clusters["app"].transport_socket.tls is None
    alts = {
        "name": "envoy.transport_sockets.alts",
        "typed_config": {"@type": "type.googleapis.com/envoy.extensions.transport_sockets.alts.v3.Alts"},
    }
    error = refusal(
        bootstrap({"common_tls_context": {"tls_certificates": [file_cert(pki)]}}, cluster_socket=alts)
    )
    assert isinstance(error, UnsupportedConfig)
    assert error.path == "static_resources.clusters[0].transport_socket.typed_config"


def provider_cert(pki: Pki, provider: dict[str, Any], **extra: Any) -> dict[str, Any]:
    return {
        "certificate_chain": {"filename": str(pki.server_cert)},
        "private_key_provider": provider,
        **extra,
    }


def test_unregistered_key_provider_is_refused(pki: Pki) -> None:
    cert = provider_cert(pki, {"provider_name": "cryptomb"})
    error = refusal(bootstrap({"common_tls_context": {"tls_certificates": [cert]}}))
    assert isinstance(error, UnsupportedConfig)
    assert error.path == f"{COMMON_PATH}.tls_certificates[0].private_key_provider.provider_name"
    assert "private key provider 'cryptomb' is not available" in error.message


def test_registered_key_provider_with_typed_struct_settings(
    pki: Pki, monkeypatch: pytest.MonkeyPatch
) -> None:
    providers = Registry()
    providers.register("key_provider", "test.keyserver", lambda msg, path: msg)
    monkeypatch.setattr(tls_module, "registry", providers)
    settings = {
        "@type": "type.googleapis.com/xds.type.v3.TypedStruct",
        "type_url": "type.googleapis.com/meshlet.keys.KeyServer",
        "value": {"socket": "/run/keys.sock", "timeout": "1s", "handles": ["a", "b"]},
    }
    cert = provider_cert(
        pki,
        {"provider_name": "test.keyserver", "typed_config": settings, "fallback": True},
        private_key={"filename": str(pki.server_key)},
    )
    tls = server_tls(compile_data(bootstrap({"common_tls_context": {"tls_certificates": [cert]}})))
    provider = tls.certificates[0].private_key_provider
    assert provider == PrivateKeyProviderConfig("test.keyserver", fallback=True)
    assert provider is not None
    assert provider.settings == {"socket": "/run/keys.sock", "timeout": "1s", "handles": ["a", "b"]}
    assert tls.certificates[0].private_key_pem == pki.server.key_pem
    no_fallback = copy.deepcopy(cert)
    no_fallback["private_key_provider"]["fallback"] = False
    error = refusal(bootstrap({"common_tls_context": {"tls_certificates": [no_fallback]}}))
    assert error.path == f"{COMMON_PATH}.tls_certificates[0].private_key"


def test_compile_secret_resource(pki: Pki) -> None:
    msg = parse_resource(
        "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.Secret",
        {"name": "ca", "validation_context": {"trusted_ca": {"filename": str(pki.ca_cert)}}},
    )
    secret = compile_secret(msg, "secret")
    assert secret.name == "ca" and secret.validation is not None
    empty = parse_resource(
        "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.Secret", {"name": "x"}
    )
    with pytest.raises(
        ConfigError, match=r"^secret: one of tls_certificate, validation_context is required$"
    ):
        compile_secret(empty, "secret")
