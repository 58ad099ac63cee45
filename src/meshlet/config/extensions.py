"""Compile a ``typed_config`` extension through the registry.

An extension is found by its ``typed_config`` type URL first, then by name
(Envoy's order). Its factory is called with the unpacked message and the
field path of ``typed_config``, and returns the compiled object; errors it
raises name paths below that one.
"""

from __future__ import annotations

from typing import Any

from google.protobuf.message import Message

from meshlet.config.fields import join
from meshlet.config.loader import TYPE_URL_PREFIX, new_message, type_name
from meshlet.errors import ConfigError, UnsupportedConfig
from meshlet.registry import Extension, registry


def type_url_of(message_class: Any) -> str:
    return TYPE_URL_PREFIX + str(message_class.DESCRIPTOR.full_name)


def unpack_any(any_msg: Any, path: str) -> Message:
    message = new_message(any_msg.type_url, join(path, "@type"))
    if not any_msg.Unpack(message):
        raise ConfigError(path, f"cannot unpack {type_name(any_msg.type_url)}")
    return message


def resolve_extension(
    category: str, owner: Any, path: str, *, name_field: str = "name"
) -> tuple[Extension, Any]:
    """The registered extension for ``owner`` and its unpacked ``typed_config``.

    ``owner`` is the message holding ``name`` and ``typed_config`` (a Filter,
    an HttpFilter, an AccessLog, a TransportSocket, a ListenerFilter). Without
    a ``typed_config`` the extension gets a default instance of its first type.
    """
    name = getattr(owner, name_field)
    config_path = join(path, "typed_config")
    has_config = owner.HasField("typed_config")
    type_url = owner.typed_config.type_url if has_config else ""
    ext = registry.lookup(category, name=name, type_url=type_url, path=config_path if type_url else path)
    if type_url and type_url not in ext.type_urls:
        raise UnsupportedConfig(
            join(config_path, "@type"),
            f"{category.replace('_', ' ')} {name!r} does not take {type_name(type_url)}",
        )
    if has_config:
        return ext, unpack_any(owner.typed_config, config_path)
    if ext.type_urls:
        return ext, new_message(ext.type_urls[0], config_path)
    return ext, None


def compile_extension(category: str, owner: Any, path: str, *, name_field: str = "name") -> Any:
    """Compile ``owner``'s ``typed_config`` with the registered ``category`` extension's factory."""
    ext, message = resolve_extension(category, owner, path, name_field=name_field)
    return ext.factory(message, join(path, "typed_config"))
