from __future__ import annotations

import asyncio
from pathlib import Path

import grpc
import pytest

from meshlet.control.registry import RegistrationTokens
from meshlet.control.resources import Workload
from meshlet.control.server import ControlPlane, ControlPlaneSettings, load_mount
from meshlet.errors import ConfigError


async def echo_mount(plane: ControlPlane) -> None:
    """A mount as the xDS and CA parts write them: services added before start."""

    async def echo(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        return b"echo:" + request

    handler = grpc.unary_unary_rpc_method_handler(echo)
    plane.grpc_server.add_generic_rpc_handlers(
        (grpc.method_handlers_generic_handler("meshlet.test.Echo", {"Echo": handler}),))

    async def on_stop() -> None:
        STOPPED.append(plane)

    plane.on_stop.append(on_stop)


STOPPED: list[ControlPlane] = []


def settings(tmp_path: Path, health_timeout: float = 30.0) -> ControlPlaneSettings:
    return ControlPlaneSettings(store_url=f"sqlite:{tmp_path / 'cp.db'}", api_port=0, xds_port=0,
                                health_timeout=health_timeout)


async def test_mounts_serve_on_the_grpc_port_and_stop_hooks_run(tmp_path: Path) -> None:
    plane = ControlPlane(settings(tmp_path))
    await plane.open()
    await plane.mount([load_mount("test_control_plane_server:echo_mount")])
    await plane.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{plane.xds_port}") as channel:
            call = channel.unary_unary("/meshlet.test.Echo/Echo")
            assert await asyncio.wait_for(call(b"hi"), 5) == b"echo:hi"
    finally:
        await plane.stop()
    assert [plane] == STOPPED


def test_load_mount_names_what_is_wrong() -> None:
    with pytest.raises(ConfigError, match="is not module:function"):
        load_mount("meshlet.control.server")
    with pytest.raises(ConfigError, match="cannot import no_such_module"):
        load_mount("no_such_module:mount")
    with pytest.raises(ConfigError, match="has no function 'nothing'"):
        load_mount("meshlet.control.server:nothing")


async def test_silent_workloads_are_swept_to_unhealthy(tmp_path: Path) -> None:
    plane = ControlPlane(settings(tmp_path, health_timeout=1.0))
    await plane.open()
    await plane.start()
    try:
        assert isinstance(plane.tokens, RegistrationTokens)
        token = plane.tokens.issue("default", "reviews")
        workload = await plane.registry.register(token, service="reviews", address="127.0.0.1",
                                                 ports={"http": 9080})
        await plane.registry.report_health("default", workload.name, "HEALTHY")
        for _ in range(80):  # up to 8 s
            current = await plane.store.get("Workload", "default", workload.name)
            if isinstance(current, Workload) and current.status.health == "UNHEALTHY":
                break
            await asyncio.sleep(0.1)
        else:
            pytest.fail("the workload was never marked UNHEALTHY")
    finally:
        await plane.stop()


async def test_a_busy_port_is_a_config_error(tmp_path: Path) -> None:
    first = ControlPlane(settings(tmp_path))
    await first.open()
    await first.start()
    try:
        second = ControlPlane(ControlPlaneSettings(store_url=f"sqlite:{tmp_path / 'b.db'}",
                                                   api_port=first.api.bound[1], xds_port=0))
        await second.open()
        with pytest.raises(ConfigError, match="cannot listen"):
            await second.start()
        await second.stop()
    finally:
        await first.stop()
