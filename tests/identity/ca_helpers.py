"""Shared by the identity tests: CA directories, child processes (the CA
service, a key server), and ``openssl verify``."""

from __future__ import annotations

import contextlib
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import serialization

MESHLET = [sys.executable, "-m", "meshlet.cli.main"]
START_TIMEOUT = 15.0


def meshlet(*args: str, timeout: float = 30.0) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*MESHLET, *args], capture_output=True, text=True, timeout=timeout, check=False)


def openssl_verify(root: Path, leaf: Path, untrusted: Path | None = None) -> subprocess.CompletedProcess[str]:
    argv = ["openssl", "verify", "-CAfile", str(root)]
    if untrusted is not None:
        argv += ["-untrusted", str(untrusted)]
    return subprocess.run([*argv, str(leaf)], capture_output=True, text=True, timeout=10, check=False)


def write_pem(path: Path, *certs: x509.Certificate) -> Path:
    path.write_bytes(b"".join(c.public_bytes(serialization.Encoding.PEM) for c in certs))
    return path


@dataclass
class ChildProcess:
    argv: list[str]
    log_path: Path
    proc: subprocess.Popen[bytes] | None = None

    def start(self) -> ChildProcess:
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(self.argv, stdin=subprocess.DEVNULL, stdout=log, stderr=log)
        return self

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-4000:] if self.log_path.exists() else ""

    def check_alive(self) -> None:
        assert self.proc is not None
        if self.proc.poll() is not None:
            raise AssertionError(f"{self.argv[3:5]} exited with {self.proc.returncode}:\n{self.log()}")

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=5)


@contextlib.contextmanager
def key_server(tmp: Path, name: str = "ks") -> Iterator[Path]:
    """``meshlet keyserver run`` on a socket in ``tmp``; yields the socket path."""
    sock = tmp / f"{name}.sock"
    argv = [*MESHLET, "keyserver", "run", "--socket", str(sock), "--key-dir", str(tmp / f"{name}-keys")]
    child = ChildProcess(argv, tmp / f"{name}.log")
    child.start()
    try:
        deadline = time.monotonic() + START_TIMEOUT
        while True:
            child.check_alive()
            with contextlib.suppress(OSError), socket.socket(socket.AF_UNIX) as s:
                s.connect(str(sock))
                break
            if time.monotonic() > deadline:
                raise AssertionError(f"key server did not start:\n{child.log()}")
            time.sleep(0.05)
        yield sock
    finally:
        child.stop()


@dataclass
class CaProcess:
    child: ChildProcess
    port: int

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"


@contextlib.contextmanager
def ca_service(tmp: Path, ca_dir: Path) -> Iterator[CaProcess]:
    """``meshlet ca serve`` on an ephemeral port; yields once it listens."""
    log_path = tmp / f"ca-{time.monotonic_ns()}.log"
    child = ChildProcess([*MESHLET, "ca", "serve", "--dir", str(ca_dir), "--listen", "127.0.0.1:0"], log_path)
    child.start()
    try:
        deadline = time.monotonic() + START_TIMEOUT
        while True:
            child.check_alive()
            found = re.search(r"listening on 127\.0\.0\.1:(\d+)", child.log())
            if found:
                yield CaProcess(child, int(found.group(1)))
                return
            if time.monotonic() > deadline:
                raise AssertionError(f"CA service did not start:\n{child.log()}")
            time.sleep(0.05)
    finally:
        child.stop()


def init_ca(ca_dir: Path, *extra: str, trust_domain: str = "example.org") -> None:
    result = meshlet("ca", "init", "--dir", str(ca_dir), "--trust-domain", trust_domain, *extra)
    assert result.returncode == 0, result.stderr

