"""python -m vitkernels info / usage, and which_backend on the real ops."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

import vitkernels
from vitkernels.ops import relpos


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


_OPS = ("relpos_attention", "performer_attention", "patch_embed")


def _check_backend_lines(text: str, expected: tuple[str, ...]) -> None:
    """Each op's line names a backend in ``expected``; when that is not cuda (the first
    in priority), the next line says why cuda refuses or why the speed evidence passes
    it over. (An op's line may be the last line of the output: the GPU run's
    IndexError.)"""
    lines = text.splitlines()
    for op in _OPS:
        i = next(i for i, line in enumerate(lines) if line.startswith(op))
        chosen = lines[i].rstrip().rsplit(": ", 1)[1]
        assert chosen in expected, lines[i]
        if chosen != "cuda":
            following = lines[i + 1 : i + 2]
            why = following[0].strip() if following else ""
            assert why.startswith(("cuda refuses: ", "cuda: passed over: ")), lines[i : i + 2]


def test_backend_lines_check_takes_cuda_on_the_last_line():
    """The check itself, on the shape of the GPU machine's output (cuda chosen for the
    last op) and of a CPU's (torch chosen, cuda's refusal below each op)."""
    gpu = ("relpos_attention     A1 (B2): cuda\nperformer_attention  T1 (B2): cuda\n"
           "patch_embed          P1 (B2): cuda\n")  # fmt: skip
    _check_backend_lines(gpu, ("triton", "cuda"))
    cpu = "".join(f"{op}  x: torch\n  cuda refuses: not built\n" for op in _OPS)
    _check_backend_lines(cpu, ("torch",))
    with pytest.raises(AssertionError):
        _check_backend_lines(cpu.replace("  cuda refuses: not built\n", "", 1), ("torch",))
    with pytest.raises(AssertionError):
        _check_backend_lines(gpu, ("torch",))


def test_info_names_versions_and_a_backend_per_op():
    # CUDA hidden (a GPU machine too): every op runs on the stock torch composite
    text = _info(dict(os.environ, CUDA_VISIBLE_DEVICES=""))
    assert "none visible to torch" in text
    _check_backend_lines(text, ("torch",))
    # head_mixing_attention has no cuda backend: its line and triton's refusal below it
    lines = text.splitlines()
    i = next((i for i, line in enumerate(lines) if line.startswith("head_mixing_attention")), None)
    assert i is not None, "info must name a backend for every op, head_mixing_attention too"
    assert lines[i].rstrip().endswith(": torch"), lines[i]
    assert lines[i + 1].strip().startswith("triton refuses: "), lines[i : i + 2]


@pytest.mark.gpu
def test_info_on_a_gpu_picks_a_kernel_backend_per_op():
    text = _info(dict(os.environ))
    assert torch.cuda.get_device_name(0) in text
    expected = ("triton", "cuda") if torch.cuda.get_device_capability() >= (8, 0) else ("torch",)
    _check_backend_lines(text, expected)


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
    assert err.startswith("error: unknown command 'bogus'; expected one of info, compare, build, estimate")
    assert "usage: python -m vitkernels" in err
    assert main([]) == 2 and "error: no command given" in capsys.readouterr().err
    assert main(["--version"]) == 0 and capsys.readouterr().out.startswith("vitkernels ")
