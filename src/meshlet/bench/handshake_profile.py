"""Where a meshlet server's handshake time goes: py-spy samples, sorted into parts.

With ``meshlet bench handshake --profile DIR``, ``py-spy record --format raw``
(``pip install py-spy``; it runs on the load generator's core and does not
pause the server) samples each Python server during the measured window.
The raw file (one collapsed stack per line, then its sample count) stays in
DIR, and the row gets ``profile_us_per_handshake``: the row's
``cpu_us_per_handshake`` split in proportion to the samples of each part.

A sample counts toward private-key signing when any frame of its stack is
in the key provider or the signing call (signing inside a worker thread
too); otherwise toward the part of its innermost frame that belongs to one
(``PARTS``, first match). Threads of the offload and batch pools waiting for
work are idle and left out. Native code shows as its innermost Python
caller: uvloop's own work (epoll, accept, close) shows as ``Runner.run``.
"""

from __future__ import annotations

import re
import shutil
import sys
from collections import Counter
from pathlib import Path

from meshlet.bench.procs import Child

SIGNING = "private-key signing"
SIGNING_FRAMES = re.compile(r"meshlet/keys/|^sign \(meshlet/tls/crypto\.py|meshlet/tls/keys_local\.py")
IDLE_WORKER = re.compile(r"^_worker \(concurrent/futures/thread\.py")
PARTS: tuple[tuple[str, re.Pattern[str]], ...] = (
    ("ECDHE (X25519)", re.compile(r"x25519|KeyExchange")),
    ("key schedule and transcript hashes",
     re.compile(r"meshlet/tls/keyschedule\.py|^digest \(hmac|hashlib\.py|_finished_data|_digest \(")),
    ("record layer (AEAD)", re.compile(r"meshlet/tls/record\.py")),
    ("session tickets", re.compile(r"meshlet/tls/tickets\.py|_send_tickets")),
    ("HTTP/1.1 codec, HCM, router", re.compile(r"meshlet/proxy/http/|meshlet/proxy/filters/")),
    ("stdlib ssl: OpenSSL handshake and records", re.compile(r"^SSLObject\.|\(ssl\.py:")),
    ("stdlib ssl: transport adapter", re.compile(r"meshlet/proxy/listeners/ssl_transport\.py")),
    ("offload: process pool IPC", re.compile(r"multiprocessing/|concurrent/futures/process\.py")),
    ("socket writes", re.compile(r"^_TlsProtocol\._flush ")),
    ("listener and connection bookkeeping", re.compile(r"meshlet/proxy/listeners/|meshlet/proxy/observe/")),
    ("TLS engine: codec, state machine, adapter", re.compile(r"meshlet/tls/")),
    ("event loop: epoll, accept, close", re.compile(r"^Runner\.run ")),
)
OTHER = "other"


def py_spy_binary() -> str | None:
    return shutil.which("py-spy") or _beside_python("py-spy")


def _beside_python(name: str) -> str | None:
    candidate = Path(sys.executable).parent / name
    return str(candidate) if candidate.exists() else None


def part_of(frames: list[str]) -> str | None:
    """The part a stack (outermost frame first) belongs to; None for an idle pool thread."""
    if any(SIGNING_FRAMES.search(frame) for frame in frames):
        return SIGNING
    if any(IDLE_WORKER.search(frame) for frame in frames):
        return None
    for frame in reversed(frames):
        for name, pattern in PARTS:
            if pattern.search(frame):
                return name
    return OTHER


def split_samples(raw: str) -> Counter[str]:
    """Samples per part from py-spy's ``--format raw`` output."""
    parts: Counter[str] = Counter()
    for line in raw.splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        # The first entry names the process; frames follow, outermost first.
        part = part_of(stack.split(";")[1:])
        if part is not None:
            parts[part] += int(count)
    return parts


def per_handshake(parts: Counter[str], cpu_us_per_handshake: float) -> dict[str, float]:
    """``cpu_us_per_handshake`` split in proportion to each part's samples, largest first."""
    total = sum(parts.values())
    if total == 0:
        return {}
    return {name: round(cpu_us_per_handshake * count / total, 1) for name, count in parts.most_common()}


def free_path(directory: Path, stem: str) -> Path:
    """``stem.txt`` in ``directory``, or ``stem-2.txt``, ... if taken (rounds of one row)."""
    path, index = directory / f"{stem}.txt", 1
    while path.exists():
        index += 1
        path = directory / f"{stem}-{index}.txt"
    return path


def start_py_spy(binary: str, pid: int, seconds: float, out: Path, cpus: set[int]) -> Child:
    argv = [binary, "record", "--format", "raw", "--nonblocking", "--subprocesses", "--rate", "200",
            "--duration", str(max(1, int(seconds))), "--pid", str(pid), "--output", str(out)]
    return Child("py-spy", argv, cpus=cpus, log_path=out.with_suffix(".log")).start()
