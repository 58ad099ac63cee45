"""Load Envoy v3 config (YAML or JSON) into protobuf messages, with clear errors.

``google.protobuf.json_format`` reports problems as nested "Failed to parse
... field" chains; meshlet first walks the plain data against the message
descriptors so every error names one field path the user can find in their
file (``static_resources.listeners[0].filter_chains[0].filterz: unknown
field``). Only then is the data handed to ``ParseDict``.

``typed_config`` ``Any`` values resolve by type URL: the ``_pb2`` modules of
the proto package named by the URL are imported on demand, so any type that
``xds-protos`` ships parses (the compiler then decides whether meshlet
supports it).
"""

from __future__ import annotations

import base64
import importlib
import json
import math
import pkgutil
import re
from pathlib import Path
from typing import Any

import yaml
from google.protobuf import descriptor_pool, json_format, message_factory
from google.protobuf.descriptor import Descriptor, FieldDescriptor
from google.protobuf.message import DecodeError, Message

from meshlet.config.fields import index, join, key
from meshlet.errors import ConfigError

from envoy.config.bootstrap.v3 import bootstrap_pb2  # isort: skip

TYPE_URL_PREFIX = "type.googleapis.com/"
# Proto packages whose modules may be imported to resolve a type URL.
_IMPORTABLE_ROOTS = ("envoy.", "xds.", "udpa.", "google.protobuf.", "validate.")
_PROTO_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)+$")
_DURATION = re.compile(r"^-?\d+(\.\d{1,9})?s$")
_INT_TYPES = {
    FieldDescriptor.TYPE_INT32: (-(2**31), 2**31 - 1),
    FieldDescriptor.TYPE_SINT32: (-(2**31), 2**31 - 1),
    FieldDescriptor.TYPE_SFIXED32: (-(2**31), 2**31 - 1),
    FieldDescriptor.TYPE_UINT32: (0, 2**32 - 1),
    FieldDescriptor.TYPE_FIXED32: (0, 2**32 - 1),
    FieldDescriptor.TYPE_INT64: (-(2**63), 2**63 - 1),
    FieldDescriptor.TYPE_SINT64: (-(2**63), 2**63 - 1),
    FieldDescriptor.TYPE_SFIXED64: (-(2**63), 2**63 - 1),
    FieldDescriptor.TYPE_UINT64: (0, 2**64 - 1),
    FieldDescriptor.TYPE_FIXED64: (0, 2**64 - 1),
}
_FLOAT_TYPES = {FieldDescriptor.TYPE_FLOAT, FieldDescriptor.TYPE_DOUBLE}
_WRAPPERS = {
    f"google.protobuf.{n}Value"
    for n in ("Double", "Float", "Int64", "UInt64", "Int32", "UInt32", "Bool", "String", "Bytes")
}
# Largest config file we read: config is small; anything bigger is a mistake.
MAX_CONFIG_BYTES = 64 * 1024 * 1024


# --------------------------------------------------------------------------- #
# Public API
# --------------------------------------------------------------------------- #


def load_bootstrap(path: str | Path) -> bootstrap_pb2.Bootstrap:
    """Read a bootstrap file (YAML or JSON) into a ``Bootstrap`` message."""
    return parse_bootstrap_text(_read(Path(path)), source=str(path))


def parse_bootstrap_text(text: str, source: str = "<config>") -> bootstrap_pb2.Bootstrap:
    data = parse_document(text, source)
    return parse_message(data, bootstrap_pb2.Bootstrap(), "")


def parse_resource(type_url: str, data: dict[str, Any] | bytes, path: str = "") -> Message:
    """One resource of type ``type_url`` from a JSON-ready dict or its wire bytes (xDS)."""
    message = new_message(type_url, path)
    if isinstance(data, bytes | bytearray | memoryview):
        try:
            message.ParseFromString(bytes(data))
        except DecodeError as exc:
            raise ConfigError(path, f"cannot decode {type_name(type_url)}: {exc}") from None
        return message
    return parse_message(data, message, path)


def parse_message(data: Any, message: Message, path: str) -> Any:
    """Validate ``data`` against ``message``'s type, then fill ``message`` from it."""
    if not isinstance(data, dict):
        raise ConfigError(path, f"expected a mapping, got {_kind(data)}")
    _Validator().message(data, message.DESCRIPTOR, path)
    try:
        json_format.ParseDict(data, message)
    except json_format.ParseError as exc:
        # The walk above should have caught it; keep the library's words if not.
        raise ConfigError(path, str(exc).splitlines()[0]) from None
    return message


