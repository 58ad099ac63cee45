"""The etcd store against a real 3-member etcd cluster on loopback."""

from __future__ import annotations

import asyncio
import re
import select
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import grpc
import httpx
import pytest

from control import store_contract
from control.etcd_cluster import EtcdCluster
from meshlet.control.store import EventType, StoreError, etcd_client, open_store
from meshlet.control.store.etcd import EtcdStore
from meshlet.control.store.etcd_client import prefix_end

pytestmark = pytest.mark.slow


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[EtcdCluster]:
    etcd = EtcdCluster(tmp_path)
    try:
        etcd.start()
        yield etcd
    finally:
        etcd.stop()


@pytest.fixture
async def store(cluster: EtcdCluster) -> AsyncIterator[EtcdStore]:
    opened = await EtcdStore.open(cluster.endpoints)
    try:
        yield opened
    finally:
        await opened.close()


async def test_crud_and_versions(store: EtcdStore) -> None:
    await store_contract.check_crud_and_versions(store)


async def test_optimistic_concurrency(store: EtcdStore) -> None:
    await store_contract.check_optimistic_concurrency(store)


async def test_watch_resumes_from_revision(store: EtcdStore) -> None:
    await store_contract.check_watch_resumes(store)


async def test_reads_writes_and_watches_survive_a_killed_member(cluster: EtcdCluster) -> None:
    # The store starts on member 1, which is then killed under it.
    store = await open_store("etcd:" + ",".join(cluster.endpoints))
    other = await EtcdStore.open(list(reversed(cluster.endpoints)))
    try:
        vs, dr, svc = store_contract.resources()
        watch = store.watch(None, start_revision=await store.revision())
        await store.put(vs)
        (added,) = await store_contract.next_events(watch, 1)
        assert added.type is EventType.ADDED

        cluster.kill(cluster.members[0])

        await store.put(dr)  # fails over to a live member, through the election
        await other.put(svc)
        assert await store.get(*svc.key) is not None
        events = await store_contract.next_events(watch, 2)
        assert [e.resource.kind for e in events] == ["DestinationRule", "Service"]
        snapshot = await other.snapshot()
        assert sorted(r.kind for r in snapshot.resources) == ["DestinationRule", "Service", "VirtualService"]
        await watch.aclose()
    finally:
        await store.close()
        await other.close()


async def test_no_live_endpoint_is_a_clear_error(cluster: EtcdCluster) -> None:
    store = await EtcdStore.open(cluster.endpoints)
    store.client.retry_for = 0.5
    try:
        cluster.stop()
        with pytest.raises(StoreError, match="no endpoint answered"):
            await store.get("VirtualService", "default", "reviews")
    finally:
        await store.close()


def test_prefix_end() -> None:
    assert prefix_end(b"/meshlet/") == b"/meshlet0"
    assert prefix_end(b"a\xff") == b"b"
    assert prefix_end(b"\xff") == b"\0"


class Replica:
    """A `meshlet control-plane run` process on the etcd cluster."""

    def __init__(self, endpoints: list[str]) -> None:
        command = [sys.executable, "-m", "meshlet.cli.main", "control-plane", "run", "--api-port", "0",
                   "--xds-port", "0", "--store", "etcd:" + ",".join(endpoints), "--log-level", "warning"]
        self.process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        assert self.process.stdout is not None
        readable, _, _ = select.select([self.process.stdout], [], [], 20.0)
        line = self.process.stdout.readline() if readable else ""
        match = re.search(r"api=(\S+) xds=(\S+)", line)
        if match is None:
            self.kill()
            raise RuntimeError(f"replica did not start: {line!r}")
        self.url, self.xds = match.group(1), match.group(2)

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait(timeout=10)


async def test_replicas_share_config_and_survive_a_member_and_a_replica(cluster: EtcdCluster) -> None:
    replicas = [Replica(cluster.endpoints), Replica(list(reversed(cluster.endpoints)))]
    watcher = await EtcdStore.open(cluster.endpoints[1:])  # stands in for a replica's xDS watch
    try:
        watch = watcher.watch(["VirtualService"], start_revision=await watcher.revision())
        vs_path = "/apis/networking.istio.io/v1/namespaces/default/virtualservices/reviews"
        documents = store_contract.DOCS.split("---")
        async with httpx.AsyncClient(timeout=15.0) as http:
            applied = await http.post(replicas[0].url + "/apply", content=store_contract.DOCS)
            assert applied.status_code == 200, applied.text
            seen = await http.get(replicas[1].url + vs_path)
            assert seen.status_code == 200
            assert seen.json()["spec"]["http"][0]["route"][0]["destination"]["subset"] == "v1"

            cluster.kill(cluster.members[0])
            replicas[0].kill()

            changed = documents[0].replace("subset: v1", "subset: v2")
            put = await http.post(replicas[1].url + "/apply", content=changed)
            assert put.json()["results"][0]["action"] == "configured"
            after = await http.get(replicas[1].url + vs_path)
            assert after.json()["spec"]["http"][0]["route"][0]["destination"]["subset"] == "v2"
        events = await store_contract.next_events(watch, 2)
        assert [e.type for e in events] == [EventType.ADDED, EventType.MODIFIED]
        assert events[1].resource.spec.http[0].route[0].destination.subset == "v2"
        await watch.aclose()
    finally:
        await watcher.close()
        for replica in replicas:
            replica.kill()


