"""What travels between the server and the sites, and how it is encoded in Flower records.

This is the only module of ``shared`` that imports Flower. A message carries the adapter (both models, keys
``seg.``/``cls.``, float32) as one ``ArrayRecord`` under :data:`ARRAYS`, scalar metrics as a ``MetricRecord``
under :data:`METRICS`, and the round configuration as a ``ConfigRecord`` under :data:`CONFIG`.

Packing: Flower 1.41 transfers every array of a record as its own request, and an adapter has hundreds of
small tensors (≈ 20 s per round over TLS for 266 arrays). The adapter therefore travels as one flat float32
array per model (``seg``, ``cls``): the tensors of that model in sorted name order, each flattened. Both ends
know the names and shapes (the *layout*) from the shared base and adapter settings, so none of it is sent;
:func:`record_to_adapter` refuses a record that does not fit the receiver's layout. Element-wise strategies
(FedAvg, FedAdam, median, trimmed mean) and norm-based ones (Krum, DP clipping) give the same result on the
packed arrays as on the separate tensors.

What travels depends on ``federation.lora-aggregation`` (:func:`travelling_layout`, the one place that says so):
every adapter tensor under ``naive`` and ``product``; under ``ffa`` everything but the LoRA ``A`` matrices, which
every site and the server derive from the same seed (:func:`shared.adapters.ffa_lora_a`) and never change.
Both ends must use the same mode; a record packed under another mode has other sizes and is refused, naming
the key.

Compression (``federation.compression``, train messages in both directions; evaluation and the final test always
send ``none``): each packed float32 array of ``n`` elements travels as

* ``none``: float32 ``(n,)``, exact (4 bytes per element);
* ``fp16``: float16 ``(n,)`` (2 bytes per element; relative error <= 2⁻¹¹, values beyond ±65504 are refused);
* ``int8``: int8 ``(n,)`` plus ``<model>/scale``, float32 ``(tensors,)``: one symmetric scale per adapter tensor
  (sorted name order), ``scale = max|x| / 127``, ``x ≈ q · scale``; max abs error scale / 2 per tensor.

The record says its own encoding: the arrays' dtypes (:func:`record_encoding`), and a receiver refuses a record
whose encoding is not its ``federation.compression``, naming both. Server -> site, the global adapter is encoded
as is (:func:`adapter_to_record`, :func:`encode_record`). Site -> server (:func:`update_to_record`,
:func:`record_to_update`) ``none`` sends the updated adapter itself (exact, today's bytes); a lossy encoding sends
the difference from the adapter the site received plus the residual the site kept from its last update (error
feedback: what quantisation lost is sent next round, so the sum of the decoded updates tracks the sum of the true
ones within one step's quantisation error), and the server adds the decoded difference to the exact global
adapter it sent. The server decodes before admission: admission and every strategy see float32 as with ``none``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import numpy as np
import torch
from flwr.app import Array, ArrayRecord

from shared.adapters import AdapterMismatchError, is_lora_a
from shared.config import COMPRESSIONS, LORA_AGGREGATION_MODES
from shared.lora_aggregation import layout_rank, lora_modules, rank_layout
from shared.metric_names import NUM_EXAMPLES
from shared.tensor_files import describe_mismatch

__all__ = [
    "ARRAYS",
    "BASE_FINGERPRINT",
    "CONFIG",
    "DECLINED",
    "FEDABUS_VERSION",
    "METRICS",
    "NUM_EXAMPLES",
    "SECAGG",
    "SECAGG_CIPHERTEXTS",
    "SECAGG_DROPPED",
    "SECAGG_KEYS",
    "SECAGG_KEY_SHARES",
    "SECAGG_MASK_PUBLIC",
    "SECAGG_NODES",
    "SECAGG_PEERS",
    "SECAGG_SEED_SHARES",
    "SECAGG_SHARES",
    "SECAGG_SHARE_PUBLIC",
    "SECAGG_SIGNATURE",
    "SECAGG_SIGNER",
    "SECAGG_SURVIVORS",
    "SECAGG_THRESHOLD",
    "SECAGG_UNMASK",
    "SERVER_ROUND",
    "SITE",
    "SITE_ID",
    "SPLIT",
    "adapter_to_record",
    "decode_record",
    "encode_record",
    "float32_record",
    "layout_of",
    "num_cases_key",
    "payload_bytes",
    "record_encoding",
    "record_rank",
    "record_to_adapter",
    "record_to_update",
    "travelling_layout",
    "update_to_record",
]

# Records of a message.
ARRAYS = "arrays"
METRICS = "metrics"
CONFIG = "config"
#: ConfigRecord in replies naming the site (:data:`SITE_ID`) and, when it sent no update, why (:data:`DECLINED`).
SITE = "site"

# Keys of the ``config`` record the server sends.
#: The fingerprint of the base model the federation trains on (``seg=sha256:...;cls=sha256:...``); a site
#: whose base differs declines. Also in the handshake reply: the site's own base.
BASE_FINGERPRINT = "base-fingerprint"
#: The federation round (Flower's strategies set it in every train and evaluate config).
SERVER_ROUND = "server-round"
#: The split an evaluate message asks for: ``val`` each evaluation round, ``test`` in the final test.
SPLIT = "split"

# Keys of the ``site`` record in replies.
SITE_ID = "site-id"
DECLINED = "declined"
#: Handshake reply: the fedabus version the site runs.
FEDABUS_VERSION = "fedabus-version"

# Secure aggregation (``federation.secure-aggregation``; client/secure_aggregation.py, server/secure_aggregation.py).
#: ConfigRecord of the three extra messages of a round and of its train messages.
SECAGG = "secagg"
#: Actions of the extra ``query.<action>`` messages: advertise keys, exchange Shamir shares, reveal shares.
SECAGG_KEYS, SECAGG_SHARES, SECAGG_UNMASK = "secagg_keys", "secagg_shares", "secagg_unmask"
#: Keys of the ``secagg`` record (node ids travel as decimal strings: Flower's ids are unsigned 64-bit).
SECAGG_THRESHOLD = "threshold"
SECAGG_NODES = "node-ids"
SECAGG_MASK_PUBLIC, SECAGG_SHARE_PUBLIC = "mask-public", "share-public"
SECAGG_PEERS, SECAGG_CIPHERTEXTS = "peers", "ciphertexts"
SECAGG_SURVIVORS, SECAGG_DROPPED = "survivors", "dropped"
SECAGG_SEED_SHARES, SECAGG_KEY_SHARES = "seed-shares", "key-shares"
#: A site's signature over its round keys and the signer's public key (shared/secagg_signing.py); empty bytes when
#: the site signs nothing. Step 1's reply holds one of each, step 2's request one per keyed site.
SECAGG_SIGNER, SECAGG_SIGNATURE = "signer", "signature"

# Keys of the ``metrics`` record: NUM_EXAMPLES (Flower's FedAvg weighs by it; the number of training cases)
# is a metric name too, defined with the others in shared.metric_names, which training code imports without
# Flower; the other metric keys are built there as well.


def num_cases_key(split: str) -> str:
    """Handshake reply metric: the number of cases of the site's ``split``, ``num-{split}-cases``."""
    return f"num-{split}-cases"


