"""Rules for the "attention" op: plain multi-head attention to SDPA.

Recognised by class (the class or a subclass: neither vit-pytorch nor timm is
imported here) or, for the official T2T-ViT code that users copy under any
module path, by layout; then checked for the attributes the fused forward
reads. A known class as written is replaced outright; a subclass overriding its
methods, or a module recognised by layout, only when the optimize-time check
shows the fused forward computes its function (``_match.plan_for``).

Replaced (fused_attention.py):
  vit-pytorch vit.Attention, pit.Attention, simple_vit.Attention and this repo's
      vit.Attention (also inside pit, t2t, distill)
  vit-pytorch cross_vit.Attention and this repo's crossvit.Attention
  vit-pytorch cvt.Attention and this repo's cvt.Attention
  the official T2T-ViT backbone Attention (qkv, proj, attn_drop, proj_drop; this
      repo's copy is known, other copies are checked) and T2T-ViT-t's
      Token_transformer Attention (with in_dim and the v skip connection)
  timm crossvit.CrossAttention (writes softmax(q k^T) v out by hand)
  timm Attention and cait.ClassAttn, only when built with fused_attn off

Recognised and left, with the reason in the report:
  timm Attention / ClassAttn with fused_attn on: they already call SDPA

(DeepViT's re-attention and CaiT's talking heads mix heads around the softmax:
the "head_mixing_attention" op's rules take them, rules_head_mixing.py.)
"""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

from vitkernels.replace import FusedModule, Plan, Rule, register_rule
from vitkernels.replace._match import (
    NUM,
    Layout,
    input_width,
    missing,
    plan_for,
    random_input,
    subclass_of,
)
from vitkernels.replace.fused_attention import (
    QkvProjAttention,
    TimmCrossAttention,
    TimmFusedAttnToggle,
    TokenTransformerAttention,
    VitPytorchAttention,
    VitPytorchConvAttention,
    VitPytorchCrossAttention,
)

_ZOO = "vitkernels.models"
_OP = "attention"


def _tokens(proj: str) -> Callable[[nn.Module], tuple]:
    """Check inputs: (2, 5, width of the ``proj`` projection) tokens."""
    return lambda m: (random_input((2, 5, input_width(getattr(m, proj))), m),)


def _maps(proj: str) -> Callable[[nn.Module], tuple]:
    """Check inputs: (2, channels of ``proj``, 6, 6) feature maps."""
    return lambda m: (random_input((2, input_width(getattr(m, proj)), 6, 6), m),)


def _builder(
    known: frozenset[str],
    mixin: type[FusedModule],
    layout: Layout,
    inputs: Callable[[nn.Module], tuple],
    optional: Layout | None = None,
) -> Callable[[nn.Module], Plan | str]:
    def build(module: nn.Module) -> Plan | str:
        absent = missing(module, layout)
        absent += missing(module, {k: v for k, v in (optional or {}).items() if hasattr(module, k)})
        if absent:
            return "not the attention layout the fused module expects: " + ", ".join(absent)
        return plan_for(module, known, mixin, None, inputs)

    return build


def _rule(name: str, matches: Callable[[nn.Module], bool], build) -> None:
    register_rule(Rule(name=name, op=_OP, matches=matches, build=build))


def _known_rule(name: str, classes: frozenset[str], mixin, layout, inputs, optional=None) -> None:
    _rule(name, subclass_of(*classes), _builder(classes, mixin, layout, inputs, optional))


_known_rule(
    "vit-pytorch Attention (to_qkv)",
    frozenset({
        "vit_pytorch.vit.Attention",
        "vit_pytorch.pit.Attention",
        "vit_pytorch.simple_vit.Attention",
        f"{_ZOO}.vit.Attention",
    }),
    VitPytorchAttention,
    {"heads": int, "scale": NUM, "norm": nn.Module, "to_qkv": nn.Linear,
     "attend": nn.Softmax, "to_out": nn.Module},
    _tokens("to_qkv"),
    optional={"dropout": nn.Dropout},  # SimpleViT has none
)  # fmt: skip

