"""Rules for the "patch_embed" op (fused mixins in fused_patch_embed.py; T2T-ViT's
tokens-to-token module in rules_t2t.py).

Replaced:
  an nn.Sequential that is a patch embedding, whatever model holds it:
    vit-pytorch's ``to_patch_embedding`` (Rearrange to (p1 p2 c) patches,
    [LayerNorm], Linear, [LayerNorm]) in ViT, SimpleViT, DeepViT, CaiT,
    distillation and the rest of the family, and this repo's copies;
    PiT's nn.Unfold(patch, patch // 2) + Rearrange + Linear; vit-pytorch's T2T
    ``to_patch_embedding`` (soft splits with Transformer blocks between them:
    the last soft split and the Linear are fused, the blocks before run as they
    are and are visited by the other rules)
  CrossViT's ImageEmbedder (vit-pytorch cross_vit and this repo's crossvit):
    patches, class token and position embedding in one call
  timm's PatchEmbed (Conv2d + flatten [+ LayerNorm]) in VisionTransformer, DeiT,
    CaiT and others; timm CrossViT's PatchEmbed; timm PiT's ConvEmbedding (a
    feature map: a view of the tokens)

Recognised and left, with the reason in the report:
  a Sequential that starts like a patch embedding but does not end in one
    ([LayerNorm,] Linear[, LayerNorm] after its last patchify)
  timm PatchEmbed variants that do not return (B, L, D) tokens (flatten=False,
    output_fmt) or pad dynamically; CrossViT's multi_conv stems; Conv2d
    projections with dilation, groups or non-zero padding modes

The class token and position embedding: CrossViT's ImageEmbedder holds them in
a submodule, which is replaced whole. This repo's ViT, DeepViT, CaiT (positions
only), PiT, T2TViT, T2T_ViT and the distillable models keep them on the model
and embed through ``vitkernels.tokens.embed_tokens``, which hands them to the
patch embedding's ``embed_tokens`` method when it has one: the fused modules
have one, so they go into the same patch_embed call, state_dict unchanged.
Not folded: models whose own forward does the cat and add with code this
package does not own (vit-pytorch's ViT family, timm's VisionTransformer).
"""

from __future__ import annotations

import dataclasses

from torch import nn

from vitkernels.replace import Plan, Rule, register_rule
from vitkernels.replace._match import plan_for, qualname, random_input, subclass_of
from vitkernels.replace.fused_patch_embed import (
    ConvPatchSpec,
    FusedConvPatchEmbed,
    FusedImageEmbedder,
    FusedPatchSequential,
    PatchSpec,
    is_layer_norm,
    layer_norm_args,
    unfold_geometry,
)

__all__ = ["is_layer_norm", "is_rearrange", "parse_patch_sequential"]

_OP = "patch_embed"
PATCHIFY = "b c (h p1) (w p2) -> b (h w) (p1 p2 c)"  # vit-pytorch's patch Rearrange
TOKENS = "b c n -> b n c"  # after nn.Unfold


def is_rearrange(m: nn.Module, pattern: str) -> bool:
    return qualname(type(m)) == "einops.layers.torch.Rearrange" and " ".join(
        str(getattr(m, "pattern", "")).split()
    ) == pattern


# ----------------------------------------------------------------------------
# patch-embedding Sequentials


def parse_patch_sequential(seq: nn.Module) -> PatchSpec | str | None:
    """A PatchSpec if ``seq`` is a patch embedding; a sentence saying why not if it
    starts like one (a Rearrange to patches or an nn.Unfold) but is not; None if it
    does not look like one at all.

    The Sequential may hold more before its last patchify (vit-pytorch's T2T
    ``to_patch_embedding``: soft splits with Transformer blocks between them, the
    last soft split followed by the Linear): those children become the spec's
    ``head``, run as they are, and only the last patch embedding is fused.
    """
    if type(seq) is not nn.Sequential:
        return None
    items = [(k, m) for k, m in seq._modules.items() if m is not None]
    i = 0
    while i < len(items) and type(items[i][1]) is nn.Identity:
        i += 1
    if i == len(items) or not _is_patchify(items[i][1]):
        return None
    last = max(j for j, (_, m) in enumerate(items) if _is_patchify(m))
    spec = _parse_patch_tail(seq, items[last:])
    if isinstance(spec, PatchSpec) and last > i:
        # the leading Identities too: the head runs in order before the fused tail, so
        # that a hook on one sees the image, as in the original
        spec = dataclasses.replace(spec, head=tuple(k for k, _ in items[:last]))
    return spec


