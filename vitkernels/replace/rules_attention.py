"""Rules for the "attention" op: plain multi-head attention to SDPA.

Recognised by exact class (module path and name, so neither vit-pytorch nor timm
is imported here, and a user's subclass with its own forward is never taken for
its parent), then checked for the attributes the fused forward reads; a module
that does not have them is reported as left with what is missing.

Replaced (fused_attention.py):
  vit-pytorch vit.Attention and this repo's (also inside pit, t2t, distill)
  vit-pytorch pit.Attention (a copy of vit's)
  vit-pytorch cross_vit.Attention and this repo's crossvit.Attention
  vit-pytorch cvt.Attention and this repo's cvt.Attention
  the official T2T-ViT Attention in this repo's t2t_vit.py (qkv, proj)
  timm crossvit.CrossAttention (writes softmax(q k^T) v out by hand)
  timm Attention and cait.ClassAttn, only when built with fused_attn off

Recognised and left, with the reason in the report:
  timm Attention / ClassAttn with fused_attn on: they already call SDPA
  DeepViT re-attention and CaiT talking heads: they need the probability matrix
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from torch import nn

from vitkernels.replace import Rule, register_rule
from vitkernels.replace.fused_attention import (
    QkvProjAttention,
    TimmCrossAttention,
    TimmFusedAttnToggle,
    VitPytorchAttention,
    VitPytorchConvAttention,
    VitPytorchCrossAttention,
)

_ZOO = "vitkernels.models"


def _is(*qualified: str) -> Callable[[nn.Module], bool]:
    """Matcher for modules whose exact class is one of "module.path.ClassName"."""
    names = frozenset(qualified)
    return lambda m: f"{type(m).__module__}.{type(m).__qualname__}" in names


def _missing(module: nn.Module, layout: dict[str, type | tuple[type, ...]]) -> list[str]:
    """The attributes of ``layout`` the module lacks or holds with another type."""
    out = []
    for name, kind in layout.items():
        value = getattr(module, name, None)
        if not isinstance(value, kind):
            got = "missing" if value is None else type(value).__name__
            want = (
                kind.__name__ if isinstance(kind, type) else " or ".join(k.__name__ for k in kind)
            )
            out.append(f"{name} ({got}, expected {want})")
    return out


def _builder(
    fused: type[nn.Module], layout: dict[str, type | tuple[type, ...]]
) -> Callable[[nn.Module, str | None], nn.Module | str]:
    def build(module: nn.Module, backend: str | None) -> nn.Module | str:
        missing = _missing(module, layout)
        if missing:
            return "not the attention layout the fused module expects: " + ", ".join(missing)
        return fused(module, backend)

    return build


def _left(reason: str) -> Callable[[nn.Module, str | None], str]:
    return lambda module, backend: reason


def _rule(name: str, classes: Sequence[str], build) -> None:
    register_rule(Rule(name=name, op="attention", matches=_is(*classes), build=build))


_NUM = (int, float)

_rule(
    "vit-pytorch Attention (to_qkv)",
    [
        "vit_pytorch.vit.Attention",
        "vit_pytorch.pit.Attention",
        f"{_ZOO}.vit.Attention",
    ],
    _builder(
        VitPytorchAttention,
        {
            "heads": int,
            "scale": _NUM,
            "norm": nn.Module,
            "to_qkv": nn.Linear,
            "attend": nn.Softmax,
            "dropout": nn.Dropout,
            "to_out": nn.Module,
        },
    ),
)

_rule(
    "vit-pytorch cross_vit.Attention (to_q, to_kv)",
    ["vit_pytorch.cross_vit.Attention", f"{_ZOO}.crossvit.Attention"],
    _builder(
        VitPytorchCrossAttention,
        {
            "heads": int,
            "scale": _NUM,
            "norm": nn.Module,
            "to_q": nn.Linear,
            "to_kv": nn.Linear,
            "attend": nn.Softmax,
            "dropout": nn.Dropout,
            "to_out": nn.Module,
        },
    ),
)

_rule(
    "vit-pytorch cvt.Attention (convolutional projections)",
    ["vit_pytorch.cvt.Attention", f"{_ZOO}.cvt.Attention"],
    _builder(
        VitPytorchConvAttention,
        {
            "heads": int,
            "scale": _NUM,
            "norm": nn.Module,
            "to_q": nn.Module,
            "to_kv": nn.Module,
            "attend": nn.Softmax,
            "dropout": nn.Dropout,
            "to_out": nn.Module,
        },
    ),
)

_rule(
    "official T2T-ViT Attention (qkv, proj)",
    [f"{_ZOO}.t2t_vit.Attention"],
    _builder(
        QkvProjAttention,
        {
            "num_heads": int,
            "scale": _NUM,
            "qkv": nn.Linear,
            "attn_drop": nn.Dropout,
            "proj": nn.Module,
            "proj_drop": nn.Module,
        },
    ),
)

_rule(
    "timm crossvit.CrossAttention",
    ["timm.models.crossvit.CrossAttention"],
    _builder(
        TimmCrossAttention,
        {
            "num_heads": int,
            "scale": _NUM,
            "wq": nn.Linear,
            "wk": nn.Linear,
            "wv": nn.Linear,
            "attn_drop": nn.Dropout,
            "proj": nn.Module,
            "proj_drop": nn.Module,
        },
    ),
)


def _build_timm_fused_attn(module: nn.Module, backend: str | None) -> nn.Module | str:
    if not isinstance(getattr(module, "fused_attn", None), bool):
        return "timm attention without a fused_attn switch: layout not recognised"
    if module.fused_attn:
        return (
            "timm already runs it on F.scaled_dot_product_attention (fused_attn=True); "
            "a replacement would launch the same kernel"
        )
    return TimmFusedAttnToggle(module, backend)


_rule(
    "timm Attention / cait.ClassAttn (fused_attn switch)",
    [
        "timm.layers.attention.Attention",
        "timm.models.vision_transformer.Attention",  # where older timm releases define it
        "timm.models.cait.ClassAttn",
    ],
    _build_timm_fused_attn,
)

_rule(
    "DeepViT re-attention",
    ["vit_pytorch.deepvit.Attention", f"{_ZOO}.deepvit.Attention"],
    _left(
        "re-attention mixes the softmax probabilities across heads (reattn_weights, then a "
        "LayerNorm) before multiplying by v: it needs the probability matrix, which SDPA "
        "never forms"
    ),
)

_rule(
    "CaiT talking heads",
    ["vit_pytorch.cait.Attention", f"{_ZOO}.cait.Attention", "timm.models.cait.TalkingHeadAttn"],
    _left(
        "talking-heads attention mixes heads in the logits before the softmax and in the "
        "probabilities after it: it needs the probability matrix, which SDPA never forms"
    ),
)
