"""Listener manager over loopback: inspection, chain selection, TLS, updates, draining."""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from listener_tls_helpers import server_tls, uri_san

from certs import CLIENT_SPIFFE_ID, Pki, make_pki
from meshlet.config.model import (
    PLAINTEXT,
    FilterChain,
    FilterChainMatch,
    Listener,
    NetworkFilterConfig,
    SocketAddress,
    TcpProxyConfig,
    TlsContext,
    TransportSocketConfig,
)
from meshlet.errors import ConfigError
from meshlet.proxy.listeners.manager import ListenerManager
from meshlet.proxy.runtime import ProxyRuntime, ProxySettings
from meshlet.proxy.transport import ConnectionInfo

TLS_INSPECTOR = "envoy.filters.listener.tls_inspector"


class LabelProtocol(asyncio.Protocol):
    """Greets with its chain label and connection facts, then echoes lines.
    A line ``slow`` answers after 0.5 s (an in-flight request)."""

    def __init__(self, label: str, info: ConnectionInfo, drained: list[str]) -> None:
        self.label = label
        self.info = info
        self.drained = drained
        self.transport: asyncio.Transport | None = None
        self.busy = 0
        self.closing = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        sec = self.info.security
        transport.write(f"{self.label} chain={self.info.filter_chain} sni={sec.sni} alpn={sec.alpn} "
                        f"spiffe={sec.peer_spiffe_id}\n".encode())

    def data_received(self, data: bytes) -> None:
        assert self.transport is not None
        if data.strip() == b"slow":
            self.busy += 1
            asyncio.get_running_loop().call_later(0.5, self._answer_slow)
        else:
            self.transport.write(data)

    def _answer_slow(self) -> None:
        assert self.transport is not None
        self.busy -= 1
        self.transport.write(f"slow done by {self.label}\n".encode())
        if self.closing:
            self.transport.close()

    def drain(self) -> None:
        self.drained.append(self.label)
        self.closing = True
        if not self.busy and self.transport is not None:
            self.transport.close()


class LabelApp:
    def __init__(self, label: str, drained: list[str]) -> None:
        self.label = label
        self.drained = drained

    def protocol_for(self, info: ConnectionInfo) -> asyncio.Protocol:
        return LabelProtocol(self.label, info, self.drained)


def chain(label: str, transport: TransportSocketConfig = PLAINTEXT, **match: object) -> FilterChain:
    return FilterChain(
        name=label, match=FilterChainMatch(**match),  # type: ignore[arg-type]
        transport_socket=transport, filters=(TcpProxyConfig(stat_prefix=label, cluster="unused"),),
    )


def tls_socket(ctx: TlsContext) -> TransportSocketConfig:
    return TransportSocketConfig(name="envoy.transport_sockets.tls", tls=ctx)


def listener(name: str, *chains: FilterChain, port: int = 0, **kw: object) -> Listener:
    return Listener(name=name, address=SocketAddress("127.0.0.1", port), filter_chains=chains, **kw)  # type: ignore[arg-type]


class Harness:
    def __init__(self) -> None:
        self.runtime = ProxyRuntime(ProxySettings(drain_time=2.0))
        self.drained: list[str] = []

        def builder(cfg: NetworkFilterConfig, runtime: ProxyRuntime, path: str, tag: str) -> LabelApp:
            assert isinstance(cfg, TcpProxyConfig)
            return LabelApp(cfg.stat_prefix, self.drained)

        self.manager = ListenerManager(self.runtime, app_builder=builder)

    def port(self, name: str) -> int:
        addr = self.manager.address(name)
        assert addr is not None
        return addr[1]

    def stat(self, name: str) -> int | None:
        return self.runtime.stats.value(name)


@pytest.fixture
async def harness() -> AsyncIterator[Harness]:
    h = Harness()
    try:
        yield h
    finally:
        await h.manager.close()


@pytest.fixture
def pki(tmp_path: Path) -> Pki:
    return make_pki(tmp_path / "pki")


async def greet(port: int, *, ssl_ctx: ssl.SSLContext | None = None, sni: str | None = None
                ) -> tuple[str, asyncio.StreamReader, asyncio.StreamWriter]:
    reader, writer = await asyncio.wait_for(
        asyncio.open_connection("127.0.0.1", port, ssl=ssl_ctx, server_hostname=sni if ssl_ctx else None), 5
    )
    line = await asyncio.wait_for(reader.readline(), 5)
    return line.decode(), reader, writer


