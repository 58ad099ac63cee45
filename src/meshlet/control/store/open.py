"""Opening a store from a URL: ``sqlite:PATH`` or ``etcd:http://h1:2379,http://h2:2379``."""

from __future__ import annotations

from meshlet.control.store.base import Store
from meshlet.errors import ConfigError

DEFAULT_STORE_URL = "sqlite:.meshlet/meshlet.db"


async def open_store(url: str = DEFAULT_STORE_URL) -> Store:
    scheme, _, rest = url.partition(":")
    if scheme == "sqlite" and rest:
        from meshlet.control.store.sqlite import SqliteStore

        return await SqliteStore.open(rest)
    if scheme == "etcd" and rest:
        from meshlet.control.store.etcd import EtcdStore

        return await EtcdStore.open([e.strip() for e in rest.split(",") if e.strip()])
    raise ConfigError("store", f"{url!r} is not a store URL (sqlite:PATH or etcd:http://HOST:PORT,...)")
