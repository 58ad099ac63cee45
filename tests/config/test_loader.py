"""Loading Envoy v3 bootstrap files: every error names the file or the field."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from envoy.config.cluster.v3 import cluster_pb2

from meshlet.config.loader import load_bootstrap, parse_bootstrap_text, parse_resource
from meshlet.errors import ConfigError

HCM_URL = (
    "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager"
)
CLUSTER_URL = "type.googleapis.com/envoy.config.cluster.v3.Cluster"

LISTENER_YAML = f"""
static_resources:
  listeners:
  - name: l
    address: {{socket_address: {{address: 127.0.0.1, port_value: 10000}}}}
    filter_chains:
    - filters:
      - name: envoy.filters.network.http_connection_manager
        typed_config:
          "@type": {HCM_URL}
          stat_prefix: x
"""


def error_of(text: str) -> str:
    with pytest.raises(ConfigError) as info:
        parse_bootstrap_text(text)
    return str(info.value)


def test_yaml_file_loads_with_typed_config(tmp_path: Path) -> None:
    path = tmp_path / "b.yaml"
    path.write_text(LISTENER_YAML)
    bootstrap = load_bootstrap(path)
    listener = bootstrap.static_resources.listeners[0]
    assert listener.name == "l"
    assert listener.address.socket_address.port_value == 10000
    assert listener.filter_chains[0].filters[0].typed_config.type_url == HCM_URL


def test_json_file_loads_and_accepts_camel_case(tmp_path: Path) -> None:
    path = tmp_path / "b.json"
    path.write_text(json.dumps({"staticResources": {"clusters": [{"name": "c", "connectTimeout": "0.5s"}]}}))
    cluster = load_bootstrap(path).static_resources.clusters[0]
    assert cluster.name == "c"
    assert cluster.connect_timeout.nanos == 500_000_000


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"nope\.yaml: no such file"):
        load_bootstrap(tmp_path / "nope.yaml")


def test_bad_yaml_reports_line_and_column() -> None:
    message = error_of("static_resources:\n  listeners: [\n    {name: a\n")
    assert "invalid YAML at line" in message
    assert "column" in message


def test_duplicate_yaml_key_is_refused() -> None:
    assert "duplicate key 'node'" in error_of("node: {id: a}\nnode: {id: b}\n")
    assert "line 2, column 1" in error_of("node: {id: a}\nnode: {id: b}\n")


def test_document_must_be_a_mapping() -> None:
    assert "must be a mapping" in error_of("- a\n- b\n")


def test_unknown_field_names_its_path() -> None:
    text = "static_resources:\n  listeners:\n  - filter_chains:\n    - filterz: []\n"
    assert error_of(text) == "static_resources.listeners[0].filter_chains[0].filterz: unknown field"


def test_unknown_field_inside_typed_config() -> None:
    message = error_of(LISTENER_YAML + "          stat_prefixx: y\n")
    expected = "static_resources.listeners[0].filter_chains[0].filters[0].typed_config.stat_prefixx"
    assert message == f"{expected}: unknown field"


def test_unknown_type_url() -> None:
    text = LISTENER_YAML.replace(HCM_URL, "type.googleapis.com/envoy.nothing.v3.Nope")
    message = error_of(text)
    assert message.startswith("static_resources.listeners[0].filter_chains[0].filters[0].typed_config.@type:")
    assert "unknown type 'type.googleapis.com/envoy.nothing.v3.Nope'" in message


def test_missing_type_in_any() -> None:
    text = LISTENER_YAML.replace(f'"@type": {HCM_URL}', "foo: 1")
    assert error_of(text).endswith("typed_config.@type: is required")


def test_extension_types_resolve_on_demand() -> None:
    # A type meshlet does not compile still parses; the compiler refuses it later.
    text = LISTENER_YAML.replace(HCM_URL, "type.googleapis.com/envoy.extensions.filters.network.echo.v3.Echo")
    text = text.replace("          stat_prefix: x\n", "")
    bootstrap = parse_bootstrap_text(text)
    assert (
        bootstrap.static_resources.listeners[0]
        .filter_chains[0]
        .filters[0]
        .typed_config.type_url.endswith("Echo")
    )


@pytest.mark.parametrize(
    ("snippet", "expected"),
    [
        ("{name: 5}", "static_resources.clusters[0].name: expected a string, got a number"),
        (
            "{connect_timeout: 5}",
            'static_resources.clusters[0].connect_timeout: expected a duration such as "1.5s"',
        ),
        ("{connect_timeout: 5m}", "static_resources.clusters[0].connect_timeout: expected a duration"),
        (
            "{lb_policy: FASTEST}",
            "static_resources.clusters[0].lb_policy: unknown value 'FASTEST'; expected one of",
        ),
        ("{respect_dns_ttl: 'yes'}", "static_resources.clusters[0].respect_dns_ttl: expected true or false"),
        ("{per_connection_buffer_limit_bytes: -1}", "per_connection_buffer_limit_bytes: -1 is out of range"),
        (
            "{per_connection_buffer_limit_bytes: many}",
            "per_connection_buffer_limit_bytes: expected an integer",
        ),
        (
            "{load_assignment: []}",
            "static_resources.clusters[0].load_assignment: expected a mapping, got a list",
        ),
        ("{health_checks: {}}", "static_resources.clusters[0].health_checks: expected a list, got a mapping"),
    ],
)
def test_wrong_value_types_name_the_field(snippet: str, expected: str) -> None:
    assert expected in error_of(f"static_resources:\n  clusters:\n  - {snippet}\n")


def test_oneof_conflict_is_refused() -> None:
    text = "static_resources:\n  clusters:\n  - {name: c, type: STATIC, cluster_type: {name: x}}\n"
    assert "only one of type and cluster_type may be set" in error_of(text)


def test_map_values_are_checked_with_their_key() -> None:
    text = (
        "static_resources:\n  clusters:\n  - name: c\n    typed_extension_protocol_options:\n"
        "      envoy.extensions.upstreams.http.v3.HttpProtocolOptions: {'@type': type.googleapis.com/x.Y}\n"
    )
    message = error_of(text)
    assert message.startswith(
        'static_resources.clusters[0].typed_extension_protocol_options["envoy.extensions.upstreams.http.v3.'
        'HttpProtocolOptions"].@type: unknown type'
    )


def test_struct_values_must_be_json() -> None:
    text = "layered_runtime:\n  layers:\n  - name: a\n    static_layer: {when: 2024-01-01}\n"
    assert "layered_runtime.layers[0].static_layer.when: expected a JSON value, got date" in error_of(text)


def test_parse_resource_from_dict_and_bytes() -> None:
    from_dict = parse_resource(CLUSTER_URL, {"name": "c", "connect_timeout": "2s"})
    assert isinstance(from_dict, cluster_pb2.Cluster)
    assert from_dict.connect_timeout.seconds == 2
    from_bytes = parse_resource(CLUSTER_URL, from_dict.SerializeToString())
    assert from_bytes == from_dict


def test_parse_resource_errors() -> None:
    with pytest.raises(ConfigError, match=r"^res: unknown type 'type.googleapis.com/no.such.Type'"):
        parse_resource("type.googleapis.com/no.such.Type", {}, "res")
    with pytest.raises(ConfigError, match=r"^res.nme: unknown field"):
        parse_resource(CLUSTER_URL, {"nme": "c"}, "res")
    with pytest.raises(ConfigError, match=r"cannot decode envoy\.config\.cluster\.v3\.Cluster"):
        parse_resource(CLUSTER_URL, b"\xff\xff\xff", "res")
