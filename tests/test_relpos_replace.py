"""optimize() on LeViT attention: vit-pytorch's levit.Attention, this repo's
models.levit.Attention, timm's levit.Attention and AttentionDownsample.

The original module is the oracle: outputs in eval and train mode (BatchNorm on
batch statistics), gradients of every parameter (the bias tables included),
dropout, state_dict identity, restore, timm's eval-time bias cache, and the
fallbacks (a bias index that is not |dr|*C + |dc|, a layout the fused module does
not know). Every parameter and BatchNorm statistic is randomised first: LeViT
initialises the output BatchNorm weight to zero (and timm the bias tables), which
would hide the attention from the output.
"""

from __future__ import annotations

import copy

import _numerics
import pytest
import torch
from torch import nn

import vitkernels
from vitkernels.replace import FusedModule
from vitkernels.replace import fused_relpos as fr

levit_vp = pytest.importorskip("vit_pytorch.levit")
timm_levit = pytest.importorskip("timm.models.levit")
from vitkernels.models import levit as levit_zoo  # noqa: E402

OP = ("relpos_attention",)
BACKENDS = ["torch", "triton", "reference"]


def randomize(model: nn.Module) -> nn.Module:
    """Random parameters (tables and zero-initialised BatchNorm weights included) and stats."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)):
                m.weight.uniform_(0.5, 1.5)
                m.bias.normal_(0, 0.3)
                m.running_mean.normal_(0, 0.3)
                m.running_var.uniform_(0.5, 1.5)
        for name, p in model.named_parameters():
            if name.endswith(("pos_bias.weight", "attention_biases")):
                p.normal_(0, 1.0)
    return model


def assert_close(actual, expected, tol=2e-5, what="", floor=1e-3):
    """The shared check (tests/_numerics.py) at this file's float32 tolerance, errors
    measured against at least 1e-3 (outputs and gradients of O(1) inputs)."""
    _numerics.assert_close(actual, expected, tol, what, floor=floor)


def wrap(module: nn.Module) -> nn.Module:
    return nn.Sequential(module)  # optimize replaces children in place


# ----------------------------------------------------------------------------
# single attention modules

# id: (factory, input shape)
MODULES = {
    "vit-pytorch": (lambda: levit_vp.Attention(16, fmap_size=7, heads=2, dim_key=8, dim_value=12), (2, 16, 7, 7)),
    "vit-pytorch shrink 7to4": (lambda: levit_vp.Attention(16, fmap_size=7, heads=3, dim_key=8, dim_value=12, dim_out=20, downsample=True), (2, 16, 7, 7)),
    "zoo": (lambda: levit_zoo.Attention(16, fmap_size=6, heads=2, dim_key=16, dim_value=24), (2, 16, 6, 6)),
    "zoo shrink 6to3": (lambda: levit_zoo.Attention(16, fmap_size=6, heads=2, dim_key=16, dim_value=24, downsample=True), (2, 16, 6, 6)),
    "timm tokens": (lambda: timm_levit.Attention(16, key_dim=8, num_heads=2, attn_ratio=2, resolution=(5, 6)), (2, 30, 16)),
    "timm conv": (lambda: timm_levit.Attention(16, key_dim=8, num_heads=2, attn_ratio=3, resolution=(6, 5), use_conv=True), (2, 16, 6, 5)),
    "timm down tokens": (lambda: timm_levit.AttentionDownsample(16, 24, key_dim=8, num_heads=2, attn_ratio=2, resolution=(7, 5)), (2, 35, 16)),
    "timm down conv pool": (lambda: timm_levit.AttentionDownsample(16, 24, key_dim=16, num_heads=3, attn_ratio=2, resolution=(5, 7), use_conv=True, use_pool=True), (2, 16, 5, 7)),
}  # fmt: skip


def fused_pair(name: str, backend: str):
    factory, shape = MODULES[name]
    original = randomize(factory())
    model = wrap(copy.deepcopy(original))
    report = vitkernels.optimize(model, backend=backend, ops=OP)
    assert report.count("relpos_attention") == 1 and not report.left, str(report)
    assert isinstance(model[0], FusedModule)
    return original, model, torch.randn(shape)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", list(MODULES))
def test_module_eval_matches_original(name, backend):
    original, model, x = fused_pair(name, backend)
    original.eval(), model.eval()
    with torch.no_grad():
        assert_close(model(x), original(x), what=name)


@pytest.mark.parametrize("name", list(MODULES))
def test_module_training_outputs_and_gradients(name):
    """Train mode (BatchNorm on batch statistics): every parameter's gradient, tables included."""
    original, model, x = fused_pair(name, "triton")
    original.train(), model.train()
    xo, xf = x.clone().requires_grad_(), x.clone().requires_grad_()
    out_o, out_f = original(xo), model(xf)
    assert_close(out_f, out_o, what=f"{name} output")
    g = torch.randn_like(out_o)
    out_o.backward(g)
    out_f.backward(g)
    assert_close(xf.grad, xo.grad, 5e-5, f"{name} dx")
    params_f = dict(model[0].named_parameters())
    # some gradients are 0 up to rounding (a BatchNorm shift of k leaves the softmax as
    # it is): compare those at the scale of the module's gradients
    floor = 0.1 * max(p.grad.abs().max().item() for p in original.parameters())
    for pname, p in original.named_parameters():
        assert params_f[pname].grad is not None, pname
        assert_close(params_f[pname].grad, p.grad, 5e-5, f"{name} d{pname}", floor)
    assert any(k.endswith(("pos_bias.weight", "attention_biases")) for k in params_f)


