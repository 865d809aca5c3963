"""Rules for the "patch_embed" op (fused modules in fused_patch_embed.py).

Replaced:
  CrossViT's ImageEmbedder (vit-pytorch cross_vit and this repo's crossvit):
    patches, class token and position embedding in one call
  an nn.Sequential that is a patch embedding, whatever model holds it:
    vit-pytorch's ``to_patch_embedding`` (Rearrange to (p1 p2 c) patches,
    [LayerNorm], Linear, [LayerNorm]) in ViT, SimpleViT, DeepViT, CaiT,
    distillation and the rest of the family, and this repo's copies;
    PiT's nn.Unfold(patch, patch // 2) + Rearrange + Linear; vit-pytorch's T2T
    ``to_patch_embedding`` (soft splits with Transformer blocks between them:
    the last soft split and the Linear are fused, the blocks before run as they
    are and are visited by the other rules)
  the official T2T-ViT ``T2T_module``: each soft split with the next
    Token_performer's norm1 and kqv projection (or the final ``project``) as one
    call; its Token_performers are visited by the performer rule
  timm's PatchEmbed (Conv2d + flatten [+ LayerNorm]) in VisionTransformer, DeiT,
    CaiT and others

Recognised and left, with the reason in the report:
  a Sequential that starts like a patch embedding but does not end in one
    ([LayerNorm,] Linear[, LayerNorm] after its last patchify)
  timm PatchEmbed variants that do not return (B, L, D) tokens (flatten=False,
    output_fmt) or pad dynamically, and Conv2d projections with dilation,
    groups or non-zero padding modes

The class token and position embedding: CrossViT's ImageEmbedder holds them in
a submodule, which is replaced whole. This repo's ViT, DeepViT, CaiT (positions
only), PiT, T2TViT, T2T_ViT and the distillable models keep them on the model
and embed through ``vitkernels.models.vit.embed_tokens``, which hands them to the
patch embedding's ``embed_tokens`` method when it has one: the fused modules
here have one, so they go into the same patch_embed call, state_dict unchanged.
Not folded: models whose own forward does the cat and add with code this
package does not own (vit-pytorch's ViT family, timm's VisionTransformer).
"""

from __future__ import annotations

from torch import nn

from vitkernels.replace import Rule, register_rule
from vitkernels.replace.fused_patch_embed import (
    FusedImageEmbedder,
    FusedPatchSequential,
    FusedT2TModule,
    FusedTimmPatchEmbed,
    PatchSpec,
    is_layer_norm,
    parse_patch_sequential,
    unfold_geometry,
)


def _qualname(m: nn.Module) -> str:
    return f"{type(m).__module__}.{type(m).__qualname__}"


# ----------------------------------------------------------------------------
# CrossViT ImageEmbedder

_IMAGE_EMBEDDERS = frozenset(
    {"vit_pytorch.cross_vit.ImageEmbedder", "vitkernels.models.crossvit.ImageEmbedder"}
)


def _build_image_embedder(module: nn.Module, backend: str | None) -> nn.Module | str:
    seq = getattr(module, "to_patch_embedding", None)
    spec = parse_patch_sequential(seq) if isinstance(seq, nn.Module) else None
    if not isinstance(spec, PatchSpec) or spec.unfold:
        return f"to_patch_embedding is not a Rearrange/LayerNorm/Linear/LayerNorm patch embedding ({spec})"
    cls, pos = getattr(module, "cls_token", None), getattr(module, "pos_embedding", None)
    D = seq._modules[spec.linear].out_features
    if not isinstance(cls, nn.Parameter) or tuple(cls.shape) != (1, 1, D):
        return f"cls_token is not a (1, 1, {D}) parameter"
    if not isinstance(pos, nn.Parameter) or pos.ndim != 3 or pos.shape[0] != 1 or pos.shape[2] != D:
        return f"pos_embedding is not a (1, N, {D}) parameter"
    if not isinstance(getattr(module, "dropout", None), nn.Dropout):
        return "dropout is not an nn.Dropout"
    return FusedImageEmbedder(module, backend, spec)


