"""A site's own LoRA rank (node config ``lora-rank``, its site TOML's, or the run config's
``federation.site-lora-ranks``): allowed only with product aggregation, uncompressed; one truth between the three
places; and the site's models at that rank from a global adapter."""

from __future__ import annotations

import pytest
import torch

from client.task import _models, site_settings
from shared.adapters import extract_adapter, lora_specs_from_config
from shared.base import build_random_base, working_copy, wrap_for_training
from shared.config import ConfigError, load_run_config
from shared.lora_aggregation import delta_weight, lora_modules, project, rank_layout
from shared.protocol import adapter_to_record, layout_of
from tests.shared.tiny_sam import TINY_SAM

PRODUCT = {"federation.lora-aggregation": "product"}


def _settings(tmp_path, rank=None, *, toml_rank=None, **run):
    """Site settings of a deployed site with node config ``lora-rank = rank`` and, when given, a site TOML
    ``site/site.toml`` with ``lora-rank = toml_rank``; the run's rank is 4."""
    (tmp_path / "site").mkdir(exist_ok=True)
    if toml_rank is not None:
        (tmp_path / "site" / "site.toml").write_text(f"[site]\nlora-rank = {toml_rank}\n", encoding="utf-8")
    node = {"data-path": str(tmp_path / "site"), "base-path": str(tmp_path / "base")}
    if rank is not None:
        node["lora-rank"] = rank
    return site_settings(node, load_run_config({"adapter.lora-rank": 4, **run}))


def test_a_site_rank_is_read_from_the_node_config_under_product(tmp_path):
    assert _settings(tmp_path, 8, **PRODUCT).lora_rank == 8
    assert _settings(tmp_path, 4).lora_rank == 4  # the run's rank needs no product mode
    assert _settings(tmp_path, 0).lora_rank == 0
    assert _settings(tmp_path).lora_rank == 0


def test_a_site_rank_is_read_from_the_site_toml_and_must_agree_with_the_node_config(tmp_path):
    assert _settings(tmp_path, toml_rank=2, **PRODUCT).lora_rank == 2
    assert _settings(tmp_path, 2, toml_rank=2, **PRODUCT).lora_rank == 2  # the same rank twice is one truth
    with pytest.raises(
        ConfigError, match=r"node config lora-rank = 8, .*site\.toml: lora-rank = 2; give it in one"
    ):
        _settings(tmp_path, 8, toml_rank=2, **PRODUCT)
    with pytest.raises(
        ConfigError, match=r"site\.toml: lora-rank = 2 differs from the run's adapter.lora-rank"
    ):
        _settings(tmp_path, toml_rank=2)
    with pytest.raises(ConfigError, match=r"lora-rank = -1 must be >= 0"):
        _settings(tmp_path, toml_rank=-1, **PRODUCT)


def test_a_simulated_site_takes_its_rank_from_its_site_toml(tmp_path):
    for name, rank in (("site_a", 2), ("site_b", 0)):
        (tmp_path / "sites" / name).mkdir(parents=True)
        if rank:
            (tmp_path / "sites" / f"{name}.toml").write_text(f"lora-rank = {rank}\n", encoding="utf-8")
    config = load_run_config(
        {
            "adapter.lora-rank": 4,
            "federation.sites-dir": str(tmp_path / "sites"),
            "model.base-path": "b",
            **PRODUCT,
        }
    )
    ranks = [site_settings({"partition-id": index}, config).lora_rank for index in (0, 1)]
    assert ranks == [2, 0]


def test_the_coordinator_names_site_ranks_in_the_run_config(tmp_path):
    """``federation.site-lora-ranks`` (the study's way to run an arm with mixed ranks): a site finds its rank by
    its name (folder, site TOML ``name`` or node config ``site-id``); the other places must agree with it."""
    ranks = {"federation.site-lora-ranks": "site=2, other=8", **PRODUCT}
    assert _settings(tmp_path, **ranks).lora_rank == 2  # the folder's name
    assert _settings(tmp_path, 2, toml_rank=2, **ranks).lora_rank == 2
    (tmp_path / "site" / "site.toml").write_text('[site]\nname = "other"\n', encoding="utf-8")
    assert _settings(tmp_path, **ranks).lora_rank == 8  # the TOML's name
    with pytest.raises(
        ConfigError,
        match=r"node config lora-rank = 4, run config federation.site-lora-ranks \(other\) = 8; give it in one",
    ):
        _settings(tmp_path, 4, **ranks)
    assert _settings(tmp_path, **{**ranks, "federation.site-lora-ranks": "nobody=2"}).lora_rank == 0


