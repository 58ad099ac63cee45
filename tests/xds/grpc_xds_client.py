"""A gRPC proxyless xDS client, run as its own process (GRPC_XDS_BOOTSTRAP must be set
before grpc initialises): calls ``xds:///greeter`` N times, serves CSDS, prints a JSON
line ``{"counts": {server: calls}, "csds_port": P}``; then again for each line read
on stdin (after a config push), until stdin closes.

Usage: python grpc_xds_client.py TARGET CALLS
"""

from __future__ import annotations

import collections
import json
import sys
from concurrent import futures

import grpc
import grpc_csds

METHOD = "/greeter.Greeter/SayHello"
CALL_TIMEOUT = 10.0


def main() -> int:
    target, calls = sys.argv[1], int(sys.argv[2])
    csds = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    grpc_csds.add_csds_servicer(csds)
    csds_port = csds.add_insecure_port("127.0.0.1:0")
    csds.start()
    with grpc.insecure_channel(target) as channel:
        say_hello = channel.unary_unary(METHOD)
        while True:
            counts: collections.Counter[str] = collections.Counter()
            for _ in range(calls):
                reply = say_hello(b"hello", timeout=CALL_TIMEOUT, wait_for_ready=True)
                counts[reply.decode()] += 1
            print(json.dumps({"counts": counts, "csds_port": csds_port}), flush=True)
            if not sys.stdin.readline():  # the test closes our stdin when it is done
                break
    csds.stop(None)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
