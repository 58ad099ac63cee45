"""Check a snapshot the way a proxy will take it: every resource compiles with meshlet's
config compiler (the one static files use) and every name it refers to is in it.

Translator tests call ``check_snapshot`` on what they generate, so a snapshot
that a meshlet proxy would NACK, or that leaves a listener or cluster warming
for ever, fails there rather than in a running mesh. API listeners (gRPC
proxyless clients) are skipped: only gRPC runs them.
"""

from __future__ import annotations

from meshlet.config.fields import key
from meshlet.config.loader import new_message
from meshlet.config.model import ProxyConfig
from meshlet.errors import ConfigError
from meshlet.xds.assembly import ConfigAssembler, Received
from meshlet.xds.snapshot import LISTENER, SHORT_NAMES, Snapshot


def check_snapshot(snapshot: Snapshot) -> ProxyConfig:
    """The config a proxy would build from ``snapshot``; ``ConfigError`` naming the first problem."""
    resources: dict[str, dict[str, Received]] = {}
    for type_url in snapshot.type_urls():
        decoded: dict[str, Received] = {}
        for name, resource in snapshot.resources(type_url).items():
            message = new_message(type_url, key(SHORT_NAMES.get(type_url, type_url), name))
            resource.body.Unpack(message)
            if type_url == LISTENER and message.HasField("api_listener"):
                continue
            decoded[name] = Received(message, resource.version, 0.0)
        resources[type_url] = decoded
    assembler = ConfigAssembler(ProxyConfig())
    config = assembler.build(resources)
    for type_url, names in assembler.wanted(resources).items():
        missing = sorted(names - resources.get(type_url, {}).keys())
        if missing:
            kind = SHORT_NAMES.get(type_url, type_url)
            raise ConfigError(key(kind, missing[0]), "is referred to but not in the snapshot")
    return config
