"""``meshlet up`` / ``run`` / ``down`` as functions (the CLI and the demo call them).

    info = mesh_up(MeshState(Path(".meshlet")))          # control plane + ingress gateway
    record = run_workload(state, RunRequest("reviews", ["python", "app.py"], version="v1"))
    mesh_down(state)                                      # every process it started, in order
"""

from __future__ import annotations

import asyncio
import os
import random
import socket
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

import yaml

from meshlet.bench.procs import free_port, port_is_free
from meshlet.control.translate.node import GATEWAY as GATEWAY_KIND
from meshlet.control.translate.node import SIDECAR, node_id
from meshlet.mesh.bootstrap import ads_bootstrap
from meshlet.mesh.client import ControlPlaneError, MeshClient
from meshlet.mesh.plane import CA_DIR_ENV, STATUS_PATH, STATUS_PORT_ENV
from meshlet.mesh.procs import Recorded, finish_stop, request_stop, spawn_detached, stop_recorded
from meshlet.mesh.state import (
    CONTROL_PLANE,
    GATEWAY,
    WORKLOAD_PREFIX,
    MeshInfo,
    MeshState,
    StateError,
    WorkloadRecord,
    inbound_address,
    outbound_address,
)
from meshlet.mesh.workload import app_accepts, sidecar_ready

DEFAULT_API_PORT = 15080
DEFAULT_XDS_PORT = 15010
DEFAULT_LOOPBACK_BLOCK = 10
GATEWAY_NAME = "ingressgateway"
GATEWAY_NAMESPACE = "istio-system"
READY_TIMEOUT = 30.0
POLL = 0.1
APP_PORTS = "meshlet.dev/app-ports"
OUTBOUND_ADDRESS = "meshlet.dev/outbound-address"
MESHLET_GROUP = "meshlet.dev"

Progress = Callable[[str], None]


class MeshError(RuntimeError):
    """The mesh could not be brought up, or a workload could not join it."""


def _quiet(_message: str) -> None:
    pass


def _python_module(module: str, *args: str) -> list[str]:
    return [sys.executable, "-m", module, *args]


def _bindable(host: str, port: int) -> bool:
    with socket.socket() as probe:
        try:
            probe.bind((host, port))
        except OSError:
            return False
    return True


def pick_loopback_block(port: int, preferred: int = DEFAULT_LOOPBACK_BLOCK) -> int:
    """A loopback block whose first workload addresses are free on ``port``: ``preferred``
    when it is, else a random other one (another mesh on this machine holds ``preferred``)."""
    candidates = [preferred, *random.sample(range(100, 255), 155)]
    for block in candidates:
        if _bindable(inbound_address(block, 1), port) and _bindable(outbound_address(block, 1), port):
            return block
    raise MeshError(f"no loopback block has {port} free")


def _port_or_free(preferred: int | None, default: int) -> int:
    if preferred is not None:
        return preferred
    return default if port_is_free(default) else free_port()


def _wait(check: Callable[[], bool], what: str, process: Recorded, timeout: float = READY_TIMEOUT) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not process.alive():
            raise MeshError(f"{process.name} exited before {what}; see {process.log}{_tail(process.log)}")
        if check():
            return
        time.sleep(POLL)
    raise MeshError(f"{process.name}: {what} did not happen within {timeout:.0f} s; see {process.log}")


def _tail(log: str, lines: int = 3) -> str:
    try:
        text = Path(log).read_text(errors="replace").strip().splitlines()[-lines:]
    except OSError:
        return ""
    return ": " + " | ".join(text) if text else ""


# -- up ---------------------------------------------------------------------------------------- #


@dataclass(frozen=True, slots=True)
class UpOptions:
    store_url: str | None = None
    api_port: int | None = None
    xds_port: int | None = None
    loopback_block: int = DEFAULT_LOOPBACK_BLOCK
    trust_domain: str = "cluster.local"
    gateway: bool = True
    # End the mesh's processes when this process dies (the demo).
    tied: bool = False


def ensure_ca(state: MeshState, trust_domain: str) -> None:
    from meshlet.identity.cadir import CaDirectory, init_root_ca

    if not CaDirectory(state.ca_dir).exists:
        asyncio.run(init_root_ca(state.ca_dir, trust_domain))


