"""``meshlet doctor``: what this machine gives meshlet, and what it lacks.

It reports the Python runtime, the event loop (uvloop or asyncio), the regex
engines that load here, and the multi-buffer crypto path: is ``libcrypto_mb``
installed, does the CPU have AVX-512 IFMA, does the library apply to each
algorithm, and therefore which path ``meshlet.batch`` takes for each key
type and why. ``--bench`` adds a signing micro-benchmark (batched vs
``cryptography``) per key type; ``--json`` prints one JSON object.
"""

from __future__ import annotations

import json
import platform
import sys
from importlib import metadata
from typing import Any

import click

from meshlet import __version__
from meshlet.errors import ConfigError

REGEX_ENGINES = ("re", "re2", "hyperscan")
BATCH_KEY_TYPES = ("RSA-2048", "RSA-3072", "RSA-4096", "P-256", "P-384", "Ed25519")
BENCH_KEY_TYPES = ("RSA-2048", "RSA-3072", "RSA-4096", "P-256", "P-384")


def _version_of(distribution: str) -> str | None:
    try:
        return metadata.version(distribution)
    except metadata.PackageNotFoundError:
        return None


def python_report() -> dict[str, Any]:
    return {
        "version": platform.python_version(),
        "implementation": platform.python_implementation(),
        "executable": sys.executable,
    }


def event_loop_report() -> dict[str, Any]:
    try:
        import uvloop
    except ImportError as exc:
        return {"uvloop": None, "loop": "asyncio", "reason": f"uvloop does not import: {exc}"}
    return {"uvloop": uvloop.__version__, "loop": "uvloop", "reason": "uvloop is installed"}


def regex_report() -> dict[str, dict[str, Any]]:
    from meshlet.proxy.routing.regex import MultiPatternEngine, regex_engine

    engines: dict[str, dict[str, Any]] = {}
    for name in REGEX_ENGINES:
        try:
            engine = regex_engine(name)
        except ConfigError as exc:
            engines[name] = {"available": False, "reason": exc.message}
            continue
        engines[name] = {"available": True, "multi_pattern": isinstance(engine, MultiPatternEngine)}
    return engines


def crypto_mb_report() -> dict[str, Any]:
    from meshlet.keys import crypto_mb

    report = crypto_mb.probe().as_dict()
    report["wheels"] = {name: _version_of(name) for name in ("ipp-crypto", "intel-cmplr-lib-rt")}
    return report


def batch_report() -> dict[str, dict[str, Any]]:
    from meshlet.keys.batch import INLINE_KEY_TYPES, plan_for

    paths: dict[str, dict[str, Any]] = {}
    for kind in BATCH_KEY_TYPES:
        chosen = plan_for(kind)
        paths[kind] = {
            "path": "crypto_mb" if chosen.batched else "software",
            "reason": chosen.reason,
            # Where signing runs under the default ``execution: auto``.
            "execution": "inline" if kind in INLINE_KEY_TYPES else "thread",
        }
    return paths


def bench_report(seconds: float) -> dict[str, Any]:
    from meshlet.keys.batch import measure

    return {kind: measure(kind, seconds) for kind in BENCH_KEY_TYPES}


def diagnose(bench_seconds: float | None = None) -> dict[str, Any]:
    """Everything ``meshlet doctor`` reports, as one JSON-able object."""
    report: dict[str, Any] = {
        "meshlet": __version__,
        "python": python_report(),
        "event_loop": event_loop_report(),
        "regex_engines": regex_report(),
        "crypto_mb": crypto_mb_report(),
        "batch": batch_report(),
    }
    if bench_seconds is not None:
        report["bench"] = bench_report(bench_seconds)
    return report


def _yes(value: object) -> str:
    return "yes" if value else "no"


def render(report: dict[str, Any]) -> list[str]:
    """The report as lines for a terminal."""
    py = report["python"]
    loop = report["event_loop"]
    mb = report["crypto_mb"]
    lines = [
        f"meshlet {report['meshlet']}",
        f"python      {py['version']} ({py['implementation']}) {py['executable']}",
        f"event loop  {loop['loop']}" + (f" {loop['uvloop']}" if loop["uvloop"] else f" ({loop['reason']})"),
        "regex engines:",
    ]
    for name, engine in report["regex_engines"].items():
        if engine["available"]:
            extra = ", multi-pattern sets" if engine["multi_pattern"] else ""
            lines.append(f"  {name:<10} available{extra}")
        else:
            lines.append(f"  {name:<10} unavailable: {engine['reason']}")
    lines += [
        "crypto_mb (multi-buffer, AVX-512 IFMA):",
        f"  library          {mb['library'] or 'not found'}"
        + (f"  [{mb['version']}]" if mb["version"] else ""),
        f"  AVX-512 IFMA     {_yes(mb['avx512ifma'])}"
        f" (AVX-512 enabled by the OS: {_yes(mb['avx512_enabled_by_os'])})",
        f"  applicable       {_yes(mb['applicable'])}",
    ]
    if mb["algorithms"]:
        supported = ", ".join(f"{name} {_yes(ok)}" for name, ok in mb["algorithms"].items())
        lines.append(f"  algorithms       {supported}")
    lines.append(f"  verdict          {mb['reason']}")
    lines.append("meshlet.batch path per key type:")
    for kind, chosen in report["batch"].items():
        lines.append(f"  {kind:<9} {chosen['path']:<10} {chosen['execution']:<7} {chosen['reason']}")
    if "bench" in report:
        lines.append("signing benchmark (signs per CPU-second; batched vs cryptography):")
        for kind, run in report["bench"].items():
            lines.append(
                f"  {kind:<9} batch thread {run['batch_thread']['signs_per_cpu_s']:>7}"
                f"  batch inline {run['batch_inline']['signs_per_cpu_s']:>7}"
                f"  cryptography {run['cryptography']['signs_per_cpu_s']:>7}"
                f"  x{run['speedup_per_cpu']}"
            )
    return lines


@click.command()
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
@click.option("--bench", is_flag=True, help="Also measure batched vs cryptography signing per key type.")
@click.option(
    "--bench-seconds",
    type=click.FloatRange(0.1, 60.0),
    default=1.5,
    show_default=True,
    help="Time spent per key type by --bench.",
)
def doctor(as_json: bool, bench: bool, bench_seconds: float) -> None:
    """Check what this machine gives meshlet: Python, event loop, regex
    engines, and the multi-buffer (crypto_mb) signing path."""
    report = diagnose(bench_seconds if bench else None)
    if as_json:
        click.echo(json.dumps(report, indent=2))
        return
    for line in render(report):
        click.echo(line)
