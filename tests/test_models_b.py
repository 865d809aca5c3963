"""Model zoo part B: LeViT, T2T-ViT (vit-pytorch and official layouts), CvT.

* every named configuration builds, runs forward and backward (small images,
  reduced depth) with the right output shape;
* parity with vit-pytorch: its state_dict (randomised, BatchNorm statistics
  included) loads with strict=True and the outputs match in eval mode;
* the official T2T-ViT layout: Token_performer.single_attn against the paper's
  formulas written here in float64 (quadratic form, not the linear one the
  module uses), the fixed random features, the checkpoint key layout, the
  sinusoid table and the published parameter counts;
* errors: ValueError naming the parameter, the given and the expected value.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
import vitkernels.models.cvt as cvt_mod
import vitkernels.models.levit as levit_mod
import vitkernels.models.t2t as t2t_mod
import vitkernels.models.t2t_vit as t2t_vit_mod
from _numerics import assert_close

# ----------------------------------------------------------------------------
# named configurations

NAMES = {
    "levit_128s": (levit_mod, dict(image_size=32, depth=1)),
    "levit_128": (levit_mod, dict(image_size=32, depth=1)),
    "levit_192": (levit_mod, dict(image_size=32, depth=1)),
    "levit_256": (levit_mod, dict(image_size=32, depth=1)),
    "levit_384": (levit_mod, dict(image_size=32, depth=1)),
    "t2t_vit_14": (t2t_vit_mod, dict(img_size=32, depth=1)),
    "t2t_vit_19": (t2t_vit_mod, dict(img_size=32, depth=1)),
    "t2t_vit_24": (t2t_vit_mod, dict(img_size=32, depth=1)),
    "cvt_13": (cvt_mod, dict(s2_depth=1, s3_depth=1)),
    "cvt_21": (cvt_mod, dict(s2_depth=1, s3_depth=1)),
}


def test_registry_names():
    names = set(levit_mod.CONFIGS) | set(t2t_vit_mod.CONFIGS) | set(cvt_mod.CONFIGS)
    assert names == set(NAMES)


@pytest.mark.parametrize("name", sorted(NAMES))
def test_named_config_forward_backward(name):
    mod, overrides = NAMES[name]
    model = mod.CONFIGS[name](num_classes=5, **overrides)
    img = torch.randn(2, 3, 32, 32)
    out = model(img)
    assert out.shape == (2, 5)
    out.square().mean().backward()
    for pname, p in model.named_parameters():
        if p.requires_grad:
            assert p.grad is not None and torch.isfinite(p.grad).all(), pname


def _n_params(model: torch.nn.Module) -> float:
    return sum(p.numel() for p in model.parameters()) / 1e6


@pytest.mark.parametrize(
    "name, millions",
    [("t2t_vit_14", 21.5), ("cvt_13", 20.0)],  # T2T-ViT paper Table 3, CvT paper Table 2
)
def test_paper_parameter_counts(name, millions):
    mod = t2t_vit_mod if name.startswith("t2t") else cvt_mod
    assert _n_params(mod.CONFIGS[name]()) == pytest.approx(millions, rel=0.01)


def test_levit_configs_follow_paper():
    # LeViT-256: widths 256/384/512, heads 4/6/8, depth 4 per stage, D=32, value 2D
    model = levit_mod.CONFIGS["levit_256"]()
    stages = [model.backbone[i] for i in (0, 2, 4)]
    assert [len(s.layers) for s in stages] == [4, 4, 4]
    assert [s.layers[0][0].heads for s in stages] == [4, 6, 8]
    attn = stages[0].layers[0][0]
    assert attn.to_q[0].out_channels == 4 * 32 and attn.to_v[0].out_channels == 4 * 64
    assert [s.layers[0][1].net[0].in_channels for s in stages] == [256, 384, 512]


# ----------------------------------------------------------------------------
# parity with vit-pytorch


def _randomise(model: torch.nn.Module) -> None:
    """Every float tensor of the state (weights, biases, BN statistics) random."""
    with torch.no_grad():
        for name, t in model.state_dict().items():
            if not t.is_floating_point():
                continue
            if name.endswith("running_var"):
                t.copy_(torch.rand_like(t) + 0.5)
            else:
                t.copy_(torch.randn_like(t) * 0.2)


def _check_parity(ref: torch.nn.Module, ours: torch.nn.Module, img: torch.Tensor) -> None:
    _randomise(ref)
    ours.load_state_dict(ref.state_dict(), strict=True)
    assert list(ours.state_dict()) == list(ref.state_dict())
    ref.eval()
    ours.eval()
    with torch.no_grad():
        expected, got = ref(img), ours(img)
    if isinstance(expected, tuple):
        assert isinstance(got, tuple) and len(got) == len(expected)
    else:
        expected, got = (expected,), (got,)
    for e, g in zip(expected, got, strict=True):
        assert_close(g, e, what="against vit-pytorch")


@pytest.mark.parametrize("distill", [None, 4])
def test_levit_matches_vit_pytorch(distill):
    vp = pytest.importorskip("vit_pytorch.levit")
    kw = dict(
        image_size=64,
        num_classes=7,
        dim=(32, 48, 64),
        depth=(1, 2, 1),
        heads=(2, 3, 4),
        mlp_mult=2,
        dim_key=8,
        dim_value=16,
        num_distill_classes=distill,
    )
    _check_parity(vp.LeViT(**kw), levit_mod.LeViT(**kw), torch.randn(2, 3, 64, 64))


@pytest.mark.parametrize("pool", ["cls", "mean"])
def test_t2tvit_matches_vit_pytorch(pool):
    vp = pytest.importorskip("vit_pytorch.t2t")
    kw = dict(
        image_size=32,
        num_classes=7,
        dim=32,
        depth=2,
        heads=2,
        mlp_dim=48,
        dim_head=16,
        channels=2,
        pool=pool,
    )
    _check_parity(vp.T2TViT(**kw), t2t_mod.T2TViT(**kw), torch.randn(2, 2, 32, 32))


def test_cvt_matches_vit_pytorch():
    vp = pytest.importorskip("vit_pytorch.cvt")
    kw = dict(
        num_classes=7,
        s1_emb_dim=16,
        s2_emb_dim=24,
        s2_heads=2,
        s3_emb_dim=32,
        s3_heads=2,
        s3_depth=2,
        channels=4,
    )
    _check_parity(vp.CvT(**kw), cvt_mod.CvT(**kw), torch.randn(2, 4, 40, 48))


# ----------------------------------------------------------------------------
# official T2T-ViT: Token_performer


def _paper_performer(x, p, eps=1e-8):
    """Official Token_performer math in float64, written from the paper's formulas.

    kqv projection split in k, q, v order; phi(z) = exp(z w^T - |z|^2/2) / sqrt(m);
    attention through the (T x T) kernel matrix A = phi(q) phi(k)^T (the quadratic
    form the linear one factors): y = A v / (A 1 + eps); out = v + proj(y).
    """
    emb = p["proj.weight"].shape[0]
    kqv = x @ p["kqv.weight"].T + p["kqv.bias"]
    k, q, v = kqv[..., :emb], kqv[..., emb : 2 * emb], kqv[..., 2 * emb :]
    w = p["w"]
    m = w.shape[0]

    def phi(z):
        return torch.exp(z @ w.T - (z * z).sum(-1, keepdim=True) / 2) / math.sqrt(m)

    a = phi(q) @ phi(k).transpose(-1, -2)  # (B, T, T)
    y = (a @ v) / (a.sum(-1, keepdim=True) + eps)
    return v + y @ p["proj.weight"].T + p["proj.bias"]


def _float64_params(module):
    return {k: v.detach().double() for k, v in module.state_dict().items()}


@pytest.mark.parametrize("dim, in_dim, tokens", [(27, 16, 50), (147, 64, 196)])
def test_token_performer_single_attn_matches_paper(dim, in_dim, tokens):
    block = t2t_vit_mod.Token_performer(dim=dim, in_dim=in_dim).eval()
    x = torch.randn(3, tokens, dim)
    expected = _paper_performer(x.double(), _float64_params(block))
    with torch.no_grad():
        got = block.single_attn(x)
    assert got.shape == (3, tokens, in_dim) and got.dtype == torch.float32
    assert_close(got, expected, what="single_attn")


def test_token_performer_forward_matches_paper():
    block = t2t_vit_mod.Token_performer(dim=36, in_dim=16).eval()
    p = _float64_params(block)
    x = torch.randn(2, 30, 36)
    x64 = x.double()
    h = F.layer_norm(x64, (36,), p["norm1.weight"], p["norm1.bias"])
    y = _paper_performer(h, p)
    z = F.layer_norm(y, (16,), p["norm2.weight"], p["norm2.bias"])
    z = F.gelu(z @ p["mlp.0.weight"].T + p["mlp.0.bias"]) @ p["mlp.2.weight"].T + p["mlp.2.bias"]
    with torch.no_grad():
        got = block(x)
    assert_close(got, y + z, what="forward")


def test_token_performer_random_features_fixed():
    block = t2t_vit_mod.Token_performer(dim=27, in_dim=16)
    m = 8  # int(16 * 0.5)
    assert block.w.shape == (m, 16) and not block.w.requires_grad
    assert "w" in block.state_dict()
    assert all(p is not block.w for p in block.parameters() if p.requires_grad)
    # orthogonal rows of norm sqrt(m)
    torch.testing.assert_close(block.w @ block.w.T, m * torch.eye(m), rtol=1e-4, atol=1e-4)
    before = block.w.detach().clone()
    block(torch.randn(2, 10, 27)).sum().backward()
    assert block.w.grad is None
    torch.optim.SGD([p for p in block.parameters() if p.requires_grad], lr=1.0).step()
    assert torch.equal(block.w, before)


def test_token_performer_forward_goes_through_single_attn():
    block = t2t_vit_mod.Token_performer(dim=27, in_dim=16).eval()
    calls = []
    inner = block.single_attn
    block.single_attn = lambda x: calls.append(x.shape) or inner(x)
    block(torch.randn(2, 10, 27))
    assert calls == [(2, 10, 27)]


def test_official_t2t_checkpoint_layout():
    model = t2t_vit_mod.T2T_ViT(img_size=32, embed_dim=48, depth=1, num_heads=2, num_classes=3)
    tt = "tokens_to_token."
    perf = [
        "w",
        "kqv.weight",
        "kqv.bias",
        "proj.weight",
        "proj.bias",
        "norm1.weight",
        "norm1.bias",
        "norm2.weight",
        "norm2.bias",
        "mlp.0.weight",
        "mlp.0.bias",
        "mlp.2.weight",
        "mlp.2.bias",
    ]
    block = [
        "norm1.weight",
        "norm1.bias",
        "attn.qkv.weight",
        "attn.proj.weight",
        "attn.proj.bias",
        "norm2.weight",
        "norm2.bias",
        "mlp.fc1.weight",
        "mlp.fc1.bias",
        "mlp.fc2.weight",
        "mlp.fc2.bias",
    ]
    expected = (
        ["cls_token", "pos_embed"]
        + [f"{tt}attention{i}.{k}" for i in (1, 2) for k in perf]
        + [f"{tt}project.weight", f"{tt}project.bias"]
        + [f"blocks.0.{k}" for k in block]
        + ["norm.weight", "norm.bias", "head.weight", "head.bias"]
    )
    sd = model.state_dict()
    assert list(sd) == expected
    assert sd[f"{tt}attention1.kqv.weight"].shape == (3 * 64, 3 * 7 * 7)
    assert sd[f"{tt}attention2.kqv.weight"].shape == (3 * 64, 64 * 3 * 3)
    assert sd[f"{tt}attention1.w"].shape == (32, 64)
    assert sd[f"{tt}project.weight"].shape == (48, 64 * 3 * 3)
    assert sd["pos_embed"].shape == (1, 2 * 2 + 1, 48)
    assert not model.pos_embed.requires_grad


def test_t2t_layouts_live_in_their_own_files_and_old_imports_keep_working():
    """vit-pytorch's T2TViT in models/t2t.py, the official T2T_ViT in models/t2t_vit.py."""
    import vitkernels.models as models

    assert t2t_mod.T2TViT.__module__ == "vitkernels.models.t2t"
    for name in ("T2T_ViT", "T2T_module", "Token_performer", "Block", "Attention"):
        assert getattr(t2t_vit_mod, name).__module__ == "vitkernels.models.t2t_vit", name
    for name in ("T2T_ViT", "T2T_module", "Token_performer", "Attention", "Block"):
        assert getattr(t2t_mod, name) is getattr(t2t_vit_mod, name)  # the old import path
    for name in ("T2T_ViT", "T2T_module", "Token_performer"):
        assert getattr(models, name) is getattr(t2t_vit_mod, name)
    assert models.T2TViT is t2t_mod.T2TViT
    assert type(models.create("t2t_vit_14", img_size=32, depth=1)) is t2t_vit_mod.T2T_ViT


