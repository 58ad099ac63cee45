"""Session tickets: the server seals its resumption state under a rotating
AEAD key (so tickets need no server-side cache); the client keeps a
``ClientSession`` per ticket.

A sealed ticket is ``key_id (4) || nonce (12) || AES-256-GCM(state)``. Keys
rotate every ``rotation_interval`` seconds; a key keeps opening tickets for
``lifetime`` seconds after it stopped sealing, so no valid ticket is lost to a
rotation.
"""

from __future__ import annotations

import os
import struct
import time
from collections.abc import Callable
from dataclasses import dataclass

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from meshlet.tls.alerts import TlsAlertError
from meshlet.tls.codec import Reader, vec8, vec16, vec24

_STATE_VERSION = 1
_MAX_LIFETIME = 7 * 24 * 3600


@dataclass(frozen=True, slots=True)
class TicketState:
    """What the server needs to resume: sealed inside the ticket."""

    cipher_suite: int
    psk: bytes
    issued_at_ms: int
    age_add: int
    lifetime: int
    alpn: str
    server_name: str
    peer_chain: tuple[bytes, ...]

    def serialize(self) -> bytes:
        chain = b"".join(vec24(c) for c in self.peer_chain)
        return b"".join(
            (
                struct.pack(
                    "!BHQII",
                    _STATE_VERSION,
                    self.cipher_suite,
                    self.issued_at_ms,
                    self.age_add,
                    self.lifetime,
                ),
                vec8(self.psk),
                vec8(self.alpn.encode()),
                vec16(self.server_name.encode()),
                vec24(chain),
            )
        )

    @classmethod
    def parse(cls, data: bytes) -> TicketState | None:
        try:
            reader = Reader(data)
            if reader.uint8() != _STATE_VERSION:
                return None
            suite = reader.uint16()
            issued = (reader.uint32() << 32) | reader.uint32()
            age_add = reader.uint32()
            lifetime = reader.uint32()
            psk = reader.vector(1)
            alpn = reader.vector(1).decode()
            server_name = reader.vector(2).decode()
            chain_reader = Reader(reader.vector(3))
            reader.expect_end("ticket state")
            chain: list[bytes] = []
            while not chain_reader.eof():
                chain.append(chain_reader.vector(3))
        except (TlsAlertError, UnicodeDecodeError):
            return None
        return cls(suite, psk, issued, age_add, lifetime, alpn, server_name, tuple(chain))


@dataclass(slots=True)
class _Key:
    key_id: bytes
    aead: AESGCM
    created_at: float


class TicketKeys:
    """Rotating ticket-sealing keys, shared by every connection of a server."""

    def __init__(
        self,
        *,
        rotation_interval: float = 3600.0,
        lifetime: int = 86400,
        clock: Callable[[], float] = time.time,
        random: Callable[[int], bytes] = os.urandom,
        max_keys: int = 16,
    ) -> None:
        if not 0 < lifetime <= _MAX_LIFETIME:
            raise ValueError(f"ticket lifetime must be in (0, {_MAX_LIFETIME}] seconds")
        self.rotation_interval = rotation_interval
        self.lifetime = lifetime
        self._clock = clock
        self._random = random
        self._max_keys = max_keys
        self._keys: list[_Key] = []

    def rotate(self) -> None:
        """Start sealing with a fresh key; drop keys too old to open a live ticket."""
        now = self._clock()
        self._keys.insert(0, _Key(self._random(4), AESGCM(self._random(32)), now))
        horizon = self.rotation_interval + self.lifetime
        self._keys = [k for k in self._keys if now - k.created_at <= horizon][: self._max_keys]

    def _current(self) -> _Key:
        if not self._keys or self._clock() - self._keys[0].created_at >= self.rotation_interval:
            self.rotate()
        return self._keys[0]

    def seal(self, state: TicketState) -> bytes:
        key = self._current()
        nonce = self._random(12)
        return key.key_id + nonce + key.aead.encrypt(nonce, state.serialize(), key.key_id)

    def unseal(self, ticket: bytes) -> TicketState | None:
        """The state inside ``ticket``, or None if no live key opens it."""
        if len(ticket) < 4 + 12 + 16:
            return None
        key_id = ticket[:4]
        for key in self._keys:
            if key.key_id == key_id:
                try:
                    plain = key.aead.decrypt(ticket[4:16], ticket[16:], key_id)
                except InvalidTag:
                    return None
                return TicketState.parse(plain)
        return None


@dataclass(frozen=True, slots=True)
class ClientSession:
    """A ticket the client received, with what it needs to resume."""

    ticket: bytes
    psk: bytes
    cipher_suite: int
    age_add: int
    lifetime: int
    received_at: float
    server_name: str
    alpn: str
    peer_chain: tuple[bytes, ...]

    def obfuscated_age(self, now: float) -> int:
        return (int((now - self.received_at) * 1000) + self.age_add) & 0xFFFFFFFF

    def expired(self, now: float) -> bool:
        return now - self.received_at >= self.lifetime
