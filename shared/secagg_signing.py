"""Signed secure-aggregation keys: a site vouches for its round keys with its authentication key, so a server that
relays them cannot substitute its own (the man-in-the-middle that would let it read the Shamir shares and unmask one
site's update).

Every site already holds an ECDSA P-384 authentication key pair from ``fedabus certs`` (``sites/<name>/<name>.key``,
the SuperNode's ``--auth-supernode-private-key``), and the consortium file ``consortium.pub`` lists every site's
public key, one OpenSSH line each with the comment ``fedabus-<name>``. The site names both in its node config:

* ``secagg-signing-key``: its own private key; step 1 of a round (:func:`client.secure_aggregation.answer_keys`)
  signs :func:`key_statement` (run, round, node id, the two X25519 public keys) with ECDSA-SHA384;
* ``secagg-trusted-keys``: the consortium file; step 2 (:func:`verify_round_keys`) refuses the round unless every
  keyed site's keys carry a valid signature by a distinct consortium key.

The statement starts with a fixed domain tag, so a secure-aggregation signature cannot be mistaken for any other
message signed with the same key (Flower's SuperNode authentication signs its own, differently shaped, tokens).
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from shared.secagg import SecAggError

__all__ = [
    "CONSORTIUM_FILE",
    "SIGNING_KEY_NODE_CONFIG",
    "TRUSTED_KEYS_NODE_CONFIG",
    "KeyBundle",
    "Signer",
    "consortium_line",
    "key_statement",
    "load_signer",
    "load_trusted_keys",
    "verify_round_keys",
]

#: Node config key: the site's own OpenSSH private key (ECDSA, unencrypted) that signs its round keys.
SIGNING_KEY_NODE_CONFIG = "secagg-signing-key"
#: Node config key: the consortium's public keys (``consortium.pub``) every peer's round keys must be signed by.
TRUSTED_KEYS_NODE_CONFIG = "secagg-trusted-keys"
#: File name ``fedabus certs`` gives the list of every site's public key.
CONSORTIUM_FILE = "consortium.pub"

_DOMAIN = b"fedabus-secagg/round-keys/v1\0"
_COMMENT_PREFIX = "fedabus-"


def _point(key: ec.EllipticCurvePublicKey) -> bytes:
    """The public key as a compressed X9.62 point: how a signer names itself in a reply (49 bytes on P-384)."""
    return key.public_bytes(serialization.Encoding.X962, serialization.PublicFormat.CompressedPoint)


def key_statement(
    *, run_id: int, server_round: int, node_id: int, mask_public: bytes, share_public: bytes
) -> bytes:
    """What a site signs in step 1: the domain tag, run id, round and its node id (big-endian uint64 each), then
    its two raw 32-byte X25519 public keys."""
    return _DOMAIN + struct.pack(">QQQ", run_id, server_round, node_id) + mask_public + share_public


@dataclass(frozen=True)
class Signer:
    """A site's signing key loaded from ``path``; :meth:`sign` returns ``(public point, DER signature)``."""

    key: ec.EllipticCurvePrivateKey
    path: Path

    def sign(self, statement: bytes) -> tuple[bytes, bytes]:
        return _point(self.key.public_key()), self.key.sign(statement, ec.ECDSA(hashes.SHA384()))


