"""Each learning-quality option (issue 15) end to end in a small federation: the real ServerApp ``main``
(``server/app.py``) and the real ClientApp (``client/app.py``, mods included) of two tiny synthetic sites, in this
process, through :class:`InProcessGrid`; two rounds each, no validation or final test (they do not depend on the
options), MLflow replaced by the recording stand-in of ``tests/server/conftest.py``.

Every run checks what any option must keep: no site failed a message, both rounds aggregated, every site's training
metrics finite, a global adapter with the run's layout that moved away from the starting one. Each option adds what
would fail if it were not in force: ffa's A bit-identical and absent from the wire, the sites' own ranks on the wire
and the product's discarded energy, DoRA's magnitudes trained, LoHa's and LoKr's own factors trained, the box options leaving the segmenter bit-identical
while the classifier changes, augmentation changing both models, DP-SGD spending ε and leaving the untrained
submodules untouched. The runs are deterministic (seeded per round), so the reference run without the option can be
compared tensor by tensor.
"""

from __future__ import annotations

import json
import math
import uuid
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from flwr.app import Context, Error, Message, MessageType, RecordDict

from client.app import app as client_app
from server import federation_run
from server.app import main as server_main
from shared.adapters import is_lora_a, load_adapter
from shared.base import build_random_base, save_base
from shared.config import load_run_config
from shared.data.synth import generate_consortium
from shared.data.synth_case import SynthOptions
from shared.protocol import ARRAYS, record_rank, travelling_layout

pytestmark = pytest.mark.usefixtures("task_identity", "fake_tracker")

NODES = (1, 2)
ROUNDS = 2
#: Settings of every run: tiny training, augmentation off (its own run turns it on), no evaluation.
COMMON = {
    "num-server-rounds": ROUNDS,
    "model.cls-depth": 18,
    # LoRA on the classifier's last 3x3 convolutions only (in = 512·3·3: the widest modules), not on every one:
    # attaching PEFT to every convolution of three ResNet-18s costs seconds per message.
    "adapter.cls-lora-targets": r"branches\.\w+\.layer4\.\d+\.conv2",
    "data.augment": False,
    "data.planes-frames": 1,
    "data.planes-size": 32,
    "train.seg-epochs": 1,
    "train.cls-epochs": 1,
    "train.seg-click-iterations": 1,
    "train.seg-batch-size": 3,
    "train.cls-batch-size": 3,
    "train.progress": False,
    "federation.min-sites": len(NODES),
    "federation.fraction-evaluate": 0.0,
    "federation.final-test": False,
    "federation.resume": False,
    "federation.sample-timeout": 30.0,
    "federation.round-timeout": 120.0,
}


class InProcessGrid:
    """A Flower grid whose sites are calls of the real ClientApp in this process, one ``Context`` per node (its
    ``node_config`` as a SuperNode's ``--node-config``; state kept between messages). A reply is ready as soon as a
    message is pushed. A handler's exception becomes an error reply, as in Flower, and is kept in ``errors``;
    ``train_shapes`` keeps the shapes of every train reply's arrays per node, as the server received them."""

    def __init__(self, run_config: dict, node_configs: dict[int, dict]) -> None:
        self.contexts = {
            node: Context(1, node, dict(config), RecordDict(), dict(run_config))
            for node, config in node_configs.items()
        }
        self.errors: list[str] = []
        self.train_shapes: dict[int, list[dict[str, tuple[int, ...]]]] = {node: [] for node in node_configs}
        self._replies: dict[str, Message] = {}

    def get_node_ids(self) -> list[int]:
        return list(self.contexts)

    def push_messages(self, messages) -> list[str]:
        ids = []
        for msg in messages:
            msg.metadata.__dict__["_message_id"] = uuid.uuid4().hex
            node = msg.metadata.dst_node_id
            try:
                reply = client_app(msg, self.contexts[node])
            except Exception as exc:  # noqa: BLE001 - Flower turns a ClientApp exception into an error reply
                self.errors.append(f"node {node}, {msg.metadata.message_type}: {exc!r}")
                reply = Message(Error(code=2, reason=str(exc)), reply_to=msg)
            if msg.metadata.message_type == MessageType.TRAIN and not reply.has_error():
                arrays = reply.content[ARRAYS]
                self.train_shapes[node].append({k: tuple(a.shape) for k, a in arrays.items()})
            self._replies[msg.metadata.message_id] = reply
            ids.append(msg.metadata.message_id)
        return ids

    def pull_messages(self, message_ids) -> list[Message]:
        return [self._replies.pop(i) for i in list(message_ids) if i in self._replies]

    def send_and_receive(self, messages, *, timeout=None) -> list[Message]:
        return self.pull_messages(self.push_messages(messages))