#: name -> shape of every adapter tensor.
Layout = Mapping[str, tuple[int, ...]]


def layout_of(tensors: Mapping[str, torch.Tensor]) -> dict[str, tuple[int, ...]]:
    """The layout (name -> shape) of adapter tensors."""
    return {name: tuple(tensor.shape) for name, tensor in tensors.items()}


def _groups(names: list[str]) -> dict[str, list[str]]:
    """Sorted names grouped by model prefix (the text before the first dot: ``seg``, ``cls``)."""
    groups: dict[str, list[str]] = {}
    for name in sorted(names):
        groups.setdefault(name.split(".", 1)[0], []).append(name)
    return groups


def travelling_layout(layout: Layout, mode: str = "naive") -> dict[str, tuple[int, ...]]:
    """The part of ``layout`` that travels under ``federation.lora-aggregation = mode``: all of it, except under
    ``ffa`` the LoRA ``A`` matrices (frozen at their shared initialisation everywhere, so never sent)."""
    if mode not in LORA_AGGREGATION_MODES:
        raise ValueError(
            f"federation.lora-aggregation = {mode!r}; allowed: {', '.join(LORA_AGGREGATION_MODES)}"
        )
    return {name: tuple(shape) for name, shape in layout.items() if not (mode == "ffa" and is_lora_a(name))}