def test_a_study_arm_gives_its_simulated_sites_mixed_ranks(tmp_path):
    """The arm-scoped ``--set`` of ``fedabus study`` reaches a simulated site of that arm through Flower's ``-c``
    string (:func:`shared.simulation.run_config_overrides`), and each site finds its own rank; the other arm keeps
    one rank."""
    from flwr.common.config import parse_config_args

    from shared.config import parse_assignments
    from shared.simulation import run_config_overrides
    from shared.study.runner import load_study_config

    for name in ("site_a", "site_b", "site_c"):
        (tmp_path / "sites" / name).mkdir(parents=True)
    sets = parse_assignments(
        [
            "federated@mixed:federation.lora-aggregation=product",
            "federated@mixed:federation.site-lora-ranks=site_a=2,site_b=8",
        ]
    )
    config, per_arm = load_study_config(None, sets, ["federated", "federated@mixed"])
    assert config.federation.site_ranks() == {}
    mixed = per_arm["federated@mixed"].federation
    overrides = {
        "federation.lora-aggregation": mixed.lora_aggregation,
        "federation.site-lora-ranks": mixed.site_lora_ranks,
        "federation.sites-dir": str(tmp_path / "sites"),
        "model.base-path": "b",
    }
    run = load_run_config(parse_config_args(run_config_overrides(overrides)[1:]))
    assert [site_settings({"partition-id": i}, run).lora_rank for i in range(3)] == [2, 8, 0]


@pytest.mark.parametrize(
    ("value", "why"),
    [
        ("site_a=2", "needs federation.lora-aggregation = 'product'"),
        ("site_a", "entry 'site_a' must be NAME=RANK"),
        ("site_a=0", "entry 'site_a=0' must be NAME=RANK"),
        ("site_a=2,site_a=4", "each site once"),
    ],
)
def test_bad_site_lora_ranks_are_refused_at_config_load(value, why):
    product = {} if why.startswith("needs") else PRODUCT
    with pytest.raises(ConfigError, match=rf"federation.site-lora-ranks = .*{why}"):
        load_run_config({"federation.site-lora-ranks": value, **product})


@pytest.mark.parametrize(
    "run",
    [
        {},
        {"federation.lora-aggregation": "ffa"},
        {"federation.lora-aggregation": "product", "federation.compression": "int8"},
        {"federation.lora-aggregation": "product", "federation.compression": "fp16"},
    ],
)
def test_another_site_rank_is_refused_outside_uncompressed_product(tmp_path, run):
    with pytest.raises(
        ConfigError,
        match=r"node config lora-rank = 2 .*adapter.lora-rank = 4.*federation.lora-aggregation = 'product' and "
        r"federation.compression = 'none'",
    ):
        _settings(tmp_path, 2, **run)
    with pytest.raises(ConfigError, match="must be an integer"):
        _settings(tmp_path, "two", **PRODUCT)


def test_the_site_models_at_their_own_rank_hold_the_projected_global_adapter():
    """client/task.py ``_models`` at rank 2 receiving a global adapter of rank 4 (alpha 16): every LoRA module of
    both models is at rank 2 and applies the optimal rank-2 approximation of the global ΔW (its truncated SVD, at
    the site's scaling 16 / 2); every fully trained tensor is the global one."""
    config = load_run_config({"adapter.lora-rank": 4, "adapter.lora-alpha": 16.0, **PRODUCT})
    base = build_random_base(TINY_SAM, cls_depth=18, cls_norm_groups=8, seed=0)
    specs = lora_specs_from_config(config.adapter)
    global_models = wrap_for_training(working_copy(base, specs), specs)
    torch.manual_seed(1)
    for model in global_models.values():  # PEFT starts B at 0 (ΔW = 0): give the global adapter a real ΔW
        for name, param in model.named_parameters():
            if "lora_B" in name:
                torch.nn.init.normal_(param.data)
    global_tensors = extract_adapter(global_models, base_fingerprints=base.fingerprints).tensors

    models, received = _models(base, config, adapter_to_record(global_tensors, mode="product"), rank=2)

    own = extract_adapter(models, base_fingerprints=base.fingerprints).tensors
    assert layout_of(own) == rank_layout(layout_of(global_tensors), 2) == layout_of(received)
    scaling4, scaling2 = {"seg": 4.0, "cls": 4.0}, {"seg": 8.0, "cls": 8.0}
    want = project(global_tensors, rank=2, scaling=scaling4, to_scaling=scaling2)
    modules = lora_modules(global_tensors)
    assert modules and {m.split(".", 1)[0] for m in modules} == {"seg", "cls"}
    for name, tensor in own.items():
        torch.testing.assert_close(tensor, want[name])
        torch.testing.assert_close(received[name], want[name])
    for a_name, b_name in list(modules.values())[:: max(1, len(modules) // 4)]:
        full = delta_weight(global_tensors[a_name], global_tensors[b_name], 4.0)
        u, s, vh = torch.linalg.svd(full)
        best = u[:, :2] @ torch.diag(s[:2]) @ vh[:2]
        torch.testing.assert_close(delta_weight(own[a_name], own[b_name], 8.0), best, rtol=1e-4, atol=1e-5)
    decoder = [n for n in own if n.startswith("seg.mask_decoder.")]
    assert decoder and all(torch.equal(own[n], global_tensors[n]) for n in decoder)
