"""A ctypes binding to Intel's multi-buffer crypto library (``libcrypto_mb``).

The library ships in the ``ipp-crypto`` wheel and needs the Intel compiler
runtime from ``intel-cmplr-lib-rt``; both wheels put their shared objects in
``<prefix>/lib``, which is not on the loader's search path, so the runtime
libraries are loaded first by full path with ``RTLD_GLOBAL`` and
``libcrypto_mb`` then resolves its dependencies against them.

Each ``mb8`` call runs up to eight independent operations (lanes) on
AVX-512 IFMA; every lane has its own key, input and status nibble. The
calls used here take plain little-endian 64-bit-limb arrays for numbers and
big-endian byte strings for messages and results (the ``*_ssl_mb8`` variants
would need OpenSSL ``BIGNUM``s). ctypes releases the GIL around the call, so
a worker thread can run it while the event loop keeps serving.

Nothing here decides policy: ``probe()`` reports what is available and why
not, ``load()`` gives the binding or raises ``CryptoMbUnavailable``.
"""

from __future__ import annotations

import ctypes
import functools
import os
import sys
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

__all__ = [
    "ALGORITHMS",
    "ECDSA_CURVES",
    "LANES",
    "RSA_BITS",
    "CryptoMb",
    "CryptoMbUnavailable",
    "EcdsaCurve",
    "EcdsaLane",
    "Probe",
    "RsaCrtKey",
    "RsaLane",
    "from_limbs",
    "lane_status_names",
    "load",
    "probe",
    "to_limbs",
]

LANES = 8

# Loaded in this order: libintlc is what the other three link against.
RUNTIME_LIBRARIES = ("libintlc.so.5", "libimf.so", "libsvml.so", "libirng.so")
CRYPTO_MB_NAMES = ("libcrypto_mb.so.13", "libcrypto_mb.so")
# Where to look besides the wheels' own file lists (e.g. a system install).
LIBRARY_DIR_ENV = "MESHLET_CRYPTO_MB_DIR"

# cpu_features.h
CPU_AVX512F = 0x00100000
CPU_AVX512IFMA = 0x100000000
CPU_AVX512_ENABLED_BY_OS = 0x200000000

# cpu_features.h ``enum MBX_ALGO`` values for the algorithms this binding uses.
ALGORITHMS: dict[str, int] = {"RSA-2048": 1, "RSA-3072": 2, "RSA-4096": 3, "P-256": 5, "P-384": 6}

RSA_BITS = (2048, 3072, 4096)
F4 = 65537  # the public exponent crypto_mb's public-key methods take

# status.h: one 4-bit status per lane.
SIGNATURE_ERROR = 8
_STATUS_BITS = {1: "mismatched parameter", 2: "null parameter", 4: "low order", 8: "signature error"}


class CryptoMbUnavailable(RuntimeError):
    """crypto_mb cannot be used here; the message says why."""


def lane_status_names(status: int) -> str:
    """A lane's 4-bit status as words (``status.h``)."""
    names = [name for bit, name in _STATUS_BITS.items() if status & bit]
    return ", ".join(names) or "ok"


def lane_statuses(status: int) -> list[int]:
    return [(status >> (4 * lane)) & 0xF for lane in range(LANES)]


# --------------------------------------------------------------------------- #
# Numbers
# --------------------------------------------------------------------------- #


def to_limbs(value: int, limbs: int) -> ctypes.Array[ctypes.c_uint64]:
    """``value`` as ``limbs`` little-endian 64-bit words (the library's BNU)."""
    if value < 0 or value.bit_length() > 64 * limbs:
        raise ValueError(f"{value.bit_length()}-bit number does not fit in {limbs} limbs")
    return (ctypes.c_uint64 * limbs).from_buffer_copy(value.to_bytes(8 * limbs, "little"))


def from_limbs(words: ctypes.Array[ctypes.c_uint64]) -> int:
    return int.from_bytes(bytes(words), "little")


def _limbs_for(bits: int) -> int:
    return (bits + 63) // 64


