"""Model zoo part A: ViT, DeepViT, CaiT, CrossViT, PiT, distillation (DeiT).

* every named configuration builds, runs forward and backward (small images,
  reduced depth, full widths) with the right output shape; at full size (on
  the meta device) it has the published parameter count or the paper's
  stage layout;
* parity with vit-pytorch: its state_dict (every parameter perturbed, so that
  LayerNorms and scales are not at their init values) loads with strict=True
  and the outputs match in eval mode, rtol 1e-5;
* distillation: DistillWrapper's soft and hard losses match vit-pytorch's and
  backpropagate, also with DistillableT2TViT (whose vit-pytorch version fails);
* errors: ValueError naming the parameter, the given and the expected value.
"""

from __future__ import annotations

import importlib

import pytest
import torch
import vitkernels.models.cait as cait_mod
import vitkernels.models.crossvit as crossvit_mod
import vitkernels.models.deepvit as deepvit_mod
import vitkernels.models.distill as distill_mod
import vitkernels.models.pit as pit_mod
import vitkernels.models.vit as vit_mod
from _numerics import assert_close
from torch import nn

MODULES = (vit_mod, deepvit_mod, cait_mod, crossvit_mod, pit_mod, distill_mod)

# ----------------------------------------------------------------------------
# named configurations: small images and depth, full widths

_CROSS_SMALL = dict(image_size=48, depth=1, lg_enc_depth=1)
NAMES = {
    "vit_b16": (32, dict(image_size=32, depth=1)),
    "deit_ti": (32, dict(image_size=32, depth=1)),
    "deit_s": (32, dict(image_size=32, depth=1)),
    "deit_b": (32, dict(image_size=32, depth=1)),
    "deepvit_s": (32, dict(image_size=32, depth=1)),
    "cait_xxs24": (32, dict(image_size=32, depth=1, cls_depth=1)),
    "cait_s24": (32, dict(image_size=32, depth=1, cls_depth=1)),
    "crossvit_ti": (48, _CROSS_SMALL),
    "crossvit_s": (48, _CROSS_SMALL),
    "crossvit_b": (48, _CROSS_SMALL),
    "pit_ti": (32, dict(image_size=32, depth=(1, 1, 1))),
    "pit_s": (32, dict(image_size=32, depth=(1, 1, 1))),
    "pit_b": (28, dict(image_size=28, depth=(1, 1, 1))),
}


def test_registry_names():
    names = set().union(*(mod.CONFIGS for mod in MODULES))
    assert names == set(NAMES)
    from vitkernels.models import list_models

    assert set(NAMES) <= set(list_models())


@pytest.mark.parametrize("name", sorted(NAMES))
def test_named_config_forward_backward(name):
    from vitkernels.models import create

    side, overrides = NAMES[name]
    model = create(name, num_classes=5, **overrides)
    out = model(torch.randn(2, 3, side, side))
    assert out.shape == (2, 5)
    out.square().mean().backward()
    for pname, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), pname


def _n_params(name: str) -> float:
    from vitkernels.models import create

    with torch.device("meta"):
        model = create(name)
    return sum(p.numel() for p in model.parameters()) / 1e6


@pytest.mark.parametrize(
    "name, millions, rel",
    [  # published counts (timm's implementations of the papers' models)
        ("vit_b16", 86.6, 0.01),
        ("deit_ti", 5.7, 0.01),
        ("deit_s", 22.05, 0.01),
        ("deit_b", 86.6, 0.01),
        ("cait_xxs24", 11.96, 0.01),
        ("cait_s24", 46.9, 0.01),
        ("crossvit_ti", 7.0, 0.03),  # plain Linear class-token projections: a little off
        ("crossvit_s", 26.9, 0.03),
        ("crossvit_b", 105.0, 0.03),
        ("deepvit_s", 27.0, 0.05),  # the paper's conv stem is not in vit-pytorch's layout
    ],
)
def test_published_parameter_counts(name, millions, rel):
    assert _n_params(name) == pytest.approx(millions, rel=rel)


