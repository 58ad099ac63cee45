from __future__ import annotations

import asyncio
import shutil
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest

from meshlet.control.registry import RegistrationTokens
from meshlet.control.server import ControlPlane, ControlPlaneSettings

VS_PATH = "/apis/networking.istio.io/v1/namespaces/default/virtualservices/reviews"
REVIEWS = """
apiVersion: meshlet.dev/v1
kind: Service
metadata: {name: reviews}
spec: {ports: [{name: http, number: 9080}]}
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: reviews}
spec:
  host: reviews
  subsets: [{name: v1, labels: {version: v1}}]
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: reviews}
spec:
  hosts: [reviews]
  http: [{route: [{destination: {host: reviews, subset: v1}, weight: 90}]}]
"""


@pytest.fixture
async def plane(tmp_path: Path) -> AsyncIterator[ControlPlane]:
    settings = ControlPlaneSettings(store_url=f"sqlite:{tmp_path / 'cp.db'}", api_port=0, xds_port=0)
    control = ControlPlane(settings, tokens=RegistrationTokens.in_memory())
    await control.open()
    await control.start()
    try:
        yield control
    finally:
        await control.stop()


@pytest.fixture
async def client(plane: ControlPlane) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=plane.api.url, timeout=5.0) as http:
        yield http


async def test_apply_then_get_list_and_unchanged_reapply(client: httpx.AsyncClient) -> None:
    response = await client.post("/apply", content=REVIEWS)
    assert response.status_code == 200, response.text
    assert [r["action"] for r in response.json()["results"]] == ["created", "created", "created"]
    again = await client.post("/apply", content=REVIEWS)
    assert [r["action"] for r in again.json()["results"]] == ["unchanged"] * 3
    changed = await client.post("/apply", content=REVIEWS.replace("weight: 90", "weight: 100"))
    assert [r["action"] for r in changed.json()["results"]] == ["unchanged", "unchanged", "configured"]

    got = (await client.get(VS_PATH)).json()
    assert got["spec"]["http"][0]["route"][0]["weight"] == 100
    assert got["metadata"]["generation"] == 2
    listed = (await client.get("/apis/networking.istio.io/v1/virtualservices")).json()
    assert listed["kind"] == "List" and [i["metadata"]["name"] for i in listed["items"]] == ["reviews"]
    scoped = await client.get("/apis/networking.istio.io/v1/namespaces/other/virtualservices")
    assert scoped.json()["items"] == []
    # Older Istio versions address the same resources.
    assert (await client.get(VS_PATH.replace("/v1/", "/v1alpha3/"))).status_code == 200


async def test_invalid_apply_writes_nothing_and_names_the_fields(client: httpx.AsyncClient) -> None:
    bad = REVIEWS.replace("weight: 90", "weight: 900")
    bad = bad.replace("host: reviews\n", "host: reviews\n  bogus: 1\n")
    response = await client.post("/apply", content=bad)
    assert response.status_code == 400
    problems = response.json()["problems"]
    assert ("request body#1: DestinationRule default/reviews: spec.bogus: unknown field "
            "(or one meshlet does not implement)") in problems
    assert ("request body#2: VirtualService default/reviews: spec.http[0].route[0].weight: weight 900 "
            "is out of range 0..100") in problems
    assert (await client.get(VS_PATH)).status_code == 404
    assert (await client.get("/apis/meshlet.dev/v1/services")).json()["items"] == []


async def test_put_with_resource_version_is_compare_and_swap(client: httpx.AsyncClient) -> None:
    vs = REVIEWS.split("---")[2]
    created = await client.put(VS_PATH, content=vs)
    assert created.status_code == 201
    version = created.json()["metadata"]["resourceVersion"]
    meta = "metadata: {name: reviews}"
    stale = vs.replace(meta, "metadata: {name: reviews, resourceVersion: '0'}")
    assert (await client.put(VS_PATH, content=stale)).status_code == 409
    fresh = vs.replace(meta, f"metadata: {{name: reviews, resourceVersion: '{version}'}}")
    assert (await client.put(VS_PATH, content=fresh)).status_code == 200
    mismatch = await client.put(VS_PATH.replace("/reviews", "/ratings"), content=vs)
    assert mismatch.status_code == 400
    assert "path names VirtualService default/ratings" in mismatch.json()["error"]
    assert (await client.delete(VS_PATH, params={"resourceVersion": version})).status_code == 409
    assert (await client.delete(VS_PATH)).status_code == 200
    assert (await client.delete(VS_PATH)).status_code == 404


