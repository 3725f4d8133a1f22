"""Certificates and site keys for a TLS-authenticated Flower deployment (``fedabus certs``).

One call makes everything a consortium needs to start a SuperLink with TLS and SuperNode authentication:

- a certificate authority (CA): ``ca.key`` and the self-signed ``ca.crt``;
- the SuperLink's TLS key and certificate (``superlink.key``, ``superlink.crt``), signed by the CA, whose
  subject alternative names (SANs) list every DNS name and IP address under which sites, the reverse proxy
  and the coordinator reach the SuperLink;
- ``consortium.pub``: every site's public key, one OpenSSH line each (comment ``fedabus-<name>``), copied into
  every site's folder: the keys a site checks its peers' signed secure-aggregation keys against
  (:mod:`shared.secagg_signing`, node config ``secagg-trusted-keys``);
- one ECDSA P-384 key pair per site in OpenSSH format, the format Flower 1.41 reads:
  ``flower-supernode --auth-supernode-private-key`` loads the private key with ``load_ssh_private_key`` (no
  passphrase) and ``flwr supernode register KEY.pub`` loads the public key with ``load_ssh_public_key``
  and accepts only NIST curves. P-384 is the curve Flower's own key helpers generate. A pair is equivalent
  to ``ssh-keygen -t ecdsa -b 384 -N "" -f KEY``.

Private keys are written with mode 0600 and never overwritten unless ``force=True``. A README.txt in the
output folder says which file goes where.
"""

from __future__ import annotations

import argparse
import datetime
import ipaddress
import re
import sys
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from shared.atomic import write_bytes_atomic
from shared.secagg_signing import CONSORTIUM_FILE, consortium_line

__all__ = [
    "DEFAULT_SERVER_NAMES",
    "CertPaths",
    "SiteKeyPaths",
    "make_certificates",
    "register",
]

#: SANs every SuperLink certificate needs: with ``--isolation subprocess`` the SuperLink's own SuperExec and
#: ServerApp connect to it over loopback with TLS, so these names must always be present.
DEFAULT_SERVER_NAMES: tuple[str, ...] = ("localhost", "127.0.0.1", "::1")

_SITE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,62}")
_DNS_LABEL = re.compile(r"(?!-)[A-Za-z0-9-]{1,63}(?<!-)")
_CURVE = ec.SECP384R1
_SIGNATURE_HASH = hashes.SHA384
_PRIVATE_MODE = 0o600
_PUBLIC_MODE = 0o644


@dataclass(frozen=True)
class SiteKeyPaths:
    """Where one site's authentication key pair and its copy of the CA certificate were written."""

    #: OpenSSH private key (mode 0600): stays at the site, ``--auth-supernode-private-key``.
    private_key: Path
    #: OpenSSH public key: goes to the coordinator, ``flwr supernode register PUBLIC_KEY``.
    public_key: Path
    #: Copy of the CA certificate: the site's ``--root-certificates``.
    ca_cert: Path
    #: Copy of ``consortium.pub``: the site's node config ``secagg-trusted-keys``.
    consortium: Path


@dataclass(frozen=True)
class CertPaths:
    """Every file :func:`make_certificates` wrote."""

    out_dir: Path
    ca_cert: Path
    ca_key: Path
    server_cert: Path
    server_key: Path
    sites: dict[str, SiteKeyPaths]
    readme: Path
    #: Every site's public key, one OpenSSH line each (``fedabus-<name>``).
    consortium: Path

    def all_files(self) -> list[Path]:
        """Every written path, private keys included."""
        site_files = [
            p for s in self.sites.values() for p in (s.private_key, s.public_key, s.ca_cert, s.consortium)
        ]
        return [
            self.ca_cert,
            self.ca_key,
            self.server_cert,
            self.server_key,
            *site_files,
            self.consortium,
            self.readme,
        ]


