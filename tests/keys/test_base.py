"""The provider interface: settings errors name their field, the in-flight
bound, stats, and registration with the config compiler."""

from __future__ import annotations

import asyncio

import pytest
from cryptography.hazmat.primitives.asymmetric import ec

import meshlet.keys
from meshlet.config.model import PrivateKeyProviderConfig
from meshlet.errors import ConfigError
from meshlet.keys.base import InFlightLimit, KeyProviderError, KeyProviderUnavailable, Settings
from meshlet.keys.local import LocalKeyProvider
from meshlet.registry import registry
from meshlet.tls.crypto import SignatureScheme


def test_every_provider_is_registered_on_import() -> None:
    names = set(registry.names(meshlet.keys.CATEGORY))
    assert {
        "meshlet.local",
        "meshlet.offload",
        "meshlet.batch",
        "meshlet.keyserver",
        "meshlet.pkcs11",
    } <= names


@pytest.mark.parametrize(
    ("values", "call", "path", "words"),
    [
        ({}, lambda s: s.string("socket"), "private_key_provider.typed_config.socket", "required"),
        ({"workers": "4"}, lambda s: s.integer("workers", 1, minimum=1, maximum=8), ".workers", "integer"),
        ({"workers": 2.5}, lambda s: s.integer("workers", 1, minimum=1, maximum=8), ".workers", "integer"),
        ({"workers": 99.0}, lambda s: s.integer("workers", 1, minimum=1, maximum=8), ".workers", "[1, 8]"),
        ({"mode": "fiber"}, lambda s: s.choice("mode", ("thread", "process"), "thread"), ".mode", "one of"),
        ({"typo": 1}, lambda s: s.only("mode"), ".typo", "unknown"),
        ({"private_key": "x"}, lambda s: s.struct("private_key"), ".private_key", "struct"),
    ],
)
def test_settings_errors_name_the_field(
    values: dict[str, object], call: object, path: str, words: str
) -> None:
    settings = Settings(values, "meshlet.test")
    assert callable(call)
    with pytest.raises(ConfigError) as info:
        call(settings)
    assert info.value.path.endswith(path)
    assert words in info.value.message


def test_settings_accept_typed_struct_numbers() -> None:
    # TypedStruct numbers arrive as floats.
    settings = Settings({"workers": 4.0, "timeout": 2}, "meshlet.test")
    assert settings.integer("workers", 1, minimum=1, maximum=8) == 4
    assert settings.number("timeout", 1.0, minimum=0.1, maximum=5) == 2.0


def test_local_provider_settings_errors() -> None:
    factory = registry.lookup("key_provider", name="meshlet.local").factory
    with pytest.raises(ConfigError, match=r"typed_config.private_key: is required"):
        factory(PrivateKeyProviderConfig("meshlet.local", {}))
    with pytest.raises(ConfigError, match=r"private_key.filename: cannot read"):
        factory(
            PrivateKeyProviderConfig("meshlet.local", {"private_key": {"filename": "/nonexistent/k.pem"}})
        )
    with pytest.raises(ConfigError, match=r"private_key.inline_string: not a valid PEM private key"):
        factory(PrivateKeyProviderConfig("meshlet.local", {"private_key": {"inline_string": "nope"}}))


async def test_in_flight_limit_waits_then_times_out() -> None:
    limit = InFlightLimit(2, timeout=0.2)
    await limit.acquire()
    await limit.acquire()
    waiter = asyncio.ensure_future(limit.acquire())
    await asyncio.sleep(0.01)
    assert not waiter.done()
    limit.release()  # handed straight to the waiter
    await asyncio.wait_for(waiter, 1)
    assert limit.active == 2
    with pytest.raises(KeyProviderUnavailable, match="2 operations already in flight"):
        await limit.acquire()
    limit.release()
    limit.release()
    assert limit.active == 0


async def test_stats_count_ops_errors_and_latency() -> None:
    provider = LocalKeyProvider(ec.generate_private_key(ec.SECP256R1()))
    for _ in range(3):
        await provider.sign(SignatureScheme.ecdsa_secp256r1_sha256, b"data")
    with pytest.raises(KeyProviderError, match="cannot sign with scheme 0x0804"):
        await provider.sign(SignatureScheme.rsa_pss_rsae_sha256, b"data")
    stats = provider.stats()
    assert stats["provider"] == "meshlet.local"
    assert stats["ops"] == 3
    assert stats["errors"] == 1
    assert stats["in_flight"] == 0
    assert sum(stats["latency_ms"].values()) == 3
    assert stats["latency_ms_sum"] > 0
