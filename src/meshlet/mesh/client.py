"""The control plane as the mesh commands use it: its resource API and registry,
and the mesh status endpoint (``meshlet.mesh.plane``)."""

from __future__ import annotations

import json
from typing import Any

import httpx

REQUEST_TIMEOUT = 10.0


class ControlPlaneError(RuntimeError):
    """The control plane refused a request or could not be reached."""


class MeshClient:
    def __init__(self, api_url: str, status_url: str | None = None, timeout: float = REQUEST_TIMEOUT) -> None:
        self.api_url = api_url.rstrip("/")
        self.status_url = status_url
        self.timeout = timeout

    def _call(self, method: str, url: str, body: object | None = None, *, text: str | None = None,
              params: dict[str, str] | None = None) -> Any:
        content = text if text is not None else (json.dumps(body) if body is not None else None)
        try:
            with httpx.Client(timeout=self.timeout) as client:
                response = client.request(method, url, content=content, params=params)
        except httpx.HTTPError as exc:
            raise ControlPlaneError(f"cannot reach the control plane at {url}: {exc}") from None
        try:
            data = response.json()
        except ValueError:
            raise ControlPlaneError(f"{url}: HTTP {response.status_code} without a JSON body") from None
        if response.status_code >= 400:
            message = data.get("error") if isinstance(data, dict) else None
            problems = data.get("problems") if isinstance(data, dict) else None
            detail = f" ({'; '.join(problems)})" if problems else ""
            raise ControlPlaneError(f"{method} {url}: {message or response.status_code}{detail}")
        return data

    # -- resources ---------------------------------------------------------------------------- #

    def healthz(self) -> dict[str, Any]:
        return dict(self._call("GET", f"{self.api_url}/healthz"))

    def apply(self, yaml_text: str, namespace: str = "default") -> list[dict[str, str]]:
        reply = self._call("POST", f"{self.api_url}/apply", text=yaml_text, params={"namespace": namespace})
        return list(reply["results"])

    def list(self, group: str, plural: str) -> list[dict[str, Any]]:
        return list(self._call("GET", f"{self.api_url}/apis/{group}/v1/{plural}")["items"])

    def get(self, group: str, plural: str, namespace: str, name: str) -> dict[str, Any] | None:
        try:
            return dict(self._call("GET", f"{self.api_url}/apis/{group}/v1/namespaces/{namespace}/"
                                          f"{plural}/{name}"))
        except ControlPlaneError as exc:
            if "not found" in str(exc):
                return None
            raise

    def put(self, group: str, plural: str, resource: dict[str, Any]) -> dict[str, Any]:
        meta = resource["metadata"]
        url = f"{self.api_url}/apis/{group}/v1/namespaces/{meta['namespace']}/{plural}/{meta['name']}"
        return dict(self._call("PUT", url, resource))

    def delete(self, group: str, plural: str, namespace: str, name: str) -> None:
        self._call("DELETE", f"{self.api_url}/apis/{group}/v1/namespaces/{namespace}/{plural}/{name}")

    # -- registry --------------------------------------------------------------------------------- #

    def issue_token(self, namespace: str, service_account: str, ttl: int = 300) -> str:
        reply = self._call("POST", f"{self.api_url}/registry/tokens",
                           {"namespace": namespace, "serviceAccount": service_account, "ttl": ttl})
        return str(reply["token"])

    def register(self, token: str, *, name: str, service: str, address: str, ports: dict[str, int],
                 version: str | None, proxy_id: str) -> dict[str, Any]:
        body = {"token": token, "name": name, "service": service, "address": address, "ports": ports,
                "version": version, "proxyId": proxy_id}
        return dict(self._call("POST", f"{self.api_url}/registry/register", body))

    def deregister(self, namespace: str, name: str, proxy_id: str) -> None:
        self._call("POST", f"{self.api_url}/registry/deregister",
                   {"namespace": namespace, "name": name, "proxyId": proxy_id})

    def report_health(self, namespace: str, name: str, health: str, reason: str | None = None) -> None:
        self._call("POST", f"{self.api_url}/registry/health",
                   {"namespace": namespace, "name": name, "health": health, "reason": reason})

    # -- sync status ---------------------------------------------------------------------------------- #

    def sync_status(self) -> dict[str, Any]:
        if self.status_url is None:
            raise ControlPlaneError("this control plane serves no mesh status endpoint")
        return dict(self._call("GET", self.status_url))
