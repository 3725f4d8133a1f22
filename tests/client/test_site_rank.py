"""A site's own LoRA rank (node config ``lora-rank``): allowed only with product aggregation, uncompressed."""

from __future__ import annotations

import pytest

from client.task import site_settings
from shared.config import ConfigError, load_run_config


def _settings(tmp_path, rank, **run):
    (tmp_path / "site").mkdir(exist_ok=True)
    node = {"data-path": str(tmp_path / "site"), "base-path": str(tmp_path / "base"), "lora-rank": rank}
    return site_settings(node, load_run_config({"adapter.lora-rank": 4, **run}))


def test_a_site_rank_is_read_from_the_node_config_under_product(tmp_path):
    assert _settings(tmp_path, 8, **{"federation.lora-aggregation": "product"}).lora_rank == 8
    assert _settings(tmp_path, 4).lora_rank == 4  # the run's rank needs no product mode
    assert _settings(tmp_path, 0).lora_rank == 0


@pytest.mark.parametrize(
    "run",
    [
        {},
        {"federation.lora-aggregation": "ffa"},
        {"federation.lora-aggregation": "product", "federation.compression": "int8"},
    ],
)
def test_another_site_rank_is_refused_outside_uncompressed_product(tmp_path, run):
    with pytest.raises(
        ConfigError, match=r"lora-rank = 2 .*adapter.lora-rank = 4.*federation.lora-aggregation"
    ):
        _settings(tmp_path, 2, **run)
    with pytest.raises(ConfigError, match="must be an integer"):
        _settings(tmp_path, "two", **{"federation.lora-aggregation": "product"})
