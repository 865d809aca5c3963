"""python -m vitkernels info / usage, and explain_call on the real ops."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

import vitkernels
from vitkernels.ops._dispatch import explain_call


def _info(env: dict[str, str]) -> str:
    out = subprocess.run(
        [sys.executable, "-m", "vitkernels", "info"],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )
    assert out.returncode == 0, out.stderr
    assert torch.__version__ in out.stdout and "CUDA extension" in out.stdout
    return out.stdout


def _backend_lines(text: str) -> dict[str, str]:
    ops = ("relpos_attention", "performer_attention", "patch_embed")
    return {op: next(ln for ln in text.splitlines() if ln.startswith(op)).rstrip() for op in ops}


def test_info_names_versions_and_a_backend_per_op():
    # CUDA hidden (a GPU machine too): every op runs on the stock torch composite
    text = _info(dict(os.environ, CUDA_VISIBLE_DEVICES=""))
    assert "none visible to torch" in text
    for line in _backend_lines(text).values():
        assert line.endswith(": torch"), line


@pytest.mark.gpu
def test_info_on_a_gpu_picks_a_kernel_backend_per_op():
    text = _info(dict(os.environ))
    assert torch.cuda.get_device_name(0) in text
    for line in _backend_lines(text).values():
        assert line.endswith((": triton", ": cuda")), line


def test_usage_for_unknown_command():
    out = subprocess.run(
        [sys.executable, "-m", "vitkernels", "frobnicate"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 2 and "usage" in out.stdout


def test_explain_call_follows_forcing_without_running():
    q = torch.randn(1, 2, 16, 16)
    table = torch.randn(2, 16)
    chosen, verdicts = explain_call(vitkernels.relpos_attention, q, q, q, table, fmap_size=4)
    assert chosen == "torch"
    assert [name for name, _ in verdicts] == ["cuda", "triton", "torch", "reference"]
    with vitkernels.use_backend("reference"):
        chosen, _ = explain_call(vitkernels.relpos_attention, q, q, q, table, fmap_size=4)
    assert chosen == "reference"
