"""``meshlet bench handshake``: the load generator's parsing, the servers' configs,
the ratios, and smoke runs of the real command against every system."""

from __future__ import annotations

import json
import subprocess
import sys
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
import yaml

from meshlet.bench.handshake import merge_rounds, ratios
from meshlet.bench.handshake_load import Window, request_bytes, response_length
from meshlet.bench.handshake_profile import free_path, per_handshake, py_spy_binary, split_samples
from meshlet.bench.handshake_servers import (
    KEY_PATHS,
    MESHLET_SYSTEMS,
    SYSTEMS,
    external_available,
    haproxy_tls_config,
    meshlet_bootstrap,
    meshlet_certificate,
    nginx_config,
)
from meshlet.bench.tls import KeyFiles, write_key_files
from meshlet.config.compiler import compile_bootstrap
from meshlet.config.loader import load_bootstrap

KEYS = ("rsa2048", "p256")


def test_response_length_needs_the_whole_head_and_a_content_length() -> None:
    head = b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\ncontent-length: 5\r\n\r\n"
    assert response_length(head[:20]) is None
    assert response_length(head) == len(head) + 5
    assert response_length(b"HTTP/1.1 200 OK\r\nconnection: close\r\n\r\nbody") is None


def test_request_asks_the_server_to_close() -> None:
    request = request_bytes("127.0.0.1", 8443)
    assert request.startswith(b"GET / HTTP/1.1\r\n")
    assert b"\r\nconnection: close\r\n" in request and request.endswith(b"\r\n\r\n")


def test_window_summary_percentiles_and_rate() -> None:
    window = Window(started=10.0, ended=12.0, latencies_ms=[float(n) for n in range(100, 0, -1)])
    summary = window.summary(connections=4)
    assert summary["completed"] == 100 and summary["per_s"] == 50.0
    assert summary["p50_ms"] == 50.0 and summary["p99_ms"] == 99.0
    assert summary["connections"] == 4


def _row(name: str, key: str, per_cpu_s: float, cpu_us: float) -> dict[str, Any]:
    return {"name": name, "key": key, "handshakes_per_cpu_s": per_cpu_s, "cpu_us_per_handshake": cpu_us}


def test_ratios_compare_batch_with_stdlib_and_cpu_with_haproxy() -> None:
    rows = [
        _row("meshlet-batch", "rsa2048", 3000.0, 333.0),
        _row("stdlib-ssl", "rsa2048", 1000.0, 1000.0),
        _row("haproxy", "rsa2048", 2000.0, 500.0),
        _row("meshlet-batch", "p256", 1500.0, 666.0),
        _row("stdlib-ssl", "p256", 1000.0, 1000.0),
        {"name": "nginx", "key": "rsa2048", "error": "not installed"},
    ]
    found = ratios(rows)
    assert found["batch_vs_stdlib_handshakes_per_cpu_s"] == {"rsa2048": 3.0, "p256": 1.5}
    assert found["rsa2048_cpu_per_handshake_vs_haproxy"] == {"meshlet-batch": 0.666, "stdlib-ssl": 2.0}
    assert found["targets"] == {
        "batch_at_least_2x_stdlib_rsa2048": True,
        "batch_at_least_2x_stdlib_p256": False,
        "batch_rsa2048_cpu_below_haproxy": True,
    }


def test_ratios_without_the_rows_they_need_are_empty() -> None:
    found = ratios([_row("meshlet-batch", "rsa2048", 3000.0, 333.0)])
    assert found["batch_vs_stdlib_handshakes_per_cpu_s"] == {}
    assert found["targets"]["batch_rsa2048_cpu_below_haproxy"] is None


@pytest.fixture(scope="module")
def key_files(tmp_path_factory: pytest.TempPathFactory) -> KeyFiles:
    return write_key_files("p256", tmp_path_factory.mktemp("keys"))


