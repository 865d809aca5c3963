"""The optimized model is the original to its users (timm's model API, hooks,
sharing, torch.fx, TorchScript, error types, DDP, the optimize API and report).

Tiny timm models of every family, optimized with every op; the eager copy is
the oracle. Each family's attention biases and zero-initialised norms are
randomised so that the fused attention shows in the outputs.
"""

from __future__ import annotations

import copy
import os

import pytest
import torch
import torch.nn.functional as F
from _numerics import assert_close
from torch import nn

import vitkernels
from vitkernels.compare import output_tensors, wake_zero_init_norms
from vitkernels.replace import is_fused

timm = pytest.importorskip("timm")

# name: (constructor overrides, image side, features_only overrides)
FAMILIES = {
    "vit_tiny_patch16_224": (dict(img_size=32, patch_size=8, depth=2), 32, dict(out_indices=(1,))),
    "deit_tiny_distilled_patch16_224": (dict(img_size=32, patch_size=8, depth=2), 32, dict(out_indices=(1,))),
    "cait_xxs24_224": (dict(img_size=32, patch_size=8, depth=2, depth_token_only=1), 32, dict(out_indices=(1,))),
    "pit_ti_224": (dict(img_size=32, patch_size=8, stride=4, base_dims=[16, 16, 16], depth=[1, 1, 1],
                        heads=[2, 2, 2]), 32, {}),
    "levit_128s": (dict(img_size=64, embed_dim=(32, 48, 64), key_dim=8, num_heads=(2, 3, 4), depth=(1, 1, 1)), 64, {}),
    "crossvit_tiny_240": (dict(img_size=48, img_scale=(1.0, 1.0), embed_dim=[32, 48], depth=[[1, 1, 0]],
                               num_heads=[2, 2], mlp_ratio=[2, 2, 1]), 48, None),
}  # fmt: skip


def _randomize(model: nn.Module) -> nn.Module:
    wake_zero_init_norms(model)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("attention_biases"):
                p.normal_(0.0, 1.0)
    return model


def _timm(name: str, **extra) -> tuple[nn.Module, torch.Tensor]:
    kw, side, _ = FAMILIES[name]
    model = timm.create_model(name, pretrained=False, num_classes=10, **{**kw, **extra})
    return _randomize(model).eval(), torch.randn(2, 3, side, side)


def _pair(name: str, **extra) -> tuple[nn.Module, nn.Module, torch.Tensor]:
    eager, x = _timm(name, **extra)
    fused = copy.deepcopy(eager)
    report = vitkernels.optimize(fused)
    assert report.count() > 0, str(report)
    return eager, fused, x


def _close(got, want, tol: float = 1e-4) -> None:
    """Every output tensor within tol of the eager model's, errors measured against at
    least 1 (the models' outputs are O(1) logits and features)."""
    got, want = output_tensors(got), output_tensors(want)
    assert len(got) == len(want) > 0
    for g, w in zip(got, want, strict=True):
        assert_close(g, w, tol, floor=1.0)


# ----------------------------------------------------------------------------
# timm's model API


@pytest.mark.parametrize("name", list(FAMILIES))
def test_timm_model_api_after_optimize(name):
    eager, fused, x = _pair(name)
    with torch.no_grad():
        feats = eager.forward_features(x)
        _close(fused.forward_features(x), feats)
        for pre_logits in (False, True):
            _close(fused.forward_head(fused.forward_features(x), pre_logits=pre_logits),
                   eager.forward_head(feats, pre_logits=pre_logits))  # fmt: skip
        _close(fused.forward_intermediates(x), eager.forward_intermediates(x))
    assert fused.no_weight_decay() == eager.no_weight_decay()
    if hasattr(eager, "group_matcher"):
        names = [n for n, _ in eager.named_parameters()]
        got, want = fused.group_matcher(), eager.group_matcher()
        if callable(want):  # CaiT's is a function of the parameter name
            got, want = [got(n) for n in names], [want(n) for n in names]
        assert got == want
    for model in (eager, fused):
        model.reset_classifier(5)
    fused.load_state_dict(eager.state_dict())
    with torch.no_grad():
        _close(fused(x), eager(x))
    if hasattr(eager, "set_input_size"):
        side = x.shape[-1] + 16
        for model in (eager, fused):
            model.set_input_size(img_size=side)
        y = torch.randn(2, 3, side, side)
        with torch.no_grad():
            _close(fused(y), eager(y))
        assert fused.patch_embed.feat_ratio() == eager.patch_embed.feat_ratio()