@dataclass(frozen=True, slots=True)
class RsaCrtKey:
    """An RSA private key's CRT parameters, converted once for every call,
    and its public half, with which every result is checked."""

    bits: int
    p: ctypes.Array[ctypes.c_uint64]
    q: ctypes.Array[ctypes.c_uint64]
    dp: ctypes.Array[ctypes.c_uint64]
    dq: ctypes.Array[ctypes.c_uint64]
    qinv: ctypes.Array[ctypes.c_uint64]
    n: ctypes.Array[ctypes.c_uint64]
    modulus: int
    e: int

    @classmethod
    def from_numbers(cls, bits: int, p: int, q: int, dp: int, dq: int, qinv: int, e: int = F4) -> RsaCrtKey:
        """``qinv`` is q^-1 mod p (``cryptography``'s ``iqmp``)."""
        if bits not in RSA_BITS:
            raise ValueError(f"crypto_mb signs with RSA-2048, -3072 and -4096, not {bits}-bit keys")
        half = bits // 2
        if p.bit_length() != half or q.bit_length() != half:
            raise ValueError(f"crypto_mb needs both RSA primes of exactly {half} bits")
        limbs = _limbs_for(half)
        n = p * q
        return cls(
            bits,
            p=to_limbs(p, limbs),
            q=to_limbs(q, limbs),
            dp=to_limbs(dp, limbs),
            dq=to_limbs(dq, limbs),
            qinv=to_limbs(qinv, limbs),
            n=to_limbs(n, _limbs_for(bits)),
            modulus=n,
            e=e,
        )


@dataclass(frozen=True, slots=True)
class RsaLane:
    key: RsaCrtKey
    # The encoded message, big-endian, exactly bits/8 bytes, below the modulus.
    message: bytes


@dataclass(frozen=True, slots=True)
class EcdsaCurve:
    name: str
    bits: int
    order: int
    sign_symbol: str

    @property
    def limbs(self) -> int:
        return _limbs_for(self.bits)

    @property
    def size(self) -> int:
        return self.bits // 8


P256 = EcdsaCurve(
    "P-256",
    256,
    0xFFFFFFFF00000000FFFFFFFFFFFFFFFFBCE6FAADA7179E84F3B9CAC2FC632551,
    "mbx_nistp256_ecdsa_sign_mb8",
)
P384 = EcdsaCurve(
    "P-384",
    384,
    int(
        "ffffffffffffffffffffffffffffffffffffffffffffffffc7634d81f4372ddf581a0db248b0a77aecec196accc52973",
        16,
    ),
    "mbx_nistp384_ecdsa_sign_mb8",
)
ECDSA_CURVES = {c.name: c for c in (P256, P384)}


@dataclass(frozen=True, slots=True)
class EcdsaLane:
    curve: EcdsaCurve
    # The private scalar d as limbs (``EcdsaLane.private_limbs``), converted once per key.
    private: ctypes.Array[ctypes.c_uint64]
    # The ephemeral scalar k in [1, n-1]: fresh for every signature.
    nonce: int
    # The message representative e (the digest's leftmost bits), already reduced mod n.
    digest: int

    @staticmethod
    def private_limbs(curve: EcdsaCurve, d: int) -> ctypes.Array[ctypes.c_uint64]:
        if not 0 < d < curve.order:
            raise ValueError(f"not a {curve.name} private scalar")
        return to_limbs(d, curve.limbs)


# --------------------------------------------------------------------------- #
# Discovery and loading
# --------------------------------------------------------------------------- #


def _wheel_files(distribution: str) -> list[Path]:
    try:
        dist = metadata.distribution(distribution)
    except metadata.PackageNotFoundError:
        return []
    return [Path(str(dist.locate_file(f))).resolve() for f in dist.files or () if f.name.startswith("lib")]


def _search_dirs() -> list[Path]:
    dirs = [Path(d) for d in os.environ.get(LIBRARY_DIR_ENV, "").split(os.pathsep) if d]
    dirs.append(Path(sys.prefix) / "lib")
    return dirs


def find_library(names: Sequence[str], distribution: str) -> Path | None:
    """The first of ``names`` in the wheel's file list, else in the search dirs."""
    in_wheel = {p.name: p for p in _wheel_files(distribution)}
    for name in names:
        if name in in_wheel and in_wheel[name].exists():
            return in_wheel[name]
    for directory in _search_dirs():
        for name in names:
            candidate = directory / name
            if candidate.exists():
                return candidate.resolve()
    return None