def client_ctx(pki: Pki, alpn: list[str] | None = None, cert: bool = False) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=str(pki.ca_cert))
    ctx.check_hostname = False
    if alpn:
        ctx.set_alpn_protocols(alpn)
    if cert:
        ctx.load_cert_chain(pki.client_cert, pki.client_key)
    return ctx


async def test_plain_listener_stats(harness: Harness) -> None:
    await harness.manager.update({"plain": listener("plain", chain("only"), stat_prefix="plain")})
    port = harness.port("plain")
    line, reader, writer = await greet(port)
    assert line.startswith("only chain=only")
    assert harness.stat("listener.plain.downstream_cx_total") == 1
    assert harness.stat("listener.plain.downstream_cx_active") == 1
    writer.write(b"echo me\n")
    assert await asyncio.wait_for(reader.readline(), 5) == b"echo me\n"
    writer.close()
    async with asyncio.timeout(5):
        while harness.stat("listener.plain.downstream_cx_active") != 0:
            await asyncio.sleep(0.01)


async def test_sni_alpn_and_transport_protocol_selection(harness: Harness, pki: Pki) -> None:
    tls = tls_socket(server_tls(pki, alpn=("h2", "http/1.1")))
    await harness.manager.update({"edge": listener(
        "edge",
        chain("api", tls, server_names=("api.example.com",), transport_protocol="tls"),
        chain("wild-h2", tls, server_names=("*.example.com",), application_protocols=("h2",)),
        chain("wild", tls, server_names=("*.example.com",)),
        chain("plain", transport_protocol="raw_buffer"),
        listener_filters=(TLS_INSPECTOR,), stat_prefix="edge",
    )})
    port = harness.port("edge")
    line, _, w = await greet(port, ssl_ctx=client_ctx(pki), sni="api.example.com")
    assert line.startswith("api chain=api sni=api.example.com")
    w.close()
    line, _, w = await greet(port, ssl_ctx=client_ctx(pki, ["h2"]), sni="www.example.com")
    assert line.startswith("wild-h2 ") and "alpn=h2" in line
    w.close()
    line, _, w = await greet(port, ssl_ctx=client_ctx(pki, ["http/1.1"]), sni="www.example.com")
    assert line.startswith("wild ") and "alpn=http/1.1" in line
    w.close()
    # Plaintext: the inspector says raw_buffer; the bytes it read reach the app.
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"hello plain\n")
    assert (await asyncio.wait_for(reader.readline(), 5)).startswith(b"plain chain=plain")
    assert await asyncio.wait_for(reader.readline(), 5) == b"hello plain\n"
    writer.close()
    # TLS with an unknown name: no chain, the connection is closed.
    with pytest.raises((ssl.SSLError, ConnectionError)):
        await greet(port, ssl_ctx=client_ctx(pki), sni="other.org")
    assert harness.stat("listener.edge.no_filter_chain_match") == 1
    assert harness.stat("tls_inspector.tls_found") == 4
    assert harness.stat("tls_inspector.tls_not_found") == 1
    assert harness.stat("listener.edge.ssl.handshake") == 3


async def test_mtls_san_failure_counts_and_others_unaffected(harness: Harness, pki: Pki) -> None:
    strict = tls_socket(server_tls(pki, require_client=True, sans=(uri_san("spiffe://mesh.local/ns/x/sa/y"),)))
    await harness.manager.update({"m": listener("m", chain("strict", strict), stat_prefix="m")})
    port = harness.port("m")
    try:
        line, _, w = await greet(port, ssl_ctx=client_ctx(pki, cert=True), sni="localhost")
        w.close()
        assert line == ""  # closed without a greeting
    except (ssl.SSLError, ConnectionError):
        pass
    async with asyncio.timeout(5):
        while harness.stat("listener.m.ssl.fail_verify_san") != 1:
            await asyncio.sleep(0.01)
    assert harness.stat("listener.m.downstream_cx_active") == 0
    ok = tls_socket(server_tls(pki, require_client=True, sans=(uri_san(CLIENT_SPIFFE_ID),)))
    await harness.manager.update({"m": listener("m", chain("ok", ok), stat_prefix="m")})
    line, _, w = await greet(harness.port("m"), ssl_ctx=client_ctx(pki, cert=True), sni="localhost")
    assert f"spiffe={CLIENT_SPIFFE_ID}" in line
    w.close()


