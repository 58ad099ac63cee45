"""Request predicates built once from compiled route matchers (no protobuf here).

Header matching follows Envoy's ``HeaderUtility::matchHeaders``: repeated
headers are joined with ","; a missing header never matches (inverted or
not) except for a ``present_match`` matcher, unless
``treat_missing_header_as_empty`` makes it the empty string.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from operator import methodcaller
from urllib.parse import unquote

from meshlet.config.model import (
    FractionalPercent,
    HeaderMatcher,
    HeaderMatchKind,
    PathMatchKind,
    QueryParameterMatcher,
    RouteMatch,
)
from meshlet.proxy.http.stream import RequestHead

HeadPredicate = Callable[[RequestHead], bool]
# (request head, raw query string) -> matches; checked after the path matched.
ExtraPredicate = Callable[[RequestHead, str], bool]

GRPC_CONTENT_TYPE = "application/grpc"


def request_header(head: RequestHead, name: str) -> str | None:
    """The value Envoy matches for ``name``: pseudo-headers from the head, others
    joined with "," when repeated; None when absent."""
    if name[0] == ":":
        if name == ":authority":
            return head.authority
        if name == ":path":
            return head.path
        if name == ":method":
            return head.method
        if name == ":scheme":
            return head.scheme
        return None
    found: str | None = None
    for k, v in head.headers:
        if k == name:
            found = v if found is None else f"{found},{v}"
    return found


def header_predicate(matcher: HeaderMatcher) -> HeadPredicate:
    name = matcher.name
    invert = matcher.invert
    if matcher.kind is HeaderMatchKind.PRESENT:
        present = matcher.present
        if matcher.treat_missing_as_empty:
            constant = present != invert
            return lambda _head: constant
        when_missing = present if invert else not present
        when_there = present != invert
        return lambda head: when_missing if request_header(head, name) is None else when_there
    if matcher.value is None:
        raise ValueError(f"header matcher {name!r} of kind {matcher.kind} has no value matcher")
    match = matcher.value.match
    missing_value: str | None = "" if matcher.treat_missing_as_empty else None

    def predicate(head: RequestHead) -> bool:
        value = request_header(head, name)
        if value is None:
            if missing_value is None:
                return False
            value = missing_value
        return match(value) != invert

    return predicate


def first_query_value(query: str, name: str) -> str | None:
    """The first value of ``name`` in a raw query string, percent-decoded (Envoy does not
    turn "+" into a space)."""
    if not query:
        return None
    for part in query.split("&"):
        k, sep, v = part.partition("=")
        if unquote(k) == name:
            return unquote(v) if sep else ""
    return None


def query_predicate(matcher: QueryParameterMatcher) -> Callable[[str], bool]:
    name = matcher.name
    if matcher.value is None:
        return lambda query: first_query_value(query, name) is not None
    match = matcher.value.match

    def predicate(query: str) -> bool:
        value = first_query_value(query, name)
        return value is not None and match(value)

    return predicate


def is_grpc(head: RequestHead) -> bool:
    content_type = head.get("content-type")
    if content_type is None or not content_type.startswith(GRPC_CONTENT_TYPE):
        return False
    return len(content_type) == len(GRPC_CONTENT_TYPE) or content_type[len(GRPC_CONTENT_TYPE)] == "+"


def path_predicate(match: RouteMatch) -> Callable[[str], bool]:
    """Path matching without regexes for prefix/path (the hot case)."""
    value = match.path_value
    if match.path_kind is PathMatchKind.REGEX:
        if match.path_regex is None:
            raise ValueError("safe_regex route match without a compiled regex")
        return match.path_regex
    if match.path_kind is PathMatchKind.PATH:
        if match.case_sensitive:
            return value.__eq__
        folded = value.lower()
        return lambda path: len(path) == len(folded) and path.lower() == folded
    if match.case_sensitive:
        # methodcaller runs path.startswith(value) without a Python-level frame.
        return methodcaller("startswith", value)
    folded = value.lower()
    size = len(folded)
    return lambda path: path[:size].lower() == folded


def fraction_predicate(
    fraction: FractionalPercent, draw: Callable[[int], int] = random.randrange
) -> HeadPredicate:
    """True for ``numerator`` of every ``denominator`` requests (runtime_fraction);
    ``draw(n)`` gives a uniform integer in [0, n)."""
    numerator, denominator = fraction.numerator, fraction.denominator
    return lambda _head: draw(denominator) < numerator


def extra_predicate(match: RouteMatch) -> ExtraPredicate | None:
    """Header, gRPC, runtime-fraction and query checks of a route, or None when it
    has none (the common case)."""
    on_head = [header_predicate(h) for h in match.headers]
    if match.grpc_only:
        on_head.append(is_grpc)
    if match.runtime_fraction is not None and not match.runtime_fraction.always:
        # Sampled last, so only requests that match otherwise use up the draw.
        on_head.append(fraction_predicate(match.runtime_fraction))
    on_query = [query_predicate(q) for q in match.query_parameters]
    if not on_head and not on_query:
        return None

    def predicate(head: RequestHead, query: str) -> bool:
        for check in on_head:
            if not check(head):
                return False
        return all(check(query) for check in on_query)

    return predicate