def record_rank(
    found: Mapping[str, tuple[int, ...]], layout: Layout, mode: str = "naive", compression: str = "none"
) -> int | None:
    """The LoRA rank at which a packed record (float32, or as ``compression`` encodes it) whose arrays have shapes
    ``found`` fits ``layout`` exactly (:func:`shared.lora_aggregation.rank_layout`, under ``mode``), or None when
    it fits no rank.

    A model's packed size is ``n₁ + (r − 1)·k`` (``k``: the elements one rank adds to its LoRA A and B), strictly
    increasing in ``r``, so a record decodes at one rank at most; both models must give the same rank (a site has
    one ``adapter.lora-rank``). Heterogeneous ranks are for uncompressed records only (a compressed record at
    another rank is recognised only to say so)."""
    try:
        if not lora_modules(layout):
            return None
    except ValueError:  # not a LoRA layout
        return None
    one = _packed_sizes(travelling_layout(rank_layout(layout, 1), mode))
    two = _packed_sizes(travelling_layout(rank_layout(layout, 2), mode))
    ranks = set()
    for prefix, (size_one,) in one.items():
        shape = tuple(found.get(prefix, ()))
        step = two[prefix][0] - size_one
        if len(shape) != 1 or step == 0:
            continue  # a missing model, or one without LoRA: the exact comparison below decides
        extra = shape[0] - size_one
        if extra < 0 or extra % step:
            return None
        ranks.add(1 + extra // step)
    if len(ranks) != 1:
        return None
    rank = ranks.pop()
    wanted = _wire_shapes(travelling_layout(rank_layout(layout, rank), mode), compression)
    return rank if {key: tuple(shape) for key, shape in found.items()} == wanted else None


def _packed_sizes(layout: Layout) -> dict[str, tuple[int, ...]]:
    """Model prefix -> (number of float32 elements,) of its packed array."""
    return {
        prefix: (sum(math.prod(layout[n]) for n in names),) for prefix, names in _groups(list(layout)).items()
    }


#: The dtype of the packed arrays under each ``federation.compression``.
_WIRE_DTYPES = {"none": np.dtype(np.float32), "fp16": np.dtype(np.float16), "int8": np.dtype(np.int8)}
#: Largest finite float16.
_FP16_MAX = 65504.0


def _scale_key(prefix: str) -> str:
    """Record key of the per-tensor float32 scales of model ``prefix``'s int8 array."""
    return f"{prefix}/scale"


def _wire_shapes(wanted: Layout, compression: str) -> dict[str, tuple[int, ...]]:
    """Record key -> shape of what travels for the (travelling) layout ``wanted`` under ``compression``."""
    shapes = _packed_sizes(wanted)
    if compression == "int8":
        for prefix, names in _groups(list(wanted)).items():
            shapes[_scale_key(prefix)] = (len(names),)
    return shapes


def _tensor_sizes(wanted: Layout, prefix: str) -> list[int]:
    """Element counts of model ``prefix``'s tensors, in packing order."""
    return [math.prod(wanted[n]) for n in _groups(list(wanted))[prefix]]


def _check_compression(compression: str) -> None:
    if compression not in COMPRESSIONS:
        raise ValueError(f"federation.compression = {compression!r}; allowed: {', '.join(COMPRESSIONS)}")


def record_encoding(record: ArrayRecord) -> str:
    """The ``federation.compression`` a record was written with, read from its packed arrays' dtypes (float32:
    ``none``, float16: ``fp16``, int8: ``int8``); ``unknown (...)`` for anything else. float64 counts as ``none``
    too: FedAdam's global adapter is float64 after its first step, and receivers read it as float32."""
    dtypes = {np.dtype(record[key].dtype) for key in record.keys() if "/" not in key}
    if dtypes == {np.dtype(np.float64)}:
        return "none"
    for name, dtype in _WIRE_DTYPES.items():
        if dtypes == {dtype}:
            return name
    return f"unknown ({', '.join(sorted(map(str, dtypes)))})"


def payload_bytes(record: ArrayRecord) -> int:
    """Bytes of the arrays' serialised data in ``record`` (what Flower transfers, headers included)."""
    return sum(len(record[key].data) for key in record.keys())


def float32_record(record: ArrayRecord) -> ArrayRecord:
    """``record`` with its float64 arrays as float32, the dtype every receiver decodes (``record`` itself when
    none is float64). FedAdam's global adapter is float64 after its first step (NumPy promotes its float64 step
    size): the server keeps that state, the sites get float32, half the bytes. The cast rounds each value to
    float32 (relative error <= 2⁻²⁴), exactly what a receiver's decoding did before."""
    if all(record[key].dtype != "float64" for key in record.keys()):
        return record
    arrays = {key: record[key].numpy() for key in record.keys()}
    return ArrayRecord(
        {key: Array(a.astype(np.float32) if a.dtype == np.float64 else a) for key, a in arrays.items()}
    )


def encode_record(
    packed: ArrayRecord, layout: Layout, *, mode: str = "naive", compression: str
) -> ArrayRecord:
    """A packed record (:func:`adapter_to_record` with ``none``, float32; a float64 one is cast, see
    :func:`float32_record`) -> the record ``compression`` sends.

    ``layout`` is the whole adapter layout (per-tensor int8 scales follow its :func:`travelling_layout`). Raises
    ValueError when a value does not fit float16 (``fp16``): use ``int8`` or ``none``."""
    _check_compression(compression)
    if compression == "none":
        return float32_record(packed)
    wanted = travelling_layout(layout, mode)
    out = {}
    for prefix in packed.keys():
        flat = torch.from_numpy(np.ascontiguousarray(packed[prefix].numpy(), dtype=np.float32))
        if compression == "fp16":
            if flat.numel() and float(flat.abs().max()) > _FP16_MAX:
                raise ValueError(
                    f"model {prefix!r}: a value beyond ±{_FP16_MAX:g} does not fit federation.compression = "
                    "'fp16'; use 'int8' or 'none'"
                )
            out[prefix] = Array(flat.to(torch.float16).numpy())
            continue
        sizes = _tensor_sizes(wanted, prefix)
        scales = torch.stack(
            [c.abs().max() if c.numel() else c.new_zeros(()) for c in torch.split(flat, sizes)]
        )
        scales = scales / 127.0
        per_element = torch.repeat_interleave(torch.where(scales > 0, scales, 1.0), torch.tensor(sizes))
        out[prefix] = Array(torch.round(flat / per_element).clamp(-127, 127).to(torch.int8).numpy())
        out[_scale_key(prefix)] = Array(scales.numpy())
    return ArrayRecord(out)


def decode_record(
    record: ArrayRecord, layout: Layout, *, mode: str = "naive", compression: str
) -> ArrayRecord:
    """A received record -> the packed float32 record (one array per model) it encodes.

    Raises :class:`~shared.adapters.AdapterMismatchError` when the record is encoded otherwise than this run's
    ``compression`` (naming both), or does not fit ``layout`` under ``mode`` (naming the key and sizes)."""
    _check_compression(compression)
    found_encoding = record_encoding(record)
    if found_encoding != compression:
        raise AdapterMismatchError(
            f"received adapter is encoded as federation.compression = {found_encoding!r}, but this run uses "
            f"federation.compression = {compression!r}: the server and every site must run with the same "
            "federation.compression"
        )
    wanted = travelling_layout(layout, mode)
    found = {key: tuple(record[key].shape) for key in record.keys()}
    problems = describe_mismatch(_wire_shapes(wanted, compression), found)
    if problems:
        raise AdapterMismatchError(
            f"received adapter does not fit this model's adapter layout under federation.lora-aggregation = "
            f"{mode!r} (packed sizes per model): "
            + "; ".join(problems)
            + _mode_hint(layout, mode, found, compression)
        )
    if compression == "none":
        return record
    out = {}
    for prefix in _groups(list(wanted)):
        values = torch.from_numpy(np.ascontiguousarray(record[prefix].numpy())).to(torch.float32)
        if compression == "int8":
            scales = torch.from_numpy(
                np.ascontiguousarray(record[_scale_key(prefix)].numpy(), dtype=np.float32)
            )
            values = values * torch.repeat_interleave(scales, torch.tensor(_tensor_sizes(wanted, prefix)))
        out[prefix] = Array(values.numpy())
    return ArrayRecord(out)


def adapter_to_record(
    tensors: Mapping[str, torch.Tensor], *, mode: str = "naive", compression: str = "none"
) -> ArrayRecord:
    """Adapter tensors -> ``ArrayRecord`` with one flat array per model prefix (see module docstring), float32
    or as ``compression`` encodes it; only the tensors that travel under ``mode`` (:func:`travelling_layout`) are
    packed."""
    layout = layout_of(tensors)
    sending = travelling_layout(layout, mode)
    packed = {}
    for prefix, names in _groups(list(sending)).items():
        flat = [tensors[n].detach().to("cpu", torch.float32).reshape(-1) for n in names]
        packed[prefix] = Array(torch.cat(flat).numpy())
    return encode_record(ArrayRecord(packed), layout, mode=mode, compression=compression)


def record_to_adapter(
    record: ArrayRecord, layout: Layout, *, mode: str = "naive", compression: str = "none"
) -> dict[str, torch.Tensor]:
    """``ArrayRecord`` of :func:`adapter_to_record` -> the adapter tensors (float32) that travel under ``mode``.

    ``layout`` is the receiver's whole adapter layout; the result holds its :func:`travelling_layout` (under
    ``ffa`` no LoRA ``A``: the receiver holds those itself). Raises
    :class:`~shared.adapters.AdapterMismatchError` when the record's arrays do not fit (other models, other
    sizes: the sender built its adapter from another base, other adapter settings or another
    ``federation.lora-aggregation``) or are encoded otherwise than ``compression`` (:func:`decode_record`)."""
    wanted = travelling_layout(layout, mode)
    packed = decode_record(record, layout, mode=mode, compression=compression)
    out: dict[str, torch.Tensor] = {}
    for prefix, names in _groups(list(wanted)).items():
        flat = torch.from_numpy(np.ascontiguousarray(packed[prefix].numpy(), dtype=np.float32))
        sizes = [math.prod(wanted[n]) for n in names]
        for name, chunk in zip(names, torch.split(flat, sizes), strict=True):
            out[name] = chunk.reshape(wanted[name]).clone()
    return out


def update_to_record(
    update: Mapping[str, torch.Tensor],
    received: Mapping[str, torch.Tensor],
    *,
    mode: str = "naive",
    compression: str = "none",
    residual: Mapping[str, torch.Tensor] | None = None,
) -> tuple[ArrayRecord, dict[str, torch.Tensor] | None]:
    """Site -> server: the record of a site's updated adapter, and the residual to carry into the next round.

    ``update`` and ``received`` (the global adapter as this site decoded it) hold the travelling tensors (float32,
    same names and shapes). Under ``none`` the record holds ``update`` itself and the residual is None. Under a
    lossy encoding it holds ``v = update − received + residual`` (``residual`` None: zeros) and the new residual
    is ``v − decode(record)`` (the quantisation error, to add next round)."""
    if compression == "none":
        return adapter_to_record(update, mode=mode), None
    value = {
        name: update[name].detach().float() - received[name].float() + (residual[name] if residual else 0.0)
        for name in update
    }
    record = adapter_to_record(value, mode=mode, compression=compression)
    sent = record_to_adapter(record, layout_of(value), mode=mode, compression=compression)
    return record, {name: value[name] - sent[name] for name in value}


def record_to_update(
    record: ArrayRecord,
    reference: ArrayRecord,
    layout: Layout,
    *,
    mode: str = "naive",
    compression: str = "none",
) -> ArrayRecord:
    """Server: a site's reply record -> the packed float32 updated adapter (what admission and the strategies
    see). ``reference`` is the packed float32 global adapter the server sent this round; under a lossy encoding
    the decoded difference is added to it. Raises as :func:`decode_record`."""
    decoded = decode_record(record, layout, mode=mode, compression=compression)
    if compression == "none":
        return decoded
    return ArrayRecord(
        {
            key: Array(reference[key].numpy().astype(np.float32) + decoded[key].numpy())
            for key in decoded.keys()
        }
    )


def _mode_hint(layout: Layout, mode: str, found: Mapping[str, tuple[int, ...]], compression: str) -> str:
    """``; it fits federation.lora-aggregation = '...'`` when the record was packed under another mode."""
    fits = [
        other
        for other in LORA_AGGREGATION_MODES
        if other != mode and _wire_shapes(travelling_layout(layout, other), compression) == dict(found)
    ]
    if not fits:
        rank = record_rank(found, layout, mode, compression)
        if rank is None or (compression == "none" and mode == "product"):
            return ""
        if compression != "none":
            return (
                f"; the record fits this adapter at LoRA rank {rank}, not {layout_rank(layout)}: a site may train "
                "at its own LoRA rank only with federation.compression = 'none' (a compressed update is the "
                f"difference from the site's own-rank projection; this run uses {compression!r})"
            )
        return (
            f"; the record fits this adapter at LoRA rank {rank}, not {layout_rank(layout)}: a site may train at "
            "its own adapter.lora-rank only with federation.lora-aggregation = 'product'"
        )
    return (
        f"; the record fits federation.lora-aggregation = {' or '.join(map(repr, fits))}: the server and every "
        "site must run with the same federation.lora-aggregation"
    )
