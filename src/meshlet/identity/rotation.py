"""The proxy's identity agent: gets an SVID from the CA and keeps it fresh.

At start the agent makes a key in its key source (in process, or inside a
key server so the proxy never holds it), sends a CSR with its bootstrap
token, and installs the SVID in every live TLS context that presents its
identity (``meshlet.identity.targets``), with the trust bundle the CA sent.
It renews at ``renew_fraction`` of the lifetime (50 % by default) ± jitter,
each time with a new key and a renewal proof made with the current one.
When a renewal fails, the current SVID keeps serving and the agent retries
with exponential back-off, never waiting past the SVID's expiry. New
handshakes get the new SVID; established connections are not disturbed.

Stats (in the proxy's store): ``identity.cert_expiry_seconds`` (gauge,
seconds left on the current SVID), ``identity.rotations`` and
``identity.renewal_failures`` (counters).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from meshlet.config.model import PrivateKeyProviderConfig
from meshlet.errors import MeshletError
from meshlet.identity import targets as live_targets
from meshlet.identity.bundle import TrustBundleSet
from meshlet.identity.cadir import generate_local_key, private_key_pem, write_private, write_public
from meshlet.identity.csr import create_csr
from meshlet.identity.service import CaRefused, CertificateRequest, CertificateResponse, make_renewal_proof
from meshlet.identity.spiffe import SpiffeId
from meshlet.identity.targets import CertificateTarget
from meshlet.proxy.observe.stats import StatsStore
from meshlet.tls.config import KeyHandle
from meshlet.tls.keys_local import LocalKey

log = logging.getLogger(__name__)

# gRPC codes after which retrying the same request cannot succeed.
_PERMANENT = frozenset({"UNAUTHENTICATED", "PERMISSION_DENIED", "INVALID_ARGUMENT"})
# How long a replaced key provider stays open for handshakes that began before the swap.
KEY_RETIREMENT_GRACE = 30.0


class IdentityError(MeshletError):
    """The agent could not get an SVID; the message says why."""


# --------------------------------------------------------------------------- #
# Keys
# --------------------------------------------------------------------------- #


@dataclass(frozen=True, slots=True)
class NewKey:
    handle: KeyHandle
    # Only for keys generated in process (engines like OpenSSL need the bytes).
    private_key_pem: bytes | None = None


class KeySource(Protocol):
    async def new_key(self) -> NewKey: ...


class LocalKeySource:
    """Keys generated in this process."""

    def __init__(self, key_type: str = "p256") -> None:
        self.key_type = key_type

    async def new_key(self) -> NewKey:
        key = await asyncio.to_thread(generate_local_key, self.key_type)
        return NewKey(LocalKey(key), private_key_pem(key))


class KeyServerKeySource:
    """Keys generated inside a key server: the proxy gets a handle and a public key only."""

    def __init__(self, socket_path: str, name_prefix: str, key_type: str = "p256") -> None:
        self.socket_path = socket_path
        self.name_prefix = name_prefix
        self.key_type = key_type
        self._sequence = 0

    async def new_key(self) -> NewKey:
        self._sequence += 1
        name = f"{self.name_prefix}-{int(time.time())}-{self._sequence}"
        return NewKey(await asyncio.to_thread(self._generate, name))

    def _generate(self, name: str) -> KeyHandle:
        from meshlet.keys.keyserver.client import build_keyserver, call, checked
        from meshlet.keys.keyserver.protocol import GenerateRequest

        checked(call(self.socket_path, GenerateRequest(1, self.key_type, name)))
        return build_keyserver(PrivateKeyProviderConfig(
            "meshlet.keyserver", {"socket": self.socket_path, "handle": name}
        ))


# --------------------------------------------------------------------------- #
# The agent
# --------------------------------------------------------------------------- #


class CertificateSigner(Protocol):
    """The CA, as the agent sees it (``meshlet.identity.service.CaClient``)."""

    async def create_certificate(
        self, request: CertificateRequest, *, token: str | None = None
    ) -> CertificateResponse: ...

    def update_trust_bundle(self, bundle_pem: bytes) -> None: ...


@dataclass(frozen=True, slots=True)
class CertifiedKey:
    """An SVID (DER chain, leaf first), its key, and the trust bundle that came with it."""

    chain: tuple[bytes, ...]
    key: NewKey
    trust_bundle_pem: bytes
    federated: TrustBundleSet = field(default_factory=TrustBundleSet)

    @property
    def leaf(self) -> x509.Certificate:
        return x509.load_der_x509_certificate(self.chain[0])

    @property
    def not_before(self) -> float:
        return self.leaf.not_valid_before_utc.timestamp()

    @property
    def not_after(self) -> float:
        return self.leaf.not_valid_after_utc.timestamp()

    def chain_pem(self) -> bytes:
        return b"".join(x509.load_der_x509_certificate(d).public_bytes(serialization.Encoding.PEM)
                        for d in self.chain)


@dataclass(frozen=True, slots=True)
class RotationPolicy:
    renew_fraction: float = 0.5
    # ± this fraction of the lifetime around the renewal point, so that proxies
    # started together do not all renew at the same instant.
    jitter_fraction: float = 0.05
    retry_initial: float = 1.0
    retry_max: float = 60.0
    # SVID lifetime to ask for (None: the CA's default).
    ttl_seconds: float | None = None
    bootstrap_timeout: float = 30.0

    def __post_init__(self) -> None:
        if not 0.05 <= self.renew_fraction <= 0.95:
            raise ValueError(f"renew_fraction must be in [0.05, 0.95] (got {self.renew_fraction})")
        if not 0 <= self.jitter_fraction < min(self.renew_fraction, 1 - self.renew_fraction):
            raise ValueError("jitter_fraction must be below renew_fraction and 1 - renew_fraction")


Targets = Callable[[str], Iterable[CertificateTarget]]


class IdentityAgent:
    def __init__(
        self,
        spiffe_id: SpiffeId,
        key_source: KeySource,
        signer: CertificateSigner,
        *,
        token: str | None = None,
        stats: StatsStore | None = None,
        policy: RotationPolicy | None = None,
        targets: Targets = live_targets.presenting,
        output_dir: Path | None = None,
        clock: Callable[[], float] = time.time,
        rng: random.Random | None = None,
    ) -> None:
        self.spiffe_id = spiffe_id
        self.key_source = key_source
        self.signer = signer
        self.policy = policy or RotationPolicy()
        self.targets = targets
        self.output_dir = output_dir
        self.clock = clock
        self.current: CertifiedKey | None = None
        self.renew_at = 0.0
        self.last_error = ""
        self._token = token
        self._rng = rng or random.Random()
        self._task: asyncio.Task[None] | None = None
        # Replaced key providers, closed once handshakes begun before the swap are done.
        self._retired: dict[asyncio.TimerHandle, Callable[[], object]] = {}
        store = stats or StatsStore()
        self.expiry_gauge = store.gauge("identity.cert_expiry_seconds")
        self.rotations = store.counter("identity.rotations")
        self.renewal_failures = store.counter("identity.renewal_failures")

    # -- one request ------------------------------------------------------ #

    async def _request(self) -> CertifiedKey:
        key = await self.key_source.new_key()
        csr = await create_csr(self.spiffe_id, key.handle)
        csr_der = csr.public_bytes(serialization.Encoding.DER)
        current = self.current
        proof = None
        if current is not None:
            proof = await make_renewal_proof(current.chain, current.key.handle, csr_der, self.clock())
        request = CertificateRequest(
            csr.public_bytes(serialization.Encoding.PEM).decode(), self.policy.ttl_seconds, proof
        )
        response = await self.signer.create_certificate(request, token=None if proof else self._token)
        chain = response.chain_der()
        if not chain:
            raise IdentityError("the CA sent an empty certificate chain")
        try:
            federated = response.federation()
        except (MeshletError, ValueError) as exc:
            raise IdentityError(f"the CA sent a bad federated trust bundle: {exc}") from None
        issued = CertifiedKey(chain, key, response.bundle_pem(), federated)
        self._check_issued(issued)
        return issued

    def _check_issued(self, issued: CertifiedKey) -> None:
        leaf = issued.leaf
        public = leaf.public_key().public_bytes(serialization.Encoding.DER,
                                                serialization.PublicFormat.SubjectPublicKeyInfo)
        mine = issued.key.handle.public_key.public_bytes(serialization.Encoding.DER,
                                                         serialization.PublicFormat.SubjectPublicKeyInfo)
        if public != mine:
            raise IdentityError("the CA's certificate is not for the key this agent generated")
        sans = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        if str(self.spiffe_id) not in sans.get_values_for_type(x509.UniformResourceIdentifier):
            raise IdentityError(f"the CA's certificate does not name {self.spiffe_id}")

    # -- installing ------------------------------------------------------- #

    def install(self, issued: CertifiedKey) -> None:
        """Swap ``issued`` into every live context presenting this identity."""
        previous = self.current
        for target in list(self.targets(str(self.spiffe_id))):
            self._install_in(target, issued)
        self.current = issued
        if issued.trust_bundle_pem:
            self.signer.update_trust_bundle(issued.trust_bundle_pem)
        self._write_files(issued)
        self._schedule_renewal(issued)
        self.refresh_stats()
        if previous is not None and previous.key.handle is not issued.key.handle:
            self._retire_key(previous.key.handle)

    def _install_in(self, target: CertificateTarget, issued: CertifiedKey) -> None:
        try:
            key = issued.key
            target.replace_certificate(issued.chain, key.handle, private_key_pem=key.private_key_pem)
            if target.trusted_ca_pem is not None and issued.trust_bundle_pem:
                target.replace_trusted_ca(issued.trust_bundle_pem, federated=issued.federated)
        except (MeshletError, ValueError) as exc:
            # One context that cannot take the SVID must not keep the others on the old one.
            log.error("cannot install the SVID of %s in a TLS context: %s", self.spiffe_id, exc)

    def _write_files(self, issued: CertifiedKey) -> None:
        # Config reloads read these, so a rebuilt context starts from the current SVID.
        if self.output_dir is None:
            return
        self.output_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        if issued.key.private_key_pem is not None:
            write_private(self.output_dir / "key.pem", issued.key.private_key_pem)
        write_public(self.output_dir / "cert-chain.pem", issued.chain_pem())
        write_public(self.output_dir / "root-cert.pem", issued.trust_bundle_pem)

    def _schedule_renewal(self, issued: CertifiedKey) -> None:
        # Measured from now, not from notBefore: SVIDs are backdated for clock
        # skew, and that margin is not lifetime this proxy can use.
        now = self.clock()
        lifetime = max(issued.not_after - now, 0.0)
        jitter = self._rng.uniform(-self.policy.jitter_fraction, self.policy.jitter_fraction)
        self.renew_at = now + lifetime * (self.policy.renew_fraction + jitter)

    def _retire_key(self, handle: KeyHandle) -> None:
        close = getattr(handle, "close", None)
        if not callable(close):
            return

        def close_now() -> None:
            self._retired.pop(timer, None)
            close()

        timer = asyncio.get_running_loop().call_later(KEY_RETIREMENT_GRACE, close_now)
        self._retired[timer] = close

    def refresh_stats(self) -> None:
        if self.current is not None:
            self.expiry_gauge.set(max(0, int(self.current.not_after - self.clock())))

    # -- the loop --------------------------------------------------------- #

    async def bootstrap(self) -> CertifiedKey:
        """The first SVID, with the bootstrap token; retries transient failures
        until ``policy.bootstrap_timeout``, gives up at once on a refusal."""
        deadline = time.monotonic() + self.policy.bootstrap_timeout
        delay = self.policy.retry_initial
        while True:
            try:
                issued = await self._request()
            except CaRefused as exc:
                if exc.code in _PERMANENT or time.monotonic() + delay > deadline:
                    raise IdentityError(f"no SVID for {self.spiffe_id}: {exc}") from None
                self.last_error = str(exc)
            except MeshletError as exc:
                if time.monotonic() + delay > deadline:
                    raise IdentityError(f"no SVID for {self.spiffe_id}: {exc}") from None
                self.last_error = str(exc)
            else:
                self.install(issued)
                expires = issued.leaf.not_valid_after_utc
                log.info("SVID for %s installed (expires %s)", self.spiffe_id, expires)
                return issued
            await asyncio.sleep(delay)
            delay = min(delay * 2, self.policy.retry_max)

    async def renew(self) -> CertifiedKey:
        """One renewal attempt; on success the new SVID is installed."""
        issued = await self._request()
        self.install(issued)
        self.rotations.inc()
        self.last_error = ""
        return issued

    async def run(self) -> None:
        """Renew forever (call ``bootstrap`` first)."""
        failures = 0
        while True:
            await self._sleep_until(self.renew_at)
            try:
                await self.renew()
                failures = 0
            except (MeshletError, OSError) as exc:
                failures += 1
                self.renewal_failures.inc()
                self.last_error = str(exc)
                backoff = min(self.policy.retry_initial * 2 ** (failures - 1), self.policy.retry_max)
                backoff *= self._rng.uniform(0.8, 1.0)
                expires = self.current.not_after if self.current is not None else self.clock()
                # Keep serving the current SVID; try again before it runs out.
                self.renew_at = min(self.clock() + backoff, max(self.clock(), expires - 1.0))
                log.warning("SVID renewal for %s failed (%s); retrying in %.1f s", self.spiffe_id, exc,
                            self.renew_at - self.clock())

    async def _sleep_until(self, when: float) -> None:
        # In short steps, so the expiry gauge stays current.
        while True:
            self.refresh_stats()
            left = when - self.clock()
            if left <= 0:
                return
            await asyncio.sleep(min(left, 1.0))

    def start(self) -> asyncio.Task[None]:
        self._task = asyncio.get_running_loop().create_task(self.run())
        return self._task

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        # Stopping: the retired keys' handshakes are over or abandoned; release them now.
        retired, self._retired = self._retired, {}
        for timer, close in retired.items():
            timer.cancel()
            close()

    def describe(self) -> dict[str, Any]:
        current = self.current
        return {
            "spiffe_id": str(self.spiffe_id),
            "serial_number": f"{current.leaf.serial_number:x}" if current else "",
            "expires_in_seconds": int(current.not_after - self.clock()) if current else 0,
            "renew_in_seconds": int(self.renew_at - self.clock()) if current else 0,
            "rotations": self.rotations.value,
            "renewal_failures": self.renewal_failures.value,
            "last_error": self.last_error,
        }