@pytest.mark.parametrize(("method", "path", "status"), [
    ("GET", "/apis/networking.istio.io/v1/namespaces/default/pods/x", 404),
    ("GET", "/apis/security.istio.io/v1/namespaces/default/virtualservices/x", 404),
    ("POST", VS_PATH, 405),
    ("GET", "/apply", 405),
    ("GET", "/nowhere", 404),
])
async def test_bad_paths_and_methods(client: httpx.AsyncClient, method: str, path: str, status: int) -> None:
    response = await client.request(method, path)
    assert response.status_code == status and response.json()["error"]


async def test_analyze_over_the_store(client: httpx.AsyncClient) -> None:
    await client.post("/apply", content=REVIEWS)
    findings = (await client.get("/analyze")).json()["findings"]
    assert [(f["code"], f["resource"]) for f in findings] == [
        ("IST0173", "DestinationRule default/reviews"), ("MSH0001", "VirtualService default/reviews")]


async def test_registry_endpoints(plane: ControlPlane, client: httpx.AsyncClient) -> None:
    issued = await client.post("/registry/tokens", json={"namespace": "default", "serviceAccount": "reviews"})
    assert issued.status_code == 201
    token = issued.json()["token"]
    body = {"token": token, "service": "reviews", "version": "v1", "address": "127.0.0.1",
            "ports": {"http": 19080}, "proxyId": "sidecar~reviews-1"}
    registered = await client.post("/registry/register", json=body)
    assert registered.status_code == 201, registered.text
    name = registered.json()["metadata"]["name"]
    assert (await client.post("/registry/register", json=body)).status_code == 403  # token spent
    health = await client.post("/registry/health", json={"namespace": "default", "name": name,
                                                          "health": "HEALTHY"})
    assert health.json()["status"]["health"] == "HEALTHY"
    assert (await client.post("/registry/health", json={"namespace": "default", "name": name,
                                                         "health": "GREAT"})).status_code == 400
    gone = await client.post("/registry/deregister", json={"namespace": "default", "name": name,
                                                            "proxyId": "sidecar~reviews-1"})
    assert gone.status_code == 200
    assert (await client.get("/apis/meshlet.dev/v1/workloads")).json()["items"] == []


async def test_apply_namespace_and_workload_status_kept(client: httpx.AsyncClient) -> None:
    workload = ("apiVersion: meshlet.dev/v1\nkind: Workload\nmetadata: {name: w1}\n"
                "spec: {address: 127.0.0.1, labels: {app: reviews}}\n")
    created = await client.post("/apply", params={"namespace": "shop"}, content=workload)
    assert created.json()["results"][0]["namespace"] == "shop"
    path = "/apis/meshlet.dev/v1/namespaces/shop/workloads/w1"
    health = await client.post("/registry/health", json={"namespace": "shop", "name": "w1",
                                                          "health": "HEALTHY"})
    assert health.status_code == 200
    # Re-applying the manifest (which has no status) keeps what the proxy reported.
    again = await client.post("/apply", params={"namespace": "shop"}, content=workload)
    assert again.json()["results"][0]["action"] == "unchanged"
    put = await client.put(path, content=workload.replace("app: reviews", "app: reviews, version: v1"))
    assert put.status_code == 200
    assert put.json()["status"]["health"] == "HEALTHY"
    assert put.json()["metadata"]["namespace"] == "shop"


async def test_oversized_body_is_refused(client: httpx.AsyncClient) -> None:
    response = await client.post("/apply", content=b"#" * (5 * 1024 * 1024))
    assert response.status_code == 413


@pytest.mark.skipif(shutil.which("curl") is None, reason="curl not installed")
async def test_curl_applies_and_reads(plane: ControlPlane, tmp_path: Path) -> None:
    manifest = tmp_path / "reviews.yaml"
    manifest.write_text(REVIEWS)
    process = await asyncio.create_subprocess_exec(
        "curl", "-sS", "--max-time", "5", "--data-binary", f"@{manifest}", f"{plane.api.url}/apply",
        stdout=asyncio.subprocess.PIPE)
    try:
        out, _ = await asyncio.wait_for(process.communicate(), 10)
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
    assert b'"action": "created"' in out
    assert await plane.store.get("VirtualService", "default", "reviews") is not None


async def test_grpc_server_is_open_for_mounts(plane: ControlPlane) -> None:
    import grpc

    assert plane.xds_port
    async with grpc.aio.insecure_channel(f"127.0.0.1:{plane.xds_port}") as channel:
        await asyncio.wait_for(channel.channel_ready(), 5)
