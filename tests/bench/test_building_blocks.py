"""The bench's parts on their own: wrk output, percentiles, configs, /proc readings, open loop."""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

import pytest
import uvloop
import yaml

from meshlet.bench.admin import parse_stats
from meshlet.bench.apps import start_upstream
from meshlet.bench.client import build_request, fetch
from meshlet.bench.configs import single_route_proxy
from meshlet.bench.haproxy import haproxy_config
from meshlet.bench.openloop import run_open_loop
from meshlet.bench.procs import Child, ChildError, cpu_seconds, free_port, memory, port_is_free
from meshlet.bench.proxy import plan_cpus
from meshlet.bench.stats import percentile
from meshlet.bench.wrk import parse_wrk
from meshlet.config.loader import parse_bootstrap_text

WRK_OUTPUT = """\
Running 10s test @ http://127.0.0.1:10000/
  1 threads and 32 connections
  Thread Stats   Avg      Stdev     Max   +/- Stdev
    Latency     1.61ms  310.21us   9.02ms   90.12%
    Req/Sec    19.90k     1.01k   21.23k    71.00%
  Latency Distribution
     50%    1.55ms
     75%    1.66ms
     90%  850.00us
     99%    1.20s
  198000 requests in 10.00s, 224.13MB read
  Socket errors: connect 0, read 2, write 0, timeout 1
  Non-2xx or 3xx responses: 5
Requests/sec:  19799.61
Transfer/sec:     22.41MB
"""


def test_parse_wrk() -> None:
    result = parse_wrk(WRK_OUTPUT)
    assert result.rps == pytest.approx(19799.61)
    assert result.requests == 198000
    assert result.socket_errors == 3 and result.non_2xx == 5
    assert result.latency_ms == {50: 1.55, 75: 1.66, 90: pytest.approx(0.85), 99: 1200.0}


def test_parse_wrk_refuses_garbage() -> None:
    with pytest.raises(ChildError, match="could not read wrk"):
        parse_wrk("unable to connect to 127.0.0.1:1 Connection refused")


def test_percentile_nearest_rank() -> None:
    values = [float(v) for v in range(1, 101)]
    assert percentile(values, 0.5) == 50.0
    assert percentile(values, 0.99) == 99.0
    assert percentile(values, 1.0) == 100.0
    assert percentile(values, 0.0) == 1.0
    assert percentile([], 0.5) == 0.0
    with pytest.raises(ValueError):
        percentile(values, 1.5)


def test_cpu_plan_keeps_the_proxy_alone_on_one_core() -> None:
    plan = plan_cpus([0, 1, 2, 3])
    assert plan.proxy == {0} and plan.load == {1, 2, 3} and not plan.shared
    single = plan_cpus([5])
    assert single.proxy == single.load == {5} and single.shared


def test_bench_config_is_a_valid_envoy_bootstrap() -> None:
    config = single_route_proxy(10000, 18080, 9901)
    bootstrap = parse_bootstrap_text(yaml.safe_dump(config))
    listener = bootstrap.static_resources.listeners[0]
    assert listener.address.socket_address.port_value == 10000
    assert bootstrap.static_resources.clusters[0].name == "upstream"


def test_haproxy_config_is_accepted_by_haproxy(tmp_path: os.PathLike[str]) -> None:
    import shutil
    import subprocess

    binary = shutil.which("haproxy") or "/usr/sbin/haproxy"
    if not os.path.exists(binary):
        pytest.skip("haproxy is not installed")
    path = os.path.join(tmp_path, "haproxy.cfg")
    with open(path, "w") as fh:
        fh.write(haproxy_config(free_port(), free_port()))
    done = subprocess.run([binary, "-c", "-f", path], capture_output=True, text=True, timeout=10, check=False)
    assert done.returncode == 0, done.stdout + done.stderr


def test_parse_stats() -> None:
    text = "cluster.a.upstream_rq_total: 12\nhttp.x.downstream_rq_2xx: 3\nbad line\n"
    assert parse_stats(text) == {"cluster.a.upstream_rq_total": "12", "http.x.downstream_rq_2xx": "3"}


def test_port_helpers() -> None:
    port = free_port()
    assert port_is_free(port)


