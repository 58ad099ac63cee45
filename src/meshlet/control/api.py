"""The control plane's resource API: HTTP/1.1 + JSON on loopback, served by
the project's own HTTP/1.1 codec.

Paths follow Kubernetes' shape, with kinds as lowercase plurals:

    GET    /apis/<group>/<version>/<plural>                          every namespace
    GET    /apis/<group>/<version>/namespaces/<ns>/<plural>          one namespace
    GET    /apis/<group>/<version>/namespaces/<ns>/<plural>/<name>
    PUT    /apis/<group>/<version>/namespaces/<ns>/<plural>/<name>   create or replace; a
           metadata.resourceVersion in the body makes it a compare-and-swap (409 on mismatch)
    DELETE /apis/<group>/<version>/namespaces/<ns>/<plural>/<name>   ?resourceVersion=N
    POST   /apply            multi-document YAML or JSON; all validated before any is written
                             (?namespace= for documents naming none, ?dryRun=true)
    GET    /analyze          findings over the stored config
    POST   /registry/register | /registry/deregister | /registry/health   (JSON bodies)
    POST   /registry/tokens  {"namespace", "serviceAccount", "ttl"} -> {"token"}: a single-use
           bootstrap token, when the control plane issues its own (``RegistrationTokens``)
    GET    /healthz

Errors are JSON ``{"error": "...", "problems": [...]}`` with 400 (invalid),
404, 405, 409 (conflict), 413, 503 (store unavailable).
"""

from __future__ import annotations

import asyncio
import json
import logging
import weakref
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qs, unquote

from meshlet.control.analyze import analyze
from meshlet.control.registry import RegistrationError, RegistrationTokens, Registry
from meshlet.control.resources import (
    DEFAULT_NAMESPACE,
    KINDS,
    Resource,
    ResourceInvalid,
    Workload,
    load_documents,
    plural,
)
from meshlet.control.store import Conflict, NotFound, Store, StoreError
from meshlet.errors import ConfigError
from meshlet.proxy.http.h1_server import H1ServerProtocol
from meshlet.proxy.http.stream import CodecSettings, DownstreamStream, ResponseHead
from meshlet.proxy.transport import ConnectionInfo

log = logging.getLogger(__name__)

MAX_REQUEST_BODY = 4 * 1024 * 1024
BODY_TIMEOUT = 10.0
# A store call that takes longer is answered 503 rather than holding the client.
STORE_TIMEOUT = 15.0
JSON_TYPE = "application/json"
PLURALS: dict[str, type[Resource]] = {plural(t): t for t in KINDS.values()}


@dataclass(frozen=True, slots=True)
class Reply:
    status: int
    body: object