def _is_patchify(m: nn.Module) -> bool:
    return is_rearrange(m, PATCHIFY) or type(m) is nn.Unfold


def _parse_patch_tail(seq: nn.Sequential, items: list[tuple[str, nn.Module]]) -> PatchSpec | str:
    """The patch embedding that ``items`` (starting at a patchify) are, or why not."""
    i = 0
    name, first = items[i]
    if is_rearrange(first, PATCHIFY):
        lengths = getattr(first, "axes_lengths", {}) or {}
        if set(lengths) != {"p1", "p2"}:
            return f"patch Rearrange with axis lengths {dict(lengths)}, expected p1 and p2"
        ks = (int(lengths["p1"]), int(lengths["p2"]))
        geometry, order, unfold, i = (ks, ks, (0, 0)), "pqc", False, i + 1
    else:
        geometry = unfold_geometry(first)
        if isinstance(geometry, str):
            return geometry
        if i + 1 >= len(items) or not is_rearrange(items[i + 1][1], TOKENS):
            return "nn.Unfold not followed by Rearrange('b c n -> b n c')"
        order, unfold, i = "cpq", True, i + 2
    rest = [(k, m) for k, m in items[i:] if type(m) is not nn.Identity]
    in_norm = out_norm = None
    if rest and is_layer_norm(rest[0][1]):
        in_norm, rest = rest[0][0], rest[1:]
    if not rest or type(rest[0][1]) is not nn.Linear:
        found = type(rest[0][1]).__name__ if rest else "nothing"
        return (
            f"the patches go to {found} (and {max(len(rest) - 1, 0)} more modules), not to "
            "[LayerNorm,] Linear[, LayerNorm]"
        )
    linear, rest = rest[0][0], rest[1:]
    if rest and is_layer_norm(rest[0][1]):
        out_norm, rest = rest[0][0], rest[1:]
    if rest:
        return (
            "the Sequential goes on after the patch embedding with "
            + ", ".join(type(m).__name__ for _, m in rest)
        )
    ks, st, pad = geometry
    K = seq._modules[linear].in_features
    if K % (ks[0] * ks[1]):
        return f"Linear in_features={K} is not channels * {ks[0]} * {ks[1]}"
    D = seq._modules[linear].out_features
    for nname, size in ((in_norm, K), (out_norm, D)):
        if nname is not None:
            why = layer_norm_args(seq._modules[nname], size)
            if isinstance(why, str):
                return why
    return PatchSpec(ks, st, pad, order, linear, in_norm, out_norm, unfold)


def _build_sequential(module: nn.Module) -> Plan | str:
    spec = parse_patch_sequential(module)
    if isinstance(spec, str):
        return spec
    return Plan(FusedPatchSequential, spec)  # nn.Sequential exactly, of stock layers


register_rule(
    Rule(
        name="patch Sequential (vit-pytorch Rearrange or Unfold, [LayerNorm], Linear, [LayerNorm])",
        op=_OP,
        matches=lambda m: parse_patch_sequential(m) is not None,
        build=_build_sequential,
    )
)


# ----------------------------------------------------------------------------
# CrossViT ImageEmbedder

_IMAGE_EMBEDDERS = frozenset(
    {"vit_pytorch.cross_vit.ImageEmbedder", "vitkernels.models.crossvit.ImageEmbedder"}
)