@pytest.mark.parametrize(
    "name, patch, depths, widths, heads, dim_head",
    [  # PiT paper Table 1 (timm pit_*_224)
        ("pit_ti", 16, (2, 6, 4), (64, 128, 256), (2, 4, 8), 32),
        ("pit_s", 16, (2, 6, 4), (144, 288, 576), (3, 6, 12), 48),
        ("pit_b", 14, (3, 6, 4), (256, 512, 1024), (4, 8, 16), 64),
    ],
)
def test_pit_configs_follow_paper(name, patch, depths, widths, heads, dim_head):
    with torch.device("meta"):
        model = pit_mod.CONFIGS[name]()
    assert model.patch_size == patch
    stages = [m for m in model.layers if isinstance(m, pit_mod.Transformer)]
    assert tuple(len(s.layers) for s in stages) == depths
    assert tuple(s.layers[0][0].norm.normalized_shape[0] for s in stages) == widths
    assert tuple(s.layers[0][0].heads for s in stages) == heads
    assert all(
        s.layers[0][0].to_qkv.out_features == 3 * h * dim_head
        for s, h in zip(stages, heads, strict=True)
    )


# ----------------------------------------------------------------------------
# parity with vit-pytorch


@pytest.fixture(scope="module")
def vp():
    pytest.importorskip("vit_pytorch")
    return lambda name: importlib.import_module(f"vit_pytorch.{name}")


def _perturb(model: nn.Module) -> nn.Module:
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return model


def _assert_parity(ref: nn.Module, ours: nn.Module, *inputs: torch.Tensor, **kwargs) -> None:
    ref = _perturb(ref).eval()
    ours.load_state_dict(ref.state_dict(), strict=True)
    ours.eval()
    with torch.no_grad():
        expected, got = ref(*inputs, **kwargs), ours(*inputs, **kwargs)
    expected = expected if isinstance(expected, tuple) else (expected,)
    got = got if isinstance(got, tuple) else (got,)
    for e, g in zip(expected, got, strict=True):
        assert_close(g, e, what="against vit-pytorch")


SMALL = dict(image_size=32, patch_size=8, num_classes=7, dim=32, depth=2, heads=4, mlp_dim=48)


@pytest.mark.parametrize(
    "overrides, side",
    [
        (dict(), (32, 32)),
        (dict(pool="mean", dim_head=16), (32, 32)),
        (dict(num_classes=0), (32, 32)),  # no head: all tokens come back
        (dict(image_size=(32, 48), patch_size=(8, 16), channels=1), (32, 48)),
        (dict(heads=1, dim_head=32), (16, 16)),  # Identity out-projection; smaller image
    ],
)
def test_vit_parity(vp, overrides, side):
    kw = {**SMALL, **overrides}
    img = torch.randn(2, kw.get("channels", 3), *side)
    _assert_parity(vp("vit").ViT(**kw), vit_mod.ViT(**kw), img)


def test_deepvit_parity(vp):
    kw = dict(SMALL, dim_head=8, pool="mean")
    _assert_parity(
        vp("deepvit").DeepViT(**kw), deepvit_mod.DeepViT(**kw), torch.randn(2, 3, 32, 32)
    )


def test_cait_parity(vp):
    # depth 20 crosses the LayerScale init boundaries (0.1 / 1e-5); eval: no layer dropout
    kw = dict(SMALL, depth=20, cls_depth=2, dim=16, mlp_dim=16, dim_head=8, heads=2)
    _assert_parity(vp("cait").CaiT(**kw), cait_mod.CaiT(**kw), torch.randn(2, 3, 32, 32))


def test_crossvit_parity(vp):
    kw = dict(
        image_size=48,
        num_classes=7,
        sm_dim=16,
        lg_dim=32,
        sm_enc_depth=1,
        sm_enc_heads=2,
        sm_enc_mlp_dim=32,
        sm_enc_dim_head=8,
        lg_enc_depth=2,
        lg_enc_heads=2,
        lg_enc_mlp_dim=64,
        lg_enc_dim_head=16,
        cross_attn_depth=2,
        cross_attn_heads=2,
        cross_attn_dim_head=8,
        depth=2,
    )
    ref = vp("cross_vit").CrossViT(**kw)
    _assert_parity(ref, crossvit_mod.CrossViT(**kw), torch.randn(2, 3, 48, 48))