def parse_document(text: str, source: str = "<config>") -> dict[str, Any]:
    """YAML or JSON text (JSON is tried first when it looks like JSON) as a mapping."""
    data: Any
    if text.lstrip().startswith("{"):
        try:
            data = json.loads(text)
        except json.JSONDecodeError:
            data = _load_yaml(text, source)
    else:
        data = _load_yaml(text, source)
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(source, f"the document must be a mapping, got {_kind(data)}")
    return data


def type_name(type_url: str) -> str:
    return type_url.rsplit("/", 1)[-1]


def new_message(type_url: str, path: str = "") -> Message:
    """An empty message of the type named by ``type_url`` (importing its module if needed)."""
    descriptor = find_descriptor(type_url)
    if descriptor is None:
        raise ConfigError(path, f"unknown type {type_url!r}")
    return message_factory.GetMessageClass(descriptor)()


def find_descriptor(type_url: str) -> Descriptor | None:
    name = type_name(type_url)
    pool = descriptor_pool.Default()
    try:
        return pool.FindMessageTypeByName(name)
    except KeyError:
        pass
    if not _import_package_of(name):
        return None
    try:
        return pool.FindMessageTypeByName(name)
    except KeyError:
        return None


# --------------------------------------------------------------------------- #
# Reading
# --------------------------------------------------------------------------- #


def _read(path: Path) -> str:
    try:
        with path.open("rb") as f:
            raw = f.read(MAX_CONFIG_BYTES + 1)
    except FileNotFoundError:
        raise ConfigError(str(path), "no such file") from None
    except OSError as exc:
        raise ConfigError(str(path), f"cannot read: {exc.strerror or exc}") from None
    if len(raw) > MAX_CONFIG_BYTES:
        raise ConfigError(str(path), f"larger than {MAX_CONFIG_BYTES} bytes")
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(str(path), f"not UTF-8 text (byte {exc.start})") from None


class _StrictLoader(yaml.SafeLoader):
    """SafeLoader that refuses duplicate keys (YAML would keep the last one silently)."""


def _construct_mapping(loader: _StrictLoader, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
    loader.flatten_mapping(node)
    mapping: dict[Any, Any] = {}
    for key_node, value_node in node.value:
        k = loader.construct_object(key_node, deep=deep)
        if k in mapping:
            raise yaml.constructor.ConstructorError(None, None, f"duplicate key {k!r}", key_node.start_mark)
        mapping[k] = loader.construct_object(value_node, deep=deep)
    return mapping


_StrictLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)


def _load_yaml(text: str, source: str) -> Any:
    try:
        return yaml.load(text, Loader=_StrictLoader)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = exc.problem or exc.context or "syntax error"
        raise ConfigError(source, f"invalid YAML{where}: {problem}") from None
    except yaml.YAMLError as exc:
        raise ConfigError(source, f"invalid YAML: {exc}") from None


# --------------------------------------------------------------------------- #
# Type URL resolution
# --------------------------------------------------------------------------- #


def _import_package_of(name: str) -> bool:
    """Import every ``_pb2`` module of the proto package holding message ``name``."""
    if not _PROTO_NAME.match(name) or not name.startswith(_IMPORTABLE_ROOTS):
        return False
    parts = name.split(".")
    for end in range(len(parts) - 1, 0, -1):
        package_name = ".".join(parts[:end])
        try:
            package = importlib.import_module(package_name)
        except ImportError:
            continue
        search = getattr(package, "__path__", None)
        if search is None:
            return False
        for info in pkgutil.iter_modules(search):
            if info.name.endswith("_pb2"):
                importlib.import_module(f"{package_name}.{info.name}")
        return True
    return False


# --------------------------------------------------------------------------- #
# Validation walk
# --------------------------------------------------------------------------- #


def _kind(value: Any) -> str:
    if value is None:
        return "null"
    return {dict: "a mapping", list: "a list", str: "a string", bool: "a boolean"}.get(
        type(value), "a number" if isinstance(value, int | float) else type(value).__name__
    )


