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
    FusedConvPatchEmbed,
    FusedImageEmbedder,
    FusedPatchSequential,
)
from vitkernels.replace.fused_t2t import soft_split_linear

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
    if name == "vit_mean":  # pool="mean": a (0, dim) class token
        return models.vit.ViT(image_size=IMG, patch_size=8, pool="mean", **small)
    if name == "t2t_vit":  # official layout: T2T_module with Token_performers
        return models.t2t.T2T_ViT(img_size=IMG, num_classes=10, embed_dim=48, depth=1, num_heads=2,
                                  token_dim=16)
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
    ("vit-pytorch", "t2t"): (["to_patch_embedding"], []),
    ("zoo", "vit"): (["to_patch_embedding"], []),
    ("zoo", "deepvit"): (["to_patch_embedding"], []),
    ("zoo", "cait"): (["to_patch_embedding"], []),
    ("zoo", "pit"): (["to_patch_embedding"], []),
    ("zoo", "crossvit"): (["sm_image_embedder", "lg_image_embedder"], []),
    ("zoo", "distill"): (["to_patch_embedding"], []),
    ("zoo", "t2t"): (["to_patch_embedding"], []),
    ("zoo", "t2t_vit"): (["tokens_to_token"], []),
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
    assert "vitkernels=patch_embed" in repr(seq)


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
    assert isinstance(fused[0], FusedConvPatchEmbed)
    torch.testing.assert_close(fused(x), want, atol=1e-4, rtol=1e-4)
    with pytest.raises(AssertionError, match=r"Input height \(40\) doesn't match model \(32\)"):
        fused(torch.randn(1, 3, 40, 40))  # timm's own check and exception
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


# ----------------------------------------------------------------------------
# class token and position embedding folded into the patch_embed call


@pytest.fixture
def patch_embed_calls(monkeypatch):
    """Every patch_embed call the fused modules make: their keyword arguments."""
    import vitkernels.replace.fused_patch_embed as fpe
    import vitkernels.replace.fused_t2t as ft2t

    calls = []
    real = fpe.patch_embed

    def spy(*args, **kwargs):
        calls.append(kwargs)
        return real(*args, **kwargs)

    monkeypatch.setattr(fpe, "patch_embed", spy)
    monkeypatch.setattr(ft2t, "patch_embed", spy)
    return calls


# zoo model -> (its class token is folded, calls per forward)
FOLDED = {"vit": (True, 1), "vit_mean": (False, 1), "deepvit": (True, 1), "cait": (False, 1),
          "pit": (True, 1), "distill": (True, 1), "t2t": (True, 1), "t2t_vit": (True, 1)}


@pytest.mark.parametrize("backend", [None, "triton"], ids=["auto", "triton"])
@pytest.mark.parametrize("name", list(FOLDED))
def test_zoo_models_fold_class_token_and_positions(name, backend, patch_embed_calls):
    """This repo's models hand their class token and position table to the fused
    patch embedding (embed_tokens): one call makes the whole token sequence."""
    model = _zoo(name).eval()
    x = torch.randn(2, 3, IMG, IMG)
    with torch.no_grad():
        want = model(x)
    optimize(model, backend=backend, ops=("patch_embed",))
    with torch.no_grad():
        got = model(x)
    torch.testing.assert_close(got, want, atol=2e-4, rtol=2e-4)
    has_cls, ncalls = FOLDED[name]
    assert len(patch_embed_calls) == ncalls
    last = patch_embed_calls[-1]
    pos = model.pos_embed if name == "t2t_vit" else model.pos_embedding
    assert last["pos_embed"] is not None and last["pos_embed"].data_ptr() == pos.data_ptr()
    if has_cls:
        assert last["cls_token"] is model.cls_token
    else:
        assert last["cls_token"] is None


@pytest.mark.parametrize("name", ["vit", "cait", "t2t"])
def test_folded_tokens_gradients_match_eager(name):
    """Training step: the class token and position table get eager's gradients
    through the fused call (triton backward under the interpreter)."""
    model = _zoo(name).train()
    fused = copy.deepcopy(model)
    optimize(fused, backend="triton", ops=("patch_embed",))
    x = torch.randn(2, 3, IMG, IMG)
    model(x).square().sum().backward()
    fused(x).square().sum().backward()
    grads = {n: p.grad for n, p in model.named_parameters()}
    for n, p in fused.named_parameters():
        if n in ("cls_token", "pos_embedding"):
            assert p.grad is not None and p.grad.abs().sum() > 0, n
        torch.testing.assert_close(p.grad, grads[n], atol=1e-3, rtol=1e-3, msg=lambda m, n=n: f"{n}: {m}")