def test_crossvit_parity_equal_widths(vp):
    # sm_dim == lg_dim: the class-token projections are Identity
    kw = dict(image_size=48, num_classes=7, sm_dim=16, lg_dim=16, depth=1, lg_enc_depth=1)
    _assert_parity(
        vp("cross_vit").CrossViT(**kw), crossvit_mod.CrossViT(**kw), torch.randn(2, 3, 48, 48)
    )


@pytest.mark.parametrize("heads", [(1, 2, 4), 2])
def test_pit_parity(vp, heads):
    kw = dict(
        image_size=32,
        patch_size=8,
        num_classes=7,
        dim=16,
        depth=(1, 2, 1),
        heads=heads,
        mlp_dim=32,
        dim_head=8,
    )
    _assert_parity(vp("pit").PiT(**kw), pit_mod.PiT(**kw), torch.randn(2, 3, 32, 32))


def test_distillable_vit_parity(vp):
    ref_cls = vp("distill").DistillableViT
    token = torch.randn(1, SMALL["dim"])
    img = torch.randn(2, 3, 32, 32)
    _assert_parity(ref_cls(**SMALL), distill_mod.DistillableViT(**SMALL), img)
    _assert_parity(ref_cls(**SMALL), distill_mod.DistillableViT(**SMALL), img, distill_token=token)


def test_distillable_t2t_loads_vit_pytorch_t2t(vp):
    # vit-pytorch's DistillableT2TViT cannot run; its T2TViT checkpoint loads into ours
    kw = dict(
        image_size=32,
        num_classes=7,
        dim=32,
        depth=1,
        heads=2,
        mlp_dim=32,
        t2t_layers=((7, 4), (3, 2)),
    )
    img = torch.randn(2, 3, 32, 32)
    _assert_parity(vp("t2t").T2TViT(**kw), distill_mod.DistillableT2TViT(**kw), img)


def test_to_vit_keeps_weights():
    model = distill_mod.DistillableViT(**SMALL).eval()
    plain = model.to_vit().eval()
    assert type(plain) is vit_mod.ViT
    img = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(plain(img), model(img))


# ----------------------------------------------------------------------------
# distillation training


def _teacher(side: int, num_classes: int) -> nn.Module:
    return nn.Sequential(nn.Flatten(), nn.Linear(3 * side * side, num_classes)).eval()


@pytest.mark.parametrize("hard", [False, True])
def test_distill_wrapper_parity(vp, hard):
    ref_student = _perturb(vp("distill").DistillableViT(**SMALL))
    student = distill_mod.DistillableViT(**SMALL)
    teacher = _teacher(32, SMALL["num_classes"])
    kw = dict(temperature=2.5, alpha=0.3, hard=hard, mlp_layernorm=True)
    ref = vp("distill").DistillWrapper(teacher=teacher, student=ref_student, **kw)
    ours = distill_mod.DistillWrapper(teacher=teacher, student=student, **kw)
    ours.load_state_dict(ref.state_dict(), strict=True)
    img, labels = torch.randn(4, 3, 32, 32), torch.randint(0, SMALL["num_classes"], (4,))
    expected, got = ref(img, labels), ours(img, labels)  # train mode, dropout 0
    assert_close(got, expected, what="distillation loss")
    got.backward()
    assert teacher[1].weight.grad is None
    assert ours.distillation_token.grad.abs().sum() > 0
    assert all(p.grad is not None for p in student.parameters())


