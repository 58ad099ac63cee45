"""Fixtures for end-to-end tests: the sample upstream, and meshlet proxies that always stop."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from interop_helpers import MeshletProcess, StartMeshlet

from meshlet.bench.apps import start_upstream


@pytest.fixture(scope="module")
def upstream_port() -> Iterator[int]:
    """The sample upstream app (examples/apps/upstream.py) on an ephemeral loopback port."""
    child, port = start_upstream()
    try:
        yield port
    finally:
        child.stop()


@pytest.fixture
def start_meshlet(tmp_path: Path) -> Iterator[StartMeshlet]:
    """``start_meshlet(config, *extra_cli_args)``: a running proxy, stopped after the test."""
    started: list[MeshletProcess] = []

    def start(config: dict[str, Any], *extra_args: str) -> MeshletProcess:
        workdir = tmp_path / f"meshlet{len(started)}"
        workdir.mkdir()
        process = MeshletProcess(workdir, config, list(extra_args))
        started.append(process)
        return process.start()

    try:
        yield start
    finally:
        for process in started:
            process.stop()