def make_certificates(
    out_dir: str | Path,
    *,
    sites: list[str],
    server_names: list[str] | tuple[str, ...] = DEFAULT_SERVER_NAMES,
    days: int = 365,
    force: bool = False,
) -> CertPaths:
    """Write a CA, a SuperLink TLS certificate and one authentication key pair per site into ``out_dir``.

    Args:
        out_dir: Output folder; created if missing.
        sites: Site names (letters, digits, ``.``, ``_``, ``-``; unique). Each gets ``sites/<name>/``.
        server_names: DNS names and IP addresses for the SuperLink certificate's SANs. Include the names
            that sites use (e.g. the reverse proxy's public name) and keep the loopback names, which the
            SuperLink's own ServerApp process uses.
        days: Validity of the CA and the SuperLink certificate, in days.
        force: Overwrite existing files instead of refusing.

    Raises:
        ValueError: a site name or server name is invalid or repeated, or ``days`` < 1.
        FileExistsError: an output file exists and ``force`` is false; the message lists the files.
    """
    site_names = _check_site_names(sites)
    san_entries = _subject_alternative_names(server_names)
    if days < 1:
        raise ValueError(f"days={days}: the certificate validity must be at least 1 day")
    paths = _plan_paths(Path(out_dir), site_names)
    existing = [str(p) for p in paths.all_files() if p.exists()]
    if existing and not force:
        raise FileExistsError(
            "refusing to overwrite existing certificate/key files (pass --force to replace them): "
            + ", ".join(existing)
        )
    now = datetime.datetime.now(datetime.UTC)
    ca_key = ec.generate_private_key(_CURVE())
    ca_cert = _build_ca_certificate(ca_key, now=now, days=days)
    server_key = ec.generate_private_key(_CURVE())
    server_cert = _build_server_certificate(server_key, ca_key, ca_cert, san_entries, now=now, days=days)
    ca_pem = ca_cert.public_bytes(serialization.Encoding.PEM)
    write_bytes_atomic(paths.ca_key, _pem_private_key(ca_key), mode=_PRIVATE_MODE)
    write_bytes_atomic(paths.ca_cert, ca_pem, mode=_PUBLIC_MODE)
    write_bytes_atomic(paths.server_key, _pem_private_key(server_key), mode=_PRIVATE_MODE)
    write_bytes_atomic(
        paths.server_cert, server_cert.public_bytes(serialization.Encoding.PEM), mode=_PUBLIC_MODE
    )
    lines = [_write_site_key_pair(name, site_paths, ca_pem) for name, site_paths in paths.sites.items()]
    consortium = "".join(lines).encode()
    for target in [paths.consortium, *(site.consortium for site in paths.sites.values())]:
        write_bytes_atomic(target, consortium, mode=_PUBLIC_MODE)
    write_bytes_atomic(paths.readme, _readme_text(paths, san_entries, days).encode(), mode=_PUBLIC_MODE)
    return paths


def _check_site_names(sites: list[str]) -> list[str]:
    if not sites:
        raise ValueError("sites: give at least one site name (e.g. --site site-a)")
    for name in sites:
        if not _SITE_NAME.fullmatch(name):
            raise ValueError(
                f"site name {name!r} is invalid: use 1-63 letters, digits, '.', '_' or '-', "
                "starting with a letter or digit"
            )
    duplicates = sorted({n for n in sites if sites.count(n) > 1})
    if duplicates:
        raise ValueError(f"site names must be unique; repeated: {', '.join(duplicates)}")
    return list(sites)


def _subject_alternative_names(server_names: list[str] | tuple[str, ...]) -> list[x509.GeneralName]:
    """Turn names into SAN entries: IP addresses become ``IPAddress``, the rest ``DNSName``."""
    if not server_names:
        raise ValueError("server_names: give at least one DNS name or IP address for the SuperLink")
    entries: list[x509.GeneralName] = []
    for name in dict.fromkeys(server_names):
        try:
            entries.append(x509.IPAddress(ipaddress.ip_address(name)))
            continue
        except ValueError:
            pass
        labels = name.rstrip(".").split(".")
        if len(name) > 253 or not all(_DNS_LABEL.fullmatch(label) for label in labels):
            raise ValueError(f"server name {name!r} is neither an IP address nor a valid DNS name")
        entries.append(x509.DNSName(name.rstrip(".").lower()))
    return entries


def _plan_paths(out_dir: Path, site_names: list[str]) -> CertPaths:
    sites = {
        name: SiteKeyPaths(
            private_key=out_dir / "sites" / name / f"{name}.key",
            public_key=out_dir / "sites" / name / f"{name}.pub",
            ca_cert=out_dir / "sites" / name / "ca.crt",
            consortium=out_dir / "sites" / name / CONSORTIUM_FILE,
        )
        for name in site_names
    }
    return CertPaths(
        out_dir=out_dir,
        ca_cert=out_dir / "ca.crt",
        ca_key=out_dir / "ca.key",
        server_cert=out_dir / "superlink.crt",
        server_key=out_dir / "superlink.key",
        sites=sites,
        readme=out_dir / "README.txt",
        consortium=out_dir / CONSORTIUM_FILE,
    )


def _name(common_name: str) -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "fedabus consortium"),
            x509.NameAttribute(NameOID.COMMON_NAME, common_name),
        ]
    )


def _key_usage(*, signs_certificates: bool) -> x509.KeyUsage:
    """Digital signatures, plus certificate and CRL signing for the CA (``signs_certificates``); nothing else."""
    return x509.KeyUsage(
        digital_signature=True,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=signs_certificates,
        crl_sign=signs_certificates,
        encipher_only=False,
        decipher_only=False,
    )


def _build_ca_certificate(
    key: ec.EllipticCurvePrivateKey, *, now: datetime.datetime, days: int
) -> x509.Certificate:
    """Self-signed CA certificate: may sign end-entity certificates only (path length 0)."""
    public_key = key.public_key()
    return (
        x509.CertificateBuilder()
        .subject_name(_name("fedabus consortium CA"))
        .issuer_name(_name("fedabus consortium CA"))
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(_key_usage(signs_certificates=True), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(public_key), critical=False)
        .sign(key, _SIGNATURE_HASH())
    )


