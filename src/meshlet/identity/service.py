"""The CA as a gRPC service: ``meshlet.identity.v1.CertificateService``.

One method, ``CreateCertificate``: a CSR in, an SVID chain and the trust
bundle out. The caller proves who it is in one of two ways:

- first certificate: a bootstrap token (``authorization: Bearer <token>``
  metadata), bound to the identity the CSR asks for, used up by the request;
- renewal: its current SVID chain plus a signature, made with the current
  key, over the CSR's digest and a timestamp (``RenewalProof``). The chain
  must verify against the CA's trust bundle (every root in it, so SVIDs of an
  old root renew during a root rotation) and name the same identity.

Messages are small JSON documents (gRPC's generic handlers with our own
serializers): three fields each way do not justify generated code, and plain
dataclasses keep both sides fully typed. ``CaService.add_to_server`` mounts
the service in any ``grpc.aio`` server (the control plane's, or the
standalone one of ``meshlet ca serve``). Every refusal carries its reason in
the status details.
"""

from __future__ import annotations

import asyncio
import base64
import datetime
import hashlib
import json
import logging
import struct
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import grpc
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from meshlet.errors import MeshletError
from meshlet.identity.bundle import TrustBundle, TrustBundleSet
from meshlet.identity.ca import CaError, CertificateAuthority
from meshlet.identity.csr import CsrError, read_csr
from meshlet.identity.signing import SigningError, scheme_for, sign_with
from meshlet.identity.spiffe import SpiffeId
from meshlet.identity.tokens import CSR_PURPOSE, BootstrapTokens, TokenRefused
from meshlet.tls.alerts import TlsAlertError
from meshlet.tls.config import KeyHandle
from meshlet.tls.crypto import schemes_for_key, verify
from meshlet.tls.verify import PeerPolicy, PeerRole, verify_peer

log = logging.getLogger(__name__)

SERVICE = "meshlet.identity.v1.CertificateService"
CREATE_CERTIFICATE = f"/{SERVICE}/CreateCertificate"
MAX_MESSAGE_BYTES = 256 * 1024
# How far a renewal proof's timestamp may be from the CA's clock.
RENEWAL_PROOF_WINDOW = 300.0
_PROOF_CONTEXT = b"meshlet svid renewal\x00"


class ServiceError(MeshletError):
    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


# --------------------------------------------------------------------------- #
# Messages
# --------------------------------------------------------------------------- #


def _pem_list(value: object, name: str) -> list[str]:
    if not isinstance(value, list) or not all(isinstance(v, str) and v.isascii() for v in value):
        raise ValueError(f"{name} must be a list of PEM strings")
    return list(value)


@dataclass(frozen=True, slots=True)
class RenewalProof:
    chain_pem: tuple[str, ...]
    signed_at: int
    signature: bytes

    def to_json(self) -> dict[str, Any]:
        return {"chain": list(self.chain_pem), "signed_at": self.signed_at,
                "signature": base64.b64encode(self.signature).decode()}

    @classmethod
    def from_json(cls, data: object) -> RenewalProof:
        if not isinstance(data, dict):
            raise ValueError("renewal must be an object")
        signed_at = data.get("signed_at")
        if not isinstance(signed_at, int) or isinstance(signed_at, bool):
            raise ValueError("renewal.signed_at must be an integer")
        signature = data.get("signature")
        if not isinstance(signature, str):
            raise ValueError("renewal.signature must be base64")
        return cls(tuple(_pem_list(data.get("chain"), "renewal.chain")), signed_at,
                   base64.b64decode(signature, validate=True))


@dataclass(frozen=True, slots=True)
class CertificateRequest:
    csr_pem: str
    ttl_seconds: float | None = None
    renewal: RenewalProof | None = None

    def encode(self) -> bytes:
        data: dict[str, Any] = {"csr": self.csr_pem}
        if self.ttl_seconds is not None:
            data["ttl_seconds"] = self.ttl_seconds
        if self.renewal is not None:
            data["renewal"] = self.renewal.to_json()
        return json.dumps(data).encode()

    @classmethod
    def decode(cls, raw: bytes) -> CertificateRequest:
        try:
            data = json.loads(raw)
            csr = data.get("csr") if isinstance(data, dict) else None
            if not isinstance(csr, str) or not csr.isascii():
                raise ValueError("'csr' (a PEM string) is required")
            ttl = data.get("ttl_seconds")
            if ttl is not None and (isinstance(ttl, bool) or not isinstance(ttl, int | float)):
                raise ValueError("'ttl_seconds' must be a number")
            renewal = RenewalProof.from_json(data["renewal"]) if "renewal" in data else None
        except ValueError as exc:
            raise ServiceError(grpc.StatusCode.INVALID_ARGUMENT, f"bad request: {exc}") from None
        return cls(data["csr"], None if ttl is None else float(ttl), renewal)


