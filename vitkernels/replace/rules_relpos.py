"""Rules for the "relpos_attention" op: LeViT attention with a relative-position bias.

Recognised by exact class (module path and name: neither vit-pytorch nor timm is
imported here, and a user's subclass with its own forward is never taken for its
parent), then checked for the attributes the fused forward reads and for a bias
index that is the op's formula, |dr| * C + |dc| between the query's grid
position (subsampled by the query stride) and the key's. A module that fails a
check is left as it is, with the reason in the report.

Replaced (fused_relpos.py):
  vit-pytorch levit.Attention and this repo's models.levit.Attention
      (pos_bias nn.Embedding, pos_indices buffer; downsample = stride-2 to_q)
  timm levit.Attention and levit.AttentionDownsample
      (attention_biases, attention_bias_idxs; use_conv either way)
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import nn

from vitkernels.backends.reference import relpos_bias_index
from vitkernels.replace import Rule, register_rule
from vitkernels.replace.fused_relpos import (
    LeViTAttention,
    TimmLevitAttention,
    TimmLevitAttentionDownsample,
)

_OP = "relpos_attention"
_NUM = (int, float)


def _is(*qualified: str) -> Callable[[nn.Module], bool]:
    """Matcher for modules whose exact class is one of "module.path.ClassName"."""
    names = frozenset(qualified)
    return lambda m: f"{type(m).__module__}.{type(m).__qualname__}" in names


def _missing(module: nn.Module, layout: dict[str, type | tuple[type, ...]]) -> list[str]:
    out = []
    for name, kind in layout.items():
        value = getattr(module, name, None)
        if not isinstance(value, kind):
            got = "missing" if value is None else type(value).__name__
            want = kind.__name__ if isinstance(kind, type) else " or ".join(k.__name__ for k in kind)
            out.append(f"{name} ({got}, expected {want})")
    return out


def _index_mismatch(
    name: str, idx: torch.Tensor, fmap_size: tuple[int, int], q_stride: int
) -> str | None:
    """Why the module's bias index is not the op's formula, or None when it is."""
    if idx.device.type == "meta":
        return f"{name} is on the meta device, so it cannot be checked against |dr|*C + |dc|"
    want = relpos_bias_index(fmap_size, q_stride, device=idx.device)
    if tuple(idx.shape) != tuple(want.shape):
        return (
            f"{name} has shape {tuple(idx.shape)}; expected {tuple(want.shape)} for grid "
            f"{fmap_size} and query stride {q_stride}"
        )
    if not torch.equal(idx.to(want.dtype), want):
        return (
            f"{name} does not encode |dr|*C + |dc| for grid {fmap_size} and query stride "
            f"{q_stride} (a different relative-position convention)"
        )
    return None


# ----------------------------------------------------------------------------
# vit-pytorch levit.Attention and this repo's


_LEVIT_LAYOUT = {
    "heads": int,
    "scale": _NUM,
    "to_q": nn.Sequential,
    "to_k": nn.Module,
    "to_v": nn.Module,
    "attend": nn.Softmax,
    "dropout": nn.Dropout,
    "to_out": nn.Module,
    "pos_bias": nn.Embedding,
    "pos_indices": torch.Tensor,
}


def _build_levit(module: nn.Module, backend: str | None) -> nn.Module | str:
    missing = _missing(module, _LEVIT_LAYOUT)
    if missing:
        return "not the LeViT attention layout the fused module expects: " + ", ".join(missing)
    conv = module.to_q[0] if len(module.to_q) else None
    if not isinstance(conv, nn.Conv2d) or conv.kernel_size != (1, 1):
        return "to_q does not start with a 1x1 Conv2d"
    if conv.stride[0] != conv.stride[1]:
        return f"to_q's stride {conv.stride} is not the same along both axes"
    n, heads = module.pos_bias.num_embeddings, module.pos_bias.embedding_dim
    side = math.isqrt(n)
    if side * side != n:
        return f"pos_bias has {n} entries; expected a square grid's side**2"
    if heads != module.heads:
        return f"pos_bias has {heads} columns; expected one per head ({module.heads})"
    fmap, q_stride = (side, side), int(conv.stride[0])
    why = _index_mismatch("pos_indices", module.pos_indices, fmap, q_stride)
    if why is not None:
        return why
    return LeViTAttention(module, backend, fmap_size=fmap, q_stride=q_stride)


register_rule(
    Rule(
        name="vit-pytorch levit.Attention",
        op=_OP,
        matches=_is("vit_pytorch.levit.Attention", "vitkernels.models.levit.Attention"),
        build=_build_levit,
    )
)


# ----------------------------------------------------------------------------
# timm levit.Attention and levit.AttentionDownsample


_TIMM_COMMON = {
    "num_heads": int,
    "key_dim": int,
    "val_dim": int,
    "val_attn_dim": int,
    "scale": _NUM,
    "use_conv": bool,
    "resolution": tuple,
    "proj": nn.Module,
    "attention_biases": nn.Parameter,
    "attention_bias_idxs": torch.Tensor,
}


def _timm_builder(fused: type[nn.Module], layout: dict, stride_attr: str | None):
    def build(module: nn.Module, backend: str | None) -> nn.Module | str:
        missing = _missing(module, {**_TIMM_COMMON, **layout})
        if missing:
            return "not the timm LeViT attention layout the fused module expects: " + ", ".join(
                missing
            )
        R, C = (int(s) for s in module.resolution)
        q_stride = int(getattr(module, stride_attr)) if stride_attr else 1
        heads = module.num_heads
        if tuple(module.attention_biases.shape) != (heads, R * C):
            return (
                f"attention_biases has shape {tuple(module.attention_biases.shape)}; "
                f"expected ({heads}, {R * C}) for resolution ({R}, {C})"
            )
        why = _index_mismatch("attention_bias_idxs", module.attention_bias_idxs, (R, C), q_stride)
        if why is not None:
            return why
        return fused(module, backend)

    return build


register_rule(
    Rule(
        name="timm levit.Attention",
        op=_OP,
        matches=_is("timm.models.levit.Attention"),
        build=_timm_builder(TimmLevitAttention, {"qkv": nn.Module}, None),
    )
)

register_rule(
    Rule(
        name="timm levit.AttentionDownsample",
        op=_OP,
        matches=_is("timm.models.levit.AttentionDownsample", "timm.models.levit.AttentionSubsample"),
        build=_timm_builder(
            TimmLevitAttentionDownsample, {"kv": nn.Module, "q": nn.Module, "stride": int}, "stride"
        ),
    )
)