async def test_an_idle_watch_keeps_reopening_without_giving_up(store: EtcdStore,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    # Streams silent for longer than the idle timeout are reopened; as long as
    # etcd accepts them, the watch never counts that as failure.
    monkeypatch.setattr(etcd_client, "WATCH_IDLE_TIMEOUT", 0.2)
    store.client.retry_for = 0.5
    watch = store.watch(None, start_revision=await store.revision())
    pending = asyncio.ensure_future(anext(watch))
    await asyncio.sleep(1.5)  # several idle periods, longer than retry_for
    assert not pending.done()
    stored = await store.put(store_contract.resources()[0])
    event = await asyncio.wait_for(pending, 10)
    assert event.revision == int(stored.metadata.resource_version or 0)
    await watch.aclose()


CLUSTER_TYPE = "type.googleapis.com/envoy.config.cluster.v3.Cluster"
MESH = """
apiVersion: meshlet.dev/v1
kind: Service
metadata: {name: reviews}
spec: {ports: [{name: http, number: 9080}]}
---
apiVersion: meshlet.dev/v1
kind: Workload
metadata: {name: reviews-v1}
spec: {address: 127.0.0.1, ports: {http: 19080}, labels: {app: reviews, version: v1}}
"""


def service(name: str) -> str:
    return (f"apiVersion: meshlet.dev/v1\nkind: Service\nmetadata: {{name: {name}}}\n"
            "spec: {ports: [{name: http, number: 9080}]}\n")


class AdsProxy:
    """A proxy's side of ADS, reduced to what the test needs: CDS, ACKed."""

    def __init__(self, target: str) -> None:
        from envoy.service.discovery.v3 import ads_pb2_grpc

        self.channel = grpc.aio.insecure_channel(target)
        self.requests: asyncio.Queue[object] = asyncio.Queue()
        stub = ads_pb2_grpc.AggregatedDiscoveryServiceStub(self.channel)
        self.stream = stub.StreamAggregatedResources(self._outgoing())
        self.send("", "")

    def send(self, version: str, nonce: str) -> None:
        from envoy.service.discovery.v3 import discovery_pb2

        request = discovery_pb2.DiscoveryRequest(type_url=CLUSTER_TYPE, version_info=version,
                                                 response_nonce=nonce)
        request.node.id = "sidecar~127.0.0.1~reviews-v1.default~default.svc.cluster.local"
        self.requests.put_nowait(request)

    async def _outgoing(self) -> AsyncIterator[object]:
        while True:
            yield await self.requests.get()

    async def clusters_until(self, host: str, timeout: float = 10.0) -> list[str]:
        """Read (and ACK) CDS responses until a cluster for ``host`` shows up."""
        from envoy.config.cluster.v3 import cluster_pb2

        async def read() -> list[str]:
            while True:
                response = await self.stream.read()
                assert response is not grpc.aio.EOF
                names = []
                for item in response.resources:
                    cluster = cluster_pb2.Cluster()
                    item.Unpack(cluster)
                    names.append(cluster.name)
                self.send(response.version_info, response.nonce)
                if any(host in name for name in names):
                    return names

        return await asyncio.wait_for(read(), timeout)

    async def close(self) -> None:
        self.stream.cancel()
        await self.channel.close()


async def test_proxies_keep_getting_updates_through_a_lost_member_and_replica(cluster: EtcdCluster) -> None:
    replicas = [Replica(cluster.endpoints), Replica(list(reversed(cluster.endpoints)))]
    proxy: AdsProxy | None = None
    try:
        async with httpx.AsyncClient(timeout=15.0) as http:
            assert (await http.post(replicas[0].url + "/apply", content=MESH)).status_code == 200
            proxy = AdsProxy(replicas[1].xds)
            await proxy.clusters_until("reviews.default.svc.cluster.local")

            # Written through replica 0, pushed by replica 1 (which saw it in etcd).
            await http.post(replicas[0].url + "/apply", content=service("ratings"))
            await proxy.clusters_until("ratings.default.svc.cluster.local")

            cluster.kill(cluster.members[0])
            replicas[0].kill()
            await http.post(replicas[1].url + "/apply", content=service("details"))
            names = await proxy.clusters_until("details.default.svc.cluster.local")
            assert any("ratings.default.svc.cluster.local" in name for name in names)
    finally:
        if proxy is not None:
            await proxy.close()
        for replica in replicas:
            replica.kill()


async def test_closing_the_store_ends_its_watches(cluster: EtcdCluster) -> None:
    store = await EtcdStore.open(cluster.endpoints)
    watch = store.watch(None, start_revision=await store.revision())
    pending = asyncio.ensure_future(anext(watch))
    await asyncio.sleep(0.3)
    await store.close()
    with pytest.raises(StopAsyncIteration):
        await asyncio.wait_for(pending, 5)
