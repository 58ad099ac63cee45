"""The TLS engine benchmark: meshlet's TLS 1.3 engine beside the stdlib ``ssl``
transport, both under uvloop, in one run.

For each (engine, key) a server (``meshlet.bench.tls_server``) runs pinned to
one core; the clients run on the other core(s). Phases, in order: bulk in,
bulk out (on the fresh server), warm-up, full handshakes, resumed handshakes.
Each row holds:

- ``full_handshakes_per_s`` / ``resumed_handshakes_per_s``: connections per
  second of wall time completed by ``handshake_clients`` concurrent
  ``openssl s_time -tls1_3 -www /`` processes (``-new`` for full handshakes;
  ``-reuse`` resumes a TLS 1.3 session ticket). Each connection is a
  handshake, one 59-byte HTTP reply and a close;
- ``cpu_us_per_handshake`` / ``cpu_us_per_resumed_handshake``: the server's
  utime+stime (from /proc) over the phase divided by its connections;
  ``*_server_cpu_share`` says how busy the server core was (near 1.0: the
  server, not the clients, set the rate);
- ``bulk_mb_per_s``: MB (10^6 bytes) of application data per second of wall
  time pushed through one connection (a stdlib ``ssl`` client sends
  ``bulk_mb`` MB; the server discards it and answers once all arrived);
  ``bulk_cpu_mb_per_s``: the same MB per second of the server's CPU time;
- ``bulk_send_mb_per_s`` / ``bulk_send_cpu_mb_per_s``: the same, the other
  way (the server writes ``bulk_mb`` MB under its transport's flow control,
  the client reads them).

Wall-time figures move with whatever else runs on the machine; the CPU-based
ones (``cpu_us_*``, ``*_cpu_mb_per_s``) much less, so they are the ones to
compare engines by. ``load_avg_1m`` records how busy the machine was.

Everything started here is stopped here; every phase is bounded in time.
"""

from __future__ import annotations

import datetime
import os
import re
import shutil
import socket
import ssl
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.asymmetric.types import CertificateIssuerPrivateKeyTypes
from cryptography.x509.oid import NameOID

from meshlet.bench.procs import LOOPBACK, Child, ChildError, cpu_seconds
from meshlet.bench.proxy import CpuPlan, pinned, plan_cpus

ENGINES = ("meshlet", "stdlib-ssl")
KEYS = ("rsa2048", "p256")
READY_TIMEOUT = 15.0
IO_TIMEOUT = 30.0  # any single socket operation of the bulk client
MB = 1_000_000
Progress = Callable[[str], None]


@dataclass(frozen=True, slots=True)
class TlsBenchOptions:
    handshake_s: float = 5.0  # per phase (full, resumed)
    handshake_clients: int = 4  # concurrent s_time processes
    bulk_mb: int = 256
    warmup_s: float = 1.0
    rounds: int = 1  # each (engine, key) measured this many times, alternating; medians reported
    engines: tuple[str, ...] = ENGINES
    keys: tuple[str, ...] = KEYS


# A smoke run (about 20 s): shapes and sanity, not figures to quote. 64 MB
# keeps the server's CPU time for a bulk phase several /proc clock ticks long.
QUICK = TlsBenchOptions(handshake_s=1.0, handshake_clients=2, bulk_mb=64, warmup_s=0.0)


# --------------------------------------------------------------------------- #
# Certificates
# --------------------------------------------------------------------------- #


@dataclass(frozen=True, slots=True)
class KeyFiles:
    cert: Path
    key: Path


def new_private_key(kind: str) -> CertificateIssuerPrivateKeyTypes:
    if kind == "rsa2048":
        return rsa.generate_private_key(public_exponent=65537, key_size=2048)
    if kind == "p256":
        return ec.generate_private_key(ec.SECP256R1())
    raise ValueError(f"unknown key type {kind!r} (known: {', '.join(KEYS)})")


def self_signed_pem(key: CertificateIssuerPrivateKeyTypes, common_name: str = "meshlet-bench") -> bytes:
    """A self-signed leaf (the clients do not verify: the benchmark measures the
    server's cost, which is the same either way)."""
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(common_name)]), critical=False)
        .sign(key, hashes.SHA256())
    )
    return cert.public_bytes(serialization.Encoding.PEM)


