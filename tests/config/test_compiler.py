"""Compiling static bootstraps: every supported field, and refusals naming the path."""

from __future__ import annotations

import copy
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from meshlet.config.compiler import compile_bootstrap, load_proxy_config
from meshlet.config.loader import parse_bootstrap_text
from meshlet.config.model import (
    AccessLogConfig,
    ClusterAction,
    CodecType,
    DirectResponseAction,
    DiscoveryType,
    HealthStatus,
    HttpConnectionManagerConfig,
    ProxyConfig,
    RedirectAction,
    RouterFilterConfig,
    TcpProxyConfig,
    UpstreamProtocol,
)
from meshlet.errors import ConfigError, UnsupportedConfig
from meshlet.proxy.http.stream import RequestHead
from meshlet.proxy.routing import RouteTable

REPO = Path(__file__).resolve().parents[2]
HCM_TYPE = (
    "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager"
)
ROUTER = {
    "name": "envoy.filters.http.router",
    "typed_config": {"@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"},
}
HCM_PATH = "static_resources.listeners[0].filter_chains[0].filters[0].typed_config"
ROUTE_PATH = f"{HCM_PATH}.route_config.virtual_hosts[0].routes[0]"
CLUSTER_PATH = "static_resources.clusters[0]"


def base() -> dict[str, Any]:
    """A minimal valid bootstrap: one HTTP listener, one STATIC cluster."""
    return {
        "static_resources": {
            "listeners": [
                {
                    "name": "http",
                    "address": {"socket_address": {"address": "127.0.0.1", "port_value": 10000}},
                    "filter_chains": [
                        {
                            "filters": [
                                {
                                    "name": "envoy.filters.network.http_connection_manager",
                                    "typed_config": {
                                        "@type": HCM_TYPE,
                                        "stat_prefix": "http",
                                        "route_config": {
                                            "name": "rc",
                                            "virtual_hosts": [
                                                {
                                                    "name": "vh",
                                                    "domains": ["*"],
                                                    "routes": [
                                                        {
                                                            "match": {"prefix": "/"},
                                                            "route": {"cluster": "app"},
                                                        }
                                                    ],
                                                }
                                            ],
                                        },
                                        "http_filters": [ROUTER],
                                    },
                                }
                            ]
                        }
                    ],
                }
            ],
            "clusters": [
                {
                    "name": "app",
                    "connect_timeout": "1s",
                    "load_assignment": {
                        "cluster_name": "app",
                        "endpoints": [
                            {
                                "lb_endpoints": [
                                    {
                                        "endpoint": {
                                            "address": {
                                                "socket_address": {"address": "127.0.0.1", "port_value": 8080}
                                            }
                                        }
                                    }
                                ]
                            }
                        ],
                    },
                }
            ],
        }
    }


def hcm(data: dict[str, Any]) -> dict[str, Any]:
    result: dict[str, Any] = data["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0][
        "typed_config"
    ]
    return result


def first_route(data: dict[str, Any]) -> dict[str, Any]:
    result: dict[str, Any] = hcm(data)["route_config"]["virtual_hosts"][0]["routes"][0]
    return result


def cluster(data: dict[str, Any]) -> dict[str, Any]:
    result: dict[str, Any] = data["static_resources"]["clusters"][0]
    return result


def compile_data(data: dict[str, Any], **overrides: str) -> ProxyConfig:
    return compile_bootstrap(parse_bootstrap_text(yaml.safe_dump(data)), settings_overrides=overrides or None)


def refusal(data: dict[str, Any], **overrides: str) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        compile_data(data, **overrides)
    return info.value


def the_hcm(config: ProxyConfig) -> HttpConnectionManagerConfig:
    network_filter = config.listeners["http"].filter_chains[0].filters[0]
    assert isinstance(network_filter, HttpConnectionManagerConfig)
    return network_filter


# --------------------------------------------------------------------------- #
# Whole bootstraps
# --------------------------------------------------------------------------- #


def test_front_proxy_example_compiles() -> None:
    config = load_proxy_config(str(REPO / "examples/proxy/front-proxy.yaml"))
    listener = config.listeners["ingress_http"]
    assert str(listener.address) == "127.0.0.1:10000"
    assert config.admin is not None and str(config.admin.address) == "127.0.0.1:9901"
    assert config.node_id == "front-proxy"
    app = config.clusters["app"]
    assert app.discovery is DiscoveryType.STATIC
    assert app.load_assignment is not None
    assert [str(e.address) for e in app.load_assignment.all_endpoints()] == ["127.0.0.1:8080"]
    manager = listener.filter_chains[0].filters[0]
    assert isinstance(manager, HttpConnectionManagerConfig)
    assert manager.access_logs == (AccessLogConfig(path="/dev/stdout"),)
    assert manager.route_config is not None and isinstance(manager.route_config.table, RouteTable)
    found = manager.route_config.table.select(RequestHead("GET", "http", "localhost:10000", "/anything"))
    assert found is not None and isinstance(found[1].action, ClusterAction)
    assert found[1].action.cluster == "app"
    assert config.route_configs == {"local_route": manager.route_config}
    assert config.settings == {"tls_engine": "openssl", "regex_engine": "re"}


def test_minimal_bootstrap_defaults() -> None:
    config = compile_data(base())
    manager = the_hcm(config)
    assert manager.codec_type is CodecType.AUTO
    assert manager.http_filters[0].config == RouterFilterConfig()
    assert manager.request_headers_timeout == 10.0
    assert manager.stream_idle_timeout == 300.0
    assert manager.idle_timeout == 3600.0
    assert config.admin is None
    assert config.clusters["app"].protocol is UpstreamProtocol.HTTP1


def test_source_holds_json_ready_resources() -> None:
    config = compile_data(base())
    listeners = config.source["listeners"]
    assert isinstance(listeners, dict)
    assert listeners["http"]["address"]["socket_address"]["port_value"] == 10000
    clusters = config.source["clusters"]
    assert isinstance(clusters, dict) and clusters["app"]["connect_timeout"] == "1s"
    assert "static_resources" in config.source["bootstrap"]  # type: ignore[operator]


