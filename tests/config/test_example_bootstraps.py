"""Every sample bootstrap in examples/ compiles: the samples are documentation that must not rot."""

from __future__ import annotations

from pathlib import Path

import pytest

from meshlet.config.compiler import load_proxy_config

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
BOOTSTRAPS = sorted(p for p in EXAMPLES.rglob("*.yaml") if "static_resources:" in p.read_text())


def test_there_are_sample_bootstraps() -> None:
    assert EXAMPLES / "proxy" / "front-proxy.yaml" in BOOTSTRAPS


@pytest.mark.parametrize("path", BOOTSTRAPS, ids=lambda p: str(p.relative_to(EXAMPLES)))
def test_sample_bootstrap_compiles(path: Path) -> None:
    config = load_proxy_config(str(path))
    assert config.listeners
    assert config.source["listeners"]
