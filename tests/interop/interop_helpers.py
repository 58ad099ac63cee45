"""Envoy v3 config builders and the real ``meshlet proxy`` process, for end-to-end tests.

Tests write the bootstrap with their ephemeral loopback ports filled in, start
``python -m meshlet.cli.main proxy`` on it, wait for the admin ``/ready``, and
always stop the process (SIGTERM, then SIGKILL) when the test ends.
"""

from __future__ import annotations

import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from meshlet.bench.admin import admin_get
from meshlet.bench.procs import LOOPBACK, free_port

HCM = "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager"
ROUTER = "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"
TCP_PROXY = "type.googleapis.com/envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy"
DOWNSTREAM_TLS = "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.DownstreamTlsContext"
UPSTREAM_TLS = "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext"
HTTP_OPTIONS = "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions"
READY_TIMEOUT = 15.0


def address(port: int, host: str = LOOPBACK) -> dict[str, Any]:
    return {"socket_address": {"address": host, "port_value": port}}


def route(prefix: str = "/", cluster: str = "app", *, path: str | None = None,
          **action: Any) -> dict[str, Any]:
    match = {"path": path} if path is not None else {"prefix": prefix}
    return {"match": match, "route": {"cluster": cluster, **action}}


def direct(path: str, status: int, body: str) -> dict[str, Any]:
    return {"match": {"path": path}, "direct_response": {"status": status, "body": {"inline_string": body}}}


def hcm(routes: list[dict[str, Any]], *, stat_prefix: str = "ingress",
        http_filters: list[dict[str, Any]] | None = None, **extra: Any) -> dict[str, Any]:
    """An HTTP connection manager: ``http_filters`` run before the router."""
    return {
        "name": "envoy.filters.network.http_connection_manager",
        "typed_config": {
            "@type": HCM,
            "stat_prefix": stat_prefix,
            "route_config": {
                "name": "local",
                "virtual_hosts": [{"name": "all", "domains": ["*"], "routes": routes}],
            },
            "http_filters": [*(http_filters or []),
                             {"name": "envoy.filters.http.router", "typed_config": {"@type": ROUTER}}],
            **extra,
        },
    }


def tcp_proxy(cluster: str = "app", stat_prefix: str = "tcp") -> dict[str, Any]:
    return {"name": "envoy.filters.network.tcp_proxy",
            "typed_config": {"@type": TCP_PROXY, "stat_prefix": stat_prefix, "cluster": cluster}}


def tls_socket(context: dict[str, Any], *, upstream: bool = False) -> dict[str, Any]:
    return {"name": "envoy.transport_sockets.tls",
            "typed_config": {"@type": UPSTREAM_TLS if upstream else DOWNSTREAM_TLS, **context}}


def downstream_tls(cert: Path, key: Path, *, ca: Path | None = None, require_client: bool = False,
                   alpn: tuple[str, ...] = ("h2", "http/1.1")) -> dict[str, Any]:
    common: dict[str, Any] = {
        "tls_certificates": [{"certificate_chain": {"filename": str(cert)},
                              "private_key": {"filename": str(key)}}],
        "alpn_protocols": list(alpn),
    }
    if ca is not None:
        common["validation_context"] = {"trusted_ca": {"filename": str(ca)}}
    context: dict[str, Any] = {"common_tls_context": common}
    if require_client:
        context["require_client_certificate"] = True
    return tls_socket(context)


def listener(name: str, port: int, filters: list[dict[str, Any]], *,
             transport_socket: dict[str, Any] | None = None) -> dict[str, Any]:
    chain: dict[str, Any] = {"filters": filters}
    if transport_socket is not None:
        chain["transport_socket"] = transport_socket
    return {"name": name, "address": address(port), "filter_chains": [chain]}


def cluster(name: str, port: int, *, http2: bool = False, connect_timeout: str = "1s",
            **extra: Any) -> dict[str, Any]:
    result: dict[str, Any] = {
        "name": name,
        "type": "STATIC",
        "connect_timeout": connect_timeout,
        "load_assignment": {"cluster_name": name,
                            "endpoints": [{"lb_endpoints": [{"endpoint": {"address": address(port)}}]}]},
        **extra,
    }
    if http2:
        result["typed_extension_protocol_options"] = {
            "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
                "@type": HTTP_OPTIONS, "explicit_http_config": {"http2_protocol_options": {}}},
        }
    return result


def bootstrap(listeners: list[dict[str, Any]], clusters: list[dict[str, Any]],
              admin_port: int) -> dict[str, Any]:
    return {"admin": {"address": address(admin_port)},
            "static_resources": {"listeners": listeners, "clusters": clusters}}


@dataclass
class MeshletProcess:
    """One ``meshlet proxy`` child process on a bootstrap written to ``workdir``."""

    workdir: Path
    config: dict[str, Any]
    extra_args: list[str] = field(default_factory=list)
    admin_port: int = 0
    proc: subprocess.Popen[bytes] | None = None

    def __post_init__(self) -> None:
        self.admin_port = self.config["admin"]["address"]["socket_address"]["port_value"]
        if "--admin-port" in self.extra_args:  # the command line wins over the bootstrap
            self.admin_port = int(self.extra_args[self.extra_args.index("--admin-port") + 1])
        self.config_path = self.workdir / "meshlet.yaml"
        self.log_path = self.workdir / "meshlet.log"

    def start(self) -> MeshletProcess:
        self.config_path.write_text(yaml.safe_dump(self.config, sort_keys=False))
        argv = [sys.executable, "-m", "meshlet.cli.main", "proxy", "--config", str(self.config_path),
                "--log-level", "info", *self.extra_args]
        with self.log_path.open("wb") as log:
            self.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=log)
        self.wait_ready()
        return self

    def wait_ready(self, timeout: float = READY_TIMEOUT) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc is not None and self.proc.poll() is not None:
                raise AssertionError(f"meshlet proxy exited with {self.proc.returncode}:\n{self.log()}")
            status, _ = admin_get(self.admin_port, "/ready", timeout=1.0)
            if status == 200:
                return
            time.sleep(0.05)
        raise AssertionError(f"meshlet proxy not ready within {timeout} s:\n{self.log()}")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-3000:] if self.log_path.exists() else ""

    def admin(self, path: str) -> tuple[int, str]:
        return admin_get(self.admin_port, path)

    def terminate(self, timeout: float = 10.0) -> int:
        """SIGTERM and wait: the proxy drains and exits."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout=timeout)

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=5)


StartMeshlet = Callable[..., MeshletProcess]


def require(*commands: str) -> None:
    import pytest

    for command in commands:
        if shutil.which(command) is None:
            pytest.skip(f"{command} is not installed")


def run(argv: list[str], timeout: float = 20.0,
        input: bytes | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, capture_output=True, text=True, timeout=timeout, check=False,
                          input=input.decode() if input is not None else None)


def ports(n: int) -> list[int]:
    return [free_port() for _ in range(n)]