def mesh_up(state: MeshState, options: UpOptions = UpOptions(), progress: Progress = _quiet) -> MeshInfo:
    """Start the control plane (and the ingress gateway); returns where they listen.

    In a state directory whose mesh is still running but whose control plane ended,
    it starts the control plane again where it was (same ports, same store): the
    proxies served their last config meanwhile and reconnect to it."""
    running = state.recorded(CONTROL_PLANE)
    if running is not None and running.alive():
        raise MeshError(f"a mesh is already up in {state.root} (meshlet down --dir {state.root} first)")
    if any(r.alive() for r in state.all_recorded()):
        return _restart_control_plane(state, options, progress)
    if not 1 <= options.loopback_block <= 254:
        raise MeshError(f"loopback block {options.loopback_block} is not in 1..254")
    state.root.mkdir(parents=True, exist_ok=True)
    ensure_ca(state, options.trust_domain)
    store_url = options.store_url or state.default_store_url
    api_port = _port_or_free(options.api_port, DEFAULT_API_PORT)
    xds_port = _port_or_free(options.xds_port, DEFAULT_XDS_PORT)
    info = MeshInfo(api_url=f"http://127.0.0.1:{api_port}", xds_address=f"127.0.0.1:{xds_port}",
                    status_url=f"http://127.0.0.1:{free_port()}{STATUS_PATH}", store_url=store_url,
                    loopback_block=options.loopback_block,
                    gateway_node=node_id(GATEWAY_KIND, "127.0.0.1", GATEWAY_NAME, GATEWAY_NAMESPACE),
                    gateway_admin_port=free_port(), trust_domain=options.trust_domain)
    try:
        start_control_plane(state, info, options.tied, progress)
        state.write_info(info)
        if options.gateway:
            gateway = start_gateway(state, info, tied=options.tied)
            _wait(lambda: sidecar_ready(info.gateway_admin_port), "the gateway got its config", gateway)
            progress(f"ingress gateway: node {info.gateway_node}, "
                     f"admin http://127.0.0.1:{info.gateway_admin_port}/ (pid {gateway.pid})")
    except BaseException:
        mesh_down(state)
        raise
    return info


def start_control_plane(state: MeshState, info: MeshInfo, tied: bool, progress: Progress) -> Recorded:
    """The control plane of ``info`` (its ports, store, the mesh CA), answering when this returns."""
    status_port = info.status_url.rpartition(":")[2].partition("/")[0]
    env = {**os.environ, CA_DIR_ENV: str(state.ca_dir), STATUS_PORT_ENV: status_port}
    argv = _python_module("meshlet.mesh.controlplane", "--store", info.store_url, "--api-port",
                          info.api_url.rpartition(":")[2], "--xds-port", str(info.xds_port))
    plane = spawn_detached(CONTROL_PLANE, argv, pid_file=state.pid_file(CONTROL_PLANE),
                           log_file=state.log_file(CONTROL_PLANE), env=env, tied=tied)
    client = MeshClient(info.api_url, info.status_url, timeout=2.0)
    _wait(lambda: _answers(client), "the control plane answered", plane)
    progress(f"control plane: api {info.api_url}, xDS {info.xds_address}, store {info.store_url} "
             f"(pid {plane.pid})")
    return plane


def _restart_control_plane(state: MeshState, options: UpOptions, progress: Progress) -> MeshInfo:
    info = state.info()
    progress("the control plane had ended; the proxies kept their config: starting it again")
    start_control_plane(state, info, options.tied, progress)
    gateway = state.recorded(GATEWAY)
    if options.gateway and (gateway is None or not gateway.alive()):
        gateway = start_gateway(state, info, tied=options.tied)
        _wait(lambda: sidecar_ready(info.gateway_admin_port), "the gateway got its config", gateway)
        progress(f"ingress gateway started again (pid {gateway.pid})")
    return info


def _answers(client: MeshClient) -> bool:
    try:
        client.healthz()
        client.sync_status()
    except ControlPlaneError:
        return False
    return True


