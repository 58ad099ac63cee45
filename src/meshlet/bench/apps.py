"""The sample apps under ``examples/`` that demos and benchmarks run as upstreams.

The apps live outside the package on purpose (they are independent peers, not
meshlet code), so they are found from the source tree: ``$MESHLET_EXAMPLES``
when set, else ``examples/`` next to ``src/`` (a clone, installed editable).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import meshlet
from meshlet.bench.procs import LOOPBACK, Child, ChildError

START_TIMEOUT = 10.0


def examples_dir() -> Path:
    override = os.environ.get("MESHLET_EXAMPLES")
    if override:
        return Path(override)
    return Path(meshlet.__file__).resolve().parents[2] / "examples"


def example_path(relative: str) -> Path:
    path = examples_dir() / relative
    if not path.exists():
        raise ChildError(
            f"{relative} not found under {examples_dir()} "
            "(run from a meshlet source tree or set MESHLET_EXAMPLES)"
        )
    return path


def start_upstream(port: int = 0, *, cpus: set[int] | None = None, name: str = "",
                   host: str = LOOPBACK) -> tuple[Child, int]:
    """Start ``examples/apps/upstream.py``; returns the child and the port it bound."""
    argv = [sys.executable, str(example_path("apps/upstream.py")), "--host", host, "--port", str(port)]
    if name:
        argv += ["--name", name]
    child = Child("sample upstream", argv, cpus=cpus, capture_stdout=True).start()
    try:
        found = child.read_stdout_line(r"listening on http://\S+:(\d+)", START_TIMEOUT)
    except BaseException:
        child.stop()
        raise
    return child, int(found.group(1))
