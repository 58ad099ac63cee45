"""``meshlet ca``: the mesh CA from the command line.

``init`` creates a root CA (or, with ``--parent-cert``/``--parent-key``, an
intermediate under a root you bring); ``issue`` writes an SVID and its key
for tests and workloads outside the mesh; ``token`` issues a bootstrap token;
``inspect`` shows a certificate chain; ``rotate-root`` starts (and with
``--finish`` ends) a root rotation; ``federate`` adds (or removes) another
trust domain's bundle; ``serve`` runs the CA's gRPC service.
"""

from __future__ import annotations

import asyncio
import datetime
import json
import re
from pathlib import Path
from typing import TYPE_CHECKING

import click
from cryptography import x509
from cryptography.hazmat.primitives import hashes

from meshlet.cli.errors import CliError

if TYPE_CHECKING:
    from meshlet.identity.cadir import KeyPlacement

dir_option = click.option(
    "--dir", "directory", required=True, type=click.Path(file_okay=False, path_type=Path),
    help="The CA directory.",
)

_DURATION = re.compile(r"(\d+(?:\.\d+)?)([smhd]?)")
_UNITS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_duration(text: str, option: str) -> datetime.timedelta:
    """``90s``, ``30m``, ``24h``, ``7d`` or plain seconds."""
    match = _DURATION.fullmatch(text.strip())
    if match is None:
        raise CliError(f"{option}: {text!r} is not a duration (e.g. 90s, 30m, 24h, 7d)")
    return datetime.timedelta(seconds=float(match.group(1)) * _UNITS[match.group(2)])


def _identity_errors() -> tuple[type[Exception], ...]:
    from meshlet.errors import MeshletError

    return (MeshletError, ValueError, OSError)


def _placement(kind: str, keyserver_socket: Path | None, provider_config: Path | None) -> KeyPlacement:
    from meshlet.config.model import PrivateKeyProviderConfig
    from meshlet.identity.cadir import KeyPlacement

    if provider_config is not None:
        try:
            data = json.loads(provider_config.read_text())
            provider = PrivateKeyProviderConfig(str(data["name"]), dict(data.get("settings", {})))
        except (OSError, ValueError, KeyError, TypeError) as exc:
            expected = "{'name': ..., 'settings': {...}}"
            raise CliError(f"--key-provider-config: expected {expected} ({exc})") from None
        return KeyPlacement("existing", provider=provider)
    if kind == "keyserver":
        if keyserver_socket is None:
            raise CliError("--key-provider keyserver needs --keyserver-socket")
        return KeyPlacement("keyserver", keyserver_socket=str(keyserver_socket))
    return KeyPlacement("local")


@click.group()
def ca() -> None:
    """The mesh CA: create it, issue SVIDs and tokens, rotate its root, serve CSRs."""


@ca.command()
@dir_option
@click.option("--trust-domain", required=True, help="The trust domain, e.g. cluster.local.")
@click.option("--key-type", type=click.Choice(["p256", "p384", "rsa2048"]), default="p256", show_default=True)
@click.option("--key-provider", type=click.Choice(["local", "keyserver"]), default="local", show_default=True,
              help="Where the CA key is generated: a 0600 file in --dir, or inside a key server.")
@click.option("--keyserver-socket", type=click.Path(dir_okay=False, path_type=Path),
              help="The key server's socket (with --key-provider keyserver).")
@click.option("--key-provider-config", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="JSON {name, settings} of an existing key in any key provider (e.g. meshlet.pkcs11).")
@click.option("--parent-cert", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="Your root (or intermediate, followed by its chain) to create an intermediate CA under.")
@click.option("--parent-key", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="The private key of --parent-cert (used once, not kept).")
@click.option("--root-cert", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="With --parent-cert: the root at the top (default: --parent-cert's last certificate).")
@click.option("--svid-ttl", default="24h", show_default=True, help="Default SVID lifetime.")
def init(directory: Path, trust_domain: str, key_type: str, key_provider: str, keyserver_socket: Path | None,
         key_provider_config: Path | None, parent_cert: Path | None, parent_key: Path | None,
         root_cert: Path | None, svid_ttl: str) -> None:
    """Create a CA in --dir (the root certificate goes to DIR/root-cert.pem)."""
    from meshlet.identity.cadir import ROOT_CERT, init_intermediate_ca, init_root_ca

    placement = _placement(key_provider, keyserver_socket, key_provider_config)
    ttl = parse_duration(svid_ttl, "--svid-ttl")
    if (parent_cert is None) != (parent_key is None):
        raise CliError("--parent-cert and --parent-key go together")
    try:
        if parent_cert is not None and parent_key is not None:
            from meshlet.tls.keys_local import LocalKey

            chain = x509.load_pem_x509_certificates(parent_cert.read_bytes())
            root = x509.load_pem_x509_certificates(root_cert.read_bytes())[0] if root_cert else chain[-1]
            signer = LocalKey.from_pem(parent_key.read_bytes())
            asyncio.run(init_intermediate_ca(
                directory, trust_domain, parent_chain=chain, parent_key=signer,
                root=root, key_type=key_type, placement=placement, svid_ttl=ttl,
            ))
        else:
            asyncio.run(init_root_ca(directory, trust_domain, key_type=key_type, placement=placement,
                                     svid_ttl=ttl))
    except _identity_errors() as exc:
        raise CliError(str(exc)) from None
    click.echo(f"CA for {trust_domain} created in {directory} (root: {directory / ROOT_CERT})")