def test_t2t_module_stages_fused_with_performers(patch_embed_calls):
    """Official T2T_ViT, all ops: each soft split is one patch_embed call (the first
    two with the next Token_performer's norm1 and kqv), the performers are
    replaced inside the fused T2T module, and restore undoes both levels."""
    from vitkernels.models.t2t import T2T_module, Token_performer

    from vitkernels.replace.fused_performer import FusedTokenPerformer
    from vitkernels.replace.fused_t2t import FusedT2TModule

    model = _zoo("t2t_vit").eval()
    x = torch.randn(2, 3, IMG, IMG)
    with torch.no_grad():
        want = model(x)
    before = _tensors(model)
    report = optimize(model, backend="triton")
    paths = {r.path: r.op for r in report.replaced}
    assert paths["tokens_to_token"] == "patch_embed"
    assert paths["tokens_to_token.attention1"] == "performer_attention"
    assert paths["tokens_to_token.attention2"] == "performer_attention"
    t2t = model.tokens_to_token
    assert isinstance(t2t, FusedT2TModule) and isinstance(t2t.attention1, FusedTokenPerformer)
    with torch.no_grad():
        got = model(x)
    torch.testing.assert_close(got, want, atol=5e-4, rtol=5e-4)
    assert len(patch_embed_calls) == 3
    first, second, last = patch_embed_calls
    assert first["in_norm"][0] is t2t.attention1.norm1.weight and first["pos_embed"] is None
    assert second["in_norm"][0] is t2t.attention2.norm1.weight
    assert last["cls_token"] is model.cls_token and last["in_norm"] is None
    after = _tensors(model)
    assert after.keys() == before.keys() and all(after[k] is before[k] for k in before)
    assert restore(model) == len(report.replaced)
    assert type(model.tokens_to_token) is T2T_module
    assert type(model.tokens_to_token.attention1) is Token_performer
    assert not any(isinstance(m, FusedModule) for m in model.modules())
    with torch.no_grad():
        torch.testing.assert_close(model(x), want, atol=0, rtol=0)


def test_t2t_module_without_performer_rule_keeps_its_blocks(patch_embed_calls):
    """ops=("patch_embed",): the Token_performers stay; only the last soft split
    (with class token and positions) is a fused call."""
    model = _zoo("t2t_vit").eval()
    x = torch.randn(2, 3, IMG, IMG)
    with torch.no_grad():
        want = model(x)
    optimize(model, backend="triton", ops=("patch_embed",))
    with torch.no_grad():
        torch.testing.assert_close(model(x), want, atol=2e-4, rtol=2e-4)
    assert len(patch_embed_calls) == 1 and patch_embed_calls[0]["cls_token"] is model.cls_token


@pytest.mark.parametrize("source", ["vit-pytorch", "zoo"])
def test_t2t_sequential_blocks_visited_by_attention_rules(source):
    """vit-pytorch's T2T to_patch_embedding: the last soft split + Linear fused; the
    Transformer blocks between the soft splits still get their SDPA replacement."""
    model = BUILD[source]("t2t").eval()
    x = torch.randn(2, 3, IMG, IMG)
    with torch.no_grad():
        want = model(x)
    report = optimize(model, ops=("patch_embed", "attention"))
    paths = [r.path for r in report.replaced]
    assert paths[0] == "to_patch_embedding"
    inner = [p for p in paths if p.startswith("to_patch_embedding.")]
    assert len(inner) == 2 and all(r.op == "attention" for r in report.replaced if r.path in inner)
    assert isinstance(model.to_patch_embedding[3].layers[0][0], FusedModule)
    with torch.no_grad():
        torch.testing.assert_close(model(x), want, atol=2e-4, rtol=2e-4)
    assert restore(model) == len(paths)
    assert not any(isinstance(m, FusedModule) for m in model.modules())