def write_key_files(kind: str, directory: Path) -> KeyFiles:
    key = new_private_key(kind)
    files = KeyFiles(directory / f"{kind}.crt", directory / f"{kind}.key")
    files.cert.write_bytes(self_signed_pem(key))
    files.key.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    return files


# --------------------------------------------------------------------------- #
# The server under test
# --------------------------------------------------------------------------- #


@dataclass(slots=True)
class ServerUnderTest:
    engine: str
    key: str
    child: Child
    port: int


def start_server(engine: str, kind: str, files: KeyFiles, cpus: set[int], workdir: Path) -> ServerUnderTest:
    argv = [sys.executable, "-m", "meshlet.bench.tls_server", "--engine", engine,
            "--cert", str(files.cert), "--key", str(files.key), "--host", LOOPBACK, "--port", "0"]
    child = Child(f"{engine} TLS server", argv, cpus=cpus, capture_stdout=True,
                  log_path=workdir / f"server-{engine}-{kind}.log").start()
    try:
        found = child.read_stdout_line(r"listening on \S+:(\d+)", READY_TIMEOUT)
    except BaseException:
        child.stop()
        raise
    return ServerUnderTest(engine, kind, child, int(found.group(1)))


# --------------------------------------------------------------------------- #
# Handshakes: openssl s_time
# --------------------------------------------------------------------------- #


_CONNECTIONS = re.compile(r"^(\d+) connections in [\d.]+s;", re.MULTILINE)
_REUSE_MARKS = re.compile(r"^[r*]+$", re.MULTILINE)


def openssl_binary() -> str:
    binary = shutil.which("openssl")
    if binary is None:
        raise ChildError("openssl is not installed (Debian package: openssl)")
    return binary


def s_time_argv(binary: str, port: int, *, resumed: bool, seconds: int) -> list[str]:
    return [binary, "s_time", "-connect", f"{LOOPBACK}:{port}", "-tls1_3", "-www", "/",
            "-reuse" if resumed else "-new", "-time", str(seconds)]


@dataclass(frozen=True, slots=True)
class STimeCount:
    connections: int
    reused: int  # connections s_time marked as resumed ("r")


def parse_s_time(output: str) -> STimeCount:
    """Read one ``s_time`` run: its connection count and resumption marks."""
    found = _CONNECTIONS.search(output)
    if found is None:
        raise ChildError(f"could not read openssl s_time's output: {output.strip()[-200:]!r}")
    reused = sum(line.count("r") for line in _REUSE_MARKS.findall(output))
    return STimeCount(int(found.group(1)), reused)


@dataclass(frozen=True, slots=True)
class HandshakePhase:
    connections: int
    reused: int
    wall_s: float
    server_cpu_s: float

    @property
    def per_s(self) -> float:
        return self.connections / self.wall_s if self.wall_s > 0 else 0.0

    @property
    def cpu_us_each(self) -> float:
        return self.server_cpu_s / self.connections * 1e6 if self.connections else 0.0

    @property
    def server_cpu_share(self) -> float:
        return self.server_cpu_s / self.wall_s if self.wall_s > 0 else 0.0