@dataclass(frozen=True)
class Probe:
    """What crypto_mb can do on this machine, and why not when it cannot."""

    library: str | None = None
    version: str | None = None
    cpu_features: int = 0
    applicable: bool = False
    algorithms: dict[str, bool] = field(default_factory=dict)
    error: str | None = None

    @property
    def has_ifma(self) -> bool:
        return bool(self.cpu_features & CPU_AVX512IFMA)

    @property
    def avx512_enabled_by_os(self) -> bool:
        return bool(self.cpu_features & CPU_AVX512_ENABLED_BY_OS)

    @property
    def usable(self) -> bool:
        return self.error is None and self.applicable

    def supports(self, algorithm: str) -> bool:
        return self.usable and self.algorithms.get(algorithm, False)

    @property
    def reason(self) -> str:
        """Why the multi-buffer path is (or is not) used, in one line."""
        if self.error is not None:
            return self.error
        if not self.has_ifma:
            return "the CPU has no AVX-512 IFMA"
        if not self.avx512_enabled_by_os:
            return "the OS has not enabled AVX-512 state"
        if not self.applicable:
            return "crypto_mb reports it is not applicable on this CPU"
        return "crypto_mb is applicable (AVX-512 IFMA present and enabled)"

    def as_dict(self) -> dict[str, Any]:
        return {
            "library": self.library,
            "version": self.version,
            "cpu_features": f"{self.cpu_features:#x}",
            "avx512ifma": self.has_ifma,
            "avx512_enabled_by_os": self.avx512_enabled_by_os,
            "applicable": self.applicable,
            "algorithms": dict(self.algorithms),
            "usable": self.usable,
            "reason": self.reason,
        }


class _Version(ctypes.Structure):
    _fields_ = [
        ("major", ctypes.c_int),
        ("minor", ctypes.c_int),
        ("revision", ctypes.c_int),
        ("name", ctypes.c_char_p),
        ("build_date", ctypes.c_char_p),
        ("str_version", ctypes.c_char_p),
    ]


_P = ctypes.c_void_p
_PA = ctypes.POINTER(ctypes.c_void_p)  # ``T* const pa[8]``


def _declare(lib: ctypes.CDLL) -> None:
    lib.mbx_get_cpu_features.restype = ctypes.c_uint64
    lib.mbx_get_cpu_features.argtypes = []
    lib.mbx_is_crypto_mb_applicable.restype = ctypes.c_int
    lib.mbx_is_crypto_mb_applicable.argtypes = [ctypes.c_uint64]
    lib.mbx_get_algo_info.restype = ctypes.c_uint64
    lib.mbx_get_algo_info.argtypes = [ctypes.c_int]
    lib.mbx_getversion.restype = ctypes.POINTER(_Version)
    lib.mbx_getversion.argtypes = []
    for method in ("mbx_RSA_private_crt_Method", "mbx_RSA_pub65537_Method"):
        getattr(lib, method).restype = _P
        getattr(lib, method).argtypes = [ctypes.c_int]
    lib.mbx_RSA_Method_BufSize.restype = ctypes.c_int
    lib.mbx_RSA_Method_BufSize.argtypes = [_P]
    lib.mbx_rsa_private_crt_mb8.restype = ctypes.c_uint32
    lib.mbx_rsa_private_crt_mb8.argtypes = [_PA] * 7 + [ctypes.c_int, _P, _P]
    lib.mbx_rsa_public_mb8.restype = ctypes.c_uint32
    lib.mbx_rsa_public_mb8.argtypes = [_PA] * 3 + [ctypes.c_int, _P, _P]
    for curve in ECDSA_CURVES.values():
        fn = getattr(lib, curve.sign_symbol)
        fn.restype = ctypes.c_uint32
        fn.argtypes = [_PA] * 5 + [_P]


def _load_library() -> tuple[ctypes.CDLL, Path]:
    for name in RUNTIME_LIBRARIES:
        path = find_library((name,), "intel-cmplr-lib-rt")
        if path is None:
            raise CryptoMbUnavailable(
                f"Intel runtime library {name} not found (pip install intel-cmplr-lib-rt)"
            )
        try:
            ctypes.CDLL(str(path), mode=ctypes.RTLD_GLOBAL)
        except OSError as exc:
            raise CryptoMbUnavailable(f"cannot load {path}: {exc}") from None
    path = find_library(CRYPTO_MB_NAMES, "ipp-crypto")
    if path is None:
        raise CryptoMbUnavailable("libcrypto_mb not found (pip install ipp-crypto)")
    try:
        lib = ctypes.CDLL(str(path))
        _declare(lib)
    except (OSError, AttributeError) as exc:
        raise CryptoMbUnavailable(f"cannot load {path}: {exc}") from None
    return lib, path


@functools.cache
def _loaded() -> tuple[ctypes.CDLL, Path] | CryptoMbUnavailable:
    # Cached either way: loading is process-wide and a failure will not mend.
    try:
        return _load_library()
    except CryptoMbUnavailable as exc:
        return exc


