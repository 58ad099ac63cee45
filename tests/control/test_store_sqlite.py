from __future__ import annotations

import asyncio
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from control import store_contract
from meshlet.control.store import Compacted, EventType, StoreError, open_store
from meshlet.control.store.sqlite import SqliteStore


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[SqliteStore]:
    opened = await SqliteStore.open(tmp_path / "meshlet.db", poll_interval=0.05)
    try:
        yield opened
    finally:
        await opened.close()


async def test_crud_and_versions(store: SqliteStore) -> None:
    await store_contract.check_crud_and_versions(store)


async def test_optimistic_concurrency(store: SqliteStore) -> None:
    await store_contract.check_optimistic_concurrency(store)


async def test_watch_resumes_from_revision(store: SqliteStore) -> None:
    await store_contract.check_watch_resumes(store)


async def test_state_survives_reopen_and_schema_is_versioned(tmp_path: Path) -> None:
    path = tmp_path / "nested" / "meshlet.db"
    first = await open_store(f"sqlite:{path}")
    stored = await first.put(store_contract.resources()[0])
    await first.close()
    second = await SqliteStore.open(path)
    try:
        assert await second.get(*stored.key) == stored
        assert await second.revision() == int(stored.metadata.resource_version or 0)
    finally:
        await second.close()
    import sqlite3

    with sqlite3.connect(path) as db:
        db.execute("UPDATE schema_version SET version = 99")
    with pytest.raises(StoreError, match="schema version 99"):
        await SqliteStore.open(path)


async def test_two_stores_on_one_file_see_each_others_writes(tmp_path: Path) -> None:
    path = tmp_path / "shared.db"
    writer = await SqliteStore.open(path)
    reader = await SqliteStore.open(path, poll_interval=0.05)
    try:
        watch = reader.watch(["VirtualService"], start_revision=await reader.revision())
        await writer.put(store_contract.resources()[0])
        (event,) = await store_contract.next_events(watch, 1)
        assert event.type is EventType.ADDED
        await watch.aclose()
    finally:
        await writer.close()
        await reader.close()


async def test_another_process_writing_wakes_the_watch(tmp_path: Path) -> None:
    path = tmp_path / "shared.db"
    store = await SqliteStore.open(path, poll_interval=0.05)
    try:
        start = await store.revision()
        watch = store.watch(None, start_revision=start)
        script = (
            "import asyncio, sys\n"
            "from meshlet.control.store.sqlite import SqliteStore\n"
            "from meshlet.control.resources import load_documents\n"
            "async def main():\n"
            "    s = await SqliteStore.open(sys.argv[1])\n"
            "    for r in load_documents(sys.stdin.read()): await s.put(r)\n"
            "    await s.close()\n"
            "asyncio.run(main())\n"
        )
        process = await asyncio.create_subprocess_exec(
            sys.executable, "-c", script, str(path), stdin=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE)
        try:
            _, stderr = await asyncio.wait_for(process.communicate(store_contract.DOCS.encode()), 30)
        finally:
            if process.returncode is None:
                process.kill()
                await process.wait()
        assert process.returncode == 0, stderr.decode()
        events = await store_contract.next_events(watch, 3)
        assert [e.resource.kind for e in events] == ["VirtualService", "DestinationRule", "Service"]
        await watch.aclose()
    finally:
        await store.close()


async def test_watch_from_a_compacted_revision_is_refused(tmp_path: Path) -> None:
    store = await SqliteStore.open(tmp_path / "c.db", events_kept=10)
    try:
        vs = store_contract.resources()[0]
        for index in range(25):
            await store.put(store_contract.with_subset(vs, f"v{index}"))
        with pytest.raises(Compacted):
            await anext(store.watch(None, start_revision=1))
        recent = store.watch(None, start_revision=20)
        assert (await anext(recent)).revision == 21
        await recent.aclose()
    finally:
        await store.close()


async def test_unknown_kind_is_refused(store: SqliteStore) -> None:
    with pytest.raises(StoreError, match="unknown kind 'Pod'"):
        await store.list("Pod")


WRITER = """
import asyncio, sys
from meshlet.control.resources import load_documents
from meshlet.control.store.sqlite import SqliteStore
TEMPLATE = ("apiVersion: networking.istio.io/v1\\nkind: DestinationRule\\n"
            "metadata: {name: NAME}\\nspec: {host: NAME}\\n")
async def main():
    store = await SqliteStore.open(sys.argv[1])
    for index in range(int(sys.argv[3])):
        (rule,) = load_documents(TEMPLATE.replace("NAME", f"{sys.argv[2]}-{index}"))
        await store.put(rule)
    await store.close()
asyncio.run(main())
"""


async def test_concurrent_writer_processes_get_distinct_ordered_revisions(tmp_path: Path) -> None:
    path = tmp_path / "shared.db"
    store = await SqliteStore.open(path, poll_interval=0.05)
    writes = 40
    try:
        watch = store.watch(None, start_revision=await store.revision())
        writers = [await asyncio.create_subprocess_exec(sys.executable, "-c", WRITER, str(path), prefix,
                                                        str(writes), stderr=asyncio.subprocess.PIPE)
                   for prefix in ("a", "b", "c")]
        try:
            results = await asyncio.wait_for(asyncio.gather(*(w.communicate() for w in writers)), 60)
        finally:
            for writer in writers:
                if writer.returncode is None:
                    writer.kill()
                    await writer.wait()
        assert all(w.returncode == 0 for w in writers), [err.decode() for _, err in results]
        events = await store_contract.next_events(watch, 3 * writes)
        revisions = [e.revision for e in events]
        assert revisions == sorted(set(revisions))  # unique and increasing
        assert len({e.resource.name for e in events}) == 3 * writes
        assert len(await store.list("DestinationRule")) == 3 * writes
        await watch.aclose()
    finally:
        await store.close()


async def test_closing_the_store_ends_its_watches(tmp_path: Path) -> None:
    store = await SqliteStore.open(tmp_path / "w.db", poll_interval=0.05)
    watch = store.watch(None, start_revision=await store.revision())
    pending = asyncio.ensure_future(anext(watch))
    await asyncio.sleep(0.2)
    await store.close()
    with pytest.raises(StopAsyncIteration):
        await asyncio.wait_for(pending, 5)
