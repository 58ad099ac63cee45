"""A CA kept in a directory, the layout Istio's plug-in CA uses:

- ``root-cert.pem``: the current root (the newest, during a root rotation);
- ``bundle.pem``: every root peers should trust (old and new during a rotation);
- ``ca-cert.pem``: the certificate that signs SVIDs (the root itself, or an
  intermediate under a root the user brought);
- ``cert-chain.pem``: ``ca-cert.pem`` and any certificates above it, roots excluded;
- ``ca-key.pem``: the signing key, only when it is kept in process (0600);
- ``ca.json``: trust domain, the key provider holding the signing key, lifetimes;
- ``tokens.db``: bootstrap tokens (hashes only);
- ``federation/<trust domain>.pem``: the roots of each federated trust domain,
  handed to workloads with their SVIDs so they can verify peers of those domains.

``ca.json`` is written last and atomically, so a reader (the CA service)
that sees it change sees a complete, consistent directory.

Root rotation follows the overlapping-roots scheme, in three steps so that
no peer ever meets a certificate it cannot verify:

1. ``rotate_root`` makes a new root (its key in the same kind of provider)
   and adds it to the bundle; the old root still signs. Workloads pick the
   new bundle up with their next renewal.
2. ``activate_root`` (once every workload renewed) makes the new root sign;
   SVIDs are reissued under it as workloads renew.
3. ``finish_root_rotation`` (once every SVID is reissued) drops the old roots.
"""

from __future__ import annotations

import datetime
import json
import os
import re
import secrets
import time
from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from meshlet.config.model import PrivateKeyProviderConfig
from meshlet.errors import ConfigError, MeshletError
from meshlet.identity.bundle import TrustBundle
from meshlet.identity.ca import (
    DEFAULT_ROOT_TTL,
    DEFAULT_SVID_TTL,
    MAX_SVID_TTL,
    CertificateAuthority,
    IssuancePolicy,
    create_intermediate,
    create_root,
)
from meshlet.identity.spiffe import parse_trust_domain
from meshlet.registry import registry
from meshlet.tls.config import KeyHandle

CA_JSON = "ca.json"
ROOT_CERT = "root-cert.pem"
BUNDLE = "bundle.pem"
CA_CERT = "ca-cert.pem"
CERT_CHAIN = "cert-chain.pem"
CA_KEY = "ca-key.pem"
PENDING_ROOT = "pending-root-cert.pem"
TOKENS_DB = "tokens.db"
FEDERATION_DIR = "federation"

KEY_TYPES = ("p256", "p384", "rsa2048")
LOCAL_PROVIDER = "meshlet.local"
KEYSERVER_PROVIDER = "meshlet.keyserver"


class CaDirectoryError(MeshletError):
    """The CA directory is missing, incomplete or inconsistent; the message names the file."""


def generate_local_key(key_type: str) -> ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey:
    if key_type == "p256":
        return ec.generate_private_key(ec.SECP256R1())
    if key_type == "p384":
        return ec.generate_private_key(ec.SECP384R1())
    if key_type == "rsa2048":
        return rsa.generate_private_key(65537, 2048)
    raise CaDirectoryError(f"unknown key type {key_type!r} (known: {', '.join(KEY_TYPES)})")