def test_second_optimize_reaches_inside_fused_containers():
    """optimize(ops=patch_embed) first, then the performer op: the Token_performers
    inside the fused T2T module are still found."""
    from vitkernels.replace.fused_performer import FusedTokenPerformer

    model = _zoo("t2t_vit").eval()
    x = torch.randn(2, 3, IMG, IMG)
    with torch.no_grad():
        want = model(x)
    assert [r.path for r in optimize(model, ops=("patch_embed",)).replaced] == ["tokens_to_token"]
    second = optimize(model, ops=("performer_attention",))
    assert [r.path for r in second.replaced] == ["tokens_to_token.attention1",
                                                 "tokens_to_token.attention2"]
    assert isinstance(model.tokens_to_token.attention2, FusedTokenPerformer)
    assert optimize(model).count("performer_attention") == 0
    with torch.no_grad():
        torch.testing.assert_close(model(x), want, atol=2e-4, rtol=2e-4)


@pytest.mark.parametrize("name", ["vit", "pit", "cait"])
def test_folded_positions_for_images_smaller_than_configured(name):
    """Smaller images use the first P + L rows of the position table, as eager."""
    model = _zoo(name).eval()
    side = 24 if name != "pit" else 28
    x = torch.randn(2, 3, side, side)
    with torch.no_grad():
        want = model(x)
    optimize(model, backend="triton", ops=("patch_embed",))
    with torch.no_grad():
        torch.testing.assert_close(model(x), want, atol=2e-4, rtol=2e-4)


# ----------------------------------------------------------------------------
# timm PiT's ConvEmbedding (a feature map) and CrossViT's PatchEmbed

_TIMM_CONV = {
    "pit_ti_224": (dict(img_size=32, patch_size=8, stride=4, base_dims=[16, 16, 16], depth=[1, 1, 1],
                        heads=[2, 2, 2]), 32, ["patch_embed"]),
    "crossvit_tiny_240": (dict(img_size=48, img_scale=(1.0, 1.0), embed_dim=[32, 48], depth=[[1, 1, 0]],
                               num_heads=[2, 2], mlp_ratio=[2, 2, 1]), 48, ["patch_embed.0", "patch_embed.1"]),
}  # fmt: skip


@pytest.mark.parametrize("backend", [None, "triton"], ids=["auto", "triton"])
@pytest.mark.parametrize("name", list(_TIMM_CONV))
def test_timm_pit_conv_embedding_and_crossvit_patch_embed(name, backend):
    timm = pytest.importorskip("timm")
    kw, side, paths = _TIMM_CONV[name]
    model = timm.create_model(name, pretrained=False, num_classes=10, **kw).eval()
    x = torch.randn(2, 3, side, side)
    with torch.no_grad():
        want = model(x)
    report = optimize(model, backend=backend, ops=("patch_embed",))
    assert [r.path for r in report.replaced] == paths and not report.left, str(report)
    with torch.no_grad():
        torch.testing.assert_close(model(x), want, atol=2e-4, rtol=2e-4)
        if name == "pit_ti_224":  # the map the original returns: (B, D, H', W')
            want_map = model.patch_embed._vk_base_forward(x)
            torch.testing.assert_close(model.patch_embed(x), want_map, atol=1e-4, rtol=1e-4)
    assert restore(model) == len(paths)


def test_timm_crossvit_multi_conv_stem_is_left_with_the_reason():
    from timm.models.crossvit import PatchEmbed

    holder = nn.Sequential(PatchEmbed(img_size=48, patch_size=16, embed_dim=32, multi_conv=True))
    report = optimize(holder, ops=("patch_embed",))
    (left,) = report.left
    assert report.count() == 0 and "multi_conv stem" in left.reason