def test_child_is_measured_and_stopped() -> None:
    child = Child("burner", ["python3", "-c", "import time\nt=time.time()\nwhile time.time()-t<0.3: pass\n"
                             "time.sleep(30)"]).start()
    try:
        time.sleep(0.5)
        assert cpu_seconds(child.pid) >= 0.1
        mem = memory(child.pid)
        assert 0 < mem.rss_mb <= mem.hwm_mb
    finally:
        code = child.stop(grace=2)
    assert code is not None and child.proc is not None and child.proc.poll() is not None


def test_child_that_dies_is_reported() -> None:
    child = Child("quitter", ["python3", "-c", "raise SystemExit(3)"]).start()
    try:
        child.proc.wait(5)  # type: ignore[union-attr]
        with pytest.raises(ChildError, match="exited early \\(exit code 3\\)"):
            child.check_alive()
    finally:
        child.stop()


def test_open_loop_against_the_sample_upstream() -> None:
    upstream, port = start_upstream()
    try:
        request = build_request("GET", "/", f"127.0.0.1:{port}")
        result = uvloop.run(run_open_loop("127.0.0.1", port, request, rate=500, duration=0.5, connections=4))
        assert result.scheduled == 250
        assert result.completed == 250 and result.errors == 0
        assert result.statuses == {200: 250}
        assert 0 < result.latency(0.5) <= result.latency(0.99) < 1000
    finally:
        upstream.stop()


def test_open_loop_charges_queueing_to_a_slow_server() -> None:
    """Two connections, a 50 ms server and 100 req/s: requests must queue, and latency
    from the scheduled time shows it (a closed-loop client would report ~50 ms)."""
    upstream, port = start_upstream()
    try:
        request = build_request("GET", "/delay/50", f"127.0.0.1:{port}")
        result = uvloop.run(run_open_loop("127.0.0.1", port, request, rate=100, duration=1.0, connections=2))
        assert result.completed == 100
        assert result.latency(0.5) >= 50
        assert result.latency(0.99) > 3 * 50  # 40 req/s capacity vs 100 scheduled: a growing queue
    finally:
        upstream.stop()


def test_open_loop_refuses_to_start_without_a_server() -> None:
    upstream, port = start_upstream()
    upstream.stop()
    with pytest.raises(OSError):
        uvloop.run(run_open_loop("127.0.0.1", port, b"GET / HTTP/1.1\r\n\r\n", rate=10, duration=0.2))


def test_open_loop_counts_every_request_when_the_server_dies() -> None:
    upstream, port = start_upstream()
    killer = threading.Timer(0.4, upstream.stop)
    try:
        killer.start()
        request = build_request("GET", "/", f"127.0.0.1:{port}")
        result = uvloop.run(run_open_loop("127.0.0.1", port, request, rate=100, duration=1.0, connections=2,
                                          timeout=0.5))
    finally:
        killer.join()
        upstream.stop()
    assert 0 < result.completed < 100  # some before the kill (at 0.4 s of 1 s), none after
    assert result.errors > 0
    assert result.completed + result.errors == result.scheduled == 100


def test_fetch_one_request() -> None:
    upstream, port = start_upstream()
    try:
        status, size = uvloop.run(fetch("127.0.0.1", port, build_request("GET", "/bytes/100", "x"), 2.0))
        assert (status, size) == (200, 100)
    finally:
        upstream.stop()


def test_children_die_with_a_killed_harness(tmp_path: os.PathLike[str]) -> None:
    """A harness killed with SIGKILL cannot stop its children; the kernel does (PDEATHSIG)."""
    import signal
    import subprocess
    import sys

    script = ("import time\nfrom meshlet.bench.apps import start_upstream\n"
              "child, port = start_upstream()\nprint(child.pid, flush=True)\ntime.sleep(30)\n")
    harness = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        assert harness.stdout is not None
        child_pid = int(harness.stdout.readline())
    finally:
        harness.send_signal(signal.SIGKILL)
        harness.wait(5)
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        try:
            state = Path(f"/proc/{child_pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except FileNotFoundError:
            return
        if state == "Z":  # exited, waiting for init to reap it
            return
        time.sleep(0.05)
    raise AssertionError(f"child {child_pid} outlived its harness")