@dataclass(frozen=True, slots=True)
class CertificateResponse:
    cert_chain: tuple[str, ...]  # PEM, leaf first, roots excluded
    trust_bundle: tuple[str, ...]  # PEM roots of the trust domain
    trust_domain: str = ""
    # Federated trust domain -> its PEM roots.
    federated_bundles: Mapping[str, tuple[str, ...]] = field(default_factory=dict)

    def encode(self) -> bytes:
        return json.dumps({"cert_chain": list(self.cert_chain), "trust_bundle": list(self.trust_bundle),
                           "trust_domain": self.trust_domain,
                           "federated_bundles": {td: list(r) for td, r in self.federated_bundles.items()},
                           }).encode()

    @classmethod
    def decode(cls, raw: bytes) -> CertificateResponse:
        data = json.loads(raw)
        if not isinstance(data, dict):
            raise ValueError("response is not an object")
        federated = data.get("federated_bundles", {})
        if not isinstance(federated, dict):
            raise ValueError("federated_bundles must be an object")
        return cls(tuple(_pem_list(data.get("cert_chain"), "cert_chain")),
                   tuple(_pem_list(data.get("trust_bundle"), "trust_bundle")),
                   str(data.get("trust_domain", "")),
                   {str(td): tuple(_pem_list(roots, f"federated_bundles[{td}]"))
                    for td, roots in federated.items()})

    def federation(self) -> TrustBundleSet:
        """The federated bundles (refuses roots that are not CA certificates)."""
        return TrustBundleSet.of(
            TrustBundle.from_pem(td, "".join(roots).encode()) for td, roots in self.federated_bundles.items()
        )

    def chain_der(self) -> tuple[bytes, ...]:
        return tuple(
            c.public_bytes(serialization.Encoding.DER)
            for pem in self.cert_chain for c in x509.load_pem_x509_certificates(pem.encode())
        )

    def bundle_pem(self) -> bytes:
        return "".join(self.trust_bundle).encode()


def proof_content(csr_der: bytes, signed_at: int) -> bytes:
    """What a renewal proof signs: a context string, the time, the CSR's digest."""
    return _PROOF_CONTEXT + struct.pack(">q", signed_at) + hashlib.sha256(csr_der).digest()


async def make_renewal_proof(
    current_chain_der: Sequence[bytes], current_key: KeyHandle, csr_der: bytes, now: float
) -> RenewalProof:
    signed_at = int(now)
    scheme = scheme_for(current_key.public_key, list(current_key.schemes))
    signature = await sign_with(current_key, scheme, proof_content(csr_der, signed_at))
    chain_pem = tuple(
        x509.load_der_x509_certificate(d).public_bytes(serialization.Encoding.PEM).decode()
        for d in current_chain_der
    )
    return RenewalProof(chain_pem, signed_at, signature)


# --------------------------------------------------------------------------- #
# The service
# --------------------------------------------------------------------------- #


@dataclass
class ServiceStats:
    issued: int = 0
    refused: dict[str, int] = field(default_factory=dict)

    def refusal(self, code: grpc.StatusCode) -> None:
        self.refused[code.name] = self.refused.get(code.name, 0) + 1