def _build_server_certificate(
    key: ec.EllipticCurvePrivateKey,
    ca_key: ec.EllipticCurvePrivateKey,
    ca_cert: x509.Certificate,
    san_entries: list[x509.GeneralName],
    *,
    now: datetime.datetime,
    days: int,
) -> x509.Certificate:
    """TLS server certificate for the SuperLink (and the reverse proxy in front of it), signed by the CA."""
    dns_names = [e.value for e in san_entries if isinstance(e, x509.DNSName)]
    common_name = dns_names[0] if dns_names else "fedabus superlink"
    ca_ski = ca_cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    return (
        x509.CertificateBuilder()
        .subject_name(_name(common_name))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(_key_usage(signs_certificates=False), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.SubjectAlternativeName(san_entries), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski), critical=False)
        .sign(ca_key, _SIGNATURE_HASH())
    )


def _pem_private_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def _write_site_key_pair(name: str, paths: SiteKeyPaths, ca_pem: bytes) -> str:
    """One site's ECDSA P-384 key pair in OpenSSH format (Flower reads it unencrypted) and its CA copy; returns
    the site's line of ``consortium.pub``."""
    key = ec.generate_private_key(_CURVE())
    private_bytes = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption()
    )
    line = consortium_line(name, key.public_key())
    write_bytes_atomic(paths.private_key, private_bytes, mode=_PRIVATE_MODE)
    write_bytes_atomic(paths.public_key, line.encode(), mode=_PUBLIC_MODE)
    write_bytes_atomic(paths.ca_cert, ca_pem, mode=_PUBLIC_MODE)
    return line


def _readme_text(paths: CertPaths, san_entries: list[x509.GeneralName], days: int) -> str:
    sans = ", ".join(str(e.value) for e in san_entries)
    site_lines = "\n".join(
        f"  sites/{name}/          -> give this whole folder to {name} (keep {name}.key secret there)"
        for name in paths.sites
    )
    return _README_TEMPLATE.format(sans=sans, days=days, site_lines=site_lines)


_README_TEMPLATE = """\
fedabus deployment credentials (made by `fedabus certs`; valid {days} days)

Which file goes where
  ca.key            -> NOWHERE: keep offline. It can sign certificates everyone here trusts.
  ca.crt            -> everyone: SuperLink --ssl-ca-certfile, the coordinator's root-certificates in
                       $FLWR_HOME/config.toml, the reverse proxy's upstream CA, each site's --root-certificates.
  superlink.crt     -> SuperLink --ssl-certfile (and the reverse proxy's server certificate).
  superlink.key     -> SuperLink --ssl-keyfile (and the reverse proxy's key). Secret, mode 0600.
                       Certificate names (SANs): {sans}
{site_lines}
  sites/<site>/<site>.key -> that site only: flower-supernode --auth-supernode-private-key. Secret, 0600.
  sites/<site>/<site>.pub -> the coordinator: flwr supernode register sites/<site>/<site>.pub <connection>
  sites/<site>/ca.crt     -> that site: flower-supernode --root-certificates.
  consortium.pub          -> every site (a copy is in each sites/<site>/): every site's public key, which the
                             site's node config secagg-trusted-keys names; with secagg-signing-key (its own
                             <site>.key) it signs and verifies the secure-aggregation round keys.

Sites connect only to a name listed in the SANs above. docs/deployment.md has the full commands.
"""


# ----------------------------------------------------------------------------------------------- CLI


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add ``fedabus certs``."""
    parser = subparsers.add_parser(
        "certs",
        help="make a CA, the SuperLink TLS certificate and one authentication key per site",
        description=(
            "Write a certificate authority, a SuperLink TLS certificate signed by it and one ECDSA P-384 "
            "key pair per site (OpenSSH format, as flower-supernode --auth-supernode-private-key and "
            "flwr supernode register expect). README.txt in the output says which file goes where."
        ),
        allow_abbrev=False,
    )
    parser.add_argument("--out", required=True, type=Path, help="output folder")
    parser.add_argument(
        "--site", action="append", required=True, dest="sites", metavar="NAME", help="a site (repeat)"
    )
    parser.add_argument(
        "--server-name",
        action="append",
        default=[],
        dest="server_names",
        metavar="NAME",
        help=(
            "DNS name or IP address under which the SuperLink or its reverse proxy is reached (repeat); "
            f"added to {', '.join(DEFAULT_SERVER_NAMES)}"
        ),
    )
    parser.add_argument("--days", type=int, default=365, help="certificate validity in days (default 365)")
    parser.add_argument("--force", action="store_true", help="overwrite existing files")
    parser.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    server_names = [*DEFAULT_SERVER_NAMES, *args.server_names]
    try:
        paths = make_certificates(
            args.out, sites=args.sites, server_names=server_names, days=args.days, force=args.force
        )
    except FileExistsError as error:
        print(f"fedabus certs: {error}", file=sys.stderr)
        return 1
    except ValueError as error:
        print(f"fedabus certs: {error}", file=sys.stderr)
        return 2
    print(f"Wrote CA, SuperLink certificate and keys for {len(paths.sites)} site(s) to {paths.out_dir}")
    print(f"Read {paths.readme} for which file goes where.")
    return 0