@pytest.mark.parametrize("name", [n for n, f in FAMILIES.items() if f[2] is not None])
def test_timm_features_only_after_optimize(name):
    eager, x = _timm(name, features_only=True, **FAMILIES[name][2])
    fused = copy.deepcopy(eager)
    assert vitkernels.optimize(fused).count() > 0
    with torch.no_grad():
        _close(fused(x), eager(x))


@pytest.mark.parametrize("name", ["vit_tiny_patch16_224", "levit_128s", "cait_xxs24_224"])
def test_timm_gradient_checkpointing_after_optimize(name):
    eager, fused, x = _pair(name)
    for model in (eager, fused):
        model.set_grad_checkpointing(True)
        model.train()
        model(x).square().sum().backward()
    grads = dict(eager.named_parameters())
    for pname, p in fused.named_parameters():
        want = grads[pname].grad
        assert (p.grad is None) == (want is None), pname
        if want is not None:
            scale = max(1.0, want.abs().max().item())
            assert (p.grad - want).abs().max().item() <= 1e-3 * scale, pname


# ----------------------------------------------------------------------------
# hooks, sharing


def test_hooks_on_a_replaced_timm_module_keep_firing():
    model, x = _timm("levit_128s")
    attn = model.stages[0].blocks[0].attn
    calls = []
    attn.register_forward_pre_hook(lambda m, args: calls.append("pre"))
    attn.register_forward_hook(lambda m, args, out: calls.append("post"))
    with torch.no_grad():
        for step in ("eager", "optimized", "restored"):
            if step == "optimized":
                assert vitkernels.optimize(model).count("relpos_attention") > 0 and is_fused(attn)
            if step == "restored":
                assert vitkernels.restore(model) > 0 and not is_fused(attn)
            calls.clear()
            model(x)
            assert calls == ["pre", "post"], step


def test_hooks_on_a_fused_patch_embedding_fire_in_zoo_models():
    """This repo's models fold their class token into the fused patch embedding's
    call; with hooks on it, it is called as a module, so the hooks fire."""
    from vitkernels.models import create

    model = create("vit_b16", image_size=32, depth=1, dim=64, heads=2, num_classes=10).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        want = model(x)
    vitkernels.optimize(model)
    seen = []
    model.to_patch_embedding.register_forward_hook(lambda m, args, out: seen.append(out.shape))
    with torch.no_grad():
        _close(model(x), want)
    assert seen == [torch.Size([2, 4, 64])]


def test_a_timm_module_used_at_two_places_stays_one_module():
    from timm.models.levit import Attention

    shared = _randomize(Attention(16, key_dim=8, num_heads=2, attn_ratio=2, resolution=(4, 4)))
    model = nn.Sequential(shared, nn.GELU(), shared).eval()
    x = torch.randn(2, 16, 16)
    with torch.no_grad():
        want = model(x)
    report = vitkernels.optimize(model)
    assert report.count() == 1 and report.replaced[0].also_at == ["2"], str(report)
    assert model[0] is model[2] is shared and is_fused(shared)
    with torch.no_grad():
        _close(model(x), want)
    assert vitkernels.restore(model) == 1 and model[0] is model[2] is shared
    assert type(shared) is Attention


def _zoo_vit() -> tuple[nn.Module, torch.Tensor]:
    from vitkernels.models import create

    model = create("vit_b16", image_size=32, depth=1, dim=64, heads=2, num_classes=10)
    return model, torch.randn(2, 3, 32, 32)