class CaService:
    """``authority`` is called per request (a directory-backed CA reloads on
    change); ``federation`` gives the bundles of federated trust domains."""

    def __init__(
        self,
        authority: Callable[[], CertificateAuthority],
        tokens: BootstrapTokens,
        *,
        federation: Callable[[], Sequence[TrustBundle]] = tuple,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._authority = authority
        self._federation = federation
        self.tokens = tokens
        self.clock = clock
        self.stats = ServiceStats()

    async def create_certificate(self, request: CertificateRequest, token: str | None) -> CertificateResponse:
        """Check the CSR and the caller's credential, then issue; ``ServiceError`` says why not."""
        try:
            checked = read_csr(request.csr_pem.encode())
        except CsrError as exc:
            raise ServiceError(grpc.StatusCode.INVALID_ARGUMENT, str(exc)) from None
        authority = self._authority()
        if not checked.spiffe_id.member_of(authority.trust_domain):
            raise ServiceError(
                grpc.StatusCode.PERMISSION_DENIED,
                f"CSR asks for {checked.spiffe_id}, outside trust domain {authority.trust_domain!r}",
            )
        ttl = None if request.ttl_seconds is None else datetime.timedelta(seconds=request.ttl_seconds)
        try:
            authority.ttl_of(ttl)
        except CaError as exc:
            raise ServiceError(grpc.StatusCode.INVALID_ARGUMENT, str(exc)) from None
        csr_der = checked.csr.public_bytes(serialization.Encoding.DER)
        if request.renewal is not None:
            self._check_renewal(request.renewal, checked.spiffe_id, csr_der, authority)
        elif token:
            self._redeem(token, checked.spiffe_id)
        else:
            raise ServiceError(
                grpc.StatusCode.UNAUTHENTICATED,
                "no credential: send a bootstrap token (authorization: Bearer) or a renewal proof",
            )
        try:
            issued = await authority.issue(checked.spiffe_id, checked.public_key, ttl=ttl)
        except (CaError, SigningError) as exc:
            raise ServiceError(grpc.StatusCode.UNAVAILABLE, f"the CA could not sign: {exc}") from None
        self.stats.issued += 1
        return CertificateResponse(
            tuple(c.public_bytes(serialization.Encoding.PEM).decode() for c in issued.chain),
            tuple(r.public_bytes(serialization.Encoding.PEM).decode() for r in authority.bundle.roots),
            authority.trust_domain,
            {b.trust_domain: tuple(r.public_bytes(serialization.Encoding.PEM).decode() for r in b.roots)
             for b in self._federation()},
        )

    def _redeem(self, token: str, spiffe_id: SpiffeId) -> None:
        try:
            self.tokens.check(token, purpose=CSR_PURPOSE, spiffe_id=spiffe_id)
        except TokenRefused as exc:
            denied = exc.wrong_identity
            code = grpc.StatusCode.PERMISSION_DENIED if denied else grpc.StatusCode.UNAUTHENTICATED
            raise ServiceError(code, str(exc)) from None
        try:
            self.tokens.redeem(token, purpose=CSR_PURPOSE, spiffe_id=spiffe_id)
        except TokenRefused as exc:
            raise ServiceError(grpc.StatusCode.UNAUTHENTICATED, str(exc)) from None

    def _check_renewal(
        self, proof: RenewalProof, spiffe_id: SpiffeId, csr_der: bytes, authority: CertificateAuthority
    ) -> None:
        denied = grpc.StatusCode.PERMISSION_DENIED
        now = self.clock()
        if abs(now - proof.signed_at) > RENEWAL_PROOF_WINDOW:
            raise ServiceError(denied, (
                f"renewal proof is stale or from the future (signed at {proof.signed_at},"
                f" CA time {int(now)}; window {RENEWAL_PROOF_WINDOW:g} s)"
            ))
        try:
            chain = [c for pem in proof.chain_pem for c in x509.load_pem_x509_certificates(pem.encode())]
        except ValueError as exc:
            raise ServiceError(denied, f"renewal chain is not PEM certificates ({exc})") from None
        policy = PeerPolicy(role=PeerRole.CLIENT, bundles=TrustBundleSet.of([authority.bundle]))
        when = datetime.datetime.fromtimestamp(now, datetime.UTC)
        try:
            peer = verify_peer([c.public_bytes(serialization.Encoding.DER) for c in chain], policy, when)
        except TlsAlertError as exc:
            raise ServiceError(
                denied, f"renewal chain is not a valid SVID of this trust domain: {exc}"
            ) from None
        if peer.spiffe_id != spiffe_id:
            raise ServiceError(denied, f"renewal chain is for {peer.spiffe_id}; the CSR asks for {spiffe_id}")
        public_key = peer.leaf.public_key()
        try:
            scheme = scheme_for(public_key, schemes_for_key(public_key))
            verify(public_key, scheme, proof.signature, proof_content(csr_der, proof.signed_at))
        except (TlsAlertError, SigningError):
            raise ServiceError(
                denied, "renewal proof signature does not verify with the current SVID's key"
            ) from None

    # -- gRPC ------------------------------------------------------------- #

    async def _handle(self, raw: bytes, context: grpc.aio.ServicerContext) -> bytes:
        try:
            request = CertificateRequest.decode(raw)
            response = await self.create_certificate(request, _bearer(context.invocation_metadata()))
        except ServiceError as exc:
            self.stats.refusal(exc.code)
            log.info("CreateCertificate refused (%s): %s", exc.code.name, exc.message)
            await context.abort(exc.code, exc.message)
            raise  # abort raises; this line is never reached
        except MeshletError as exc:  # e.g. the CA directory or its key cannot be loaded
            log.warning("CreateCertificate failed: %s", exc)
            await context.abort(grpc.StatusCode.UNAVAILABLE, f"the CA cannot serve: {exc}")
            raise
        except (asyncio.CancelledError, grpc.aio.AbortError):
            raise
        except Exception:
            # Whatever a request does, it ends in a status for that caller only.
            log.exception("CreateCertificate failed unexpectedly")
            await context.abort(grpc.StatusCode.INTERNAL, "the CA failed on this request")
            raise
        return response.encode()

    def add_to_server(self, server: grpc.aio.Server) -> None:
        handler = grpc.unary_unary_rpc_method_handler(
            self._handle, request_deserializer=_identity, response_serializer=_identity
        )
        server.add_generic_rpc_handlers(
            (grpc.method_handlers_generic_handler(SERVICE, {"CreateCertificate": handler}),)
        )


def _identity(data: bytes) -> bytes:
    return data


def _bearer(metadata: Any) -> str | None:
    for key, value in metadata or ():
        if key == "authorization" and isinstance(value, str) and value.startswith("Bearer "):
            return value[len("Bearer "):].strip()
    return None


# --------------------------------------------------------------------------- #
# The client
# --------------------------------------------------------------------------- #


class CaRefused(MeshletError):
    """The CA answered with an error; ``code`` is the gRPC status name."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"CA refused ({code}): {message}")
        self.code = code
        self.reason = message


class CaClient:
    """Talks to the CA service over TLS anchored in the trust bundle.

    The channel is opened on first use in the running event loop and rebuilt
    when the target, the trust bundle (root rotation) or the loop changes."""

    def __init__(self, target: str, trust_bundle_pem: bytes, *, server_name: str | None = None,
                 timeout: float = 10.0) -> None:
        self.target = target
        self.server_name = server_name
        self.timeout = timeout
        self._bundle = trust_bundle_pem
        self._channel: grpc.aio.Channel | None = None
        # The target, bundle and event loop the channel was opened for; any change reopens it.
        self._opened_for: tuple[str, bytes, object] | None = None

    def update_trust_bundle(self, bundle_pem: bytes) -> None:
        self._bundle = bundle_pem

    def _open(self) -> grpc.aio.Channel:
        loop = asyncio.get_running_loop()
        opened_for = (self.target, self._bundle, loop)
        if self._channel is not None and self._opened_for == opened_for:
            return self._channel
        options: list[tuple[str, str | int]] = [("grpc.max_receive_message_length", MAX_MESSAGE_BYTES)]
        if self.server_name:
            options.append(("grpc.ssl_target_name_override", self.server_name))
        credentials = grpc.ssl_channel_credentials(root_certificates=self._bundle)
        # The old channel (if any) is left to close itself: calls may still be on it.
        self._channel = grpc.aio.secure_channel(self.target, credentials, options=options)
        self._opened_for = opened_for
        return self._channel

    async def create_certificate(self, request: CertificateRequest, *, token: str | None = None
                                 ) -> CertificateResponse:
        channel = self._open()
        call = channel.unary_unary(CREATE_CERTIFICATE, request_serializer=_identity,
                                   response_deserializer=_identity)
        metadata = (("authorization", f"Bearer {token}"),) if token else ()
        try:
            raw = await call(request.encode(), timeout=self.timeout, metadata=metadata)
        except grpc.aio.AioRpcError as exc:
            raise CaRefused(exc.code().name, exc.details() or "") from None
        try:
            return CertificateResponse.decode(raw)
        except ValueError as exc:
            raise CaRefused("INTERNAL", f"the CA sent a bad response ({exc})") from None

    async def close(self) -> None:
        if self._channel is not None:
            await self._channel.close()
            self._channel = None
