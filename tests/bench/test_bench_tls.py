"""``meshlet bench tls``: the server's tiny protocol, s_time parsing, both TLS
engines served to openssl s_client / s_time and a stdlib client, and the quick
run's JSON."""

from __future__ import annotations

import asyncio
import json
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from meshlet.bench.procs import ChildError, online_cpus
from meshlet.bench.tls import (
    ENGINES,
    KEYS,
    ServerUnderTest,
    merge_rounds,
    parse_s_time,
    ratios,
    run_bulk,
    run_download,
    run_handshakes,
    start_server,
    write_key_files,
)
from meshlet.bench.tls_server import HTTP_REPLY, SEND_CHUNK, BenchApp

needs_openssl = pytest.mark.skipif(shutil.which("openssl") is None, reason="openssl is not installed")


# --------------------------------------------------------------------------- #
# The server's protocol, in memory
# --------------------------------------------------------------------------- #


class FakeTransport(asyncio.Transport):
    """Records writes; asks the protocol to pause above ``high`` buffered bytes."""

    def __init__(self, protocol: BenchApp, high: int = 1 << 62) -> None:
        super().__init__()
        self.protocol = protocol
        self.high = high
        self.written: list[bytes] = []
        self.buffered = 0
        self.closed = False

    def write(self, data: bytes | bytearray | memoryview) -> None:
        self.written.append(bytes(data))
        self.buffered += len(data)
        if self.buffered > self.high:
            self.protocol.pause_writing()

    def drain(self) -> None:
        self.buffered = 0
        self.protocol.resume_writing()

    def close(self) -> None:
        self.closed = True

    def is_closing(self) -> bool:
        return self.closed


def connected_app(high: int = 1 << 62) -> tuple[BenchApp, FakeTransport]:
    app = BenchApp()
    transport = FakeTransport(app, high)
    app.connection_made(transport)
    return app, transport


def test_bulk_bytes_are_counted_across_chunks_and_answered_once() -> None:
    app, transport = connected_app()
    app.data_received(b"BU")
    app.data_received(b"LK 10\nabc")
    app.data_received(b"defg")
    assert transport.written == []
    app.data_received(b"hij")
    assert transport.written == [b"DONE\n"]
    assert not transport.closed


def test_more_bulk_bytes_than_announced_close_the_connection() -> None:
    app, transport = connected_app()
    app.data_received(b"BULK 3\nabcd")
    assert transport.closed
    assert transport.written == []


def test_get_is_answered_and_closed() -> None:
    app, transport = connected_app()
    app.data_received(b"GET / HTTP/1.0\r\n\r\n")
    assert transport.written == [HTTP_REPLY]
    assert transport.closed


@pytest.mark.parametrize("request_line", [b"PUT 5\n", b"BULK\n", b"BULK -1\n", b"BULK 0\n", b"X" * 65])
def test_anything_else_closes(request_line: bytes) -> None:
    app, transport = connected_app()
    app.data_received(request_line)
    assert transport.closed
    assert transport.written == []


def test_send_stops_while_paused_and_finishes_on_resume() -> None:
    app, transport = connected_app(high=2 * SEND_CHUNK)
    total = 5 * SEND_CHUNK + 7
    app.data_received(f"SEND {total}\n".encode())
    assert sum(map(len, transport.written)) == 3 * SEND_CHUNK  # paused past the high-water mark
    transport.drain()
    transport.drain()
    assert sum(map(len, transport.written)) == total
    assert len(transport.written[-1]) == 7


# --------------------------------------------------------------------------- #
# Parsing and ratios
# --------------------------------------------------------------------------- #

S_TIME_REUSE = """

Now timing with session id reuse.
starting
rrrrrrrrrrrr
rrrr

16 connections in 0.40s; 40.00 connections/user sec, bytes read 944
16 connections in 2 real seconds, 59 bytes read per connection
"""


def test_s_time_output_gives_connections_and_resumption_marks() -> None:
    count = parse_s_time(S_TIME_REUSE)
    assert (count.connections, count.reused) == (16, 16)


def test_s_time_output_without_a_count_is_an_error() -> None:
    with pytest.raises(ChildError, match="s_time"):
        parse_s_time("Unable to get connection\n")