async def test_inspector_timeout_closes(harness: Harness) -> None:
    await harness.manager.update({"t": listener(
        "t", chain("plain"), listener_filters=(TLS_INSPECTOR,), listener_filters_timeout=0.2, stat_prefix="t",
    )})
    reader, writer = await asyncio.open_connection("127.0.0.1", harness.port("t"))
    assert await asyncio.wait_for(reader.read(), 5) == b""
    writer.close()
    assert harness.stat("listener.t.downstream_pre_cx_timeout") == 1


async def test_update_keeps_unchanged_swaps_changed_and_removes(harness: Harness) -> None:
    m = harness.manager
    await m.update({"keep": listener("keep", chain("k1")), "change": listener("change", chain("c1")),
                    "gone": listener("gone", chain("g1"))})
    keep_port, change_port, gone_port = harness.port("keep"), harness.port("change"), harness.port("gone")
    _, keep_r, keep_w = await greet(keep_port)
    line, change_r, change_w = await greet(change_port)
    assert line.startswith("c1 ")
    change_w.write(b"slow\n")  # in flight when the config changes
    await asyncio.sleep(0.05)

    await m.update({"keep": listener("keep", chain("k1")), "change": listener("change", chain("c2"))})

    # Unchanged: same socket, the existing connection is untouched.
    assert harness.port("keep") == keep_port
    keep_w.write(b"still here\n")
    assert await asyncio.wait_for(keep_r.readline(), 5) == b"still here\n"
    # Changed: same port, new connections see the new chain...
    assert harness.port("change") == change_port
    line, _, w = await greet(change_port)
    assert line.startswith("c2 ")
    w.close()
    # ...while the in-flight request finishes on the old one, which then drains.
    assert await asyncio.wait_for(change_r.readline(), 5) == b"slow done by c1\n"
    assert await asyncio.wait_for(change_r.read(), 5) == b""
    assert harness.drained == ["c1"]
    assert harness.stat("listener_manager.listener_added") == 3
    assert harness.stat("listener_manager.listener_modified") == 1
    assert harness.stat("listener_manager.listener_removed") == 1
    assert harness.stat("listener_manager.total_listeners_active") == 2
    # Removed: no longer accepting.
    with pytest.raises(OSError):
        await asyncio.wait_for(asyncio.open_connection("127.0.0.1", gone_port), 5)
    keep_w.close()
    change_w.close()


async def test_bad_update_changes_nothing(harness: Harness, pki: Pki) -> None:
    m = harness.manager
    await m.update({"a": listener("a", chain("a1"))})
    port = harness.port("a")
    bad = tls_socket(TlsContext(server_side=True, certificates=(), engine="openssl"))
    with pytest.raises(ConfigError, match=r"listeners\[a\]\.filter_chains\[0\]"):
        await m.update({"a": listener("a", chain("a2", bad)), "b": listener("b", chain("b1"))})
    assert m.address("b") is None
    line, _, w = await greet(port)
    assert line.startswith("a1 ")
    w.close()


async def test_bind_conflict_is_a_config_error(harness: Harness) -> None:
    m = harness.manager
    await m.update({"a": listener("a", chain("a1"))})
    taken = harness.port("a")
    with pytest.raises(ConfigError, match="cannot listen"):
        await m.update({"a": listener("a", chain("a1")), "b": listener("b", chain("b1"), port=taken)})
    line, _, w = await greet(taken)
    assert line.startswith("a1 ")
    w.close()


async def test_drain_waits_for_in_flight_then_refuses(harness: Harness) -> None:
    m = harness.manager
    await m.update({"d": listener("d", chain("d1"))})
    port = harness.port("d")
    _, reader, writer = await greet(port)
    writer.write(b"slow\n")
    await asyncio.sleep(0.05)
    drain = asyncio.create_task(m.drain(5.0))
    await asyncio.sleep(0.05)
    with pytest.raises(OSError):
        await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port), 5)
    assert await asyncio.wait_for(reader.readline(), 5) == b"slow done by d1\n"
    assert await asyncio.wait_for(drain, 5) is True
    assert m.active_connections == 0
    writer.close()


