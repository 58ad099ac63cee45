"""Request header policy of the connection manager (Envoy's
``ConnectionManagerUtility::mutateRequestHeaders``).

Decides whether a request is internal or external, maintains
``x-forwarded-for`` / ``x-forwarded-proto`` / ``x-request-id``, and strips
the ``x-envoy-*`` control headers an external client must not be able to
set (they steer retries, timeouts and access logs).
"""

from __future__ import annotations

import os
from functools import lru_cache

from meshlet.config.model import HttpConnectionManagerConfig
from meshlet.proxy.http.stream import Headers, RequestHead
from meshlet.proxy.transport import ConnectionInfo

# Envoy-internal request headers removed from external requests.
ENVOY_CONTROL_HEADERS = frozenset(
    {
        "x-envoy-decorator-operation",
        "x-envoy-downstream-service-cluster",
        "x-envoy-downstream-service-node",
        "x-envoy-expected-rq-timeout-ms",
        "x-envoy-external-address",
        "x-envoy-force-trace",
        "x-envoy-hedge-on-per-try-timeout",
        "x-envoy-internal",
        "x-envoy-ip-tags",
        "x-envoy-max-retries",
        "x-envoy-original-path",
        "x-envoy-retriable-header-names",
        "x-envoy-retriable-status-codes",
        "x-envoy-retry-grpc-on",
        "x-envoy-retry-on",
        "x-envoy-upstream-alt-stat-name",
        "x-envoy-upstream-rq-per-try-timeout-ms",
        "x-envoy-upstream-rq-timeout-alt-response",
        "x-envoy-upstream-rq-timeout-ms",
        "x-envoy-upstream-stream-duration-ms",
    }
)


@lru_cache(maxsize=4096)
def is_internal_address(ip: str) -> bool:
    """RFC 1918, loopback and IPv6 unique-local addresses (Envoy's definition)."""
    if ip.startswith("::ffff:"):
        ip = ip[7:]
    if ip.startswith(("10.", "127.", "192.168.")):
        return True
    if ip.startswith("172."):
        second = ip.split(".", 2)[1]
        return second.isdigit() and 16 <= int(second) <= 31
    lowered = ip.lower()
    return lowered == "::1" or lowered.startswith(("fd", "fc"))


# The RFC 4122 variant nibble (10xx) for each hex digit of random bits.
_VARIANT_NIBBLE = {c: "89ab"[int(c, 16) & 3] for c in "0123456789abcdef"}
# Random bytes are drawn from the OS for 256 ids at a time, as Envoy's
# random generator buffers its UUIDs' bytes: one getrandom system call per
# 256 requests, not one per request.
_ID_BYTES = 16
_BATCH = 256 * _ID_BYTES


class _RandomBytes:
    __slots__ = ("_buffer", "_offset")

    def __init__(self) -> None:
        self._buffer = b""
        self._offset = _BATCH

    def reset(self) -> None:
        """Drop what is left of the buffer (the next id draws a fresh batch)."""
        self._buffer = b""
        self._offset = _BATCH

    def take16(self) -> bytes:
        offset = self._offset
        if offset >= _BATCH:
            self._buffer = os.urandom(_BATCH)
            offset = 0
        self._offset = offset + _ID_BYTES
        return self._buffer[offset : offset + _ID_BYTES]


_random_bytes = _RandomBytes()
# A forked worker must not hand out the ids left in its parent's buffer.
os.register_at_fork(after_in_child=_random_bytes.reset)


def new_request_id() -> str:
    """A random (version 4) UUID as text: 122 bits from the OS's CSPRNG, the
    version and variant set as ``uuid.uuid4()`` sets them, formatted straight
    from the hex digits (half the cost of building the integer or the UUID)."""
    h = _random_bytes.take16().hex()
    return f"{h[:8]}-{h[8:12]}-4{h[13:16]}-{_VARIANT_NIBBLE[h[16]]}{h[17:20]}-{h[20:]}"


def xff_addresses(value: str) -> list[str]:
    return [a.strip() for a in value.split(",") if a.strip()]


class RequestHeaderPolicy:
    """Built once per connection manager config; ``apply`` runs per request."""

    __slots__ = ("_generate_id", "_preserve_external_id", "_skip_xff_append", "_trusted_hops", "_use_remote")

    def __init__(self, config: HttpConnectionManagerConfig) -> None:
        self._use_remote = config.use_remote_address
        self._trusted_hops = config.xff_num_trusted_hops
        self._skip_xff_append = config.skip_xff_append
        self._generate_id = config.generate_request_id
        self._preserve_external_id = config.preserve_external_request_id

    def apply(self, head: RequestHead, info: ConnectionInfo) -> bool:
        """Mutate ``head`` in place; returns whether the request is internal."""
        headers = head.headers
        xff: str | None = None
        proto: str | None = None
        request_id: str | None = None
        has_envoy = False
        for name, value in headers:
            if name == "x-forwarded-for":
                xff = value if xff is None else f"{xff},{value}"
            elif name == "x-forwarded-proto":
                proto = value
            elif name == "x-request-id":
                request_id = value
            elif name.startswith("x-envoy-"):
                has_envoy = True
        peer_ip = info.peer[0] if info.peer else ""
        remote = self._trusted_client_address(peer_ip, xff)
        internal = is_internal_address(remote) if remote else False
        if has_envoy and not internal:
            headers[:] = [h for h in headers if h[0] not in ENVOY_CONTROL_HEADERS]
        if self._use_remote:
            if xff is None:
                headers.append(("x-forwarded-for", peer_ip))
            elif not self._skip_xff_append:
                _set(headers, "x-forwarded-for", f"{xff}, {peer_ip}" if xff else peer_ip)
            if internal:
                _set(headers, "x-envoy-internal", "true")
            elif remote:
                _set(headers, "x-envoy-external-address", remote)
        if proto is None:
            headers.append(("x-forwarded-proto", head.scheme))  # absent: nothing to replace
        elif self._use_remote:
            _set(headers, "x-forwarded-proto", head.scheme)
        # Only an edge request (external, and we are the edge: use_remote_address)
        # gets a fresh id over the client's; a sidecar keeps the app's id.
        edge = self._use_remote and not internal
        if self._generate_id:
            if request_id is None:
                headers.append(("x-request-id", new_request_id()))
            elif edge and not self._preserve_external_id:
                _set(headers, "x-request-id", new_request_id())
        return internal

    def _trusted_client_address(self, peer_ip: str, xff: str | None) -> str:
        """The client address Envoy trusts: the peer with use_remote_address
        (or, with trusted hops, the XFF entry that many hops back); without it
        the XFF entry ``xff_num_trusted_hops`` from the right ("" if none)."""
        hops = self._trusted_hops
        if self._use_remote:
            if hops == 0 or xff is None:
                return peer_ip
            addresses = xff_addresses(xff)
            return addresses[-hops] if len(addresses) >= hops else ""
        if xff is None:
            return ""
        addresses = xff_addresses(xff)
        return addresses[-1 - hops] if len(addresses) > hops else ""


def _set(headers: Headers, name: str, value: str) -> None:
    """Replace every ``name`` header with one holding ``value``."""
    for i, (k, _) in enumerate(headers):
        if k == name:
            headers[i] = (name, value)
            if any(h[0] == name for h in headers[i + 1 :]):
                headers[i + 1 :] = [h for h in headers[i + 1 :] if h[0] != name]
            return
    headers.append((name, value))
