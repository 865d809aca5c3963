"""optimize(..., ops=("patch_embed",)): fused patch embeddings match eager.

Small models from vit-pytorch, timm and this repo's zoo; the outputs after
optimize are compared with the same model before it (float32, eval mode unless
stated), on the torch backend (the automatic choice on CPU), the Triton kernels
under the interpreter and the reference. state_dict keys and tensors must not
change; restore must bring the original modules back.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import vitkernels
from vitkernels.replace import FusedModule, optimize, restore
from vitkernels.replace.fused_patch_embed import (
    FusedImageEmbedder,
    FusedPatchSequential,
    FusedTimmPatchEmbed,
    soft_split_linear,
)

BACKENDS = [None, "triton", "reference"]
IMG = 32


def _vit_pytorch(name):
    vp = pytest.importorskip("vit_pytorch")
    small = dict(num_classes=10, dim=48, depth=1, heads=2, mlp_dim=64, dim_head=16)
    if name == "vit":
        return vp.ViT(image_size=IMG, patch_size=8, **small)
    if name == "simple_vit":
        from vit_pytorch.simple_vit import SimpleViT

        return SimpleViT(image_size=IMG, patch_size=8, **small)
    if name == "deepvit":
        from vit_pytorch.deepvit import DeepViT

        return DeepViT(image_size=IMG, patch_size=8, **small)
    if name == "cait":
        from vit_pytorch.cait import CaiT

        return CaiT(image_size=IMG, patch_size=8, cls_depth=1, **small)
    if name == "pit":
        from vit_pytorch.pit import PiT

        return PiT(image_size=IMG, patch_size=8, **{**small, "depth": (1, 1)})
    if name == "crossvit":
        from vit_pytorch.cross_vit import CrossViT

        return CrossViT(image_size=IMG, num_classes=10, sm_dim=48, lg_dim=64, sm_patch_size=8,
                        lg_patch_size=16, sm_enc_depth=1, lg_enc_depth=1, cross_attn_depth=1,
                        depth=1, dropout=0.0, emb_dropout=0.0)
    if name == "distill":
        from vit_pytorch.distill import DistillableViT

        return DistillableViT(image_size=IMG, patch_size=8, **small)
    if name == "t2t":
        from vit_pytorch.t2t import T2TViT

        return T2TViT(image_size=IMG, num_classes=10, dim=48, depth=1, heads=2, mlp_dim=64)
    raise KeyError(name)


def _zoo(name):
    import importlib
    from types import SimpleNamespace

    models = SimpleNamespace(**{
        fam: importlib.import_module(f"vitkernels.models.{fam}")
        for fam in ("vit", "deepvit", "cait", "pit", "crossvit", "distill", "t2t")
    })

    small = dict(num_classes=10, dim=48, depth=1, heads=2, mlp_dim=64, dim_head=16)
    if name == "vit":
        return models.vit.ViT(image_size=IMG, patch_size=8, **small)
    if name == "deepvit":
        return models.deepvit.DeepViT(image_size=IMG, patch_size=8, **small)
    if name == "cait":
        return models.cait.CaiT(image_size=IMG, patch_size=8, cls_depth=1, **small)
    if name == "pit":
        return models.pit.PiT(image_size=IMG, patch_size=8, **{**small, "depth": (1, 1)})
    if name == "crossvit":
        return models.crossvit.CrossViT(
            image_size=IMG, num_classes=10, sm_dim=48, lg_dim=64, sm_patch_size=8,
            lg_patch_size=16, sm_enc_depth=1, lg_enc_depth=1, cross_attn_depth=1, depth=1,
            dropout=0.0, emb_dropout=0.0,
        )
    if name == "distill":
        return models.distill.DistillableViT(image_size=IMG, patch_size=8, **small)
    if name == "t2t":
        return models.t2t.T2TViT(image_size=IMG, num_classes=10, dim=48, depth=1, heads=2, mlp_dim=64)
    raise KeyError(name)


def _timm(name):
    timm = pytest.importorskip("timm")
    kw = dict(img_size=IMG, patch_size=8, num_classes=10, depth=1, pretrained=False)
    if name == "vit":
        return timm.create_model("vit_tiny_patch16_224", **kw)
    if name == "deit_distilled":
        return timm.create_model("deit_tiny_distilled_patch16_224", **kw)
    if name == "cait":
        return timm.create_model("cait_xxs24_224", **{**kw, "depth_token_only": 1})
    raise KeyError(name)


# expected replacements (paths) and left-alone modules per model
EXPECT = {
    ("vit-pytorch", "vit"): (["to_patch_embedding"], []),
    ("vit-pytorch", "simple_vit"): (["to_patch_embedding"], []),
    ("vit-pytorch", "deepvit"): (["to_patch_embedding"], []),
    ("vit-pytorch", "cait"): (["to_patch_embedding"], []),
    ("vit-pytorch", "pit"): (["to_patch_embedding"], []),
    ("vit-pytorch", "crossvit"): (["sm_image_embedder", "lg_image_embedder"], []),
    ("vit-pytorch", "distill"): (["to_patch_embedding"], []),
    ("vit-pytorch", "t2t"): ([], ["to_patch_embedding"]),
    ("zoo", "vit"): (["to_patch_embedding"], []),
    ("zoo", "deepvit"): (["to_patch_embedding"], []),
    ("zoo", "cait"): (["to_patch_embedding"], []),
    ("zoo", "pit"): (["to_patch_embedding"], []),
    ("zoo", "crossvit"): (["sm_image_embedder", "lg_image_embedder"], []),
    ("zoo", "distill"): (["to_patch_embedding"], []),
    ("zoo", "t2t"): ([], ["to_patch_embedding"]),
    ("timm", "vit"): (["patch_embed"], []),
    ("timm", "deit_distilled"): (["patch_embed"], []),
    ("timm", "cait"): (["patch_embed"], []),
}
BUILD = {"vit-pytorch": _vit_pytorch, "zoo": _zoo, "timm": _timm}


def _tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    return dict(model.state_dict(keep_vars=True))


@pytest.mark.parametrize("backend", BACKENDS, ids=["auto", "triton", "reference"])
@pytest.mark.parametrize("source,name", list(EXPECT), ids=[f"{s}-{n}" for s, n in EXPECT])
def test_optimize_matches_eager(source, name, backend):
    if backend is not None and (source, name) in {("vit-pytorch", "t2t"), ("zoo", "t2t")}:
        pytest.skip("nothing is replaced")
    model = BUILD[source](name).eval()
    x = torch.randn(2, 3, IMG, IMG)
    with torch.no_grad():
        want = model(x)
    before = _tensors(model)
    report = optimize(model, backend=backend, ops=("patch_embed",))
    replaced, left = EXPECT[(source, name)]
    assert [r.path for r in report.replaced] == replaced, str(report)
    assert [r.path for r in report.left] == left, str(report)
    after = _tensors(model)
    assert after.keys() == before.keys()
    assert all(after[k] is before[k] for k in before), "optimize must adopt the same tensors"
    with torch.no_grad():
        got = model(x)
    torch.testing.assert_close(got, want, atol=2e-4, rtol=2e-4)
    assert restore(model) == len(replaced)
    assert not any(isinstance(m, FusedModule) for m in model.modules())
    with torch.no_grad():
        torch.testing.assert_close(model(x), want, atol=0, rtol=0)


@pytest.mark.parametrize("backend", [None, "triton"], ids=["auto", "triton"])
@pytest.mark.parametrize("source", ["vit-pytorch", "zoo"])
def test_gradients_match_eager(source, backend):
    """Training step through the fused patch embedding: the same parameter gradients."""
    model = BUILD[source]("vit").train()
    fused = copy.deepcopy(model)
    optimize(fused, backend=backend, ops=("patch_embed",))
    x = torch.randn(2, 3, IMG, IMG)
    model(x).square().sum().backward()
    fused(x).square().sum().backward()
    grads = {n: p.grad for n, p in model.named_parameters()}
    for n, p in fused.named_parameters():
        torch.testing.assert_close(p.grad, grads[n], atol=1e-3, rtol=1e-3, msg=lambda m, n=n: f"{n}: {m}")


def test_load_state_dict_into_optimized_model():
    model = _zoo("vit").eval()
    other = _zoo("vit").eval()
    optimize(model, ops=("patch_embed",))
    model.load_state_dict(other.state_dict())
    x = torch.randn(2, 3, IMG, IMG)
    with torch.no_grad():
        torch.testing.assert_close(model(x), other(x), atol=2e-4, rtol=2e-4)


@pytest.mark.parametrize("source", ["vit-pytorch", "zoo"])
def test_image_embedder_dropout_in_training(source):
    """CrossViT's embedder keeps its dropout: train mode draws the same mask as eager."""
    model = BUILD[source]("crossvit")
    emb = model.sm_image_embedder
    emb.dropout.p = 0.5
    fused = copy.deepcopy(emb)
    holder = nn.Module()
    holder.emb = fused
    optimize(holder, ops=("patch_embed",))
    assert isinstance(holder.emb, FusedImageEmbedder)
    x = torch.randn(2, 3, IMG, IMG)
    for mode in (True, False):
        emb.train(mode)
        holder.train(mode)
        torch.manual_seed(1)
        want = emb(x)
        torch.manual_seed(1)
        got = holder.emb(x)
        torch.testing.assert_close(got, want, atol=2e-4, rtol=2e-4)
    assert (want == 0).sum() == 0  # eval: no dropout


