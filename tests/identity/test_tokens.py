"""Bootstrap tokens: hashed at rest, single-use, expiring, bound to one
identity and one purpose — in memory and in SQLite."""

from __future__ import annotations

import sqlite3
import threading
from collections.abc import Callable
from pathlib import Path

import pytest

from meshlet.identity.spiffe import SpiffeId
from meshlet.identity.tokens import (
    CSR_PURPOSE,
    BootstrapTokens,
    MemoryTokenStore,
    SqliteTokenStore,
    TokenRefused,
    TokenStore,
    hash_token,
)

CART = SpiffeId.for_workload("example.org", "shop", "cart")
PAYMENTS = SpiffeId.for_workload("example.org", "shop", "payments")


class Clock:
    def __init__(self) -> None:
        self.now = 1_800_000_000.0

    def __call__(self) -> float:
        return self.now


StoreMaker = Callable[[Path], TokenStore]
STORES: dict[str, StoreMaker] = {
    "memory": lambda tmp: MemoryTokenStore(),
    "sqlite": lambda tmp: SqliteTokenStore(tmp / "tokens.db"),
}


@pytest.fixture(params=sorted(STORES))
def store(request: pytest.FixtureRequest, tmp_path: Path) -> TokenStore:
    return STORES[request.param](tmp_path)


def test_a_token_is_redeemed_once_for_its_identity(store: TokenStore) -> None:
    tokens = BootstrapTokens(store, clock=Clock())
    secret = tokens.issue(CART)
    record = tokens.redeem(secret, purpose=CSR_PURPOSE, spiffe_id=CART)
    assert record.spiffe_id == str(CART) and record.used_at is not None
    with pytest.raises(TokenRefused, match="already used"):
        tokens.redeem(secret, purpose=CSR_PURPOSE, spiffe_id=CART)


def test_refusals_say_why(store: TokenStore) -> None:
    clock = Clock()
    tokens = BootstrapTokens(store, clock=clock)
    with pytest.raises(TokenRefused, match="not known to this CA"):
        tokens.redeem("mlt1." + "A" * 43, purpose=CSR_PURPOSE, spiffe_id=CART)
    with pytest.raises(TokenRefused, match="malformed"):
        tokens.redeem("hunter2", purpose=CSR_PURPOSE, spiffe_id=CART)

    secret = tokens.issue(CART)
    with pytest.raises(TokenRefused, match=r"bound to spiffe://example\.org/ns/shop/sa/cart") as refused:
        tokens.redeem(secret, purpose=CSR_PURPOSE, spiffe_id=PAYMENTS)
    assert refused.value.wrong_identity
    with pytest.raises(TokenRefused, match="is for 'csr', not 'join'"):
        tokens.redeem(secret, purpose="join", spiffe_id=CART)
    # Refused attempts do not use the token up.
    tokens.redeem(secret, purpose=CSR_PURPOSE, spiffe_id=CART)

    short = tokens.issue(CART, ttl=60)
    clock.now += 61
    with pytest.raises(TokenRefused, match="expired at"):
        tokens.redeem(short, purpose=CSR_PURPOSE, spiffe_id=CART)


def test_only_the_hash_is_stored(tmp_path: Path) -> None:
    tokens = BootstrapTokens(SqliteTokenStore(tmp_path / "tokens.db"))
    secret = tokens.issue(CART)
    raw = (tmp_path / "tokens.db").read_bytes() + b"".join(
        p.read_bytes() for p in tmp_path.glob("tokens.db-*")
    )
    assert secret.encode() not in raw
    db = sqlite3.connect(tmp_path / "tokens.db")
    rows = db.execute("SELECT token_hash FROM bootstrap_tokens").fetchall()
    db.close()
    assert rows == [(hash_token(secret),)]


def test_sqlite_store_is_shared_between_instances(tmp_path: Path) -> None:
    issuer = BootstrapTokens(SqliteTokenStore(tmp_path / "tokens.db"))
    secret = issuer.issue(CART)
    first = BootstrapTokens(SqliteTokenStore(tmp_path / "tokens.db"))
    second = BootstrapTokens(SqliteTokenStore(tmp_path / "tokens.db"))
    first.redeem(secret, purpose=CSR_PURPOSE, spiffe_id=CART)
    with pytest.raises(TokenRefused, match="already used"):
        second.redeem(secret, purpose=CSR_PURPOSE, spiffe_id=CART)


def test_racing_redeemers_one_wins(store: TokenStore) -> None:
    tokens = BootstrapTokens(store)
    secret = tokens.issue(CART)
    outcomes: list[str] = []
    barrier = threading.Barrier(8)

    def redeem() -> None:
        barrier.wait(timeout=5)
        try:
            tokens.redeem(secret, purpose=CSR_PURPOSE, spiffe_id=CART)
            outcomes.append("ok")
        except TokenRefused:
            outcomes.append("refused")

    threads = [threading.Thread(target=redeem) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=10)
    assert sorted(outcomes) == ["ok"] + ["refused"] * 7


def test_expired_tokens_are_purged(store: TokenStore) -> None:
    clock = Clock()
    tokens = BootstrapTokens(store, clock=clock)
    tokens.issue(CART, ttl=10)
    keep = tokens.issue(PAYMENTS, ttl=1000)
    clock.now += 11
    assert store.remove_expired(clock.now) == 1
    tokens.redeem(keep, purpose=CSR_PURPOSE, spiffe_id=PAYMENTS)


def test_lifetime_is_bounded() -> None:
    tokens = BootstrapTokens(MemoryTokenStore())
    with pytest.raises(ValueError, match="token lifetime"):
        tokens.issue(CART, ttl=0)