def test_a_bad_resource_rejects_the_whole_config() -> None:
    data = base()
    data["static_resources"]["clusters"].append(
        copy.deepcopy(cluster(data)) | {"name": "b", "lb_policy": "CLUSTER_PROVIDED"}
    )
    error = refusal(data)
    assert str(error) == "static_resources.clusters[1].lb_policy: CLUSTER_PROVIDED is not supported yet"


def test_unsupported_bootstrap_fields() -> None:
    data = base() | {"stats_flush_interval": "5s"}
    assert str(refusal(data)) == "stats_flush_interval: stats_flush_interval is not supported yet"
    data = base() | {"dynamic_resources": {"ads_config": {"api_type": "GRPC"}}}
    assert str(refusal(data)) == (
        "dynamic_resources.ads_config.grpc_services: exactly one gRPC service is required"
    )
    data = base() | {"node": {"id": "n", "locality": {"zone": "z"}}}
    assert str(refusal(data)) == "node.locality: locality is not supported yet"


def test_node_and_admin() -> None:
    data = base() | {
        "node": {"id": "sidecar~1", "cluster": "web"},
        "admin": {
            "address": {"socket_address": {"address": "::1", "port_value": 0}},
            "access_log_path": "/dev/null",
        },
    }
    config = compile_data(data)
    assert (config.node_id, config.node_cluster) == ("sidecar~1", "web")
    assert config.admin is not None and config.admin.address is not None
    assert str(config.admin.address) == "[::1]:0"
    assert config.admin.access_log_path == "/dev/null"


# --------------------------------------------------------------------------- #
# Settings
# --------------------------------------------------------------------------- #


def runtime(*layers: dict[str, Any]) -> dict[str, Any]:
    return {
        "layered_runtime": {"layers": [{"name": f"l{i}", "static_layer": s} for i, s in enumerate(layers)]}
    }


def test_settings_from_runtime_layers_flat_and_nested() -> None:
    data = base() | runtime({"meshlet.tls_engine": "meshlet"}, {"meshlet": {"regex_engine": "re"}})
    assert compile_data(data).settings == {"tls_engine": "meshlet", "regex_engine": "re"}


def test_later_layers_and_overrides_win() -> None:
    data = base() | runtime({"meshlet.tls_engine": "meshlet"}, {"meshlet.tls_engine": "openssl"})
    assert compile_data(data).settings["tls_engine"] == "openssl"
    assert compile_data(data, tls_engine="meshlet").settings["tls_engine"] == "meshlet"


def test_settings_are_validated() -> None:
    error = refusal(base() | runtime({"meshlet.tls_engine": "boringssl"}))
    assert str(error) == (
        'layered_runtime.layers[0].static_layer["meshlet.tls_engine"]: '
        "'boringssl' is not one of openssl, meshlet"
    )
    error = refusal(base() | runtime({"meshlet.colour": "blue"}))
    assert isinstance(error, UnsupportedConfig) and "setting meshlet.colour is not supported" in str(error)
    error = refusal(base() | runtime({"envoy.reloadable_features.x": True}))
    assert "runtime key 'envoy.reloadable_features.x' is not supported yet" in str(error)
    error = refusal(base(), tls_engine="gnutls")
    assert str(error) == "settings.tls_engine: 'gnutls' is not one of openssl, meshlet"


@pytest.mark.parametrize(("engine", "package"), [("hyperscan", "hyperscan"), ("re2", "re2")])
def test_regex_engine_that_is_not_installed_is_refused(engine: str, package: str) -> None:
    # The optional packages are installed here, so their absence is simulated
    # in a fresh interpreter: a None entry in sys.modules makes the import fail.
    script = (
        "import sys\n"
        f"sys.modules[{package!r}] = None\n"
        "from meshlet.config.compiler import compile_bootstrap\n"
        "from meshlet.config.loader import parse_resource\n"
        "from meshlet.errors import ConfigError\n"
        "import json\n"
        "data = json.loads(sys.stdin.read())\n"
        "msg = parse_resource('type.googleapis.com/envoy.config.bootstrap.v3.Bootstrap', data)\n"
        "try:\n"
        "    compile_bootstrap(msg)\n"
        "except ConfigError as exc:\n"
        "    print(exc)\n"
    )
    data = base() | runtime({"meshlet.regex_engine": engine})
    out = subprocess.run(
        [sys.executable, "-c", script], input=json.dumps(data), capture_output=True, text=True, timeout=60
    )
    assert out.stdout.startswith(f"settings.regex_engine: regex engine {engine!r} is not installed"), (
        out.stdout + out.stderr
    )
    assert "meshlet[accel]" in out.stdout


def test_regex_engine_that_does_not_exist_is_refused() -> None:
    error = refusal(base() | runtime({"meshlet.regex_engine": "pcre"}))
    assert str(error) == (
        'layered_runtime.layers[0].static_layer["meshlet.regex_engine"]: '
        "'pcre' is not one of re, re2, hyperscan"
    )


# --------------------------------------------------------------------------- #
# http_connection_manager
# --------------------------------------------------------------------------- #