def test_fused_sequential_keeps_sequential_behaviour():
    model = _vit_pytorch("vit")
    optimize(model, ops=("patch_embed",))
    seq = model.to_patch_embedding
    assert isinstance(seq, FusedPatchSequential) and isinstance(seq, nn.Sequential)
    assert len(seq) == 4 and isinstance(seq[2], nn.Linear)
    assert "op=patch_embed" in repr(seq)


def test_unfold_sequential_crops_like_unfold():
    """An image the unfold grid does not reach to the edge: nn.Unfold drops the rest."""
    from einops.layers.torch import Rearrange

    seq = nn.Sequential(nn.Unfold(kernel_size=4, stride=2), Rearrange("b c n -> b n c"),
                        nn.Linear(48, 20))
    holder = nn.Sequential(seq)
    x = torch.randn(2, 3, 11, 12)  # rows: (11 - 4) // 2 + 1 = 4 patches reach row 9 only
    want = seq(x)
    for backend in (None, "triton"):
        fused = copy.deepcopy(holder)
        optimize(fused, backend=backend, ops=("patch_embed",))
        assert isinstance(fused[0], FusedPatchSequential)
        torch.testing.assert_close(fused(x), want, atol=1e-4, rtol=1e-4)


def test_timm_patch_embed_with_norm_and_size_checks():
    from timm.layers import PatchEmbed

    pe = PatchEmbed(img_size=IMG, patch_size=8, in_chans=3, embed_dim=40, norm_layer=nn.LayerNorm)
    holder = nn.Sequential(pe)
    x = torch.randn(2, 3, IMG, IMG)
    want = pe(x)
    fused = copy.deepcopy(holder)
    optimize(fused, backend="triton", ops=("patch_embed",))
    assert isinstance(fused[0], FusedTimmPatchEmbed)
    torch.testing.assert_close(fused(x), want, atol=1e-4, rtol=1e-4)
    with pytest.raises(ValueError, match=r"input size \(40, 40\) does not match"):
        fused(torch.randn(1, 3, 40, 40))
    # no fixed image size: Conv2d drops the rows past the last patch; so do we
    free = PatchEmbed(img_size=None, patch_size=8, in_chans=3, embed_dim=40)
    holder = nn.Sequential(free)
    y = torch.randn(1, 3, 35, 33)
    want = free(y)
    optimize(holder, ops=("patch_embed",))
    torch.testing.assert_close(holder(y), want, atol=1e-4, rtol=1e-4)