def test_ratios_are_meshlet_over_stdlib_per_key() -> None:
    metrics = {"full_handshakes_per_s": 100.0, "resumed_handshakes_per_s": 200.0,
               "cpu_us_per_handshake": 50.0, "cpu_us_per_resumed_handshake": 25.0,
               "bulk_mb_per_s": 400.0, "bulk_cpu_mb_per_s": 800.0,
               "bulk_send_mb_per_s": 300.0, "bulk_send_cpu_mb_per_s": 600.0}
    rows: list[dict[str, Any]] = [
        {"engine": "meshlet", "key": "p256", **{k: v / 2 for k, v in metrics.items()}},
        {"engine": "stdlib-ssl", "key": "p256", **metrics},
        {"engine": "meshlet", "key": "rsa2048", "error": "did not start"},
        {"engine": "stdlib-ssl", "key": "rsa2048", **metrics},
    ]
    assert ratios(rows) == {"p256": dict.fromkeys(metrics, 0.5)}


def test_rounds_merge_into_medians_of_figures_and_sums_of_counts() -> None:
    runs = [{"engine": "meshlet", "key": "p256", "cpu_us_per_handshake": v, "full_handshakes": n,
             "shared_core": False} for v, n in ((300.0, 10), (100.0, 20), (200.0, 30))]
    assert merge_rounds(runs) == {"engine": "meshlet", "key": "p256", "cpu_us_per_handshake": 200.0,
                                  "full_handshakes": 60, "shared_core": False, "rounds": 3}
    failed = {"engine": "meshlet", "key": "p256", "error": "did not start"}
    assert merge_rounds([*runs, failed]) == failed


# --------------------------------------------------------------------------- #
# Both engines against independent clients
# --------------------------------------------------------------------------- #


@pytest.fixture(scope="module")
def key_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("tls-bench-keys")


@pytest.fixture(params=[(e, k) for e in ENGINES for k in KEYS], ids=lambda p: f"{p[0]}-{p[1]}")
def server(request: pytest.FixtureRequest, key_dir: Path, tmp_path: Path) -> Iterator[ServerUnderTest]:
    engine, key = request.param
    files = write_key_files(key, key_dir)
    started = start_server(engine, key, files, set(online_cpus()), tmp_path)
    try:
        yield started
    finally:
        started.child.stop()
    assert started.child.proc is not None and started.child.proc.poll() is not None


@needs_openssl
def test_openssl_s_client_gets_tls13_and_the_reply(server: ServerUnderTest) -> None:
    done = subprocess.run(
        ["openssl", "s_client", "-connect", f"127.0.0.1:{server.port}", "-tls1_3", "-quiet"],
        input=b"GET / HTTP/1.0\r\n\r\n", capture_output=True, timeout=10, check=False,
    )
    assert b"HTTP/1.0 200 OK" in done.stdout
    assert b"ok" in done.stdout.split(b"\r\n\r\n", 1)[1]


@needs_openssl
def test_s_time_resumes_every_connection(server: ServerUnderTest, tmp_path: Path) -> None:
    phase = run_handshakes(server, resumed=True, seconds=1, clients=1, cpus=set(online_cpus()),
                           workdir=tmp_path)
    assert phase.connections > 0
    assert phase.reused == phase.connections
    assert phase.per_s > 0


def test_bulk_both_ways_through_one_connection(server: ServerUnderTest) -> None:
    upload = run_bulk(server, 4_000_000, deadline_s=20)
    download = run_download(server, 4_000_000, deadline_s=20)
    for result in (upload, download):
        assert result.mb == 4.0
        assert result.mb_per_s > 0
        assert result.cipher == "TLS_AES_256_GCM_SHA384"  # both engines on the same suite


# --------------------------------------------------------------------------- #
# The command
# --------------------------------------------------------------------------- #


@pytest.mark.slow
@pytest.mark.timeout(90)
@needs_openssl
def test_quick_run_prints_rows_for_both_engines_and_keys() -> None:
    argv = [sys.executable, "-m", "meshlet.cli.main", "bench", "tls", "--quick", "--json"]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=80, check=False)
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads(done.stdout)
    rows = result["rows"]
    assert {(row["engine"], row["key"]) for row in rows} == {(e, k) for e in ENGINES for k in KEYS}
    for row in rows:
        assert "error" not in row
        for field in ("full_handshakes_per_s", "resumed_handshakes_per_s", "cpu_us_per_handshake",
                      "bulk_mb_per_s", "bulk_cpu_mb_per_s", "bulk_send_mb_per_s", "full_handshakes",
                      "resumed_handshakes"):
            assert row[field] > 0, field
        assert row["resumed_marked_by_client"] == row["resumed_handshakes"]
    assert set(result["ratios"]) == set(KEYS)
    assert "bench:" in done.stderr  # progress goes to stderr, stdout holds only the JSON
