"""Certificate signing requests whose private key never leaves its provider.

``create_csr`` builds a PKCS#10 request for a SPIFFE ID: ``cryptography``
lays out the CertificationRequestInfo with a stand-in key, the stand-in's
public key is replaced by the provider's, and the provider signs the result.
``read_csr`` is the CA's side: it checks the request's signature and that it
asks for exactly one SPIFFE ID, and says precisely what is wrong otherwise.
"""

from __future__ import annotations

from dataclasses import dataclass

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.types import CertificatePublicKeyTypes

from meshlet.errors import MeshletError
from meshlet.identity import der
from meshlet.identity.signing import builder_arguments, scheme_for, sign_with
from meshlet.identity.spiffe import SpiffeId, SpiffeIdError
from meshlet.tls.config import KeyHandle

MAX_CSR_BYTES = 16 * 1024


class CsrError(MeshletError, ValueError):
    """A CSR is malformed, badly signed or asks for something it may not."""


async def create_csr(spiffe_id: SpiffeId, key: KeyHandle) -> x509.CertificateSigningRequest:
    """A CSR for ``spiffe_id`` (its only URI SAN; empty subject) signed by ``key``."""
    scheme = scheme_for(key.public_key, list(key.schemes))
    builder = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([]))
        .add_extension(x509.SubjectAlternativeName([x509.UniformResourceIdentifier(str(spiffe_id))]),
                       critical=True)
    )
    stand_in, algorithm, rsa_padding = builder_arguments(scheme)
    template = builder.sign(stand_in, algorithm, rsa_padding=rsa_padding)
    info = _with_public_key(template.tbs_certrequest_bytes, key.public_key)
    signature = await sign_with(key, scheme, info)
    encoded = der.signed(info, der.signature_algorithm(template.public_bytes(serialization.Encoding.DER)),
                         signature)
    return x509.load_der_x509_csr(encoded)


def _with_public_key(request_info: bytes, public_key: CertificatePublicKeyTypes) -> bytes:
    # CertificationRequestInfo ::= SEQUENCE { version, subject, subjectPKInfo, [0] attributes }
    version, subject, _stand_in_spki, attributes = der.children(der.read_element(request_info))
    spki = public_key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return der.sequence(version.encoded, subject.encoded, spki, attributes.encoded)


@dataclass(frozen=True, slots=True)
class CheckedCsr:
    """A CSR whose signature verified, and the one identity it asks for."""

    spiffe_id: SpiffeId
    public_key: CertificatePublicKeyTypes
    csr: x509.CertificateSigningRequest


def load_csr(data: bytes) -> x509.CertificateSigningRequest:
    """PEM or DER; refuses anything larger than ``MAX_CSR_BYTES``."""
    if len(data) > MAX_CSR_BYTES:
        raise CsrError(f"CSR is larger than {MAX_CSR_BYTES} bytes")
    try:
        if data.lstrip().startswith(b"-----BEGIN"):
            return x509.load_pem_x509_csr(data)
        return x509.load_der_x509_csr(data)
    except ValueError as exc:
        raise CsrError(f"not a PKCS#10 certificate signing request ({exc})") from None


def read_csr(data: bytes) -> CheckedCsr:
    """Parse ``data`` and check its signature and requested identity."""
    csr = load_csr(data)
    try:
        valid = csr.is_signature_valid
        public_key = csr.public_key()
    except Exception as exc:  # unsupported key or algorithm: hostile input raises many types
        raise CsrError(f"CSR signature cannot be checked ({exc})") from None
    if not valid:
        raise CsrError("CSR signature does not verify with the CSR's public key (proof of possession failed)")
    return CheckedCsr(_requested_identity(csr), public_key, csr)


def _requested_identity(csr: x509.CertificateSigningRequest) -> SpiffeId:
    try:
        sans = csr.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        raise CsrError("CSR requests no subjectAltName; it must carry exactly one SPIFFE ID URI") from None
    except Exception as exc:
        raise CsrError(f"CSR extensions are malformed ({exc})") from None
    others = [n for n in sans if not isinstance(n, x509.UniformResourceIdentifier)]
    if others:
        raise CsrError(f"CSR requests SANs other than one SPIFFE ID: {[str(n.value) for n in others]}")
    uris = sans.get_values_for_type(x509.UniformResourceIdentifier)
    if len(uris) != 1:
        raise CsrError(f"CSR must request exactly one URI SAN (a SPIFFE ID), not {len(uris)}")
    try:
        return SpiffeId.parse(uris[0])
    except SpiffeIdError as exc:
        raise CsrError(f"CSR's URI SAN is not a SPIFFE ID: {exc}") from None
