"""Transport socket factories from config: plain, or TLS on the selected engine."""

from __future__ import annotations

import importlib

from meshlet.config.model import TransportSocketConfig
from meshlet.errors import ConfigError, UnsupportedConfig
from meshlet.proxy.transport import PLAIN, TransportSocketFactory
from meshlet.registry import registry

RAW_BUFFER = "envoy.transport_sockets.raw_buffer"
TLS = "envoy.transport_sockets.tls"

# Built-in engines register themselves when their module is imported; the
# module is imported on first use so callers need not know where it lives.
_ENGINE_MODULES = {
    "openssl": "meshlet.proxy.listeners.tls_openssl",
    "meshlet": "meshlet.tls.aio",
}


def _load_engine(engine: str) -> None:
    module = _ENGINE_MODULES.get(engine)
    if module is None or engine in registry.names("tls_engine"):
        return
    try:
        importlib.import_module(module)
    except ImportError:
        pass  # reported below as an unavailable engine


def make_factory(cfg: TransportSocketConfig, *, default_engine: str) -> TransportSocketFactory:
    """The factory for one filter chain's or cluster's transport socket.

    ``raw_buffer`` gives the shared plaintext factory; ``tls`` builds the
    engine named by the TLS context (or ``default_engine``). Raises
    ``ConfigError`` when the engine is unknown or the TLS context is bad.
    """
    if cfg.tls is None:
        if cfg.name not in (RAW_BUFFER, "raw_buffer", ""):
            raise UnsupportedConfig(
                "transport_socket.name", f"transport socket {cfg.name!r} is not supported"
            )
        return PLAIN
    engine = cfg.tls.engine or default_engine
    _load_engine(engine)
    if engine not in registry.names("tls_engine"):
        known = ", ".join(registry.names("tls_engine")) or "none"
        raise ConfigError(
            "transport_socket.typed_config", f"tls engine {engine!r} is not available (known: {known})"
        )
    factory = registry.lookup("tls_engine", name=engine).factory(cfg.tls)
    if not isinstance(factory, TransportSocketFactory):
        raise TypeError(f"tls engine {engine!r} built {type(factory).__name__}, not a TransportSocketFactory")
    return factory
