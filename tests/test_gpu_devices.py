"""Kernels launch on their tensors' device, not on the current one (marker gpu).

With tensors on cuda:1 while cuda:0 is current, every op on each kernel backend
(triton; cuda when the extension is loaded) must give the float64 reference's
forward and gradients, on cuda:1. A launcher that ran on the current device would
read another GPU's memory (an illegal address, or wrong numbers). Needs two GPUs;
where there is one, the test says so in its skip reason.
"""

from __future__ import annotations

import math

import pytest
import torch

import vitkernels
from vitkernels import cuda

pytestmark = pytest.mark.gpu

TOL = {torch.float16: 5e-3, torch.bfloat16: 3e-2}  # ||err|| / ||ref||, gradients twice that


def _two_gpus() -> None:
    n = torch.cuda.device_count()
    if n < 2:
        names = ", ".join(torch.cuda.get_device_name(i) for i in range(n)) or "none"
        pytest.skip(
            f"needs two GPUs to launch on a device that is not the current one; "
            f"this machine has {n} ({names})"
        )


def _kernel_backends() -> list[str]:
    return ["triton"] + (["cuda"] if cuda.has_op("relpos_attention_fwd") else [])


def _calls(dev: torch.device, dtype: torch.dtype):
    """(name, leaves, other tensors, fn(tensors, backend)) for each op at a small shape."""

    def rnd(*shape, scale=1.0):
        return torch.randn(*shape, device=dev, dtype=dtype) * scale

    relpos = (
        {
            "q": rnd(2, 4, 49, 32),
            "k": rnd(2, 4, 196, 32),
            "v": rnd(2, 4, 196, 64),
            "t": rnd(4, 196),
        },
        {},
        lambda t, b: vitkernels.relpos_attention(
            t["q"], t["k"], t["v"], t["t"], fmap_size=14, q_stride=2, backend=b
        ),
    )
    w = torch.nn.init.orthogonal_(torch.empty(32, 64, device=dev)) * math.sqrt(32)
    performer = (
        {"kqv": rnd(2, 300, 192, scale=0.6)},
        {"w": w},
        lambda t, b: vitkernels.performer_attention(*_kqv(t["kqv"]), t["w"], backend=b),
    )
    patch = (
        {"weight": rnd(96, 768, scale=768**-0.5), "bias": rnd(96), "pos": rnd(1, 17, 96)},
        {"images": rnd(2, 3, 64, 64), "cls": rnd(1, 1, 96)},
        lambda t, b: vitkernels.patch_embed(
            t["images"],
            t["weight"],
            t["bias"],
            kernel_size=16,
            pos_embed=t["pos"],
            cls_token=t["cls"],
            backend=b,
        ),  # fmt: skip
    )
    return {"relpos_attention": relpos, "performer_attention": performer, "patch_embed": patch}


def _kqv(kqv: torch.Tensor):
    k, q, v = kqv.split(64, dim=-1)
    return q, k, v


def _rel(got: torch.Tensor, want: torch.Tensor) -> float:
    assert got.isfinite().all(), "non-finite values"
    return ((got.double() - want).norm() / want.norm().clamp_min(1e-30)).item()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["f16", "bf16"])
@pytest.mark.parametrize("backend", ["triton", "cuda"])
@pytest.mark.parametrize("op", ["relpos_attention", "performer_attention", "patch_embed"])
def test_launch_on_a_device_that_is_not_current(op, backend, dtype):
    _two_gpus()
    if backend not in _kernel_backends():
        pytest.skip(f"the CUDA extension is not loaded: {cuda.unavailable_reason()}")
    dev = torch.device("cuda", 1)
    leaves, consts, fn = _calls(dev, dtype)[op]
    ref_leaves = {k: v.double().requires_grad_() for k, v in leaves.items()}
    want = fn({**ref_leaves, **{k: v.double() for k, v in consts.items()}}, "reference")
    grad_out = torch.randn_like(want)
    want_grads = torch.autograd.grad(want, list(ref_leaves.values()), grad_out)

    run_leaves = {k: v.clone().requires_grad_() for k, v in leaves.items()}
    with torch.cuda.device(0):
        assert torch.cuda.current_device() == 0
        got = fn({**run_leaves, **consts}, backend)
        grads = torch.autograd.grad(got, list(run_leaves.values()), grad_out.to(dtype))
        torch.cuda.synchronize(1)
    assert got.device == dev and all(g.device == dev for g in grads)
    assert _rel(got, want) <= TOL[dtype], f"{op} {backend}: forward off the reference"
    for name, g, w in zip(run_leaves, grads, want_grads, strict=True):
        assert _rel(g, w) <= 2 * TOL[dtype], f"{op} {backend}: gradient of {name} off the reference"
