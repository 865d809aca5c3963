"""Rules for the "patch_embed" op (fused modules in fused_patch_embed.py).

Replaced:
  CrossViT's ImageEmbedder (vit-pytorch cross_vit and this repo's crossvit):
    patches, class token and position embedding in one call
  an nn.Sequential that is exactly one patch embedding, whatever model holds it:
    vit-pytorch's ``to_patch_embedding`` (Rearrange to (p1 p2 c) patches,
    [LayerNorm], Linear, [LayerNorm]) in ViT, SimpleViT, DeepViT, CaiT,
    distillation and the rest of the family, and this repo's copies;
    PiT's nn.Unfold(patch, patch // 2) + Rearrange + Linear
  timm's PatchEmbed (Conv2d + flatten [+ LayerNorm]) in VisionTransformer, DeiT,
    CaiT and others

Recognised and left, with the reason in the report:
  a Sequential that starts like a patch embedding but holds more (vit-pytorch's
    T2T ``to_patch_embedding``: soft splits with Transformer blocks between them;
    replacing the container would hide those blocks from the attention rules)
  timm PatchEmbed variants that do not return (B, L, D) tokens (flatten=False,
    output_fmt) or pad dynamically, and Conv2d projections with dilation,
    groups or non-zero padding modes

Not folded: the class token and position embedding of models whose own forward
does the cat and add (ViT, DeepViT, CaiT, PiT, T2T, timm's VisionTransformer).
They live on the model itself, and optimize replaces submodules only (the root
cannot be swapped in place), so folding them needs a model-level replacement the
core does not offer yet. CrossViT's ImageEmbedder holds them in a submodule.
"""

from __future__ import annotations

from torch import nn

from vitkernels.replace import Rule, register_rule
from vitkernels.replace.fused_patch_embed import (
    FusedImageEmbedder,
    FusedPatchSequential,
    FusedTimmPatchEmbed,
    PatchSpec,
    is_layer_norm,
    parse_patch_sequential,
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
