"""meshlet apply/get/delete/describe/analyze against a real `meshlet control-plane run` process."""

from __future__ import annotations

import io
import json
import re
import select
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import yaml

from meshlet.cli.main import main

BOOKINFO = """
apiVersion: meshlet.dev/v1
kind: Service
metadata: {name: reviews}
spec: {ports: [{name: http, number: 9080}]}
---
apiVersion: meshlet.dev/v1
kind: Workload
metadata: {name: reviews-v1}
spec: {address: 127.0.0.1, ports: {http: 19080}, labels: {app: reviews, version: v1}}
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: reviews}
spec:
  host: reviews
  subsets:
  - {name: v1, labels: {version: v1}}
  - {name: v3, labels: {version: v3}}
"""
ROUTE = """
apiVersion: networking.istio.io/v1beta1
kind: VirtualService
metadata: {name: reviews}
spec:
  hosts: [reviews]
  http:
  - route:
    - {destination: {host: reviews, subset: v1}, weight: 50}
    - {destination: {host: reviews, subset: v3}, weight: 50}
"""
START_TIMEOUT = 20.0


def run(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as exited:
        main(argv)
    out, err = capsys.readouterr()
    assert isinstance(exited.value.code, int)
    return exited.value.code, out, err


@pytest.fixture
def server(tmp_path: Path) -> Iterator[str]:
    command = [sys.executable, "-m", "meshlet.cli.main", "control-plane", "run", "--api-port", "0",
               "--xds-port", "0", "--store", f"sqlite:{tmp_path / 'cp.db'}", "--log-level", "warning"]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert process.stdout is not None
        readable, _, _ = select.select([process.stdout], [], [], START_TIMEOUT)
        line = process.stdout.readline() if readable else ""  # the ready line, or EOF if it died
        if "ready" not in line:
            process.kill()
            _, err = process.communicate(timeout=10)
            pytest.fail(f"control plane did not start: {line!r} {err}")
        match = re.search(r"api=(\S+)", line)
        assert match is not None
        yield match.group(1)
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=10)


@pytest.fixture
def manifests(tmp_path: Path) -> Path:
    directory = tmp_path / "manifests"
    directory.mkdir()
    (directory / "bookinfo.yaml").write_text(BOOKINFO)
    (directory / "route.yaml").write_text(ROUTE)
    return directory


