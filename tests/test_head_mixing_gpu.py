"""head_mixing_attention on a CUDA GPU: the triton backend against the float64
reference in float16, bfloat16 (which the interpreter computes wrongly) and float32,
at CaiT-XXS24's shapes (batch reduced) and smaller ones, gradients of every input and
parameter included; automatic dispatch on CUDA.

Skipped without a GPU (marker gpu).
"""

from __future__ import annotations

import pytest
import torch
from _numerics import assert_close

import vitkernels
from vitkernels.backends import reference
from vitkernels.ops import head_mixing as ops
from vitkernels.ops._dispatch import select

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]

DTYPES = {"f16": torch.float16, "bf16": torch.bfloat16, "f32": torch.float32}
# tolerance relative to the largest magnitude of the expected tensor
TOL = {torch.float16: 5e-3, torch.bfloat16: 3e-2, torch.float32: 1e-4}
GRAD_TOL = {torch.float16: 2e-2, torch.bfloat16: 8e-2, torch.float32: 3e-4}

# id: (B, H, Nq, Nk, D, kind); kind: "vit-pytorch" (transposed mixing, no biases),
# "timm" (biased mixing), "re-attention" (post-mix and head norm)
CASES = {
    "CaiT-XXS patch": (8, 4, 196, 196, 48, "vit-pytorch"),
    "CaiT-XXS class": (8, 4, 1, 197, 48, "vit-pytorch"),
    "CaiT-XXS timm": (8, 4, 196, 196, 48, "timm"),
    "re-attention H4 D64": (4, 4, 197, 197, 64, "re-attention"),
    "H2 N49 D32": (4, 2, 49, 49, 32, "timm"),
    "H3 Nq20 Nk49 D16": (3, 3, 20, 49, 16, "re-attention"),
}


def make(case, dtype):
    B, H, Nq, Nk, D, kind = case
    q, k, v = (torch.randn(B, H, n, D, device="cuda").to(dtype) for n in (Nq, Nk, Nk))
    bound = H**-0.5
    if kind == "timm":
        params = dict(
            pre=(torch.empty(H, H, device="cuda").uniform_(-bound, bound), torch.randn(H, device="cuda")),
            post=(torch.empty(H, H, device="cuda").uniform_(-bound, bound), torch.randn(H, device="cuda")),
        )
    elif kind == "vit-pytorch":
        params = dict(pre=(torch.randn(H, H, device="cuda").t(), None), post=(torch.randn(H, H, device="cuda").t(), None))
    else:
        params = dict(
            post=(torch.randn(H, H, device="cuda").t(), None),
            head_norm=(1 + 0.3 * torch.randn(H, device="cuda"), 0.3 * torch.randn(H, device="cuda"), 1e-5),
        )
    return q, k, v, params


def leaves_of(params):
    out = []
    for key in ("pre", "post", "head_norm"):
        if key in params:
            out += [t for t in params[key][:2] if t is not None]
    return out


def with_leaves(params, fn):
    return {key: tuple(fn(t) if isinstance(t, torch.Tensor) else t for t in value) for key, value in params.items()}




def run_against_float64(case, dt):
    """(out, expected, inputs, their float64 copies): the triton backend and the float64
    reference on the same fresh inputs, every leaf requiring grad."""
    q, k, v, params = make(case, dt)
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    params = with_leaves(params, lambda t: t.detach().requires_grad_())
    out = vitkernels.head_mixing_attention(q, k, v, **params, backend="triton")
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    p64 = with_leaves(params, lambda t: t.detach().double().requires_grad_())
    expected = reference.head_mixing_attention(q64, k64, v64, scale=q.shape[-1] ** -0.5, **p64)
    return out, expected, [q, k, v, *leaves_of(params)], [q64, k64, v64, *leaves_of(p64)]


def assert_grads_match(out, expected, inputs, inputs64, dt, what):
    g = torch.randn_like(expected)
    expected.backward(g)
    grads = torch.autograd.grad(out, inputs, g.to(dt))
    for name, mine, r in zip(range(99), grads, inputs64, strict=False):
        assert_close(mine, r.grad, GRAD_TOL[dt], f"{what} grad {name}", floor=1.0)


@pytest.mark.parametrize("dtype", list(DTYPES), ids=list(DTYPES))
@pytest.mark.parametrize("case", list(CASES), ids=list(CASES))
def test_forward_and_gradients_match_float64(case, dtype):
    dt = DTYPES[dtype]
    out, expected, inputs, inputs64 = run_against_float64(CASES[case], dt)
    assert out.dtype == dt
    assert_close(out, expected, TOL[dt], f"{case} {dtype} out")
    assert_grads_match(out, expected, inputs, inputs64, dt, f"{case} {dtype}")