@functools.cache
def probe() -> Probe:
    """Find and load the library, then ask it about this CPU."""
    loaded = _loaded()
    if isinstance(loaded, CryptoMbUnavailable):
        return Probe(error=str(loaded))
    lib, path = loaded
    version = lib.mbx_getversion().contents
    features = int(lib.mbx_get_cpu_features())
    applicable = bool(lib.mbx_is_crypto_mb_applicable(features))
    algorithms = {name: bool(lib.mbx_get_algo_info(code) & LANES) for name, code in ALGORITHMS.items()}
    text = (version.str_version or b"").decode("ascii", "replace")
    return Probe(str(path), text, features, applicable, algorithms)


def load() -> CryptoMb:
    """The binding (one per process), when the library loads and applies to this CPU."""
    report = probe()
    if not report.usable:
        raise CryptoMbUnavailable(report.reason)
    return _binding()


@functools.cache
def _binding() -> CryptoMb:
    loaded = _loaded()
    assert not isinstance(loaded, CryptoMbUnavailable)
    return CryptoMb(loaded[0], probe())


# --------------------------------------------------------------------------- #
# The calls
# --------------------------------------------------------------------------- #


def _pointers(items: Sequence[Any]) -> ctypes.Array[ctypes.c_void_p]:
    """An 8-entry pointer array to per-lane objects; short batches repeat
    their first lane (see ``_Block``). Envoy's cryptomb passes NULL for unused
    lanes instead, which the entry points flag per lane; a valid repeat keeps
    every lane on the library's ordinary path at no extra cost."""
    filled = list(items) + [items[0]] * (LANES - len(items))
    return (ctypes.c_void_p * LANES)(*(ctypes.addressof(x) for x in filled))


class _Block:
    """Eight lanes' worth of one field in one buffer, with its pointer array.

    One allocation per field rather than one per lane keeps the per-batch
    cost small. The library computes all eight lanes regardless and its
    conversion routines read every lane, so the lanes a short batch does not
    use get valid inputs (copies of the first lane's) and their results are
    dropped."""

    __slots__ = ("buffer", "pointers", "stride")

    def __init__(self, stride: int, lanes: Sequence[bytes] = ()) -> None:
        self.stride = stride
        if lanes:
            data = b"".join(lanes) + lanes[0] * (LANES - len(lanes))
            self.buffer = ctypes.create_string_buffer(data, len(data))
        else:
            self.buffer = ctypes.create_string_buffer(stride * LANES)
        base = ctypes.addressof(self.buffer)
        self.pointers = (ctypes.c_void_p * LANES)(*(base + i * stride for i in range(LANES)))


Lane = RsaLane | EcdsaLane
LaneResult = bytes | tuple[int, int] | int  # signature bytes, (r, s), or a nonzero lane status