def test_every_supported_hcm_field() -> None:
    data = base()
    hcm(data).update(
        {
            "codec_type": "HTTP2",
            "max_request_headers_kb": 96,
            "request_headers_timeout": "2s",
            "stream_idle_timeout": "0s",
            "request_timeout": "30s",
            "common_http_protocol_options": {"idle_timeout": "60s", "max_connection_duration": "600s"},
            "drain_timeout": "1.5s",
            "use_remote_address": True,
            "xff_num_trusted_hops": 2,
            "skip_xff_append": True,
            "generate_request_id": False,
            "preserve_external_request_id": True,
            "server_name": "edge",
            "http2_protocol_options": {
                "max_concurrent_streams": 50,
                "initial_stream_window_size": 65536,
                "initial_connection_window_size": 1048576,
                "allow_connect": True,
            },
            "upgrade_configs": [{"upgrade_type": "WebSocket"}, {"upgrade_type": "CONNECT", "enabled": False}],
            "access_log": [
                {
                    "name": "envoy.access_loggers.file",
                    "typed_config": {
                        "@type": "type.googleapis.com/envoy.extensions.access_loggers.file.v3.FileAccessLog",
                        "path": "/tmp/access.log",
                        "log_format": {"text_format": "%START_TIME% %RESPONSE_CODE%\n"},
                    },
                }
            ],
        }
    )
    manager = the_hcm(compile_data(data))
    assert manager.codec_type is CodecType.HTTP2
    assert manager.max_request_headers_kb == 96
    assert manager.request_headers_timeout == 2.0
    assert manager.stream_idle_timeout is None
    assert manager.request_timeout == 30.0
    assert manager.idle_timeout == 60.0
    assert manager.max_connection_duration == 600.0
    assert manager.drain_timeout == 1.5
    assert manager.use_remote_address is True
    assert manager.xff_num_trusted_hops == 2
    assert manager.skip_xff_append is True
    assert manager.generate_request_id is False
    assert manager.preserve_external_request_id is True
    assert manager.server_name == "edge"
    assert manager.http2.max_concurrent_streams == 50
    assert manager.http2.initial_stream_window_size == 65536
    assert manager.http2.initial_connection_window_size == 1048576
    assert manager.http2.allow_connect is True
    assert manager.upgrades == frozenset({"websocket"})
    assert manager.access_logs == (
        AccessLogConfig("/tmp/access.log", text_format="%START_TIME% %RESPONSE_CODE%\n"),
    )
    assert manager.route_config_name == "rc"


@pytest.mark.parametrize(
    ("change", "path", "message"),
    [
        ({"codec_type": "HTTP3"}, f"{HCM_PATH}.codec_type", "HTTP3 is not supported yet"),
        ({"tracing": {}}, f"{HCM_PATH}.tracing", "tracing is not supported yet"),
        ({"stat_prefix": ""}, f"{HCM_PATH}.stat_prefix", "is required"),
        ({"max_request_headers_kb": 0}, f"{HCM_PATH}.max_request_headers_kb", "0 is out of range [1, 8192]"),
        (
            {"http2_protocol_options": {"initial_stream_window_size": 100}},
            f"{HCM_PATH}.http2_protocol_options.initial_stream_window_size",
            "100 is out of range",
        ),
        (
            {"http2_protocol_options": {"hpack_table_size": 100}},
            f"{HCM_PATH}.http2_protocol_options.hpack_table_size",
            "hpack_table_size is not supported yet",
        ),
        (
            {"common_http_protocol_options": {"headers_with_underscores_action": "REJECT_REQUEST"}},
            f"{HCM_PATH}.common_http_protocol_options.headers_with_underscores_action",
            "is not supported yet",
        ),
        (
            {"upgrade_configs": [{"upgrade_type": "websocket", "filters": [ROUTER]}]},
            f"{HCM_PATH}.upgrade_configs[0].filters",
            "filters is not supported yet",
        ),
    ],
)
def test_hcm_refusals(change: dict[str, Any], path: str, message: str) -> None:
    data = base()
    hcm(data).update(change)
    error = refusal(data)
    assert error.path == path
    assert message in error.message


def test_rds_is_refused() -> None:
    data = base()
    del hcm(data)["route_config"]
    hcm(data)["rds"] = {"route_config_name": "x", "config_source": {"ads": {}}}
    needs_xds = "rds needs xDS: the bootstrap's dynamic_resources.ads_config"
    assert str(refusal(data)) == f"{HCM_PATH}.rds: {needs_xds}"


def test_router_must_be_last_and_present() -> None:
    data = base()
    hcm(data)["http_filters"] = []
    assert "at least the envoy.filters.http.router filter is required" in str(refusal(data))
    data = base()
    hcm(data)["http_filters"] = [ROUTER, ROUTER]
    assert (
        str(refusal(data))
        == f"{HCM_PATH}.http_filters[0]: envoy.filters.http.router must be the last HTTP filter"
    )


def test_unknown_http_filter_is_refused_with_its_path() -> None:
    data = base()
    buffer = {
        "name": "envoy.filters.http.buffer",
        "typed_config": {"@type": "type.googleapis.com/envoy.extensions.filters.http.buffer.v3.Buffer"},
    }
    hcm(data)["http_filters"] = [buffer, ROUTER]
    error = refusal(data)
    assert isinstance(error, UnsupportedConfig)
    assert error.path == f"{HCM_PATH}.http_filters[0].typed_config"
    assert "envoy.extensions.filters.http.buffer.v3.Buffer" in error.message


def test_router_fields() -> None:
    data = base()
    hcm(data)["http_filters"] = [
        ROUTER | {"typed_config": ROUTER["typed_config"] | {"suppress_envoy_headers": True}}
    ]
    assert the_hcm(compile_data(data)).http_filters[0].config == RouterFilterConfig(
        suppress_envoy_headers=True
    )
    hcm(data)["http_filters"] = [
        ROUTER | {"typed_config": ROUTER["typed_config"] | {"start_child_span": True}}
    ]
    assert str(refusal(data)) == (
        f"{HCM_PATH}.http_filters[0].typed_config.start_child_span: start_child_span is not supported yet"
    )


def test_router_without_typed_config_is_accepted_by_name() -> None:
    data = base()
    hcm(data)["http_filters"] = [{"name": "envoy.filters.http.router"}]
    router = the_hcm(compile_data(data)).http_filters[0]
    assert isinstance(router.config, RouterFilterConfig)
    assert router.type_url == ROUTER["typed_config"]["@type"]


def test_unknown_network_filter() -> None:
    data = base()
    chain = data["static_resources"]["listeners"][0]["filter_chains"][0]
    chain["filters"] = [
        {
            "name": "envoy.filters.network.echo",
            "typed_config": {"@type": "type.googleapis.com/envoy.extensions.filters.network.echo.v3.Echo"},
        }
    ]
    error = refusal(data)
    assert error.path == "static_resources.listeners[0].filter_chains[0].filters[0].typed_config"
    assert "network filter" in error.message and "Echo" in error.message