_known_rule(
    "vit-pytorch cross_vit.Attention (to_q, to_kv)",
    frozenset({"vit_pytorch.cross_vit.Attention", f"{_ZOO}.crossvit.Attention"}),
    VitPytorchCrossAttention,
    {"heads": int, "scale": NUM, "norm": nn.Module, "to_q": nn.Linear, "to_kv": nn.Linear,
     "attend": nn.Softmax, "dropout": nn.Dropout, "to_out": nn.Module},
    _tokens("to_q"),
)  # fmt: skip

_known_rule(
    "vit-pytorch cvt.Attention (convolutional projections)",
    frozenset({"vit_pytorch.cvt.Attention", f"{_ZOO}.cvt.Attention"}),
    VitPytorchConvAttention,
    {"heads": int, "scale": NUM, "norm": nn.Module, "to_q": nn.Module, "to_kv": nn.Module,
     "attend": nn.Softmax, "dropout": nn.Dropout, "to_out": nn.Module},
    _maps("to_q"),
)  # fmt: skip

_known_rule(
    "timm crossvit.CrossAttention",
    frozenset({"timm.models.crossvit.CrossAttention"}),
    TimmCrossAttention,
    {"num_heads": int, "scale": NUM, "wq": nn.Linear, "wk": nn.Linear, "wv": nn.Linear,
     "attn_drop": nn.Dropout, "proj": nn.Module, "proj_drop": nn.Module},
    _tokens("wq"),
)  # fmt: skip


# ----------------------------------------------------------------------------
# timm's fused_attn switch

_TIMM_SWITCH = frozenset({
    "timm.layers.attention.Attention",
    "timm.models.vision_transformer.Attention",  # where older timm releases define it
    "timm.models.cait.ClassAttn",
})  # fmt: skip


def _build_timm_fused_attn(module: nn.Module) -> Plan | str:
    if not isinstance(getattr(module, "fused_attn", None), bool):
        return "timm attention without a fused_attn switch: layout not recognised"
    if module.fused_attn:
        return (
            "timm already runs it on F.scaled_dot_product_attention (fused_attn=True); "
            "a replacement would launch the same kernel"
        )
    return plan_for(
        module, _TIMM_SWITCH, TimmFusedAttnToggle, None,
        lambda m: (random_input((2, 5, input_width(m)), m),),
    )  # fmt: skip


_rule(
    "timm Attention / cait.ClassAttn (fused_attn switch)",
    subclass_of(*_TIMM_SWITCH),
    _build_timm_fused_attn,
)


# ----------------------------------------------------------------------------
# the official T2T-ViT code, by layout (this repo's copy of the backbone one is known)

_QKV_PROJ = {"num_heads": int, "scale": NUM, "qkv": nn.Linear, "attn_drop": nn.Dropout,
             "proj": nn.Module, "proj_drop": nn.Module}  # fmt: skip


def _qkv_proj_layout(m: nn.Module) -> bool:
    # not timm's TalkingHeadAttn, which adds the proj_l / proj_w head mixings to this
    # layout (rules_head_mixing.py takes it)
    return (
        all(isinstance(m._modules.get(k), nn.Module) for k in ("qkv", "proj", "attn_drop"))
        and isinstance(getattr(m, "num_heads", None), int)
        and "proj_l" not in m._modules
    )


_rule(
    "official T2T-ViT-t Token_transformer Attention (qkv, proj, in_dim; v skip connection)",
    lambda m: _qkv_proj_layout(m) and isinstance(getattr(m, "in_dim", None), int),
    _builder(frozenset(), TokenTransformerAttention, {**_QKV_PROJ, "in_dim": int}, _tokens("qkv")),
)

_rule(
    "official T2T-ViT Attention (qkv, proj)",
    lambda m: _qkv_proj_layout(m) and not hasattr(m, "fused_attn"),
    _builder(frozenset({f"{_ZOO}.t2t*.Attention"}), QkvProjAttention, _QKV_PROJ, _tokens("qkv")),
)
