"""Compile envoy.type.matcher.v3 / config.route.v3 matchers into model objects."""

from __future__ import annotations

from operator import methodcaller
from typing import Any

from envoy.config.route.v3 import route_components_pb2 as rc
from envoy.type.matcher.v3 import regex_pb2, string_pb2

from meshlet.config import context
from meshlet.config.fields import allow_fields, check_fields, join
from meshlet.config.model import (
    HeaderMatcher,
    HeaderMatchKind,
    QueryParameterMatcher,
    StringMatcher,
    StringMatchKind,
)
from meshlet.errors import ConfigError
from meshlet.proxy.routing.regex import Predicate

allow_fields(string_pb2.StringMatcher, "exact", "prefix", "suffix", "safe_regex", "contains", "ignore_case")
allow_fields(regex_pb2.RegexMatcher, "google_re2", "regex")
allow_fields(regex_pb2.RegexMatcher.GoogleRE2)
allow_fields(
    rc.HeaderMatcher,
    "name",
    "exact_match",
    "safe_regex_match",
    "present_match",
    "prefix_match",
    "suffix_match",
    "contains_match",
    "string_match",
    "invert_match",
    "treat_missing_header_as_empty",
)
allow_fields(rc.QueryParameterMatcher, "name", "string_match", "present_match")

PSEUDO_HEADERS = frozenset({":authority", ":method", ":path", ":scheme"})


def compile_regex(msg: Any, path: str) -> Predicate:
    """envoy.type.matcher.v3.RegexMatcher with the active regex engine (full match)."""
    check_fields(msg, path)
    if not msg.regex:
        raise ConfigError(join(path, "regex"), "is required")
    return context.current().regex.compile(msg.regex, join(path, "regex"))


def compile_string_matcher(msg: Any, path: str) -> StringMatcher:
    check_fields(msg, path)
    kind_name = msg.WhichOneof("match_pattern")
    if kind_name is None:
        raise ConfigError(path, "one of exact, prefix, suffix, contains, safe_regex is required")
    if kind_name == "safe_regex":
        predicate = compile_regex(msg.safe_regex, join(path, "safe_regex"))
        return StringMatcher(StringMatchKind.REGEX, msg.safe_regex.regex, False, predicate)
    value = getattr(msg, kind_name)
    if not value and kind_name != "exact":
        raise ConfigError(join(path, kind_name), "must not be empty")
    kind = StringMatchKind(kind_name)
    return StringMatcher(kind, value, msg.ignore_case, string_predicate(kind, value, msg.ignore_case))


def string_predicate(kind: StringMatchKind, value: str, ignore_case: bool) -> Predicate:
    """A predicate for a literal (non-regex) string match."""
    if ignore_case:
        folded = value.lower()
        inner = string_predicate(kind, folded, False)
        return lambda s: inner(s.lower())
    if kind is StringMatchKind.EXACT:
        return value.__eq__
    # methodcaller: s.startswith(value) / s.endswith(value) without a Python frame per call.
    if kind is StringMatchKind.PREFIX:
        return methodcaller("startswith", value)
    if kind is StringMatchKind.SUFFIX:
        return methodcaller("endswith", value)
    if kind is StringMatchKind.CONTAINS:
        return lambda s: value in s
    raise ValueError(f"not a literal match kind: {kind}")


def _literal(kind: StringMatchKind, value: str) -> StringMatcher:
    return StringMatcher(kind, value, False, string_predicate(kind, value, False))


def compile_header_matcher(msg: Any, path: str) -> HeaderMatcher:
    check_fields(msg, path)
    name = msg.name.lower()
    if not name:
        raise ConfigError(join(path, "name"), "is required")
    if name.startswith(":") and name not in PSEUDO_HEADERS:
        raise ConfigError(join(path, "name"), f"pseudo-header {msg.name!r} cannot be matched")
    if name == "host":
        name = ":authority"
    spec = msg.WhichOneof("header_match_specifier")
    kind, value, present = _header_value_matcher(msg, spec, path)
    return HeaderMatcher(
        name=name,
        kind=kind,
        invert=msg.invert_match,
        present=present,
        value=value,
        treat_missing_as_empty=msg.treat_missing_header_as_empty,
    )


def _header_value_matcher(
    msg: Any, spec: str | None, path: str
) -> tuple[HeaderMatchKind, StringMatcher | None, bool]:
    if spec is None or spec == "present_match":
        # Envoy: no specifier at all means "present".
        return HeaderMatchKind.PRESENT, None, msg.present_match if spec else True
    field_path = join(path, spec)
    if spec == "string_match":
        return HeaderMatchKind.STRING, compile_string_matcher(msg.string_match, field_path), True
    if spec == "safe_regex_match":
        predicate = compile_regex(msg.safe_regex_match, field_path)
        regex = StringMatcher(StringMatchKind.REGEX, msg.safe_regex_match.regex, False, predicate)
        return HeaderMatchKind.REGEX, regex, True
    kind = spec.removesuffix("_match")
    text = getattr(msg, spec)
    if kind == "exact" and not text:
        # Envoy: an empty exact_match matches any value of a present header.
        return HeaderMatchKind.EXACT, StringMatcher(StringMatchKind.EXACT, "", False, lambda _s: True), True
    if not text:
        raise ConfigError(field_path, "must not be empty")
    return HeaderMatchKind(kind), _literal(StringMatchKind(kind), text), True


def compile_query_parameter_matcher(msg: Any, path: str) -> QueryParameterMatcher:
    check_fields(msg, path)
    if not msg.name:
        raise ConfigError(join(path, "name"), "is required")
    spec = msg.WhichOneof("query_parameter_match_specifier")
    if spec == "string_match":
        value = compile_string_matcher(msg.string_match, join(path, "string_match"))
        return QueryParameterMatcher(msg.name, value)
    if spec == "present_match" and not msg.present_match:
        raise ConfigError(join(path, "present_match"), "false is not supported: it can never match")
    # Envoy: no specifier means "present".
    return QueryParameterMatcher(msg.name, None, True)