def test_access_loggers() -> None:
    data = base()
    stream = "type.googleapis.com/envoy.extensions.access_loggers.stream.v3."
    hcm(data)["access_log"] = [
        {"name": "envoy.access_loggers.stderr", "typed_config": {"@type": stream + "StderrAccessLog"}},
        {
            "name": "envoy.access_loggers.stdout",
            "typed_config": {
                "@type": stream + "StdoutAccessLog",
                "log_format": {"json_format": {"status": "%RESPONSE_CODE%", "path": "%REQ(:PATH)%"}},
            },
        },
        {
            "name": "envoy.access_loggers.stdout",
            "typed_config": {
                "@type": stream + "StdoutAccessLog",
                "log_format": {"text_format_source": {"inline_string": "%PROTOCOL%\n"}},
            },
        },
    ]
    logs = the_hcm(compile_data(data)).access_logs
    assert logs == (
        AccessLogConfig("/dev/stderr"),
        AccessLogConfig("/dev/stdout", json_format={"status": "%RESPONSE_CODE%", "path": "%REQ(:PATH)%"}),
        AccessLogConfig("/dev/stdout", text_format="%PROTOCOL%\n"),
    )


@pytest.mark.parametrize(
    ("log_format", "field"),
    [
        ({"text_format": "%NOT_AN_OPERATOR%\n"}, "log_format.text_format"),
        ({"json_format": {"status": "%NOT_AN_OPERATOR%"}}, "log_format.json_format.status"),
        ({"text_format_source": {"inline_string": "%REQ()%"}}, "log_format.text_format_source"),
    ],
)
def test_bad_access_log_format_is_refused_at_compile_time(log_format: dict[str, Any], field: str) -> None:
    data = base()
    stream = "type.googleapis.com/envoy.extensions.access_loggers.stream.v3."
    hcm(data)["access_log"] = [
        {
            "name": "envoy.access_loggers.stdout",
            "typed_config": {"@type": stream + "StdoutAccessLog", "log_format": log_format},
        }
    ]
    error = refusal(data)
    assert error.path.endswith("access_log[0].typed_config." + field), error.path


@pytest.mark.parametrize(
    ("entry", "path", "message"),
    [
        (
            {
                "name": "envoy.access_loggers.stdout",
                "filter": {"status_code_filter": {}},
                "typed_config": {
                    "@type": "type.googleapis.com/envoy.extensions.access_loggers.stream.v3.StdoutAccessLog"
                },
            },
            "access_log[0].filter",
            "filter is not supported yet",
        ),
        (
            {
                "name": "envoy.access_loggers.file",
                "typed_config": {
                    "@type": "type.googleapis.com/envoy.extensions.access_loggers.file.v3.FileAccessLog"
                },
            },
            "access_log[0].typed_config.path",
            "is required",
        ),
        (
            {
                "name": "envoy.access_loggers.stdout",
                "typed_config": {
                    "@type": "type.googleapis.com/envoy.extensions.access_loggers.stream.v3.StdoutAccessLog",
                    "log_format": {"json_format": {"a": {"nested": "%X%"}}},
                },
            },
            "access_log[0].typed_config.log_format.json_format.a",
            "only string values are supported",
        ),
        (
            {"name": "envoy.access_loggers.open_telemetry"},
            "access_log[0]",
            "access logger 'envoy.access_loggers.open_telemetry' is not supported",
        ),
    ],
)
def test_access_log_refusals(entry: dict[str, Any], path: str, message: str) -> None:
    data = base()
    hcm(data)["access_log"] = [entry]
    error = refusal(data)
    assert error.path == f"{HCM_PATH}.{path}"
    assert message in error.message


# --------------------------------------------------------------------------- #
# Routes
# --------------------------------------------------------------------------- #


def test_route_actions_and_fields(tmp_path: Path) -> None:
    body_file = tmp_path / "body.txt"
    body_file.write_bytes(b"from a file")
    data = base()
    vhost = hcm(data)["route_config"]["virtual_hosts"][0]
    vhost["require_tls"] = "EXTERNAL_ONLY"
    vhost["routes"] = [
        {
            "name": "direct",
            "match": {"path": "/d"},
            "direct_response": {"status": 503, "body": {"inline_string": "x"}},
        },
        {
            "name": "bytes",
            "match": {"path": "/b"},
            "direct_response": {"status": 200, "body": {"inline_bytes": "AAE="}},
        },
        {
            "name": "file",
            "match": {"path": "/f"},
            "direct_response": {"status": 200, "body": {"filename": str(body_file)}},
        },
        {
            "name": "redirect",
            "match": {"prefix": "/r"},
            "redirect": {
                "scheme_redirect": "HTTPS",
                "host_redirect": "h",
                "port_redirect": 8443,
                "response_code": "TEMPORARY_REDIRECT",
                "strip_query": True,
            },
        },
        {
            "name": "cluster",
            "match": {"safe_regex": {"regex": "/c/[0-9]+"}},
            "route": {
                "cluster": "app",
                "prefix_rewrite": "/x",
                "host_rewrite_literal": "upstream.test",
                "timeout": "0s",
                "idle_timeout": "20s",
                "upgrade_configs": [{"upgrade_type": "websocket", "enabled": True}],
            },
        },
    ]
    config = compile_data(data)
    rc = the_hcm(config).route_config
    assert rc is not None
    vh = rc.virtual_hosts[0]
    assert vh.require_tls == "EXTERNAL_ONLY"
    actions = {r.name: r.action for r in vh.routes}
    assert actions["direct"] == DirectResponseAction(503, b"x")
    assert actions["bytes"] == DirectResponseAction(200, b"\x00\x01")
    assert actions["file"] == DirectResponseAction(200, b"from a file")
    assert actions["redirect"] == RedirectAction(
        scheme="https", host="h", port=8443, response_code=307, strip_query=True
    )
    action = actions["cluster"]
    assert isinstance(action, ClusterAction)
    assert action.prefix_rewrite == "/x"
    assert action.host_rewrite_literal == "upstream.test"
    assert action.timeout is None
    assert action.idle_timeout == 20.0
    assert action.upgrades == frozenset({"websocket"})
    assert [r.index for r in vh.routes] == [0, 1, 2, 3, 4]


