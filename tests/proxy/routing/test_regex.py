"""Regex engines: full-match predicates, refusal at config time, selection by name."""

from __future__ import annotations

import pytest

from meshlet.errors import ConfigError
from meshlet.proxy.routing.regex import StdlibRegexEngine, regex_engine
from meshlet.registry import registry


def test_re_engine_full_match() -> None:
    match = regex_engine("re").compile("/api/v[0-9]+", "p")
    assert match("/api/v1")
    assert not match("/api/v1/x")
    assert not match("x/api/v1")


def test_bad_pattern_is_a_config_error_naming_the_field() -> None:
    with pytest.raises(
        ConfigError, match=r"^routes\[0\]\.match\.safe_regex\.regex: invalid regex '\(unclosed'"
    ):
        StdlibRegexEngine().compile("(unclosed", "routes[0].match.safe_regex.regex")


def test_default_engine_is_registered() -> None:
    assert "re" in registry.names("regex_engine")
    assert regex_engine() is regex_engine("re")


def test_unknown_engine_is_a_clear_error() -> None:
    with pytest.raises(ConfigError, match=r"^settings\.regex_engine: regex engine 'pcre' is not available"):
        regex_engine("pcre", "settings.regex_engine")
