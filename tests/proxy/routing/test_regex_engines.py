"""The regex engines side by side: full-match semantics, refusals at config time,
a missing library, thread safety, and the proxy using the engine it was told to."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import textwrap
import urllib.request
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import yaml

from meshlet.bench.apps import start_upstream
from meshlet.bench.configs import single_route_proxy
from meshlet.bench.procs import Child, free_port, wait_for_port
from meshlet.config.context import CompileContext, compiling
from meshlet.config.loader import parse_resource
from meshlet.config.routes import compile_route_configuration
from meshlet.errors import ConfigError
from meshlet.proxy.http.stream import RequestHead
from meshlet.proxy.routing import RouteTable
from meshlet.proxy.routing.regex import Predicate, RegexEngine, compiled_pattern, regex_engine

ENGINES = ("re", "re2", "hyperscan")
MODULES = {"re2": "re2", "hyperscan": "hyperscan"}
FIELD = "routes[0].match.safe_regex.regex"


def engine_named(name: str) -> RegexEngine:
    if name in MODULES:
        pytest.importorskip(MODULES[name], reason=f"{MODULES[name]} is not installed (meshlet[accel])")
    return regex_engine(name, "settings.regex_engine")


@pytest.fixture(params=ENGINES)
def engine(request: pytest.FixtureRequest) -> RegexEngine:
    return engine_named(request.param)


def compiled(engine: RegexEngine, pattern: str) -> Predicate:
    return engine.compile(pattern, FIELD)


# --------------------------------------------------------------------------- #
# Semantics every engine shares
# --------------------------------------------------------------------------- #

AGREED = [
    # (pattern, subject, matches)
    (r"/api/v[0-9]+/svc7/items/[a-z0-9-]+", "/api/v2/svc7/items/ab-1", True),
    (r"/api/v[0-9]+/svc7/items/[a-z0-9-]+", "/api/v2/svc7/items/AB", False),
    (r"/api/v[0-9]+", "/api/v1/x", False),  # the whole path must match...
    (r"/api/v[0-9]+", "x/api/v1", False),  # ...from its first character
    (r"/api/v[0-9]+", "/api/v1\n", False),  # no "end before a final newline"
    (r"/a|/b", "/b", True),  # alternation inside the anchoring, not around it
    (r"/a|/b", "/ab", False),
    (r"", "", True),
    (r"", "/", False),
    (r".*", "", True),
    (r"/x/.", "/x/é", True),  # "." is one code point, not one byte
    (r"/x/.", "/x/éé", False),
    (r"\d+", "123", True),
    (r"\d+", "١٢٣", False),  # ASCII classes (RE2's), not Unicode digits
    (r"\w+", "naïve", False),
    (r"(?i)/API", "/api", True),
    (r"/(?P<id>[0-9]+)", "/42", True),
    (r"\bfoo\b", "foo", True),
    (r"a{2,3}", "aaaa", False),
    (r"[^/]+", "a/b", False),
]


@pytest.mark.parametrize(("pattern", "subject", "matches"), AGREED)
def test_full_match_semantics(engine: RegexEngine, pattern: str, subject: str, matches: bool) -> None:
    assert compiled(engine, pattern)(subject) is matches


def test_odd_subjects_never_raise(engine: RegexEngine) -> None:
    match = compiled(engine, r"/.*")
    assert match("/\ud800") in (True, False)  # a lone surrogate is not text: no crash
    assert match("/\x00\xff") is True
    assert match("/" + "a" * 100_000) is True


@pytest.mark.parametrize("pattern", ["(unclosed", "a)|(b", "[z-a]", "*a"])
def test_malformed_patterns_are_refused_naming_the_field(engine: RegexEngine, pattern: str) -> None:
    with pytest.raises(ConfigError) as caught:
        compiled(engine, pattern)
    assert caught.value.path == FIELD


def test_overlong_pattern_is_refused(engine: RegexEngine) -> None:
    with pytest.raises(ConfigError, match="longer than"):
        compiled(engine, "a" * 20_000)


# --------------------------------------------------------------------------- #
# What each engine refuses
# --------------------------------------------------------------------------- #


@pytest.mark.parametrize("pattern", [r"(a)\1", r"(?=a)a", r"(?<=a)b", r"(?!a)b"])
def test_re2_refuses_what_it_cannot_run_in_linear_time(pattern: str) -> None:
    with pytest.raises(ConfigError, match=r"^routes\[0\]\.match\.safe_regex\.regex: RE2 cannot compile .+: "):
        compiled(engine_named("re2"), pattern)


@pytest.mark.parametrize(
    ("pattern", "reason"),
    [
        (r"(a)\1", "Back-references"),
        (r"(?=a)a", "Zero-width assertions"),
        (r"(?<=a)b", "Zero-width assertions"),
        (r"a++", "Possessive quantifiers"),
        (r"(?>a)", "Atomic groups"),
    ],
)
def test_hyperscan_refuses_with_its_reason(pattern: str, reason: str) -> None:
    with pytest.raises(ConfigError, match=rf"^{re.escape(FIELD)}: Hyperscan cannot compile .+: {reason}"):
        compiled(engine_named("hyperscan"), pattern)


def test_hyperscan_refuses_a_pattern_that_would_escape_its_anchors() -> None:
    # As "\A(?:a)|(b)\z" this would compile and match "a..." anywhere: it must be refused.
    with pytest.raises(ConfigError, match="Unmatched parentheses"):
        compiled(engine_named("hyperscan"), "a)|(b")


def test_stdlib_accepts_what_only_backtracking_can_do() -> None:
    assert compiled(engine_named("re"), r"(a)\1")("aa")
    assert compiled(engine_named("re"), r"(?=a)a")("a")


# --------------------------------------------------------------------------- #
# Selection, optional libraries, threads
# --------------------------------------------------------------------------- #


@pytest.mark.parametrize("name", ENGINES)
def test_engines_are_registered_singletons(name: str) -> None:
    assert engine_named(name) is regex_engine(name)
    assert regex_engine(name).name == name


@pytest.mark.parametrize(("name", "module"), MODULES.items())
def test_missing_library_is_reported_by_name(name: str, module: str) -> None:
    # A fresh interpreter where the library cannot be imported.
    script = textwrap.dedent(f"""
        import sys
        sys.modules[{module!r}] = None
        from meshlet.errors import ConfigError
        from meshlet.proxy.routing.regex import regex_engine
        try:
            regex_engine({name!r}, "settings.regex_engine")
        except ConfigError as exc:
            print(exc)
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=30,
                          check=True)
    assert done.stdout.startswith(f"settings.regex_engine: regex engine {name!r} is not installed")
    assert "install meshlet[accel]" in done.stdout