@dataclass
class Federation:
    """One finished run: its config, the starting and the final global adapter, ``summary.json``, the tracker's
    round reports and the grid."""

    config: object
    sites: list[str]
    initial: dict[str, torch.Tensor]
    final: dict[str, torch.Tensor]
    summary: dict
    reports: list
    grid: InProcessGrid

    def changed(self, other: dict[str, torch.Tensor], prefix: str) -> list[str]:
        """Names under ``prefix`` whose final tensor differs from ``other``'s."""
        return [n for n in self.final if n.startswith(prefix) and not torch.equal(self.final[n], other[n])]


@pytest.fixture(scope="module")
def sites(tmp_path_factory) -> list[Path]:
    """Two synthetic sites of 5 small volumes (3 training cases each)."""
    options = SynthOptions(shape=(40, 56, 56), split_fractions=(0.6, 0.2, 0.2), min_test_per_class=1)
    root = tmp_path_factory.mktemp("option-sites")
    return generate_consortium(root / "sites", sites=len(NODES), cases=5, seed=3, options=options)


@pytest.fixture(scope="module")
def base_path(tmp_path_factory) -> Path:
    return save_base(
        build_random_base("small", cls_depth=18, seed=0), tmp_path_factory.mktemp("base") / "base"
    )


@pytest.fixture(scope="module")
def federations(sites, base_path, tmp_path_factory) -> dict:
    """Finished runs by name, shared by the tests of this module (a reference run is compared by several)."""
    return {"sites": sites, "base": base_path, "root": tmp_path_factory.mktemp("runs")}


def federate(
    federations: dict, name: str, settings: dict, nodes: dict[int, dict] | None = None
) -> Federation:
    """The run ``name`` with ``settings`` over :data:`COMMON` (and per-node config ``nodes``), run once."""
    if name in federations:
        return federations[name]
    work = federations["root"] / name
    run_config = {
        **COMMON,
        "model.base-path": str(federations["base"]),
        "federation.work-dir": str(work / "server"),
        **settings,
    }
    node_configs = {
        node: {
            "data-path": str(site),
            "state-dir": str(work / "site-state" / site.name),
            "device": "cpu",
            **(nodes or {}).get(node, {}),
        }
        for node, site in zip(NODES, federations["sites"], strict=True)
    }
    grid = InProcessGrid(run_config, node_configs)
    started: list = []
    make_initial = federation_run._initial_adapter

    def initial_adapter(config):  # the server's own starting adapter, kept for the checks
        started.append(make_initial(config))
        return started[-1]

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(federation_run, "_initial_adapter", initial_adapter)
        server_main(grid, Context(1, 0, {}, RecordDict(), run_config))
    result = Federation(
        config=load_run_config(run_config),
        sites=[site.name for site in federations["sites"]],
        initial=started[0][0].tensors,
        final=load_adapter(work / "server" / "final_adapter.safetensors").tensors,
        summary=json.loads((work / "server" / "summary.json").read_text(encoding="utf-8")),
        reports=list(federation_run.FederationTracker.runs["run-0"].reports),
        grid=grid,
    )
    federation_run.FederationTracker.runs.clear()
    _check_common(result)
    federations[name] = result
    return result


def _check_common(run: Federation) -> None:
    """What every option keeps (module docstring)."""
    assert run.grid.errors == []
    assert run.summary["rounds_done"] == ROUNDS
    assert all(len(shapes) == ROUNDS for shapes in run.grid.train_shapes.values())
    assert sorted(run.summary["train"]) == sorted(run.sites)
    assert {n: tuple(t.shape) for n, t in run.final.items()} == {
        n: tuple(t.shape) for n, t in run.initial.items()
    }
    assert all(torch.isfinite(t).all() for t in run.final.values())
    for model in ("seg.", "cls."):
        assert run.changed(run.initial, model), f"the global {model[:-1]} adapter never moved"
    for site, metrics in run.summary["train"].items():
        assert metrics["num-examples"] > 0, site
        if not run.config.privacy.sample_dp:  # under DP the losses stay at the site (NaN on the wire)
            assert all(math.isfinite(v) for v in metrics.values()), (site, metrics)


