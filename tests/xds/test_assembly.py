"""The proxy-side assembly of xDS resources into one ProxyConfig: references, warming, SDS."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from ads_helpers import cluster, dynamic_bootstrap, endpoints, http_listener, route, tls_listener
from envoy.extensions.transport_sockets.tls.v3 import secret_pb2
from google.protobuf.message import Message

from certs import make_pki
from meshlet.config.compiler import compile_bootstrap
from meshlet.config.loader import parse_bootstrap_text
from meshlet.config.model import DiscoveryType, ProxyConfig
from meshlet.errors import ConfigError
from meshlet.xds.assembly import ConfigAssembler, Received
from meshlet.xds.deps import cluster_refs, listener_refs
from meshlet.xds.snapshot import CLUSTER, ENDPOINT, LISTENER, ROUTE, SECRET


def static_config() -> ProxyConfig:
    text = yaml.safe_dump(dynamic_bootstrap("n1", 15010, 0))
    return compile_bootstrap(parse_bootstrap_text(text))


def received(*messages: Message, version: str = "1") -> dict[str, Received]:
    from meshlet.xds.snapshot import resource_name

    return {resource_name(m): Received(m, version, 0.0) for m in messages}


def test_bootstrap_with_dynamic_resources() -> None:
    config = static_config()
    assert config.ads is not None and config.ads.cluster == "xds_cluster" and not config.ads.delta
    assert list(config.clusters) == ["xds_cluster"]


def test_listener_waits_for_its_routes_and_cluster_for_its_endpoints() -> None:
    assembler = ConfigAssembler(static_config())
    resources = {LISTENER: received(http_listener("http", 18080, "r1")), CLUSTER: received(cluster("c1"))}
    assert assembler.wanted(resources) == {ROUTE: {"r1"}, ENDPOINT: {"c1"}, SECRET: frozenset()}
    warming = assembler.build(resources)
    assert "http" not in warming.listeners and "c1" not in warming.clusters
    resources |= {ROUTE: received(route("r1", "c1")), ENDPOINT: received(endpoints("c1", 9001))}
    ready = assembler.build(resources)
    assert ready.listeners["http"].address.port == 18080
    c1 = ready.clusters["c1"]
    assert c1.discovery is DiscoveryType.EDS and c1.load_assignment is not None
    assert [e.address.port for e in c1.load_assignment.all_endpoints()] == [9001]
    assert "r1" in ready.route_configs
    assembler.commit(resources, ready)

    # A new listener version naming routes not received yet: the applied one keeps serving.
    moved = dict(resources)
    moved[LISTENER] = received(http_listener("http", 18081, "r2"), version="2")
    still = assembler.build(moved)
    assert still.listeners["http"].address.port == 18080

    dynamic = ready.source["dynamic"]
    assert isinstance(dynamic, dict) and dynamic["clusters"]["c1"]["version_info"] == "1"


def test_a_warming_resource_with_a_mistake_is_refused_on_arrival() -> None:
    assembler = ConfigAssembler(static_config())
    broken = cluster("c1")
    broken.lb_policy = broken.MAGLEV
    broken.maglev_lb_config.table_size.value = 10  # not a prime
    with pytest.raises(ConfigError, match=r'clusters\["c1"\]\.maglev_lb_config'):
        assembler.build({CLUSTER: received(broken)})


def test_dynamic_names_cannot_shadow_static_ones() -> None:
    assembler = ConfigAssembler(static_config())
    clash = cluster("xds_cluster", eds=False)
    clash.load_assignment.CopyFrom(endpoints("xds_cluster", 1))
    with pytest.raises(ConfigError, match="already a static resource"):
        assembler.build({CLUSTER: received(clash)})


def test_sds_secrets_feed_tls_listeners(tmp_path: Path) -> None:
    pki = make_pki(tmp_path)
    issued = pki.issue("server")
    secret = secret_pb2.Secret(name="server-cert")
    secret.tls_certificate.certificate_chain.inline_bytes = issued.cert_pem
    secret.tls_certificate.private_key.inline_bytes = issued.key_pem
    listener = tls_listener("https", 18443, "r1", "server-cert")
    assert listener_refs(listener).secrets == {"server-cert"}
    assert cluster_refs(cluster("c")).endpoints == {"c"}

    assembler = ConfigAssembler(static_config())
    resources = {LISTENER: received(listener), ROUTE: received(route("r1", "c1"))}
    assert "https" not in assembler.build(resources).listeners  # waits for its secret
    config = assembler.build(resources | {SECRET: received(secret)})
    assert "https" in config.listeners and "server-cert" in config.secrets
    # /config_dump never shows the key.
    dumped = config.source["dynamic"]["secrets"]["server-cert"]["resource"]  # type: ignore[index]
    assert dumped["tls_certificate"]["private_key"]["inline_bytes"] == "[redacted]"


def test_check_snapshot_compiles_and_resolves_references() -> None:
    from meshlet.xds.snapshot import Snapshot
    from meshlet.xds.validate import check_snapshot

    good = Snapshot.build({
        LISTENER: [http_listener("http", 18080, "r1")],
        ROUTE: [route("r1", "c1")],
        CLUSTER: [cluster("c1")],
        ENDPOINT: [endpoints("c1", 9001)],
    })
    config = check_snapshot(good)
    assert set(config.listeners) == {"http"} and set(config.clusters) == {"c1"}
    dangling = Snapshot.build({LISTENER: [http_listener("http", 18080, "r1")]})
    with pytest.raises(ConfigError, match=r'rds\["r1"\]: is referred to but not in the snapshot'):
        check_snapshot(dangling)


def test_dynamic_resources_need_a_node_id() -> None:
    data = dynamic_bootstrap("n1", 15010, 0)
    del data["node"]
    with pytest.raises(ConfigError, match=r"node\.id: is required with dynamic_resources"):
        compile_bootstrap(parse_bootstrap_text(yaml.safe_dump(data)))
    data = dynamic_bootstrap("n1", 15010, 0)
    data["dynamic_resources"]["ads_config"]["grpc_services"][0]["envoy_grpc"]["cluster_name"] = "nope"
    with pytest.raises(ConfigError, match="'nope' is not a static cluster"):
        compile_bootstrap(parse_bootstrap_text(yaml.safe_dump(data)))
    data = dynamic_bootstrap("n1", 15010, 0)
    data["dynamic_resources"]["lds_config"] = {"path_config_source": {"path": "/tmp/x"}}
    with pytest.raises(ConfigError, match="only ads config sources"):
        compile_bootstrap(parse_bootstrap_text(yaml.safe_dump(data)))
