"""The servers of the handshake benchmark: one TLS-terminating listener answering
a small HTTP response, per system, all with the same certificate and key.

- ``meshlet-*``: ``meshlet proxy --tls-engine meshlet``, an HCM whose only
  route is a ``direct_response`` (no upstream), the certificate's key behind
  the key provider the row names (``meshlet-local``: the ``meshlet.local``
  provider, the key in process);
- ``stdlib-ssl``: the same config with a plain ``private_key`` and
  ``meshlet proxy --tls-engine openssl`` (the stdlib ``ssl`` module under uvloop);
- ``haproxy``: ``nbthread 1``, ``bind ... ssl crt FILE ssl-min-ver TLSv1.3``,
  ``http-request return status 200``;
- ``nginx``: ``worker_processes 1``, ``ssl_protocols TLSv1.3``, ``return 200``.

Each server is pinned to the server core (its workers and the key server
too) and reports its own count of TLS handshakes, against which the
harness checks the load generator's connection count.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import meshlet
from meshlet.bench.admin import admin_get, parse_stats, wait_ready
from meshlet.bench.configs import HCM_TYPE, ROUTER_TYPE, dump, socket_address
from meshlet.bench.haproxy import haproxy_binary, haproxy_version
from meshlet.bench.procs import LOOPBACK, Child, ChildError, cpu_seconds, free_port, wait_for_port
from meshlet.bench.tls import KeyFiles

MESHLET_SYSTEMS = ("meshlet-local", "meshlet-offload", "meshlet-batch", "meshlet-keyserver")
SYSTEMS = (*MESHLET_SYSTEMS, "stdlib-ssl", "haproxy", "nginx")
RESPONSE_BODY = "hello from the handshake bench\n"
READY_TIMEOUT = 20.0
DOWNSTREAM_TLS = "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.DownstreamTlsContext"
TYPED_STRUCT = "type.googleapis.com/xds.type.v3.TypedStruct"
KEY_HANDLE = "bench"

# How each meshlet row holds the certificate's key (recorded in its row).
KEY_PATHS = {
    "meshlet-local": "meshlet.local provider (key in the proxy process)",
    "meshlet-offload": "meshlet.offload provider, mode process, 1 worker process",
    "meshlet-batch": "meshlet.batch provider (crypto_mb where available), max_batch 8",
    "meshlet-keyserver": "meshlet.keyserver provider; key in a separate meshlet keyserver process",
    "stdlib-ssl": "private_key in the stdlib ssl context",
    "haproxy": "crt file (OpenSSL)",
    "nginx": "ssl_certificate_key (OpenSSL)",
}


@dataclass(slots=True)
class RunningServer:
    """One system under test: its processes, its port and its handshake counter."""

    name: str
    port: int
    main: Child  # its CPU time includes its descendants (offload workers, nginx's worker)
    count_handshakes: Callable[[], int]
    version: str
    key_path: str
    keyserver: Child | None = None  # a separate process, charged to the row but reported apart
    python: bool = False  # a Python server (py-spy can profile it)
    others: list[Child] = field(default_factory=list)

    def cpu_s(self) -> tuple[float, float]:
        """(server, key server) CPU seconds so far."""
        own = cpu_seconds(self.main.pid)
        return own, cpu_seconds(self.keyserver.pid) if self.keyserver is not None else 0.0

    def check_alive(self) -> None:
        self.main.check_alive()
        if self.keyserver is not None:
            self.keyserver.check_alive()

    def stop(self) -> None:
        self.main.stop()
        for child in (self.keyserver, *self.others):
            if child is not None:
                child.stop()


# --------------------------------------------------------------------------- #
# meshlet
# --------------------------------------------------------------------------- #


def meshlet_certificate(name: str, files: KeyFiles, keyserver_socket: Path | None,
                        batch_settings: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The ``tls_certificates`` entry: the key as ``private_key`` or behind a provider
    (``batch_settings``: extra ``meshlet.batch`` settings, e.g. ``poll_delay``)."""
    chain = {"filename": str(files.cert)}
    key_file = {"filename": str(files.key)}
    if name == "stdlib-ssl":
        return {"certificate_chain": chain, "private_key": key_file}
    settings: dict[str, Any]
    if name == "meshlet-local":
        provider, settings = "meshlet.local", {"private_key": key_file}
    elif name == "meshlet-offload":
        provider, settings = "meshlet.offload", {"private_key": key_file, "mode": "process", "workers": 1}
    elif name == "meshlet-batch":
        provider, settings = "meshlet.batch", {"private_key": key_file, **(batch_settings or {})}
    elif name == "meshlet-keyserver":
        if keyserver_socket is None:
            raise ValueError("meshlet-keyserver needs the key server's socket")
        provider, settings = "meshlet.keyserver", {"socket": str(keyserver_socket), "handle": KEY_HANDLE}
    else:
        raise ValueError(f"not a meshlet system: {name!r}")
    return {
        "certificate_chain": chain,
        "private_key_provider": {"provider_name": provider,
                                 "typed_config": {"@type": TYPED_STRUCT, "value": settings}},
    }