def load_signer(path: str | Path) -> Signer:
    """The ECDSA private key at ``path`` (OpenSSH format as ``fedabus certs`` writes it, or PEM PKCS#8).

    Raises:
        SecAggError: the file is missing, unreadable, encrypted or not an ECDSA key, naming the file."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise SecAggError(
            f"{path}: cannot read the secure-aggregation signing key ({exc.strerror})"
        ) from None
    loader = serialization.load_ssh_private_key if b"OPENSSH" in data else serialization.load_pem_private_key
    try:
        key = loader(data, password=None)
    except (ValueError, TypeError, UnsupportedAlgorithm) as exc:
        raise SecAggError(f"{path}: not an unencrypted OpenSSH or PEM private key ({exc})") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise SecAggError(
            f"{path}: the signing key must be ECDSA (fedabus certs makes P-384), not {type(key).__name__}"
        )
    return Signer(key, path)


def consortium_line(name: str, public_key: ec.EllipticCurvePublicKey) -> str:
    """One line of ``consortium.pub``: the OpenSSH public key and the comment ``fedabus-<name>``."""
    openssh = public_key.public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    return f"{openssh.decode()} {_COMMENT_PREFIX}{name}\n"


def load_trusted_keys(path: str | Path) -> dict[bytes, tuple[str, ec.EllipticCurvePublicKey]]:
    """The consortium's keys in ``path`` (OpenSSH public keys one per line, ``#`` comments and blank lines
    skipped; the comment ``fedabus-<name>`` or any last word names the site): ``{public point: (site name,
    key)}``.

    Raises:
        SecAggError: the file is unreadable or empty, a line is not an ECDSA public key, or a key or name
            appears twice; the message names the file and line."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise SecAggError(f"{path}: cannot read the consortium's public keys ({exc})") from None
    trusted: dict[bytes, tuple[str, ec.EllipticCurvePublicKey]] = {}
    for number, line in enumerate(text.splitlines(), start=1):
        fields = line.split()
        if not fields or fields[0].startswith("#"):
            continue
        try:
            key = serialization.load_ssh_public_key(" ".join(fields[:2]).encode())
        except (ValueError, UnsupportedAlgorithm) as exc:
            raise SecAggError(f"{path}:{number}: not an OpenSSH public key ({exc})") from None
        if not isinstance(key, ec.EllipticCurvePublicKey):
            raise SecAggError(f"{path}:{number}: {fields[0]} is not an ECDSA key")
        name = fields[-1].removeprefix(_COMMENT_PREFIX) if len(fields) > 2 else f"{path.name}:{number}"
        point = _point(key)
        if point in trusted or name in {known for known, _ in trusted.values()}:
            raise SecAggError(f"{path}:{number}: site {name!r} or its key is listed twice")
        trusted[point] = (name, key)
    if not trusted:
        raise SecAggError(
            f"{path}: holds no public key; list every site's (fedabus certs writes {CONSORTIUM_FILE})"
        )
    return trusted


@dataclass(frozen=True)
class KeyBundle:
    """One keyed site's round keys as the server relayed them: ``signer`` and ``signature`` are empty when the
    site signed nothing."""

    node_id: int
    mask_public: bytes
    share_public: bytes
    signer: bytes
    signature: bytes


def verify_round_keys(
    bundles: Sequence[KeyBundle],
    trusted: dict[bytes, tuple[str, ec.EllipticCurvePublicKey]],
    *,
    run_id: int,
    server_round: int,
    source: str,
) -> dict[int, str]:
    """Check that every bundle is signed by a distinct consortium key over its own statement; ``{node id: site
    name}`` when all are. ``source`` (the trusted-keys file) is named in the errors.

    Raises:
        SecAggError: naming the node and, where known, the site: a missing signature, a signer outside the
            consortium, a signature that does not verify (keys substituted or altered on the way), or one site's
            key vouching for two nodes."""
    names: dict[int, str] = {}
    for bundle in bundles:
        where = f"round {server_round}: the secure-aggregation keys of node {bundle.node_id}"
        if not bundle.signature or not bundle.signer:
            raise SecAggError(
                f"{where} carry no signature; this site requires signed keys ({source}); no shares sent"
            )
        if bytes(bundle.signer) not in trusted:
            raise SecAggError(f"{where} are signed by a key not listed in {source}; no shares sent")
        name, public = trusted[bytes(bundle.signer)]
        statement = key_statement(
            run_id=run_id,
            server_round=server_round,
            node_id=bundle.node_id,
            mask_public=bundle.mask_public,
            share_public=bundle.share_public,
        )
        try:
            public.verify(bytes(bundle.signature), statement, ec.ECDSA(hashes.SHA384()))
        except InvalidSignature:
            raise SecAggError(
                f"{where} (site {name!r}) fail signature verification: substituted or altered on the way; "
                "no shares sent"
            ) from None
        if name in names.values():
            raise SecAggError(
                f"{where}: site {name!r} already signed another node's keys this round; no shares sent"
            )
        names[bundle.node_id] = name
    return names