@pytest.mark.parametrize("name", ["vit-pytorch shrink 7to4", "timm tokens"])
def test_module_half_precision_triton(name):
    original, model, x = fused_pair(name, "triton")
    original.eval(), model.half().eval()
    with torch.no_grad():
        assert_close(model(x.half()).float(), original(x), 2e-2, name)


def test_strided_views_reach_the_op_without_copies(monkeypatch):
    """q, k, v handed to the op are views of the 1x1 conv outputs."""
    seen = []
    real = fr.relpos_attention

    def spy(q, k, v, table, **kw):
        seen.append((q.is_contiguous(), k.is_contiguous(), v.is_contiguous(), q._base is not None))
        return real(q, k, v, table, **kw)

    monkeypatch.setattr(fr, "relpos_attention", spy)
    original, model, x = fused_pair("vit-pytorch shrink 7to4", "torch")
    model.eval()(x)
    assert seen == [(False, False, False, True)]


def test_dropout_in_training_runs_the_original_math(monkeypatch):
    """Attention dropout is drawn exactly as the original draws it; eval runs the op."""
    original = randomize(levit_vp.Attention(16, fmap_size=5, heads=2, dim_key=8, dim_value=8, dropout=0.3))
    model = wrap(copy.deepcopy(original))
    vitkernels.optimize(model, backend="triton", ops=OP)
    x = torch.randn(2, 16, 5, 5)
    original.train(), model.train()
    torch.manual_seed(7)
    expected = original(x)
    torch.manual_seed(7)
    assert torch.equal(model(x), expected)

    calls = []
    real = fr.relpos_attention
    monkeypatch.setattr(fr, "relpos_attention", lambda *a, **k: calls.append(1) or real(*a, **k))
    original.eval(), model.eval()
    with torch.no_grad():
        assert_close(model(x), original(x))
    assert calls == [1]


@pytest.mark.parametrize("name, bad", [("vit-pytorch", (1, 16, 6, 6)), ("timm tokens", (1, 31, 16))])
def test_input_on_another_grid_raises_what_the_original_raises(name, bad):
    """An input the bias table was not built for goes to the original forward: the
    caller sees the original's own exception (type and message)."""
    original, model, _ = fused_pair(name, "torch")
    x = torch.randn(bad)
    with pytest.raises(Exception) as expected:
        original(x)
    with pytest.raises(type(expected.value)) as got:
        model(x)
    assert str(got.value) == str(expected.value)


