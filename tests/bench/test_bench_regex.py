"""``meshlet bench regex``: the workload does what it claims, and ``--quick --json``
prints one JSON object with a row per (engine, routes)."""

from __future__ import annotations

import json
import random
import shutil
import subprocess
import sys
from typing import Any

import pytest

from meshlet.bench.regex import (
    GROUPS,
    QUICK,
    PathMix,
    Row,
    WorkloadError,
    add_speedups,
    build_table,
    check_selection,
    measure_matching,
    path_mix,
    wrk_script,
)
from meshlet.proxy.http.stream import RequestHead
from meshlet.proxy.routing import RouteTable

ENGINES = ("re", "re2", "hyperscan")


def selected_route(table: RouteTable, path: str) -> str:
    found = table.select(RequestHead(method="GET", scheme="http", authority="b", path=path, headers=[]))
    assert found is not None
    return found[1].name


@pytest.mark.parametrize("engine", ENGINES)
def test_paths_hit_early_late_and_no_regex_route(engine: str) -> None:
    if engine != "re":
        pytest.importorskip(engine)
    count = 50
    mix = path_mix(count, 10, random.Random(3))
    table = build_table(count, engine)
    check_selection(table, mix, count)  # raises if a path lands elsewhere than its group says
    selected = {group: [selected_route(table, p) for p in paths] for group, paths in mix.by_group.items()}
    assert all(name in {f"svc{i}" for i in range(5)} for name in selected["early"]), selected
    assert all(name in {f"svc{i}" for i in range(45, 50)} for name in selected["late"]), selected
    assert selected["none"] == ["fallback"] * 10


def test_a_misplaced_path_is_caught() -> None:
    mix = path_mix(20, 2, random.Random(1))
    swapped = PathMix({"early": mix.by_group["none"], "late": mix.by_group["late"],
                       "none": mix.by_group["early"]})
    with pytest.raises(WorkloadError, match="early path"):
        check_selection(build_table(20, "re"), swapped, 20)


def test_interleaved_paths_cycle_through_the_groups() -> None:
    mix = path_mix(10, 3, random.Random(2))
    paths = mix.interleaved
    assert len(paths) == 9
    for i, group in enumerate(GROUPS):
        assert paths[i::3] == mix.by_group[group]


def test_wrk_script_cycles_through_every_path() -> None:
    script = wrk_script(["/a", "/b-1"])
    assert 'local paths = {"/a", "/b-1"}' in script
    assert "i = i % #paths + 1" in script and 'wrk.format("GET", paths[i])' in script


def test_matching_medians_cover_each_group() -> None:
    mix = path_mix(20, 4, random.Random(5))
    medians = measure_matching(build_table(20, "re"), mix, QUICK)
    assert set(medians) == {*GROUPS, "all"}
    assert all(value > 0 for value in medians.values())


def test_speedups_are_relative_to_re_at_the_same_route_count() -> None:
    rows = [
        Row("re", 10, {"match_ns": 1000.0, "proxy_rps": 100.0}),
        Row("hyperscan", 10, {"match_ns": 50.0, "proxy_rps": 150.0}),
        Row("re", 100, {"match_ns": 9000.0, "error": "wrk failed"}),
        Row("re2", 100, {"match_ns": 3000.0, "proxy_rps": 80.0}),
    ]
    add_speedups(rows)
    assert rows[0].values["speedup_vs_re"] == {"match": 1.0, "proxy_rps": 1.0}
    assert rows[1].values["speedup_vs_re"] == {"match": 20.0, "proxy_rps": 1.5}
    assert rows[3].values["speedup_vs_re"] == {"match": 3.0}  # no re throughput to compare with


@pytest.mark.slow
@pytest.mark.timeout(110)
@pytest.mark.skipif(shutil.which("wrk") is None, reason="wrk is not installed")
def test_quick_bench_prints_one_json_object_with_every_row() -> None:
    for module in ("re2", "hyperscan"):
        pytest.importorskip(module)
    argv = [sys.executable, "-m", "meshlet.cli.main", "bench", "regex", "--quick", "--json"]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=100, check=False)
    result = json.loads(done.stdout)
    assert isinstance(result, dict) and list(result) == ["rows"]
    assert "bench:" in done.stderr
    assert done.returncode == 0, done.stderr[-800:]
    rows: list[dict[str, Any]] = result["rows"]
    assert [(row["engine"], row["routes"]) for row in rows] == [
        (engine, count) for count in QUICK.route_counts for engine in ENGINES
    ]
    for row in rows:
        assert "error" not in row, row
        for key in ("match_ns", "match_ns_early", "match_ns_late", "match_ns_none", "proxy_rps"):
            assert isinstance(row[key], float) and row[key] > 0, (key, row)
        assert row["proxy_errors"] == 0, row
        speedup = row["speedup_vs_re"]
        assert set(speedup) == {"match", "proxy_rps", "proxy_cpu"}
        assert row["proxy_cpu_us_per_request"] > 0 and len(row["proxy_rps_rounds"]) == QUICK.rps_rounds
        if row["engine"] == "re":
            assert speedup == {"match": 1.0, "proxy_rps": 1.0, "proxy_cpu": 1.0}
