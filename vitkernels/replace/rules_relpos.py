"""Rules for the "relpos_attention" op: LeViT attention with a relative-position bias.

Recognised, then checked for the attributes the fused forward reads and for a
bias index that is the op's formula, |dr| * C + |dc| between the query's grid
position (subsampled by the query stride) and the key's; the grid passed to the
op is the module's own (the op cannot tell a 4x4 grid from a 2x8 one). Classes
known as written (and subclasses that override none of their methods) are
replaced outright; anything else only when the optimize-time check shows the
fused forward computes its function (``_match.plan_for``).

Replaced (fused_relpos.py):
  vit-pytorch levit.Attention and this repo's models.levit.Attention
      (pos_bias nn.Embedding, pos_indices buffer; downsample = stride-2 to_q)
  timm levit.Attention and levit.AttentionDownsample
      (attention_biases, attention_bias_idxs; use_conv either way)
  the official facebookresearch/LeViT Attention and AttentionSubsample, of
      levit.py (tokens) and levit_c.py (maps), under any module path: recognised
      by layout (attention_biases, attention_bias_idxs, key_dim, d, dh; the
      self-attention's square grid from its index), always checked at optimize time
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from vitkernels.backends.reference import relpos_bias_index
from vitkernels.replace import Plan, Rule, register_rule
from vitkernels.replace._match import (
    NUM,
    input_width,
    missing,
    plan_for,
    random_input,
    subclass_of,
)
from vitkernels.replace.fused_relpos import FusedAttentionBiases, FusedLeViTAttention, RelposSpec

_OP = "relpos_attention"


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


def _first_layer(m: nn.Module) -> nn.Linear | nn.Conv2d | None:
    """The first Linear or Conv2d in a projection (Linear_BN, ConvNorm, ...)."""
    return next((s for s in m.modules() if isinstance(s, (nn.Linear, nn.Conv2d))), None)


# ----------------------------------------------------------------------------
# vit-pytorch levit.Attention and this repo's

_LEVIT = frozenset({"vit_pytorch.levit.Attention", "vitkernels.models.levit.Attention"})

_LEVIT_LAYOUT = {
    "heads": int,
    "scale": NUM,
    "to_q": nn.Sequential,
    "to_k": nn.Module,
    "to_v": nn.Module,
    "attend": nn.Softmax,
    "dropout": nn.Dropout,
    "to_out": nn.Module,
    "pos_bias": nn.Embedding,
    "pos_indices": torch.Tensor,
}


def _build_levit(module: nn.Module) -> Plan | str:
    absent = missing(module, _LEVIT_LAYOUT)
    if absent:
        return "not the LeViT attention layout the fused module expects: " + ", ".join(absent)
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
    spec = RelposSpec(grid=fmap, q_stride=q_stride)
    return plan_for(
        module, _LEVIT, FusedLeViTAttention, spec,
        lambda m: (random_input((2, conv.in_channels, side, side), m),),
    )  # fmt: skip


register_rule(
    Rule(
        name="vit-pytorch levit.Attention",
        op=_OP,
        matches=subclass_of(*_LEVIT),
        build=_build_levit,
    )
)


# ----------------------------------------------------------------------------
# attention_biases (official LeViT convention): timm and facebookresearch/LeViT


def _biases_plan(
    module: nn.Module, known: frozenset[str], spec: RelposSpec, proj_in: nn.Module
) -> Plan | str:
    """Check the table and index for ``spec``, then plan (known class) or check."""
    R, C = spec.grid
    biases = module.attention_biases
    if tuple(biases.shape) != (spec.heads, R * C):
        return (
            f"attention_biases has shape {tuple(biases.shape)}; expected "
            f"({spec.heads}, {R * C}) for resolution ({R}, {C})"
        )
    why = _index_mismatch("attention_bias_idxs", module.attention_bias_idxs, spec.grid, spec.q_stride)
    if why is not None:
        return why
    layer = _first_layer(proj_in)
    if layer is None:
        return f"{'kv' if spec.down else 'qkv'} has no Linear or Conv2d to tell its input width"
    if isinstance(layer, nn.Conv2d) != spec.conv:
        return f"{'kv' if spec.down else 'qkv'} starts with {type(layer).__name__}, not the layout's"
    width = input_width(layer)
    shape = (2, width, R, C) if spec.conv else (2, R * C, width)
    return plan_for(
        module, known, FusedAttentionBiases, spec, lambda m: (random_input(shape, m),)
    )


_TIMM = frozenset({"timm.models.levit.Attention"})
_TIMM_DOWN = frozenset(
    {"timm.models.levit.AttentionDownsample", "timm.models.levit.AttentionSubsample"}
)

_TIMM_LAYOUT = {
    "num_heads": int,
    "key_dim": int,
    "val_dim": int,
    "val_attn_dim": int,
    "scale": NUM,
    "use_conv": bool,
    "resolution": tuple,
    "proj": nn.Module,
    "attention_biases": nn.Parameter,
    "attention_bias_idxs": torch.Tensor,
}


def _timm_builder(known: frozenset[str], down: bool) -> Any:
    layout = {**_TIMM_LAYOUT, **({"kv": nn.Module, "q": nn.Module, "stride": int} if down else {"qkv": nn.Module})}

    def build(module: nn.Module) -> Plan | str:
        absent = missing(module, layout)
        if absent:
            return "not the timm LeViT attention layout the fused module expects: " + ", ".join(absent)
        spec = RelposSpec(
            grid=tuple(int(s) for s in module.resolution),
            q_stride=int(module.stride) if down else 1,
            heads=module.num_heads, key_dim=module.key_dim, val_dim=module.val_dim,
            conv=module.use_conv, down=down,
        )  # fmt: skip
        return _biases_plan(module, known, spec, module.kv if down else module.qkv)

    return build


register_rule(
    Rule(
        name="timm levit.Attention",
        op=_OP,
        matches=subclass_of(*_TIMM),
        build=_timm_builder(_TIMM, down=False),
    )
)

register_rule(
    Rule(
        name="timm levit.AttentionDownsample",
        op=_OP,
        matches=subclass_of(*_TIMM_DOWN),
        build=_timm_builder(_TIMM_DOWN, down=True),
    )
)


_OFFICIAL_LAYOUT = {
    "num_heads": int,
    "key_dim": int,
    "d": int,
    "dh": int,
    "scale": NUM,
    "proj": nn.Module,
    "attention_biases": nn.Parameter,
    "attention_bias_idxs": torch.Tensor,
}


def _is_official(m: nn.Module) -> bool:
    return (
        isinstance(m._parameters.get("attention_biases"), torch.Tensor)
        and isinstance(m._buffers.get("attention_bias_idxs"), torch.Tensor)
        and all(isinstance(getattr(m, a, None), int) for a in ("d", "dh", "key_dim"))
    )


def _build_official(module: nn.Module) -> Plan | str:
    down = isinstance(module._modules.get("kv"), nn.Module)
    layout = {**_OFFICIAL_LAYOUT, **({"kv": nn.Module, "q": nn.Module, "stride": int,
                                      "resolution": int, "resolution_": int}
                                     if down else {"qkv": nn.Module})}  # fmt: skip
    absent = missing(module, layout)
    if absent:
        return "not the official LeViT attention layout the fused module expects: " + ", ".join(
            absent
        )
    if down:
        R, s = module.resolution, module.stride
    else:  # the official Attention keeps no resolution: its (N, N) index tells the grid
        n = module.attention_bias_idxs.shape[-1]
        R, s = math.isqrt(n), 1
        if R * R != n:
            return f"attention_bias_idxs has {n} keys; expected a square grid's side**2"
    if down and module.resolution_ != (R - 1) // s + 1:
        return (
            f"resolution_={module.resolution_}; expected (resolution - 1) // stride + 1 = "
            f"{(R - 1) // s + 1}, the queries the subsampling keeps"
        )
    if module.dh != module.d * module.num_heads:
        return f"dh={module.dh}; expected d * num_heads = {module.d * module.num_heads}"
    first = _first_layer(module.kv if down else module.qkv)
    spec = RelposSpec(
        grid=(R, R), q_stride=s, heads=module.num_heads, key_dim=module.key_dim,
        val_dim=module.d, conv=isinstance(first, nn.Conv2d), down=down,
    )  # fmt: skip
    return _biases_plan(module, frozenset(), spec, module.kv if down else module.qkv)


register_rule(
    Rule(
        name="official LeViT Attention / AttentionSubsample (attention_biases, d, dh)",
        op=_OP,
        matches=_is_official,
        build=_build_official,
    )
)
