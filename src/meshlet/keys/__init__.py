"""meshlet.keys: TLS private key providers behind one async interface.

Importing this package registers every provider in ``meshlet.registry``
(category ``"key_provider"``) so that the config compiler knows their names;
each provider's module (and its heavy dependencies: process pools,
python-pkcs11) is imported only when a certificate uses it.

Providers are called as ``factory(PrivateKeyProviderConfig) -> KeyProvider``
(see ``meshlet.keys.base``).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any

from meshlet.config.model import PrivateKeyProviderConfig
from meshlet.registry import registry

CATEGORY = "key_provider"

PROVIDERS: dict[str, str] = {
    "meshlet.local": "meshlet.keys.local:build_local",
    "meshlet.offload": "meshlet.keys.offload:build_offload",
    "meshlet.batch": "meshlet.keys.batch:build_batch",
    "meshlet.keyserver": "meshlet.keys.keyserver.client:build_keyserver",
    "meshlet.pkcs11": "meshlet.keys.pkcs11:build_pkcs11",
}


def _lazy(target: str) -> Callable[[PrivateKeyProviderConfig], Any]:
    module_name, attr = target.split(":", 1)

    def factory(config: PrivateKeyProviderConfig) -> Any:
        return getattr(importlib.import_module(module_name), attr)(config)

    factory.__qualname__ = f"lazy({target})"
    return factory


for _name, _target in PROVIDERS.items():
    if _name not in registry.names(CATEGORY):
        registry.register(CATEGORY, _name, _lazy(_target))
