"""HAProxy as the reference proxy: one thread, HTTP mode, keep-alive both ways."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

from meshlet.bench.procs import LOOPBACK


def haproxy_binary() -> str | None:
    return shutil.which("haproxy") or (
        "/usr/sbin/haproxy" if Path("/usr/sbin/haproxy").exists() else None
    )


def haproxy_version(binary: str) -> str:
    """"2.6.12-1+deb12u4" from ``haproxy -v``; "" when it cannot be read."""
    try:
        done = subprocess.run([binary, "-v"], capture_output=True, text=True, timeout=10, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return ""
    found = re.search(r"version (\S+)", done.stdout)
    return found.group(1) if found else ""


def haproxy_config(listen_port: int, upstream_port: int, host: str = LOOPBACK) -> str:
    """A config doing what the meshlet bench config does: route everything to one upstream."""
    return f"""\
global
    nbthread 1
    maxconn 4096
    log stderr format raw local0 emerg

defaults
    mode http
    option http-keep-alive
    timeout connect 5s
    timeout client 30s
    timeout server 30s
    timeout http-keep-alive 60s

frontend bench
    bind {host}:{listen_port}
    default_backend upstream

backend upstream
    http-reuse always
    server app {host}:{upstream_port}
"""


def haproxy_argv(binary: str, config_path: Path) -> list[str]:
    # -db: stay in the foreground (the harness owns the process).
    return [binary, "-db", "-f", str(config_path)]