@pytest.mark.parametrize("hard", [False, True])
def test_distill_wrapper_t2t(hard):
    kw = dict(
        image_size=32,
        num_classes=5,
        dim=24,
        depth=1,
        heads=2,
        mlp_dim=24,
        t2t_layers=((7, 4), (3, 2)),
    )
    student = distill_mod.DistillableT2TViT(**kw)
    img = torch.randn(3, 3, 32, 32)
    assert student(img).shape == (3, 5)
    logits, distilled = student(img, distill_token=torch.randn(1, 24))
    assert logits.shape == (3, 5) and distilled.shape == (3, 24)

    wrapper = distill_mod.DistillWrapper(
        teacher=_teacher(32, 5), student=student, temperature=3.0, hard=hard
    )
    opt = torch.optim.SGD(wrapper.parameters(), lr=0.1)
    loss = wrapper(img, torch.randint(0, 5, (3,)), alpha=0.7)
    assert loss.ndim == 0 and torch.isfinite(loss)
    loss.backward()
    assert wrapper.distillation_token.grad.abs().sum() > 0
    assert student.cls_token.grad.abs().sum() > 0
    assert wrapper.distill_mlp[1].weight.grad.abs().sum() > 0
    before = student.mlp_head.weight.detach().clone()
    opt.step()
    assert not torch.equal(before, student.mlp_head.weight)
    assert type(student.to_vit()).__name__ == "T2TViT"


def test_cait_layer_dropout_only_in_training():
    model = cait_mod.CaiT(**dict(SMALL, depth=4, cls_depth=2, layer_dropout=0.5))
    img = torch.randn(2, 3, 32, 32)
    model.eval()
    torch.testing.assert_close(model(img), model(img))
    model.train()
    model(img).sum().backward()  # some layers skipped, at least one kept per transformer


@pytest.mark.parametrize("family", ["vit", "cait", "pit", "distill"])
def test_fullgraph_compile(family):
    # no graph breaks in eval: the shape checks and the pooling grid are static
    model = {
        "vit": lambda: vit_mod.ViT(**SMALL),
        "cait": lambda: cait_mod.CaiT(**SMALL, cls_depth=1, layer_dropout=0.5),
        "pit": lambda: pit_mod.PiT(**PIT),
        "distill": lambda: distill_mod.DistillableViT(**SMALL),
    }[family]().eval()
    img = torch.randn(2, 3, 32, 32)
    kwargs = {"distill_token": torch.randn(1, SMALL["dim"])} if family == "distill" else {}
    compiled = torch.compile(model, backend="eager", fullgraph=True)
    torch.testing.assert_close(compiled(img, **kwargs), model(img, **kwargs))


# ----------------------------------------------------------------------------
# errors


CROSS = dict(image_size=48, num_classes=7, sm_dim=16, lg_dim=32)
PIT = dict(image_size=32, patch_size=8, num_classes=7, dim=16, depth=(1, 1), heads=2, mlp_dim=32)


@pytest.mark.parametrize(
    "cls, kwargs, match",
    [
        (
            vit_mod.ViT,
            dict(SMALL, image_size=30),
            r"image_size=30 is not divisible by patch_size=8",
        ),
        (vit_mod.ViT, dict(SMALL, image_size=(32, 36)), r"image_size=32x36 .* patch_size=8"),
        (vit_mod.ViT, dict(SMALL, pool="max"), r"pool='max'; expected 'cls' or 'mean'"),
        (vit_mod.ViT, dict(SMALL, heads=0), r"heads=0; expected an int >= 1"),
        (vit_mod.ViT, dict(SMALL, num_classes=-1), r"num_classes=-1; expected an int >= 0"),
        (vit_mod.ViT, dict(SMALL, dropout=1.5), r"dropout=1.5; expected a probability"),
        (vit_mod.ViT, dict(SMALL, patch_size=(8, 8, 8)), r"patch_size=\(8, 8, 8\)"),
        (deepvit_mod.DeepViT, dict(SMALL, image_size=(32, 48)), r"image_size=\(32, 48\).*square"),
        (deepvit_mod.DeepViT, dict(SMALL, patch_size=5), r"image_size=32 .* patch_size=5"),
        (cait_mod.CaiT, dict(SMALL, cls_depth=0), r"cls_depth=0"),
        (cait_mod.CaiT, dict(SMALL, cls_depth=1, layer_dropout=-0.1), r"layer_dropout=-0.1"),
        (crossvit_mod.CrossViT, dict(CROSS, image_size=40), r"image_size=40 .* sm_patch_size=12"),
        (
            crossvit_mod.CrossViT,
            dict(CROSS, lg_patch_size=10),
            r"image_size=48 .* lg_patch_size=10",
        ),
        (crossvit_mod.CrossViT, dict(CROSS, cross_attn_heads=0), r"cross_attn_heads=0"),
        (pit_mod.PiT, dict(PIT, depth=3), r"depth=3; expected a non-empty tuple"),
        (pit_mod.PiT, dict(PIT, depth=(1, 0)), r"depth\[1\]=0"),
        (pit_mod.PiT, dict(PIT, heads=(1, 2, 4)), r"heads=\(1, 2, 4\) has 3 entries .* 2 stages"),
        (pit_mod.PiT, dict(PIT, image_size=36), r"image_size=36 is not divisible by patch_size=8"),
    ],
)
def test_bad_config(cls, kwargs, match):
    with pytest.raises(ValueError, match=match):
        cls(**kwargs)