class CryptoMb:
    """The mb8 entry points, one batch per call, callable from any thread."""

    def __init__(self, lib: ctypes.CDLL, report: Probe) -> None:
        self._lib = lib
        self.probe = report
        self._methods: dict[tuple[str, int], tuple[int, int]] = {}
        # RSA scratch buffers are reused between calls (the library would
        # otherwise malloc one per call), so each thread has its own.
        self._scratch = threading.local()

    def run(self, lanes: Sequence[Lane]) -> list[LaneResult]:
        """One batch of lanes of one kind: RSA lanes or ECDSA lanes."""
        if lanes and isinstance(lanes[0], RsaLane):
            return list(self.rsa_private_crt([lane for lane in lanes if isinstance(lane, RsaLane)]))
        return list(self.ecdsa_sign([lane for lane in lanes if isinstance(lane, EcdsaLane)]))

    def _rsa_method(self, name: str, bits: int) -> tuple[int, ctypes.Array[ctypes.c_char]]:
        """The ``mbx_RSA_*_Method`` for ``bits`` and this thread's scratch buffer for it."""
        key = (name, bits)
        method = self._methods.get(key)
        if method is None:
            handle = getattr(self._lib, name)(bits)
            if not handle:
                raise CryptoMbUnavailable(f"crypto_mb has no {name}({bits})")
            method = self._methods[key] = (handle, self._lib.mbx_RSA_Method_BufSize(handle))
        buffers: dict[tuple[str, int], ctypes.Array[ctypes.c_char]]
        buffers = self._scratch.__dict__.setdefault("buffers", {})
        scratch = buffers.get(key)
        if scratch is None:
            scratch = buffers[key] = ctypes.create_string_buffer(max(method[1], 64))
        return method[0], scratch

    def rsa_private_crt(self, lanes: Sequence[RsaLane]) -> list[bytes | int]:
        """m^d mod n for each lane (same modulus size throughout).

        Returns, per lane, the result (bits/8 bytes) or its nonzero status."""
        if not 0 < len(lanes) <= LANES:
            raise ValueError(f"a batch has 1 to {LANES} lanes, not {len(lanes)}")
        bits = lanes[0].key.bits
        size = bits // 8
        for lane in lanes:
            if lane.key.bits != bits or len(lane.message) != size:
                raise ValueError(
                    f"every lane of an RSA-{bits} batch needs an RSA-{bits} key and a {size}-byte input"
                )
        inputs = _Block(size, [lane.message for lane in lanes])
        outputs = _Block(size)
        method, scratch = self._rsa_method("mbx_RSA_private_crt_Method", bits)
        keys = [lane.key for lane in lanes]
        status = self._lib.mbx_rsa_private_crt_mb8(
            inputs.pointers,
            outputs.pointers,
            _pointers([k.p for k in keys]),
            _pointers([k.q for k in keys]),
            _pointers([k.dp for k in keys]),
            _pointers([k.dq for k in keys]),
            _pointers([k.qinv for k in keys]),
            bits,
            method,
            scratch,
        )
        codes = lane_statuses(status)
        self._check_rsa(keys, inputs, outputs, codes)
        raw = outputs.buffer.raw
        return [codes[i] or raw[i * size : (i + 1) * size] for i in range(len(lanes))]

    def _check_rsa(
        self, keys: Sequence[RsaCrtKey], inputs: _Block, outputs: _Block, codes: list[int]
    ) -> None:
        """Marks lanes whose result does not map back to their input (s^e mod n
        != m) with a signature error: a CRT result corrupted by a fault would
        otherwise give the key away (the Bellcore attack), so, as OpenSSL
        does, nothing leaves unchecked. One public-key mb8 call checks the
        whole batch; keys whose exponent is not 65537 are checked one by one."""
        size = inputs.stride
        if all(k.e == F4 for k in keys):
            recovered = _Block(size)
            method, scratch = self._rsa_method("mbx_RSA_pub65537_Method", keys[0].bits)
            status = self._lib.mbx_rsa_public_mb8(
                outputs.pointers,
                recovered.pointers,
                _pointers([k.n for k in keys]),
                keys[0].bits,
                method,
                scratch,
            )
            back, public_codes = recovered.buffer.raw, lane_statuses(status)
        else:
            back, public_codes = b"", [0] * LANES
        sent, got = inputs.buffer.raw, outputs.buffer.raw
        for i, key in enumerate(keys):
            lane = slice(i * size, (i + 1) * size)
            if codes[i]:
                continue
            if key.e == F4 and back:
                ok = not public_codes[i] and back[lane] == sent[lane]
            else:
                ok = pow(int.from_bytes(got[lane], "big"), key.e, key.modulus) == int.from_bytes(
                    sent[lane], "big"
                )
            if not ok:
                codes[i] = SIGNATURE_ERROR

    def ecdsa_sign(self, lanes: Sequence[EcdsaLane]) -> list[tuple[int, int] | int]:
        """ECDSA (r, s) for each lane (one curve throughout), or its nonzero status."""
        if not 0 < len(lanes) <= LANES:
            raise ValueError(f"a batch has 1 to {LANES} lanes, not {len(lanes)}")
        curve = lanes[0].curve
        size, limbs = curve.size, curve.limbs
        for lane in lanes:
            if lane.curve is not curve:
                raise ValueError(f"every lane of a {curve.name} batch needs a {curve.name} key")
            if not 0 < lane.nonce < curve.order or not 0 <= lane.digest < curve.order:
                raise ValueError(f"{curve.name} nonce or digest out of range")
        messages = _Block(size, [lane.digest.to_bytes(size, "big") for lane in lanes])
        nonces = _Block(8 * limbs, [lane.nonce.to_bytes(8 * limbs, "little") for lane in lanes])
        r_out = _Block(size)
        s_out = _Block(size)
        status = getattr(self._lib, curve.sign_symbol)(
            r_out.pointers,
            s_out.pointers,
            messages.pointers,
            nonces.pointers,
            _pointers([lane.private for lane in lanes]),
            None,
        )
        codes = lane_statuses(status)
        r_all, s_all = r_out.buffer.raw, s_out.buffer.raw
        return [
            codes[i]
            or (
                int.from_bytes(r_all[i * size : (i + 1) * size], "big"),
                int.from_bytes(s_all[i * size : (i + 1) * size], "big"),
            )
            for i in range(len(lanes))
        ]
