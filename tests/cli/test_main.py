"""The meshlet command's surface: help, version, and one-line errors with exit code 2."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import click
import pytest

from meshlet import __version__
from meshlet.cli.errors import EXIT_RUNTIME, EXIT_USAGE, CliError, run_command
from meshlet.cli.main import cli, main
from meshlet.errors import ConfigError


def run(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as exited:
        main(argv)
    out, err = capsys.readouterr()
    code = exited.value.code
    assert isinstance(code, int)
    return code, out, err


def test_help_lists_commands(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(["--help"], capsys)
    assert code == 0
    for command in ("proxy", "demo", "bench", "version"):
        assert f"  {command} " in out


def test_help_imports_no_command_module() -> None:
    script = (
        "import sys\n"
        "from meshlet.cli.errors import run_command\n"
        "from meshlet.cli.main import cli\n"
        "run_command(cli, ['--help'])\n"
        "print(sorted(m for m in sys.modules if m.startswith(('meshlet.cli.', 'meshlet.bench', 'grpc'))))\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=30,
                          check=True)
    loaded = done.stdout.strip().splitlines()[-1]
    assert loaded == "['meshlet.cli.errors', 'meshlet.cli.lazy', 'meshlet.cli.main']"


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(["version", "--short"], capsys)
    assert (code, out.strip()) == (0, f"meshlet {__version__}")
    code, out, _ = run(["version"], capsys)
    assert code == 0 and "httptools" in out and "openssl" in out


def test_no_arguments_shows_help_as_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run([], capsys)
    assert code == EXIT_USAGE
    assert "Commands:" in err and out == ""


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["nosuch"], "No such command 'nosuch'"),
        (["proxy", "--bogus"], "No such option '--bogus'"),
        (["proxy"], "Missing option '-c' / '--config'"),
        (["proxy", "--config", "/nonexistent/meshlet.yaml"], "does not exist"),
        (["proxy", "-c", "/etc/hostname", "--tls-engine", "gnutls"], "'gnutls' is not one of"),
        (["proxy", "-c", "/etc/hostname", "--admin-port", "70000"], "--admin-port"),
        (["bench", "proxy", "--rate", "0"], "--rate"),
    ],
)
def test_usage_errors_are_one_line_with_exit_code_2(
    argv: list[str], expected: str, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, err = run(argv, capsys)
    assert code == EXIT_USAGE
    assert out == ""
    assert err.count("\n") == 1 and err.startswith("meshlet: error: ")
    assert expected in err
    assert "Traceback" not in err


def _group_raising(exc: BaseException) -> click.Group:
    @click.group()
    def group() -> None:
        pass

    @group.command()
    def boom() -> None:
        raise exc

    return group


@pytest.mark.parametrize(
    ("exc", "code", "line"),
    [
        (ConfigError("static_resources.clusters[0].lb_policy", "MAGLEV is not supported yet"), EXIT_USAGE,
         "meshlet: error: static_resources.clusters[0].lb_policy: MAGLEV is not supported yet\n"),
        (CliError("the demo config needs\na listener"), EXIT_USAGE,
         "meshlet: error: the demo config needs a listener\n"),
        (CliError("benchmark failed", EXIT_RUNTIME), EXIT_RUNTIME, "meshlet: error: benchmark failed\n"),
        (RuntimeError("kaput"), EXIT_RUNTIME,
         "meshlet: error: unexpected RuntimeError: kaput (run with --log-level debug for details)\n"),
        (KeyboardInterrupt(), 130, "\n"),  # click ends the line; nothing else
    ],
)
def test_failures_become_one_line(exc: BaseException, code: int, line: str,
                                  capsys: pytest.CaptureFixture[str]) -> None:
    assert run_command(_group_raising(exc), ["boom"]) == code
    assert capsys.readouterr().err == line


def test_yaml_error_names_line_and_column(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    import yaml

    bad = tmp_path / "bad.yaml"
    bad.write_text("admin:\n  address: [unclosed\n")
    with bad.open() as fh:
        try:
            yaml.safe_load(fh)
        except yaml.YAMLError as exc:
            error = exc
    assert run_command(_group_raising(error), ["boom"]) == EXIT_USAGE
    err = capsys.readouterr().err
    assert err.startswith(f"meshlet: error: {bad}: line ") and "invalid YAML" in err
    assert err.count("\n") == 1


def test_lazy_group_reports_a_missing_module(capsys: pytest.CaptureFixture[str]) -> None:
    from meshlet.cli.lazy import LazyCommand, LazyGroup

    group = LazyGroup(name="meshlet", lazy_commands={"gone": LazyCommand("meshlet.nonexistent:cmd", "x")})
    assert run_command(group, ["gone"]) == EXIT_RUNTIME
    assert "'gone' is unavailable" in capsys.readouterr().err


def test_group_registers_every_command() -> None:
    ctx = click.Context(cli)
    for name in cli.list_commands(ctx):  # type: ignore[attr-defined]
        assert isinstance(cli.get_command(ctx, name), click.Command)


@pytest.mark.parametrize("argv", [[sys.executable, "-m", "meshlet.cli.main"], ["meshlet"]])
def test_runs_as_module_and_entry_point(argv: list[str]) -> None:
    if argv == ["meshlet"]:
        script = Path(sys.executable).parent / "meshlet"
        if not script.exists():
            pytest.skip("the meshlet entry point is not installed in this environment")
        argv = [str(script)]
    done = subprocess.run([*argv, "proxy", "--config", "/nonexistent.yaml"], capture_output=True,
                          text=True, timeout=30, check=False)
    assert done.returncode == EXIT_USAGE
    assert done.stdout == ""
    assert done.stderr.count("\n") == 1 and "does not exist" in done.stderr


def test_bench_proxy_table_and_json_output(monkeypatch: pytest.MonkeyPatch,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    import json

    import meshlet.bench.proxy as bench_proxy

    seen: list[object] = []

    def fake_run(opts: bench_proxy.ProxyBenchOptions, progress: object) -> dict[str, object]:
        seen.append(opts)
        return {"rows": [{"name": "meshlet", "rps_max": 1234.5, "p50_ms": 0.5},
                         {"name": "haproxy", "error": "haproxy is not installed"}]}

    monkeypatch.setattr(bench_proxy, "run_proxy_bench", fake_run)
    argv = ["bench", "proxy", "--json", "--quick", "--rounds", "2", "--system", "meshlet"]
    code, out, err = run(argv, capsys)
    assert code == EXIT_RUNTIME  # a failed row fails the command...
    assert json.loads(out)["rows"][0]["rps_max"] == 1234.5  # ...after printing the one JSON object
    assert err.strip() == "meshlet: error: benchmark failed for: haproxy"
    opts = seen[0]
    assert isinstance(opts, bench_proxy.ProxyBenchOptions)
    assert (opts.rounds, opts.systems, opts.saturation_s) == (2, ("meshlet",), bench_proxy.QUICK.saturation_s)

    code, out, _ = run(["bench", "proxy", "--duration", "3"], capsys)
    assert code == EXIT_RUNTIME
    assert "1234.5" in out and "haproxy is not installed" in out  # the table