class _Validator:
    """Walks plain data against a message descriptor, raising ConfigError at the first problem."""

    def message(self, data: Any, descriptor: Descriptor, path: str) -> None:
        special = _SPECIAL.get(descriptor.full_name)
        if special is not None:
            special(self, data, descriptor, path)
            return
        if not isinstance(data, dict):
            raise ConfigError(path, f"expected a mapping, got {_kind(data)}")
        by_json = {f.json_name: f for f in descriptor.fields}
        seen_oneofs: dict[str, str] = {}
        for k, value in data.items():
            if not isinstance(k, str):
                raise ConfigError(path, f"field names must be strings, got {k!r}")
            field = descriptor.fields_by_name.get(k) or by_json.get(k)
            if field is None:
                raise ConfigError(join(path, k), "unknown field")
            field_path = join(path, field.name)
            if value is None:
                continue
            oneof = field.containing_oneof
            if oneof is not None and not _is_synthetic(oneof):
                other = seen_oneofs.setdefault(oneof.name, field.name)
                if other != field.name:
                    raise ConfigError(field_path, f"only one of {other} and {field.name} may be set")
            self.field(value, field, field_path)

    def field(self, value: Any, field: FieldDescriptor, path: str) -> None:
        if _is_map(field):
            self._map(value, field, path)
        elif field.is_repeated:
            if not isinstance(value, list):
                raise ConfigError(path, f"expected a list, got {_kind(value)}")
            for i, item in enumerate(value):
                if item is None:
                    raise ConfigError(index(path, i), "null is not allowed in a list")
                self.single(item, field, index(path, i))
        else:
            self.single(value, field, path)

    def single(self, value: Any, field: FieldDescriptor, path: str) -> None:
        if field.type == FieldDescriptor.TYPE_MESSAGE or field.type == FieldDescriptor.TYPE_GROUP:
            self.message(value, field.message_type, path)
        else:
            _scalar(value, field, path)

    def _map(self, value: Any, field: FieldDescriptor, path: str) -> None:
        if not isinstance(value, dict):
            raise ConfigError(path, f"expected a mapping, got {_kind(value)}")
        key_field = field.message_type.fields_by_name["key"]
        value_field = field.message_type.fields_by_name["value"]
        for k, v in value.items():
            if key_field.type == FieldDescriptor.TYPE_STRING and not isinstance(k, str):
                raise ConfigError(path, f"map keys must be strings, got {k!r}")
            if v is None:
                raise ConfigError(key(path, str(k)), "null is not allowed as a map value")
            self.single(v, value_field, key(path, str(k)))


def _is_map(field: FieldDescriptor) -> bool:
    return field.is_repeated and field.message_type is not None and field.message_type.GetOptions().map_entry


def _is_synthetic(oneof: Any) -> bool:
    # proto3 "optional" fields live in synthetic one-field oneofs named "_<field>".
    return len(oneof.fields) == 1 and oneof.name == f"_{oneof.fields[0].name}"


def _scalar(value: Any, field: FieldDescriptor, path: str) -> None:
    t = field.type
    if t == FieldDescriptor.TYPE_STRING:
        if not isinstance(value, str):
            raise ConfigError(path, f"expected a string, got {_kind(value)}")
    elif t == FieldDescriptor.TYPE_BOOL:
        if not isinstance(value, bool):
            raise ConfigError(path, f"expected true or false, got {_kind(value)}")
    elif t in _INT_TYPES:
        _integer(value, _INT_TYPES[t], path)
    elif t in _FLOAT_TYPES:
        _number(value, path)
    elif t == FieldDescriptor.TYPE_ENUM:
        _enum(value, field, path)
    elif t == FieldDescriptor.TYPE_BYTES:
        _base64(value, path)


def _integer(value: Any, bounds: tuple[int, int], path: str) -> None:
    if isinstance(value, bool):
        raise ConfigError(path, "expected an integer, got a boolean")
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, str) and re.fullmatch(r"-?\d+", value.strip()):
        value = int(value)
    if not isinstance(value, int):
        raise ConfigError(path, f"expected an integer, got {_kind(value)}")
    low, high = bounds
    if not low <= value <= high:
        raise ConfigError(path, f"{value} is out of range [{low}, {high}]")


def _number(value: Any, path: str) -> None:
    if isinstance(value, bool):
        raise ConfigError(path, "expected a number, got a boolean")
    if isinstance(value, str) and value in ("NaN", "Infinity", "-Infinity"):
        return
    if not isinstance(value, int | float) or (isinstance(value, float) and math.isnan(value)):
        raise ConfigError(path, f"expected a number, got {_kind(value)}")


