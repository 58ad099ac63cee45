"""A small asyncio client for etcd v3's JSON gateway (``/v3/...``) on httpx.

Why not a Python etcd library: ``etcd3`` is unmaintained and its generated
protobuf modules do not load with protobuf >= 4; ``etcd3gw`` is synchronous.
The JSON gateway ships with every etcd v3 server, needs no generated code,
and httpx is already a dependency.

Keys and values travel base64-encoded; int64 fields arrive as strings. The
client talks to one endpoint at a time and moves to the next on a transport
error, a timeout or a 5xx answer, trying each endpoint once per call.
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from typing import Any

import httpx

from meshlet.control.store.base import StoreError

log = logging.getLogger(__name__)

REQUEST_TIMEOUT = 5.0
# How long a call keeps trying endpoints before giving up.
RETRY_FOR = 10.0
CONNECT_TIMEOUT = 2.0
# A watch stream with no message for this long is reopened (from the last
# revision seen) on the next endpoint: a member cut off from the cluster
# keeps the connection open but sends nothing.
WATCH_IDLE_TIMEOUT = 15.0
MAX_WATCH_LINE = 64 * 1024 * 1024


class EtcdUnavailable(StoreError):
    """No endpoint answered."""


class EtcdCompacted(StoreError):
    def __init__(self, compact_revision: int) -> None:
        super().__init__(f"etcd compacted history up to revision {compact_revision}")
        self.compact_revision = compact_revision


@dataclass(frozen=True, slots=True)
class KeyValue:
    key: bytes
    value: bytes
    create_revision: int
    mod_revision: int


@dataclass(frozen=True, slots=True)
class WatchEvent:
    deleted: bool
    kv: KeyValue
    prev_kv: KeyValue | None


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def prefix_end(prefix: bytes) -> bytes:
    """The smallest key greater than every key starting with ``prefix`` (etcd's range_end)."""
    trimmed = bytearray(prefix)
    while trimmed:
        if trimmed[-1] < 0xFF:
            trimmed[-1] += 1
            return bytes(trimmed)
        trimmed.pop()
    return b"\0"


def parse_kv(data: dict[str, Any]) -> KeyValue:
    return KeyValue(
        key=base64.b64decode(data.get("key", "")),
        value=base64.b64decode(data.get("value", "")),
        create_revision=int(data.get("create_revision", 0)),
        mod_revision=int(data.get("mod_revision", 0)),
    )


class EtcdClient:
    def __init__(self, endpoints: Sequence[str], *, timeout: float = REQUEST_TIMEOUT,
                 retry_for: float = RETRY_FOR) -> None:
        if not endpoints:
            raise StoreError("etcd: no endpoints given")
        self.retry_for = retry_for
        self.endpoints = [e.rstrip("/") for e in endpoints]
        self._current = 0
        self.closed = False
        self._http = httpx.AsyncClient(timeout=httpx.Timeout(timeout, connect=CONNECT_TIMEOUT))

    @property
    def endpoint(self) -> str:
        return self.endpoints[self._current]

    async def close(self) -> None:
        self.closed = True
        await self._http.aclose()

    # -- calls ---------------------------------------------------------------- #

    async def call(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        """POST ``body`` to ``/v3/<path>`` on the first endpoint that answers.

        Unreachable members and 5xx answers (no leader, leader changed) move on to
        the next endpoint; rounds over all endpoints repeat with a short pause
        until ``retry_for`` seconds have passed, which rides out an election.
        """
        errors: list[str] = []
        deadline = time.monotonic() + self.retry_for
        pause = 0.05
        while True:
            for _ in range(len(self.endpoints)):
                endpoint = self.endpoint
                try:
                    response = await self._http.post(f"{endpoint}/v3/{path}", json=body)
                except httpx.HTTPError as exc:
                    errors.append(f"{endpoint}: {type(exc).__name__} {exc}".strip())
                    self._next_endpoint()
                    continue
                if response.status_code >= 500 or response.status_code == 429:
                    errors.append(f"{endpoint}: HTTP {response.status_code} {_error_text(response)}")
                    self._next_endpoint()
                    continue
                if response.status_code != 200:
                    raise StoreError(f"etcd {path}: HTTP {response.status_code} {_error_text(response)}")
                result: dict[str, Any] = response.json()
                return result
            if time.monotonic() + pause > deadline:
                distinct = list(dict.fromkeys(errors))[-len(self.endpoints):]
                raise EtcdUnavailable(f"etcd {path}: no endpoint answered within {self.retry_for:g}s "
                                      f"({'; '.join(distinct)})")
            await asyncio.sleep(pause)
            pause = min(pause * 2, 0.5)

    async def range(self, key: bytes, range_end: bytes | None = None, *, revision: int = 0,
                    limit: int = 0) -> tuple[list[KeyValue], int, bool]:
        """(kvs, header revision, more)."""
        body: dict[str, Any] = {"key": b64(key)}
        if range_end is not None:
            body["range_end"] = b64(range_end)
        if revision:
            body["revision"] = str(revision)
        if limit:
            body["limit"] = str(limit)
        result = await self.call("kv/range", body)
        kvs = [parse_kv(kv) for kv in result.get("kvs", [])]
        return kvs, int(result["header"]["revision"]), bool(result.get("more", False))

    async def txn(self, compare: list[dict[str, Any]], success: list[dict[str, Any]],
                  failure: list[dict[str, Any]] | None = None) -> tuple[bool, dict[str, Any]]:
        body: dict[str, Any] = {"compare": compare, "success": success}
        if failure:
            body["failure"] = failure
        result = await self.call("kv/txn", body)
        return bool(result.get("succeeded", False)), result

    async def watch(self, key: bytes, range_end: bytes, start_revision: int) -> AsyncIterator[WatchEvent]:
        """Events from ``start_revision`` on; reopens the stream (on another endpoint if need
        be) after an error or a silent period, from the revision after the last one seen.
        Gives up with ``EtcdUnavailable`` only when no endpoint opens a stream for
        ``retry_for`` seconds."""
        next_revision = start_revision
        failing_since: float | None = None
        while not self.closed:
            endpoint = self.endpoint
            stream = _WatchStream(self._http, endpoint, key, range_end, next_revision)
            try:
                async for event in stream:
                    next_revision = event.kv.mod_revision + 1
                    yield event
            except (httpx.HTTPError, json.JSONDecodeError, _StreamEnded, RuntimeError) as exc:
                if self.closed:
                    return  # the client was closed under the watch: the watch ends
                log.info("etcd watch on %s ended (%s); reopening", endpoint, type(exc).__name__)
                self._next_endpoint()
                if stream.opened:
                    failing_since = None
                    continue
                now = time.monotonic()
                failing_since = failing_since if failing_since is not None else now
                if now - failing_since > self.retry_for:
                    raise EtcdUnavailable(f"etcd watch: no endpoint opened a stream in "
                                          f"{self.retry_for:g}s ({type(exc).__name__} {exc})") from exc
                await asyncio.sleep(0.2)

    def _next_endpoint(self) -> None:
        self._current = (self._current + 1) % len(self.endpoints)


class _StreamEnded(Exception):
    pass


class _WatchStream:
    """One ``/v3/watch`` stream; ``opened`` turns true once etcd confirms the watch."""

    def __init__(self, http: httpx.AsyncClient, endpoint: str, key: bytes, range_end: bytes,
                 start_revision: int) -> None:
        self._http = http
        self._url = f"{endpoint}/v3/watch"
        self._create = {"create_request": {"key": b64(key), "range_end": b64(range_end),
                                           "start_revision": str(start_revision), "prev_kv": True}}
        self.opened = False

    async def __aiter__(self) -> AsyncIterator[WatchEvent]:
        timeout = httpx.Timeout(WATCH_IDLE_TIMEOUT, connect=CONNECT_TIMEOUT)
        async with self._http.stream("POST", self._url, json=self._create, timeout=timeout) as response:
            if response.status_code != 200:
                raise _StreamEnded(f"HTTP {response.status_code}")
            async for line in response.aiter_lines():
                if not line.strip():
                    continue
                if len(line) > MAX_WATCH_LINE:
                    raise _StreamEnded("oversized watch message")
                for event in self._events(json.loads(line)):
                    yield event
        raise _StreamEnded("stream closed")

    def _events(self, message: dict[str, Any]) -> list[WatchEvent]:
        if "error" in message:
            raise _StreamEnded(str(message["error"]))
        result = message.get("result", {})
        compact = int(result.get("compact_revision", 0))
        if compact:
            raise EtcdCompacted(compact)
        if result.get("canceled"):
            raise _StreamEnded(result.get("cancel_reason", "watch canceled"))
        if result.get("created"):
            self.opened = True
        return [WatchEvent(event.get("type") == "DELETE", parse_kv(event["kv"]),
                           parse_kv(event["prev_kv"]) if event.get("prev_kv") else None)
                for event in result.get("events", [])]


def _error_text(response: httpx.Response) -> str:
    try:
        data = response.json()
    except ValueError:
        return response.text[:200]
    if isinstance(data, dict):
        return str(data.get("message") or data.get("error") or data)[:200]
    return str(data)[:200]