def test_position_table_too_short_raises_what_eager_raises():
    """embed_tokens with a table shorter than the image's tokens: the fused patch
    embedding adds it as the model does, so the caller sees the same error."""
    from vitkernels.tokens import embed_tokens

    model = _zoo("vit").eval()
    fused = copy.deepcopy(model)
    optimize(fused, ops=("patch_embed",))
    img = torch.randn(1, 3, IMG + 16, IMG + 16)  # 36 patches, the table has 17 rows
    with pytest.raises(Exception) as want:
        embed_tokens(model.to_patch_embedding, img, model.cls_token, model.pos_embedding)
    with pytest.raises(type(want.value)) as got:
        embed_tokens(fused.to_patch_embedding, img, fused.cls_token, fused.pos_embedding)
    assert str(got.value) == str(want.value)
    short = model.pos_embedding.reshape(-1, 48)[:5]  # 1 + 4 patches of a 16-pixel image
    with torch.no_grad():  # a table that fits: the same tokens
        small = torch.randn(1, 3, 16, 16)
        torch.testing.assert_close(
            embed_tokens(fused.to_patch_embedding, small, fused.cls_token, short),
            embed_tokens(model.to_patch_embedding, small, model.cls_token, short),
            atol=2e-4, rtol=2e-4,
        )


# ----------------------------------------------------------------------------
# torch.autocast


@pytest.mark.parametrize(
    "source,name",
    [("zoo", "t2t_vit"), ("zoo", "vit"), ("vit-pytorch", "crossvit"), ("timm", "vit")],
    ids=["zoo-t2t_vit", "zoo-vit", "vit-pytorch-crossvit", "timm-vit"],
)
def test_autocast_runs_like_eager(source, name):
    """Under torch.autocast a float32 model takes float32 or bfloat16 images, as eager
    does (its Conv2d/Linear cast their inputs); the fused patch embedding once refused
    the mixed dtypes (T2T_ViT's later soft splits get autocast's bfloat16 tokens even
    from float32 images). Outputs and gradients as eager's, to bfloat16's precision."""
    model = BUILD[source](name).eval()
    fused = copy.deepcopy(model)
    optimize(fused, ops=("patch_embed", "performer_attention") if name == "t2t_vit" else ("patch_embed",))
    x = torch.randn(2, 3, IMG, IMG)
    with torch.no_grad():
        exact = model(x)
    for images in (x, x.bfloat16()):
        outs = []
        for m in (model, fused):
            m.zero_grad()
            with torch.autocast("cpu", dtype=torch.bfloat16):
                out = m(images)
            out.float().square().sum().backward()
            outs.append(out.float())
        want, got = outs
        scale = exact.abs().max()
        assert (got - exact).abs().max() <= 0.05 * scale, "fused under autocast is off"
        assert (got - want).abs().max() <= 0.05 * scale, "fused and eager under autocast disagree"
        for (n, p), q in zip(fused.named_parameters(), model.parameters(), strict=True):
            assert (p.grad is None) == (q.grad is None), n
            if p.grad is not None:
                assert p.grad.dtype == p.dtype, n
                tol = 0.1 * max(q.grad.abs().max().item(), 1e-6)
                assert (p.grad - q.grad).abs().max() <= tol, n


def _embedding(model: nn.Module, name: str, img: torch.Tensor) -> torch.Tensor:
    """The model's token sequence before its transformer: class token and positions in."""
    from vitkernels.tokens import embed_tokens

    if name == "crossvit":
        return model.sm_image_embedder(img)
    if name == "t2t_vit":
        return embed_tokens(model.tokens_to_token, img, model.cls_token, model.pos_embed)
    prefix = None if name == "cait" else model.cls_token  # CaiT's class token joins later
    return embed_tokens(model.to_patch_embedding, img, prefix, model.pos_embedding)