def start_gateway(state: MeshState, info: MeshInfo, *, tied: bool = False) -> Recorded:
    config = state.proxy_config(GATEWAY)
    config.parent.mkdir(parents=True, exist_ok=True)
    bootstrap = ads_bootstrap(info.gateway_node, GATEWAY_NAME, info.xds_address, info.gateway_admin_port)
    config.write_text(yaml.safe_dump(bootstrap, sort_keys=False))
    argv = _python_module("meshlet.cli.main", "proxy", "--config", str(config), "--log-level", "warning")
    return spawn_detached(GATEWAY, argv, pid_file=state.pid_file(GATEWAY), log_file=state.log_file(GATEWAY),
                          tied=tied)


# -- down ------------------------------------------------------------------------------------------ #


def mesh_down(state: MeshState, progress: Progress = _quiet) -> list[tuple[str, str]]:
    """Stop workloads (they deregister), then the gateway, then the control plane."""
    outcomes: list[tuple[str, str]] = []
    recorded = state.all_recorded()
    workloads = [r for r in recorded if r.name.startswith(WORKLOAD_PREFIX)]
    # Workloads stop together (each deregisters and stops its app and sidecar), then
    # the rest one by one: the gateway, the control plane last.
    for process in workloads:
        request_stop(process)
    rest = ([r for r in recorded if r.name == GATEWAY] + [r for r in recorded if r.name == CONTROL_PLANE]
            + [r for r in recorded if r.name not in (GATEWAY, CONTROL_PLANE) and r not in workloads])
    for process in [*workloads, *rest]:
        outcome = finish_stop(process) if process in workloads else stop_recorded(process)
        state.forget(process.name)
        outcomes.append((process.name, outcome))
        progress(f"{process.name} (pid {process.pid}): {outcome}")
    for workload in state.workloads():
        state.drop_workload(workload.name)
    state.clear_info()
    return outcomes


# -- run ---------------------------------------------------------------------------------------------- #


@dataclass(frozen=True, slots=True)
class RunRequest:
    service: str
    command: list[str]
    version: str | None = None
    app_port: int | None = None
    namespace: str = "default"
    service_account: str | None = None
    extra_env: dict[str, str] = field(default_factory=dict)
    ready_timeout: float = READY_TIMEOUT
    tied: bool = False


def service_env(services: list[dict[str, object]], namespace: str, outbound: str) -> dict[str, str]:
    """Kubernetes-style ``<NAME>_SERVICE_HOST`` / ``_PORT`` for every service of the namespace,
    pointing at this workload's outbound listeners."""
    env: dict[str, str] = {}
    for service in services:
        meta = service.get("metadata")
        spec = service.get("spec")
        if not isinstance(meta, dict) or not isinstance(spec, dict) or meta.get("namespace") != namespace:
            continue
        ports = spec.get("ports")
        if not isinstance(ports, list) or not ports:
            continue
        prefix = str(meta["name"]).upper().replace("-", "_")
        env[f"{prefix}_SERVICE_HOST"] = outbound
        env[f"{prefix}_SERVICE_PORT"] = str(ports[0]["number"])
    return env


def run_workload(state: MeshState, request: RunRequest, progress: Progress = _quiet) -> WorkloadRecord:
    """Register a workload of ``request.service``, start its supervisor (sidecar + app), and
    wait until the sidecar has its config, the app accepts connections and the registry
    has the workload HEALTHY."""
    info = state.info()
    plane = state.recorded(CONTROL_PLANE)
    if plane is None or not plane.alive():
        raise MeshError(f"the control plane of {state.root} is not running (meshlet up)")
    client = MeshClient(info.api_url, info.status_url)
    ports = _service_ports(client, request)
    name = state.unique_workload_name(f"{request.service}-{request.version}" if request.version
                                      else request.service)
    index = state.free_index()
    outbound = outbound_address(info.loopback_block, index)
    record = WorkloadRecord(
        name=name, service=request.service, namespace=request.namespace, version=request.version,
        index=index, inbound_address=inbound_address(info.loopback_block, index), outbound_address=outbound,
        app_port=request.app_port or free_port(), admin_port=free_port(),
        node_id=node_id(SIDECAR, inbound_address(info.loopback_block, index), name, request.namespace),
        command=list(request.command), service_account=request.service_account or request.service)
    _register(client, record, ports)
    try:
        record = replace(record, env=_app_env(client, record, request.extra_env))
        state.save_workload(record)
        config = state.proxy_config(name)
        config.parent.mkdir(parents=True, exist_ok=True)
        config.write_text(yaml.safe_dump(ads_bootstrap(record.node_id, record.service, info.xds_address,
                                                       record.admin_port), sort_keys=False))
        supervisor = spawn_detached(WORKLOAD_PREFIX + name,
                                    _python_module("meshlet.mesh.workload", "--dir", str(state.root),
                                                   "--name", name),
                                    pid_file=state.pid_file(WORKLOAD_PREFIX + name),
                                    log_file=state.log_file(WORKLOAD_PREFIX + name), tied=request.tied)
    except BaseException:
        # No supervisor to deregister it: do it here, so the registry holds no ghost.
        client.deregister(record.namespace, name, record.node_id)
        state.drop_workload(name)
        raise
    try:
        _wait_serving(client, record, supervisor, request.ready_timeout)
    except (MeshError, KeyboardInterrupt):
        stop_workload(state, name)
        raise
    progress(f"{name}: sidecar inbound {record.inbound_address}, outbound {outbound}, "
             f"app 127.0.0.1:{record.app_port}, admin http://127.0.0.1:{record.admin_port}/ "
             f"(pid {supervisor.pid})")
    return record