@pytest.mark.parametrize("dtype", ["f16", "bf16"])
def test_gradients_through_the_delta_launch_split_over_the_rows(dtype, monkeypatch):
    """CaiT-XXS's patch attention at the smallest batch whose delta launch splits on this
    GPU (``_row_runs``: the whole 64-row blocks, then the last 4 of 196 rows on 16-row
    blocks, which M1's batch 256 runs): gradients against float64, both launches seen."""
    from vitkernels.triton import head_mixing as tk
    from vitkernels.triton._common import sm_count

    if torch.cuda.get_device_capability()[0] < 9:
        pytest.skip("before sm_90 the delta launch takes 16-row blocks: nothing to split")
    batch = sm_count(torch.device("cuda")) // 4 + 1
    assert tk._row_runs(196, 64, batch, sm_count(torch.device("cuda"))) == [(0, 192), (192, 4)]
    seen = []
    real = tk.launch

    def spy(spec):
        if spec.name.startswith("head_mixing_bwd_delta"):
            seen.append((spec.constexprs["ROW0"], spec.constexprs["BLOCK_M"]))
        real(spec)

    monkeypatch.setattr(tk, "launch", spy)
    dt = DTYPES[dtype]
    out, expected, inputs, inputs64 = run_against_float64((batch, 4, 196, 196, 48, "vit-pytorch"), dt)
    assert_grads_match(out, expected, inputs, inputs64, dt, f"split delta {dtype}")
    assert seen == [(0, 64), (192, 16)]


def test_cuda_tensors_go_to_triton_automatically():
    q, k, v, params = make(CASES["CaiT-XXS patch"], torch.bfloat16)
    mix = dict(scale=0.25, pre=params["pre"], post=params["post"])
    assert select(ops.BACKENDS, ops._inputs(q, k, v, **mix)).name == "triton"
    # training with attention dropout: the torch backend
    assert select(ops.BACKENDS, ops._inputs(q, k, v, **mix, dropout_p=0.1)).name == "torch"


def test_deepvit_heads_go_to_triton_with_and_without_gradients():
    """DeepViT-S's re-attention (12 heads of 33): the tensor-core kernels under no_grad
    and when gradients are needed (head_mixing_tc.py's backward)."""
    q, k, v, params = make((2, 12, 197, 197, 33, "re-attention"), torch.bfloat16)
    assert select(ops.BACKENDS, ops._inputs(q, k, v, **params)).name == "triton"
    inputs = ops._inputs(q.requires_grad_(), k, v, **params)
    assert select(ops.BACKENDS, inputs).name == "triton"
    assert ops.TritonBackend().not_supported_reasons(inputs) == []


# 5-16 heads: the tensor-core forward and backward (head_mixing_tc.py)
MANY_HEADS = {
    "CaiT-M H16 N197 D48": (4, 16, 197, 197, 48, "vit-pytorch"),
    "CaiT-S timm H8 N197 D48": (4, 8, 197, 197, 48, "timm"),
    "H12 N50 D64": (4, 12, 50, 50, 64, "vit-pytorch"),
    "H5 Nq1 Nk197 D32": (8, 5, 1, 197, 32, "timm"),
    # re-attention (the head norm): DeepViT-S's 12 heads of 33 (M2), and 6 heads (HP = 8)
    "DeepViT-S H12 N197 D33": (4, 12, 197, 197, 33, "re-attention"),
    "H6 Nq20 Nk49 D64 re-attention": (3, 6, 20, 49, 64, "re-attention"),
}


@pytest.mark.parametrize("dtype", ["f16", "bf16"])
@pytest.mark.parametrize("case", list(MANY_HEADS), ids=list(MANY_HEADS))
def test_many_heads_forward_matches_float64(case, dtype):
    dt = DTYPES[dtype]
    q, k, v, params = make(MANY_HEADS[case], dt)
    assert select(ops.BACKENDS, ops._inputs(q, k, v, **params)).name == "triton"
    out = vitkernels.head_mixing_attention(q, k, v, **params, backend="triton")
    p64 = with_leaves(params, lambda t: t.double())
    expected = reference.head_mixing_attention(*(t.double() for t in (q, k, v)), scale=q.shape[-1] ** -0.5, **p64)
    assert out.dtype == dt
    assert_close(out, expected, TOL[dt], f"{case} {dtype} out")
    # a call that needs gradients: the tensor-core backward, against float64
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    params = with_leaves(params, lambda t: t.detach().requires_grad_())
    assert select(ops.BACKENDS, ops._inputs(q, k, v, **params)).name == "triton"
    out = vitkernels.head_mixing_attention(q, k, v, **params, backend="triton")
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    p64 = with_leaves(params, lambda t: t.detach().double().requires_grad_())
    expected = reference.head_mixing_attention(q64, k64, v64, scale=q.shape[-1] ** -0.5, **p64)
    g = torch.randn_like(expected)
    expected.backward(g)
    grads = torch.autograd.grad(out, [q, k, v, *leaves_of(params)], g.to(dt))
    for name, mine, r in zip(range(99), grads, [q64, k64, v64, *leaves_of(p64)], strict=False):
        assert_close(mine, r.grad, GRAD_TOL[dt], f"{case} {dtype} grad {name}", floor=1.0)
