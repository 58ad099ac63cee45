"""One accepted downstream connection, from accept to close.

``AcceptedConnection`` is the raw transport's first protocol: it builds the
``ConnectionInfo``, runs the TLS inspector when the listener has one (the
bytes it reads are handed on as the transport socket's ``initial_data``),
picks the filter chain, and starts the chain's transport socket. After that
the application protocol (an HTTP codec, the TCP proxy) owns the transport;
``ConnectionRecord`` keeps what the listener needs for stats and draining.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import TYPE_CHECKING, cast

from meshlet.proxy.listeners.filter_chain import ConnectionFacts
from meshlet.proxy.listeners.tls_inspector import ClientHelloInspector, Verdict
from meshlet.proxy.transport import ConnectionInfo, HandshakeError, SecurityInfo

if TYPE_CHECKING:
    from meshlet.proxy.listeners.manager import ChainRuntime, ListenerRuntime

log = logging.getLogger(__name__)


class ConnectionRecord:
    """What the listener tracks per live connection."""

    __slots__ = ("app", "draining", "finished", "info", "raw", "runtime", "started", "tracker")

    def __init__(self, runtime: ListenerRuntime, raw: asyncio.Transport, info: ConnectionInfo) -> None:
        self.runtime = runtime
        self.raw = raw
        self.info = info
        self.app: asyncio.BaseProtocol | None = None
        self.tracker: asyncio.BaseProtocol | None = None
        self.started = time.monotonic()
        self.finished = False
        self.draining = False

    def finish(self) -> None:
        """The connection is gone (idempotent): release its stats and slot."""
        if self.finished:
            return
        self.finished = True
        stats = self.runtime.stats
        stats.cx_active.dec()
        stats.cx_destroy.inc()
        stats.cx_length_ms.record((time.monotonic() - self.started) * 1000.0)
        self.runtime.connections.discard(self)

    def drain(self) -> None:
        """Ask the application protocol to finish in-flight work and close.

        A connection still in the listener-filter or handshake phase is
        drained as soon as its application protocol starts (closing it now
        would fail a client that did nothing wrong, on every config update).
        Protocols without ``drain`` (the TCP proxy) stay open until the drain
        deadline aborts them.
        """
        self.draining = True
        if self.app is not None:
            self.drain_app()

    def drain_app(self) -> None:
        # protocol_for's protocol answers for the connection even when it
        # hands the transport to another codec (protocol sniffing, upgrades).
        drain = getattr(self.app, "drain", None)
        if callable(drain):
            drain()

    def abort(self) -> None:
        self.raw.abort()
        self.finish()


class _ConnectionTracking:
    """What both tracked protocols do: forward the callbacks they do not
    watch, and see the connection start and end.

    The hot callbacks are bound straight to the application's methods
    (instance attributes shadow the base classes' methods), so reads and
    writes pay no extra call.
    """

    _app: asyncio.BaseProtocol
    _record: ConnectionRecord

    def _bind(self, app: asyncio.Protocol | asyncio.BufferedProtocol, record: ConnectionRecord) -> None:
        self._app = app
        self._record = record
        # Declared on the asyncio base class each subclass pairs this with.
        self.eof_received = app.eof_received
        self.pause_writing = app.pause_writing
        self.resume_writing = app.resume_writing

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._app.connection_made(transport)
        if self._record.draining:
            self._record.drain_app()

    def connection_lost(self, exc: Exception | None) -> None:
        try:
            self._app.connection_lost(exc)
        finally:
            self._record.finish()


class TrackedProtocol(_ConnectionTracking, asyncio.Protocol):
    """Sits in front of the application protocol to see ``connection_lost``."""

    def __init__(self, app: asyncio.Protocol, record: ConnectionRecord) -> None:
        self._bind(app, record)
        self.data_received = app.data_received  # type: ignore[method-assign]


class TrackedBufferedProtocol(_ConnectionTracking, asyncio.BufferedProtocol):
    """``TrackedProtocol`` for application protocols that read into their own buffer."""

    def __init__(self, app: asyncio.BufferedProtocol, record: ConnectionRecord) -> None:
        self._bind(app, record)
        self.get_buffer = app.get_buffer  # type: ignore[method-assign]
        self.buffer_updated = app.buffer_updated  # type: ignore[method-assign]


class AcceptedConnection(asyncio.Protocol):
    """The protocol of a freshly accepted socket until its filter chain runs."""

    __slots__ = ("_inspector", "_raw", "_record", "_runtime", "_timer")

    def __init__(self, runtime: ListenerRuntime) -> None:
        self._runtime = runtime
        self._raw: asyncio.Transport | None = None
        self._record: ConnectionRecord | None = None
        self._inspector: ClientHelloInspector | None = None
        self._timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports do not derive from asyncio.Transport: no isinstance.
        transport = cast(asyncio.Transport, transport)
        rt = self._runtime
        self._raw = transport
        peer = transport.get_extra_info("peername") or ("", 0)
        local = transport.get_extra_info("sockname") or ("", 0)
        info = ConnectionInfo(
            peer=(peer[0], peer[1]), local=(local[0], local[1]),
            listener=rt.config.name, connection_id=rt.proxy.next_connection_id(),
        )
        record = self._record = ConnectionRecord(rt, transport, info)
        rt.connections.add(record)
        rt.stats.cx_total.inc()
        rt.stats.cx_active.inc()
        limit = rt.config.per_connection_buffer_limit_bytes
        if limit:
            transport.set_write_buffer_limits(high=limit)
        if rt.config.inspects_tls:
            self._inspector = ClientHelloInspector()
            loop = asyncio.get_running_loop()
            self._timer = loop.call_later(rt.config.listener_filters_timeout, self._inspection_timed_out)
        else:
            self._dispatch(ConnectionFacts(local[1], transport_protocol="raw_buffer"), b"")

    def data_received(self, data: bytes) -> None:
        inspector = self._inspector
        if inspector is None:
            return  # the chain has been picked; nothing else reads through here
        result = inspector.feed(data)
        if result is None:
            return
        self._cancel_timer()
        self._inspector = None
        rt = self._runtime
        if result.verdict is Verdict.CLOSE:
            rt.stats.hello_too_large.inc()
            self._close()
            return
        if result.verdict is Verdict.TLS:
            rt.stats.tls_found.inc()
        else:
            rt.stats.tls_not_found.inc()
        assert self._record is not None
        facts = ConnectionFacts(
            self._record.info.local[1], result.server_name, result.transport_protocol, result.alpn
        )
        self._dispatch(facts, inspector.data)

    def eof_received(self) -> bool:
        # The peer gave up before the listener filters were done.
        self._cancel_timer()
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_timer()
        if self._record is not None:
            self._record.finish()

    def _inspection_timed_out(self) -> None:
        self._timer = None
        self._inspector = None
        self._runtime.stats.pre_cx_timeout.inc()
        self._close()

    def _cancel_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _close(self) -> None:
        if self._raw is not None:
            self._raw.close()

    def _dispatch(self, facts: ConnectionFacts, initial: bytes) -> None:
        rt = self._runtime
        record = self._record
        assert record is not None and self._raw is not None
        chain_rt = rt.select(facts)
        if chain_rt is None:
            rt.stats.no_filter_chain_match.inc()
            self._close()
            return
        record.info.filter_chain = chain_rt.chain.name
        socket = chain_rt.transport.create()
        socket.start(
            self._raw,
            _AppBuilder(chain_rt, record),
            initial_data=initial,
            on_failure=_HandshakeFailed(record),
        )


class _AppBuilder:
    """Called by the transport socket once the connection is established."""

    __slots__ = ("_chain", "_record")

    def __init__(self, chain: ChainRuntime, record: ConnectionRecord) -> None:
        self._chain = chain
        self._record = record

    def __call__(self, security: SecurityInfo) -> asyncio.BaseProtocol:
        record = self._record
        record.info.security = security
        if security.tls:
            record.runtime.stats.ssl_handshake.inc()
        app = self._chain.app.protocol_for(record.info)
        record.app = app
        tracker: asyncio.BaseProtocol
        if isinstance(app, asyncio.BufferedProtocol):
            tracker = TrackedBufferedProtocol(app, record)
        else:
            tracker = TrackedProtocol(app, record)
        record.tracker = tracker
        return tracker


class _HandshakeFailed:
    __slots__ = ("_record",)

    def __init__(self, record: ConnectionRecord) -> None:
        self._record = record

    def __call__(self, err: HandshakeError) -> None:
        record = self._record
        stats = record.runtime.stats
        stats.ssl_counter(err.stat or "connection_error").inc()
        log.info(
            "listener %s: TLS handshake with %s:%s failed: %s",
            record.info.listener, record.info.peer[0], record.info.peer[1], err,
        )
        record.finish()