@pytest.mark.parametrize("name", [*MESHLET_SYSTEMS, "stdlib-ssl"])
def test_meshlet_bootstraps_compile(name: str, key_files: KeyFiles, tmp_path: Path) -> None:
    """Each row's bootstrap is one the proxy loads: TLS 1.3 only, a direct response."""
    certificate = meshlet_certificate(name, key_files, tmp_path / "ks.sock")
    if name == "stdlib-ssl":
        assert "private_key" in certificate and "private_key_provider" not in certificate
    else:
        assert certificate["private_key_provider"]["provider_name"] == KEY_PATHS[name].split()[0]
    path = tmp_path / "bootstrap.yaml"
    path.write_text(yaml.safe_dump(meshlet_bootstrap(8443, 9901, certificate)))
    config = compile_bootstrap(load_bootstrap(path))
    assert list(config.listeners) == ["handshake_bench"]
    assert config.listeners["handshake_bench"].address.port == 8443


def test_haproxy_and_nginx_configs_force_tls13(key_files: KeyFiles, tmp_path: Path) -> None:
    haproxy = haproxy_tls_config(8443, tmp_path / "both.pem", tmp_path / "stats.sock")
    assert "ssl-min-ver TLSv1.3" in haproxy and "nbthread 1" in haproxy
    assert "http-request return status 200" in haproxy
    nginx = nginx_config(8443, 8080, key_files, tmp_path)
    assert "ssl_protocols TLSv1.3;" in nginx and "worker_processes 1;" in nginx
    assert "return 200" in nginx and "stub_status" in nginx


# --------------------------------------------------------------------------- #
# The real command, one system (both keys) per test
# --------------------------------------------------------------------------- #


