"""A minimal TLS server process on meshlet's engine with a key provider.

``python tls_echo_server.py CERT CA PROVIDER_JSON`` listens on an ephemeral
loopback port, prints it, and echoes each connection's bytes back (mTLS
required). Used where a test needs the TLS engine in a process of its own,
without the whole proxy.
"""

from __future__ import annotations

import asyncio
import json
import sys
from pathlib import Path

import meshlet.keys  # noqa: F401 - registers the key providers
from meshlet.config.model import CertificateValidation, PrivateKeyProviderConfig, TlsCertificate, TlsContext
from meshlet.proxy.transport import SecurityInfo
from meshlet.tls.aio import MeshletTlsSocketFactory


class Echo(asyncio.Protocol):
    def __init__(self, info: SecurityInfo) -> None:
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        assert self.transport is not None
        self.transport.write(data)


def context(cert: Path, ca: Path, provider: dict[str, object]) -> TlsContext:
    return TlsContext(
        server_side=True,
        certificates=(TlsCertificate(cert.read_bytes(), None, PrivateKeyProviderConfig(**provider)),),  # type: ignore[arg-type]
        validation=CertificateValidation(trusted_ca_pem=ca.read_bytes()),
        require_client_certificate=True,
        engine="meshlet",
    )


async def main(context: TlsContext) -> None:
    factory = MeshletTlsSocketFactory.from_context(context)

    class Acceptor(asyncio.Protocol):
        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            assert isinstance(transport, asyncio.Transport)
            factory.create().start(transport, Echo)

    loop = asyncio.get_running_loop()
    server = await loop.create_server(Acceptor, "127.0.0.1", 0)
    print(server.sockets[0].getsockname()[1], flush=True)
    await server.serve_forever()


if __name__ == "__main__":
    asyncio.run(main(context(Path(sys.argv[1]), Path(sys.argv[2]), json.loads(sys.argv[3]))))