def _service_ports(client: MeshClient, request: RunRequest) -> dict[str, int]:
    service = client.get(MESHLET_GROUP, "services", request.namespace, request.service)
    if service is None:
        raise MeshError(f"service {request.namespace}/{request.service} is not defined: apply a "
                        "meshlet.dev/v1 Service first (e.g. meshlet apply -f "
                        "examples/bookinfo/services.yaml)")
    return {str(p["name"]): int(p["number"]) for p in service["spec"]["ports"]}


def _register(client: MeshClient, record: WorkloadRecord, ports: dict[str, int]) -> None:
    """Register with a fresh token, then annotate where the app and the outbound listeners are."""
    token = client.issue_token(record.namespace, record.service_account)
    workload = client.register(token, name=record.name, service=record.service,
                               address=record.inbound_address, ports=ports, version=record.version,
                               proxy_id=record.node_id)
    try:
        annotations = dict(workload["metadata"].get("annotations") or {})
        annotations[APP_PORTS] = ",".join(f"{port}={record.app_port}" for port in ports)
        annotations[OUTBOUND_ADDRESS] = record.outbound_address
        workload["metadata"]["annotations"] = annotations
        client.put(MESHLET_GROUP, "workloads", workload)
    except BaseException:
        client.deregister(record.namespace, record.name, record.node_id)
        raise


def _app_env(client: MeshClient, record: WorkloadRecord, extra: dict[str, str]) -> dict[str, str]:
    return {"PORT": str(record.app_port), "MESHLET_SERVICE": record.service,
            "MESHLET_VERSION": record.version or "", "MESHLET_WORKLOAD": record.name,
            "MESHLET_NAMESPACE": record.namespace, "MESHLET_OUTBOUND_ADDRESS": record.outbound_address,
            **service_env(client.list(MESHLET_GROUP, "services"), record.namespace, record.outbound_address),
            **extra}


def _wait_serving(client: MeshClient, record: WorkloadRecord, supervisor: Recorded, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    _wait(lambda: sidecar_ready(record.admin_port) and app_accepts(record.app_port),
          "the sidecar got its config and the app accepted connections", supervisor, timeout)
    # Other proxies send it traffic once the registry (hence EDS) says it is healthy.
    _wait(lambda: _health(client, record.namespace, record.name) == "HEALTHY",
          "the workload was reported HEALTHY", supervisor, max(1.0, deadline - time.monotonic()))


def _health(client: MeshClient, namespace: str, name: str) -> str | None:
    workload = client.get(MESHLET_GROUP, "workloads", namespace, name)
    status = workload.get("status") if workload is not None else None
    return str(status.get("health")) if isinstance(status, dict) else None


def stop_workload(state: MeshState, name: str) -> str:
    """Stop one workload's supervisor (it deregisters) and forget it."""
    process = state.recorded(WORKLOAD_PREFIX + name)
    outcome = stop_recorded(process) if process is not None else "not running"
    state.forget(WORKLOAD_PREFIX + name)
    state.drop_workload(name)
    return outcome


__all__ = ["MeshError", "RunRequest", "StateError", "UpOptions", "mesh_down", "mesh_up", "run_workload",
           "stop_workload"]
