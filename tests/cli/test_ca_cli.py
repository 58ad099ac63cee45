"""``meshlet ca``: init (root, plug-in intermediate, key in a key server),
issue, token, inspect, rotate-root — as a user runs them, checked with openssl."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "identity"))

from ca_helpers import key_server, meshlet, openssl_verify

TD = "example.org"
CART = "spiffe://example.org/ns/shop/sa/cart"


def ok(*args: str) -> str:
    result = meshlet(*args)
    assert result.returncode == 0, result.stderr
    return result.stdout


def refused(*args: str) -> str:
    result = meshlet(*args)
    assert result.returncode == 2, (result.returncode, result.stdout, result.stderr)
    assert result.stderr.startswith("meshlet: error: ")
    assert "Traceback" not in result.stderr
    return result.stderr


@pytest.mark.parametrize("key_type", ["p256", "rsa2048"])
def test_init_issue_inspect(tmp_path: Path, key_type: str) -> None:
    ca = tmp_path / "ca"
    ok("ca", "init", "--dir", str(ca), "--trust-domain", TD, "--key-type", key_type)
    root = x509.load_pem_x509_certificate((ca / "root-cert.pem").read_bytes())
    assert root.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    assert (ca / "ca-key.pem").stat().st_mode & 0o077 == 0

    ok("ca", "issue", "--dir", str(ca), "--spiffe-id", CART, "--out-cert", str(tmp_path / "cart.pem"),
       "--out-key", str(tmp_path / "cart.key"), "--ttl", "2h")
    assert (tmp_path / "cart.key").stat().st_mode & 0o077 == 0
    verified = openssl_verify(ca / "root-cert.pem", tmp_path / "cart.pem")
    assert verified.returncode == 0, verified.stderr

    shown = ok("ca", "inspect", str(tmp_path / "cart.pem"))
    assert f"SPIFFE ID: {CART}" in shown
    assert "(2.0 h left)" in shown or "(1.9 h left)" in shown
    assert f"issuer: {root.subject.rfc4514_string()}" in shown


def test_intermediate_under_a_root_the_user_brings(tmp_path: Path) -> None:
    # The user's root, made with openssl, not with meshlet.
    root_key, root_cert = tmp_path / "root.key", tmp_path / "root.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256",
                    "-nodes", "-keyout", str(root_key), "-out", str(root_cert), "-days", "30",
                    "-subj", "/O=Example/CN=Example Root", "-addext", "basicConstraints=critical,CA:TRUE",
                    "-addext", "keyUsage=critical,keyCertSign,cRLSign"],
                   check=True, capture_output=True, timeout=20)
    ca = tmp_path / "ca"
    ok("ca", "init", "--dir", str(ca), "--trust-domain", TD, "--parent-cert", str(root_cert),
       "--parent-key", str(root_key))
    assert (ca / "root-cert.pem").read_bytes().strip() == root_cert.read_bytes().strip()
    ok("ca", "issue", "--dir", str(ca), "--spiffe-id", CART, "--out-cert", str(tmp_path / "chain.pem"),
       "--out-key", str(tmp_path / "cart.key"))
    chain = x509.load_pem_x509_certificates((tmp_path / "chain.pem").read_bytes())
    assert len(chain) == 2  # leaf and intermediate, the root stays out
    (tmp_path / "leaf.pem").write_bytes(chain[0].public_bytes(Encoding.PEM))
    verified = openssl_verify(root_cert, tmp_path / "leaf.pem", untrusted=ca / "cert-chain.pem")
    assert verified.returncode == 0, verified.stderr
    shown = ok("ca", "inspect", str(tmp_path / "chain.pem"))
    assert "CA: CN=meshlet intermediate CA" in shown
    assert "issuer: CN=Example Root,O=Example" in shown
    assert "rotate that root where it is kept" in refused("ca", "rotate-root", "--dir", str(ca))


def test_ca_key_generated_in_a_key_server(tmp_path: Path) -> None:
    with key_server(tmp_path) as socket_path:
        ca = tmp_path / "ca"
        ok("ca", "init", "--dir", str(ca), "--trust-domain", TD, "--key-provider", "keyserver",
           "--keyserver-socket", str(socket_path))
        assert not (ca / "ca-key.pem").exists()
        settings = json.loads((ca / "ca.json").read_text())
        assert settings["key_provider"]["name"] == "meshlet.keyserver"
        ok("ca", "issue", "--dir", str(ca), "--spiffe-id", CART, "--out-cert", str(tmp_path / "cart.pem"),
           "--out-key", str(tmp_path / "cart.key"))
        verified = openssl_verify(ca / "root-cert.pem", tmp_path / "cart.pem")
        assert verified.returncode == 0, verified.stderr
        # Rotating the root makes the new key in the same key server.
        ok("ca", "rotate-root", "--dir", str(ca))
        ok("ca", "rotate-root", "--dir", str(ca), "--activate")
        handle = json.loads((ca / "ca.json").read_text())["key_provider"]["settings"]["handle"]
        assert handle != settings["key_provider"]["settings"]["handle"]
    assert "cannot" in refused("ca", "issue", "--dir", str(ca), "--spiffe-id", CART,
                               "--out-cert", str(tmp_path / "x.pem"), "--out-key", str(tmp_path / "x.key"))


def test_rotate_root(tmp_path: Path) -> None:
    ca = tmp_path / "ca"
    ok("ca", "init", "--dir", str(ca), "--trust-domain", TD)
    old_root = (ca / "root-cert.pem").read_bytes()
    ok("ca", "issue", "--dir", str(ca), "--spiffe-id", CART, "--out-cert", str(tmp_path / "old.pem"),
       "--out-key", str(tmp_path / "old.key"))
    assert "the bundle holds 2 roots" in ok("ca", "rotate-root", "--dir", str(ca))
    assert (ca / "root-cert.pem").read_bytes() == old_root  # staged: the old root still signs
    assert "signs from now on" in ok("ca", "rotate-root", "--dir", str(ca), "--activate")
    assert (ca / "root-cert.pem").read_bytes() != old_root
    ok("ca", "issue", "--dir", str(ca), "--spiffe-id", CART, "--out-cert", str(tmp_path / "new.pem"),
       "--out-key", str(tmp_path / "new.key"))
    for svid in ("old.pem", "new.pem"):  # both verify against the overlapping bundle
        assert openssl_verify(ca / "bundle.pem", tmp_path / svid).returncode == 0
    assert "dropped 1 old root" in ok("ca", "rotate-root", "--dir", str(ca), "--finish")
    assert openssl_verify(ca / "bundle.pem", tmp_path / "new.pem").returncode == 0
    assert openssl_verify(ca / "bundle.pem", tmp_path / "old.pem").returncode != 0


def test_token_is_printed_once_and_bound(tmp_path: Path) -> None:
    ca = tmp_path / "ca"
    ok("ca", "init", "--dir", str(ca), "--trust-domain", TD)
    secret = ok("ca", "token", "--dir", str(ca), "--spiffe-id", CART, "--ttl", "10m").strip()
    assert secret.startswith("mlt1.") and len(secret) > 40
    assert secret.encode() not in (ca / "tokens.db").read_bytes()
    assert "not in this CA's trust domain" in refused(
        "ca", "token", "--dir", str(ca), "--spiffe-id", "spiffe://other.org/ns/a/sa/b")


def test_mistakes_are_one_clear_line(tmp_path: Path) -> None:
    ca = tmp_path / "ca"
    bad_domain = refused("ca", "init", "--dir", str(ca), "--trust-domain", "Bad.ORG")
    assert "trust domain may only contain" in bad_domain
    ok("ca", "init", "--dir", str(ca), "--trust-domain", TD)
    assert "already holds a CA" in refused("ca", "init", "--dir", str(ca), "--trust-domain", TD)
    assert "a SPIFFE ID starts with 'spiffe://'" in refused(
        "ca", "issue", "--dir", str(ca), "--spiffe-id", "cart", "--out-cert", "x", "--out-key", "y")
    assert "not in trust domain" in refused(
        "ca", "issue", "--dir", str(ca), "--spiffe-id", "spiffe://other.org/ns/a/sa/b",
        "--out-cert", str(tmp_path / "x"), "--out-key", str(tmp_path / "y"))
    assert "not a duration" in refused(
        "ca", "issue", "--dir", str(ca), "--spiffe-id", CART, "--out-cert", "x", "--out-key", "y",
        "--ttl", "soon")
    assert "is not a CA directory" in refused("ca", "rotate-root", "--dir", str(tmp_path / "nothing"))
    assert "--keyserver-socket" in refused("ca", "init", "--dir", str(tmp_path / "ks"), "--trust-domain", TD,
                                           "--key-provider", "keyserver")


def test_federate_with_another_trust_domain(tmp_path: Path) -> None:
    ours, theirs = tmp_path / "ours", tmp_path / "theirs"
    ok("ca", "init", "--dir", str(ours), "--trust-domain", TD)
    ok("ca", "init", "--dir", str(theirs), "--trust-domain", "partner.org")
    assert "federated with partner.org (1 root(s))" in ok(
        "ca", "federate", "--dir", str(ours), "--trust-domain", "partner.org",
        "--bundle", str(theirs / "bundle.pem"))
    stored = (ours / "federation" / "partner.org.pem").read_bytes()
    assert stored == (theirs / "bundle.pem").read_bytes()
    assert "own trust domain" in refused("ca", "federate", "--dir", str(ours), "--trust-domain", TD,
                                         "--bundle", str(theirs / "bundle.pem"))
    assert "not a JWK Set" in refused("ca", "federate", "--dir", str(ours), "--trust-domain", "x.org",
                                      "--bundle", str(ours / "ca.json"))
    assert "no longer federated" in ok("ca", "federate", "--dir", str(ours), "--trust-domain", "partner.org",
                                       "--remove")
    assert not (ours / "federation" / "partner.org.pem").exists()


GENERATE_IN_TOKEN = """
import sys, pkcs11
from pkcs11 import Attribute, KeyType
from pkcs11.util.ec import encode_named_curve_parameters
lib = pkcs11.lib(sys.argv[1])
with lib.get_token(token_label=sys.argv[2]).open(user_pin=sys.argv[3], rw=True) as session:
    params = session.create_domain_parameters(
        KeyType.EC, {Attribute.EC_PARAMS: encode_named_curve_parameters("secp256r1")}, local=True)
    params.generate_keypair(store=True, label=sys.argv[4])