@pytest.mark.parametrize(
    "source,name",
    [("zoo", "vit"), ("zoo", "cait"), ("zoo", "pit"), ("zoo", "t2t"), ("zoo", "t2t_vit"), ("zoo", "crossvit"),
     ("vit-pytorch", "crossvit")],
)  # fmt: skip
def test_folded_tokens_under_autocast_keep_eagers_float32(source, name, monkeypatch):
    """Under autocast, eager's cat and add of a float32 model's class token and
    positions promote its bfloat16 patch tokens to float32, so its token stream stays
    float32; the fused embedding once returned them in bfloat16 (the positions folded
    into the bfloat16 call). Now: eager's dtype and values (to bfloat16's precision of
    the patch tokens), the projection still one fused call, and the gradients."""
    import vitkernels.replace.fused_patch_embed as fpe
    import vitkernels.replace.fused_t2t as ft2t

    model = BUILD[source](name).eval()  # eval: no dropout between the compared tokens
    fused = copy.deepcopy(model)
    optimize(fused, ops=("patch_embed",))
    calls = []
    for mod in (fpe, ft2t):
        orig = mod.patch_embed
        monkeypatch.setattr(mod, "patch_embed", lambda *a, _o=orig, **k: calls.append(k) or _o(*a, **k))
    img = torch.randn(2, 3, IMG, IMG)
    exact = _embedding(model, name, img).detach()
    outs = []
    for m in (model, fused):
        m.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = _embedding(m, name, img)
        out.float().square().sum().backward()
        outs.append(out)
    want, got = outs
    assert calls and all(k.get("pos_embed") is None for k in calls)  # fused, positions added after
    assert want.dtype == torch.float32 and got.dtype == want.dtype
    scale = exact.abs().max()
    assert (got - exact).abs().max() <= 0.03 * scale
    assert (got - want).abs().max() <= 0.03 * scale
    for (n, p), q in zip(fused.named_parameters(), model.parameters(), strict=True):
        assert (p.grad is None) == (q.grad is None), n
        # T2T's Performer blocks between the soft splits: eager bfloat16 in both, their
        # small gradients rounding-dominated (test_autocast_runs_like_eager covers them)
        if p.grad is not None and ".attention" not in n:
            assert p.grad.dtype == p.dtype, n
            assert (p.grad - q.grad).abs().max() <= 0.1 * max(q.grad.abs().max().item(), 1e-6), n
    calls.clear()
    with torch.no_grad():  # outside autocast the positions still fold into the call
        torch.testing.assert_close(_embedding(fused, name, img), exact, atol=1e-4 * scale, rtol=1e-4)
    assert calls and any(k.get("pos_embed") is not None for k in calls)


class _Float32LayerNorm(nn.LayerNorm):
    """A LayerNorm as CUDA's autocast runs one (in float32, layer_norm being on its
    float32 list); CPU's autocast runs it in bfloat16."""

    def forward(self, x):
        return torch.nn.functional.layer_norm(x.float(), self.normalized_shape, self.weight, self.bias, self.eps)


def _timm_patch_embed_with_norm():
    timm = pytest.importorskip("timm")
    return timm.layers.PatchEmbed(img_size=IMG, patch_size=8, in_chans=3, embed_dim=48, norm_layer=nn.LayerNorm)


@pytest.mark.parametrize(
    "source,name,path",
    [("vit-pytorch", "vit", "to_patch_embedding"), ("vit-pytorch", "simple_vit", "to_patch_embedding"),
     ("zoo", "vit", None), ("zoo", "crossvit", None), ("vit-pytorch", "crossvit", None), ("timm", "patch_embed", "")],
)  # fmt: skip
def test_output_norm_under_a_float32_norm_autocast_gives_eagers_float32(source, name, path, monkeypatch):
    """Where autocast runs layer_norm in float32 (CUDA's policy; emulated here on CPU:
    the fused modules' probe of the policy says float32, and the eager copy's output
    norms compute in float32), eager's patch tokens after an output LayerNorm are
    float32; the fused call's would be bfloat16. Now the norm runs after the fused
    projection, as eager runs it: eager's dtype, values and gradients."""
    import vitkernels.replace.fused_patch_embed as fpe

    model = (_timm_patch_embed_with_norm() if source == "timm" else BUILD[source](name)).eval()
    fused = copy.deepcopy(model)
    optimize(fused, ops=("patch_embed",))
    out_norms = [model.norm] if source == "timm" else [
        seq[-1] for seq in model.modules() if isinstance(seq, nn.Sequential) and isinstance(seq[-1], nn.LayerNorm)
    ]  # fmt: skip
    assert out_norms
    for m in out_norms:
        m.__class__ = _Float32LayerNorm
    monkeypatch.setitem(fpe._NORM_DTYPE, ("cpu", torch.bfloat16), torch.float32)
    img = torch.randn(2, 3, IMG, IMG)

    def run(m):
        m.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = m.get_submodule(path)(img) if path is not None else _embedding(m, name, img)
        out.float().square().sum().backward()
        return out

    want, got = run(model), run(fused)
    assert want.dtype == torch.float32 and got.dtype == torch.float32
    torch.testing.assert_close(got, want, atol=0.03 * want.abs().max().item(), rtol=0)
    for (n, p), q in zip(fused.named_parameters(), model.parameters(), strict=True):
        assert (p.grad is None) == (q.grad is None), n
        if p.grad is not None:
            assert (p.grad - q.grad).abs().max() <= 0.1 * max(q.grad.abs().max().item(), 1e-6), n


