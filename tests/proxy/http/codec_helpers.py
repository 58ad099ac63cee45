"""What the HTTP codec tests share: an in-memory transport for feeding a
codec arbitrary bytes without a socket, running a client tool (curl,
h2load, nghttp) with a deadline, and gRPC's length-prefixed message framing."""

from __future__ import annotations

import asyncio
import struct
from collections.abc import Iterable


class MemoryTransport(asyncio.Transport):
    """Collects what the codec writes; enough of a transport for data_received."""

    def __init__(self) -> None:
        super().__init__()
        self.out = bytearray()
        self.closed = False

    def write(self, data: bytes | bytearray | memoryview) -> None:
        self.out += data

    def writelines(self, parts: Iterable[bytes | bytearray | memoryview]) -> None:
        for part in parts:
            self.out += part

    def close(self) -> None:
        self.closed = True

    def abort(self) -> None:
        self.closed = True

    def is_closing(self) -> bool:
        return self.closed

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        pass

    def get_write_buffer_size(self) -> int:
        return 0

    def can_write_eof(self) -> bool:
        return True

    def write_eof(self) -> None:
        pass


async def run(*argv: str, timeout: float = 8.0, stdin: bytes | None = None) -> tuple[int, bytes, bytes]:
    """Run a tool to completion; killed (and reaped) if it outlives ``timeout``."""
    proc = await asyncio.create_subprocess_exec(
        *argv,
        stdin=asyncio.subprocess.PIPE if stdin is not None else asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        out, err = await asyncio.wait_for(proc.communicate(stdin), timeout)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    assert proc.returncode is not None
    return proc.returncode, out, err


def grpc_frame(message: bytes) -> bytes:
    """One uncompressed gRPC message with its 5-byte prefix."""
    return b"\x00" + struct.pack(">I", len(message)) + message


def grpc_messages(data: bytes) -> list[bytes]:
    """The messages of a gRPC body (uncompressed, as ``grpc_frame`` makes them)."""
    out = []
    while data:
        (size,) = struct.unpack(">I", data[1:5])
        out.append(data[5 : 5 + size])
        data = data[5 + size :]
    return out
