"""The maths of secure aggregation: pairwise additive masking in a finite ring (Bonawitz et al. 2017, "SecAgg").

No Flower messaging here (the site side is :mod:`client.secure_aggregation`, the server side
:mod:`server.secure_aggregation`); every function is deterministic given its inputs, except key and seed
generation, which use the operating system's CSPRNG.

* **Ring encoding.** A site's update ``x`` (float32, any shape, flattened to ``(L,)``) multiplied by its weight
  ``w`` (its number of training cases) becomes fixed point with :data:`FRACTION_BITS` fractional bits, as
  ``uint64`` modulo 2^64 (numpy's unsigned arithmetic wraps, so sums are ring sums). Decoding reads the ring sum
  as a signed 64-bit integer, so it is exact while ``|Σ wᵢ·xᵢ| < 2^(63 − FRACTION_BITS)`` = 2^31 element-wise;
  :func:`encode` refuses a site whose own share of that range is exceeded. Rounding error of the decoded
  weighted mean: at most ``n / 2 · 2^-32 / Σ wᵢ`` ≤ 1.2e-10 per element, far below float32 rounding.
* **Masks.** Every pair of sites ``(i, j)`` agrees a 32-byte seed by X25519 key agreement on per-round keys
  and HKDF-SHA256 bound to the round and both site ids (:func:`pair_seed`); each site also draws a private
  self-mask seed. A seed expands to ``L`` uniform ring elements with the ChaCha20 keystream (:func:`expand`).
  Site ``i`` sends ``y_i = enc(wᵢ·xᵢ) + PRG(bᵢ) + Σ_j ±PRG(s_ij)`` (``+`` when ``i < j``), so pairwise masks
  cancel in the sum and ``y_i`` alone is uniform over the ring whatever ``xᵢ`` is.
* **Dropout recovery.** Each site splits its self-mask seed and its mask private key into Shamir shares
  (threshold ``t``, one per site, Flower's :mod:`flwr.common.secure_aggregation.crypto.shamir`) and sends each
  peer its share encrypted (ChaCha20-Poly1305 under an X25519-agreed key, bound to sender, receiver and round).
  For the sum, the server collects from ≥ ``t`` survivors the self-mask shares of the sites whose input it holds
  and the mask-key shares of the sites that dropped before sending it (:func:`unmask`); an honest site never
  reveals both for the same site (:func:`check_unmask_request`).
"""

from __future__ import annotations

import os
import struct
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from flwr.common.secure_aggregation.crypto.shamir import combine_shares, create_shares

__all__ = [
    "FRACTION_BITS",
    "SEED_BYTES",
    "KeyPair",
    "SecAggError",
    "SiteShares",
    "check_unmask_request",
    "combine_secret",
    "decode",
    "decrypt_shares",
    "encode",
    "encrypt_shares",
    "expand",
    "flatten",
    "mask",
    "new_seed",
    "pair_seed",
    "split_secret",
    "threshold_for",
    "unflatten",
    "unmask",
]

#: Fractional bits of the fixed-point encoding (ring Z_{2^64}); the decoded sum must stay below 2^31 in magnitude.
FRACTION_BITS = 32
#: Length of every seed and key (bytes).
SEED_BYTES = 32
_SCALE = float(2**FRACTION_BITS)
_LIMIT = float(2 ** (63 - FRACTION_BITS))


class SecAggError(ValueError):
    """A secure-aggregation step cannot proceed (too few sites or shares, a forged or misrouted share, an
    update outside the ring's range); the message says which and why."""