register_rule(
    Rule(
        name="CrossViT ImageEmbedder (vit-pytorch, zoo)",
        op="patch_embed",
        matches=lambda m: _qualname(m) in _IMAGE_EMBEDDERS,
        build=_build_image_embedder,
    )
)


# ----------------------------------------------------------------------------
# patch-embedding Sequentials


def _build_sequential(module: nn.Module, backend: str | None) -> nn.Module | str:
    spec = parse_patch_sequential(module)
    if isinstance(spec, str):
        return spec
    return FusedPatchSequential(module, backend, spec)


register_rule(
    Rule(
        name="patch Sequential (vit-pytorch Rearrange or Unfold, [LayerNorm], Linear, [LayerNorm])",
        op="patch_embed",
        matches=lambda m: parse_patch_sequential(m) is not None,
        build=_build_sequential,
    )
)


# ----------------------------------------------------------------------------
# timm PatchEmbed


def _build_timm(module: nn.Module, backend: str | None) -> nn.Module | str:
    if not getattr(module, "flatten", False) or str(getattr(module, "output_fmt", "NCHW")) not in (
        "NCHW", "Format.NCHW",
    ):
        return "PatchEmbed keeps the image layout (flatten=False or output_fmt): not tokens"
    if getattr(module, "dynamic_img_pad", False):
        return "PatchEmbed pads images on the right and bottom only (dynamic_img_pad)"
    proj, norm = getattr(module, "proj", None), getattr(module, "norm", None)
    if type(proj) is not nn.Conv2d:
        return f"proj is {type(proj).__name__}, not nn.Conv2d"
    if (
        proj.groups != 1
        or tuple(proj.dilation) != (1, 1)
        or proj.padding_mode != "zeros"
        or isinstance(proj.padding, str)
    ):
        return "proj is a Conv2d with groups, dilation, string padding or a non-zero padding mode"
    if not (type(norm) is nn.Identity or is_layer_norm(norm)):
        return f"norm is {type(norm).__name__}, not LayerNorm or Identity"
    if is_layer_norm(norm) and tuple(norm.normalized_shape) != (proj.out_channels,):
        return f"norm is a LayerNorm over {tuple(norm.normalized_shape)}, not ({proj.out_channels},)"
    return FusedTimmPatchEmbed(module, backend)


register_rule(
    Rule(
        name="timm PatchEmbed",
        op="patch_embed",
        matches=lambda m: _qualname(m) == "timm.layers.patch_embed.PatchEmbed",
        build=_build_timm,
    )
)


# ----------------------------------------------------------------------------
# T2T-ViT's T2T_module (official layout)


def _build_t2t_module(module: nn.Module, backend: str | None) -> nn.Module | str:
    problems = []
    for name in ("soft_split0", "soft_split1", "soft_split2"):
        m = module._modules.get(name)
        why = unfold_geometry(m) if type(m) is nn.Unfold else f"{type(m).__name__}, not nn.Unfold"
        if isinstance(why, str):
            problems.append(f"{name}: {why}")
    for name in ("attention1", "attention2"):
        if not isinstance(module._modules.get(name), nn.Module):
            problems.append(f"no {name} module")
    if type(module._modules.get("project")) is not nn.Linear:
        problems.append(f"project is {type(module._modules.get('project')).__name__}, not nn.Linear")
    if problems:
        return "not the official performer/transformer T2T_module layout: " + "; ".join(problems)
    return FusedT2TModule(module, backend)


register_rule(
    Rule(
        name="T2T-ViT T2T_module (official layout)",
        op="patch_embed",
        matches=lambda m: type(m).__name__ == "T2T_module",
        build=_build_t2t_module,
    )
)
