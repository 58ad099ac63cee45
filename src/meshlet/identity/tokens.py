"""Bootstrap tokens: the credential a workload presents with its first CSR.

A token is a random 256-bit secret, shown once when it is issued and stored
only as its SHA-256 hash, together with the one identity it is bound to, its
purpose, its expiry and whether it was used. Redeeming one is atomic: of two
requests racing with the same token, one wins and the other is told the token
was already used. Every refusal says why (unknown, expired, used, other
purpose, other identity) so an operator can fix the cause; the messages
never echo the secret.

Stores: ``MemoryTokenStore`` (tests, a single control-plane process) and
``SqliteTokenStore`` (survives restarts; one file shared by CA processes).
"""

from __future__ import annotations

import base64
import hashlib
import secrets
import sqlite3
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Protocol

from meshlet.errors import MeshletError
from meshlet.identity.spiffe import SpiffeId

TOKEN_PREFIX = "mlt1."
CSR_PURPOSE = "csr"
DEFAULT_TOKEN_TTL = 3600.0
MAX_TOKEN_TTL = 30 * 24 * 3600.0
_SECRET_BYTES = 32
# Prefix + base64url of 32 bytes; anything much longer is not a token.
MAX_TOKEN_LENGTH = 128


class TokenRefused(MeshletError):
    """A token was not accepted; the message is the reason (safe to return to the caller).
    ``wrong_identity``: the token is genuine but bound to another identity."""

    def __init__(self, message: str, *, wrong_identity: bool = False) -> None:
        super().__init__(message)
        self.wrong_identity = wrong_identity


@dataclass(frozen=True, slots=True)
class TokenRecord:
    token_hash: str  # hex SHA-256 of the secret
    spiffe_id: str
    purpose: str
    issued_at: float
    expires_at: float
    used_at: float | None = None


class TokenStore(Protocol):
    def add(self, record: TokenRecord) -> None: ...

    def get(self, token_hash: str) -> TokenRecord | None: ...

    def mark_used(self, token_hash: str, now: float) -> bool:
        """Set ``used_at`` if it is unset; False when another redeemer got there first."""
        ...

    def remove_expired(self, now: float) -> int: ...


def hash_token(secret: str) -> str:
    return hashlib.sha256(secret.encode("utf-8", "surrogatepass")).hexdigest()


class MemoryTokenStore:
    def __init__(self) -> None:
        self._records: dict[str, TokenRecord] = {}
        self._lock = threading.Lock()

    def add(self, record: TokenRecord) -> None:
        with self._lock:
            self._records[record.token_hash] = record

    def get(self, token_hash: str) -> TokenRecord | None:
        return self._records.get(token_hash)

    def mark_used(self, token_hash: str, now: float) -> bool:
        with self._lock:
            record = self._records.get(token_hash)
            if record is None or record.used_at is not None:
                return False
            self._records[token_hash] = replace(record, used_at=now)
            return True

    def remove_expired(self, now: float) -> int:
        with self._lock:
            expired = [h for h, r in self._records.items() if r.expires_at <= now]
            for token_hash in expired:
                del self._records[token_hash]
            return len(expired)


_SCHEMA = """
CREATE TABLE IF NOT EXISTS bootstrap_tokens (
    token_hash TEXT PRIMARY KEY,
    spiffe_id TEXT NOT NULL,
    purpose TEXT NOT NULL,
    issued_at REAL NOT NULL,
    expires_at REAL NOT NULL,
    used_at REAL
)
"""