@pytest.mark.parametrize(("source", "reparam"), [("timm", "prune"), ("zoo", "weight_norm")])
def test_pruning_or_weight_norm_on_a_fused_patch_projection_trains_like_eager(source, reparam):
    """torch.nn.utils.prune and weight_norm recompute the projection's ``weight`` in a
    forward pre-hook; the fused patch embedding, which reads the weight itself, runs
    the original layers while they have hooks: the same losses and updates as eager
    over two SGD steps (reading the stale weight failed the second backward)."""
    import torch.nn.utils.prune as prune

    eager, x = _timm("vit_tiny_patch16_224") if source == "timm" else _zoo_vit()
    fused = copy.deepcopy(eager)
    assert vitkernels.optimize(fused, ops="patch_embed").count() == 1
    losses: dict[str, list[float]] = {"eager": [], "fused": []}
    for tag, model in (("eager", eager), ("fused", fused)):
        model.train()
        proj = model.patch_embed.proj if source == "timm" else model.to_patch_embedding[2]
        if reparam == "prune":
            prune.l1_unstructured(proj, "weight", amount=0.5)
        else:
            torch.nn.utils.weight_norm(proj)
        opt = torch.optim.SGD(model.parameters(), lr=0.05)
        for _ in range(2):
            loss = model(x).square().mean()
            loss.backward()
            opt.step()
            opt.zero_grad()
            losses[tag].append(loss.item())
    assert losses["fused"] == pytest.approx(losses["eager"], rel=1e-5)
    for (name, p), q in zip(eager.named_parameters(), fused.parameters(), strict=True):
        assert_close(q, p, 1e-5, name, floor=1.0)


def test_a_slice_of_a_fused_sequential_is_an_original_sequential():
    """vit-pytorch's MAE and SimMIM take ``encoder.to_patch_embedding[1:]``; nn.Sequential
    builds the slice from ``self.__class__``: it is a plain nn.Sequential (optimize
    planned nothing for it) that computes what the eager slice computes."""
    eager, x = _zoo_vit()
    fused = copy.deepcopy(eager)
    assert vitkernels.optimize(fused, ops="patch_embed").count() == 1
    part = fused.to_patch_embedding[1:]
    assert type(part) is nn.Sequential and not is_fused(part) and is_fused(fused.to_patch_embedding)
    assert [type(m) for m in part] == [type(m) for m in eager.to_patch_embedding[1:]]
    patches = eager.to_patch_embedding[0](x)
    with torch.no_grad():
        _close(part(patches), eager.to_patch_embedding[1:](patches))
        _close(fused(x), eager(x))


# ----------------------------------------------------------------------------
# torch.fx, TorchScript


FX = ["vit_tiny_patch16_224", "deit_tiny_distilled_patch16_224", "cait_xxs24_224", "pit_ti_224", "levit_128s"]


@pytest.mark.parametrize("name", FX)
def test_fx_symbolic_trace_of_optimized_timm_models(name):
    eager, fused, x = _pair(name)
    torch.fx.symbolic_trace(copy.deepcopy(eager))  # the original traces
    traced = torch.fx.symbolic_trace(fused)
    targets = {getattr(n.target, "__name__", str(n.target)) for n in traced.graph.nodes}
    assert targets & {"relpos_attention", "patch_embed"}, "the ops are leaf calls in the graph"
    with torch.no_grad():
        _close(traced(x), eager(x))


@pytest.mark.parametrize("name", ["vit_tiny_patch16_224", "levit_128s"])
def test_timm_fx_feature_extraction_of_optimized_models(name):
    from timm.models import create_feature_extractor, get_graph_node_names

    eager, fused, x = _pair(name)
    nodes = get_graph_node_names(eager)[1]
    assert get_graph_node_names(fused)[1] == nodes or len(get_graph_node_names(fused)[1]) > 0
    last = [n for n in nodes if n.startswith(("blocks", "stages"))][-1]
    with torch.no_grad():
        want = create_feature_extractor(copy.deepcopy(eager), [last])(x)
        got = create_feature_extractor(fused, [last])(x)
    _close(list(got.values()), list(want.values()))


@pytest.mark.parametrize("name", ["vit_tiny_patch16_224", "cait_xxs24_224", "pit_ti_224", "levit_128s",
                                  "crossvit_tiny_240"])  # fmt: skip
def test_torchscript_of_optimized_timm_models(name):
    """TorchScript cannot compile the ops' Python dispatch: the scripted model runs
    the original math of each fused module, and the eager model stays fused."""
    eager, fused, x = _pair(name)
    scripted = torch.jit.script(fused)
    assert any(is_fused(m) for m in fused.modules())
    with torch.no_grad():
        _close(scripted(x), eager(x))


# ----------------------------------------------------------------------------
# error types


