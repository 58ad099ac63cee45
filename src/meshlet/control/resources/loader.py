"""Reading resources: dicts and multi-document YAML in, validated models out.

``load_documents(text, source)`` takes what ``kubectl apply -f`` takes:
several ``---``-separated documents, ``List`` kinds with ``items``, empty
documents skipped. Every problem in every document is reported, each line
naming the document, the resource and the field path.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from meshlet.control.resources.base import DEFAULT_NAMESPACE, Resource, ResourceInvalid
from meshlet.control.resources.mesh import Service, Workload
from meshlet.control.resources.networking import (
    DestinationRule,
    Gateway,
    ServiceEntry,
    VirtualService,
    WorkloadEntry,
)
from meshlet.control.resources.security import (
    AuthorizationPolicy,
    PeerAuthentication,
    RequestAuthentication,
)

RESOURCE_TYPES: tuple[type[Resource], ...] = (
    VirtualService,
    DestinationRule,
    Gateway,
    ServiceEntry,
    WorkloadEntry,
    PeerAuthentication,
    AuthorizationPolicy,
    RequestAuthentication,
    Service,
    Workload,
)
KINDS: dict[str, type[Resource]] = {t.KIND: t for t in RESOURCE_TYPES}

# Names accepted on the command line and in API paths, as kubectl does:
# "virtualservice", "virtualservices", "vs".
_SHORT_NAMES = {
    "vs": "VirtualService",
    "dr": "DestinationRule",
    "gw": "Gateway",
    "se": "ServiceEntry",
    "we": "WorkloadEntry",
    "pa": "PeerAuthentication",
    "ap": "AuthorizationPolicy",
    "ra": "RequestAuthentication",
    "svc": "Service",
    "wl": "Workload",
}
YAML_SUFFIXES = (".yaml", ".yml", ".json")
MAX_DOCUMENT_BYTES = 4 * 1024 * 1024


def resolve_kind(name: str) -> type[Resource]:
    """The resource type for a kind as a user may write it ("vs", "virtualservices", "VirtualService")."""
    lowered = name.lower()
    if lowered in _SHORT_NAMES:
        return KINDS[_SHORT_NAMES[lowered]]
    for kind, resource_type in KINDS.items():
        if lowered in (kind.lower(), plural(resource_type)):
            return resource_type
    known = ", ".join(KINDS)
    raise ResourceInvalid("", [("kind", f"unknown kind {name!r} (known: {known})")])


def plural(resource_type: type[Resource]) -> str:
    """The lowercase plural used in API paths, as Kubernetes spells it:
    ``virtualservices``, ``serviceentries``, ``authorizationpolicies``."""
    kind = resource_type.KIND.lower()
    return kind[:-1] + "ies" if kind.endswith("y") else kind + "s"


def parse_resource(data: object, source: str = "", namespace: str = DEFAULT_NAMESPACE) -> Resource:
    """Validate one document (a dict as parsed from YAML/JSON) into its resource model;
    ``namespace`` is used when the document's metadata names none (``kubectl -n``)."""
    where = f"{source}: " if source else ""
    if not isinstance(data, dict):
        raise ResourceInvalid(source, [("", f"a resource must be a mapping, not {type(data).__name__}")])
    metadata = data.get("metadata")
    if isinstance(metadata, dict) and "namespace" not in metadata:
        data = {**data, "metadata": {**metadata, "namespace": namespace}}
    kind = data.get("kind")
    resource_id = _resource_id(data)
    if not isinstance(kind, str) or not kind:
        raise ResourceInvalid(where + resource_id, [("kind", "missing")])
    resource_type = KINDS.get(kind)
    if resource_type is None:
        known = ", ".join(KINDS)
        raise ResourceInvalid(where + resource_id, [("kind", f"unknown kind {kind!r} (known: {known})")])
    try:
        return resource_type.model_validate(data)
    except ValidationError as exc:
        raise ResourceInvalid(where + resource_id, problems_of(exc)) from None


def load_documents(text: str, source: str = "", namespace: str = DEFAULT_NAMESPACE) -> list[Resource]:
    """Every resource in a (multi-document) YAML or JSON text; ``namespace`` for
    documents that name none.

    Raises ``ResourceInvalid`` listing every problem in every document.
    """
    if len(text) > MAX_DOCUMENT_BYTES:
        raise ResourceInvalid(source, [("", f"input is larger than {MAX_DOCUMENT_BYTES} bytes")])
    try:
        documents = [d for d in yaml.safe_load_all(text) if d is not None]
    except yaml.YAMLError as exc:
        raise ResourceInvalid(source, [("", f"not valid YAML: {exc}")]) from None
    resources: list[Resource] = []
    problems: list[ResourceInvalid] = []
    for index, document in enumerate(_flatten(documents)):
        label = f"{source}#{index}" if source else f"document {index}"
        try:
            resources.append(parse_resource(document, label, namespace))
        except ResourceInvalid as exc:
            problems.append(exc)
    if problems:
        raise ResourceInvalid.combine(problems)
    return resources


def load_path(path: Path, namespace: str = DEFAULT_NAMESPACE) -> list[Resource]:
    """Resources from a file, or from every .yaml/.yml/.json file under a directory (sorted)."""
    files = sorted(p for p in path.rglob("*") if p.suffix in YAML_SUFFIXES) if path.is_dir() else [path]
    resources: list[Resource] = []
    for file in files:
        try:
            text = file.read_text(encoding="utf-8")
        except OSError as exc:
            raise ResourceInvalid(str(file), [("", f"cannot read: {exc.strerror}")]) from None
        resources.extend(load_documents(text, str(file), namespace))
    return resources


def dump_yaml(resources: Iterable[Resource]) -> str:
    return yaml.safe_dump_all([r.to_dict() for r in resources], sort_keys=False)


def problems_of(exc: ValidationError) -> list[tuple[str, str]]:
    return [(format_location(error["loc"]), _message(error)) for error in exc.errors()]


def format_location(loc: tuple[int | str, ...]) -> str:
    """``("spec", "http", 0, "route", 1, "weight")`` -> ``spec.http[0].route[1].weight``."""
    path = ""
    for part in loc:
        if isinstance(part, int):
            path += f"[{part}]"
        elif part.startswith(("function-", "literal[")):
            continue  # pydantic's names for validator and union branches
        else:
            path += f".{part}" if path else part
    return path


def _message(error: Any) -> str:
    kind = error["type"]
    if kind == "extra_forbidden":
        return "unknown field (or one meshlet does not implement)"
    if kind == "missing":
        return "required field is missing"
    message = str(error["msg"])
    return message.removeprefix("Value error, ")


def _flatten(documents: Iterable[object]) -> Iterator[object]:
    for document in documents:
        if isinstance(document, dict) and document.get("kind") == "List" and "items" in document:
            items = document["items"]
            yield from items if isinstance(items, list) else [items]
        else:
            yield document


def _resource_id(data: dict[Any, Any]) -> str:
    kind = data.get("kind") if isinstance(data.get("kind"), str) else "resource"
    metadata = data.get("metadata")
    if not isinstance(metadata, dict):
        return str(kind)
    name = metadata.get("name", "?")
    namespace = metadata.get("namespace", DEFAULT_NAMESPACE)
    return f"{kind} {namespace}/{name}"
