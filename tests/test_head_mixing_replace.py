"""optimize() on head-mixing attention modules: CaiT's talking heads (this repo,
vit-pytorch, timm's TalkingHeadAttn) and DeepViT's re-attention (this repo,
vit-pytorch), one layer each, against the eager module as the oracle.

In float64 the fused forward (the torch backend, the automatic choice on CPU, and
the reference backend) gives the original's output and gradients to rounding
(1e-12 of the magnitude); a seeded training step with attention dropout on the
reference backend draws the original's masks (the same F.dropout call on a tensor
of the same shape and layout: vit-pytorch's and this repo's); the Triton kernels (interpreter) match in float32; the module
stays the original to its users (state_dict, hooks, restore).
"""

from __future__ import annotations

import copy
import importlib

import pytest
import torch
from torch import nn

import vitkernels
from vitkernels.replace.fused_head_mixing import FusedHeadMixing


def _module(kind: str, dropout: float = 0.0) -> tuple[nn.Module, torch.Tensor, tuple]:
    """(module with randomised mixing parameters, tokens (B, N, C), extra forward args)."""
    source, family = kind.split(":")
    if source == "timm":
        cait = pytest.importorskip("timm.models.cait")
        m = cait.TalkingHeadAttn(24, num_heads=3, qkv_bias=True, attn_drop=dropout)
        x, extra = torch.randn(2, 7, 24), ()
    else:
        path = {"zoo": "vitkernels.models.", "vit-pytorch": "vit_pytorch."}[source] + family
        if source == "vit-pytorch":
            pytest.importorskip("vit_pytorch")
        mod = importlib.import_module(path)
        m = mod.Attention(24, heads=3, dim_head=8, dropout=dropout)
        x = torch.randn(2, 7, 24)
        # CaiT's class attention: one query over itself and a context of 6 tokens
        extra = (torch.randn(2, 6, 24),) if family == "cait" else ()
        if family == "cait":
            x = x[:, :1]
    with torch.no_grad():
        for p in m.parameters():
            p.add_(0.3 * torch.randn_like(p))  # norms and biases away from their init
    return m, x, extra


KINDS = ["zoo:cait", "vit-pytorch:cait", "timm:cait", "zoo:deepvit", "vit-pytorch:deepvit"]


def _fused(m: nn.Module, backend: str | None) -> nn.Module:
    wrapper = nn.Sequential(m)
    report = vitkernels.optimize(wrapper, backend=backend, ops=("head_mixing_attention",))
    assert report.count("head_mixing_attention") == 1, str(report)
    assert isinstance(m, FusedHeadMixing)
    return m


@pytest.mark.parametrize("backend", [None, "reference"], ids=["auto", "reference"])
@pytest.mark.parametrize("kind", KINDS)
def test_float64_outputs_and_gradients_are_the_originals(kind, backend):
    eager, x, extra = _module(kind)
    eager = eager.double().train()
    fused = _fused(copy.deepcopy(eager), backend)
    x = x.double().requires_grad_()
    extra = tuple(e.double() for e in extra)
    want = eager(x, *extra)
    got = fused(x, *extra)
    scale = want.abs().max().item()
    assert (got - want).abs().max().item() <= 1e-12 * scale
    g = torch.randn_like(want)
    want_grads = torch.autograd.grad(want, [x, *eager.parameters()], g)
    got_grads = torch.autograd.grad(got, [x, *fused.parameters()], g, allow_unused=True)
    names = ["x"] + [n for n, _ in eager.named_parameters()]
    for name, a, b in zip(names, got_grads, want_grads, strict=True):
        if name == "proj_l.bias":  # the softmax ignores it: a zero gradient, up to rounding
            assert a is None or a.abs().max().item() <= 1e-12 * max(1.0, b.abs().max().item())
            continue
        assert (a - b).abs().max().item() <= 1e-11 * max(1.0, b.abs().max().item()), name


# timm draws its mask on a head-last (B, N, N, H) memory layout (proj_w's output
# permuted back), so the same seed gives other (equally distributed) masks there
@pytest.mark.parametrize("kind", [k for k in KINDS if not k.startswith("timm")])
def test_seeded_training_with_attention_dropout_draws_the_originals_masks(kind):
    eager, x, extra = _module(kind, dropout=0.3)
    eager = eager.double().train()
    fused = _fused(copy.deepcopy(eager), "reference")
    x, extra = x.double(), tuple(e.double() for e in extra)
    torch.manual_seed(7)
    want = eager(x, *extra)
    torch.manual_seed(7)
    got = fused(x, *extra)
    assert (got - want).abs().max().item() <= 1e-12 * want.abs().max().item()
    torch.manual_seed(8)  # dropout is live
    assert not torch.allclose(fused(x, *extra), want)


@pytest.mark.parametrize("kind", ["zoo:cait", "timm:cait", "vit-pytorch:deepvit"])
def test_triton_kernels_match_the_original_in_float32(kind):
    """The fused module on the Triton kernels (the interpreter on CPU tensors)."""
    eager, x, extra = _module(kind)
    eager = eager.eval()
    heads = getattr(eager, "heads", getattr(eager, "num_heads", 0))
    assert heads <= 4
    fused = _fused(copy.deepcopy(eager), "triton")
    with torch.no_grad():
        want = eager(x, *extra)
        got = fused(x, *extra)
    assert (got - want).abs().max().item() <= 1e-4 * want.abs().max().item()


@pytest.mark.parametrize("kind, heads, dim_head", [("zoo:deepvit", 12, 33), ("vit-pytorch:deepvit", 12, 33),
                                                   ("vit-pytorch:deepvit", 16, 64)])