@pytest.mark.parametrize(
    "make, shape, match",
    [
        (lambda: vit_mod.ViT(**SMALL), (2, 1, 32, 32), r"1 channels .* expected channels=3"),
        (lambda: vit_mod.ViT(**SMALL), (2, 3, 30, 32), r"30x32 is not divisible by patch_size=8"),
        (lambda: vit_mod.ViT(**SMALL), (2, 3, 64, 64), r"64 patches .* covers 16"),
        (lambda: vit_mod.ViT(**SMALL), (3, 32, 32), r"shape \(3, 32, 32\); expected \(batch, 3"),
        (lambda: distill_mod.DistillableViT(**SMALL), (2, 4, 32, 32), r"4 channels"),
        (lambda: deepvit_mod.DeepViT(**SMALL), (2, 3, 32, 36), r"32x36 is not divisible"),
        (lambda: cait_mod.CaiT(**SMALL, cls_depth=1), (2, 1, 32, 32), r"expected channels=3"),
        (
            lambda: crossvit_mod.CrossViT(**CROSS),
            (2, 3, 36, 36),
            r"36x36 is not divisible by lg_patch_size=16",
        ),
        (lambda: pit_mod.PiT(**PIT), (2, 3, 32, 40), r"32x40; expected a square image"),
        (lambda: pit_mod.PiT(**PIT), (2, 3, 4, 4), r"smaller than patch_size=8"),
        (lambda: pit_mod.PiT(**PIT), (2, 3, 48, 48), r"121 patches .* covers 49"),
    ],
)
def test_bad_images(make, shape, match):
    model = make()
    with pytest.raises(ValueError, match=match):
        model(torch.randn(*shape))


def test_distill_errors():
    student = distill_mod.DistillableViT(**SMALL)
    img = torch.randn(2, 3, 32, 32)
    with pytest.raises(ValueError, match=r"distill_token of shape \(1, 16\); expected .* dim=32"):
        student(img, distill_token=torch.randn(1, 16))
    teacher = _teacher(32, SMALL["num_classes"])
    with pytest.raises(TypeError, match=r"student is a ViT; expected .*DistillableViT"):
        distill_mod.DistillWrapper(teacher=teacher, student=vit_mod.ViT(**SMALL))
    with pytest.raises(ValueError, match=r"alpha=2; expected a weight in \[0, 1\]"):
        distill_mod.DistillWrapper(teacher=teacher, student=student, alpha=2)
    with pytest.raises(ValueError, match=r"temperature=0; expected a positive number"):
        distill_mod.DistillWrapper(teacher=teacher, student=student, temperature=0)
    headless = distill_mod.DistillableViT(**dict(SMALL, num_classes=0))
    with pytest.raises(ValueError, match=r"num_classes=0; expected a classifier"):
        distill_mod.DistillWrapper(teacher=teacher, student=headless)
    wrapper = distill_mod.DistillWrapper(teacher=_teacher(32, 3), student=student)
    with pytest.raises(ValueError, match=r"teacher logits of shape \(2, 3\); expected .* \(2, 7\)"):
        wrapper(img, torch.zeros(2, dtype=torch.long))
