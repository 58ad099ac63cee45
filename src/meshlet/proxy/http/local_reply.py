"""Every response the proxy makes itself, in one place (linkerd's ServerRescue).

A failure anywhere in the request path becomes a ``LocalReply``: the status,
Envoy's body text, the response flag for access logs and the
``response_code_details`` string. ``send_local_reply`` writes it to the
client, or resets the stream when a response had already started.
"""

from __future__ import annotations

from dataclasses import dataclass

from meshlet.proxy.http.stream import DownstreamStream, Headers, ResponseHead, StreamReset
from meshlet.proxy.observe.access_log import ResponseFlag

_RESET_PREFIX = "upstream connect error or disconnect/reset before headers. reset reason: "


@dataclass(frozen=True, slots=True)
class LocalReply:
    status: int
    body: bytes = b""
    flag: ResponseFlag = ResponseFlag.NONE
    details: str = ""
    headers: tuple[tuple[str, str], ...] = ()
    content_type: str = "text/plain"


NO_ROUTE = LocalReply(404, flag=ResponseFlag.NR, details="route_not_found")
CLUSTER_NOT_FOUND = LocalReply(503, flag=ResponseFlag.NC, details="cluster_not_found")
NO_HEALTHY_UPSTREAM = LocalReply(503, b"no healthy upstream", ResponseFlag.UH, "no_healthy_upstream")
UPSTREAM_TIMEOUT = LocalReply(504, b"upstream request timeout", ResponseFlag.UT, "upstream_response_timeout")
STREAM_IDLE_TIMEOUT = LocalReply(408, b"stream timeout", ResponseFlag.SI, "stream_idle_timeout")
REQUEST_TIMEOUT = LocalReply(408, b"request timeout", ResponseFlag.DT, "request_overall_timeout")
UPGRADE_REFUSED = LocalReply(403, b"", ResponseFlag.NONE, "upgrade_failed")
INTERNAL_ERROR = LocalReply(500, b"internal error", ResponseFlag.NONE, "internal_error")

# Upstream reset reasons (Envoy's text) and the flag each carries.
_RESET_FLAGS: dict[str, ResponseFlag] = {
    "connection failure": ResponseFlag.UF,
    "connection timeout": ResponseFlag.UF,
    "overflow": ResponseFlag.UO,
    "connection termination": ResponseFlag.UC,
    "remote reset": ResponseFlag.UR,
    "local reset": ResponseFlag.LR,
    "protocol error": ResponseFlag.UPE,
}


_OVERLOADED = (("x-envoy-overloaded", "true"),)


def upstream_reset(reason: str) -> LocalReply:
    """503 for an upstream that failed before sending a response head."""
    flag = _RESET_FLAGS.get(reason, ResponseFlag.UR)
    details = "upstream_reset_before_response_started{" + reason.replace(" ", "_") + "}"
    # A circuit breaker's overflow tells the client the 503 is load shedding.
    headers = _OVERLOADED if reason == "overflow" else ()
    return LocalReply(503, (_RESET_PREFIX + reason).encode(), flag, details, headers)


def reset_reason(exc: StreamReset) -> str:
    """Envoy's reset-reason words for a ``StreamReset`` from an upstream codec."""
    if exc.code == "CONNECTION_RESET":
        return "local reset" if exc.local else "connection termination"
    if exc.code == "PROTOCOL_ERROR":
        return "protocol error"
    if exc.local:
        return "local reset"
    if exc.code == "REFUSED_STREAM":
        return "remote refused stream reset"
    return "remote reset"


def direct(status: int, body: bytes, details: str = "direct_response") -> LocalReply:
    return LocalReply(status, body, ResponseFlag.NONE, details)


def redirect(status: int, location: str) -> LocalReply:
    return LocalReply(status, b"", ResponseFlag.NONE, "via_route_redirect", (("location", location),))


def response_head(reply: LocalReply, server_name: str) -> ResponseHead:
    headers: Headers = list(reply.headers)
    if reply.body:
        headers.append(("content-type", reply.content_type))
    headers.append(("content-length", str(len(reply.body))))
    headers.append(("server", server_name))
    return ResponseHead(reply.status, headers)


async def send_local_reply(stream: DownstreamStream, head: ResponseHead, body: bytes) -> int:
    """Write a local reply; returns the body bytes sent. If the response had
    already started, the stream is reset instead (nothing else is honest)."""
    if stream.head_sent:
        stream.reset("INTERNAL_ERROR")
        return 0
    if not body or stream.head.method == "HEAD":
        await stream.send_head(head, end_stream=True)
        return 0
    await stream.send_head(head)
    await stream.send_data(body, end_stream=True)
    return len(body)