# ---------------------------------------------------------------------------------------------------- the options
def _lora_a(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {n: t for n, t in tensors.items() if is_lora_a(n)}


def test_naive_reference_federation_trains_both_models(federations):
    run = federate(federations, "naive", {})
    assert run.changed(run.initial, "seg.") and run.changed(run.initial, "cls.")  # and the common checks


def test_ffa_keeps_every_lora_a_bit_identical_and_never_sends_it(federations):
    run = federate(federations, "ffa", {"federation.lora-aggregation": "ffa"})
    a = _lora_a(run.initial)
    assert a and all(torch.equal(run.final[n], t) for n, t in a.items())
    assert [n for n in run.changed(run.initial, "") if "lora_B" in n]
    sent = travelling_layout({n: tuple(t.shape) for n, t in run.initial.items()}, "ffa")
    sizes = {
        prefix: sum(math.prod(s) for n, s in sent.items() if n.startswith(f"{prefix}."))
        for prefix in ("seg", "cls")
    }
    for replies in run.grid.train_shapes.values():
        assert all({k: math.prod(v) for k, v in reply.items()} == sizes for reply in replies)


def test_product_with_each_site_at_its_own_rank(federations):
    """Sites at LoRA rank 2 and 8 (node config ``lora-rank``), the run at 4: each site sends its own rank, the server
    aggregates B·A exactly, re-factorises to rank 4 (reporting the energy dropped: 2 + 8 > 4) and every site
    projects the global adapter to its rank for the next round."""
    ranks = {1: 2, 2: 8}
    run = federate(
        federations,
        "product-mixed-ranks",
        {"federation.lora-aggregation": "product"},
        nodes={node: {"lora-rank": rank} for node, rank in ranks.items()},
    )
    layout = {n: tuple(t.shape) for n, t in run.initial.items()}
    for node, rank in ranks.items():
        assert [record_rank(reply, layout, "product") for reply in run.grid.train_shapes[node]] == [
            rank
        ] * ROUNDS
    energies = [
        r.global_metrics["federation/lora_discarded_energy"] for r in run.reports if r.server_round > 0
    ]
    assert len(energies) == ROUNDS and all(0.0 < e < 1.0 for e in energies), energies


def test_dora_trains_the_magnitudes(federations):
    run = federate(federations, "dora", {"adapter.method": "dora"})
    magnitudes = [n for n in run.initial if "lora_magnitude_vector" in n]
    assert {n.split(".", 1)[0] for n in magnitudes} == {"seg", "cls"}
    assert set(run.changed(run.initial, "")) & set(magnitudes)


@pytest.mark.parametrize(("method", "marker"), [("loha", "hada_"), ("lokr", "lokr_")])
def test_loha_and_lokr_federate_their_own_factors(federations, method, marker):
    run = federate(federations, method, {"adapter.method": method})
    factors = [n for n in run.initial if marker in n]
    assert {n.split(".", 1)[0] for n in factors} == {"seg", "cls"}
    assert not [n for n in run.initial if "lora_" in n]  # the method's own factors, not LoRA's
    assert set(run.changed(run.initial, "")) & set(factors)


def test_augmentation_changes_what_both_models_learn(federations):
    plain = federate(federations, "naive", {})
    run = federate(federations, "augment", {"data.augment": True})
    assert run.changed(plain.final, "seg.") and run.changed(plain.final, "cls.")


def test_classifier_box_options_change_the_classifier_only(federations):
    """Planes cut around the segmenter's own boxes (``train.cls-boxes = predicted``), jittered on top
    (``data.planes-box-jitter``): the classifier learns something else and the segmenter exactly the same as in the
    reference run (same seeds without the options)."""
    plain = federate(federations, "naive", {})
    run = federate(federations, "boxes", {"train.cls-boxes": "predicted", "data.planes-box-jitter": 0.3})
    assert run.changed(plain.final, "seg.") == []
    assert run.changed(plain.final, "cls.")


def test_sample_dp_with_the_recipe_keys(federations):
    """DP-SGD with a larger Poisson batch (``privacy.seg-batch-size``) on the LoRA matrices only
    (``privacy.seg-trainable = ""``): ε spent within the target at every site, the segmenter's prompt encoder and
    mask decoder untouched, its LoRA trained."""
    run = federate(
        federations,
        "sample-dp",
        {
            "privacy.sample-dp": True,
            "privacy.target-epsilon": 8.0,
            "privacy.seg-batch-size": 3,
            "privacy.seg-trainable": "",
        },
    )
    for site, metrics in run.summary["train"].items():
        for model in ("seg", "cls"):
            assert 0.0 < metrics[f"privacy/{model}_epsilon"] <= 8.0 + 1e-6, (site, metrics)
    decoders = [n for n in run.initial if n.startswith(("seg.prompt_encoder", "seg.mask_decoder"))]
    assert decoders and not set(run.changed(run.initial, "seg.")) & set(decoders)
    assert [n for n in run.changed(run.initial, "seg.") if "lora_" in n]
