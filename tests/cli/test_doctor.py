"""``meshlet doctor``: the machine report, in text and JSON, through the real CLI."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from meshlet.cli.doctor import diagnose, doctor, render
from meshlet.keys import crypto_mb
from meshlet.keys.batch import SLOWER_BATCHED


def test_json_report_matches_this_machine() -> None:
    result = CliRunner().invoke(doctor, ["--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    assert report["python"]["version"] == ".".join(map(str, sys.version_info[:3]))
    assert report["regex_engines"]["re"] == {"available": True, "multi_pattern": False}
    probe = crypto_mb.probe()
    mb = report["crypto_mb"]
    assert mb["usable"] == probe.usable and mb["avx512ifma"] == probe.has_ifma
    assert mb["avx512ifma"] == (" avx512ifma" in Path("/proc/cpuinfo").read_text())
    assert mb["wheels"]["ipp-crypto"] is not None or mb["library"] is None
    batch = report["batch"]
    assert batch["Ed25519"]["path"] == "software"
    assert batch["P-256"]["execution"] == "inline" and batch["RSA-2048"]["execution"] == "thread"
    for kind in ("RSA-2048", "RSA-3072", "RSA-4096", "P-256", "P-384"):
        # Key types that batch slower than software on this CPU kind run in software on purpose.
        batched = probe.supports(kind) and kind not in SLOWER_BATCHED
        expected = "crypto_mb" if batched else "software"
        assert batch[kind]["path"] == expected, batch[kind]
        assert batch[kind]["reason"]
    assert "bench" not in report


def test_text_report_says_which_path_runs_and_why() -> None:
    result = CliRunner().invoke(doctor, [])
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert lines[0].startswith("meshlet ")
    assert any(line.startswith("event loop  ") for line in lines)
    assert f"  verdict          {crypto_mb.probe().reason}" in lines
    rsa_line = next(line for line in lines if line.startswith("  RSA-2048 "))
    assert ("crypto_mb" if crypto_mb.probe().supports("RSA-2048") else "software") in rsa_line


def test_a_missing_library_is_reported_with_its_reason() -> None:
    report = diagnose()
    absent = crypto_mb.Probe(error="libcrypto_mb not found (pip install ipp-crypto)")
    report["crypto_mb"] = {**absent.as_dict(), "wheels": {}}
    lines = render(report)
    assert "  library          not found" in lines
    assert "  verdict          libcrypto_mb not found (pip install ipp-crypto)" in lines


def test_bench_rows_are_rendered() -> None:
    report = diagnose()
    report["bench"] = {
        "P-256": {
            "batch_thread": {"signs_per_cpu_s": 30000},
            "batch_inline": {"signs_per_cpu_s": 45000},
            "cryptography": {"signs_per_cpu_s": 36000},
            "speedup_per_cpu": 1.25,
        }
    }
    row = next(line for line in render(report) if line.startswith("  P-256     batch"))
    assert "45000" in row and "36000" in row and "x1.25" in row


def test_meshlet_doctor_runs_from_the_command_line() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "meshlet.cli.main", "doctor", "--json"],
        capture_output=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr.decode()
    report = json.loads(proc.stdout)
    assert set(report) == {"meshlet", "python", "event_loop", "regex_engines", "crypto_mb", "batch"}


@pytest.mark.parametrize("seconds", ["0.01", "100"])
def test_bench_seconds_are_bounded(seconds: str) -> None:
    result = CliRunner().invoke(doctor, ["--bench", "--bench-seconds", seconds])
    assert result.exit_code == 2 and "--bench-seconds" in result.output