def test_official_t2t_sinusoid_table():
    table = t2t_vit_mod.get_sinusoid_encoding(10, 12)
    assert table.shape == (1, 10, 12) and table.dtype == torch.float32
    for pos, j in [(0, 0), (3, 0), (3, 1), (7, 4), (9, 11), (5, 6)]:
        angle = pos / 10000 ** (2 * (j // 2) / 12)
        want = math.sin(angle) if j % 2 == 0 else math.cos(angle)
        assert table[0, pos, j].item() == pytest.approx(want, abs=1e-6)


# ----------------------------------------------------------------------------
# errors


def test_errors_levit():
    kw = dict(num_classes=3, dim=16, depth=1, heads=1, mlp_mult=2, dim_key=4, dim_value=4)
    with pytest.raises(ValueError, match=r"image_size=40.*multiple of 16"):
        levit_mod.LeViT(image_size=40, **kw)
    with pytest.raises(ValueError, match=r"dim=\(8, 8, 8, 8\).*stages=3"):
        levit_mod.LeViT(image_size=32, **{**kw, "dim": (8, 8, 8, 8)})
    model = levit_mod.LeViT(image_size=32, **kw)
    with pytest.raises(ValueError, match=r"shape \(1, 4, 32, 32\).*\(batch, 3, 32, 32\)"):
        model(torch.randn(1, 4, 32, 32))
    with pytest.raises(ValueError, match=r"size \(48, 48\).*image_size=32"):
        model(torch.randn(1, 3, 48, 48))


def test_errors_t2tvit():
    kw = dict(image_size=32, num_classes=3, dim=16, depth=1, heads=1, mlp_dim=16)
    with pytest.raises(ValueError, match=r"pool='max'.*'cls' or 'mean'"):
        t2t_mod.T2TViT(**kw, pool="max")
    with pytest.raises(ValueError, match=r"mlp_dim not given"):
        t2t_mod.T2TViT(**{**kw, "mlp_dim": None})
    model = t2t_mod.T2TViT(**kw)
    with pytest.raises(ValueError, match=r"shape \(1, 1, 32, 32\).*channels=3"):
        model(torch.randn(1, 1, 32, 32))
    with pytest.raises(ValueError, match=r"64x64.*image_size=32"):
        model(torch.randn(1, 3, 64, 64))


def test_errors_official_t2t():
    with pytest.raises(ValueError, match=r"img_size=40.*multiple of 16"):
        t2t_vit_mod.T2T_ViT(img_size=40, embed_dim=32, depth=1, num_heads=2)
    with pytest.raises(ValueError, match=r"tokens_type='transformer'.*'performer'"):
        t2t_vit_mod.T2T_ViT(img_size=32, tokens_type="transformer")
    with pytest.raises(ValueError, match=r"embed_dim=30.*num_heads=4"):
        t2t_vit_mod.T2T_ViT(img_size=32, embed_dim=30, num_heads=4)
    model = t2t_vit_mod.T2T_ViT(img_size=32, embed_dim=32, depth=1, num_heads=2)
    with pytest.raises(ValueError, match=r"48x48.*img_size=32"):
        model(torch.randn(1, 3, 48, 48))
    with pytest.raises(ValueError, match=r"shape \(1, 1, 32, 32\).*in_chans=3"):
        model(torch.randn(1, 1, 32, 32))


def test_errors_cvt():
    with pytest.raises(ValueError, match=r"s1_emb_stride=0.*positive"):
        cvt_mod.CvT(num_classes=3, s1_emb_stride=0)
    model = cvt_mod.CvT(num_classes=3, s3_depth=1)
    with pytest.raises(ValueError, match=r"shape \(1, 1, 32, 32\).*channels=3"):
        model(torch.randn(1, 1, 32, 32))
