"""python -m vitkernels info / usage, and which_backend on the real ops."""

from __future__ import annotations

import subprocess
import sys

import torch

import vitkernels
from vitkernels.ops import relpos


def test_info_names_versions_and_a_backend_per_op():
    out = subprocess.run(
        [sys.executable, "-m", "vitkernels", "info"], capture_output=True, text=True, timeout=300
    )
    assert out.returncode == 0, out.stderr
    text = out.stdout
    assert torch.__version__ in text
    assert "CUDA extension" in text
    # without a GPU every op runs on the stock torch composite; on sm_80+ on a kernel
    if not torch.cuda.is_available():
        expected = ("torch",)
    elif torch.cuda.get_device_capability() >= (8, 0):
        expected = ("triton", "cuda")
    else:
        expected = ("torch",)
    lines = text.splitlines()
    for op in ("relpos_attention", "performer_attention", "patch_embed"):
        i = next(i for i, line in enumerate(lines) if line.startswith(op))
        assert lines[i].rstrip().rsplit(": ", 1)[1] in expected, lines[i]
        # then why each backend not taken refuses, one line each
        assert lines[i + 1].strip().startswith("cuda refuses: ") or "cuda" in expected


def test_which_backend_follows_forcing_without_running():
    q = torch.randn(1, 2, 16, 16)
    table = torch.randn(2, 16)
    chosen, verdicts = relpos.which_backend(q, q, q, table, fmap_size=4)
    assert chosen == "torch"
    assert [name for name, _ in verdicts] == ["cuda", "triton", "torch", "reference"]
    with vitkernels.use_backend("reference"):
        chosen, _ = relpos.which_backend(q, q, q, table, fmap_size=4)
    assert chosen == "reference"


def test_unknown_command_is_named(capsys):
    from vitkernels.__main__ import main

    assert main(["bogus"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: unknown command 'bogus'; expected one of info, compare, build")
    assert "usage: python -m vitkernels" in err
    assert main([]) == 2 and "error: no command given" in capsys.readouterr().err
    assert main(["--version"]) == 0 and capsys.readouterr().out.startswith("vitkernels ")
