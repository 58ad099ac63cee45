"""The one extension registry (modelled on Envoy's ``registry.h``).

Extensions are registered under a category ("network_filter", "http_filter",
"transport_socket", "listener_filter", "access_logger", "key_provider", ...)
by name and by the type URLs of the ``typed_config`` messages they accept.
A duplicate name or type URL in the same category is refused: two extensions
silently shadowing each other is a config bug waiting to happen.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from meshlet.errors import UnsupportedConfig


@dataclass(frozen=True)
class Extension:
    category: str
    name: str
    type_urls: tuple[str, ...]
    factory: Callable[..., Any]
    aliases: tuple[str, ...] = field(default=())


class DuplicateExtension(ValueError):
    pass


class Registry:
    def __init__(self) -> None:
        self._by_name: dict[tuple[str, str], Extension] = {}
        self._by_type: dict[tuple[str, str], Extension] = {}

    def register(
        self,
        category: str,
        name: str,
        factory: Callable[..., Any],
        type_urls: Iterable[str] = (),
        aliases: Iterable[str] = (),
    ) -> Extension:
        ext = Extension(category, name, tuple(type_urls), factory, tuple(aliases))
        names = (name, *ext.aliases)
        for n in names:
            if (category, n) in self._by_name:
                raise DuplicateExtension(f"{category} extension {n!r} is already registered")
        for url in ext.type_urls:
            if (category, url) in self._by_type:
                raise DuplicateExtension(f"{category} extension for type {url!r} is already registered")
        for n in names:
            self._by_name[(category, n)] = ext
        for url in ext.type_urls:
            self._by_type[(category, url)] = ext
        return ext

    def lookup(self, category: str, *, name: str = "", type_url: str = "", path: str = "") -> Extension:
        """Find an extension, by type URL first (as Envoy does), then by name.

        Raises UnsupportedConfig naming ``path`` when neither is known.
        """
        if type_url:
            ext = self._by_type.get((category, type_url))
            if ext is not None:
                return ext
        if name:
            ext = self._by_name.get((category, name))
            if ext is not None:
                return ext
        what = type_url or name or "<unnamed>"
        raise UnsupportedConfig(path, f"{category.replace('_', ' ')} {what!r} is not supported")

    def names(self, category: str) -> list[str]:
        return sorted(n for (c, n) in self._by_name if c == category)


registry = Registry()
"""The process-wide registry. Modules register their extensions at import time."""