def _build_image_embedder(module: nn.Module) -> Plan | str:
    seq = getattr(module, "to_patch_embedding", None)
    spec = parse_patch_sequential(seq) if isinstance(seq, nn.Module) else None
    if not isinstance(spec, PatchSpec) or spec.unfold or spec.head:
        return f"to_patch_embedding is not a Rearrange/LayerNorm/Linear/LayerNorm patch embedding ({spec})"
    cls, pos = getattr(module, "cls_token", None), getattr(module, "pos_embedding", None)
    D = seq._modules[spec.linear].out_features
    if not isinstance(cls, nn.Parameter) or tuple(cls.shape) != (1, 1, D):
        return f"cls_token is not a (1, 1, {D}) parameter"
    if not isinstance(pos, nn.Parameter) or pos.ndim != 3 or pos.shape[0] != 1 or pos.shape[2] != D:
        return f"pos_embedding is not a (1, N, {D}) parameter"
    if not isinstance(getattr(module, "dropout", None), nn.Dropout):
        return "dropout is not an nn.Dropout"
    K, p = seq._modules[spec.linear].in_features, spec.kernel_size
    side = p[0] * max(1, int((pos.shape[1] - 1) ** 0.5))  # the image the table was made for
    image = (2, K // (p[0] * p[1]), side, side)
    return plan_for(
        module, _IMAGE_EMBEDDERS, FusedImageEmbedder, spec, lambda m: (random_input(image, m),)
    )


register_rule(
    Rule(
        name="CrossViT ImageEmbedder (vit-pytorch, zoo)",
        op=_OP,
        matches=subclass_of(*_IMAGE_EMBEDDERS),
        build=_build_image_embedder,
    )
)


# ----------------------------------------------------------------------------
# Conv2d patch embeddings: timm PatchEmbed, CrossViT PatchEmbed, PiT ConvEmbedding


def _conv_problem(conv: nn.Module, name: str) -> str | None:
    if type(conv) is not nn.Conv2d:
        return f"{name} is {type(conv).__name__}, not one nn.Conv2d"
    if (
        conv.groups != 1
        or tuple(conv.dilation) != (1, 1)
        or conv.padding_mode != "zeros"
        or isinstance(conv.padding, str)
    ):
        return f"{name} is a Conv2d with groups, dilation, string padding or a non-zero padding mode"
    return None


def _image(module: nn.Module, conv: nn.Conv2d) -> tuple[int, int, int, int]:
    """A check image: img_size where the module has one, else two patches a side."""
    size = getattr(module, "img_size", None)
    if size is None:
        k, s = conv.kernel_size, conv.stride
        size = (k[0] + s[0], k[1] + s[1])
    size = (size, size) if isinstance(size, int) else tuple(size)
    return (2, conv.in_channels, int(size[0]), int(size[1]))


def _conv_plan(module: nn.Module, known: frozenset[str], spec: ConvPatchSpec) -> Plan | str:
    conv = module._modules.get(spec.conv)
    why = _conv_problem(conv, spec.conv)
    if why is not None:
        return why
    image = _image(module, conv)
    return plan_for(module, known, FusedConvPatchEmbed, spec, lambda m: (random_input(image, m),))


_TIMM_PATCH_EMBED = frozenset({"timm.layers.patch_embed.PatchEmbed"})


def _build_timm(module: nn.Module) -> Plan | str:
    if not getattr(module, "flatten", False) or str(getattr(module, "output_fmt", "NCHW")) not in (
        "NCHW", "Format.NCHW",
    ):  # fmt: skip
        return "PatchEmbed keeps the image layout (flatten=False or output_fmt): not tokens"
    if getattr(module, "dynamic_img_pad", False):
        return "PatchEmbed pads images on the right and bottom only (dynamic_img_pad)"
    proj, norm = getattr(module, "proj", None), getattr(module, "norm", None)
    if not (type(norm) is nn.Identity or is_layer_norm(norm)):
        return f"norm is {type(norm).__name__}, not LayerNorm or Identity"
    if is_layer_norm(norm) and tuple(norm.normalized_shape) != (getattr(proj, "out_channels", 0),):
        return f"norm is a LayerNorm over {tuple(norm.normalized_shape)}, not the conv's channels"
    check = "strict" if getattr(module, "strict_img_size", True) else "divisible"
    return _conv_plan(module, _TIMM_PATCH_EMBED, ConvPatchSpec("proj", True, True, check))


register_rule(
    Rule(
        name="timm PatchEmbed",
        op=_OP,
        matches=subclass_of(*_TIMM_PATCH_EMBED),
        build=_build_timm,
    )
)

_TIMM_CROSSVIT = frozenset({"timm.models.crossvit.PatchEmbed"})


def _build_timm_crossvit(module: nn.Module) -> Plan | str:
    if type(getattr(module, "proj", None)) is nn.Sequential:
        return (
            "a multi_conv stem (three convolutions with ReLUs between them), not one "
            "patch embedding"
        )
    return _conv_plan(module, _TIMM_CROSSVIT, ConvPatchSpec("proj", True, False, "strict"))


register_rule(
    Rule(
        name="timm crossvit.PatchEmbed",
        op=_OP,
        matches=subclass_of(*_TIMM_CROSSVIT),
        build=_build_timm_crossvit,
    )
)

_TIMM_PIT = frozenset({"timm.models.pit.ConvEmbedding"})

register_rule(
    Rule(
        name="timm pit.ConvEmbedding",
        op=_OP,
        matches=subclass_of(*_TIMM_PIT),
        build=lambda m: _conv_plan(m, _TIMM_PIT, ConvPatchSpec("conv", False, False, "")),
    )
)