def run_handshakes(server: ServerUnderTest, *, resumed: bool, seconds: float, clients: int,
                   cpus: set[int], workdir: Path) -> HandshakePhase:
    """``clients`` concurrent s_time processes for ``seconds`` against ``server``."""
    binary = openssl_binary()
    whole_s = max(1, round(seconds))
    argv = s_time_argv(binary, server.port, resumed=resumed, seconds=whole_s)
    phase = "resumed" if resumed else "full"
    children = [Child(f"openssl s_time {i}", argv, cpus=cpus, capture_stdout=True,
                      log_path=workdir / f"s_time-{server.engine}-{server.key}-{phase}-{i}.log")
                for i in range(clients)]
    cpu_before = cpu_seconds(server.child.pid)
    started = time.monotonic()
    outputs: list[str] = []
    try:
        for child in children:
            child.start()
        # s_time stops at a whole-second wall clock boundary: up to one second late.
        deadline = started + whole_s + 15.0
        for child in children:
            assert child.proc is not None
            try:
                out, _ = child.proc.communicate(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired as exc:
                raise ChildError(f"openssl s_time did not finish within {whole_s + 15} s") from exc
            outputs.append(out.decode(errors="replace"))
        wall = time.monotonic() - started
        cpu = cpu_seconds(server.child.pid) - cpu_before
    finally:
        for child in children:
            child.stop()
    counts = [parse_s_time(out) for out in outputs]
    server.child.check_alive()
    return HandshakePhase(sum(c.connections for c in counts), sum(c.reused for c in counts), wall, cpu)


# --------------------------------------------------------------------------- #
# Bulk: one connection, client -> server
# --------------------------------------------------------------------------- #


BULK_CHUNK = 1 << 18  # what the client hands ssl per sendall (it cuts 16 KiB records)


@dataclass(frozen=True, slots=True)
class BulkResult:
    mb: float
    wall_s: float
    server_cpu_s: float
    cipher: str

    @property
    def mb_per_s(self) -> float:
        return self.mb / self.wall_s if self.wall_s > 0 else 0.0

    @property
    def cpu_mb_per_s(self) -> float:
        return self.mb / self.server_cpu_s if self.server_cpu_s > 0 else 0.0


def client_context() -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE  # self-signed bench certificates; the server's cost is the same
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    return ctx


def run_bulk(server: ServerUnderTest, total_bytes: int, deadline_s: float) -> BulkResult:
    """Upload: push ``total_bytes`` through one TLS connection and wait for the server's DONE."""
    chunk = memoryview(bytes(range(256)) * (BULK_CHUNK // 256))
    deadline = time.monotonic() + deadline_s
    with _connect(server) as tls:
        tls.sendall(f"BULK {total_bytes}\n".encode())
        cpu_before = cpu_seconds(server.child.pid)
        started = time.monotonic()
        left = total_bytes
        while left > 0:
            _check_deadline(deadline, deadline_s)
            piece = chunk if left >= len(chunk) else chunk[:left]
            tls.sendall(piece)
            left -= len(piece)
        reply = _read_reply(tls, deadline)
        wall = time.monotonic() - started
        cpu = cpu_seconds(server.child.pid) - cpu_before
        cipher = (tls.cipher() or ("",))[0]
    if reply != b"DONE\n":
        raise ChildError(f"{server.engine} server answered {reply[:40]!r} after the bulk transfer")
    return BulkResult(total_bytes / MB, wall, cpu, cipher)


def run_download(server: ServerUnderTest, total_bytes: int, deadline_s: float) -> BulkResult:
    """Download: ask the server for ``total_bytes`` over one TLS connection and read them all."""
    buffer = bytearray(BULK_CHUNK)
    deadline = time.monotonic() + deadline_s
    with _connect(server) as tls:
        cpu_before = cpu_seconds(server.child.pid)
        started = time.monotonic()
        tls.sendall(f"SEND {total_bytes}\n".encode())
        left = total_bytes
        while left > 0:
            _check_deadline(deadline, deadline_s)
            got = tls.recv_into(buffer, min(left, BULK_CHUNK))
            if not got:
                got_so_far = total_bytes - left
                raise ChildError(f"{server.engine} server closed after {got_so_far} of {total_bytes} bytes")
            left -= got
        wall = time.monotonic() - started
        cpu = cpu_seconds(server.child.pid) - cpu_before
        cipher = (tls.cipher() or ("",))[0]
    return BulkResult(total_bytes / MB, wall, cpu, cipher)


def _connect(server: ServerUnderTest) -> ssl.SSLSocket:
    raw = socket.create_connection((LOOPBACK, server.port), timeout=IO_TIMEOUT)
    try:
        return client_context().wrap_socket(raw, server_hostname="meshlet-bench")
    except BaseException:
        raw.close()
        raise


def _check_deadline(deadline: float, deadline_s: float) -> None:
    if time.monotonic() > deadline:
        raise ChildError(f"bulk transfer did not finish within {deadline_s:.0f} s")


def _read_reply(tls: ssl.SSLSocket, deadline: float) -> bytes:
    reply = b""
    while not reply.endswith(b"\n") and len(reply) < 64:
        tls.settimeout(max(0.1, min(IO_TIMEOUT, deadline - time.monotonic())))
        data = tls.recv(64)
        if not data:
            break
        reply += data
    return reply


# --------------------------------------------------------------------------- #
# The experiment
# --------------------------------------------------------------------------- #


@dataclass(frozen=True, slots=True)
class TlsMeasurement:
    full: HandshakePhase
    resumed: HandshakePhase
    bulk: BulkResult
    send: BulkResult
    load_avg: float


def measure(server: ServerUnderTest, opts: TlsBenchOptions, plan: CpuPlan, workdir: Path,
            progress: Progress) -> TlsMeasurement:
    name = f"{server.engine}/{server.key}"
    # Bulk first, on a fresh server: thousands of closed handshake connections
    # leave the kernel work (TIME_WAIT, timers) that it would charge to the
    # server's system time during the bulk phases.
    progress(f"{name}: bulk, {opts.bulk_mb} MB in over one connection")
    deadline_s = max(60.0, float(opts.bulk_mb))
    with pinned(plan.load):
        bulk = run_bulk(server, opts.bulk_mb * MB, deadline_s)
        progress(f"{name}: {bulk.mb_per_s:.0f} MB/s in ({bulk.cpu_mb_per_s:.0f} MB per server CPU second); "
                 f"{opts.bulk_mb} MB out")
        send = run_download(server, opts.bulk_mb * MB, deadline_s)
    progress(f"{name}: {send.mb_per_s:.0f} MB/s out ({send.cpu_mb_per_s:.0f} MB per server CPU second)")
    clients = opts.handshake_clients
    if opts.warmup_s > 0:
        run_handshakes(server, resumed=False, seconds=opts.warmup_s, clients=clients, cpus=plan.load,
                       workdir=workdir)
    progress(f"{name}: full handshakes, {clients} x openssl s_time -new for {opts.handshake_s:g} s")
    full = run_handshakes(server, resumed=False, seconds=opts.handshake_s, clients=clients,
                          cpus=plan.load, workdir=workdir)
    progress(f"{name}: {full.per_s:.0f} full handshakes/s; resumed, s_time -reuse")
    resumed = run_handshakes(server, resumed=True, seconds=opts.handshake_s, clients=clients,
                             cpus=plan.load, workdir=workdir)
    progress(f"{name}: {resumed.per_s:.0f} resumed handshakes/s")
    server.child.check_alive()
    return TlsMeasurement(full, resumed, bulk, send, os.getloadavg()[0])


def to_row(engine: str, key: str, m: TlsMeasurement, opts: TlsBenchOptions, plan: CpuPlan) -> dict[str, Any]:
    full, resumed, bulk, send = m.full, m.resumed, m.bulk, m.send
    return {
        "engine": engine,
        "key": key,
        "full_handshakes_per_s": round(full.per_s, 1),
        "resumed_handshakes_per_s": round(resumed.per_s, 1),
        "cpu_us_per_handshake": round(full.cpu_us_each, 1),
        "cpu_us_per_resumed_handshake": round(resumed.cpu_us_each, 1),
        "bulk_mb_per_s": round(bulk.mb_per_s, 1),
        "bulk_cpu_mb_per_s": round(bulk.cpu_mb_per_s, 1),
        "bulk_send_mb_per_s": round(send.mb_per_s, 1),
        "bulk_send_cpu_mb_per_s": round(send.cpu_mb_per_s, 1),
        "cipher": bulk.cipher,
        "full_handshakes": full.connections,
        "resumed_handshakes": resumed.connections,
        "resumed_marked_by_client": resumed.reused,
        "full_server_cpu_share": round(full.server_cpu_share, 2),
        "resumed_server_cpu_share": round(resumed.server_cpu_share, 2),
        "handshake_clients": opts.handshake_clients,
        "handshake_duration_s": round(full.wall_s, 2),
        "bulk_mb": round(bulk.mb, 1),
        "bulk_wall_s": round(bulk.wall_s, 3),
        "bulk_server_cpu_s": round(bulk.server_cpu_s, 3),
        "bulk_send_wall_s": round(send.wall_s, 3),
        "bulk_send_server_cpu_s": round(send.server_cpu_s, 3),
        "load_avg_1m": round(m.load_avg, 2),
        "cores": len(plan.proxy),
        "machine_cores": plan.machine_cores,
        "shared_core": plan.shared,
    }


def bench_one(engine: str, key: str, files: KeyFiles, opts: TlsBenchOptions, plan: CpuPlan,
              workdir: Path, progress: Progress) -> dict[str, Any]:
    progress(f"{engine}/{key}: server on core {','.join(map(str, sorted(plan.proxy)))}")
    server = start_server(engine, key, files, plan.proxy, workdir)
    try:
        return to_row(engine, key, measure(server, opts, plan, workdir, progress), opts, plan)
    finally:
        server.child.stop()


RATIO_METRICS = ("full_handshakes_per_s", "resumed_handshakes_per_s", "cpu_us_per_handshake",
                 "cpu_us_per_resumed_handshake", "bulk_mb_per_s", "bulk_cpu_mb_per_s",
                 "bulk_send_mb_per_s", "bulk_send_cpu_mb_per_s")


def ratios(rows: list[dict[str, Any]]) -> dict[str, dict[str, float]]:
    """meshlet / stdlib-ssl per key and metric (where both rows succeeded)."""
    by = {(row["engine"], row["key"]): row for row in rows if "error" not in row}
    found: dict[str, dict[str, float]] = {}
    for key in KEYS:
        ours, theirs = by.get(("meshlet", key)), by.get(("stdlib-ssl", key))
        if ours is None or theirs is None:
            continue
        found[key] = {metric: round(ours[metric] / theirs[metric], 3)
                      for metric in RATIO_METRICS if theirs[metric]}
    return found


def run_tls_bench(opts: TlsBenchOptions, progress: Progress) -> dict[str, Any]:
    """Every (engine, key) of ``opts``, ``opts.rounds`` times with the engines
    alternating; one that fails gets a row with ``error``."""
    unknown = [e for e in opts.engines if e not in ENGINES] + [k for k in opts.keys if k not in KEYS]
    if unknown:
        raise ValueError(f"unknown engine(s)/key(s): {', '.join(unknown)}")
    openssl_binary()
    plan = plan_cpus()
    measured: dict[tuple[str, str], list[dict[str, Any]]] = {
        (engine, key): [] for key in opts.keys for engine in opts.engines
    }
    with tempfile.TemporaryDirectory(prefix="meshlet-bench-tls-") as tmp:
        workdir = Path(tmp)
        files = {key: write_key_files(key, workdir) for key in opts.keys}
        for round_number in range(1, opts.rounds + 1):
            if opts.rounds > 1:
                progress(f"round {round_number} of {opts.rounds}")
            for (engine, key), runs in measured.items():
                try:
                    runs.append(bench_one(engine, key, files[key], opts, plan, workdir, progress))
                except (ChildError, OSError) as exc:
                    progress(f"{engine}/{key}: failed: {exc}")
                    runs.append({"engine": engine, "key": key, "error": str(exc)})
    rows = [merge_rounds(runs) for runs in measured.values()]
    return {"rows": rows, "ratios": ratios(rows)}


SUMMED_FIELDS = frozenset({"full_handshakes", "resumed_handshakes", "resumed_marked_by_client"})


def merge_rounds(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """One row from several rounds: medians of the figures, sums of the counts;
    a failed round makes the row an error row."""
    failed = [run for run in runs if "error" in run]
    if failed:
        return failed[0]
    if len(runs) == 1:
        return {**runs[0], "rounds": 1}
    merged: dict[str, Any] = {}
    for field, first in runs[0].items():
        values = [run[field] for run in runs]
        if isinstance(first, bool) or not isinstance(first, int | float):
            merged[field] = first
        elif field in SUMMED_FIELDS:
            merged[field] = sum(values)
        else:
            merged[field] = round(statistics.median(values), 3)
    merged["rounds"] = len(runs)
    return merged