async def test_drain_deadline_aborts(harness: Harness) -> None:
    m = harness.manager
    await m.update({"d": listener("d", chain("d1"))})
    _, reader, writer = await greet(harness.port("d"))
    writer.write(b"slow\n")
    await asyncio.sleep(0.05)
    assert await m.drain(0.1) is False
    assert await asyncio.wait_for(reader.read(), 5) == b""
    writer.close()


async def test_meshlet_tls_engine_behind_the_inspector(harness: Harness, pki: Pki) -> None:
    """The listener hands the inspected ClientHello to meshlet's own TLS engine too."""
    tls = tls_socket(server_tls(pki, alpn=("http/1.1",), engine="meshlet"))
    await harness.manager.update({"own": listener(
        "own", chain("own-tls", tls, server_names=("localhost",)),
        listener_filters=(TLS_INSPECTOR,), stat_prefix="own",
    )})
    ctx = client_ctx(pki, ["http/1.1"])
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    line, reader, writer = await greet(harness.port("own"), ssl_ctx=ctx, sni="localhost")
    assert line.startswith("own-tls chain=own-tls sni=localhost alpn=http/1.1")
    writer.write(b"through meshlet tls\n")
    assert await asyncio.wait_for(reader.readline(), 5) == b"through meshlet tls\n"
    writer.close()
    assert harness.stat("listener.own.ssl.handshake") == 1


async def test_handshake_in_progress_survives_a_config_change(harness: Harness, pki: Pki) -> None:
    import socket as socket_mod

    tls = tls_socket(server_tls(pki))
    await harness.manager.update({"h": listener("h", chain("old", tls))})
    port = harness.port("h")
    sock = socket_mod.create_connection(("127.0.0.1", port), timeout=5)
    sock.setblocking(False)
    await asyncio.sleep(0.05)  # accepted, waiting for the ClientHello
    await harness.manager.update({"h": listener("h", chain("new", tls))})
    reader, writer = await asyncio.open_connection(
        sock=sock, ssl=client_ctx(pki), server_hostname="localhost"
    )
    # The connection finishes its handshake on the chain it was accepted on,
    # then drains like every other connection of the old config.
    assert (await asyncio.wait_for(reader.readline(), 5)).startswith(b"old ")
    assert await asyncio.wait_for(reader.read(), 5) == b""
    writer.close()
    assert harness.drained == ["old"]
    line, _, w = await greet(port, ssl_ctx=client_ctx(pki), sni="localhost")
    assert line.startswith("new ")
    w.close()


async def test_hostile_input_never_reaches_the_loop_error_handler(harness: Harness, pki: Pki) -> None:
    import os

    errors: list[dict[str, object]] = []
    loop = asyncio.get_running_loop()
    loop.set_exception_handler(lambda _loop, ctx: errors.append(ctx))
    tls = tls_socket(server_tls(pki))
    await harness.manager.update({"x": listener(
        "x", chain("tls", tls, transport_protocol="tls"), chain("plain", transport_protocol="raw_buffer"),
        listener_filters=(TLS_INSPECTOR,), listener_filters_timeout=1.0, stat_prefix="x",
    )})
    port = harness.port("x")
    hello = b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + os.urandom(40)
    payloads = [
        os.urandom(3000),
        hello,  # truncated ClientHello, then close
        hello + os.urandom(600),  # a "ClientHello" of random bytes
        # A ClientHello announced larger than the inspector allows, in valid records.
        b"\x16\x03\x01\x40\x00\x01\x00\xff\xff" + b"\x00" * 0x3FFC
        + (b"\x16\x03\x01\x40\x00" + b"\x00" * 0x4000) * 4,
        b"\x16\x03\x03\x00\x05\x01\x00\x00\x01\x00",  # well-framed but malformed hello body
    ]
    for data in payloads:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(data)
        try:
            await asyncio.wait_for(reader.read(100000), 3)
        except (ConnectionError, TimeoutError):
            pass
        writer.close()
    line, _, w = await greet(port, ssl_ctx=client_ctx(pki), sni="localhost")
    assert line.startswith("tls ")
    w.close()
    assert errors == []
    assert harness.stat("tls_inspector.client_hello_too_large") == 1
