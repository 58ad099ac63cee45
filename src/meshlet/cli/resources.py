"""``meshlet apply | get | delete | describe | analyze``: the mesh's config,
kubectl-style, against the control plane's resource API (``--server``, or
``$MESHLET_SERVER``, default ``http://127.0.0.1:15080``).

Files are validated locally first, so mistakes are reported with their file,
resource and field path before anything is sent. ``analyze -f`` works offline.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable, Iterable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import click
import httpx
import yaml

from meshlet.cli.errors import EXIT_RUNTIME, CliError
from meshlet.control.analyze import Severity, analyze
from meshlet.control.resources import (
    DEFAULT_NAMESPACE,
    Resource,
    ResourceInvalid,
    dump_yaml,
    load_documents,
    load_path,
    parse_resource,
    plural,
    resolve_kind,
)

DEFAULT_SERVER = "http://127.0.0.1:15080"
REQUEST_TIMEOUT = 15.0
# istioctl analyze's exit code when it finds errors.
EXIT_ANALYZE_ERRORS = 79

server_option = click.option(
    "--server", envvar="MESHLET_SERVER", default=DEFAULT_SERVER, show_default=True,
    help="The control plane's resource API (env MESHLET_SERVER).")
namespace_option = click.option("-n", "--namespace", default=None,
                                help=f"Namespace (default: {DEFAULT_NAMESPACE}).")
files_option = click.option("-f", "--filename", "files", multiple=True,
                            type=click.Path(exists=False, path_type=Path),
                            help="A YAML/JSON file, a directory of them, or - for stdin (repeatable).")


# -- talking to the API ------------------------------------------------------- #


class Api:
    def __init__(self, server: str) -> None:
        self.server = server.rstrip("/")

    def call(self, method: str, path: str, *, content: str | None = None,
             params: dict[str, str] | None = None, ok: Iterable[int] = (200, 201)) -> Any:
        try:
            with httpx.Client(timeout=REQUEST_TIMEOUT) as client:
                response = client.request(method, self.server + path, content=content, params=params)
        except httpx.HTTPError as exc:
            raise CliError(f"cannot reach the control plane at {self.server}: {exc}", EXIT_RUNTIME) from None
        try:
            data = response.json()
        except ValueError:
            raise CliError(f"{self.server}{path}: HTTP {response.status_code} without a JSON body",
                           EXIT_RUNTIME) from None
        if response.status_code not in tuple(ok):
            problems = data.get("problems") or [] if isinstance(data, dict) else []
            for line in problems:
                click.echo(line, err=True)
            message = data.get("error", "") if isinstance(data, dict) else ""
            code = 2 if response.status_code in (400, 404, 409) else EXIT_RUNTIME
            raise CliError(f"{message or f'HTTP {response.status_code}'}", code)
        return data


def resource_path(resource_type: type[Resource], namespace: str | None, name: str | None = None) -> str:
    base = f"/apis/{resource_type.GROUP}/{resource_type.VERSION}"
    if namespace is None:
        return f"{base}/{plural(resource_type)}"
    path = f"{base}/namespaces/{namespace}/{plural(resource_type)}"
    return f"{path}/{name}" if name else path


def kind_type(kind: str) -> type[Resource]:
    try:
        return resolve_kind(kind)
    except ResourceInvalid as exc:
        raise CliError(exc.message) from None


def read_files(files: Iterable[Path], namespace: str | None = None) -> list[Resource]:
    """Every resource in ``files``; every problem printed, then one summary error."""
    ns = namespace or DEFAULT_NAMESPACE
    resources: list[Resource] = []
    problems: list[str] = []
    for path in files:
        try:
            if str(path) == "-":
                resources.extend(load_documents(sys.stdin.read(), "<stdin>", ns))
            elif not path.exists():
                problems.append(f"{path}: no such file or directory")
            else:
                resources.extend(load_path(path, ns))
        except ResourceInvalid as exc:
            problems.extend(exc.lines)
    if problems:
        for line in problems:
            click.echo(line, err=True)
        count = len(problems)
        raise CliError(f"{count} problem{'s' if count > 1 else ''} in the input; nothing was applied")
    return resources


def _label(kind: str, name: str) -> str:
    resource_type = kind_type(kind)
    return f"{resource_type.KIND.lower()}.{resource_type.GROUP}/{name}"


# -- apply / delete ------------------------------------------------------------ #


@click.command()
@files_option
@namespace_option
@server_option
@click.option("--dry-run", is_flag=True, help="Validate and show what would change; write nothing.")
def apply(files: tuple[Path, ...], namespace: str | None, server: str, dry_run: bool) -> None:
    """Create or update resources from YAML (kubectl apply -f)."""
    if not files:
        raise CliError("apply needs -f FILE|DIR (or -f - for stdin)")
    resources = read_files(files, namespace)
    if not resources:
        raise CliError("no resources found in the input")
    result = Api(server).call("POST", "/apply", content=dump_yaml(resources),
                              params={"dryRun": "true"} if dry_run else None)
    suffix = " (dry run)" if dry_run else ""
    for entry in result["results"]:
        click.echo(f"{_label(entry['kind'], entry['name'])} {entry['action']}{suffix}")


@click.command()
@click.argument("kind", required=False)
@click.argument("names", nargs=-1)
@files_option
@namespace_option
@server_option
@click.option("--ignore-not-found", is_flag=True, help="Succeed when a resource is already gone.")
def delete(kind: str | None, names: tuple[str, ...], files: tuple[Path, ...], namespace: str | None,
           server: str, ignore_not_found: bool) -> None:
    """Delete resources by KIND NAME... or by -f FILE."""
    targets: list[tuple[type[Resource], str, str]] = []
    if files:
        if kind or names:
            raise CliError("give either KIND NAME... or -f FILE, not both")
        targets = [(type(r), r.namespace, r.name) for r in read_files(files, namespace)]
    elif kind and names:
        resource_type = kind_type(kind)
        targets = [(resource_type, namespace or DEFAULT_NAMESPACE, name) for name in names]
    else:
        raise CliError("delete needs KIND NAME... or -f FILE")
    api = Api(server)
    for resource_type, ns, name in targets:
        ok = (200, 404) if ignore_not_found else (200,)
        api.call("DELETE", resource_path(resource_type, ns, name), ok=ok)
        click.echo(f"{_label(resource_type.KIND, name)} deleted")


# -- get / describe -------------------------------------------------------------- #


def _age(created: str | None, now: datetime) -> str:
    if not created:
        return "<unknown>"
    seconds = int((now - datetime.fromisoformat(created.replace("Z", "+00:00"))).total_seconds())
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds // size}{unit}"
    return f"{max(seconds, 0)}s"


def _join(values: Iterable[object]) -> str:
    text = ",".join(str(v) for v in values)
    return text or "<none>"


def _labels(labels: dict[str, str]) -> str:
    return _join(f"{k}={v}" for k, v in sorted(labels.items()))


# Extra columns per kind for -o wide: (header, value from the resource's wire form).
Column = tuple[str, Callable[[dict[str, Any]], str]]
WIDE_COLUMNS: dict[str, list[Column]] = {
    "VirtualService": [("GATEWAYS", lambda r: _join(r["spec"].get("gateways", []))),
                       ("HOSTS", lambda r: _join(r["spec"].get("hosts", [])))],
    "DestinationRule": [("HOST", lambda r: r["spec"]["host"]),
                        ("SUBSETS", lambda r: _join(s["name"] for s in r["spec"].get("subsets", [])))],
    "Gateway": [("SELECTOR", lambda r: _labels(r["spec"].get("selector", {})))],
    "ServiceEntry": [("HOSTS", lambda r: _join(r["spec"]["hosts"])),
                     ("LOCATION", lambda r: r["spec"].get("location", "")),
                     ("RESOLUTION", lambda r: r["spec"].get("resolution", ""))],
    "WorkloadEntry": [("ADDRESS", lambda r: r["spec"].get("address", ""))],
    "PeerAuthentication": [("MODE", lambda r: r["spec"].get("mtls", {}).get("mode", "UNSET"))],
    "AuthorizationPolicy": [("ACTION", lambda r: r["spec"].get("action", "ALLOW"))],
    "Service": [("PORTS", lambda r: _join(f"{p['name']}:{p['number']}" for p in r["spec"]["ports"]))],
    "Workload": [("ADDRESS", lambda r: r["spec"]["address"]),
                 ("HEALTH", lambda r: r.get("status", {}).get("health", "UNKNOWN")),
                 ("LABELS", lambda r: _labels(r["spec"].get("labels", {})))],
}


def render_table(items: list[dict[str, Any]], kind: str, *, wide: bool, all_namespaces: bool) -> str:
    now = datetime.now(UTC)
    headers = (["NAMESPACE"] if all_namespaces else []) + ["NAME"]
    extra = WIDE_COLUMNS.get(kind, []) if wide else []
    headers += [h for h, _ in extra] + ["AGE"]
    rows = []
    for item in items:
        meta = item["metadata"]
        row = ([meta["namespace"]] if all_namespaces else []) + [meta["name"]]
        row += [value(item) for _, value in extra] + [_age(meta.get("creationTimestamp"), now)]
        rows.append(row)
    widths = [max(len(str(c)) for c in column) for column in zip(headers, *rows, strict=False)]
    return "\n".join("   ".join(str(c).ljust(w) for c, w in zip(row, widths, strict=True)).rstrip()
                     for row in [headers, *rows])


@click.command()
@click.argument("kind")
@click.argument("name", required=False)
@namespace_option
@click.option("-A", "--all-namespaces", is_flag=True, help="List across every namespace.")
@click.option("-o", "--output", type=click.Choice(["table", "wide", "yaml", "json"]), default="table",
              show_default=True)
@server_option
def get(kind: str, name: str | None, namespace: str | None, all_namespaces: bool, output: str,
        server: str) -> None:
    """Show resources of KIND (vs, dr, gw, se, we, pa, ap, ra, svc, wl or the full name)."""
    resource_type = kind_type(kind)
    api = Api(server)
    if name is not None:
        items = [api.call("GET", resource_path(resource_type, namespace or DEFAULT_NAMESPACE, name))]
    else:
        scope = None if all_namespaces else (namespace or DEFAULT_NAMESPACE)
        items = api.call("GET", resource_path(resource_type, scope))["items"]
    if output == "json":
        data = items[0] if name is not None else {"apiVersion": "v1", "kind": "List", "items": items}
        click.echo(json.dumps(data, indent=2))
    elif output == "yaml":
        data = items[0] if name is not None else {"apiVersion": "v1", "kind": "List", "items": items}
        click.echo(yaml.safe_dump(data, sort_keys=False), nl=False)
    elif not items:
        where = "any namespace" if all_namespaces else f"namespace {namespace or DEFAULT_NAMESPACE}"
        click.echo(f"No {resource_type.KIND} resources found in {where}.", err=True)
    else:
        click.echo(render_table(items, resource_type.KIND, wide=output == "wide",
                                all_namespaces=all_namespaces))


@click.command()
@click.argument("kind")
@click.argument("name")
@namespace_option
@server_option
def describe(kind: str, name: str, namespace: str | None, server: str) -> None:
    """Show one resource in detail, with the analyzer's findings about it."""
    resource_type = kind_type(kind)
    api = Api(server)
    ns = namespace or DEFAULT_NAMESPACE
    data = api.call("GET", resource_path(resource_type, ns, name))
    resource = parse_resource(data)
    findings = [f for f in api.call("GET", "/analyze")["findings"] if f["resource"] == resource.resource_id]
    meta = resource.metadata
    created = meta.creation_timestamp.isoformat() if meta.creation_timestamp else "<unknown>"
    lines = [
        f"Name:              {meta.name}",
        f"Namespace:         {meta.namespace}",
        f"Kind:              {resource.kind}",
        f"API Version:       {resource.api_version}",
        f"Labels:            {_labels(meta.labels)}",
        f"Annotations:       {_labels(meta.annotations)}",
        f"Created:           {created}",
        f"Resource Version:  {meta.resource_version}",
        f"Generation:        {meta.generation}",
        "Spec:",
        _indent(yaml.safe_dump(data.get("spec", {}), sort_keys=False)),
    ]
    if "status" in data:
        lines += ["Status:", _indent(yaml.safe_dump(data["status"], sort_keys=False))]
    lines.append("Findings:" if findings else "Findings:          <none>")
    lines += [f"  {f['severity']} [{f['code']}] {f['path']}: {f['message']}" for f in findings]
    click.echo("\n".join(line.rstrip("\n") for line in lines))


