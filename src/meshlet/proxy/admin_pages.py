"""The admin endpoint's pages, rendered from plain data (no I/O here).

Formats follow Envoy's admin interface so existing tooling can read them:
``/stats`` lines are ``name: value``; ``/clusters`` lines are
``cluster::host:port::field::value``; ``/config_dump`` is a ConfigDump with
one entry per resource kind.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from meshlet.proxy.observe.stats import StatsStore

REDACTED = "[redacted]"
_SECRET_KEYS = frozenset({"private_key", "password", "session_ticket_keys"})
_TYPE = "type.googleapis.com/envoy.admin.v3."

QUANTILES = (0.5, 0.9, 0.99)


def stats_text(store: StatsStore, name_filter: re.Pattern[str] | None) -> str:
    """``name: value`` sorted by name; histograms as ``P50(..) P90(..) P99(..)`` summaries."""
    lines: list[str] = []
    for name, value in _scalar_stats(store, name_filter):
        lines.append(f"{name}: {value}")
    for key, hist in sorted(store.histograms.items(), key=lambda kv: kv[0].name):
        if name_filter is not None and not name_filter.search(key.name):
            continue
        if hist.count == 0:
            lines.append(f"{key.name}: No recorded values")
            continue
        parts = [f"P{q * 100:g}({_num(hist.quantile(q))})" for q in QUANTILES]
        lines.append(f"{key.name}: {' '.join(parts)} count({hist.count}) sum({_num(hist.sum)})")
    return "\n".join(lines) + ("\n" if lines else "")


def stats_json(store: StatsStore, name_filter: re.Pattern[str] | None) -> dict[str, Any]:
    """Envoy's ``/stats?format=json`` shape."""
    stats: list[dict[str, Any]] = [{"name": n, "value": v} for n, v in _scalar_stats(store, name_filter)]
    computed = []
    for key, hist in sorted(store.histograms.items(), key=lambda kv: kv[0].name):
        if name_filter is not None and not name_filter.search(key.name):
            continue
        computed.append({
            "name": key.name,
            "values": [{"cumulative": hist.quantile(q) if hist.count else None} for q in QUANTILES],
            "count": hist.count,
            "sum": hist.sum,
        })
    stats.append({"histograms": {
        "supported_quantiles": [q * 100 for q in QUANTILES],
        "computed_quantiles": computed,
    }})
    return {"stats": stats}


def _scalar_stats(store: StatsStore, name_filter: re.Pattern[str] | None) -> list[tuple[str, int]]:
    out = [(k.name, c.value) for k, c in store.counters.items()]
    out += [(k.name, g.value) for k, g in store.gauges.items()]
    if name_filter is not None:
        out = [(n, v) for n, v in out if name_filter.search(n)]
    return sorted(out)


def _num(v: float) -> str:
    return "inf" if v == float("inf") else f"{v:g}"


def redact(data: Any) -> Any:
    """A copy with private key material (and passwords) replaced."""
    if isinstance(data, dict):
        return {k: (REDACTED if k in _SECRET_KEYS else redact(v)) for k, v in data.items()}
    if isinstance(data, list):
        return [redact(v) for v in data]
    return data


def config_dump(source: Mapping[str, object], last_updated: str) -> dict[str, Any]:
    """Envoy's ConfigDump from the compiled config's ``source`` (bootstrap + resources by name)."""
    bootstrap = source.get("bootstrap") or {}
    static = bootstrap.get("static_resources", {}) if isinstance(bootstrap, dict) else {}

    def resources(kind: str) -> list[Any]:
        found = source.get(kind)
        if isinstance(found, dict):
            return list(found.values())
        if isinstance(found, list):
            return found
        listed = static.get(kind, []) if isinstance(static, dict) else []
        return list(listed)

    routes = [r for lst in resources("listeners") for r in _inline_routes(lst)]
    configs: list[dict[str, Any]] = [
        {"@type": _TYPE + "BootstrapConfigDump", "bootstrap": bootstrap, "last_updated": last_updated},
        {"@type": _TYPE + "ClustersConfigDump", "static_clusters": [
            {"cluster": c, "last_updated": last_updated} for c in resources("clusters")
        ]},
        {"@type": _TYPE + "ListenersConfigDump", "static_listeners": [
            {"listener": lst, "last_updated": last_updated} for lst in resources("listeners")
        ]},
        {"@type": _TYPE + "RoutesConfigDump", "static_route_configs": [
            {"route_config": r, "last_updated": last_updated} for r in routes
        ]},
        {"@type": _TYPE + "SecretsConfigDump", "static_secrets": [
            {"name": _name(s), "secret": s, "last_updated": last_updated} for s in resources("secrets")
        ]},
    ]
    _add_dynamic(configs, source.get("dynamic"))
    return {"configs": redact(configs)}