def test_timm_patch_embed_variants_left_alone():
    from timm.layers import PatchEmbed

    holder = nn.Sequential(
        PatchEmbed(img_size=IMG, patch_size=8, embed_dim=16, flatten=False),
        PatchEmbed(img_size=IMG, patch_size=8, embed_dim=16, dynamic_img_pad=True),
    )
    report = optimize(holder, ops=("patch_embed",))
    assert report.count() == 0 and len(report.left) == 2, str(report)
    assert "not tokens" in report.left[0].reason and "dynamic_img_pad" in report.left[1].reason


def test_soft_split_linear_matches_t2t_module():
    """The official T2T module's first soft split + attention1.norm1 + kqv (workload P3)
    and its last soft split + project, as the fused T2T module would call them."""
    from vitkernels.models.t2t import T2T_module

    t2t = T2T_module(img_size=IMG, embed_dim=48, token_dim=16).eval()
    x = torch.randn(2, 3, IMG + 1, IMG - 1)  # 33 x 31: the 7/4/2 grid covers both
    a1 = t2t.attention1
    want = a1.kqv(a1.norm1(t2t.soft_split0(x).transpose(1, 2)))
    for backend in (None, "triton"):
        got = soft_split_linear(x, t2t.soft_split0, a1.kqv, a1.norm1, backend=backend)
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    tokens = torch.randn(2, 16, 8, 8).transpose(2, 3)  # a token map view, not contiguous
    want = t2t.project(t2t.soft_split2(tokens).transpose(1, 2))
    got = soft_split_linear(tokens, t2t.soft_split2, t2t.project, backend="triton")
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


def test_optimize_report_names_the_op():
    model = _zoo("pit")
    report = optimize(model, ops=("patch_embed",), backend="torch")
    assert report.count("patch_embed") == 1
    assert report.replaced[0].backend == "torch"
    assert vitkernels.restore(model) == 1