@ca.command()
@dir_option
@click.option("--spiffe-id", required=True, help="spiffe://<trust-domain>/ns/<ns>/sa/<sa>")
@click.option("--out-cert", required=True, type=click.Path(dir_okay=False, path_type=Path),
              help="Where to write the certificate chain (leaf first, roots excluded).")
@click.option("--out-key", required=True, type=click.Path(dir_okay=False, path_type=Path),
              help="Where to write the new private key (0600).")
@click.option("--ttl", default=None, help="Lifetime (e.g. 24h; default: the CA's SVID lifetime).")
@click.option("--key-type", type=click.Choice(["p256", "p384", "rsa2048"]), default="p256", show_default=True)
@click.option("--dns", "dns_names", multiple=True, help="A DNS SAN to add (repeatable).")
@click.option("--ip", "ip_addresses", multiple=True, help="An IP SAN to add (repeatable).")
def issue(directory: Path, spiffe_id: str, out_cert: Path, out_key: Path, ttl: str | None, key_type: str,
          dns_names: tuple[str, ...], ip_addresses: tuple[str, ...]) -> None:
    """Issue an SVID and its key (for tests and workloads outside the mesh)."""
    from meshlet.identity.cadir import (
        CaDirectory,
        generate_local_key,
        private_key_pem,
        write_private,
        write_public,
    )
    from meshlet.identity.spiffe import SpiffeId

    lifetime = parse_duration(ttl, "--ttl") if ttl else None
    try:
        identity = SpiffeId.parse(spiffe_id)
        key = generate_local_key(key_type)
        authority = CaDirectory(directory).authority()
        issued = asyncio.run(authority.issue(identity, key.public_key(), ttl=lifetime, dns_names=dns_names,
                                             ip_addresses=ip_addresses))
        write_private(out_key, private_key_pem(key))
        write_public(out_cert, issued.chain_pem())
    except _identity_errors() as exc:
        raise CliError(str(exc)) from None
    click.echo(f"issued {identity} (serial {issued.leaf.serial_number:x}, expires "
               f"{issued.leaf.not_valid_after_utc.isoformat()}) to {out_cert}")


@ca.command()
@dir_option
@click.option("--spiffe-id", required=True, help="The one identity the token may be redeemed for.")
@click.option("--ttl", default="1h", show_default=True, help="How long the token may be redeemed.")
def token(directory: Path, spiffe_id: str, ttl: str) -> None:
    """Issue a single-use bootstrap token (printed once; only its hash is kept)."""
    from meshlet.identity.cadir import TOKENS_DB, CaDirectory
    from meshlet.identity.spiffe import SpiffeId
    from meshlet.identity.tokens import BootstrapTokens, SqliteTokenStore

    lifetime = parse_duration(ttl, "--ttl")
    try:
        ca_dir = CaDirectory(directory)
        settings = ca_dir.settings()
        identity = SpiffeId.parse(spiffe_id)
        if not identity.member_of(settings.trust_domain):
            raise CliError(f"{identity} is not in this CA's trust domain {settings.trust_domain!r}")
        tokens = BootstrapTokens(SqliteTokenStore(ca_dir.file(TOKENS_DB)))
        secret = tokens.issue(identity, ttl=lifetime.total_seconds())
    except _identity_errors() as exc:
        raise CliError(str(exc)) from None
    click.echo(secret)


@ca.command()
@click.argument("file", type=click.Path(exists=True, dir_okay=False, path_type=Path))
def inspect(file: Path) -> None:
    """Show the SPIFFE ID, validity and issuer chain of the certificates in FILE."""
    try:
        certs = x509.load_pem_x509_certificates(file.read_bytes())
    except ValueError as exc:
        raise CliError(f"{file}: not PEM certificates ({exc})") from None
    now = datetime.datetime.now(datetime.UTC)
    for index, cert in enumerate(certs):
        for line in describe_certificate(cert, now, leaf=index == 0):
            click.echo(("  " * index) + line)


