"""``meshlet status``: what runs, what the control plane holds, and whether each proxy
has ACKed its config (from the xDS cache's per-node status), with the translator's
notes per proxy (NACKs, unknown hosts, policies stored but not enforced)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from meshlet.control.translate.node import ProxyNode
from meshlet.mesh.client import ControlPlaneError, MeshClient
from meshlet.mesh.state import MeshInfo, MeshState

MESHLET_GROUP = "meshlet.dev"
SHORT_TYPES = ("lds", "rds", "cds", "eds", "sds")


@dataclass
class StatusReport:
    state_dir: str
    info: MeshInfo | None
    processes: list[dict[str, Any]] = field(default_factory=list)
    services: list[dict[str, Any]] = field(default_factory=list)
    workloads: list[dict[str, Any]] = field(default_factory=list)
    proxies: list[dict[str, Any]] = field(default_factory=list)
    revision: int | None = None
    error: str | None = None

    def synced(self) -> bool:
        """Every connected proxy ACKed the config the control plane holds for it."""
        connected = [p for p in self.proxies if p["connected"]]
        return self.error is None and all(p["synced"] and p["current"] for p in connected)

    def as_dict(self) -> dict[str, Any]:
        return {"stateDir": self.state_dir, "controlPlane": None if self.info is None else {
            "api": self.info.api_url, "xds": self.info.xds_address, "store": self.info.store_url},
            "revision": self.revision, "synced": self.synced(), "error": self.error,
            "processes": self.processes, "services": self.services, "workloads": self.workloads,
            "proxies": self.proxies}


def collect(state_dir: Path) -> StatusReport:
    state = MeshState(state_dir)
    report = StatusReport(str(state.root), None)
    report.processes = [{"name": r.name, "pid": r.pid, "running": r.alive(), "log": r.log}
                        for r in state.all_recorded()]
    report.info = state.info()
    client = MeshClient(report.info.api_url, report.info.status_url, timeout=5.0)
    try:
        report.services = [_service_row(s) for s in client.list(MESHLET_GROUP, "services")]
        report.workloads = [_workload_row(w) for w in client.list(MESHLET_GROUP, "workloads")]
        sync = client.sync_status()
    except ControlPlaneError as exc:
        report.error = str(exc)
        return report
    report.revision = int(sync.get("revision", 0))
    report.proxies = [_proxy_row(node) for node in sync.get("nodes", [])]
    return report


def _service_row(service: dict[str, Any]) -> dict[str, Any]:
    meta, spec = service["metadata"], service["spec"]
    ports = ", ".join(f"{p['name']}:{p['number']}/{p.get('protocol', 'HTTP')}" for p in spec.get("ports", []))
    return {"name": meta["name"], "namespace": meta.get("namespace", "default"), "ports": ports}


def _workload_row(workload: dict[str, Any]) -> dict[str, Any]:
    meta, spec = workload["metadata"], workload["spec"]
    labels = spec.get("labels", {})
    status = workload.get("status") or {}
    return {"name": meta["name"], "namespace": meta.get("namespace", "default"), "service": labels.get("app"),
            "version": labels.get("version"), "address": spec.get("address"), "ports": spec.get("ports", {}),
            "health": status.get("health", "UNKNOWN"), "reason": status.get("reason"),
            "proxy": spec.get("proxyId")}


def _proxy_row(node: dict[str, Any]) -> dict[str, Any]:
    types = node.get("types", {})
    nacks = {t: v["last_nack"] for t, v in types.items() if v.get("last_nack")}
    return {"node": node["node_id"], "connected": node["connected"], "synced": node["synced"],
            "current": bool(node.get("current")),
            "acked": {t: types[t]["acked_version"] for t in SHORT_TYPES if t in types},
            "nacks": nacks, "notes": node.get("notes", [])}


# -- the terminal view -------------------------------------------------------------------------------- #


WIDE_OUTPUT = 160


def render(report: StatusReport, console: Console | None = None) -> None:
    out = console or Console()
    if console is None and not out.is_terminal:
        out = Console(width=WIDE_OUTPUT)  # piped: don't squeeze the tables into 80 columns
    if report.info is not None:
        out.print(f"control plane: api {report.info.api_url}, xDS {report.info.xds_address}, "
                  f"store {report.info.store_url}, config revision {report.revision}")
    processes = Table("process", "pid", "state", "log", title="processes")
    for p in report.processes:
        running = "running" if p["running"] else "[red]not running[/]"
        processes.add_row(p["name"], str(p["pid"]), running, p["log"])
    out.print(processes)
    if report.error:
        out.print(f"[red]control plane unreachable:[/] {report.error}")
        return
    services = Table("service", "namespace", "ports", "workloads", title="services")
    for s in report.services:
        count = sum(1 for w in report.workloads
                    if w["service"] == s["name"] and w["namespace"] == s["namespace"])
        services.add_row(s["name"], s["namespace"], s["ports"], str(count))
    out.print(services)
    workloads = Table("workload", "service", "version", "address", "health", title="workloads")
    for w in report.workloads:
        health = w["health"] + (f" ({w['reason']})" if w["reason"] else "")
        workloads.add_row(f"{w['namespace']}/{w['name']}", w["service"] or "", w["version"] or "",
                          w["address"] or "", health)
    out.print(workloads)
    out.print(_proxy_table(report))
    for proxy in report.proxies:
        for kind, nack in proxy["nacks"].items():
            out.print(f"[red]NACK[/] {proxy['node']} {kind} version {nack['version']}: {nack['error']}")
        for note in proxy["notes"]:
            if note["level"] != "info":
                where = f"{note['resource']}: " if note["resource"] else ""
                out.print(f"{note['level']}: {proxy['node']}: {where}{note['message']}")


def _proxy_table(report: StatusReport) -> Table:
    table = Table("proxy", "connected", "synced", *SHORT_TYPES, title="proxies (ACKed versions)")
    for p in report.proxies:
        node = ProxyNode.parse(p["node"])
        name = f"{'gateway' if node.is_gateway else 'sidecar'} {node.name}.{node.namespace}"
        synced = "yes" if p["synced"] and p["current"] else "[yellow]no[/]"
        if p["nacks"]:
            synced = "[red]NACK[/]"
        table.add_row(name, "yes" if p["connected"] else "no", synced,
                      *(str(p["acked"].get(t, ""))[:10] for t in SHORT_TYPES))
    return table
