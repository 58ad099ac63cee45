from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from meshlet.identity.spiffe import (
    SpiffeId,
    SpiffeIdError,
    SpiffeIdMatcher,
    parse_trust_domain,
)


@pytest.mark.parametrize(
    ("text", "trust_domain", "path"),
    [
        ("spiffe://example.org", "example.org", ""),
        ("spiffe://example.org/workload", "example.org", "/workload"),
        ("spiffe://cluster.local/ns/default/sa/web", "cluster.local", "/ns/default/sa/web"),
        ("spiffe://a-b_c.9/P.a-t_h/9", "a-b_c.9", "/P.a-t_h/9"),
        ("spiffe://td/...", "td", "/..."),  # only exactly "." and ".." are dot segments
    ],
)
def test_parse_valid(text: str, trust_domain: str, path: str) -> None:
    spiffe_id = SpiffeId.parse(text)
    assert (spiffe_id.trust_domain, spiffe_id.path) == (trust_domain, path)
    assert str(spiffe_id) == text


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ("", "starts with 'spiffe://'"),
        ("https://example.org/x", "scheme 'https'"),
        ("SPIFFE://example.org/x", "scheme 'SPIFFE'"),
        ("spiffe:/example.org", "starts with 'spiffe://'"),
        ("spiffe://", "trust domain is missing"),
        ("spiffe:///path", "trust domain is missing"),
        ("spiffe://Example.org/x", "lower-case"),
        ("spiffe://example.org:8443/x", "':'"),
        ("spiffe://user@example.org/x", "'@'"),
        ("spiffe://example.org/", "trailing slash"),
        ("spiffe://example.org/a/", "trailing slash"),
        ("spiffe://example.org//a", "empty segment"),
        ("spiffe://example.org/a//b", "empty segment"),
        ("spiffe://example.org/a//", "empty segment"),
        ("spiffe://example.org/./a", "'.' segment"),
        ("spiffe://example.org/a/..", "'..' segment"),
        ("spiffe://example.org/a?b=c", "'?'"),
        ("spiffe://example.org/a#frag", "'#'"),
        ("spiffe://example.org?x", "'?'"),
        ("spiffe://example.org/a%20b", "'%'"),
        ("spiffe://example.org/caf\u00e9", "'\u00e9'"),
        ("spiffe://" + "a" * 256, "longer than 255"),
        ("spiffe://td/" + "a" * 2040, "longer than 2048"),
    ],
)
def test_parse_invalid_says_why(text: str, reason: str) -> None:
    with pytest.raises(SpiffeIdError) as err:
        SpiffeId.parse(text)
    assert reason in str(err.value)


def test_max_length_is_inclusive() -> None:
    text = "spiffe://td/" + "a" * (2048 - len("spiffe://td/"))
    assert len(text) == 2048
    assert str(SpiffeId.parse(text)) == text


def test_workload_form() -> None:
    spiffe_id = SpiffeId.for_workload("cluster.local", "prod", "reviews")
    assert str(spiffe_id) == "spiffe://cluster.local/ns/prod/sa/reviews"
    assert spiffe_id.namespace == "prod"
    assert spiffe_id.service_account == "reviews"
    assert spiffe_id.segments == ("ns", "prod", "sa", "reviews")


@pytest.mark.parametrize(
    "text", ["spiffe://td", "spiffe://td/ns/a", "spiffe://td/ns/a/sa/b/c", "spiffe://td/x/a/sa/b"]
)
def test_non_workload_form_has_no_namespace(text: str) -> None:
    spiffe_id = SpiffeId.parse(text)
    assert spiffe_id.namespace is None
    assert spiffe_id.service_account is None


def test_for_workload_validates_each_part() -> None:
    with pytest.raises(SpiffeIdError, match="empty segment"):
        SpiffeId.for_workload("td", "", "sa")
    with pytest.raises(SpiffeIdError, match="contains '/'"):
        # a '/' inside a namespace would silently change the shape of the ID
        SpiffeId.for_workload("td", "a/b", "c")
    with pytest.raises(SpiffeIdError, match="lower-case"):
        SpiffeId.for_workload("TD", "ns", "sa")


