"""The demo's traffic mix and summaries, and logging set-up from --log-level."""

from __future__ import annotations

import logging
from collections import Counter

import pytest
import uvloop

from meshlet.bench.apps import start_upstream
from meshlet.cli.demo import overall_line, traffic_table
from meshlet.cli.demo_traffic import PROBES, request_plan, send_mix
from meshlet.cli.logs import LEVELS, configure_logging
from meshlet.cli.version import component_versions


def test_request_plan_has_every_kind_and_follows_the_weights() -> None:
    plan = request_plan(1000)
    counts = Counter(probe.label for probe in plan)
    assert set(counts) == {probe.label for probe in PROBES}
    assert counts["ok"] > counts["direct"] > counts["timeout"]
    assert request_plan(1000) == plan  # seeded: every demo sends the same mix
    assert {p.label for p in request_plan(len(PROBES))} == {p.label for p in PROBES}


def test_send_mix_counts_statuses_and_latencies() -> None:
    upstream, port = start_upstream()
    try:
        # Straight at the sample app (no proxy): every path answers 200 except /status/503.
        results = uvloop.run(send_mix("127.0.0.1", port, total=40, concurrency=4, timeout=5.0))
    finally:
        upstream.stop()
    assert sum(len(r.latencies_ms) + r.failures for r in results.values()) == 40
    assert results["upstream 503"].statuses == Counter({503: len(results["upstream 503"].latencies_ms)})
    assert set(results["ok"].statuses) == {200}
    assert results["delayed"].quantile(0.5) >= 20  # /delay/30 (event-loop timers round to 1 ms)
    assert all(r.failures == 0 for r in results.values())
    line = overall_line(results)
    assert line.startswith("status mix 2xx: ") and "5xx: " in line
    assert traffic_table(results).row_count == len(PROBES)


def test_send_mix_reports_failures_when_nothing_listens() -> None:
    upstream, port = start_upstream()
    upstream.stop()
    results = uvloop.run(send_mix("127.0.0.1", port, total=12, concurrency=2, timeout=1.0))
    assert sum(r.failures for r in results.values()) == 12


@pytest.mark.parametrize(("name", "level"), [("trace", logging.DEBUG), ("warn", logging.WARNING),
                                             ("ERROR", logging.ERROR)])
def test_configure_logging(name: str, level: int) -> None:
    root = logging.getLogger()
    saved_level, saved_handlers = root.level, list(root.handlers)
    try:
        assert configure_logging(name) == level
        assert root.level == level and len(root.handlers) == 1
    finally:
        root.handlers[:] = saved_handlers
        root.setLevel(saved_level)
    assert LEVELS["off"] > logging.CRITICAL


def test_component_versions_name_every_component() -> None:
    versions = component_versions()
    assert versions["httptools"] != "not installed" and versions["uvloop"] != "not installed"