def _enum(value: Any, field: FieldDescriptor, path: str) -> None:
    enum = field.enum_type
    if isinstance(value, str) and value in enum.values_by_name:
        return
    if isinstance(value, int) and not isinstance(value, bool) and value in enum.values_by_number:
        return
    names = ", ".join(v.name for v in enum.values)
    raise ConfigError(path, f"unknown value {value!r}; expected one of {names}")


def _base64(value: Any, path: str) -> None:
    """Proto3 JSON bytes: standard or URL-safe base64, padding optional."""
    if not isinstance(value, str):
        raise ConfigError(path, f"expected a base64 string, got {_kind(value)}")
    padded = value + "=" * (-len(value) % 4)
    alphabet = b"-_" if "-" in value or "_" in value else None
    try:
        base64.b64decode(padded, altchars=alphabet, validate=True)
    except ValueError:
        raise ConfigError(path, "invalid base64") from None


# Well-known types have their own JSON forms.


def _check_any(v: _Validator, data: Any, _: Descriptor, path: str) -> None:
    if not isinstance(data, dict):
        raise ConfigError(path, f"expected a mapping with '@type', got {_kind(data)}")
    url = data.get("@type")
    if not isinstance(url, str) or not url:
        raise ConfigError(join(path, "@type"), "is required")
    descriptor = find_descriptor(url)
    if descriptor is None:
        raise ConfigError(join(path, "@type"), f"unknown type {url!r}")
    rest = {k: val for k, val in data.items() if k != "@type"}
    if descriptor.full_name in _SPECIAL:
        if set(rest) - {"value"}:
            raise ConfigError(path, f"{descriptor.full_name} takes only 'value'")
        if "value" in rest:
            v.message(rest["value"], descriptor, join(path, "value"))
        return
    v.message(rest, descriptor, path)


def _check_duration(_v: _Validator, data: Any, _d: Descriptor, path: str) -> None:
    if not isinstance(data, str) or not _DURATION.match(data):
        raise ConfigError(path, f'expected a duration such as "1.5s", got {data!r}')


def _check_string(_v: _Validator, data: Any, _d: Descriptor, path: str) -> None:
    if not isinstance(data, str):
        raise ConfigError(path, f"expected a string, got {_kind(data)}")


def _check_struct(_v: _Validator, data: Any, _d: Descriptor, path: str) -> None:
    if not isinstance(data, dict):
        raise ConfigError(path, f"expected a mapping, got {_kind(data)}")
    _check_json(data, path)


def _check_list_value(_v: _Validator, data: Any, _d: Descriptor, path: str) -> None:
    if not isinstance(data, list):
        raise ConfigError(path, f"expected a list, got {_kind(data)}")
    _check_json(data, path)


def _check_value(_v: _Validator, data: Any, _d: Descriptor, path: str) -> None:
    _check_json(data, path)


def _check_json(data: Any, path: str) -> None:
    """A google.protobuf.Value tree: only JSON types (YAML may produce dates etc.)."""
    if isinstance(data, dict):
        for k, item in data.items():
            if not isinstance(k, str):
                raise ConfigError(path, f"keys must be strings, got {k!r}")
            _check_json(item, join(path, k))
    elif isinstance(data, list):
        for i, item in enumerate(data):
            _check_json(item, index(path, i))
    elif data is not None and not isinstance(data, str | int | float | bool):
        raise ConfigError(path, f"expected a JSON value, got {type(data).__name__}")


def _check_wrapper(_v: _Validator, data: Any, descriptor: Descriptor, path: str) -> None:
    _scalar(data, descriptor.fields_by_name["value"], path)


def _check_empty(_v: _Validator, data: Any, _d: Descriptor, path: str) -> None:
    if data != {}:
        raise ConfigError(path, "expected an empty mapping {}")


_SPECIAL: dict[str, Any] = {
    "google.protobuf.Any": _check_any,
    "google.protobuf.Duration": _check_duration,
    "google.protobuf.Timestamp": _check_string,
    "google.protobuf.FieldMask": _check_string,
    "google.protobuf.Struct": _check_struct,
    "google.protobuf.ListValue": _check_list_value,
    "google.protobuf.Value": _check_value,
    "google.protobuf.Empty": _check_empty,
    **{name: _check_wrapper for name in _WRAPPERS},
}