def test_parse_trust_domain() -> None:
    assert parse_trust_domain("example.org") == "example.org"
    assert parse_trust_domain("spiffe://example.org") == "example.org"
    with pytest.raises(SpiffeIdError, match="has no path"):
        parse_trust_domain("spiffe://example.org/x")
    with pytest.raises(SpiffeIdError, match="empty"):
        parse_trust_domain("")
    with pytest.raises(SpiffeIdError, match="lower-case"):
        parse_trust_domain("Example.org")


def test_prefix_is_segment_wise() -> None:
    prefix = SpiffeId.parse("spiffe://td/ns/a")
    assert SpiffeId.parse("spiffe://td/ns/a").has_prefix(prefix)
    assert SpiffeId.parse("spiffe://td/ns/a/sa/b").has_prefix(prefix)
    assert not SpiffeId.parse("spiffe://td/ns/ab").has_prefix(prefix)
    assert not SpiffeId.parse("spiffe://other/ns/a/sa/b").has_prefix(prefix)


def test_matcher_rules() -> None:
    matcher = SpiffeIdMatcher.of(
        ["spiffe://td/ns/a/sa/web", "spiffe://partner.org/*", "spiffe://td/ns/batch/*"]
    )
    allowed = [
        "spiffe://td/ns/a/sa/web",
        "spiffe://partner.org/anything/at/all",
        "spiffe://partner.org",
        "spiffe://td/ns/batch/sa/job",
        "spiffe://td/ns/batch",
    ]
    denied = [
        "spiffe://td/ns/a/sa/db",
        "spiffe://td/ns/batcher/sa/x",
        "spiffe://partner.org.evil/x",
        "spiffe://td",
        "spiffe://td/ns/a/sa/web/extra",
    ]
    for text in allowed:
        assert matcher.matches(SpiffeId.parse(text)), text
    for text in denied:
        assert not matcher.matches(SpiffeId.parse(text)), text
    assert not matcher.matches_text("not a spiffe id")
    assert matcher.describe() == "spiffe://td/ns/a/sa/web, spiffe://partner.org/*, spiffe://td/ns/batch/*"


def test_empty_matcher_matches_nothing() -> None:
    matcher = SpiffeIdMatcher.of([])
    assert matcher.is_empty
    assert not matcher.matches(SpiffeId.parse("spiffe://td/x"))
    assert matcher.describe() == "(none)"


@pytest.mark.parametrize(
    ("pattern", "reason"),
    [
        ("spiffe://td/ns/*/sa/x", "whole last path segment"),
        ("spiffe://td/ns/a*", "whole last path segment"),
        ("spiffe://*", "trust domain is missing"),
        ("spiffe://TD/*", "lower-case"),
        ("td/*", "starts with 'spiffe://'"),
    ],
)
def test_matcher_rejects_bad_patterns(pattern: str, reason: str) -> None:
    with pytest.raises(SpiffeIdError) as err:
        SpiffeIdMatcher.of([pattern])
    assert reason in str(err.value)
    assert pattern in str(err.value)


def test_matcher_union() -> None:
    combined = SpiffeIdMatcher.of(["spiffe://a/x"]) | SpiffeIdMatcher.of(["spiffe://b/*"])
    assert combined.matches(SpiffeId.parse("spiffe://a/x"))
    assert combined.matches(SpiffeId.parse("spiffe://b/y"))
    assert not combined.matches(SpiffeId.parse("spiffe://a/y"))


_td = st.text(alphabet="abcdefghijklmnopqrstuvwxyz0123456789.-_", min_size=1, max_size=40)
_segment = st.text(
    alphabet="abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789.-_", min_size=1, max_size=12
).filter(lambda s: s not in (".", ".."))


@given(_td, st.lists(_segment, max_size=6))
def test_roundtrip_valid_ids(trust_domain: str, segments: list[str]) -> None:
    spiffe_id = SpiffeId.from_parts(trust_domain, *segments)
    assert SpiffeId.parse(str(spiffe_id)) == spiffe_id
    assert spiffe_id.segments == tuple(segments)


@given(st.text(max_size=80))
def test_parse_never_fails_with_anything_but_spiffe_id_error(text: str) -> None:
    try:
        spiffe_id = SpiffeId.parse(text)
    except SpiffeIdError:
        return
    assert str(spiffe_id) == text