def meshlet_bootstrap(port: int, admin_port: int, certificate: dict[str, Any]) -> dict[str, Any]:
    """A TLS 1.3 listener whose only route answers 200 itself (no upstream)."""
    hcm = {
        "name": "envoy.filters.network.http_connection_manager",
        "typed_config": {
            "@type": HCM_TYPE,
            "stat_prefix": "handshake_bench",
            "codec_type": "HTTP1",
            "route_config": {
                "name": "bench",
                "virtual_hosts": [{
                    "name": "all",
                    "domains": ["*"],
                    "routes": [{
                        "match": {"prefix": "/"},
                        "direct_response": {"status": 200, "body": {"inline_string": RESPONSE_BODY}},
                    }],
                }],
            },
            "http_filters": [{"name": "envoy.filters.http.router", "typed_config": {"@type": ROUTER_TYPE}}],
        },
    }
    tls = {
        "name": "envoy.transport_sockets.tls",
        "typed_config": {
            "@type": DOWNSTREAM_TLS,
            "common_tls_context": {
                "tls_params": {"tls_minimum_protocol_version": "TLSv1_3",
                               "tls_maximum_protocol_version": "TLSv1_3"},
                "tls_certificates": [certificate],
                "alpn_protocols": ["http/1.1"],
            },
        },
    }
    return {
        "admin": {"address": socket_address(admin_port)},
        "static_resources": {
            "listeners": [{
                "name": "handshake_bench",
                "address": socket_address(port),
                "filter_chains": [{"filters": [hcm], "transport_socket": tls}],
            }],
        },
    }


def meshlet_handshakes(admin_port: int) -> int:
    """The listener's ``ssl.handshake`` counter from the admin ``/stats``."""
    status, text = admin_get(admin_port, "/stats", timeout=5.0)
    if status != 200:
        raise ChildError(f"the proxy's admin /stats answered {status or 'nothing'}")
    stats = parse_stats(text)
    found = [int(value) for name, value in stats.items()
             if name.startswith("listener.") and name.endswith(".ssl.handshake")]
    return sum(found)


def start_keyserver(files: KeyFiles, cpus: set[int], workdir: Path) -> tuple[Child, Path]:
    """``meshlet keyserver run`` holding the bench key (imported as ``KEY_HANDLE``)."""
    sock = workdir / f"keyserver-{files.key.stem}.sock"
    key_dir = workdir / f"keyserver-keys-{files.key.stem}"
    # A fresh store each start: an earlier round's import would otherwise answer EXISTS.
    shutil.rmtree(key_dir, ignore_errors=True)
    argv = [sys.executable, "-m", "meshlet.cli.main", "keyserver", "run", "--socket", str(sock),
            "--key-dir", str(key_dir)]
    child = Child("meshlet keyserver", argv, cpus=cpus, log_path=workdir / f"keyserver-{files.key.stem}.log")
    child.start()
    try:
        wait_for_unix_socket(sock, READY_TIMEOUT, child)
        imported = subprocess.run(
            [sys.executable, "-m", "meshlet.cli.main", "keyserver", "import", "--socket", str(sock),
             "--key", str(files.key), "--name", KEY_HANDLE],
            capture_output=True, text=True, timeout=30, check=False)
        if imported.returncode != 0:
            raise ChildError(f"meshlet keyserver import failed: {imported.stderr.strip()[-200:]}")
    except BaseException:
        child.stop()
        raise
    return child, sock


