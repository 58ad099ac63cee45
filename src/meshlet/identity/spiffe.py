"""SPIFFE IDs (https://github.com/spiffe/spiffe/blob/main/standards/SPIFFE-ID.md).

A SPIFFE ID is ``spiffe://<trust domain><path>``:

- the scheme is exactly ``spiffe`` (lower case);
- the trust domain is 1-255 characters of ``[a-z0-9.-_]`` — so no upper case,
  no port, no userinfo;
- the path is empty or ``/``-separated segments of ``[a-zA-Z0-9.-_]``, none
  empty, none ``.`` or ``..``, no trailing slash — so no percent-encoding,
  no query and no fragment;
- the whole ID is at most 2048 bytes.

Istio names workloads ``spiffe://<td>/ns/<namespace>/sa/<service account>``;
``SpiffeId.for_workload`` builds that form and ``namespace`` /
``service_account`` read it back.

``SpiffeIdMatcher`` is an allow-list of IDs: exact IDs, whole trust domains
(``spiffe://td/*``) and path prefixes (``spiffe://td/ns/prod/*``, which
matches whole segments only).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from meshlet.errors import MeshletError

SCHEME_PREFIX = "spiffe://"
MAX_ID_BYTES = 2048
MAX_TRUST_DOMAIN_BYTES = 255

_TRUST_DOMAIN_CHARS = frozenset("abcdefghijklmnopqrstuvwxyz0123456789.-_")
_PATH_SEGMENT_CHARS = _TRUST_DOMAIN_CHARS | frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZ")


class SpiffeIdError(MeshletError, ValueError):
    """A string is not a valid SPIFFE ID, trust domain or ID pattern; the message says why."""


def _describe_bad_chars(text: str, allowed: frozenset[str]) -> str:
    bad = sorted({c for c in text if c not in allowed})
    return ", ".join(repr(c) for c in bad[:5])


def parse_trust_domain(text: str) -> str:
    """Validate a trust domain name, given bare (``example.org``) or as its
    SPIFFE ID (``spiffe://example.org``); returns the bare name."""
    name = text[len(SCHEME_PREFIX):] if text.startswith(SCHEME_PREFIX) else text
    if not name:
        raise SpiffeIdError(f"{text!r}: trust domain is empty")
    if "/" in name:
        raise SpiffeIdError(f"{text!r}: a trust domain has no path (did you mean a SPIFFE ID?)")
    _check_trust_domain(text, name)
    return name


def _check_trust_domain(text: str, name: str) -> None:
    if len(name) > MAX_TRUST_DOMAIN_BYTES:
        raise SpiffeIdError(f"{text!r}: trust domain is longer than {MAX_TRUST_DOMAIN_BYTES} bytes")
    if not _TRUST_DOMAIN_CHARS.issuperset(name):
        bad = _describe_bad_chars(name, _TRUST_DOMAIN_CHARS)
        raise SpiffeIdError(
            f"{text!r}: trust domain may only contain lower-case letters, digits, '.', '-' and '_'"
            f" (found {bad}; ports, userinfo and upper case are not allowed)"
        )


def _check_path(text: str, path: str) -> None:
    if not path:
        return
    segments = path.split("/")[1:]  # path starts with "/"
    for index, segment in enumerate(segments):
        if not segment:
            where = "a trailing slash" if index == len(segments) - 1 else "an empty segment"
            raise SpiffeIdError(f"{text!r}: path has {where}")
        if segment in (".", ".."):
            raise SpiffeIdError(f"{text!r}: path has a {segment!r} segment")
        if not _PATH_SEGMENT_CHARS.issuperset(segment):
            bad = _describe_bad_chars(segment, _PATH_SEGMENT_CHARS)
            raise SpiffeIdError(
                f"{text!r}: path segments may only contain letters, digits, '.', '-' and '_'"
                f" (found {bad}; queries, fragments and percent-encoding are not allowed)"
            )


@dataclass(frozen=True, slots=True, order=True)
class SpiffeId:
    """A validated SPIFFE ID. ``path`` is empty or starts with ``/``.

    Build one with ``SpiffeId.parse`` / ``from_parts`` / ``for_workload``;
    the constructor does not validate.
    """

    trust_domain: str
    path: str = ""

    @classmethod
    def parse(cls, text: str) -> SpiffeId:
        if len(text.encode("utf-8", "surrogatepass")) > MAX_ID_BYTES:
            raise SpiffeIdError(f"SPIFFE ID is longer than {MAX_ID_BYTES} bytes ({text[:64]!r}...)")
        if not text.startswith(SCHEME_PREFIX):
            scheme = text.split(":", 1)[0] if ":" in text else ""
            found = f"scheme {scheme!r}" if scheme else "no scheme"
            raise SpiffeIdError(f"{text!r}: a SPIFFE ID starts with 'spiffe://' ({found})")
        rest = text[len(SCHEME_PREFIX):]
        slash = rest.find("/")
        trust_domain, path = (rest, "") if slash < 0 else (rest[:slash], rest[slash:])
        if not trust_domain:
            raise SpiffeIdError(f"{text!r}: trust domain is missing")
        _check_trust_domain(text, trust_domain)
        _check_path(text, path)
        return cls(trust_domain, path)

    @classmethod
    def from_parts(cls, trust_domain: str, *segments: str) -> SpiffeId:
        """``from_parts("td", "ns", "default")`` is ``spiffe://td/ns/default``;
        each segment is validated on its own (no ``/`` inside one)."""
        for segment in segments:
            if "/" in segment:
                raise SpiffeIdError(f"path segment {segment!r} contains '/'")
        path = "".join(f"/{s}" for s in segments)
        return cls.parse(f"{SCHEME_PREFIX}{trust_domain}{path}")

    @classmethod
    def for_workload(cls, trust_domain: str, namespace: str, service_account: str) -> SpiffeId:
        """Istio's workload identity: ``spiffe://<td>/ns/<namespace>/sa/<service_account>``."""
        return cls.from_parts(trust_domain, "ns", namespace, "sa", service_account)

    @property
    def segments(self) -> tuple[str, ...]:
        return tuple(self.path.split("/")[1:]) if self.path else ()

    @property
    def namespace(self) -> str | None:
        """The namespace of an Istio-form ID, else None."""
        segments = self.segments
        return segments[1] if _is_workload_form(segments) else None

    @property
    def service_account(self) -> str | None:
        """The service account of an Istio-form ID, else None."""
        segments = self.segments
        return segments[3] if _is_workload_form(segments) else None

    @property
    def trust_domain_id(self) -> SpiffeId:
        """``spiffe://<td>``, the ID of this ID's trust domain."""
        return SpiffeId(self.trust_domain)

    def member_of(self, trust_domain: str) -> bool:
        return self.trust_domain == trust_domain

    def has_prefix(self, prefix: SpiffeId) -> bool:
        """Same trust domain and ``prefix``'s path segments lead this one's
        (``/ns/a`` leads ``/ns/a/sa/b`` but not ``/ns/ab``)."""
        if self.trust_domain != prefix.trust_domain:
            return False
        return self.path == prefix.path or self.path.startswith(prefix.path + "/")

    def __str__(self) -> str:
        return f"{SCHEME_PREFIX}{self.trust_domain}{self.path}"


def _is_workload_form(segments: tuple[str, ...]) -> bool:
    return len(segments) == 4 and segments[0] == "ns" and segments[2] == "sa"


@dataclass(frozen=True, slots=True)
class SpiffeIdMatcher:
    """An allow-list of SPIFFE IDs.

    ``exact``: these IDs; ``trust_domains``: any ID in these trust domains;
    ``prefixes``: any ID at or below these IDs (whole path segments). An ID
    matches when any rule matches; an empty matcher matches nothing.
    """

    exact: frozenset[SpiffeId] = frozenset()
    trust_domains: frozenset[str] = frozenset()
    prefixes: tuple[SpiffeId, ...] = ()

    @classmethod
    def of(cls, patterns: Iterable[str]) -> SpiffeIdMatcher:
        """Build from patterns: ``spiffe://td/ns/a/sa/b`` (exact),
        ``spiffe://td/*`` (the whole trust domain), ``spiffe://td/ns/a/*``
        (prefix). ``*`` is only allowed as the whole last segment."""
        exact: set[SpiffeId] = set()
        domains: set[str] = set()
        prefixes: list[SpiffeId] = []
        for pattern in patterns:
            if pattern.endswith("/*"):
                base = _parse_pattern_base(pattern)
                if base.path:
                    prefixes.append(base)
                else:
                    domains.add(base.trust_domain)
            elif "*" in pattern:
                raise SpiffeIdError(
                    f"{pattern!r}: '*' is only allowed as the whole last path segment "
                    "(spiffe://td/* or spiffe://td/some/prefix/*)"
                )
            else:
                exact.add(SpiffeId.parse(pattern))
        return cls(frozenset(exact), frozenset(domains), tuple(prefixes))

    def matches(self, spiffe_id: SpiffeId) -> bool:
        if spiffe_id in self.exact or spiffe_id.trust_domain in self.trust_domains:
            return True
        return any(spiffe_id.has_prefix(prefix) for prefix in self.prefixes)

    def matches_text(self, text: str) -> bool:
        """Like ``matches`` for a string; a string that is not a valid SPIFFE ID matches nothing."""
        try:
            return self.matches(SpiffeId.parse(text))
        except SpiffeIdError:
            return False

    @property
    def is_empty(self) -> bool:
        return not (self.exact or self.trust_domains or self.prefixes)

    def describe(self) -> str:
        """The rules as patterns, for error messages: ``spiffe://a/x, spiffe://b/*``."""
        patterns = sorted(str(i) for i in self.exact)
        patterns += sorted(f"{SCHEME_PREFIX}{td}/*" for td in self.trust_domains)
        patterns += [f"{p}/*" for p in self.prefixes]
        return ", ".join(patterns) if patterns else "(none)"

    def __or__(self, other: SpiffeIdMatcher) -> SpiffeIdMatcher:
        return SpiffeIdMatcher(
            self.exact | other.exact,
            self.trust_domains | other.trust_domains,
            self.prefixes + tuple(p for p in other.prefixes if p not in self.prefixes),
        )


def _parse_pattern_base(pattern: str) -> SpiffeId:
    base = pattern[:-2]
    if pattern == SCHEME_PREFIX + "*":
        raise SpiffeIdError(f"{pattern!r}: trust domain is missing ('*' cannot stand for trust domains)")
    if "*" in base:
        raise SpiffeIdError(f"{pattern!r}: '*' is only allowed as the whole last path segment")
    try:
        return SpiffeId.parse(base)
    except SpiffeIdError as err:
        raise SpiffeIdError(f"pattern {pattern!r}: {err}") from None