def test_timm_patch_embed_wrong_size_raises_timms_assertion():
    eager, fused, _ = _pair("vit_tiny_patch16_224")
    bad = torch.randn(1, 3, 40, 40)
    with pytest.raises(AssertionError) as want:
        eager(bad)
    with pytest.raises(AssertionError) as got:
        fused(bad)
    assert str(got.value) == str(want.value)


def test_timm_levit_wrong_size_raises_what_eager_raises():
    eager, fused, _ = _pair("levit_128s")
    bad = torch.randn(1, 3, 48, 48)
    with pytest.raises(Exception) as want:
        eager(bad)
    with pytest.raises(type(want.value)):
        fused(bad)


# ----------------------------------------------------------------------------
# DDP


def test_ddp_wrapping_an_optimized_model_trains_like_eager(tmp_path):
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    eager, fused, x = _pair("levit_128s")
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        ddp = DistributedDataParallel(fused.train())
        eager.train()
        for model in (ddp, eager):
            model(x).square().mean().backward()
    finally:
        dist.destroy_process_group()
    grads = dict(eager.named_parameters())
    for pname, p in fused.named_parameters():
        if p.grad is not None:
            scale = max(1.0, grads[pname].grad.abs().max().item())
            assert (p.grad - grads[pname].grad).abs().max().item() <= 1e-3 * scale, pname


# ----------------------------------------------------------------------------
# the "attention" replacement and the forced backend


def _vit_pytorch_attention() -> tuple[nn.Module, torch.Tensor]:
    vit = pytest.importorskip("vit_pytorch.vit")
    model = nn.Sequential(vit.Attention(16, heads=2, dim_head=8)).eval()
    return model, torch.randn(2, 5, 16)


def test_attention_replacement_honours_use_backend_and_the_environment(monkeypatch):
    import vitkernels.replace.fused_attention as fa

    model, x = _vit_pytorch_attention()
    vitkernels.optimize(model, ops="attention")
    literal, sdpa = [], []
    real_ref, real_sdpa = fa.attention_reference, F.scaled_dot_product_attention
    monkeypatch.setattr(fa, "attention_reference", lambda *a, **k: literal.append(1) or real_ref(*a, **k))
    monkeypatch.setattr(fa.F, "scaled_dot_product_attention",
                        lambda *a, **k: sdpa.append(1) or real_sdpa(*a, **k))  # fmt: skip
    with torch.no_grad():
        model(x)
        assert (literal, sdpa) == ([], [1])
        with vitkernels.use_backend("reference"):
            model(x)
        assert (literal, sdpa) == ([1], [1])
        monkeypatch.setenv("VITKERNELS_BACKEND", "reference")
        model(x)
        assert (literal, sdpa) == ([1, 1], [1])
        monkeypatch.setenv("VITKERNELS_BACKEND", "bogus")
        with pytest.raises(ValueError, match="VITKERNELS_BACKEND: unknown backend 'bogus'"):
            model(x)


def test_timm_fused_attn_switch_honours_use_backend():
    from timm.layers import Attention

    attn = Attention(16, num_heads=2)
    attn.fused_attn = False
    model = nn.Sequential(attn)
    assert vitkernels.optimize(model, ops="attention").count() == 1
    assert attn.fused_attn is True
    with vitkernels.use_backend("reference"):
        assert attn.fused_attn is False
    vitkernels.restore(model)
    assert attn.fused_attn is False  # the module's own value, as it was


# ----------------------------------------------------------------------------
# the report


def test_report_groups_repeated_reasons():
    timm = pytest.importorskip("timm")
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8, depth=4,
                              num_classes=10)  # fmt: skip
    report = vitkernels.optimize(model, ops="attention")
    assert len(report.left) == 4
    lines = str(report).splitlines()
    assert len(lines) == 2, str(report)
    assert lines[1].startswith("  left     4 x Attention: timm already runs it on F.scaled_dot_product_attention")
    assert lines[1].endswith(": blocks.{0-3}.attn")


def test_report_groups_repeated_replacements():
    from vitkernels.models import create

    model = create("cait_xxs24", image_size=32, patch_size=8, depth=4, cls_depth=2, num_classes=10)
    report = vitkernels.optimize(model, ops=("head_mixing_attention",))
    lines = str(report).splitlines()
    assert len(lines) == 2, str(report)
    assert lines[1].startswith("  replaced 6 x Attention -> head_mixing_attention")
    assert lines[1].endswith(": patch_transformer.layers.{0-3}.0.fn, cls_transformer.layers.{0-1}.0.fn")