# ConfigDump entry (by its position above) -> (source kind, dynamic field, resource field).
_DYNAMIC_FIELDS = {
    1: ("clusters", "dynamic_active_clusters", "cluster"),
    2: ("listeners", "dynamic_listeners", "listener"),
    3: ("route_configs", "dynamic_route_configs", "route_config"),
    4: ("secrets", "dynamic_active_secrets", "secret"),
}


def _add_dynamic(configs: list[dict[str, Any]], dynamic: object) -> None:
    """Resources delivered over xDS (``source["dynamic"]``, filled by the ADS client):
    ``{kind: {name: {version_info, resource, last_updated}}}``, in Envoy's dynamic_* fields."""
    if not isinstance(dynamic, Mapping):
        return
    for position, (kind, dump_field, resource_field) in _DYNAMIC_FIELDS.items():
        entries = dynamic.get(kind)
        if not isinstance(entries, Mapping):
            continue
        dumped = []
        for name, entry in entries.items():
            item = {"version_info": entry["version_info"], resource_field: entry["resource"],
                    "last_updated": entry["last_updated"]}
            if kind == "listeners":  # Envoy nests the active listener under its name
                item = {"name": name, "active_state": item}
            elif kind == "secrets":
                item = {"name": name, **item}
            dumped.append(item)
        configs[position][dump_field] = dumped
    endpoints = dynamic.get("endpoints")
    if isinstance(endpoints, Mapping):
        configs.append({"@type": _TYPE + "EndpointsConfigDump", "dynamic_endpoint_configs": [
            {"version_info": e["version_info"], "endpoint_config": e["resource"],
             "last_updated": e["last_updated"]}
            for e in endpoints.values()
        ]})


def _name(resource: Any) -> str:
    return str(resource.get("name", "")) if isinstance(resource, dict) else ""


def _inline_routes(listener: Any) -> Iterable[Any]:
    """route_config objects inlined in a listener's http_connection_managers."""
    if not isinstance(listener, dict):
        return
    chains = list(listener.get("filter_chains", []))
    if isinstance(listener.get("default_filter_chain"), dict):
        chains.append(listener["default_filter_chain"])
    for chain in chains:
        for f in chain.get("filters", []) if isinstance(chain, dict) else []:
            typed = f.get("typed_config", {}) if isinstance(f, dict) else {}
            if isinstance(typed, dict) and isinstance(typed.get("route_config"), dict):
                yield typed["route_config"]


def clusters_text(described: Mapping[str, Mapping[str, object]]) -> str:
    """Envoy's ``/clusters`` text: per-host lines ``cluster::address::field::value``."""
    lines: list[str] = []
    for name, cluster in described.items():
        lines.append(f"{name}::observability_name::{name}")
        hosts = cluster.get("hosts", [])
        for host in hosts if isinstance(hosts, list) else []:
            addr = host.get("address", "")
            for field in ("cx_active", "cx_connect_fail", "cx_total", "rq_active", "rq_error", "rq_total"):
                source_field = "active_requests" if field == "rq_active" else field
                lines.append(f"{name}::{addr}::{field}::{host.get(source_field, 0)}")
            lines.append(f"{name}::{addr}::hostname::{host.get('hostname', '')}")
            lines.append(f"{name}::{addr}::health_flags::{_health_flags(host)}")
            lines.append(f"{name}::{addr}::weight::{host.get('weight', 1)}")
    return "\n".join(lines) + ("\n" if lines else "")


