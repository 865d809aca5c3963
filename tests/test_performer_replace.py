"""optimize(): Token_performer (official T2T-ViT layout) -> FusedTokenPerformer.

Outputs and gradients of the optimized model against the eager one, state_dict
unchanged, train/eval and dropout as the original, restore, and modules that
look like the layout but are not it.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn
from vitkernels.models import create
from vitkernels.models.t2t import Token_performer

import vitkernels
from vitkernels.replace.fused_performer import FusedTokenPerformer

OPS = ("performer_attention",)


def close(a: torch.Tensor, b: torch.Tensor, tol: float) -> None:
    assert torch.isfinite(a).all()
    err = (a - b).abs().max().item()
    scale = b.abs().max().item()
    assert err <= tol * scale, f"max error {err:.3e} > {tol:.1e} * {scale:.3e}"


def test_t2t_vit_14_matches_eager_and_keeps_state_dict():
    model = create("t2t_vit_14").eval()
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        expected = model(x)
    before = model.state_dict()
    report = vitkernels.optimize(model, backend="torch", ops=OPS)
    assert [r.path for r in report.replaced] == [
        "tokens_to_token.attention1",
        "tokens_to_token.attention2",
    ]
    assert all(r.op == "performer_attention" and r.backend == "torch" for r in report.replaced)
    assert isinstance(model.tokens_to_token.attention1, FusedTokenPerformer)
    after = model.state_dict()
    assert list(after) == list(before)
    for key, value in before.items():  # the same storage (adopted tensors), same values
        assert after[key].data_ptr() == value.data_ptr() and torch.equal(after[key], value)
    with torch.no_grad():
        close(model(x), expected, 1e-5)
    assert vitkernels.restore(model) == 2
    assert type(model.tokens_to_token.attention1) is Token_performer


def test_t2t_vit_14_triton_interpreter_matches_eager():
    model = create("t2t_vit_14", img_size=112).eval()  # performers at T = 784 and 196
    x = torch.randn(1, 3, 112, 112)
    with torch.no_grad():
        expected = model(x)
    vitkernels.optimize(model, backend="triton", ops=OPS)
    with torch.no_grad():
        close(model(x), expected, 1e-4)


def test_checkpoints_load_either_way():
    def two():
        return nn.Sequential(_block(), _block(dim=48, in_dim=48))

    eager, fused, eager2 = two(), two(), two()
    vitkernels.optimize(fused, backend="torch", ops=OPS)
    fused.load_state_dict(eager.state_dict(), strict=True)
    eager2.load_state_dict(fused.state_dict(), strict=True)
    x = torch.randn(2, 30, 147)
    eager.eval(), fused.eval(), eager2.eval()
    with torch.no_grad():
        close(fused(x), eager(x), 1e-5)
        close(eager2(x), eager(x), 1e-6)


def _block(dim=147, in_dim=48, kernel_ratio=0.5, **kw) -> nn.Sequential:
    return nn.Sequential(Token_performer(dim=dim, in_dim=in_dim, kernel_ratio=kernel_ratio, **kw))


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_gradients_match_eager(backend):
    """Parameters' and input gradients, with E = 48 and M = 24 (not powers of two)."""
    torch.manual_seed(0)
    eager = _block().eval()
    fused = _block().eval()
    fused.load_state_dict(eager.state_dict())
    vitkernels.optimize(fused, backend=backend, ops=OPS)
    x = torch.randn(2, 50, 147)
    xs = [x.clone().requires_grad_() for _ in range(2)]
    g = torch.randn(2, 50, 48)
    outs = [m(xi) for m, xi in zip((eager, fused), xs, strict=True)]
    close(outs[1], outs[0], 1e-5)
    for out in outs:
        out.backward(g)
    close(xs[1].grad, xs[0].grad, 1e-4)
    for (name, pe), (_, pf) in zip(eager.named_parameters(), fused.named_parameters(), strict=True):
        if pe.requires_grad:
            close(pf.grad, pe.grad, 1e-4)
        else:
            assert name.endswith(".w") and pf.grad is None


def test_trainable_w_gets_its_gradient():
    eager, fused = _block(), _block()
    fused.load_state_dict(eager.state_dict())
    for m in (eager, fused):
        m[0].w.requires_grad_(True)
        m.eval()
    vitkernels.optimize(fused, backend="triton", ops=OPS)
    x = torch.randn(2, 20, 147)
    for m in (eager, fused):
        m(x).square().sum().backward()
    close(fused[0].w.grad, eager[0].w.grad, 1e-4)


def test_train_mode_dropout_as_original():
    eager = _block(dp1=0.5, dp2=0.5)
    fused = _block(dp1=0.5, dp2=0.5)
    fused.load_state_dict(eager.state_dict())
    vitkernels.optimize(fused, backend="torch", ops=OPS)
    x = torch.randn(2, 30, 147)
    for train in (True, False):
        eager.train(train), fused.train(train)
        assert fused[0].training == train and fused[0].dp.training == train
        torch.manual_seed(7)
        a = eager(x)
        torch.manual_seed(7)
        b = fused(x)
        close(b, a, 1e-5)  # same dropout draws, in the same order
        if train:
            torch.manual_seed(8)
            assert not torch.allclose(fused(x), b)