def test_deepvit_s_heads_take_the_tensor_core_forward_and_backward(kind, heads, dim_head, monkeypatch):
    """DeepViT-S's re-attention (12 heads of 33: rows of 66 bytes) and vit-pytorch's
    README DeepViT's (16 heads of 64: the backward's dk in two launches) in float16 on
    the Triton kernels (the interpreter): under no_grad the fused layer launches the
    5-16-head forward with the head norm (head_mixing_tc) and matches the eager layer
    in float64; with gradients it runs the 5-16-head backward too, and the gradients
    of the input and of the re-attention's parameters match eager's in float64."""
    from vitkernels.triton import head_mixing_tc

    source, family = kind.split(":")
    if source == "vit-pytorch":
        pytest.importorskip("vit_pytorch")
    mod = importlib.import_module({"zoo": "vitkernels.models.", "vit-pytorch": "vit_pytorch."}[source] + family)
    eager = mod.Attention(48, heads=heads, dim_head=dim_head).eval()
    with torch.no_grad():
        for p in eager.parameters():
            p.add_(0.3 * torch.randn_like(p))
    x = torch.randn(2, 19, 48)
    calls = []
    launcher = head_mixing_tc.head_mixing_attention_fwd_tc

    def spy(q, k, v, *args):
        calls.append((tuple(q.shape), args[7]))  # (pre_w, post_w, post_b, norm_w, norm_b, scale, eps, has_norm, ...)
        return launcher(q, k, v, *args)

    monkeypatch.setattr(head_mixing_tc, "head_mixing_attention_fwd_tc", spy)
    fused = _fused(copy.deepcopy(eager).half(), "triton")
    with torch.no_grad():
        want = eager.double()(x.double())
        got = fused(x.half())
    assert calls == [((2, heads, 19, dim_head), True)]
    assert got.dtype == torch.float16
    assert (got.double() - want).abs().max().item() <= 1e-2 * want.abs().max().item()
    bwd_launcher = head_mixing_tc.head_mixing_attention_bwd_tc
    bwd_calls = []

    def bwd_spy(grad_out, q, k, v, *args):
        # the forward's padded copies of k and v (heads of 33), read instead of padding again
        copies = args[-1]
        bwd_calls.append((tuple(q.shape), None if copies is None else tuple(copies[0].shape)))
        return bwd_launcher(grad_out, q, k, v, *args)

    monkeypatch.setattr(head_mixing_tc, "head_mixing_attention_bwd_tc", bwd_spy)
    eager64 = eager.double()
    xh, x64 = x.half().requires_grad_(), x.double().requires_grad_()
    gy = torch.randn(2, 19, 48)
    fused(xh).backward(gy.half())
    eager64(x64).backward(gy.double())
    # the forward's padded copies of k and v where rows are not whole 16-byte vectors
    assert bwd_calls == [((2, heads, 19, dim_head), (2, 12, 19, 48) if dim_head == 33 else None)]
    pairs = [("x", xh.grad, x64.grad)] + [
        (n, p.grad, dict(eager64.named_parameters())[n].grad)
        for n, p in fused.named_parameters() if p.grad is not None and n in dict(eager64.named_parameters())
    ]  # fmt: skip
    assert len(pairs) > 1, pairs
    for name, g, r in pairs:
        assert (g.double() - r).abs().max().item() <= 2e-2 * r.abs().max().item(), name


@pytest.mark.parametrize("kind", KINDS)
def test_the_fused_module_is_the_original_to_its_users(kind):
    """Same state_dict tensors, hooks still fire, isinstance holds, restore returns
    the original class; a (B, C) input (no token axis) takes the original forward."""
    m, x, extra = _module(kind)
    m = m.eval()
    cls = type(m)
    before = m.state_dict()
    calls = []
    m.register_forward_hook(lambda mod, args, out: calls.append(out.shape))
    with torch.no_grad():
        want = m(x, *extra)
    fused = _fused(m, None)
    assert isinstance(fused, cls) and type(fused).__name__ == cls.__name__
    after = fused.state_dict()
    assert list(after) == list(before)
    assert all(after[k].data_ptr() == v.data_ptr() for k, v in before.items())
    with torch.no_grad():
        got = fused(x, *extra)
    assert len(calls) == 2 and calls[0] == calls[1]
    assert (got - want).abs().max().item() <= 1e-4 * want.abs().max().item()  # float32
    assert "vitkernels=head_mixing_attention [auto]" in repr(fused)
    assert vitkernels.restore(nn.Sequential(fused)) == 1
    assert type(fused) is cls


def test_a_mixing_matrix_of_the_wrong_size_is_left_with_the_reason():
    m, _, _ = _module("zoo:cait")
    m.mix_heads_pre_attn = nn.Parameter(torch.randn(3, 2))
    report = vitkernels.optimize(nn.Sequential(m), ops=("head_mixing_attention",))
    assert report.count() == 0 and len(report.left) == 1
    assert "mix_heads_pre_attn has shape (3, 2), expected (heads, heads) = (3, 3)" in report.left[0].reason


def test_a_subclass_with_its_own_forward_is_checked_at_optimize_time():
    zoo = importlib.import_module("vitkernels.models.deepvit")

    class Scaled(zoo.Attention):
        def forward(self, x):
            return 2 * super().forward(x)

    m = Scaled(24, heads=3, dim_head=8)
    report = vitkernels.optimize(nn.Sequential(m), ops=("head_mixing_attention",))
    assert report.count() == 0 and "computes another function" in report.left[0].reason