def test_apply_get_describe_delete(server: str, manifests: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(["apply", "-f", str(manifests), "--server", server], capsys)
    assert code == 0
    assert out.splitlines() == [
        "service.meshlet.dev/reviews created",
        "workload.meshlet.dev/reviews-v1 created",
        "destinationrule.networking.istio.io/reviews created",
        "virtualservice.networking.istio.io/reviews created",
    ]
    code, out, _ = run(["apply", "-f", str(manifests / "route.yaml"), "--server", server], capsys)
    assert out.strip() == "virtualservice.networking.istio.io/reviews unchanged"

    code, out, _ = run(["get", "vs", "--server", server, "-o", "wide"], capsys)
    header, row = out.splitlines()
    assert header.split() == ["NAME", "GATEWAYS", "HOSTS", "AGE"]
    assert row.split()[:3] == ["reviews", "<none>", "reviews"]

    code, out, _ = run(["get", "workloads", "-A", "--server", server, "-o", "wide"], capsys)
    assert out.splitlines()[1].split()[:4] == ["default", "reviews-v1", "127.0.0.1", "UNKNOWN"]

    code, out, _ = run(["get", "virtualservice", "reviews", "-o", "yaml", "--server", server], capsys)
    fetched = yaml.safe_load(out)
    assert fetched["apiVersion"] == "networking.istio.io/v1"
    assert fetched["spec"]["http"][0]["route"][1]["weight"] == 50

    code, out, _ = run(["describe", "dr", "reviews", "--server", server], capsys)
    assert code == 0
    assert "Kind:              DestinationRule" in out
    assert "Warning [IST0173] spec.subsets[1]: subset 'v3' selects no workloads of 'reviews'" in out

    code, out, _ = run(["analyze", "--server", server], capsys)
    assert code == 0 and "[IST0173]" in out

    code, out, _ = run(["delete", "vs", "reviews", "--server", server], capsys)
    assert code == 0 and out.strip() == "virtualservice.networking.istio.io/reviews deleted"
    code, _, err = run(["get", "vs", "reviews", "--server", server], capsys)
    assert code == 2 and "VirtualService default/reviews not found" in err
    code, _, err = run(["get", "vs", "--server", server], capsys)
    assert "No VirtualService resources found in namespace default." in err
    code, out, _ = run(["delete", "-f", str(manifests / "bookinfo.yaml"), "--server", server], capsys)
    assert code == 0 and len(out.splitlines()) == 3


def test_apply_from_stdin_with_namespace_and_dry_run(server: str, monkeypatch: pytest.MonkeyPatch,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setattr("sys.stdin", io.StringIO(ROUTE))
    code, out, _ = run(["apply", "-f", "-", "-n", "shop", "--dry-run", "--server", server], capsys)
    assert code == 0 and out.strip() == "virtualservice.networking.istio.io/reviews created (dry run)"
    code, _, err = run(["get", "vs", "-n", "shop", "--server", server], capsys)
    assert "No VirtualService resources found in namespace shop." in err
    monkeypatch.setattr("sys.stdin", io.StringIO(ROUTE))
    code, out, _ = run(["apply", "-f", "-", "-n", "shop", "--server", server], capsys)
    assert code == 0
    code, out, _ = run(["get", "vs", "-A", "-o", "json", "--server", server], capsys)
    assert [i["metadata"]["namespace"] for i in json.loads(out)["items"]] == ["shop"]


def test_registration_token_from_the_cli(server: str, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(["control-plane", "token", "--service-account", "reviews", "--server", server], capsys)
    assert code == 0
    token = out.strip()
    body = {"token": token, "service": "reviews", "address": "127.0.0.1", "ports": {"http": 19080}}
    registered = httpx.post(server + "/registry/register", json=body, timeout=10)
    assert registered.status_code == 201 and registered.json()["spec"]["serviceAccount"] == "reviews"
    code, _, err = run(["control-plane", "token", "--service-account", "Bad_SA", "--server", server], capsys)
    assert code == 2 and "not a DNS label" in err


def test_invalid_files_are_refused_before_sending(manifests: Path, tmp_path: Path,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text(ROUTE.replace("weight: 50}", "weight: 500}", 1).replace("hosts:", "hostz:"))
    # No server runs on this port: the error must come from local validation.
    code, _, err = run(["apply", "-f", str(bad), "--server", "http://127.0.0.1:9"], capsys)
    assert code == 2
    assert f"{bad}#0: VirtualService default/reviews: spec.hostz: unknown field" in err
    assert f"{bad}#0: VirtualService default/reviews: spec.http[0].route[0].weight: weight 500" in err
    assert "nothing was applied" in err


def test_unreachable_server(manifests: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run(["get", "vs", "--server", "http://127.0.0.1:9"], capsys)
    assert code == 1 and "cannot reach the control plane at http://127.0.0.1:9" in err


def test_offline_analyze(manifests: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(["analyze", "-f", str(manifests)], capsys)
    assert code == 0
    assert out.strip() == ("Warning [IST0173] (DestinationRule default/reviews spec.subsets[1]) subset 'v3' "
                           "selects no workloads of 'reviews' (version=v3)")
    (manifests / "route.yaml").write_text(ROUTE.replace("weight: 50}", "weight: 60}", 1)
                                          .replace("host: reviews, subset: v3", "host: ratings"))
    code, out, _ = run(["analyze", "-f", str(manifests), "-o", "json"], capsys)
    assert code == 79
    codes = sorted(f["code"] for f in yaml.safe_load(out)["findings"])
    assert codes == ["IST0101", "IST0173", "MSH0001"]
    clean = tmp_path / "clean.yaml"
    clean.write_text(BOOKINFO.replace("  - {name: v3, labels: {version: v3}}\n", ""))
    code, out, _ = run(["analyze", "-f", str(clean)], capsys)
    assert code == 0 and out.startswith("No validation issues found when analyzing")
