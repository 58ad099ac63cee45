"""The admin endpoint, SIGTERM drain, and the CLI's refusals of bad config (exit 2, one line)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import pytest
import yaml
from interop_helpers import (
    MeshletProcess,
    StartMeshlet,
    bootstrap,
    cluster,
    hcm,
    listener,
    ports,
    route,
)

from meshlet.bench.admin import admin_get

pytestmark = pytest.mark.interop


@pytest.fixture
def proxy(start_meshlet: StartMeshlet, upstream_port: int) -> tuple[MeshletProcess, int]:
    port, admin = ports(2)
    config = bootstrap([listener("http", port, [hcm([route("/")], stat_prefix="ingress")])],
                       [cluster("app", upstream_port)], admin)
    return start_meshlet(config), port


def get(url: str, timeout: float = 10) -> tuple[int, bytes]:
    with urllib.request.urlopen(url, timeout=timeout) as response:
        return response.status, response.read()


def test_admin_endpoints(proxy: tuple[MeshletProcess, int]) -> None:
    meshlet, port = proxy
    for _ in range(3):
        assert get(f"http://127.0.0.1:{port}/")[0] == 200
    status, body = meshlet.admin("/ready")
    assert (status, body.strip()) == (200, "LIVE")

    status, body = meshlet.admin("/stats")
    assert status == 200
    stats = dict(line.split(": ", 1) for line in body.splitlines() if ": " in line)
    assert int(stats["http.ingress.downstream_rq_total"]) >= 3
    assert int(stats["cluster.app.upstream_rq_total"]) >= 3
    assert int(stats["http.ingress.downstream_rq_2xx"]) >= 3

    status, body = meshlet.admin("/stats/prometheus")
    assert status == 200
    assert "# TYPE envoy_cluster_upstream_rq_total counter" in body
    assert 'envoy_cluster_upstream_rq_total{envoy_cluster_name="app"}' in body

    status, body = meshlet.admin("/config_dump")
    assert status == 200
    dump = json.loads(body)
    assert "configs" in dump

    status, body = meshlet.admin("/clusters")
    assert status == 200
    assert body.startswith("app::") or "\napp::" in body


def test_quitquitquit(proxy: tuple[MeshletProcess, int]) -> None:
    meshlet, _ = proxy
    request = urllib.request.Request(f"http://127.0.0.1:{meshlet.admin_port}/quitquitquit", method="POST")
    with urllib.request.urlopen(request, timeout=5) as response:
        assert response.status == 200
    assert meshlet.proc is not None
    assert meshlet.proc.wait(timeout=10) == 0


def wait_for_stat(meshlet: MeshletProcess, name: str, at_least: int, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        _, body = meshlet.admin("/stats")
        stats = dict(line.split(": ", 1) for line in body.splitlines() if ": " in line)
        if int(stats.get(name, "0")) >= at_least:
            return
        time.sleep(0.02)
    raise AssertionError(f"{name} never reached {at_least}")


def test_sigterm_drains_in_flight_requests(proxy: tuple[MeshletProcess, int]) -> None:
    meshlet, port = proxy
    results: list[tuple[int, bytes]] = []
    slow = threading.Thread(target=lambda: results.append(get(f"http://127.0.0.1:{port}/delay/1500")))
    slow.start()
    wait_for_stat(meshlet, "cluster.app.upstream_rq_active", 1)  # in flight at the upstream
    assert meshlet.terminate(timeout=10) == 0
    slow.join(timeout=10)
    assert results == [(200, b"delayed 1500 ms\n")]


def test_sigterm_drains_http2_streams(proxy: tuple[MeshletProcess, int]) -> None:
    """curl over h2c: the in-flight stream completes, then the proxy exits (GOAWAY on the way)."""
    meshlet, port = proxy
    if shutil.which("curl") is None:
        pytest.skip("curl is not installed")
    slow = subprocess.Popen(["curl", "-sS", "--max-time", "10", "--http2-prior-knowledge",
                             "-w", " %{http_version} %{http_code}", f"http://127.0.0.1:{port}/delay/1500"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        wait_for_stat(meshlet, "cluster.app.upstream_rq_active", 1)
        assert meshlet.terminate(timeout=10) == 0
        out, err = slow.communicate(timeout=10)
    finally:
        if slow.poll() is None:
            slow.kill()
            slow.wait(5)
    assert out == "delayed 1500 ms\n 2 200", err


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "meshlet.cli.main", *args], capture_output=True, text=True,
                          timeout=30, check=False)


def assert_one_line_usage_error(done: subprocess.CompletedProcess[str], *fragments: str) -> None:
    assert done.returncode == 2, done.stderr
    assert done.stdout == ""
    assert done.stderr.count("\n") == 1 and done.stderr.startswith("meshlet: error: "), done.stderr
    assert "Traceback" not in done.stderr
    for fragment in fragments:
        assert fragment in done.stderr


def test_cli_missing_config_file(tmp_path: Path) -> None:
    assert_one_line_usage_error(run_cli("proxy", "--config", str(tmp_path / "absent.yaml")), "does not exist")


def test_cli_bad_yaml(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("static_resources:\n  listeners: [\n    - name: x\n")
    assert_one_line_usage_error(run_cli("proxy", "--config", str(bad)), str(bad))


def test_cli_unknown_field_is_named(tmp_path: Path) -> None:
    config = bootstrap([], [cluster("app", 1)], 0)
    config["static_resources"]["clusters"][0]["no_such_field"] = 1
    path = tmp_path / "unknown.yaml"
    path.write_text(yaml.safe_dump(config))
    assert_one_line_usage_error(run_cli("proxy", "--config", str(path)), "static_resources.clusters[0]",
                                "no_such_field")


def test_cli_unsupported_field_is_named(tmp_path: Path) -> None:
    config = bootstrap([], [cluster("app", 1, lb_policy="CLUSTER_PROVIDED")], 0)
    path = tmp_path / "unsupported.yaml"
    path.write_text(yaml.safe_dump(config))
    assert_one_line_usage_error(run_cli("proxy", "--config", str(path)),
                                "static_resources.clusters[0].lb_policy")


def test_prometheus_output_parses_with_prometheus_client(proxy: tuple[MeshletProcess, int]) -> None:
    from prometheus_client.parser import text_string_to_metric_families

    meshlet, port = proxy
    assert get(f"http://127.0.0.1:{port}/")[0] == 200
    status, body = meshlet.admin("/stats/prometheus")
    assert status == 200
    families = {family.name: family for family in text_string_to_metric_families(body)}
    # prometheus_client names counters without their _total suffix.
    samples = families["envoy_cluster_upstream_rq"].samples
    assert any(s.labels.get("envoy_cluster_name") == "app" and s.value >= 1 for s in samples)


def test_runtime_settings_and_command_line_overrides(start_meshlet: StartMeshlet, upstream_port: int) -> None:
    port, admin, override_admin = ports(3)
    config = bootstrap([listener("http", port, [hcm([route("/")])])], [cluster("app", upstream_port)], admin)
    config["layered_runtime"] = {"layers": [{"name": "static", "static_layer": {
        "meshlet.tls_engine": "meshlet", "meshlet.regex_engine": "re"}}]}
    meshlet = start_meshlet(config)
    options = json.loads(meshlet.admin("/server_info")[1])["command_line_options"]
    assert options["tls_engine"] == "meshlet"
    meshlet.stop()

    overridden = start_meshlet(config, "--tls-engine", "openssl", "--admin-port", str(override_admin),
                               "--drain-time", "2")
    assert overridden.admin_port == override_admin  # it answered /ready there
    assert admin_get(admin, "/ready")[0] == 0  # and not on the bootstrap's admin port
    status, body = admin_get(override_admin, "/server_info")
    assert status == 200
    options = json.loads(body)["command_line_options"]
    assert options["tls_engine"] == "openssl"
    assert options["drain_time"] == "2s"