"""


def test_ca_key_generated_inside_a_pkcs11_token(tmp_path: Path) -> None:
    pytest.importorskip("pkcs11", reason="python-pkcs11 is not installed")
    module = "/usr/lib/softhsm/libsofthsm2.so"
    if shutil.which("softhsm2-util") is None or not os.path.exists(module):
        pytest.skip("SoftHSM2 is not installed")
    (tmp_path / "tokens").mkdir()
    conf = tmp_path / "softhsm2.conf"
    conf.write_text(f"directories.tokendir = {tmp_path / 'tokens'}\nobjectstore.backend = file\n")
    env = {**os.environ, "SOFTHSM2_CONF": str(conf)}

    def run(*argv: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(argv, capture_output=True, text=True, timeout=60, check=False, env=env)

    made = run("softhsm2-util", "--init-token", "--free", "--label", "ca", "--pin", "1234",
               "--so-pin", "5678")
    assert made.returncode == 0, made.stderr
    generated = run(sys.executable, "-c", GENERATE_IN_TOKEN, module, "ca", "1234", "root-key")
    assert generated.returncode == 0, generated.stderr
    provider = tmp_path / "p11.json"
    provider.write_text(json.dumps({"name": "meshlet.pkcs11", "settings": {
        "module": module, "token_label": "ca", "pin": "1234", "key_label": "root-key"}}))

    ca = tmp_path / "ca"
    meshlet_cli = [sys.executable, "-m", "meshlet.cli.main", "ca"]
    init = run(*meshlet_cli, "init", "--dir", str(ca), "--trust-domain", TD,
               "--key-provider-config", str(provider))
    assert init.returncode == 0, init.stderr
    assert not (ca / "ca-key.pem").exists()
    issued = run(*meshlet_cli, "issue", "--dir", str(ca), "--spiffe-id", CART, "--out-cert",
                 str(tmp_path / "cart.pem"), "--out-key", str(tmp_path / "cart.key"))
    assert issued.returncode == 0, issued.stderr
    verified = openssl_verify(ca / "root-cert.pem", tmp_path / "cart.pem")
    assert verified.returncode == 0, verified.stderr