class SqliteTokenStore:
    """One SQLite file; every call opens its own short transaction, so several
    processes (the CLI issuing, the CA service redeeming) can share it."""

    def __init__(self, path: Path, *, timeout: float = 5.0) -> None:
        self.path = path
        self._timeout = timeout
        with self._connect() as db:
            db.execute(_SCHEMA)

    def _connect(self) -> sqlite3.Connection:
        db = sqlite3.connect(self.path, timeout=self._timeout, isolation_level=None)
        db.execute("PRAGMA journal_mode=WAL")
        return db

    def add(self, record: TokenRecord) -> None:
        with self._connect() as db:
            db.execute(
                "INSERT INTO bootstrap_tokens VALUES (?, ?, ?, ?, ?, ?)",
                (record.token_hash, record.spiffe_id, record.purpose, record.issued_at, record.expires_at,
                 record.used_at),
            )

    def get(self, token_hash: str) -> TokenRecord | None:
        with self._connect() as db:
            row = db.execute(
                "SELECT token_hash, spiffe_id, purpose, issued_at, expires_at, used_at"
                " FROM bootstrap_tokens WHERE token_hash = ?",
                (token_hash,),
            ).fetchone()
        return None if row is None else TokenRecord(*row)

    def mark_used(self, token_hash: str, now: float) -> bool:
        with self._connect() as db:
            cursor = db.execute(
                "UPDATE bootstrap_tokens SET used_at = ? WHERE token_hash = ? AND used_at IS NULL",
                (now, token_hash),
            )
            return cursor.rowcount == 1

    def remove_expired(self, now: float) -> int:
        with self._connect() as db:
            return db.execute("DELETE FROM bootstrap_tokens WHERE expires_at <= ?", (now,)).rowcount


def _describe_time(timestamp: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(timestamp))


class BootstrapTokens:
    """Issues and redeems tokens over a ``TokenStore``."""

    def __init__(self, store: TokenStore, *, clock: Callable[[], float] = time.time) -> None:
        self.store = store
        self.clock = clock

    def issue(
        self, spiffe_id: SpiffeId, *, ttl: float = DEFAULT_TOKEN_TTL, purpose: str = CSR_PURPOSE
    ) -> str:
        """A new token for ``spiffe_id``; the returned secret is not stored anywhere."""
        if not 0 < ttl <= MAX_TOKEN_TTL:
            raise ValueError(f"token lifetime must be in (0, {MAX_TOKEN_TTL:g}] seconds (got {ttl:g})")
        random_part = base64.urlsafe_b64encode(secrets.token_bytes(_SECRET_BYTES)).decode().rstrip("=")
        secret = TOKEN_PREFIX + random_part
        now = self.clock()
        self.store.add(TokenRecord(hash_token(secret), str(spiffe_id), purpose, now, now + ttl))
        return secret

    def check(self, secret: str, *, purpose: str, spiffe_id: SpiffeId) -> TokenRecord:
        """The token's record if it may be redeemed for ``spiffe_id`` now; raises
        ``TokenRefused`` with the reason otherwise. Does not use the token up."""
        if not secret.startswith(TOKEN_PREFIX) or len(secret) > MAX_TOKEN_LENGTH:
            raise TokenRefused("bootstrap token is malformed (not a meshlet bootstrap token)")
        record = self.store.get(hash_token(secret))
        if record is None:
            raise TokenRefused("bootstrap token is not known to this CA (forged, mistyped or purged)")
        now = self.clock()
        if record.used_at is not None:
            raise TokenRefused(
                f"bootstrap token was already used at {_describe_time(record.used_at)}; tokens are single-use"
            )
        if now >= record.expires_at:
            raise TokenRefused(f"bootstrap token expired at {_describe_time(record.expires_at)}")
        if record.purpose != purpose:
            raise TokenRefused(f"bootstrap token is for {record.purpose!r}, not {purpose!r}")
        if record.spiffe_id != str(spiffe_id):
            raise TokenRefused(
                f"bootstrap token is bound to {record.spiffe_id}; the request asks for {spiffe_id}",
                wrong_identity=True,
            )
        return record

    def redeem(self, secret: str, *, purpose: str, spiffe_id: SpiffeId) -> TokenRecord:
        """``check``, then use the token up atomically."""
        record = self.check(secret, purpose=purpose, spiffe_id=spiffe_id)
        now = self.clock()
        if not self.store.mark_used(record.token_hash, now):
            raise TokenRefused("bootstrap token was already used; tokens are single-use")
        return replace(record, used_at=now)
