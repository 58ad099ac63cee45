"""Access logs from the running proxy: Envoy command operators, text and JSON, to files."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
from interop_helpers import StartMeshlet, bootstrap, cluster, hcm, listener, ports, require, route, run

pytestmark = pytest.mark.interop

FILE_LOG = "type.googleapis.com/envoy.extensions.access_loggers.file.v3.FileAccessLog"


def file_logger(path: Path, log_format: dict[str, object]) -> dict[str, object]:
    return {"name": "envoy.access_loggers.file",
            "typed_config": {"@type": FILE_LOG, "path": str(path), "log_format": log_format}}


def read_when(path: Path, lines: int, timeout: float = 10) -> list[str]:
    """Access logs are buffered and flushed in the background: wait for them."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.exists():
            found = path.read_text().splitlines()
            if len(found) >= lines:
                return found
        time.sleep(0.05)
    raise AssertionError(f"{path} did not get {lines} lines")


def test_text_and_json_access_logs(start_meshlet: StartMeshlet, upstream_port: int, tmp_path: Path) -> None:
    require("curl")
    text_path, json_path = tmp_path / "access.log", tmp_path / "access.json"
    loggers = [
        file_logger(text_path, {"text_format_source": {
            "inline_string": "%REQ(:METHOD)% %REQ(X-ENVOY-ORIGINAL-PATH?:PATH)% %PROTOCOL% %RESPONSE_CODE% "
                             "%UPSTREAM_CLUSTER%\n"}}),
        file_logger(json_path, {"json_format": {"status": "%RESPONSE_CODE%", "path": "%REQ(:PATH)%",
                                                "flags": "%RESPONSE_FLAGS%"}}),
    ]
    port, admin = ports(2)
    http = hcm([route("/app/", prefix_rewrite="/")], access_log=loggers)
    start_meshlet(bootstrap([listener("http", port, [http])], [cluster("app", upstream_port)], admin))
    for path in ("/app/status/201", "/nowhere"):
        run(["curl", "-sS", "--max-time", "10", "-o", "/dev/null", f"http://127.0.0.1:{port}{path}"])
    assert read_when(text_path, 2) == [
        "GET /app/status/201 HTTP/1.1 201 app",
        "GET /nowhere HTTP/1.1 404 -",
    ]
    entries = [json.loads(line) for line in read_when(json_path, 2)]
    # As in Envoy, :PATH is the path sent upstream (rewritten); the original is kept aside.
    assert entries[0] == {"status": 201, "path": "/status/201", "flags": "-"}
    assert entries[1]["status"] == 404 and entries[1]["flags"] == "NR"  # Envoy's "no route" flag
