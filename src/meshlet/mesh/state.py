"""The mesh's state directory (``.meshlet`` by default)::

    mesh.json              where the control plane and gateway listen, the loopback block
    pids/<name>.pid        every detached process (control-plane, gateway, workload-<name>)
    logs/<name>.log        their output
    ca/                    the mesh CA (``meshlet ca init``'s layout)
    proxies/<name>.yaml    proxy bootstraps
    workloads/<name>.json  one record per ``meshlet run``
    meshlet.db             the SQLite store (unless --store says otherwise)

Each workload takes two loopback addresses from the mesh's block
``127.<B>.0.0/16``: ``127.<B>.1.<n>`` for its sidecar's inbound ports and
``127.<B>.2.<n>`` for its outbound listeners, so sidecars on one machine never
collide on a port.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from meshlet.mesh.procs import ProcessError, Recorded, read_pid_file

MESH_FILE = "mesh.json"
DEFAULT_STATE_DIR = ".meshlet"
CONTROL_PLANE = "control-plane"
GATEWAY = "gateway"
WORKLOAD_PREFIX = "workload-"
MAX_WORKLOADS = 250


class StateError(RuntimeError):
    """The state directory is missing, unreadable, or full."""


@dataclass(frozen=True, slots=True)
class MeshInfo:
    """What ``meshlet up`` started, for the commands that follow."""

    api_url: str
    xds_address: str
    status_url: str
    store_url: str
    loopback_block: int
    gateway_node: str
    gateway_admin_port: int
    trust_domain: str = "cluster.local"

    @property
    def xds_port(self) -> int:
        return int(self.xds_address.rpartition(":")[2])


@dataclass(frozen=True, slots=True)
class WorkloadRecord:
    """One ``meshlet run``: who it is and where its parts listen."""

    name: str
    service: str
    namespace: str
    version: str | None
    index: int
    inbound_address: str
    outbound_address: str
    app_port: int
    admin_port: int
    node_id: str
    command: list[str] = field(default_factory=list)
    # What the application is told: its port, its outbound address, the services' ports.
    env: dict[str, str] = field(default_factory=dict)
    service_account: str = "default"

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> WorkloadRecord:
        return cls(**data)


class MeshState:
    def __init__(self, root: Path) -> None:
        self.root = root.resolve()

    # -- paths ---------------------------------------------------------------------------- #

    def pid_file(self, name: str) -> Path:
        return self.root / "pids" / f"{name}.pid"

    def log_file(self, name: str) -> Path:
        return self.root / "logs" / f"{name}.log"

    def proxy_config(self, name: str) -> Path:
        return self.root / "proxies" / f"{name}.yaml"

    def workload_file(self, name: str) -> Path:
        return self.root / "workloads" / f"{name}.json"

    @property
    def ca_dir(self) -> Path:
        return self.root / "ca"

    @property
    def default_store_url(self) -> str:
        return f"sqlite:{self.root / 'meshlet.db'}"

    # -- mesh.json ---------------------------------------------------------------------------- #

    def write_info(self, info: MeshInfo) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        _write_json(self.root / MESH_FILE, asdict(info))

    def info(self) -> MeshInfo:
        path = self.root / MESH_FILE
        try:
            data = json.loads(path.read_text())
            return MeshInfo(**data)
        except FileNotFoundError:
            raise StateError(f"no mesh is up in {self.root} (run: meshlet up --dir {self.root})") from None
        except (OSError, ValueError, TypeError) as exc:
            raise StateError(f"{path}: unreadable ({exc})") from None

    def clear_info(self) -> None:
        (self.root / MESH_FILE).unlink(missing_ok=True)

    # -- processes ---------------------------------------------------------------------------- #

    def recorded(self, name: str) -> Recorded | None:
        try:
            return read_pid_file(self.pid_file(name))
        except ProcessError as exc:
            raise StateError(str(exc)) from None

    def all_recorded(self) -> list[Recorded]:
        found = []
        for path in sorted((self.root / "pids").glob("*.pid")):
            recorded = self.recorded(path.stem)
            if recorded is not None:
                found.append(recorded)
        return found

    def forget(self, name: str) -> None:
        self.pid_file(name).unlink(missing_ok=True)

    # -- workloads ------------------------------------------------------------------------------ #

    def workloads(self) -> list[WorkloadRecord]:
        records = []
        for path in sorted((self.root / "workloads").glob("*.json")):
            try:
                records.append(WorkloadRecord.from_json(json.loads(path.read_text())))
            except (OSError, ValueError, TypeError) as exc:
                raise StateError(f"{path}: unreadable ({exc})") from None
        return records

    def workload(self, name: str) -> WorkloadRecord:
        path = self.workload_file(name)
        try:
            return WorkloadRecord.from_json(json.loads(path.read_text()))
        except FileNotFoundError:
            raise StateError(f"no workload {name!r} in {self.root}") from None
        except (OSError, ValueError, TypeError) as exc:
            raise StateError(f"{path}: unreadable ({exc})") from None

    def save_workload(self, record: WorkloadRecord) -> None:
        path = self.workload_file(record.name)
        path.parent.mkdir(parents=True, exist_ok=True)
        _write_json(path, record.to_json())

    def drop_workload(self, name: str) -> None:
        self.workload_file(name).unlink(missing_ok=True)

    def free_index(self) -> int:
        """The lowest workload index no recorded workload holds (1..250)."""
        taken = {w.index for w in self.workloads()}
        for index in range(1, MAX_WORKLOADS + 1):
            if index not in taken:
                return index
        raise StateError(f"this mesh already runs {MAX_WORKLOADS} workloads")

    def unique_workload_name(self, base: str) -> str:
        names = {w.name for w in self.workloads()}
        if base not in names:
            return base
        n = 2
        while f"{base}-{n}" in names:
            n += 1
        return f"{base}-{n}"


def inbound_address(block: int, index: int) -> str:
    return f"127.{block}.1.{index}"


def outbound_address(block: int, index: int) -> str:
    return f"127.{block}.2.{index}"


def _write_json(path: Path, data: object) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    tmp.replace(path)