def test_report_lists_unrecognised_attention_and_patch_embeddings():
    from vit_pytorch.simple_vit import SimpleViT
    from vit_pytorch.vit_for_small_dataset import ViT as SmallDatasetViT

    small = dict(image_size=32, patch_size=8, num_classes=10, dim=32, depth=2, heads=2, mlp_dim=64)
    simple = SimpleViT(**small)
    report = vitkernels.optimize(simple)
    assert report.count("attention") == 2 and not report.left, str(report)  # recognised now
    lsa = SmallDatasetViT(**small)  # SPT patches (its Sequential is replaced), LSA attention
    report = vitkernels.optimize(lsa)
    assert [r.path for r in report.replaced] == ["to_patch_embedding.to_patch_tokens"]
    assert {r.source: r.reason for r in report.left} == {
        "LSA": "no rule recognises this attention layout"
    }, str(report)
    assert "left     2 x LSA: no rule recognises this attention layout: transformer.layers.{0-1}.0" in str(
        report
    )


def test_optimize_api_on_real_models():
    model, x = _vit_pytorch_attention()
    assert vitkernels.optimize(model, ops="attention").count() == 1  # one name, not its letters
    with pytest.raises(TypeError, match="expected an nn.Module to optimize in place, got str"):
        vitkernels.optimize("hello")
    with pytest.raises(ValueError, match=r"optimize\(backend='gpu'\): unknown backend"):
        vitkernels.optimize(model, backend="gpu")
    with pytest.raises(ValueError, match=r"relpos_attention\(backend='gpu'\): unknown backend"):
        q = torch.randn(1, 1, 4, 8)
        vitkernels.relpos_attention(q, q, q, torch.zeros(1, 4), fmap_size=2, backend="gpu")
    assert os.environ.get("VITKERNELS_BACKEND") in (None, "", "auto")


# ----------------------------------------------------------------------------
# layers replaced after optimize


def _small_model(spec: str) -> tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    small = dict(num_classes=10, dim=32, depth=1, heads=2, mlp_dim=64, dim_head=16)
    if spec == "timm:cait":
        return _timm("cait_xxs24_224")
    if spec == "vit-pytorch:ViT":
        from vit_pytorch.vit import ViT

        return ViT(image_size=32, patch_size=8, **small).eval(), torch.randn(2, 3, 32, 32)
    from vitkernels.models import crossvit, t2t

    if spec == "zoo:CrossViT":
        model = crossvit.CrossViT(
            image_size=32, num_classes=10, sm_dim=32, lg_dim=48, sm_patch_size=8, lg_patch_size=16,
            sm_enc_depth=1, lg_enc_depth=1, cross_attn_depth=1, depth=1,
        )  # fmt: skip
    elif spec == "zoo:T2TViT":
        model = t2t.T2TViT(image_size=32, num_classes=10, dim=32, depth=1, heads=2, mlp_dim=64)
    else:  # zoo:T2T_ViT, the official layout
        model = t2t.T2T_ViT(img_size=32, num_classes=10, embed_dim=32, depth=1, num_heads=2, token_dim=16)
    return model.eval(), torch.randn(2, 3, 32, 32)


@pytest.mark.parametrize("spec", ["vit-pytorch:ViT", "zoo:CrossViT", "zoo:T2TViT", "zoo:T2T_ViT", "timm:cait"])
def test_dynamic_quantization_after_optimize_runs_like_eager(spec):
    """torch.ao.quantization.quantize_dynamic swaps every nn.Linear for a quantized one
    (whose ``weight`` is a method): after optimize, the fused modules that fold a
    Linear's weight into their op (patch embeddings, T2T soft splits, timm's talking
    heads) once raised "weight must be a torch.Tensor, got method"; they must run
    the layers as they now are, as the quantized eager model does."""
    eager, x = _small_model(spec)
    fused = copy.deepcopy(eager)
    vitkernels.optimize(fused)
    qe = torch.ao.quantization.quantize_dynamic(eager, {nn.Linear}, dtype=torch.qint8)
    qf = torch.ao.quantization.quantize_dynamic(fused, {nn.Linear}, dtype=torch.qint8)
    with torch.no_grad():
        want, got = qe(x), qf(x)
    _close(got, want, 1e-4)