def threshold_for(num_sites: int) -> int:
    """The Shamir threshold ``t`` for ``num_sites`` sites that exchanged keys: a strict majority, at least 2.

    A round can lose up to ``num_sites − t`` sites and still be unmasked; a server colluding with fewer than
    ``t`` sites learns nothing about a single site's update."""
    return max(2, num_sites // 2 + 1)


# ---------------------------------------------------------------- ring encoding


def flatten(arrays: Mapping[str, np.ndarray], dtype: type = np.float64) -> np.ndarray:
    """The arrays' values in name order as one vector ``(L,)`` of ``dtype`` (float64; uint64 for ring vectors)."""
    if not arrays:
        return np.zeros(0, dtype=dtype)
    return np.concatenate([np.asarray(arrays[name], dtype=dtype).ravel() for name in sorted(arrays)])


def unflatten(vector: np.ndarray, shapes: Mapping[str, tuple[int, ...]]) -> dict[str, np.ndarray]:
    """Split ``vector`` ``(L,)`` back into arrays of ``shapes`` (name order, as :func:`flatten`)."""
    sizes = {name: int(np.prod(shapes[name], dtype=np.int64)) for name in sorted(shapes)}
    if sum(sizes.values()) != vector.size:
        raise SecAggError(
            f"vector of {vector.size} elements does not fit the layout of {sum(sizes.values())} elements"
        )
    out, start = {}, 0
    for name, size in sizes.items():
        out[name] = vector[start : start + size].reshape(shapes[name])
        start += size
    return out


def encode(values: np.ndarray, weight: float, *, num_sites: int) -> np.ndarray:
    """``weight · values`` ``(L,)`` as fixed point in Z_{2^64}: uint64 ``(L,)``.

    ``num_sites`` is how many sites' encodings will be summed; each gets ``1/num_sites`` of the range, so the
    sum cannot wrap. Raises :class:`SecAggError` for a non-finite value or one outside that share."""
    scaled = np.asarray(values, dtype=np.float64) * float(weight)
    if not np.all(np.isfinite(scaled)):
        raise SecAggError("the update holds NaN or Inf; nothing can be encoded")
    bound = _LIMIT / max(1, num_sites)
    peak = float(np.max(np.abs(scaled))) if scaled.size else 0.0
    if peak >= bound:
        raise SecAggError(
            f"weight x update reaches {peak:.3g}; secure aggregation of {num_sites} sites encodes at most "
            f"{bound:.3g} per site (2^31 / sites at {FRACTION_BITS} fractional bits)"
        )
    return np.rint(scaled * _SCALE).astype(np.int64).view(np.uint64)


def decode(total: np.ndarray, total_weight: float) -> np.ndarray:
    """The ring sum ``total`` uint64 ``(L,)`` of :func:`encode` outputs, divided by ``total_weight``: float64."""
    if total_weight <= 0:
        raise SecAggError(f"the sum of the weights is {total_weight}; nothing to average")
    return np.asarray(total, dtype=np.uint64).view(np.int64).astype(np.float64) / _SCALE / float(total_weight)


# ---------------------------------------------------------------- keys, seeds and masks


@dataclass(frozen=True)
class KeyPair:
    """An X25519 key pair as raw 32-byte strings (so it fits a Flower ConfigRecord)."""

    private: bytes
    public: bytes

    @classmethod
    def generate(cls) -> KeyPair:
        key = X25519PrivateKey.generate()
        return cls(key.private_bytes_raw(), key.public_key().public_bytes_raw())

    @classmethod
    def from_private(cls, private: bytes) -> KeyPair:
        key = X25519PrivateKey.from_private_bytes(private)
        return cls(private, key.public_key().public_bytes_raw())


def new_seed() -> bytes:
    """A fresh random seed of :data:`SEED_BYTES` from the OS CSPRNG."""
    return os.urandom(SEED_BYTES)


def _agree(private: bytes, peer_public: bytes, *, purpose: bytes, server_round: int, a: int, b: int) -> bytes:
    """HKDF-SHA256 of the X25519 shared secret, bound to the purpose, the round and the unordered pair."""
    secret = X25519PrivateKey.from_private_bytes(private).exchange(
        X25519PublicKey.from_public_bytes(peer_public)
    )
    low, high = sorted((a, b))
    info = b"fedabus-secagg/" + purpose + struct.pack(">QQQ", server_round, low, high)
    return HKDF(algorithm=hashes.SHA256(), length=SEED_BYTES, salt=None, info=info).derive(secret)


def pair_seed(private: bytes, peer_public: bytes, *, server_round: int, me: int, peer: int) -> bytes:
    """The mask seed sites ``me`` and ``peer`` share in ``server_round`` (the same from either side)."""
    return _agree(private, peer_public, purpose=b"mask", server_round=server_round, a=me, b=peer)


def expand(seed: bytes, length: int) -> np.ndarray:
    """``length`` uniform elements of Z_{2^64} (uint64 ``(length,)``) from the ChaCha20 keystream of ``seed``."""
    if len(seed) != SEED_BYTES:
        raise SecAggError(f"a mask seed has {SEED_BYTES} bytes, not {len(seed)}")
    stream = Cipher(algorithms.ChaCha20(seed, b"\0" * 16), mode=None).encryptor()
    return np.frombuffer(stream.update(bytes(8 * length)), dtype="<u8").astype(np.uint64)


def mask(encoded: np.ndarray, *, me: int, self_seed: bytes, pair_seeds: Mapping[int, bytes]) -> np.ndarray:
    """Site ``me``'s masked input ``encoded + PRG(self_seed) + Σ_peer ±PRG(pair seed)`` (uint64 ``(L,)``):
    ``+`` towards peers with a larger id, ``−`` towards smaller ones, so every pair cancels in the sum."""
    out = np.asarray(encoded, dtype=np.uint64) + expand(self_seed, encoded.size)
    for peer, seed in pair_seeds.items():
        if peer == me:
            raise SecAggError(f"site {me} cannot share a mask with itself")
        stream = expand(seed, encoded.size)
        out = out + stream if me < peer else out - stream
    return out


def unmask(
    masked_sum: np.ndarray,
    *,
    self_seeds: Mapping[int, bytes],
    dropped_keys: Mapping[int, bytes],
    public_keys: Mapping[int, bytes],
    server_round: int,
) -> np.ndarray:
    """The ring sum of the survivors' encodings: ``masked_sum`` (uint64 ``(L,)``, the sum of the survivors'
    masked inputs) minus their self masks (``self_seeds``: survivor -> reconstructed seed) and minus the pairwise
    masks they share with sites that dropped before sending their input (``dropped_keys``: dropped site -> its
    reconstructed mask private key; ``public_keys``: every keyed site's mask public key)."""
    length = masked_sum.size
    out = np.asarray(masked_sum, dtype=np.uint64).copy()
    for seed in self_seeds.values():
        out = out - expand(seed, length)
    for gone, private in dropped_keys.items():
        for survivor in self_seeds:
            seed = pair_seed(
                private, public_keys[survivor], server_round=server_round, me=gone, peer=survivor
            )
            stream = expand(seed, length)
            out = out - stream if survivor < gone else out + stream
    return out


# ---------------------------------------------------------------- Shamir shares and their transport


def split_secret(secret: bytes, *, threshold: int, num_shares: int) -> list[bytes]:
    """Shamir shares of ``secret``: any ``threshold`` of the ``num_shares`` rebuild it, fewer reveal nothing.
    Share ``k`` (0-based) carries its evaluation point ``k + 1`` in its first 4 bytes."""
    if not 2 <= threshold <= num_shares:
        raise SecAggError(f"Shamir threshold {threshold} must lie in [2, {num_shares}] (shares)")
    return create_shares(secret, threshold, num_shares)


def combine_secret(shares: Sequence[bytes], *, threshold: int) -> bytes:
    """The secret rebuilt from at least ``threshold`` distinct shares; :class:`SecAggError` otherwise."""
    distinct = list({share[:4]: share for share in shares}.values())
    if len(distinct) < threshold:
        raise SecAggError(f"{len(distinct)} distinct share(s) received; {threshold} are needed to rebuild")
    try:
        return combine_shares(distinct[:threshold])
    except ValueError as exc:
        raise SecAggError(f"the shares do not rebuild a secret: {exc}") from None


@dataclass(frozen=True)
class SiteShares:
    """What one site holds of another's secrets: a share of its self-mask seed and of its mask private key."""

    self_seed: bytes
    mask_key: bytes


def _share_key(private: bytes, peer_public: bytes, *, server_round: int, src: int, dst: int) -> bytes:
    return _agree(private, peer_public, purpose=b"share", server_round=server_round, a=src, b=dst)


def _aad(server_round: int, src: int, dst: int) -> bytes:
    return b"fedabus-secagg/share" + struct.pack(">QQQ", server_round, src, dst)


def encrypt_shares(
    shares: SiteShares, *, private: bytes, peer_public: bytes, server_round: int, src: int, dst: int
) -> bytes:
    """``shares`` of site ``src`` for site ``dst``, encrypted and bound to (round, src, dst): bytes."""
    key = _share_key(private, peer_public, server_round=server_round, src=src, dst=dst)
    nonce = os.urandom(12)
    plain = struct.pack(">H", len(shares.self_seed)) + shares.self_seed + shares.mask_key
    return nonce + ChaCha20Poly1305(key).encrypt(nonce, plain, _aad(server_round, src, dst))


def decrypt_shares(
    ciphertext: bytes, *, private: bytes, peer_public: bytes, server_round: int, src: int, dst: int
) -> SiteShares:
    """The shares site ``src`` sent site ``dst``; :class:`SecAggError` when the ciphertext was altered,
    misrouted or replayed from another round."""
    key = _share_key(private, peer_public, server_round=server_round, src=src, dst=dst)
    try:
        plain = ChaCha20Poly1305(key).decrypt(ciphertext[:12], ciphertext[12:], _aad(server_round, src, dst))
    except InvalidTag:
        raise SecAggError(
            f"the shares from site {src} to site {dst} in round {server_round} fail authentication "
            "(altered, misrouted or from another round)"
        ) from None
    (size,) = struct.unpack(">H", plain[:2])
    return SiteShares(self_seed=plain[2 : 2 + size], mask_key=plain[2 + size :])


def check_unmask_request(
    survivors: Sequence[int], dropped: Sequence[int], *, keyed: Sequence[int], threshold: int
) -> None:
    """What an honest site checks before revealing shares: no site both survived and dropped (that would give
    the server both masks of one input), every named site took part in the key exchange, and at least
    ``threshold`` survivors (fewer would let the server unmask too small a sum). :class:`SecAggError` otherwise."""
    both = sorted(set(survivors) & set(dropped))
    if both:
        raise SecAggError(f"site(s) {both} are named both as survivors and as dropped; no share revealed")
    unknown = sorted((set(survivors) | set(dropped)) - set(keyed))
    if unknown:
        raise SecAggError(f"site(s) {unknown} took no part in this round's key exchange; no share revealed")
    if len(set(survivors)) < threshold:
        raise SecAggError(
            f"only {len(set(survivors))} survivor(s), below the threshold {threshold}; no share revealed"
        )
