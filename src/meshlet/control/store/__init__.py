"""Resource stores behind one interface (``Store``): SQLite (embedded default)
and etcd v3. ``open_store(url)`` picks one from ``sqlite:PATH`` or
``etcd:http://host:port,...``.
"""

from meshlet.control.store.base import (
    MUST_NOT_EXIST,
    Compacted,
    Conflict,
    Event,
    EventType,
    NotFound,
    Snapshot,
    Store,
    StoreError,
)
from meshlet.control.store.open import DEFAULT_STORE_URL, open_store

__all__ = [
    "DEFAULT_STORE_URL",
    "MUST_NOT_EXIST",
    "Compacted",
    "Conflict",
    "Event",
    "EventType",
    "NotFound",
    "Snapshot",
    "Store",
    "StoreError",
    "open_store",
]