def private_key_pem(key: ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def write_private(path: Path, data: bytes) -> None:
    """Write ``data`` readable by the owner only, replacing ``path`` atomically."""
    temporary = path.with_name(path.name + ".tmp")
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.replace(temporary, path)


def write_public(path: Path, data: bytes) -> None:
    temporary = path.with_name(path.name + ".tmp")
    temporary.write_bytes(data)
    os.replace(temporary, path)


def pem_of(*certs: x509.Certificate) -> bytes:
    return b"".join(c.public_bytes(serialization.Encoding.PEM) for c in certs)


# --------------------------------------------------------------------------- #
# Where the CA key lives
# --------------------------------------------------------------------------- #


@dataclass(frozen=True, slots=True)
class KeyPlacement:
    """How to make a new CA key: ``local`` (a 0600 file in the directory),
    ``keyserver`` (generated inside a running key server, by name), or
    ``existing`` (a key already in some provider, named by ``provider``)."""

    kind: str = "local"
    keyserver_socket: str = ""
    provider: PrivateKeyProviderConfig | None = None

    def make_key(
        self, directory: Path, key_type: str, label: str, filename: str = CA_KEY
    ) -> PrivateKeyProviderConfig:
        if self.kind == "local":
            path = directory / filename
            write_private(path, private_key_pem(generate_local_key(key_type)))
            settings: dict[str, object] = {"private_key": {"filename": str(path.resolve())}}
            return PrivateKeyProviderConfig(LOCAL_PROVIDER, settings)
        if self.kind == "keyserver":
            handle = _generate_in_keyserver(self.keyserver_socket, key_type, label)
            return PrivateKeyProviderConfig(
                KEYSERVER_PROVIDER, {"socket": self.keyserver_socket, "handle": handle}
            )
        if self.kind == "existing" and self.provider is not None:
            return self.provider
        raise CaDirectoryError(f"unknown key placement {self.kind!r} (local, keyserver, existing)")


def _generate_in_keyserver(socket_path: str, key_type: str, label: str) -> str:
    from meshlet.keys.keyserver.client import call, checked
    from meshlet.keys.keyserver.protocol import GenerateRequest, ProtocolError

    handle = re.sub(r"[^A-Za-z0-9_.-]", "-", label)[:64]
    try:
        checked(call(socket_path, GenerateRequest(1, key_type, handle)))
    except (OSError, ProtocolError) as exc:
        raise CaDirectoryError(f"cannot reach the key server at {socket_path}: {exc}") from None
    except MeshletError as exc:
        raise CaDirectoryError(f"the key server did not generate key {handle!r}: {exc}") from None
    return handle


def open_key(provider: PrivateKeyProviderConfig) -> KeyHandle:
    """The key handle of ``provider`` through the key provider registry."""
    import meshlet.keys  # noqa: F401 - registers the providers

    try:
        extension = registry.lookup("key_provider", name=provider.provider_name, path="key_provider")
        handle = extension.factory(provider)
    except ConfigError as exc:
        raise CaDirectoryError(f"{CA_JSON}: the CA key cannot be opened: {exc}") from None
    if not isinstance(handle, KeyHandle):
        name = provider.provider_name
        raise CaDirectoryError(f"{CA_JSON}: key provider {name!r} did not give a key handle")
    return handle


# --------------------------------------------------------------------------- #
# The directory
# --------------------------------------------------------------------------- #


@dataclass(frozen=True, slots=True)
class CaSettings:
    trust_domain: str
    key_type: str
    key_provider: PrivateKeyProviderConfig
    mode: str = "root"  # "root" | "intermediate"
    svid_ttl: float = DEFAULT_SVID_TTL.total_seconds()
    max_svid_ttl: float = MAX_SVID_TTL.total_seconds()
    generation: int = 1
    # During a root rotation, before activation: the new root's key.
    pending_key_provider: PrivateKeyProviderConfig | None = None

    def to_json(self) -> dict[str, Any]:
        pending = self.pending_key_provider
        return {
            "trust_domain": self.trust_domain,
            "key_type": self.key_type,
            "key_provider": {"name": self.key_provider.provider_name, "settings": self.key_provider.settings},
            "mode": self.mode,
            "svid_ttl_seconds": self.svid_ttl,
            "max_svid_ttl_seconds": self.max_svid_ttl,
            "generation": self.generation,
            "pending_key_provider": (
                {"name": pending.provider_name, "settings": pending.settings} if pending else None
            ),
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> CaSettings:
        try:
            provider = data["key_provider"]
            pending = data.get("pending_key_provider")
            return cls(
                trust_domain=parse_trust_domain(str(data["trust_domain"])),
                key_type=str(data["key_type"]),
                key_provider=PrivateKeyProviderConfig(str(provider["name"]), dict(provider["settings"])),
                mode=str(data.get("mode", "root")),
                svid_ttl=float(data.get("svid_ttl_seconds", DEFAULT_SVID_TTL.total_seconds())),
                max_svid_ttl=float(data.get("max_svid_ttl_seconds", MAX_SVID_TTL.total_seconds())),
                generation=int(data.get("generation", 1)),
                pending_key_provider=(
                    PrivateKeyProviderConfig(str(pending["name"]), dict(pending["settings"]))
                    if pending else None
                ),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise CaDirectoryError(f"{CA_JSON}: missing or bad field ({exc})") from None


class CaDirectory:
    def __init__(self, path: Path) -> None:
        self.path = path

    def file(self, name: str) -> Path:
        return self.path / name

    @property
    def exists(self) -> bool:
        return self.file(CA_JSON).exists()

    def settings(self) -> CaSettings:
        try:
            data = json.loads(self.file(CA_JSON).read_text())
        except FileNotFoundError:
            raise CaDirectoryError(
                f"{self.path} is not a CA directory (no {CA_JSON}; run 'meshlet ca init')"
            ) from None
        except ValueError as exc:
            raise CaDirectoryError(f"{self.file(CA_JSON)}: not JSON ({exc})") from None
        return CaSettings.from_json(data)

    def stamp(self) -> int:
        """Changes whenever the directory is rewritten (``ca.json`` is written last)."""
        try:
            return self.file(CA_JSON).stat().st_mtime_ns
        except FileNotFoundError:
            return 0

    def certificates(self, name: str) -> list[x509.Certificate]:
        try:
            data = self.file(name).read_bytes()
        except FileNotFoundError:
            raise CaDirectoryError(f"{self.file(name)} is missing") from None
        if not data.strip():
            return []
        try:
            return x509.load_pem_x509_certificates(data)
        except ValueError as exc:
            raise CaDirectoryError(f"{self.file(name)}: not PEM certificates ({exc})") from None

    def bundle(self) -> TrustBundle:
        return TrustBundle.of(self.settings().trust_domain, self.certificates(BUNDLE))

    def federated_bundles(self) -> list[TrustBundle]:
        """The bundles of federated trust domains, one per file under ``federation/``."""
        folder = self.file(FEDERATION_DIR)
        if not folder.is_dir():
            return []
        bundles = []
        for path in sorted(folder.glob("*.pem")):
            try:
                bundles.append(TrustBundle.from_pem(path.stem, path.read_bytes()))
            except MeshletError as exc:
                raise CaDirectoryError(f"{path}: {exc}") from None
        return bundles

    def set_federated_bundle(self, bundle: TrustBundle | None, trust_domain: str) -> None:
        """Federate with ``trust_domain`` (its roots: ``bundle``), or stop (``bundle`` None)."""
        settings = self.settings()
        trust_domain = parse_trust_domain(trust_domain)
        if trust_domain == settings.trust_domain:
            raise CaDirectoryError(f"{trust_domain!r} is this CA's own trust domain, not a federated one")
        folder = self.file(FEDERATION_DIR)
        folder.mkdir(mode=0o700, exist_ok=True)
        path = folder / f"{trust_domain}.pem"
        if bundle is None:
            if not path.exists():
                raise CaDirectoryError(f"not federated with {trust_domain!r}")
            path.unlink()
        else:
            write_public(path, bundle.to_pem())
        # Rewriting ca.json tells readers (the CA service) to reload.
        write_public(self.file(CA_JSON), (json.dumps(_bumped(settings).to_json(), indent=2) + "\n").encode())

    def authority(self, key: KeyHandle | None = None) -> CertificateAuthority:
        """The CA as the directory describes it, its key opened through its provider."""
        settings = self.settings()
        ca_cert = self.certificates(CA_CERT)[0]
        chain = self.certificates(CERT_CHAIN)
        policy = IssuancePolicy(
            default_ttl=datetime.timedelta(seconds=settings.svid_ttl),
            max_ttl=datetime.timedelta(seconds=settings.max_svid_ttl),
        )
        return CertificateAuthority(
            trust_domain=settings.trust_domain,
            certificate=ca_cert,
            key=key if key is not None else open_key(settings.key_provider),
            bundle=self.bundle(),
            intermediates=tuple(c for c in chain if c != ca_cert),
            policy=policy,
        )

    def _write(
        self, settings: CaSettings, *, root: x509.Certificate, bundle: list[x509.Certificate],
        ca_cert: x509.Certificate, chain: list[x509.Certificate],
    ) -> None:
        write_public(self.file(ROOT_CERT), pem_of(root))
        write_public(self.file(BUNDLE), pem_of(*bundle))
        write_public(self.file(CA_CERT), pem_of(ca_cert))
        write_public(self.file(CERT_CHAIN), pem_of(*chain))
        write_public(self.file(CA_JSON), (json.dumps(settings.to_json(), indent=2) + "\n").encode())


def _bumped(settings: CaSettings, **changes: Any) -> CaSettings:
    return replace(settings, generation=settings.generation + 1, **changes)


def _label(trust_domain: str, role: str) -> str:
    # The time orders the names; the random part keeps two keys made in the same
    # second (init then rotate-root) from colliding in the key server.
    return f"meshlet-ca-{trust_domain}-{role}-{int(time.time())}-{secrets.token_hex(4)}"


async def init_root_ca(
    path: Path, trust_domain: str, *, key_type: str = "p256", placement: KeyPlacement | None = None,
    root_ttl: datetime.timedelta = DEFAULT_ROOT_TTL, svid_ttl: datetime.timedelta = DEFAULT_SVID_TTL,
) -> CaDirectory:
    """A new self-signed root CA in ``path`` (refuses to overwrite one)."""
    directory = _new_directory(path)
    trust_domain = parse_trust_domain(trust_domain)
    provider = (placement or KeyPlacement()).make_key(path, key_type, _label(trust_domain, "root"))
    key = open_key(provider)
    root = await create_root(trust_domain, key, ttl=root_ttl)
    settings = CaSettings(trust_domain, key_type, provider, "root", svid_ttl.total_seconds())
    directory._write(settings, root=root, bundle=[root], ca_cert=root, chain=[])
    return directory


async def init_intermediate_ca(
    path: Path, trust_domain: str, *, parent_chain: list[x509.Certificate], parent_key: KeyHandle,
    root: x509.Certificate, key_type: str = "p256", placement: KeyPlacement | None = None,
    svid_ttl: datetime.timedelta = DEFAULT_SVID_TTL,
) -> CaDirectory:
    """A new intermediate CA in ``path`` signed by the user's ``parent_chain[0]``
    (a root, or an intermediate leading to ``root``); the user's key signs once
    and is not kept."""
    directory = _new_directory(path)
    trust_domain = parse_trust_domain(trust_domain)
    provider = (placement or KeyPlacement()).make_key(path, key_type, _label(trust_domain, "intermediate"))
    key = open_key(provider)
    ca_cert = await create_intermediate(trust_domain, key.public_key, parent_chain[0], parent_key)
    above = [c for c in parent_chain if c != root]
    settings = CaSettings(trust_domain, key_type, provider, "intermediate", svid_ttl.total_seconds())
    directory._write(settings, root=root, bundle=[root], ca_cert=ca_cert, chain=[ca_cert, *above])
    return directory


def _new_directory(path: Path) -> CaDirectory:
    directory = CaDirectory(path)
    if directory.exists:
        raise CaDirectoryError(f"{path} already holds a CA ({CA_JSON} exists)")
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    return directory


async def rotate_root(
    directory: CaDirectory, *, placement: KeyPlacement | None = None,
    root_ttl: datetime.timedelta = DEFAULT_ROOT_TTL,
) -> x509.Certificate:
    """Step 1 of a root rotation: a new root joins the bundle; the current
    root keeps signing until ``activate_root``."""
    settings = directory.settings()
    if settings.mode != "root":
        raise CaDirectoryError(
            "this CA is an intermediate under a root it does not own; rotate that root where it is kept,"
            " then run 'meshlet ca init' with the new root"
        )
    if settings.pending_key_provider is not None:
        raise CaDirectoryError("a root rotation is already under way: activate it (--activate) first")
    if placement is None:
        placement = _same_placement(settings.key_provider)
    label = _label(settings.trust_domain, "root")
    key_file = f"ca-key-{settings.generation + 1}.pem"
    provider = placement.make_key(directory.path, settings.key_type, label, key_file)
    root = await create_root(settings.trust_domain, open_key(provider), ttl=root_ttl)
    write_public(directory.file(PENDING_ROOT), pem_of(root))
    directory._write(
        _bumped(settings, pending_key_provider=provider), root=directory.certificates(ROOT_CERT)[0],
        bundle=[*directory.certificates(BUNDLE), root], ca_cert=directory.certificates(CA_CERT)[0],
        chain=directory.certificates(CERT_CHAIN),
    )
    return root


def activate_root(directory: CaDirectory) -> x509.Certificate:
    """Step 2: the new root signs from now on (every workload should hold the
    new bundle by now). The old root's in-directory key file is deleted."""
    settings = directory.settings()
    pending = settings.pending_key_provider
    if pending is None:
        raise CaDirectoryError("no root rotation is under way (start one with rotate-root)")
    root = directory.certificates(PENDING_ROOT)[0]
    old_provider = settings.key_provider
    directory._write(
        _bumped(settings, key_provider=pending, pending_key_provider=None), root=root,
        bundle=directory.certificates(BUNDLE), ca_cert=root, chain=[],
    )
    directory.file(PENDING_ROOT).unlink()
    _delete_local_key(directory, old_provider)
    return root


def _delete_local_key(directory: CaDirectory, provider: PrivateKeyProviderConfig) -> None:
    # Nothing signs with a retired root's key any more; a local copy is only a liability.
    if provider.provider_name != LOCAL_PROVIDER:
        return
    source = provider.settings.get("private_key")
    filename = source.get("filename") if isinstance(source, dict) else None
    if isinstance(filename, str) and Path(filename).parent.resolve() == directory.path.resolve():
        Path(filename).unlink(missing_ok=True)


def _same_placement(provider: PrivateKeyProviderConfig) -> KeyPlacement:
    if provider.provider_name == LOCAL_PROVIDER:
        return KeyPlacement("local")
    if provider.provider_name == KEYSERVER_PROVIDER:
        return KeyPlacement("keyserver", keyserver_socket=str(provider.settings.get("socket", "")))
    raise CaDirectoryError(
        f"the CA key is in {provider.provider_name!r}; name the new root's key with --key-provider-config"
    )


def finish_root_rotation(directory: CaDirectory) -> list[x509.Certificate]:
    """Step 3: only the current root stays in the bundle. Returns the roots dropped."""
    settings = directory.settings()
    if settings.pending_key_provider is not None:
        raise CaDirectoryError("the new root does not sign yet: activate it (--activate) before finishing")
    current = directory.certificates(ROOT_CERT)[0]
    bundle = directory.certificates(BUNDLE)
    dropped = [c for c in bundle if c != current]
    directory._write(
        _bumped(settings), root=current, bundle=[current], ca_cert=directory.certificates(CA_CERT)[0],
        chain=directory.certificates(CERT_CHAIN),
    )
    return dropped
