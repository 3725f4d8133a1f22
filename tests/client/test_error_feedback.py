"""The site's compression residual across messages: kept per run and compression, robust to a bad file."""

from __future__ import annotations

import logging

import pytest
import torch

from client.error_feedback import RESIDUAL_FILE, load_residual, save_residual
from shared.protocol import layout_of

RESIDUAL = {"seg.a.weight": torch.randn(3, 4), "cls.head.bias": torch.randn(2)}
LAYOUT = layout_of(RESIDUAL)


def test_the_residual_survives_the_process_exactly(tmp_path):
    save_residual(tmp_path, RESIDUAL, run="7", compression="int8")
    back = load_residual(tmp_path, LAYOUT, run="7", compression="int8")
    assert back is not None and all(torch.equal(back[n], t) for n, t in RESIDUAL.items())


def test_no_file_means_a_zero_residual(tmp_path):
    assert load_residual(tmp_path, LAYOUT, run="7", compression="int8") is None


@pytest.mark.parametrize("content", [b"", b"not a safetensors file", b"\xff" * 64])
def test_a_corrupt_file_is_logged_and_feedback_restarts_from_zero(tmp_path, caplog, content):
    (tmp_path / RESIDUAL_FILE).write_bytes(content)
    with caplog.at_level(logging.WARNING, logger="client.error_feedback"):
        assert load_residual(tmp_path, LAYOUT, run="7", compression="int8") is None
    assert "unreadable" in caplog.text and RESIDUAL_FILE in caplog.text


def test_a_truncated_file_is_refused(tmp_path, caplog):
    save_residual(tmp_path, RESIDUAL, run="7", compression="int8")
    path = tmp_path / RESIDUAL_FILE
    path.write_bytes(path.read_bytes()[:-10])
    with caplog.at_level(logging.WARNING, logger="client.error_feedback"):
        assert load_residual(tmp_path, LAYOUT, run="7", compression="int8") is None
    assert "unreadable" in caplog.text


@pytest.mark.parametrize(
    ("run", "compression", "layout"),
    [
        ("8", "int8", LAYOUT),  # another run
        ("7", "fp16", LAYOUT),  # another compression
        ("7", "int8", {**LAYOUT, "seg.a.weight": (4, 3)}),  # another adapter layout
    ],
)
def test_a_residual_of_another_run_compression_or_layout_is_not_used(tmp_path, run, compression, layout):
    save_residual(tmp_path, RESIDUAL, run="7", compression="int8")
    assert load_residual(tmp_path, layout, run=run, compression=compression) is None


def test_a_non_finite_residual_is_not_used(tmp_path, caplog):
    save_residual(
        tmp_path,
        {**RESIDUAL, "cls.head.bias": torch.tensor([1.0, float("nan")])},
        run="7",
        compression="int8",
    )
    with caplog.at_level(logging.WARNING, logger="client.error_feedback"):
        assert load_residual(tmp_path, LAYOUT, run="7", compression="int8") is None
    assert "NaN" in caplog.text
