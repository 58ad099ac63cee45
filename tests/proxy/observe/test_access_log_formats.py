"""Access log formats and the non-blocking writer."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from meshlet.config.model import AccessLogConfig
from meshlet.errors import ConfigError
from meshlet.proxy.http.stream import RequestHead, ResponseHead
from meshlet.proxy.observe.access_log import (
    DEFAULT_FORMAT,
    AccessLog,
    ResponseFlag,
    StreamInfo,
    WriterPool,
    compile_format,
    compile_json_format,
    flags_text,
)
from meshlet.proxy.transport import ConnectionInfo, SecurityInfo


def _info() -> StreamInfo:
    sec = SecurityInfo(tls=True, peer_uri_sans=("spiffe://mesh/ns/default/sa/web",))
    conn = ConnectionInfo(peer=("10.0.0.7", 51234), local=("10.0.0.1", 8080), security=sec)
    head = RequestHead(
        method="GET",
        scheme="http",
        authority="example.com",
        path="/api/v1",
        headers=[("user-agent", "curl/8"), ("x-request-id", "abc"), ("x-forwarded-for", "10.0.0.7")],
    )
    info = StreamInfo(connection=conn, start_time=1700000000.123456, request=head, protocol="HTTP/1.1")
    info.response = ResponseHead(200, [("x-envoy-upstream-service-time", "3")])
    info.response_code = 200
    info.bytes_received = 5
    info.bytes_sent = 11
    info.duration = 0.0042
    info.upstream_host = "127.0.0.1:9000"
    info.upstream_cluster = "backend"
    info.route_name = "default"
    return info


def test_default_format_matches_envoy_layout() -> None:
    line = compile_format(DEFAULT_FORMAT, "f").format(_info())
    assert line == (
        '[2023-11-14T22:13:20.123Z] "GET /api/v1 HTTP/1.1" 200 - 5 11 4 3 "10.0.0.7" "curl/8" '
        '"abc" "example.com" "127.0.0.1:9000"\n'
    )


def test_original_path_preferred_and_missing_values_are_dash() -> None:
    info = _info()
    assert info.request is not None
    info.request.headers.append(("x-envoy-original-path", "/before"))
    info.response = None
    info.upstream_host = ""
    info.flags = ResponseFlag.UF | ResponseFlag.URX
    fmt = compile_format(
        "%REQ(X-ENVOY-ORIGINAL-PATH?:PATH)% %RESP(SERVER)% %UPSTREAM_HOST% %RESPONSE_FLAGS%", "f"
    )
    assert fmt.format(info) == "/before - - UF,URX"


def test_operators_with_arguments_and_truncation() -> None:
    fmt = compile_format(
        "%START_TIME(%Y/%m/%d %s.%3f)% %REQ(USER-AGENT):3% %DOWNSTREAM_REMOTE_ADDRESS% "
        "%DOWNSTREAM_REMOTE_ADDRESS_WITHOUT_PORT% %DOWNSTREAM_PEER_URI_SAN% %UPSTREAM_CLUSTER% "
        "%ROUTE_NAME% %RESP(:STATUS)%",
        "f",
    )
    assert fmt.format(_info()) == (
        "2023/11/14 1700000000.123 cur 10.0.0.7:51234 10.0.0.7 spiffe://mesh/ns/default/sa/web "
        "backend default 200"
    )


@pytest.mark.parametrize(
    "bad", ["%NOT_AN_OPERATOR%", "%REQ%", "100% done", "%REQ(:bogus)%", "%DURATION(x)%"]
)
def test_invalid_formats_are_refused_with_the_path(bad: str) -> None:
    with pytest.raises(ConfigError) as err:
        compile_format(bad, "listeners[0].access_log[0]")
    assert err.value.path == "listeners[0].access_log[0]"


def test_json_format_keeps_types() -> None:
    fmt = compile_json_format(
        {
            "code": "%RESPONSE_CODE%",
            "method": "%REQ(:METHOD)%",
            "missing": "%REQ(X-NOPE)%",
            "line": "%REQ(:METHOD)% %REQ(:PATH)%",
            "duration": "%DURATION%",
        },
        "f",
    )
    obj = json.loads(fmt.format(_info()))
    assert obj == {"code": 200, "method": "GET", "missing": None, "line": "GET /api/v1", "duration": 4}


def test_flags_text_order() -> None:
    assert flags_text(ResponseFlag.NONE) == "-"
    assert flags_text(ResponseFlag.URX | ResponseFlag.UH | ResponseFlag.NR) == "UH,NR,URX"


async def test_writer_flushes_to_file(tmp_path: Path) -> None:
    target = tmp_path / "access.log"
    writers = WriterPool()
    cfg = AccessLogConfig(path=str(target), text_format="%RESPONSE_CODE%\n")
    log = AccessLog.from_config(cfg, "a", writers)
    for _ in range(3):
        log.log(_info())
    await writers.flush()
    assert target.read_text() == "200\n200\n200\n"
    writers.close()


async def test_writer_is_bounded(tmp_path: Path) -> None:
    writers = WriterPool()
    writer = writers.get(str(tmp_path / "x.log"))
    writer.max_buffer = 10
    writer.flush_bytes = 1 << 20
    writer.write("12345678\n")
    writer.write("12345678\n")
    assert writer.dropped == 1
    writers.close()
    assert (tmp_path / "x.log").read_text() == "12345678\n"