def test_any_module_with_the_official_layout():
    """A user's class with the official parameters (not our Token_performer) is taken;
    its own forward around single_attn is kept."""

    class MyPerformer(nn.Module):
        def __init__(self, dim: int, emb: int) -> None:
            super().__init__()
            self.emb, self.m, self.epsilon = emb, emb // 2, 1e-8
            self.kqv = nn.Linear(dim, 3 * emb)
            self.proj = nn.Linear(emb, emb)
            self.dp = nn.Dropout(0.0)
            w = nn.init.orthogonal_(torch.empty(self.m, emb)) * math.sqrt(self.m)
            self.w = nn.Parameter(w, requires_grad=False)

        def single_attn(self, x):
            k, q, v = torch.split(self.kqv(x), self.emb, dim=-1)

            def phi(t):
                t = t.float()
                a = t @ self.w.t() - (t * t).sum(-1, keepdim=True) / 2
                return torch.exp(a) / math.sqrt(self.m)

            kp, qp = phi(k), phi(q)
            d = (qp * kp.sum(1, keepdim=True)).sum(-1, keepdim=True)
            y = qp @ (kp.transpose(1, 2) @ v) / (d + self.epsilon)
            return v + self.dp(self.proj(y))

        def forward(self, x):
            return 2.0 * self.single_attn(x) - 1.0

    model = nn.Sequential(MyPerformer(30, 32))
    x = torch.randn(2, 25, 30) / 2
    expected = model(x)
    report = vitkernels.optimize(model, backend="triton", ops=OPS)
    assert report.count("performer_attention") == 1
    close(model(x), expected, 1e-5)


def test_look_alikes_are_left_with_a_reason():
    def broken(**changes):
        m = Token_performer(dim=20, in_dim=16)
        for name, value in changes.items():
            setattr(m, name, value)
        return m

    model = nn.Sequential(
        broken(kqv=nn.Linear(20, 40)),
        broken(w=nn.Parameter(torch.randn(8, 12), requires_grad=False)),
        broken(epsilon=-1.0),
        broken(proj=nn.Identity()),
    )
    report = vitkernels.optimize(model, ops=OPS)
    assert report.count() == 0
    reasons = [r.reason for r in report.left]
    assert len(reasons) == 4
    assert "kqv has 40 outputs, expected 3 * emb = 48" in reasons[0]
    assert "w has shape (8, 12), expected (M, emb=16)" in reasons[1]
    assert "epsilon is -1.0" in reasons[2]
    assert "proj is Identity" in reasons[3]
    assert all(type(m) is Token_performer for m in model)


def test_half_precision_model_on_the_kernels():
    """A float16 model (w cast too) runs on the kernels."""
    eager = _block().eval()
    fused = _block().eval()
    fused.load_state_dict(eager.state_dict())
    vitkernels.optimize(fused, backend="triton", ops=OPS)
    fused.half()
    x = torch.randn(2, 40, 147)
    out = fused(x.half())
    assert out.dtype == torch.float16
    close(out.float(), eager(x), 2e-2)


# ----------------------------------------------------------------------------
# subclasses: replaced only where the fused math is theirs


class ReluFeatures(Token_performer):
    """Performer with ReLU random features instead of exp: another function."""

    def prm_exp(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(x.float() @ self.w.float().t()) / math.sqrt(self.m) + 1e-3


def test_subclass_overriding_prm_exp_is_left_with_the_reason():
    model = nn.Sequential(ReluFeatures(dim=20, in_dim=16)).eval()
    x = torch.randn(2, 30, 20)
    with torch.no_grad():
        want = model(x)
    report = vitkernels.optimize(model, ops=OPS)
    assert report.count() == 0, str(report)
    (left,) = report.left
    assert "ReluFeatures overrides prm_exp of Token_performer" in left.reason
    assert "the fused op computes another function" in left.reason
    assert type(model[0]) is ReluFeatures
    with torch.no_grad():
        assert torch.equal(model(x), want)


class _OwnForward(Token_performer):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.single_attn(self.norm1(x))
        return y + 0.5 * self.mlp(self.norm2(y))


def _own_forward_class() -> type[nn.Module]:
    """A subclass under the official name (as a user's copy would be) with its own forward."""
    return type("Token_performer", (_OwnForward,), {})


@pytest.mark.parametrize("ops", [OPS, ("patch_embed", "performer_attention")])
def test_subclass_with_its_own_forward_inside_t2t_module_keeps_it(ops):
    """Its single_attn is fused (checked at optimize time) and its own forward runs:
    the T2T module does not fold norm1 and kqv into its soft split for it."""
    from vitkernels.models.t2t import T2T_module

    t2t = T2T_module(img_size=32, embed_dim=48, token_dim=16)
    own = _own_forward_class()(dim=3 * 49, in_dim=16, kernel_ratio=0.5)
    own.load_state_dict(t2t.attention1.state_dict())
    t2t.attention1 = own
    model = nn.Sequential(t2t).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        want = model(x)
    report = vitkernels.optimize(model, backend="torch", ops=ops)
    with torch.no_grad():
        close(model(x), want, 1e-5)
    performers = {r.path: r for r in report.replaced if r.op == "performer_attention"}
    assert set(performers) == {"0.attention1", "0.attention2"}, str(report)
    assert "overrides forward of Token_performer" in performers["0.attention1"].checked
    assert performers["0.attention2"].checked == ""
    assert not model[0].attention1._vk.spec.takes_kqv and model[0].attention2._vk.spec.takes_kqv
