"""A proxy process with its identity agent: the SVID comes from the CA and is
rotated in place while the proxy serves.

Start-up order: the agent gets the first SVID (bootstrap token), writes it to
``--identity-dir`` (``cert-chain.pem``, ``root-cert.pem``, and ``key.pem``
when the key is in process), then the bootstrap is loaded with
``${IDENTITY_DIR}`` and ``${IDENTITY_KEY_HANDLE}`` (the key server handle of
the current key) substituted, so its TLS contexts name the agent's files and
key. From then on the agent swaps each renewed SVID into those contexts.

    python -m meshlet.identity.sidecar --config FILE --identity-dir DIR \\
        --spiffe-id ID --ca HOST:PORT --ca-bundle ROOTS.pem --token-file FILE \\
        [--keyserver-socket PATH] [--svid-ttl SECONDS] [--tls-engine meshlet]
"""

from __future__ import annotations

import argparse
import asyncio
import logging
from dataclasses import dataclass
from pathlib import Path

from meshlet.identity.rotation import (
    IdentityAgent,
    KeyServerKeySource,
    KeySource,
    LocalKeySource,
    RotationPolicy,
)
from meshlet.identity.service import CaClient
from meshlet.identity.spiffe import SpiffeId

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class SidecarOptions:
    config: Path
    identity_dir: Path
    spiffe_id: SpiffeId
    ca_address: str
    ca_bundle: Path
    token: str
    ca_server_name: str | None = None
    keyserver_socket: str | None = None
    svid_ttl: float | None = None
    tls_engine: str | None = None
    admin_port: int | None = None


def _key_source(options: SidecarOptions) -> KeySource:
    if options.keyserver_socket:
        prefix = f"svid-{options.spiffe_id.namespace or 'x'}-{options.spiffe_id.service_account or 'x'}"
        return KeyServerKeySource(options.keyserver_socket, prefix)
    return LocalKeySource()


def render_bootstrap(template: str, identity_dir: Path, key_handle: str) -> str:
    rendered = template.replace("${IDENTITY_DIR}", str(identity_dir))
    return rendered.replace("${IDENTITY_KEY_HANDLE}", key_handle)


async def run_sidecar(options: SidecarOptions) -> None:
    from meshlet.config.compiler import load_proxy_config
    from meshlet.proxy.runtime import ProxySettings
    from meshlet.proxy.server import Proxy

    client = CaClient(options.ca_address, options.ca_bundle.read_bytes(), server_name=options.ca_server_name)
    settings = ProxySettings(tls_engine=options.tls_engine or ProxySettings().tls_engine)
    proxy = Proxy(settings, admin_port=options.admin_port)
    agent = IdentityAgent(
        options.spiffe_id, _key_source(options), client, token=options.token, stats=proxy.runtime.stats,
        policy=RotationPolicy(ttl_seconds=options.svid_ttl), output_dir=options.identity_dir,
    )
    issued = await agent.bootstrap()
    rendered = options.identity_dir / "bootstrap.yaml"
    rendered.write_text(render_bootstrap(options.config.read_text(), options.identity_dir,
                                         str(getattr(issued.key.handle, "handle", ""))))
    overrides = {"tls_engine": options.tls_engine} if options.tls_engine else None
    config = load_proxy_config(str(rendered), settings_overrides=overrides)
    proxy.install_signal_handlers()
    try:
        await proxy.apply(config)
        await proxy.start()
        agent.install(issued)  # the contexts just built now track the agent
        agent.start()
        for name in config.listeners:
            log.info("listener %s on %s", name, proxy.listeners.address(name))
        await proxy.wait_stopped()
    finally:
        await agent.stop()
        if proxy.state != "TERMINATED":
            await proxy.stop()
        await client.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m meshlet.identity.sidecar")
    parser.add_argument("--config", required=True, type=Path)
    parser.add_argument("--identity-dir", required=True, type=Path)
    parser.add_argument("--spiffe-id", required=True)
    parser.add_argument("--ca", required=True, help="HOST:PORT of the CA service")
    parser.add_argument("--ca-server-name")
    parser.add_argument("--ca-bundle", required=True, type=Path)
    parser.add_argument("--token-file", required=True, type=Path)
    parser.add_argument("--keyserver-socket")
    parser.add_argument("--svid-ttl", type=float)
    parser.add_argument("--tls-engine", choices=("openssl", "meshlet"))
    parser.add_argument("--admin-port", type=int)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    options = SidecarOptions(
        config=args.config, identity_dir=args.identity_dir, spiffe_id=SpiffeId.parse(args.spiffe_id),
        ca_address=args.ca, ca_bundle=args.ca_bundle, token=args.token_file.read_text().strip(),
        ca_server_name=args.ca_server_name, keyserver_socket=args.keyserver_socket, svid_ttl=args.svid_ttl,
        tls_engine=args.tls_engine, admin_port=args.admin_port,
    )
    asyncio.run(run_sidecar(options))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