@pytest.mark.parametrize(
    ("route", "path", "message"),
    [
        ({"match": {"prefix": "/"}, "route": {"cluster": "nope"}}, "route.cluster", "unknown cluster 'nope'"),
        (
            {
                "match": {"prefix": "/"},
                "route": {"cluster": "app", "retry_policy": {"retry_priority": {"name": "x"}}},
            },
            "route.retry_policy.retry_priority",
            "retry_priority is not supported yet",
        ),
        (
            {
                "match": {"prefix": "/"},
                "route": {
                    "weighted_clusters": {"clusters": [{"name": "app", "weight": 1}], "header_name": "x"}
                },
            },
            "route.weighted_clusters.header_name",
            "header_name is not supported yet",
        ),
        (
            {"match": {"prefix": "/"}, "route": {"cluster": "app", "regex_rewrite": {"substitution": "/"}}},
            "route.regex_rewrite",
            "regex_rewrite is not supported yet",
        ),
        (
            {
                "match": {"prefix": "/"},
                "route": {
                    "cluster": "app",
                    "upgrade_configs": [{"upgrade_type": "websocket", "enabled": False}],
                },
            },
            "route.upgrade_configs[0].enabled",
            "disabling an upgrade per route is not supported yet",
        ),
        ({"match": {"prefix": "/"}}, "", "one of route, redirect, direct_response is required"),
        ({"match": {}, "route": {"cluster": "app"}}, "match", "one of prefix, path, safe_regex is required"),
        (
            {"match": {"path_separated_prefix": "/a"}, "route": {"cluster": "app"}},
            "match.path_separated_prefix",
            "path_separated_prefix is not supported yet",
        ),
        (
            {"match": {"safe_regex": {"regex": "(["}}, "route": {"cluster": "app"}},
            "match.safe_regex.regex",
            "invalid regex '(['",
        ),
        (
            {
                "match": {"prefix": "/", "headers": [{"name": "x", "range_match": {"start": 1, "end": 2}}]},
                "route": {"cluster": "app"},
            },
            "match.headers[0].range_match",
            "range_match is not supported yet",
        ),
        (
            {
                "match": {"prefix": "/", "headers": [{"name": ":status", "present_match": True}]},
                "route": {"cluster": "app"},
            },
            "match.headers[0].name",
            "pseudo-header ':status' cannot be matched",
        ),
        (
            {
                "match": {"prefix": "/", "query_parameters": [{"name": "q", "string_match": {}}]},
                "route": {"cluster": "app"},
            },
            "match.query_parameters[0].string_match",
            "one of exact, prefix, suffix, contains, safe_regex is required",
        ),
        (
            {"match": {"prefix": "/"}, "direct_response": {"status": 99}},
            "direct_response.status",
            "99 is not an HTTP status",
        ),
        (
            {
                "match": {"prefix": "/"},
                "direct_response": {"status": 200, "body": {"inline_string": "x" * 5000}},
            },
            "direct_response.body.inline_string",
            "is larger than 4096 bytes",
        ),
        (
            {
                "match": {"prefix": "/"},
                "direct_response": {"status": 200, "body": {"filename": "/nonexistent/b"}},
            },
            "direct_response.body.filename",
            "/nonexistent/b: no such file",
        ),
        (
            {"match": {"prefix": "/"}, "redirect": {"path_redirect": "nope"}},
            "redirect.path_redirect",
            "must start with '/'",
        ),
        (
            {
                "match": {"prefix": "/"},
                "route": {"cluster": "app"},
                "request_headers_to_add": [
                    {"header": {"key": "x-ip", "value": "%DOWNSTREAM_REMOTE_ADDRESS%"}}
                ],
            },
            "request_headers_to_add[0].header.value",
            "header value formatters",
        ),
        (
            {
                "match": {"prefix": "/"},
                "route": {"cluster": "app"},
                "request_headers_to_add": [{"header": {"key": ":path", "value": "/"}}],
            },
            "request_headers_to_add[0].header.key",
            "header ':path' cannot be added or removed",
        ),
        (
            {
                "match": {"prefix": "/"},
                "route": {"cluster": "app"},
                "request_headers_to_add": [{"header": {"key": "bad name", "value": "1"}}],
            },
            "request_headers_to_add[0].header.key",
            "invalid header name 'bad name'",
        ),
        (
            {
                "match": {"prefix": "/"},
                "route": {"cluster": "app"},
                "response_headers_to_add": [
                    {"header": {"key": "a", "value": "1"}, "append": True, "append_action": "ADD_IF_ABSENT"}
                ],
            },
            "response_headers_to_add[0].append",
            "append and append_action cannot both be set",
        ),
        (
            {"match": {"prefix": "/"}, "route": {"cluster": "app"}, "request_headers_to_remove": ["host"]},
            "request_headers_to_remove[0]",
            "header 'host' cannot be added or removed",
        ),
    ],
)
def test_route_refusals(route: dict[str, Any], path: str, message: str) -> None:
    data = base()
    hcm(data)["route_config"]["virtual_hosts"][0]["routes"] = [route]
    error = refusal(data)
    assert error.path == f"{ROUTE_PATH}.{path}".rstrip(".")
    assert message in error.message


def test_max_direct_response_body_size() -> None:
    data = base()
    hcm(data)["route_config"]["max_direct_response_body_size_bytes"] = 8192
    first_route(data).pop("route")
    first_route(data)["direct_response"] = {"status": 200, "body": {"inline_string": "x" * 5000}}
    rc = the_hcm(compile_data(data)).route_config
    assert rc is not None and rc.virtual_hosts[0].routes[0].action == DirectResponseAction(200, b"x" * 5000)


