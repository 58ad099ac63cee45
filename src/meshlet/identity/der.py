"""Just enough DER to re-sign what ``cryptography`` builds.

``cryptography`` builds certificates and CSRs only with an in-process private
key. A CA key or a workload key held by a key provider never is, so the
structure is built with a stand-in key, the signed part (TBSCertificate,
CertificationRequestInfo) is taken out, adjusted, signed through the
provider, and the whole is put back together here.
"""

from __future__ import annotations

from dataclasses import dataclass

SEQUENCE = 0x30
BIT_STRING = 0x03

# Certificates and CSRs are small; a length beyond this is not one of ours.
_MAX_LENGTH_OCTETS = 4


class DerError(ValueError):
    """Bytes that are not the DER this module expects."""


@dataclass(frozen=True, slots=True)
class Element:
    """One TLV: ``tag``, the whole encoding, and where its content starts."""

    tag: int
    encoded: bytes
    header_length: int

    @property
    def content(self) -> bytes:
        return self.encoded[self.header_length:]


def read_element(data: bytes, offset: int = 0) -> Element:
    """The element starting at ``offset`` (single-byte tags only)."""
    if offset + 2 > len(data):
        raise DerError("truncated DER element")
    tag, first = data[offset], data[offset + 1]
    position = offset + 2
    if first < 0x80:
        length = first
    else:
        count = first & 0x7F
        if count == 0 or count > _MAX_LENGTH_OCTETS or position + count > len(data):
            raise DerError("unsupported or truncated DER length")
        length = int.from_bytes(data[position:position + count], "big")
        position += count
    end = position + length
    if end > len(data):
        raise DerError("DER element runs past the end of its input")
    return Element(tag, data[offset:end], position - offset)


def children(element: Element) -> list[Element]:
    """The elements inside a constructed element, in order."""
    content = element.content
    found: list[Element] = []
    offset = 0
    while offset < len(content):
        child = read_element(content, offset)
        found.append(child)
        offset += len(child.encoded)
    return found


def encode_length(length: int) -> bytes:
    if length < 0x80:
        return bytes([length])
    octets = length.to_bytes((length.bit_length() + 7) // 8, "big")
    return bytes([0x80 | len(octets)]) + octets


def encode(tag: int, content: bytes) -> bytes:
    return bytes([tag]) + encode_length(len(content)) + content


def sequence(*parts: bytes) -> bytes:
    return encode(SEQUENCE, b"".join(parts))


def bit_string(data: bytes) -> bytes:
    """A BIT STRING of whole bytes (no unused bits), as signatures are."""
    return encode(BIT_STRING, b"\x00" + data)


def signed(to_be_signed: bytes, algorithm: bytes, signature: bytes) -> bytes:
    """``SEQUENCE { tbs, signatureAlgorithm, signatureValue }``: the outer shape
    of both a Certificate (RFC 5280) and a CertificationRequest (RFC 2986)."""
    return sequence(to_be_signed, algorithm, bit_string(signature))


def signature_algorithm(signed_der: bytes) -> bytes:
    """The signatureAlgorithm element of a Certificate or CertificationRequest."""
    parts = children(read_element(signed_der))
    if len(parts) != 3:
        raise DerError("not a signed structure (expected three elements)")
    return parts[1].encoded
