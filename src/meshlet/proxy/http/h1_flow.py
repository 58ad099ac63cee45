"""The transport's write flow control as both HTTP/1.1 codecs use it.

The asyncio transport calls ``pause_writing`` when its buffer passes the high
mark and ``resume_writing`` when it drains below the low one. A codec checks
``write_paused`` after each write (a plain attribute: no call on the hot
path) and, when set, waits on the one shared waiter that the next resume
resolves, or that the connection's loss fails.
"""

from __future__ import annotations

import asyncio

from meshlet.proxy.http.stream import StreamReset


class H1WriteFlow(asyncio.Protocol):
    """Base of the HTTP/1.1 server and client protocols: their write gate."""

    _loop: asyncio.AbstractEventLoop | None

    def __init__(self) -> None:
        self.write_paused = False
        self._write_waiter: asyncio.Future[None] | None = None

    def pause_writing(self) -> None:
        self.write_paused = True

    def resume_writing(self) -> None:
        self.write_paused = False
        waiter = self._write_waiter
        if waiter is not None:
            self._write_waiter = None
            if not waiter.done():
                waiter.set_result(None)

    def _write_resumed(self) -> asyncio.Future[None]:
        """The future the next ``resume_writing`` resolves (one for all waiting writers)."""
        waiter = self._write_waiter
        if waiter is None:
            assert self._loop is not None
            waiter = self._write_waiter = self._loop.create_future()
        return waiter

    def _fail_write_waiter(self, error: StreamReset) -> None:
        """The connection is gone: whoever waits to write gets ``error``."""
        waiter = self._write_waiter
        if waiter is not None and not waiter.done():
            waiter.set_exception(error)
            waiter.exception()  # retrieved here so an unawaited waiter does not warn
        self._write_waiter = None
