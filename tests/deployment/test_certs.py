"""``fedabus certs``: the CA chain, SANs, key usages, Flower-compatible site keys, permissions, CLI."""

from __future__ import annotations

import argparse
import ipaddress
import ssl
import stat
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID

from shared.certs import DEFAULT_SERVER_NAMES, CertPaths, make_certificates, register

SITES = ["site-a", "site-b"]
SERVER_NAMES = [*DEFAULT_SERVER_NAMES, "superlink", "fleet-proxy", "10.1.2.3"]


@pytest.fixture(scope="module")
def made(tmp_path_factory: pytest.TempPathFactory) -> CertPaths:
    return make_certificates(
        tmp_path_factory.mktemp("creds"), sites=SITES, server_names=SERVER_NAMES, days=30
    )


def _cert(path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


def test_server_certificate_is_signed_by_the_ca(made: CertPaths) -> None:
    ca, server = _cert(made.ca_cert), _cert(made.server_cert)
    server.verify_directly_issued_by(ca)
    ca.verify_directly_issued_by(ca)
    assert server.issuer == ca.subject


def test_server_certificate_names_every_server_name(made: CertPaths) -> None:
    san = _cert(made.server_cert).extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert set(san.get_values_for_type(x509.DNSName)) == {"localhost", "superlink", "fleet-proxy"}
    assert set(san.get_values_for_type(x509.IPAddress)) == {
        ipaddress.ip_address("127.0.0.1"),
        ipaddress.ip_address("::1"),
        ipaddress.ip_address("10.1.2.3"),
    }


def test_key_usages_and_basic_constraints(made: CertPaths) -> None:
    ca, server = _cert(made.ca_cert), _cert(made.server_cert)
    ca_constraints = ca.extensions.get_extension_for_class(x509.BasicConstraints)
    assert ca_constraints.critical and ca_constraints.value.ca and ca_constraints.value.path_length == 0
    ca_usage = ca.extensions.get_extension_for_class(x509.KeyUsage).value
    assert ca_usage.key_cert_sign and ca_usage.crl_sign
    assert not server.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    server_usage = server.extensions.get_extension_for_class(x509.KeyUsage).value
    assert server_usage.digital_signature and not server_usage.key_cert_sign
    eku = server.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(eku) == [ExtendedKeyUsageOID.SERVER_AUTH]
    lifetime = server.not_valid_after_utc - server.not_valid_before_utc
    assert 30 <= lifetime.days <= 31


def test_server_key_matches_certificate(made: CertPaths) -> None:
    key = serialization.load_pem_private_key(made.server_key.read_bytes(), password=None)
    assert key.public_key() == _cert(made.server_cert).public_key()


@pytest.mark.parametrize("hostname", ["localhost", "superlink", "fleet-proxy", "127.0.0.1"])
def test_tls_handshake_verifies_against_the_ca(made: CertPaths, hostname: str) -> None:
    """A real OpenSSL handshake in memory: a client trusting only ca.crt accepts the SuperLink's cert."""
    _handshake(made, hostname)


def test_tls_handshake_rejects_a_name_not_in_the_certificate(made: CertPaths) -> None:
    with pytest.raises(ssl.SSLCertVerificationError):
        _handshake(made, "evil.example.org")


def _handshake(made: CertPaths, hostname: str) -> None:
    server_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_ctx.load_cert_chain(made.server_cert, made.server_key)
    client_ctx = ssl.create_default_context(cafile=str(made.ca_cert))
    c_in, c_out, s_in, s_out = ssl.MemoryBIO(), ssl.MemoryBIO(), ssl.MemoryBIO(), ssl.MemoryBIO()
    client = client_ctx.wrap_bio(c_in, c_out, server_hostname=hostname)
    server = server_ctx.wrap_bio(s_in, s_out, server_side=True)
    done = {"client": False, "server": False}
    for _ in range(20):
        for name, end in (("client", client), ("server", server)):
            if done[name]:
                continue
            try:
                end.do_handshake()
                done[name] = True
            except ssl.SSLWantReadError:
                pass
        s_in.write(c_out.read())
        c_in.write(s_out.read())
        if all(done.values()):
            return
    raise AssertionError("TLS handshake did not finish")


@pytest.mark.parametrize("site", SITES)
def test_site_keys_are_p384_openssh_pairs(made: CertPaths, site: str) -> None:
    paths = made.sites[site]
    private = serialization.load_ssh_private_key(paths.private_key.read_bytes(), password=None)
    public = serialization.load_ssh_public_key(paths.public_key.read_bytes())
    assert isinstance(private, ec.EllipticCurvePrivateKey)
    assert isinstance(private.curve, ec.SECP384R1)
    assert public == private.public_key()
    assert paths.ca_cert.read_bytes() == made.ca_cert.read_bytes()


def test_site_keys_load_with_flowers_own_loaders(made: CertPaths) -> None:
    """The functions behind `flwr supernode register KEY.pub` and `--auth-supernode-private-key`."""
    from flwr.cli.supernode.register import try_load_public_key
    from flwr.supercore.primitives.asymmetric import (
        bytes_to_public_key,
        sign_message,
        uses_nist_ec_curve,
        verify_signature,
    )
    from flwr.supernode.cli.flower_supernode import _try_setup_client_authentication

    paths = made.sites["site-a"]
    registered = bytes_to_public_key(try_load_public_key(paths.public_key))
    assert uses_nist_ec_curve(registered)
    args = argparse.Namespace(
        auth_supernode_private_key=str(paths.private_key), auth_supernode_public_key=None
    )
    keys = _try_setup_client_authentication(args)
    assert keys is not None
    private, public = keys
    assert public == registered
    assert verify_signature(registered, b"2026-01-01T00:00:00", sign_message(private, b"2026-01-01T00:00:00"))


def test_site_keys_differ(made: CertPaths) -> None:
    keys = {made.sites[s].public_key.read_text(encoding="utf-8").split()[1] for s in SITES}
    assert len(keys) == len(SITES)


def test_private_keys_are_owner_only(made: CertPaths) -> None:
    private = [made.ca_key, made.server_key, *(made.sites[s].private_key for s in SITES)]
    for path in private:
        assert stat.S_IMODE(path.stat().st_mode) == 0o600, path
    for path in (made.ca_cert, made.server_cert, made.sites["site-a"].public_key):
        assert stat.S_IMODE(path.stat().st_mode) == 0o644, path


def test_readme_says_where_each_file_goes(made: CertPaths) -> None:
    text = made.readme.read_text(encoding="utf-8")
    for needle in ("ca.key", "--ssl-certfile", "--ssl-keyfile", "--auth-supernode-private-key", "register"):
        assert needle in text
    assert "fleet-proxy" in text and "site-b" in text


def test_refuses_to_overwrite_and_force_replaces(tmp_path: Path) -> None:
    first = make_certificates(tmp_path, sites=["site-a"])
    before = first.sites["site-a"].private_key.read_bytes()
    with pytest.raises(FileExistsError, match="site-a.key"):
        make_certificates(tmp_path, sites=["site-a"])
    assert first.sites["site-a"].private_key.read_bytes() == before
    second = make_certificates(tmp_path, sites=["site-a"], force=True)
    assert second.sites["site-a"].private_key.read_bytes() != before
    assert stat.S_IMODE(second.sites["site-a"].private_key.stat().st_mode) == 0o600
    assert not [p for p in tmp_path.rglob("*.tmp")]


def test_refuses_when_only_one_key_exists(tmp_path: Path) -> None:
    (tmp_path / "superlink.key").write_text("not mine")
    with pytest.raises(FileExistsError, match="superlink.key"):
        make_certificates(tmp_path, sites=["site-a"])
    assert (tmp_path / "superlink.key").read_text(encoding="utf-8") == "not mine"
    assert not (tmp_path / "ca.key").exists()


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"sites": []}, "at least one site"),
        ({"sites": ["../evil"]}, "site name '../evil'"),
        ({"sites": ["a", "a"]}, "repeated: a"),
        ({"sites": ["a"], "server_names": ["bad name"]}, "server name 'bad name'"),
        ({"sites": ["a"], "server_names": []}, "at least one DNS name"),
        ({"sites": ["a"], "days": 0}, "days=0"),
    ],
)
def test_invalid_input_names_the_value(tmp_path: Path, kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        make_certificates(tmp_path, **kwargs)
    assert not list(tmp_path.iterdir())


def _cli(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(allow_abbrev=False)
    register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(argv)
    return args.func(args)


def test_cli_exit_codes(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "creds"
    argv = [
        "certs",
        "--out",
        str(out),
        "--site",
        "site-a",
        "--site",
        "site-b",
        "--server-name",
        "fl.example.org",
    ]
    assert _cli(argv) == 0
    san = _cert(out / "superlink.crt").extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert set(san.get_values_for_type(x509.DNSName)) == {"localhost", "fl.example.org"}
    assert (out / "sites" / "site-b" / "site-b.pub").is_file()
    assert _cli(argv) == 1
    assert "--force" in capsys.readouterr().err
    assert _cli([*argv, "--force"]) == 0
    assert _cli(["certs", "--out", str(tmp_path / "x"), "--site", "bad/name"]) == 2
    assert "bad/name" in capsys.readouterr().err
    with pytest.raises(SystemExit) as missing_site:
        _cli(["certs", "--out", str(tmp_path / "y")])
    assert missing_site.value.code == 2