def test_only_multi_pattern_engines_expose_their_patterns() -> None:
    hs = compiled(engine_named("hyperscan"), "/h[0-9]")
    found = compiled_pattern(hs)
    assert found is not None and found.pattern == "/h[0-9]" and found.engine is regex_engine("hyperscan")
    assert compiled_pattern(compiled(engine_named("re"), "/r")) is None


def test_hyperscan_sets_report_every_match_in_list_order() -> None:
    engine = engine_named("hyperscan")
    patterns = ["/a/.*", "/a/b", "/c", "/a/[a-z]"]
    pattern_set = engine.compile_set(patterns, "vh")  # type: ignore[attr-defined]
    assert list(pattern_set.matching("/a/b")) == [0, 1, 3]
    assert list(pattern_set.matching("/c")) == [2]
    assert list(pattern_set.matching("/nothing")) == []
    assert list(pattern_set.matching("/a/\ud800")) == []


@pytest.mark.parametrize("name", ["re2", "hyperscan"])
def test_predicates_are_safe_across_threads(name: str) -> None:
    match = compiled(engine_named(name), r"/t/[0-9]+")

    def hammer(seed: int) -> int:
        return sum(match(f"/t/{seed}{i}") + match(f"/t/x{i}") for i in range(2000))

    with ThreadPoolExecutor(max_workers=4) as pool:
        assert list(pool.map(hammer, range(8))) == [2000] * 8


# --------------------------------------------------------------------------- #
# End to end: a real proxy process with each engine
# --------------------------------------------------------------------------- #


@pytest.fixture(scope="module")
def upstream_port() -> Iterator[int]:
    child, port = start_upstream()
    try:
        yield port
    finally:
        child.stop()


