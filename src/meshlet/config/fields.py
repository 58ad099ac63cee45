"""The generic "refuse what we do not implement" mechanism and small proto helpers.

Every compiled message type has an allow-list of the field names meshlet
implements. Any other field that is *set* in the user's config is refused with
its path, so a config never silently means something other than what it says.
Paths use the proto field names and ``[i]`` indices, e.g.
``static_resources.clusters[0].lb_policy``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable
from typing import Any

from google.protobuf.message import Message

from meshlet.errors import ConfigError, UnsupportedConfig

_ALLOWED: dict[str, frozenset[str]] = {}


def allow_fields(message_class: Any, *names: str) -> None:
    """Declare the fields of ``message_class`` that meshlet implements.

    Extensions call this at import time for their own config messages. Names
    are checked against the descriptor so a typo fails loudly at import.
    """
    descriptor = message_class.DESCRIPTOR
    unknown = [n for n in names if n not in descriptor.fields_by_name]
    if unknown:
        raise ValueError(f"{descriptor.full_name} has no fields {unknown}")
    _ALLOWED[descriptor.full_name] = _ALLOWED.get(descriptor.full_name, frozenset()) | frozenset(names)


def check_fields(msg: Message, path: str) -> None:
    """Refuse every field of ``msg`` that is set but not in its allow-list."""
    allowed = _ALLOWED.get(msg.DESCRIPTOR.full_name, frozenset())
    for field, _ in msg.ListFields():
        if field.name not in allowed:
            raise UnsupportedConfig(join(path, field.name), f"{field.name} is not supported yet")


def join(path: str, name: str) -> str:
    return f"{path}.{name}" if path else name


def index(path: str, i: int) -> str:
    return f"{path}[{i}]"


def key(path: str, k: str) -> str:
    return f'{path}["{k}"]'


def enum_name(msg: Message, field_name: str) -> str:
    field = msg.DESCRIPTOR.fields_by_name[field_name]
    number = getattr(msg, field_name)
    value = field.enum_type.values_by_number.get(number)
    return value.name if value is not None else str(number)


def check_enum(msg: Message, field_name: str, path: str, supported: Iterable[str]) -> str:
    """The enum value's name, or UnsupportedConfig naming the value."""
    name = enum_name(msg, field_name)
    if name not in set(supported):
        raise UnsupportedConfig(join(path, field_name), f"{name} is not supported yet")
    return name


def seconds(duration: Any) -> float:
    """google.protobuf.Duration as float seconds."""
    return float(duration.seconds) + float(duration.nanos) / 1e9


def duration_field(
    msg: Message, field_name: str, path: str, default: float | None, *, zero_disables: bool = True
) -> float | None:
    """A Duration field: ``default`` when unset; None when 0 means "disabled" in Envoy."""
    if not msg.HasField(field_name):
        return default
    value = seconds(getattr(msg, field_name))
    if value < 0:
        raise ConfigError(join(path, field_name), "must not be negative")
    if value == 0 and zero_disables:
        return None
    return value


def wrapped(msg: Message, field_name: str, default: Any) -> Any:
    """The value of a wrapper field (BoolValue, UInt32Value, ...), ``default`` when unset."""
    if not msg.HasField(field_name):
        return default
    return getattr(msg, field_name).value


def model_default(model_class: Any, field_name: str) -> Any:
    """The default of a model dataclass field (slots dataclasses hide them as class attributes)."""
    for f in dataclasses.fields(model_class):
        if f.name == field_name:
            if f.default is not dataclasses.MISSING:
                return f.default
            if f.default_factory is not dataclasses.MISSING:
                return f.default_factory()
            break
    raise ValueError(f"{model_class.__name__}.{field_name} has no default")