@pytest.mark.parametrize(
    ("vhosts", "path", "message"),
    [
        (
            [{"name": "a", "domains": ["*"]}, {"name": "a", "domains": ["x"]}],
            "virtual_hosts[1].name",
            "duplicate virtual host name 'a'",
        ),
        (
            [{"name": "a", "domains": ["X.test"]}, {"name": "b", "domains": ["x.test"]}],
            "virtual_hosts[1].domains[0]",
            "domain 'x.test' is already used by virtual_hosts[0]",
        ),
        (
            [{"name": "a", "domains": ["a.*.test"]}],
            "virtual_hosts[0].domains[0]",
            "invalid domain 'a.*.test'",
        ),
        ([{"name": "a", "domains": []}], "virtual_hosts[0].domains", "at least one domain is required"),
        (
            [{"name": "a", "domains": ["*"], "rate_limits": [{"actions": []}]}],
            "virtual_hosts[0].rate_limits",
            "rate_limits is not supported yet",
        ),
        (
            [{"name": "a", "domains": ["*"], "require_tls": "ALL", "cors": {}}],
            "virtual_hosts[0].cors",
            "cors is not supported yet",
        ),
    ],
)
def test_virtual_host_refusals(vhosts: list[dict[str, Any]], path: str, message: str) -> None:
    data = base()
    hcm(data)["route_config"]["virtual_hosts"] = vhosts
    error = refusal(data)
    assert error.path == f"{HCM_PATH}.route_config.{path}"
    assert message in error.message


# --------------------------------------------------------------------------- #
# tcp_proxy and listeners
# --------------------------------------------------------------------------- #

TCP_TYPE = "type.googleapis.com/envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy"


def tcp_listener(name: str, port: int, **tcp: Any) -> dict[str, Any]:
    return {
        "name": name,
        "address": {"socket_address": {"address": "127.0.0.1", "port_value": port}},
        "filter_chains": [
            {
                "filters": [
                    {"name": "envoy.filters.network.tcp_proxy", "typed_config": {"@type": TCP_TYPE, **tcp}}
                ]
            }
        ],
    }


def test_tcp_proxy() -> None:
    data = base()
    data["static_resources"]["listeners"].append(
        tcp_listener(
            "tcp",
            10001,
            stat_prefix="db",
            cluster="app",
            idle_timeout="0s",
            max_connect_attempts=3,
            access_log=[{"name": "envoy.access_loggers.stdout"}],
        )
    )
    proxy = compile_data(data).listeners["tcp"].filter_chains[0].filters[0]
    assert proxy == TcpProxyConfig(
        stat_prefix="db",
        cluster="app",
        idle_timeout=None,
        max_connect_attempts=3,
        access_logs=(AccessLogConfig("/dev/stdout"),),
    )


@pytest.mark.parametrize(
    ("tcp", "field", "message"),
    [
        ({"stat_prefix": "db", "cluster": "nope"}, "cluster", "unknown cluster 'nope'"),
        ({"stat_prefix": "db"}, "cluster", "is required"),
        ({"cluster": "app"}, "stat_prefix", "is required"),
        (
            {"stat_prefix": "db", "cluster": "app", "hash_policy": [{"source_ip": {}}]},
            "hash_policy",
            "hash_policy is not supported yet",
        ),
    ],
)
def test_tcp_proxy_refusals(tcp: dict[str, Any], field: str, message: str) -> None:
    data = base()
    data["static_resources"]["listeners"] = [tcp_listener("tcp", 10001, **tcp)]
    error = refusal(data)
    assert error.path == f"{HCM_PATH}.{field}"
    assert message in error.message


def test_filter_chain_matches_and_listener_fields() -> None:
    data = base()
    listener = data["static_resources"]["listeners"][0]
    chain = listener["filter_chains"][0]
    tls_chain = copy.deepcopy(chain) | {
        "name": "by-sni",
        "filter_chain_match": {
            "server_names": ["API.example.com", "*.example.com"],
            "application_protocols": ["h2", "http/1.1"],
            "transport_protocol": "tls",
            "destination_port": 443,
        },
    }
    listener.update(
        {
            "filter_chains": [tls_chain, chain],
            "default_filter_chain": copy.deepcopy(chain),
            "listener_filters": [
                {
                    "name": "envoy.filters.listener.tls_inspector",
                    "typed_config": {
                        "@type": "type.googleapis.com/envoy.extensions.filters.listener.tls_inspector.v3."
                        "TlsInspector"
                    },
                }
            ],
            "listener_filters_timeout": "3s",
            "per_connection_buffer_limit_bytes": 32768,
            "stat_prefix": "edge",
            "enable_reuse_port": True,
        }
    )
    compiled = compile_data(data).listeners["http"]
    match = compiled.filter_chains[0].match
    assert compiled.filter_chains[0].name == "by-sni"
    assert match.server_names == ("api.example.com", "*.example.com")
    assert match.application_protocols == ("h2", "http/1.1")
    assert match.transport_protocol == "tls"
    assert match.destination_port == 443
    assert compiled.filter_chains[1].name == "http/1"
    assert compiled.default_filter_chain is not None and compiled.default_filter_chain.name == "default"
    assert compiled.inspects_tls
    assert compiled.listener_filters_timeout == 3.0
    assert compiled.per_connection_buffer_limit_bytes == 32768
    assert compiled.stat_prefix == "edge"
    assert compiled.reuse_port is True