def run_bench(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    argv = [sys.executable, "-m", "meshlet.cli.main", "bench", "handshake", "--json", "--quick", *args]
    return subprocess.run(argv, capture_output=True, text=True, timeout=timeout, check=False)


@pytest.mark.parametrize("name", SYSTEMS)
def test_quick_run_of_each_system(name: str) -> None:
    if not external_available(name):
        pytest.skip(f"{name} is not installed")
    done = run_bench("--system", name, "--duration", "1", "--warmup", "0.3", "--connections", "4")
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads(done.stdout)
    assert [(row["name"], row["key"]) for row in result["rows"]] == [(name, key) for key in KEYS]
    for row in result["rows"]:
        for column in ("handshakes_per_s", "cpu_us_per_handshake", "p50_ms", "p99_ms"):
            assert row[column] > 0, (column, row)
        assert row["p99_ms"] >= row["p50_ms"]
        assert row["client_errors"] == 0 and row["client_resumed"] == 0
        assert row["tls_versions"] == {"TLSv1.3": row["client_connections"]}
        # The server's own handshake count matches the generator's connections, give or take
        # the connections straddling the window's edges.
        assert abs(row["server_handshakes"] - row["client_connections"]) <= 2 * row["connections"] + 2, row
        if name == "meshlet-keyserver":
            assert 0 < row["keyserver_cpu_us_per_handshake"] < row["cpu_us_per_handshake"]
        else:
            assert "keyserver_cpu_us_per_handshake" not in row
    assert set(result["ratios"]) == {"batch_vs_stdlib_handshakes_per_cpu_s",
                                     "rsa2048_cpu_per_handshake_vs_haproxy", "targets"}


def test_unknown_system_is_a_usage_error() -> None:
    done = run_bench("--system", "envoy")
    assert done.returncode == 2
    assert "envoy" in done.stderr and done.stdout == ""


def test_rounds_merge_into_medians_and_sums() -> None:
    rounds = [{"name": "haproxy", "key": "p256", "cpu_us_per_handshake": cpu, "server_handshakes": 100,
               "shared_core": False} for cpu in (300.0, 500.0, 400.0)]
    merged = merge_rounds(rounds)
    assert merged["cpu_us_per_handshake"] == 400.0 and merged["server_handshakes"] == 300
    assert merged["rounds"] == 3 and merged["cpu_us_per_handshake_rounds"] == [300.0, 500.0, 400.0]
    assert merged["shared_core"] is False
    failed = {"name": "haproxy", "key": "p256", "error": "exited"}
    assert merge_rounds([rounds[0], failed]) == failed


PROCESS = 'process 1:"python -m meshlet.cli.main proxy"'


def stack(*frames: str, count: int) -> str:
    return ";".join((PROCESS, "Runner.run (asyncio/runners.py:118)", *frames)) + f" {count}"


def test_profile_samples_split_into_parts() -> None:
    raw = "\n".join([
        # Signing wins wherever it sits in the stack, hashing inside it included.
        stack("_TlsProtocol._sign (meshlet/tls/aio.py:400)",
              "LocalKeyProvider._sign (meshlet/keys/local.py:60)",
              "sign (meshlet/tls/crypto.py:150)", count=30),
        stack("emsa_pss_encode (meshlet/keys/pss.py:30)", "__hash_new (hashlib.py:120)", count=5),
        # Otherwise the innermost frame that belongs to a part decides.
        stack("_TlsProtocol.data_received (meshlet/tls/aio.py:300)",
              "hkdf_expand (meshlet/tls/keyschedule.py:40)", "digest (hmac.py:10)", count=10),
        stack("_TlsProtocol.data_received (meshlet/tls/aio.py:300)",
              "H1ServerProtocol._serve (meshlet/proxy/http/h1_server.py:90)", count=15),
        stack("_TlsProtocol._flush (meshlet/tls/aio.py:500)", count=20),
        stack(count=10),  # uvloop's own work
        # An idle pool thread is not work.
        'process 1:"python";Thread.run (threading.py:982);_worker (concurrent/futures/thread.py:81) 500',
        "not a sample line",
    ])
    parts = split_samples(raw)
    assert parts == {
        "private-key signing": 35, "key schedule and transcript hashes": 10,
        "HTTP/1.1 codec, HCM, router": 15, "socket writes": 20, "event loop: epoll, accept, close": 10,
    }
    split = per_handshake(parts, 900.0)
    assert next(iter(split)) == "private-key signing" and split["private-key signing"] == 350.0
    assert sum(split.values()) == pytest.approx(900.0)
    assert per_handshake(Counter(), 900.0) == {}


def test_profile_files_do_not_overwrite_earlier_rounds(tmp_path: Path) -> None:
    first = free_path(tmp_path, "meshlet-batch-rsa2048")
    first.write_text("")
    assert free_path(tmp_path, "meshlet-batch-rsa2048").name == "meshlet-batch-rsa2048-2.txt"


def test_profile_option_splits_the_server_cpu(tmp_path: Path) -> None:
    if py_spy_binary() is None:
        pytest.skip("py-spy is not installed")
    done = run_bench("--system", "meshlet-local", "--key", "rsa2048", "--duration", "2", "--warmup", "0.3",
                     "--connections", "4", "--profile", str(tmp_path))
    assert done.returncode == 0, done.stderr[-2000:]
    (row,) = json.loads(done.stdout)["rows"]
    split = row["profile_us_per_handshake"]
    assert Path(row["profile_file"]).parent == tmp_path
    assert split["private-key signing"] > 0 and split["TLS engine: codec, state machine, adapter"] > 0
    own_us = row["server_cpu_s"] / row["server_handshakes"] * 1e6
    assert sum(split.values()) == pytest.approx(own_us, rel=0.01)


def test_batch_settings_reach_the_provider(key_files: KeyFiles) -> None:
    certificate = meshlet_certificate("meshlet-batch", key_files, None, {"poll_delay": "5ms"})
    settings = certificate["private_key_provider"]["typed_config"]["value"]
    assert settings == {"private_key": {"filename": str(key_files.key)}, "poll_delay": "5ms"}


def test_bad_batch_poll_delay_is_a_usage_error() -> None:
    done = run_bench("--batch-poll-delay", "soon")
    assert done.returncode == 2 and done.stdout == ""
    assert "--batch-poll-delay: must be a duration" in done.stderr