class ApiError(Exception):
    def __init__(self, status: int, message: str, problems: list[str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.problems = problems or []


def keep_status(existing: Resource | None, incoming: Resource) -> Resource:
    """A Workload's status belongs to the registry (health comes from proxies): a
    manifest that carries none keeps the stored one."""
    if (isinstance(incoming, Workload) and isinstance(existing, Workload)
            and "status" not in incoming.model_fields_set):
        return incoming.model_copy(update={"status": existing.status})
    return incoming


def apply_action(existing: Resource | None, incoming: Resource) -> str:
    """What ``apply`` does with ``incoming``: created, configured or unchanged."""
    if existing is None:
        return "created"
    same = (existing.same_spec(incoming) and existing.metadata.labels == incoming.metadata.labels
            and existing.metadata.annotations == incoming.metadata.annotations
            and getattr(existing, "status", None) == getattr(incoming, "status", None))
    return "unchanged" if same else "configured"


class ResourceApi:
    def __init__(self, store: Store, registry: Registry | None = None, *,
                 host: str = "127.0.0.1", port: int = 0) -> None:
        self.store = store
        self.registry = registry
        self.host = host
        self.port = port
        self._server: asyncio.Server | None = None
        self._connections: weakref.WeakSet[H1ServerProtocol] = weakref.WeakSet()
        self._settings = CodecSettings(request_headers_timeout=10.0, idle_timeout=60.0,
                                       server_name="meshlet-control-plane")

    async def start(self) -> tuple[str, int]:
        loop = asyncio.get_running_loop()
        try:
            self._server = await loop.create_server(self._protocol, self.host, self.port, reuse_address=True)
        except OSError as exc:
            raise ConfigError("api.address", f"cannot listen on {self.host}:{self.port}: "
                                             f"{exc.strerror or exc}") from None
        return self.bound

    @property
    def bound(self) -> tuple[str, int]:
        if self._server is None:
            raise RuntimeError("the resource API is not started")
        host, port = self._server.sockets[0].getsockname()[:2]
        return host, port

    @property
    def url(self) -> str:
        host, port = self.bound
        return f"http://{host}:{port}"

    async def close(self) -> None:
        if self._server is None:
            return
        self._server.close()
        for proto in list(self._connections):
            proto.close()
        await asyncio.wait_for(self._server.wait_closed(), 5)
        self._server = None

    def _protocol(self) -> H1ServerProtocol:
        info = ConnectionInfo(peer=("", 0), local=(self.host, self.port), listener="control-api")
        proto = H1ServerProtocol(self._handle, info, self._settings)
        self._connections.add(proto)
        return proto

    async def _handle(self, stream: DownstreamStream) -> None:
        try:
            reply = await self._reply(stream)
        except ApiError as exc:
            reply = Reply(exc.status, {"error": exc.message, "problems": exc.problems})
        except ResourceInvalid as exc:
            reply = Reply(400, {"error": f"invalid: {exc.lines[0]}" if exc.lines else "invalid",
                                "problems": exc.lines})
        except ConfigError as exc:
            reply = Reply(400, {"error": str(exc), "problems": []})
        except Conflict as exc:
            reply = Reply(409, {"error": str(exc), "problems": []})
        except NotFound as exc:
            reply = Reply(404, {"error": str(exc), "problems": []})
        except RegistrationError as exc:
            reply = Reply(403, {"error": str(exc), "problems": []})
        except (StoreError, TimeoutError) as exc:
            reply = Reply(503, {"error": f"store unavailable: {exc}", "problems": []})
        except Exception:
            log.exception("control API %s %s failed", stream.head.method, stream.head.path)
            reply = Reply(500, {"error": "internal error", "problems": []})
        body = json.dumps(reply.body, indent=1).encode() + b"\n"
        headers = [("content-type", JSON_TYPE), ("content-length", str(len(body))),
                   ("cache-control", "no-store")]
        await stream.send_head(ResponseHead(reply.status, headers))
        await stream.send_data(body, end_stream=True)

    async def _reply(self, stream: DownstreamStream) -> Reply:
        try:
            body = await asyncio.wait_for(stream.body.read_all(MAX_REQUEST_BODY), BODY_TIMEOUT)
        except ValueError:
            raise ApiError(413, f"request body larger than {MAX_REQUEST_BODY} bytes") from None
        except TimeoutError:
            raise ApiError(408, "request body timed out") from None
        method = stream.head.method
        raw_path, _, query = stream.head.path.partition("?")
        params = parse_qs(query)
        parts = [unquote(p) for p in raw_path.strip("/").split("/") if p]
        route = _ROUTES.get((method, raw_path))
        if route is not None:
            return await asyncio.wait_for(route(self, body, params), STORE_TIMEOUT)
        if parts[:1] == ["apis"]:
            return await asyncio.wait_for(self._resource_call(method, parts[1:], body, params), STORE_TIMEOUT)
        if any(path == raw_path for _, path in _ROUTES):
            raise ApiError(405, f"{raw_path} does not support {method}")
        raise ApiError(404, f"no such path {raw_path!r}")

    # -- /apis ----------------------------------------------------------------- #

    async def _resource_call(self, method: str, parts: list[str], body: bytes,
                             params: dict[str, list[str]]) -> Reply:
        if len(parts) < 3:
            raise ApiError(404, "expected /apis/<group>/<version>/[namespaces/<ns>/]<kind>[/<name>]")
        group, version, rest = parts[0], parts[1], parts[2:]
        namespace: str | None = None
        if rest[0] == "namespaces" and len(rest) >= 3:
            namespace, rest = rest[1], rest[2:]
        if len(rest) > 2:
            raise ApiError(404, "too many path segments")
        resource_type = PLURALS.get(rest[0])
        if resource_type is None:
            raise ApiError(404, f"unknown resource {rest[0]!r} (known: {', '.join(sorted(PLURALS))})")
        if group != resource_type.GROUP or version not in resource_type.ACCEPTED_VERSIONS:
            raise ApiError(404, f"{resource_type.KIND} is served under /apis/{resource_type.GROUP}/"
                                f"{resource_type.VERSION}, not /apis/{group}/{version}")
        kind = resource_type.KIND
        if len(rest) == 1:
            if method != "GET":
                raise ApiError(405, f"collections support GET, not {method}")
            return await self._list(kind, namespace)
        if namespace is None:
            raise ApiError(404, "a named resource needs /namespaces/<ns>/ in its path")
        name = rest[1]
        if method == "GET":
            found = await self.store.get(kind, namespace, name)
            if found is None:
                raise ApiError(404, f"{kind} {namespace}/{name} not found")
            return Reply(200, found.to_dict())
        if method == "PUT":
            return await self._put(kind, namespace, name, body)
        if method == "DELETE":
            expected = params.get("resourceVersion", [None])[0]
            removed = await self.store.delete(kind, namespace, name, expected_version=expected)
            return Reply(200, removed.to_dict())
        raise ApiError(405, f"{kind} supports GET, PUT and DELETE, not {method}")

    async def _list(self, kind: str, namespace: str | None) -> Reply:
        snapshot = await self.store.snapshot([kind])
        items = [r.to_dict() for r in snapshot.resources if namespace is None or r.namespace == namespace]
        return Reply(200, {"apiVersion": "v1", "kind": "List",
                           "metadata": {"resourceVersion": str(snapshot.revision)}, "items": items})

    async def _put(self, kind: str, namespace: str, name: str, body: bytes) -> Reply:
        resources = load_documents(_text(body), "request body", namespace)
        if len(resources) != 1:
            raise ApiError(400, f"PUT takes exactly one resource, got {len(resources)}")
        resource = resources[0]
        if resource.key != (kind, namespace, name):
            raise ApiError(400, f"the body is {resource.resource_id} but the path names "
                                f"{kind} {namespace}/{name}")
        existing = await self.store.get(kind, namespace, name)
        resource = keep_status(existing, resource)
        stored = await self.store.put(resource, expected_version=resource.metadata.resource_version)
        return Reply(201 if existing is None else 200, stored.to_dict())

    # -- other routes ----------------------------------------------------------- #

    async def _apply(self, body: bytes, params: dict[str, list[str]]) -> Reply:
        namespace = params.get("namespace", [DEFAULT_NAMESPACE])[0]
        resources = load_documents(_text(body), "request body", namespace)
        dry_run = params.get("dryRun", ["false"])[0] in ("true", "1", "All")
        results: list[dict[str, str]] = []
        for resource in resources:
            existing = await self.store.get(*resource.key)
            resource = keep_status(existing, resource)
            action = apply_action(existing, resource)
            if action != "unchanged" and not dry_run:
                stored = await self.store.put(resource, expected_version=resource.metadata.resource_version)
                version = stored.metadata.resource_version or ""
            else:
                version = (existing.metadata.resource_version or "") if existing else ""
            results.append({"kind": resource.kind, "namespace": resource.namespace, "name": resource.name,
                            "action": action, "resourceVersion": version})
        return Reply(200, {"results": results, "dryRun": dry_run})

    async def _analyze(self, body: bytes, params: dict[str, list[str]]) -> Reply:
        snapshot = await self.store.snapshot()
        extra = load_documents(_text(body), "request body") if body.strip() else []
        findings = analyze([*snapshot.resources, *extra])
        return Reply(200, {"findings": [f.to_dict() for f in findings],
                           "revision": snapshot.revision})

    async def _healthz(self, body: bytes, params: dict[str, list[str]]) -> Reply:
        return Reply(200, {"status": "ok", "revision": await self.store.revision()})

    async def _register(self, body: bytes, params: dict[str, list[str]]) -> Reply:
        registry = self._registry()
        data = _json_object(body)
        workload = await registry.register(
            _field(data, "token", str), service=_field(data, "service", str),
            address=_field(data, "address", str), ports=_field(data, "ports", dict),
            labels=_optional(data, "labels", dict), version=_optional(data, "version", str),
            name=_optional(data, "name", str), proxy_id=_optional(data, "proxyId", str))
        return Reply(201, workload.to_dict())

    async def _deregister(self, body: bytes, params: dict[str, list[str]]) -> Reply:
        data = _json_object(body)
        await self._registry().deregister(_field(data, "namespace", str), _field(data, "name", str),
                                          proxy_id=_optional(data, "proxyId", str))
        return Reply(200, {"deregistered": data["name"]})

    async def _health(self, body: bytes, params: dict[str, list[str]]) -> Reply:
        data = _json_object(body)
        health = _field(data, "health", str)
        if health not in ("UNKNOWN", "HEALTHY", "UNHEALTHY", "DRAINING"):
            raise ApiError(400, f"health: {health!r} is not UNKNOWN, HEALTHY, UNHEALTHY or DRAINING")
        workload = await self._registry().report_health(
            _field(data, "namespace", str), _field(data, "name", str), health,
            _optional(data, "reason", str))
        return Reply(200, workload.to_dict())

    async def _issue_token(self, body: bytes, params: dict[str, list[str]]) -> Reply:
        tokens = self._registry().tokens
        if not isinstance(tokens, RegistrationTokens):
            raise ApiError(404, "tokens are issued by the mesh identity service, not this API")
        data = _json_object(body)
        ttl = _optional(data, "ttl", int) or 3600
        if not 1 <= ttl <= 86400:
            raise ApiError(400, f"ttl: {ttl} is out of range 1..86400 seconds")
        try:
            token = tokens.issue(_field(data, "namespace", str), _field(data, "serviceAccount", str), ttl)
        except ValueError as exc:
            raise ApiError(400, str(exc)) from None
        return Reply(201, {"token": token, "ttl": ttl})

    def _registry(self) -> Registry:
        if self.registry is None:
            raise ApiError(404, "this control plane has no workload registry")
        return self.registry


Route = Callable[[ResourceApi, bytes, dict[str, list[str]]], Awaitable[Reply]]
_ROUTES: dict[tuple[str, str], Route] = {
    ("POST", "/apply"): ResourceApi._apply,
    ("GET", "/analyze"): ResourceApi._analyze,
    ("POST", "/analyze"): ResourceApi._analyze,
    ("GET", "/healthz"): ResourceApi._healthz,
    ("POST", "/registry/register"): ResourceApi._register,
    ("POST", "/registry/deregister"): ResourceApi._deregister,
    ("POST", "/registry/health"): ResourceApi._health,
    ("POST", "/registry/tokens"): ResourceApi._issue_token,
}


def _text(body: bytes) -> str:
    try:
        return body.decode("utf-8")
    except UnicodeDecodeError:
        raise ApiError(400, "the body is not UTF-8") from None


def _json_object(body: bytes) -> dict[str, Any]:
    try:
        data = json.loads(body)
    except ValueError as exc:
        raise ApiError(400, f"the body is not JSON: {exc}") from None
    if not isinstance(data, dict):
        raise ApiError(400, "the body must be a JSON object")
    return data


def _field(data: dict[str, Any], name: str, kind: type[Any]) -> Any:
    if name not in data:
        raise ApiError(400, f"{name}: required field is missing")
    return _optional(data, name, kind)


def _optional(data: dict[str, Any], name: str, kind: type[Any]) -> Any:
    value = data.get(name)
    if value is not None and not isinstance(value, kind):
        raise ApiError(400, f"{name}: expected {kind.__name__}, got {type(value).__name__}")
    return value