@pytest.mark.parametrize(
    ("change", "path", "message"),
    [
        ({"traffic_direction": "INBOUND"}, "traffic_direction", "traffic_direction is not supported yet"),
        (
            {"address": {"socket_address": {"address": "localhost", "port_value": 1}}},
            "address.socket_address.address",
            "'localhost' is not an IP address",
        ),
        (
            {"address": {"socket_address": {"address": "127.0.0.1", "port_value": 1, "protocol": "UDP"}}},
            "address.socket_address.protocol",
            "UDP is not supported yet",
        ),
        ({"address": {"pipe": {"path": "/tmp/s"}}}, "address.pipe", "pipe is not supported yet"),
        ({"filter_chains": []}, "filter_chains", "at least one filter chain is required"),
        (
            {"listener_filters": [{"name": "envoy.filters.listener.http_inspector"}]},
            "listener_filters[0]",
            "listener filter 'envoy.filters.listener.http_inspector' is not supported",
        ),
        ({"name": ""}, "name", "is required"),
    ],
)
def test_listener_refusals(change: dict[str, Any], path: str, message: str) -> None:
    data = base()
    data["static_resources"]["listeners"][0].update(change)
    error = refusal(data)
    assert error.path == f"static_resources.listeners[0].{path}"
    assert message in error.message


def test_sni_match_needs_tls_inspector() -> None:
    data = base()
    data["static_resources"]["listeners"][0]["filter_chains"][0]["filter_chain_match"] = {
        "server_names": ["a.test"]
    }
    error = refusal(data)
    assert error.path == "static_resources.listeners[0].filter_chains[0].filter_chain_match"
    assert "needs the envoy.filters.listener.tls_inspector listener filter" in error.message


def test_identical_filter_chain_matches_are_refused() -> None:
    data = base()
    chains = data["static_resources"]["listeners"][0]["filter_chains"]
    chains.append(copy.deepcopy(chains[0]))
    assert str(refusal(data)) == (
        "static_resources.listeners[0].filter_chains[1].filter_chain_match: same match as filter_chains[0]"
    )


def test_duplicate_listener_names_and_addresses() -> None:
    data = base()
    data["static_resources"]["listeners"].append(copy.deepcopy(data["static_resources"]["listeners"][0]))
    assert str(refusal(data)) == (
        "static_resources.listeners[1].name: duplicate name 'http' (also at static_resources.listeners[0])"
    )
    data["static_resources"]["listeners"][1]["name"] = "other"
    assert str(refusal(data)) == (
        "static_resources.listeners[1].address: 127.0.0.1:10000 is already used by listener 'http'"
    )


def test_unknown_cluster_in_route_names_the_path() -> None:
    data = base()
    first_route(data)["route"]["cluster"] = "missing"
    assert str(refusal(data)) == f"{ROUTE_PATH}.route.cluster: unknown cluster 'missing'"


# --------------------------------------------------------------------------- #
# Clusters
# --------------------------------------------------------------------------- #

HPO_KEY = "envoy.extensions.upstreams.http.v3.HttpProtocolOptions"
HPO_TYPE = f"type.googleapis.com/{HPO_KEY}"


def test_cluster_fields_and_endpoints() -> None:
    data = base()
    cluster(data).update(
        {
            "type": "STRICT_DNS",
            "lb_policy": "ROUND_ROBIN",
            "connect_timeout": "0.25s",
            "dns_refresh_rate": "10s",
            "dns_lookup_family": "V4_ONLY",
            "respect_dns_ttl": True,
            "per_connection_buffer_limit_bytes": 65536,
            "load_assignment": {
                "cluster_name": "app",
                "endpoints": [
                    {
                        "locality": {"region": "eu", "zone": "a"},
                        "load_balancing_weight": 3,
                        "priority": 1,
                        "lb_endpoints": [
                            {
                                "endpoint": {
                                    "address": {
                                        "socket_address": {"address": "app.internal", "port_value": 80}
                                    },
                                    "hostname": "app-1",
                                },
                                "load_balancing_weight": 5,
                                "health_status": "DRAINING",
                            }
                        ],
                    }
                ],
            },
        }
    )
    compiled = compile_data(data).clusters["app"]
    assert compiled.discovery is DiscoveryType.STRICT_DNS
    assert compiled.connect_timeout == 0.25
    assert compiled.dns_refresh_rate == 10.0
    assert compiled.dns_lookup_family == "V4_ONLY"
    assert compiled.respect_dns_ttl is True
    assert compiled.per_connection_buffer_limit_bytes == 65536
    assert compiled.load_assignment is not None
    locality = compiled.load_assignment.localities[0]
    assert (locality.locality, locality.weight, locality.priority) == ("eu/a", 3, 1)
    endpoint = locality.endpoints[0]
    assert str(endpoint.address) == "app.internal:80"
    assert (endpoint.weight, endpoint.health_status, endpoint.hostname) == (5, HealthStatus.DRAINING, "app-1")


@pytest.mark.parametrize(
    ("options", "protocol", "max_concurrent_streams"),
    [
        ({"explicit_http_config": {"http_protocol_options": {}}}, UpstreamProtocol.HTTP1, 2147483647),
        (
            {"explicit_http_config": {"http2_protocol_options": {"max_concurrent_streams": 7}}},
            UpstreamProtocol.HTTP2,
            7,
        ),
        (
            {"auto_config": {"http_protocol_options": {}, "http2_protocol_options": {}}},
            UpstreamProtocol.AUTO,
            2147483647,
        ),
        ({"use_downstream_protocol_config": {}}, UpstreamProtocol.DOWNSTREAM, 2147483647),
    ],
)
def test_upstream_http_protocol_options(
    options: dict[str, Any], protocol: UpstreamProtocol, max_concurrent_streams: int
) -> None:
    data = base()
    cluster(data)["typed_extension_protocol_options"] = {
        HPO_KEY: {
            "@type": HPO_TYPE,
            "common_http_protocol_options": {"idle_timeout": "30s", "max_requests_per_connection": 100},
            **options,
        }
    }
    compiled = compile_data(data).clusters["app"]
    assert compiled.protocol is protocol
    assert compiled.http2.max_concurrent_streams == max_concurrent_streams
    assert compiled.idle_timeout == 30.0
    assert compiled.max_requests_per_connection == 100


def test_legacy_cluster_http2_protocol_options() -> None:
    data = base()
    cluster(data)["http2_protocol_options"] = {"initial_connection_window_size": 131072}
    compiled = compile_data(data).clusters["app"]
    assert compiled.protocol is UpstreamProtocol.HTTP2
    assert compiled.http2.initial_connection_window_size == 131072


