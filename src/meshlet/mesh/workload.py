"""One workload's supervisor: its sidecar and its application, side by side.

``meshlet run`` registers the workload and starts this process detached::

    python -m meshlet.mesh.workload --dir STATE_DIR --name WORKLOAD

It starts the sidecar (``meshlet proxy`` on the workload's ADS bootstrap) and
the application (with the environment ``meshlet run`` prepared), and reports
the workload's health to the registry whenever it changes: HEALTHY while the
sidecar is ready and the application accepts connections. When either process
ends, or on SIGTERM (``meshlet down``), it deregisters the workload and stops
both (they also die with it: no orphan keeps a port).
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import socket
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from types import FrameType

from meshlet.bench.admin import admin_get
from meshlet.bench.procs import Child, ChildError
from meshlet.mesh.client import ControlPlaneError, MeshClient
from meshlet.mesh.state import MeshState, WorkloadRecord

log = logging.getLogger("meshlet.mesh.workload")

CHECK_PERIOD = 1.0
# A steady health is re-sent this often: it is the heartbeat that keeps the
# control plane's silence sweep from judging the workload dead.
HEARTBEAT_PERIOD = 5.0
PROBE_TIMEOUT = 1.0
STOP_GRACE = 5.0


def app_accepts(port: int, host: str = "127.0.0.1") -> bool:
    try:
        with socket.create_connection((host, port), timeout=PROBE_TIMEOUT):
            return True
    except OSError:
        return False


def sidecar_ready(admin_port: int) -> bool:
    status, _ = admin_get(admin_port, "/ready", PROBE_TIMEOUT)
    return status == 200


def sidecar_argv(state: MeshState, record: WorkloadRecord) -> list[str]:
    return [sys.executable, "-m", "meshlet.cli.main", "proxy", "--config",
            str(state.proxy_config(record.name)), "--log-level", "warning"]


class Supervisor:
    def __init__(self, state: MeshState, record: WorkloadRecord, client: MeshClient) -> None:
        self.state = state
        self.record = record
        self.client = client
        self.stopping = threading.Event()
        self.sidecar: Child | None = None
        self.app: Child | None = None
        self.reported: str | None = None
        self.reported_at = 0.0  # monotonic time of the last accepted report

    def run(self) -> int:
        try:
            self.sidecar = Child("sidecar", sidecar_argv(self.state, self.record),
                                 log_path=self.state.log_file(f"{self.record.name}-sidecar")).start()
            env = {**os.environ, **self.record.env}
            self.app = Child("app", self.record.command, env=env,
                             log_path=self.state.log_file(f"{self.record.name}-app")).start()
        except ChildError as exc:
            log.error("%s", exc)
            self._shutdown()
            return 1
        code = self._watch()
        self._shutdown()
        return code

    def _watch(self) -> int:
        assert self.sidecar is not None and self.app is not None
        while not self.stopping.wait(CHECK_PERIOD):
            for child in (self.app, self.sidecar):
                if child.proc is not None and child.proc.poll() is not None:
                    log.warning("%s of %s exited with %s", child.name, self.record.name,
                                child.proc.returncode)
                    return 1
            healthy = sidecar_ready(self.record.admin_port) and app_accepts(self.record.app_port)
            self._report("HEALTHY" if healthy else "UNHEALTHY",
                         None if healthy else "sidecar not ready or app not accepting connections")
        return 0

    def _report(self, health: str, reason: str | None) -> None:
        now = time.monotonic()
        if health == self.reported and now - self.reported_at < HEARTBEAT_PERIOD:
            return
        try:
            self.client.report_health(self.record.namespace, self.record.name, health, reason)
            self.reported = health
            self.reported_at = now
        except ControlPlaneError as exc:
            # The control plane may be restarting; the next check reports again.
            log.warning("health report failed: %s", exc)

    def _shutdown(self) -> None:
        try:
            self.client.deregister(self.record.namespace, self.record.name, self.record.node_id)
        except ControlPlaneError as exc:
            log.warning("deregistering %s failed: %s", self.record.name, exc)
        for child in (self.app, self.sidecar):
            if child is not None:
                child.stop(STOP_GRACE)

    def request_stop(self, _signum: int, _frame: FrameType | None) -> None:
        self.stopping.set()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m meshlet.mesh.workload")
    parser.add_argument("--dir", required=True)
    parser.add_argument("--name", required=True)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    state = MeshState(Path(args.dir))
    info = state.info()
    supervisor = Supervisor(state, state.workload(args.name), MeshClient(info.api_url))
    signal.signal(signal.SIGTERM, supervisor.request_stop)
    signal.signal(signal.SIGINT, supervisor.request_stop)
    return supervisor.run()


if __name__ == "__main__":
    sys.exit(main())