def describe_certificate(cert: x509.Certificate, now: datetime.datetime, *, leaf: bool) -> list[str]:
    try:
        sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        uris = sans.get_values_for_type(x509.UniformResourceIdentifier)
        dns = sans.get_values_for_type(x509.DNSName)
    except x509.ExtensionNotFound:
        uris, dns = [], []
    try:
        is_ca = cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    except x509.ExtensionNotFound:
        is_ca = False
    left = cert.not_valid_after_utc - now
    state = "EXPIRED" if left.total_seconds() < 0 else f"{left.total_seconds() / 3600:.1f} h left"
    kind = "CA" if is_ca else ("leaf" if leaf else "certificate")
    lines = [f"{kind}: {cert.subject.rfc4514_string() or '(empty subject)'}"]
    spiffe = [u for u in uris if u.startswith("spiffe://")]
    lines.append(f"  SPIFFE ID: {', '.join(spiffe) if spiffe else '(none)'}")
    if dns:
        lines.append(f"  DNS: {', '.join(dns)}")
    lines.append(f"  serial: {cert.serial_number:x}")
    lines.append(f"  valid: {cert.not_valid_before_utc.isoformat()} .. {cert.not_valid_after_utc.isoformat()}"
                 f" ({state})")
    lines.append(f"  issuer: {cert.issuer.rfc4514_string()}")
    digest = cert.fingerprint(hashes.SHA256())
    lines.append(f"  sha256: {digest.hex()}")
    return lines


@ca.command("rotate-root")
@dir_option
@click.option("--activate", is_flag=True,
              help="Step 2: the new root signs from now on (once every workload holds the new bundle).")
@click.option("--finish", is_flag=True,
              help="Step 3: drop the old roots from the bundle (once every SVID is reissued).")
@click.option("--key-provider-config", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="JSON {name, settings} of the new root's key (when the CA key is neither local"
                   " nor in a key server).")
def rotate_root(directory: Path, activate: bool, finish: bool, key_provider_config: Path | None) -> None:
    """Rotate the root in three steps: add a new root to the bundle (the old one
    still signs), --activate it, --finish by dropping the old root."""
    from meshlet.identity.cadir import BUNDLE, CaDirectory, activate_root, finish_root_rotation
    from meshlet.identity.cadir import rotate_root as stage_root

    if activate and finish:
        raise CliError("--activate and --finish are separate steps; run them one after the other")
    ca_dir = CaDirectory(directory)
    try:
        if finish:
            dropped = finish_root_rotation(ca_dir)
            click.echo(f"dropped {len(dropped)} old root(s); the bundle holds the current root only")
        elif activate:
            root = activate_root(ca_dir)
            click.echo(f"root {root.subject.rfc4514_string()} signs from now on;"
                       " run --finish once every SVID is reissued")
        else:
            placement = _placement("", None, key_provider_config) if key_provider_config else None
            root = asyncio.run(stage_root(ca_dir, placement=placement))
            roots = len(ca_dir.certificates(BUNDLE))
            click.echo(f"new root {root.subject.rfc4514_string()} added; the bundle holds {roots} roots."
                       " Run --activate once every workload has renewed")
    except _identity_errors() as exc:
        raise CliError(str(exc)) from None


@ca.command()
@dir_option
@click.option("--trust-domain", required=True, help="The federated trust domain.")
@click.option("--bundle", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="Its roots: PEM, or a SPIFFE bundle (JWK Set) as federation endpoints serve it.")
@click.option("--remove", is_flag=True, help="Stop federating with --trust-domain.")
def federate(directory: Path, trust_domain: str, bundle: Path | None, remove: bool) -> None:
    """Trust another trust domain: its bundle goes to workloads with their SVIDs."""
    from meshlet.identity.bundle import TrustBundle
    from meshlet.identity.cadir import CaDirectory

    if remove == (bundle is not None):
        raise CliError("give either --bundle FILE or --remove")
    try:
        loaded = None
        if bundle is not None:
            data = bundle.read_bytes()
            is_json = data.lstrip().startswith(b"{")
            loaded = (TrustBundle.from_spiffe_json(trust_domain, data) if is_json
                      else TrustBundle.from_pem(trust_domain, data))
        CaDirectory(directory).set_federated_bundle(loaded, trust_domain)
    except _identity_errors() as exc:
        raise CliError(str(exc)) from None
    if loaded is None:
        click.echo(f"no longer federated with {trust_domain}")
    else:
        click.echo(f"federated with {loaded.trust_domain} ({len(loaded.roots)} root(s))")


@ca.command()
@dir_option
@click.option("--listen", default="127.0.0.1:15012", show_default=True, help="HOST:PORT (port 0: any).")
@click.option("--server-name", default=None,
              help="The DNS name or IP clients dial, for the serving certificate (default: listen host).")
def serve(directory: Path, listen: str, server_name: str | None) -> None:
    """Serve CSRs over gRPC (meshlet.identity.v1.CertificateService) until interrupted."""
    from meshlet.cli.logs import configure_logging
    from meshlet.identity.server import serve as serve_ca

    configure_logging("info")
    host = listen.rsplit(":", 1)[0].strip("[]")
    try:
        asyncio.run(serve_ca(directory, listen, server_name or host))
    except KeyboardInterrupt:
        pass
    except _identity_errors() as exc:
        raise CliError(str(exc)) from None
