"""A real etcd v3 cluster on loopback for tests: N members, ephemeral ports,
bounded start-up, every member killed on stop."""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

START_TIMEOUT = 20.0


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class Member:
    name: str
    client_port: int
    peer_port: int
    process: subprocess.Popen[bytes] | None = None
    log: Path | None = None

    @property
    def client_url(self) -> str:
        return f"http://127.0.0.1:{self.client_port}"

    @property
    def peer_url(self) -> str:
        return f"http://127.0.0.1:{self.peer_port}"


@dataclass
class EtcdCluster:
    workdir: Path
    size: int = 3
    members: list[Member] = field(default_factory=list)

    @property
    def endpoints(self) -> list[str]:
        return [m.client_url for m in self.members]

    def start(self) -> None:
        if shutil.which("etcd") is None:
            raise RuntimeError("etcd is not installed")
        self.members = [Member(f"m{i + 1}", free_port(), free_port()) for i in range(self.size)]
        initial = ",".join(f"{m.name}={m.peer_url}" for m in self.members)
        for member in self.members:
            member.log = self.workdir / f"{member.name}.log"
            command = [
                "etcd", "--name", member.name, "--data-dir", str(self.workdir / member.name),
                "--listen-client-urls", member.client_url, "--advertise-client-urls", member.client_url,
                "--listen-peer-urls", member.peer_url, "--initial-advertise-peer-urls", member.peer_url,
                "--initial-cluster", initial, "--initial-cluster-state", "new",
                "--initial-cluster-token", f"meshlet-test-{self.members[0].client_port}",
                # Fast elections so losing the leader costs well under a second.
                "--heartbeat-interval", "50", "--election-timeout", "500",
            ]
            with member.log.open("wb") as log:
                member.process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
        self.wait_healthy(self.members)

    def wait_healthy(self, members: list[Member]) -> None:
        deadline = time.monotonic() + START_TIMEOUT
        for member in members:
            while True:
                if member.process is not None and member.process.poll() is not None:
                    raise RuntimeError(f"etcd {member.name} exited: {self.log_tail(member)}")
                try:
                    response = httpx.get(f"{member.client_url}/health", timeout=1.0)
                    if response.status_code == 200 and response.json().get("health") == "true":
                        break
                except httpx.HTTPError:
                    pass
                if time.monotonic() > deadline:
                    raise RuntimeError(f"etcd {member.name} not healthy in {START_TIMEOUT}s: "
                                       f"{self.log_tail(member)}")
                time.sleep(0.1)

    def kill(self, member: Member) -> None:
        if member.process is not None and member.process.poll() is None:
            member.process.kill()
            member.process.wait(timeout=10)

    def stop(self) -> None:
        for member in self.members:
            self.kill(member)

    def log_tail(self, member: Member) -> str:
        if member.log is None or not member.log.exists():
            return ""
        return member.log.read_text(errors="replace")[-2000:]