def regex_bootstrap(listen: int, upstream: int, admin: int, pattern: str, engine: str | None) -> str:
    config = single_route_proxy(listen, upstream, admin)
    hcm = config["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]
    hcm["route_config"]["virtual_hosts"][0]["routes"] = [
        {"match": {"safe_regex": {"regex": pattern}}, "direct_response": {"status": 299}},
        {"match": {"safe_regex": {"regex": "/other/[0-9]+"}}, "direct_response": {"status": 298}},
        {"match": {"prefix": "/"}, "route": {"cluster": "upstream"}},
    ]
    if engine is not None:
        layer = {"name": "static", "static_layer": {"meshlet.regex_engine": engine}}
        config["layered_runtime"] = {"layers": [layer]}
    return yaml.safe_dump(config)


def start_proxy(tmp_path: Path, bootstrap: str, *flags: str) -> Child:
    config = tmp_path / "proxy.yaml"
    config.write_text(bootstrap)
    argv = [sys.executable, "-m", "meshlet.cli.main", "proxy", "--config", str(config), *flags]
    return Child("meshlet proxy", argv, log_path=tmp_path / "proxy.log").start()


def status_of(url: str) -> int:
    with urllib.request.urlopen(url, timeout=5) as response:
        status: int = response.status
        return status


@pytest.mark.timeout(60)
@pytest.mark.parametrize(("name", "via_flag"), [(e, f) for e in ENGINES for f in (True, False)])
def test_proxy_routes_with_the_engine_it_was_given(tmp_path: Path, upstream_port: int, name: str,
                                                    via_flag: bool) -> None:
    engine_named(name)
    listen, admin = free_port(), free_port()
    bootstrap = regex_bootstrap(listen, upstream_port, admin, r"/api/v[0-9]+/items/[a-z]+",
                                None if via_flag else name)
    child = start_proxy(tmp_path, bootstrap, *(["--regex-engine", name] if via_flag else []))
    try:
        wait_for_port(listen, 20, child=child)
        assert status_of(f"http://127.0.0.1:{listen}/api/v3/items/abc") == 299
        assert status_of(f"http://127.0.0.1:{listen}/other/12") == 298
        assert status_of(f"http://127.0.0.1:{listen}/api/v3/items/ABC") == 200  # falls through upstream
        with urllib.request.urlopen(f"http://127.0.0.1:{admin}/server_info", timeout=5) as response:
            info = json.load(response)
        assert info["command_line_options"]["regex_engine"] == name
    finally:
        child.stop()


@pytest.mark.timeout(60)
@pytest.mark.parametrize("name", ["re2", "hyperscan"])
def test_proxy_refuses_a_pattern_its_engine_cannot_take(tmp_path: Path, name: str) -> None:
    engine_named(name)
    bootstrap = regex_bootstrap(free_port(), 9, free_port(), r"/(a)\1", None)
    child = start_proxy(tmp_path, bootstrap, "--regex-engine", name)
    try:
        assert child.proc is not None
        code = child.proc.wait(timeout=30)
    finally:
        child.stop()
    assert code == 2
    log = (tmp_path / "proxy.log").read_text()
    assert "routes[0].match.safe_regex.regex" in log
    assert ("RE2 cannot compile" if name == "re2" else "Hyperscan cannot compile") in log


# --------------------------------------------------------------------------- #
# Header matchers and compile caching
# --------------------------------------------------------------------------- #


def test_header_regex_matchers_use_the_engine(engine: RegexEngine) -> None:
    data = {"virtual_hosts": [{"name": "vh", "domains": ["*"], "routes": [{
        "match": {"prefix": "/", "headers": [{"name": "x-version", "string_match": {
            "safe_regex": {"regex": r"v[0-9]+\.[0-9]+"}}}]},
        "direct_response": {"status": 200},
    }]}]}
    msg = parse_resource("type.googleapis.com/envoy.config.route.v3.RouteConfiguration", data)
    with compiling(CompileContext(regex=engine)):
        config = compile_route_configuration(msg, "route_config")
    table = config.table
    assert isinstance(table, RouteTable)

    def selected(version: str) -> bool:
        headers = [("x-version", version)]
        head = RequestHead(method="GET", scheme="http", authority="h", path="/", headers=headers)
        return table.select(head) is not None

    assert selected("v1.12") and not selected("v1.12-rc") and not selected("xv1.1")


def test_hyperscan_compiles_a_pattern_once() -> None:
    engine_named("hyperscan")
    from meshlet.proxy.routing import regex_hyperscan  # importable once the engine is

    pattern = r"/cached/[0-9]+/only-once"
    first = compiled(regex_engine("hyperscan"), pattern)
    hits = regex_hyperscan._single_database.cache_info().hits
    second = compiled(regex_engine("hyperscan"), pattern)
    assert regex_hyperscan._single_database.cache_info().hits == hits + 1
    assert first("/cached/1/only-once") and second("/cached/22/only-once")
    assert not second("/cached/x/only-once")