def _health_flags(host: Mapping[str, Any]) -> str:
    flags = host.get("health_flags")
    if isinstance(flags, str):
        return flags
    if host.get("healthy", True):
        return "healthy"
    health = str(host.get("health", "")).lower()
    return "/failed_eds_health" if health in ("unhealthy", "draining", "timeout") else "/failed_active_hc"


def clusters_json(described: Mapping[str, Mapping[str, object]]) -> dict[str, Any]:
    statuses = []
    for name, cluster in described.items():
        hosts = cluster.get("hosts", [])
        statuses.append({
            "name": name,
            "type": cluster.get("type"),
            "lb_policy": cluster.get("lb_policy"),
            "host_statuses": [_host_json(h) for h in (hosts if isinstance(hosts, list) else [])],
        })
    return {"cluster_statuses": statuses}


def _host_json(host: Mapping[str, Any]) -> dict[str, Any]:
    addr = str(host.get("address", ""))
    ip, _, port = addr.rpartition(":")
    return {
        "address": {"socket_address": {
            "address": ip.strip("[]"), "port_value": int(port) if port.isdigit() else 0,
        }},
        "hostname": host.get("hostname", ""),
        "weight": host.get("weight", 1),
        "health_status": {"eds_health_status": host.get("health", "UNKNOWN"),
                          "failed_active_health_check": bool(host.get("failed_active_health_check")),
                          "failed_outlier_check": bool(host.get("failed_outlier_check"))},
        "stats": [{"name": k, "value": host.get(k, 0)}
                  for k in ("cx_active", "cx_total", "cx_connect_fail", "rq_total", "rq_error")],
    }


def listeners_text(described: Iterable[Mapping[str, Any]]) -> str:
    lines = []
    for lst in described:
        sa = lst["local_address"]["socket_address"]
        host = sa["address"]
        host = f"[{host}]" if ":" in host else host
        lines.append(f"{lst['name']}::{host}:{sa['port_value']}")
    return "\n".join(lines) + ("\n" if lines else "")


def listeners_json(described: Iterable[Mapping[str, Any]]) -> dict[str, Any]:
    return {"listener_statuses": [
        {"name": lst["name"], "local_address": lst["local_address"],
         "filter_chains": lst.get("filter_chains", []),
         "active_connections": lst.get("active_connections", 0)}
        for lst in described
    ]}


def dumps(data: Any) -> bytes:
    return (json.dumps(data, indent=2, sort_keys=False, default=str) + "\n").encode()


def certs_json(contexts: Iterable[tuple[bytes | None, Sequence[bytes]]], now: float) -> dict[str, Any]:
    """Envoy's ``/certs``: per TLS context, its trusted CAs (PEM, or None) and
    its certificate chain (DER, leaf first)."""
    from cryptography import x509

    return {"certificates": [
        {"ca_cert": [_cert_json(c, now) for c in (x509.load_pem_x509_certificates(ca) if ca else [])],
         "cert_chain": [_cert_json(x509.load_der_x509_certificate(d), now) for d in chain]}
        for ca, chain in contexts
    ]}


def _cert_json(cert: Any, now: float) -> dict[str, Any]:
    from cryptography import x509

    try:
        sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        sans = x509.SubjectAlternativeName([])
    uris = sans.get_values_for_type(x509.UniformResourceIdentifier)
    names: list[dict[str, str]] = [{"uri": v} for v in uris]
    names += [{"dns": v} for v in sans.get_values_for_type(x509.DNSName)]
    names += [{"ip_address": str(v)} for v in sans.get_values_for_type(x509.IPAddress)]
    expires = cert.not_valid_after_utc
    return {
        "serial_number": f"{cert.serial_number:x}",
        "subject_alt_names": names,
        "days_until_expiration": str(max(0, int((expires.timestamp() - now) // 86400))),
        "seconds_until_expiration": str(max(0, int(expires.timestamp() - now))),
        "valid_from": cert.not_valid_before_utc.strftime("%Y-%m-%dT%H:%M:%SZ"),
        "expiration_time": expires.strftime("%Y-%m-%dT%H:%M:%SZ"),
    }