def _indent(text: str) -> str:
    return "\n".join("  " + line for line in text.rstrip("\n").splitlines())


# -- analyze ------------------------------------------------------------------------ #


@click.command(name="analyze")
@files_option
@server_option
@click.option("--use-server", is_flag=True,
              help="With -f: analyze the files together with what the server already stores.")
@click.option("-o", "--output", type=click.Choice(["text", "json"]), default="text", show_default=True)
def analyze_command(files: tuple[Path, ...], server: str, use_server: bool, output: str) -> None:
    """Report config mistakes: unknown hosts, empty subsets, weights, conflicting policies.

    Offline on -f files; against the control plane otherwise. Exits 79 when
    errors are found (as istioctl analyze does)."""
    if files and not use_server:
        findings = [f.to_dict() for f in analyze(read_files(files))]
        scope = ", ".join(str(f) for f in files)
    else:
        resources = read_files(files) if files else []
        body = dump_yaml(resources) if resources else None
        findings = Api(server).call("POST" if body else "GET", "/analyze", content=body)["findings"]
        scope = f"the control plane at {server}" + (" with the given files" if files else "")
    if output == "json":
        click.echo(json.dumps({"findings": findings}, indent=2))
    elif not findings:
        click.echo(f"No validation issues found when analyzing {scope}.")
    else:
        for f in findings:
            where = f" {f['path']}" if f["path"] else ""
            click.echo(f"{f['severity']} [{f['code']}] ({f['resource']}{where}) {f['message']}")
    if any(f["severity"] == Severity.ERROR.value for f in findings):
        click.get_current_context().exit(EXIT_ANALYZE_ERRORS)