# ----------------------------------------------------------------------------
# timm's bias cache and index check


def test_timm_bias_cache_is_never_served_stale():
    original = randomize(timm_levit.Attention(16, key_dim=8, num_heads=2, attn_ratio=2, resolution=(4, 4)))
    model = wrap(original).eval()
    x = torch.randn(2, 16, 16)
    with torch.no_grad():
        model(x)  # fills timm's attention_bias_cache with the current biases
    assert original.attention_bias_cache
    vitkernels.optimize(model, backend="triton", ops=OP)
    with torch.no_grad():
        original.attention_biases.normal_()  # e.g. a checkpoint loaded in eval mode
        fused_out = model(x)
        fresh = copy.deepcopy(original)
        fresh.attention_bias_cache = {}
        assert_close(fused_out, fresh(x))  # the fused module reads attention_biases
    vitkernels.restore(model)
    assert model[0] is original and original.attention_bias_cache == {}
    with torch.no_grad():
        assert_close(model(x), fused_out)


def _transposed_convention(module) -> torch.Tensor:
    """|dc| * R + |dr|: a relative-position index that is not the op's formula."""
    R, C = module.resolution
    pos = torch.stack(torch.meshgrid(torch.arange(R), torch.arange(C), indexing="ij")).flatten(1)
    rel = (pos[:, :, None] - pos[:, None, :]).abs()
    return rel[1] * R + rel[0]


def test_timm_index_that_is_not_the_formula_is_left_with_a_reason():
    module = timm_levit.Attention(16, key_dim=8, num_heads=2, attn_ratio=2, resolution=(5, 5))
    module.attention_bias_idxs.copy_(_transposed_convention(module))
    model = wrap(module)
    report = vitkernels.optimize(model, backend="torch", ops=OP)
    assert report.count() == 0 and model[0] is module
    (left,) = report.left
    assert "attention_bias_idxs does not encode |dr|*C + |dc|" in left.reason, left.reason


def test_vit_pytorch_index_that_is_not_the_formula_is_left_with_a_reason():
    module = levit_vp.Attention(16, fmap_size=4, heads=2, dim_key=8, dim_value=8)
    module.pos_indices[0, 1] = 5  # the formula says |0 - 0| * 4 + |0 - 1| = 1
    report = vitkernels.optimize(wrap(module), backend="torch", ops=OP)
    (left,) = report.left
    assert report.count() == 0 and "pos_indices does not encode" in left.reason


def test_unknown_layout_is_left_with_what_is_missing():
    module = levit_vp.Attention(16, fmap_size=4, heads=2, dim_key=8, dim_value=8)
    module.pos_bias = nn.Linear(2, 2)
    report = vitkernels.optimize(wrap(module), backend="torch", ops=OP)
    (left,) = report.left
    assert "pos_bias (Linear, expected Embedding)" in left.reason, left.reason


# ----------------------------------------------------------------------------
# whole models

_LEVIT_KW = dict(num_classes=10, stages=3, dim=(32, 48, 64), depth=1, heads=(2, 3, 4),
                 mlp_mult=2, dim_key=8, dim_value=16)  # fmt: skip
_TIMM_KW = dict(num_classes=10, embed_dim=(32, 48, 64), key_dim=8, depth=(1, 1, 1),
                num_heads=(2, 3, 4), attn_ratio=2.0, mlp_ratio=2.0)  # fmt: skip