@pytest.mark.parametrize(
    ("change", "path", "message"),
    [
        ({"lb_policy": "CLUSTER_PROVIDED"}, "lb_policy", "CLUSTER_PROVIDED is not supported yet"),
        ({"type": "EDS"}, "type", "an EDS cluster needs xDS: the bootstrap's dynamic_resources.ads_config"),
        ({"health_checks": [{"timeout": "1s"}]}, "health_checks[0]", "one of http_health_check"),
        (
            {"circuit_breakers": {"per_host_thresholds": [{}]}},
            "circuit_breakers.per_host_thresholds",
            "per_host_thresholds is not supported yet",
        ),
        ({"connect_timeout": "0s"}, "connect_timeout", "must be greater than 0"),
        ({"load_assignment": None}, "load_assignment", "is required for a STATIC cluster"),
        ({"name": ""}, "name", "is required"),
        (
            {
                "typed_extension_protocol_options": {
                    "envoy.extensions.upstreams.tcp.v3.TcpProtocolOptions": {
                        "@type": "type.googleapis.com/envoy.extensions.upstreams.tcp.v3.TcpProtocolOptions"
                    }
                }
            },
            'typed_extension_protocol_options["envoy.extensions.upstreams.tcp.v3.TcpProtocolOptions"]',
            "is not supported yet",
        ),
        (
            {"typed_extension_protocol_options": {HPO_KEY: {"@type": HPO_TYPE}}},
            f'typed_extension_protocol_options["{HPO_KEY}"]',
            "one of explicit_http_config, use_downstream_protocol_config, auto_config is required",
        ),
        (
            {
                "typed_extension_protocol_options": {
                    HPO_KEY: {"@type": HPO_TYPE, "explicit_http_config": {"http3_protocol_options": {}}}
                }
            },
            f'typed_extension_protocol_options["{HPO_KEY}"].explicit_http_config.http3_protocol_options',
            "http3_protocol_options is not supported yet",
        ),
        (
            {
                "typed_extension_protocol_options": {
                    HPO_KEY: {
                        "@type": HPO_TYPE,
                        "explicit_http_config": {"http_protocol_options": {"allow_absolute_url": True}},
                    }
                }
            },
            f'typed_extension_protocol_options["{HPO_KEY}"].explicit_http_config.http_protocol_options'
            ".allow_absolute_url",
            "is not supported yet",
        ),
        (
            {
                "http2_protocol_options": {},
                "typed_extension_protocol_options": {HPO_KEY: {"@type": HPO_TYPE, "auto_config": {}}},
            },
            "http2_protocol_options",
            "cannot be combined",
        ),
    ],
)
def test_cluster_refusals(change: dict[str, Any], path: str, message: str) -> None:
    data = base()
    cluster(data).update(change)
    if change.get("load_assignment", "") is None:
        del cluster(data)["load_assignment"]
    error = refusal(data)
    assert error.path == f"{CLUSTER_PATH}.{path}"
    assert message in error.message


def test_static_endpoints_must_be_ip_addresses() -> None:
    data = base()
    lb = cluster(data)["load_assignment"]["endpoints"][0]["lb_endpoints"][0]
    lb["endpoint"]["address"]["socket_address"]["address"] = "app.internal"
    error = refusal(data)
    assert error.path == (
        f"{CLUSTER_PATH}.load_assignment.endpoints[0].lb_endpoints[0].endpoint.address.socket_address.address"
    )


def test_duplicate_cluster_names() -> None:
    data = base()
    data["static_resources"]["clusters"].append(copy.deepcopy(cluster(data)))
    assert str(refusal(data)).startswith("static_resources.clusters[1].name: duplicate name 'app'")


# --------------------------------------------------------------------------- #
# One resource at a time (as xDS delivers them)
# --------------------------------------------------------------------------- #


def test_single_resources_compile_without_a_bootstrap() -> None:
    from meshlet.config.compiler import compile_cluster_load_assignment, compile_listener
    from meshlet.config.loader import parse_resource

    data = base()
    # Clusters arrive separately over xDS, so route targets are not checked here.
    first_route(data)["route"]["cluster"] = "arrives-later"
    listener_msg = parse_resource(
        "type.googleapis.com/envoy.config.listener.v3.Listener", data["static_resources"]["listeners"][0]
    )
    listener = compile_listener(listener_msg, "listener")
    manager = listener.filter_chains[0].filters[0]
    assert isinstance(manager, HttpConnectionManagerConfig) and manager.route_config is not None
    action = manager.route_config.virtual_hosts[0].routes[0].action
    assert isinstance(action, ClusterAction) and action.cluster == "arrives-later"
    cla_msg = parse_resource(
        "type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment",
        cluster(data)["load_assignment"],
    )
    cla = compile_cluster_load_assignment(cla_msg, "cla")
    assert cla.cluster_name == "app"
    assert [str(e.address) for e in cla.all_endpoints()] == ["127.0.0.1:8080"]
    unnamed = parse_resource("type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment", {})
    with pytest.raises(ConfigError, match=r"^cla\.cluster_name: is required$"):
        compile_cluster_load_assignment(unnamed, "cla")


def test_negative_durations_are_refused() -> None:
    data = base()
    hcm(data)["request_timeout"] = "-1s"
    assert str(refusal(data)) == f"{HCM_PATH}.request_timeout: must not be negative"


def test_compile_resource_dispatches_by_type_url() -> None:
    from meshlet.config.compiler import compile_resource
    from meshlet.config.loader import parse_resource
    from meshlet.config.model import Cluster

    url = "type.googleapis.com/envoy.config.cluster.v3.Cluster"
    compiled = compile_resource(url, parse_resource(url, cluster(base())), "cds[0]")
    assert isinstance(compiled, Cluster) and compiled.name == "app"
    with pytest.raises(ConfigError, match=r"^x: resource type '.*foo\.Bar' is not supported$"):
        compile_resource("type.googleapis.com/foo.Bar", None, "x")
