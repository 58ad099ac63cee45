"""STRICT_DNS: resolve a cluster's endpoint names in the background.

Every ``refresh_rate`` seconds each endpoint's hostname is resolved with the
event loop's ``getaddrinfo``; every address returned becomes a host (with the
endpoint's weight). A failed or empty resolution keeps the last good set and
counts ``update_failure``, as Envoy does: a DNS hiccup must not empty a
cluster that was serving.
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Callable, Sequence

from meshlet.config.model import Endpoint, SocketAddress
from meshlet.proxy.observe.stats import Counter

RESOLVE_TIMEOUT = 5.0

_FAMILIES = {
    "V4_ONLY": socket.AF_INET,
    "V6_ONLY": socket.AF_INET6,
}


def pick_family(addresses: list[tuple[int, str, int]], lookup_family: str) -> list[tuple[str, int]]:
    """Filter resolved (family, ip, port) triples as ``dns_lookup_family`` says.

    AUTO prefers IPv6 and falls back to IPv4 (Envoy's AUTO); V4_PREFERRED the
    reverse; ALL keeps both.
    """
    v4 = [(ip, port) for fam, ip, port in addresses if fam == socket.AF_INET]
    v6 = [(ip, port) for fam, ip, port in addresses if fam == socket.AF_INET6]
    if lookup_family == "V4_ONLY":
        return v4
    if lookup_family == "V6_ONLY":
        return v6
    if lookup_family == "V4_PREFERRED":
        return v4 or v6
    if lookup_family == "ALL":
        return v4 + v6
    return v6 or v4


class DnsRefresher:
    def __init__(
        self,
        endpoints: Sequence[Endpoint],
        *,
        lookup_family: str,
        refresh_rate: float,
        on_update: Callable[[list[Endpoint]], None],
        attempts: Counter,
        successes: Counter,
        failures: Counter,
        timeout: float = RESOLVE_TIMEOUT,
    ) -> None:
        self._endpoints = tuple(endpoints)
        self._family = lookup_family
        self._refresh_rate = max(refresh_rate, 0.05)
        self._on_update = on_update
        self._attempts = attempts
        self._successes = successes
        self._failures = failures
        self._timeout = timeout
        self._task: asyncio.Task[None] | None = None
        self.resolved = asyncio.Event()

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run())

    def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            self._task = None

    async def _run(self) -> None:
        while True:
            await self.refresh()
            await asyncio.sleep(self._refresh_rate)

    async def refresh(self) -> bool:
        """Resolve once; on success hand the hosts over. True if it succeeded."""
        self._attempts.inc()
        try:
            hosts = await self._resolve_all()
        except (OSError, TimeoutError, UnicodeError):
            hosts = []
        if not hosts:
            self._failures.inc()
            return False
        self._successes.inc()
        self._on_update(hosts)
        self.resolved.set()
        return True

    async def _resolve_all(self) -> list[Endpoint]:
        out: list[Endpoint] = []
        seen: set[tuple[str, int]] = set()
        for ep in self._endpoints:
            for ip, port in await self._resolve(ep.address):
                if (ip, port) in seen:
                    continue
                seen.add((ip, port))
                out.append(
                    Endpoint(
                        address=SocketAddress(ip, port),
                        weight=ep.weight,
                        health_status=ep.health_status,
                        hostname=ep.hostname or ep.address.host,
                    )
                )
        return out

    async def _resolve(self, address: SocketAddress) -> list[tuple[str, int]]:
        loop = asyncio.get_running_loop()
        family = _FAMILIES.get(self._family, socket.AF_UNSPEC)
        infos = await asyncio.wait_for(
            loop.getaddrinfo(address.host, address.port, family=family, type=socket.SOCK_STREAM),
            self._timeout,
        )
        triples = [(int(fam), str(sa[0]), int(sa[1])) for fam, _, _, _, sa in infos]
        return pick_family(triples, self._family)