def test_the_norm_policy_probe_reads_cpus_autocast():
    """On CPU autocast runs layer_norm in its own dtype: no float32 norm there."""
    from vitkernels.replace.fused_patch_embed import norm_widens_under_autocast

    x = torch.randn(1, 3, 8, 8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        widens = norm_widens_under_autocast(x)
        assert widens == (torch.nn.functional.layer_norm(x.bfloat16(), (8,)).dtype != torch.bfloat16)
    assert not norm_widens_under_autocast(x)  # no autocast


def test_patch_embed_under_autocast_casts_like_conv2d():
    """The op itself: under autocast, float32 tensors go to autocast's dtype (as
    F.conv2d's inputs do); a float32 weight with bfloat16 images is no error there."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 16, 16, generator=g)
    w, b = torch.randn(8, 3, 4, 4, generator=g), torch.randn(8, generator=g)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        want = torch.nn.functional.conv2d(x.bfloat16(), w, b, stride=4).flatten(2).transpose(1, 2)
        for images in (x, x.bfloat16()):
            for backend in (None, "reference"):
                got = vitkernels.patch_embed(images, w, b, kernel_size=4, backend=backend)
                assert got.dtype == torch.bfloat16
                torch.testing.assert_close(got.float(), want.float(), atol=3e-2, rtol=3e-2)
    with pytest.raises(TypeError, match="weight has dtype torch.float32 but images have torch.bfloat16"):
        vitkernels.patch_embed(x.bfloat16(), w, b, kernel_size=4)  # outside autocast: still an error


@pytest.mark.parametrize("source,name", [("zoo", "vit"), ("zoo", "t2t_vit"), ("vit-pytorch", "crossvit")])
def test_jit_trace_of_models_with_folded_positions(source, name):
    """torch.jit.trace of an optimized model traces like the eager one: under tracing
    the sizes patch_embed checks the position table against are tensors (they once
    failed a set-membership test and raised "pos_embed has shape (tensor(17), ...)")."""
    model = BUILD[source](name).eval()
    x = torch.randn(2, 3, IMG, IMG)
    with torch.no_grad():
        want = model(x)
    optimize(model)
    with torch.no_grad():
        traced = torch.jit.trace(model, x, check_trace=False)
        got = traced(x)
    torch.testing.assert_close(got, want, atol=2e-4, rtol=2e-4)


def test_t2t_module_honours_global_forward_hooks():
    """A global forward hook (torch.nn.modules.module.register_module_forward_hook,
    as profilers and activation loggers use) sees every Token_performer of an
    optimized T2T_ViT called, as in eager: the fused T2T module must not skip their
    __call__ then (it once checked only the blocks' own hooks)."""
    from torch.nn.modules.module import register_module_forward_hook

    model = _zoo("t2t_vit").eval()
    x = torch.randn(2, 3, IMG, IMG)
    with torch.no_grad():
        want = model(x)
    optimize(model)
    names = {id(m): n for n, m in model.named_modules()}
    seen = []
    handle = register_module_forward_hook(lambda m, args, out: seen.append(names.get(id(m))))
    try:
        with torch.no_grad():
            got = model(x)
    finally:
        handle.remove()
    assert "tokens_to_token.attention1" in seen and "tokens_to_token.attention2" in seen, seen
    torch.testing.assert_close(got, want, atol=2e-4, rtol=2e-4)


@pytest.mark.parametrize("name", ["vit", "crossvit"])
def test_image_the_patch_rearrange_refuses_raises_what_eager_raises(name):
    """An image whose sides are not multiples of the patch size: vit-pytorch's
    Rearrange raises einops' error; the optimized model must raise the same (it once
    raised patch_embed's ValueError about the grid instead)."""
    einops = pytest.importorskip("einops")
    model = _vit_pytorch(name).eval()
    x = torch.randn(2, 3, IMG + 4, IMG + 4)
    with pytest.raises(einops.EinopsError) as eager:
        model(x)
    optimize(model)
    with pytest.raises(einops.EinopsError) as fused:
        model(x)
    assert str(fused.value) == str(eager.value)