def wait_for_unix_socket(path: Path, timeout: float, child: Child) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.socket(socket.AF_UNIX) as probe:
                probe.settimeout(1.0)
                probe.connect(str(path))
                return
        except OSError:
            child.check_alive()
            time.sleep(0.05)
    raise ChildError(f"the key server did not listen on {path} within {timeout:.0f} s")


def start_meshlet(name: str, key: str, files: KeyFiles, cpus: set[int], workdir: Path,
                  batch_settings: Mapping[str, Any] | None = None) -> RunningServer:
    keyserver: Child | None = None
    keyserver_socket: Path | None = None
    if name == "meshlet-keyserver":
        keyserver, keyserver_socket = start_keyserver(files, cpus, workdir)
    try:
        port, admin_port = free_port(), free_port()
        config = workdir / f"{name}-{key}.yaml"
        config.write_text(dump(meshlet_bootstrap(port, admin_port,
                                                 meshlet_certificate(name, files, keyserver_socket,
                                                                     batch_settings))))
        engine = "openssl" if name == "stdlib-ssl" else "meshlet"
        argv = [sys.executable, "-m", "meshlet.cli.main", "proxy", "--config", str(config),
                "--tls-engine", engine, "--log-level", "warning"]
        child = Child(f"{name} proxy", argv, cpus=cpus, log_path=workdir / f"{name}-{key}.log").start()
        try:
            wait_ready(admin_port, READY_TIMEOUT, child)
        except BaseException:
            child.stop()
            raise
    except BaseException:
        if keyserver is not None:
            keyserver.stop()
        raise
    return RunningServer(name, port, child, lambda: meshlet_handshakes(admin_port), meshlet.__version__,
                         KEY_PATHS[name], keyserver, python=True)


# --------------------------------------------------------------------------- #
# HAProxy
# --------------------------------------------------------------------------- #


def haproxy_tls_config(port: int, crt: Path, stats_socket: Path) -> str:
    return f"""\
global
    nbthread 1
    maxconn 4096
    stats socket {stats_socket} level user
    log stderr format raw local0 emerg

defaults
    mode http
    timeout connect 5s
    timeout client 30s
    timeout server 30s

frontend handshake_bench
    bind {LOOPBACK}:{port} ssl crt {crt} ssl-min-ver TLSv1.3 alpn http/1.1
    http-request return status 200 content-type text/plain string "{RESPONSE_BODY.strip()}"
"""


def haproxy_info(stats_socket: Path, timeout: float = 5.0) -> dict[str, str]:
    """``show info`` from HAProxy's stats socket as name -> value."""
    with socket.socket(socket.AF_UNIX) as conn:
        conn.settimeout(timeout)
        conn.connect(str(stats_socket))
        conn.sendall(b"show info\n")
        data = b""
        while len(data) < 1 << 20:
            chunk = conn.recv(65536)
            if not chunk:
                break
            data += chunk
    info: dict[str, str] = {}
    for line in data.decode(errors="replace").splitlines():
        name, sep, value = line.partition(":")
        if sep:
            info[name.strip()] = value.strip()
    return info


def haproxy_handshakes(stats_socket: Path) -> int:
    try:
        return int(haproxy_info(stats_socket)["CumSslConns"])
    except (OSError, KeyError, ValueError) as exc:
        raise ChildError(f"cannot read CumSslConns from HAProxy's stats socket: {exc}") from exc


def start_haproxy(name: str, key: str, files: KeyFiles, cpus: set[int], workdir: Path) -> RunningServer:
    binary = haproxy_binary()
    if binary is None:
        raise ChildError("haproxy is not installed (Debian package: haproxy)")
    crt = workdir / f"haproxy-{key}.pem"  # HAProxy wants the certificate and its key in one file
    crt.write_bytes(files.cert.read_bytes() + files.key.read_bytes())
    crt.chmod(0o600)
    port, stats_socket = free_port(), workdir / f"haproxy-{key}.sock"
    config = workdir / f"haproxy-{key}.cfg"
    config.write_text(haproxy_tls_config(port, crt, stats_socket))
    child = Child("haproxy", [binary, "-db", "-f", str(config)], cpus=cpus,
                  log_path=workdir / f"haproxy-{key}.log").start()
    try:
        wait_for_port(port, READY_TIMEOUT, child=child)
    except BaseException:
        child.stop()
        raise
    return RunningServer(name, port, child, lambda: haproxy_handshakes(stats_socket), haproxy_version(binary),
                         KEY_PATHS[name])


