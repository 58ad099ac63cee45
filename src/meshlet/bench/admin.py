"""Reading a running proxy's admin endpoint (Envoy's text formats)."""

from __future__ import annotations

import time
import urllib.error
import urllib.request

from meshlet.bench.procs import LOOPBACK, Child, ChildError


def admin_get(port: int, path: str, timeout: float = 2.0, host: str = LOOPBACK) -> tuple[int, str]:
    """GET ``path`` from the admin endpoint: (status, body). Status 0: no answer."""
    url = f"http://{host}:{port}{path}"
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return response.status, response.read().decode("utf-8", errors="replace")
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode("utf-8", errors="replace")
    except (urllib.error.URLError, OSError):
        return 0, ""


def wait_ready(port: int, timeout: float, child: Child | None = None) -> None:
    """Wait until the admin endpoint's ``/ready`` answers 200."""
    deadline = time.monotonic() + timeout
    status = 0
    while time.monotonic() < deadline:
        status, _ = admin_get(port, "/ready", timeout=1.0)
        if status == 200:
            return
        if child is not None:
            child.check_alive()
        time.sleep(0.1)
    answer = status or "no answer"
    raise ChildError(f"the proxy was not ready within {timeout:.0f} s (admin /ready: {answer})")


def parse_stats(text: str) -> dict[str, str]:
    """Envoy's ``/stats`` text: one ``name: value`` per line (histograms keep their summary text)."""
    stats: dict[str, str] = {}
    for line in text.splitlines():
        name, sep, value = line.partition(": ")
        if sep:
            stats[name.strip()] = value.strip()
    return stats