# id: (factory, image (H, W), attention modules)
MODELS = {
    "vit-pytorch 112 (7to4 shrink)": (lambda: levit_vp.LeViT(image_size=112, **_LEVIT_KW), (112, 112), 5),
    "zoo 64": (lambda: levit_zoo.LeViT(image_size=64, **_LEVIT_KW), (64, 64), 5),
    "timm tokens 112x80": (lambda: timm_levit.Levit(img_size=(112, 80), **_TIMM_KW), (112, 80), 5),
    "timm conv 80x112": (lambda: timm_levit.Levit(img_size=(80, 112), use_conv=True, **_TIMM_KW), (80, 112), 5),
}  # fmt: skip


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("name", list(MODELS))
def test_model_outputs_state_dict_and_restore(name, backend):
    factory, (H, W), count = MODELS[name]
    eager = randomize(factory()).eval()
    x = torch.randn(2, 3, H, W)
    with torch.no_grad():
        expected = eager(x)
    model = copy.deepcopy(eager)
    before = model.state_dict()
    report = vitkernels.optimize(model, backend=backend)
    assert report.count("relpos_attention") == count, str(report)
    # left: only the convolutional stem, which no rule knows (reported as such)
    assert [(r.path, r.rule) for r in report.left] in ([("stem", "")], [("conv_embedding", "")])
    assert "no rule recognises this patch embedding layout" in str(report)
    after = model.state_dict()
    assert list(after) == list(before)
    assert all(after[k] is before[k] or after[k].data_ptr() == before[k].data_ptr() for k in before)
    with torch.no_grad():
        assert_close(model(x), expected, what=name)
    assert vitkernels.restore(model) >= count
    assert not any(isinstance(m, FusedModule) for m in model.modules())
    with torch.no_grad():
        assert_close(model(x), expected, what=f"{name} restored")


def test_checkpoint_loads_across_optimize():
    eager = randomize(levit_vp.LeViT(image_size=64, **_LEVIT_KW)).eval()
    model = levit_vp.LeViT(image_size=64, **_LEVIT_KW).eval()
    vitkernels.optimize(model, backend="torch", ops=OP)
    model.load_state_dict(eager.state_dict(), strict=True)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert_close(model(x), eager(x))
    fresh = levit_vp.LeViT(image_size=64, **_LEVIT_KW).eval()
    fresh.load_state_dict(model.state_dict(), strict=True)
    with torch.no_grad():
        assert_close(fresh(x), eager(x))


def test_other_ops_leave_levit_alone():
    model = levit_zoo.LeViT(image_size=64, **_LEVIT_KW)
    report = vitkernels.optimize(model, backend="torch", ops=("attention",))
    assert report.count() == 0
    assert not any(isinstance(m, FusedModule) for m in model.modules())


def test_grid_comes_from_the_module_the_op_cannot_tell(monkeypatch):
    """A (2, 8) grid has the 16 keys of a (4, 4) one: the op cannot tell them apart
    (its docstring says so), so the fused module passes its module's own grid."""
    assert "cannot tell the grid from the shapes" in vitkernels.relpos_attention.__doc__
    grids = []
    real = fr.relpos_attention
    monkeypatch.setattr(fr, "relpos_attention", lambda *a, **k: grids.append(k["fmap_size"]) or real(*a, **k))
    for resolution in ((2, 8), (8, 2), (4, 4)):
        original = randomize(timm_levit.Attention(16, key_dim=8, num_heads=2, attn_ratio=2, resolution=resolution))
        original.eval()
        model = wrap(copy.deepcopy(original))
        assert vitkernels.optimize(model, backend="torch", ops=OP).count() == 1
        x = torch.randn(2, 16, 16)
        with torch.no_grad():
            assert_close(model(x), original(x), what=str(resolution))
        assert grids[-1] == resolution
    q = torch.randn(1, 2, 16, 8)
    table = torch.randn(2, 16)
    wide = vitkernels.relpos_attention(q, q, q, table, fmap_size=(2, 8))
    square = vitkernels.relpos_attention(q, q, q, table, fmap_size=(4, 4))
    assert not torch.allclose(wide, square)  # both accepted, different answers