# --------------------------------------------------------------------------- #
# nginx
# --------------------------------------------------------------------------- #


def nginx_binary() -> str | None:
    return shutil.which("nginx") or ("/usr/sbin/nginx" if Path("/usr/sbin/nginx").exists() else None)


def nginx_version(binary: str) -> str:
    try:
        done = subprocess.run([binary, "-v"], capture_output=True, text=True, timeout=10, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return ""
    return done.stderr.strip().rpartition("/")[2]


def nginx_config(port: int, status_port: int, files: KeyFiles, prefix: Path) -> str:
    temp = prefix / "tmp"
    return f"""\
worker_processes 1;
daemon off;
master_process on;
pid {prefix}/nginx.pid;
error_log {prefix}/error.log warn;
events {{ worker_connections 4096; }}
http {{
    access_log off;
    client_body_temp_path {temp}/body;
    proxy_temp_path {temp}/proxy;
    fastcgi_temp_path {temp}/fastcgi;
    uwsgi_temp_path {temp}/uwsgi;
    scgi_temp_path {temp}/scgi;
    server {{
        listen {LOOPBACK}:{port} ssl;
        ssl_certificate {files.cert};
        ssl_certificate_key {files.key};
        ssl_protocols TLSv1.3;
        location / {{ default_type text/plain; return 200 "{RESPONSE_BODY.strip()}\\n"; }}
    }}
    server {{
        listen {LOOPBACK}:{status_port};
        location / {{ stub_status; }}
    }}
}}
"""


def nginx_accepts(status_port: int) -> int:
    """Connections nginx accepted, TLS and plain alike (the harness subtracts its own status reads)."""
    status, text = admin_get(status_port, "/", timeout=5.0)
    lines = text.splitlines()
    if status != 200 or len(lines) < 3:
        raise ChildError(f"nginx's stub_status answered {status or 'nothing'}")
    return int(lines[2].split()[0])


def start_nginx(name: str, key: str, files: KeyFiles, cpus: set[int], workdir: Path) -> RunningServer:
    binary = nginx_binary()
    if binary is None:
        raise ChildError("nginx is not installed (Debian package: nginx)")
    prefix = workdir / f"nginx-{key}"
    (prefix / "tmp").mkdir(parents=True, exist_ok=True)
    port, status_port = free_port(), free_port()
    config = prefix / "nginx.conf"
    config.write_text(nginx_config(port, status_port, files, prefix))
    child = Child("nginx", [binary, "-p", str(prefix), "-c", str(config)], cpus=cpus,
                  log_path=prefix / "stderr.log").start()
    try:
        wait_for_port(port, READY_TIMEOUT, child=child)
        wait_for_port(status_port, READY_TIMEOUT, child=child)
    except BaseException:
        child.stop()
        raise
    reads = 0

    def tls_accepts() -> int:
        # Every stub_status read is an accepted connection too: leave those out.
        nonlocal reads
        reads += 1
        return nginx_accepts(status_port) - reads

    return RunningServer(name, port, child, tls_accepts, nginx_version(binary), KEY_PATHS[name])


Starter = Callable[[str, str, KeyFiles, set[int], Path], RunningServer]
STARTERS: dict[str, Starter] = {
    **dict.fromkeys(MESHLET_SYSTEMS, start_meshlet),
    "stdlib-ssl": start_meshlet,
    "haproxy": start_haproxy,
    "nginx": start_nginx,
}


def external_available(name: str) -> bool:
    """Whether the binary a row needs is installed (meshlet rows need none)."""
    if name == "haproxy":
        return haproxy_binary() is not None
    if name == "nginx":
        return nginx_binary() is not None
    return True
