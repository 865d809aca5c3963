"""Rules for the "head_mixing_attention" op: CaiT's talking heads and DeepViT's
re-attention.

Recognised by class (the class or a subclass: neither vit-pytorch nor timm is
imported here), then checked for the attributes the fused forward reads. A known
class as written is replaced outright; a subclass overriding its methods only when
the optimize-time check shows the fused forward computes its function
(``_match.plan_for``).

Replaced (fused_head_mixing.py):
  vit-pytorch cait.Attention and this repo's cait.Attention (talking heads)
  vit-pytorch deepvit.Attention and this repo's deepvit.Attention (re-attention)
  timm cait.TalkingHeadAttn (talking heads with nn.Linear mixings)
(timm's cait.ClassAttn is plain attention: the "attention" op's rules take it.)
"""

from __future__ import annotations

from collections.abc import Callable

import torch
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
from vitkernels.replace.fused_head_mixing import (
    FusedCaiTAttention,
    FusedDeepViTAttention,
    FusedTalkingHeadAttn,
)

_ZOO = "vitkernels.models"
_OP = "head_mixing_attention"


def _square(module: nn.Module, name: str, heads: int) -> list[str]:
    w = getattr(module, name)
    if tuple(w.shape) != (heads, heads):
        return [f"{name} has shape {tuple(w.shape)}, expected (heads, heads) = ({heads}, {heads})"]
    return []


def _cait_problems(m: nn.Module) -> list[str]:
    return _square(m, "mix_heads_pre_attn", m.heads) + _square(m, "mix_heads_post_attn", m.heads)


def _deepvit_problems(m: nn.Module) -> list[str]:
    out = _square(m, "reattn_weights", m.heads)
    norm = m.reattn_norm
    ln = norm[1] if len(norm) == 3 else None
    if not isinstance(ln, nn.LayerNorm) or tuple(ln.normalized_shape) != (m.heads,):
        out.append(
            f"reattn_norm is {norm!r:.80}, expected (Rearrange, LayerNorm({m.heads}), Rearrange): "
            "a LayerNorm over the heads"
        )
    return out


def _timm_problems(m: nn.Module) -> list[str]:
    h = m.num_heads
    out = []
    for name in ("proj_l", "proj_w"):
        lin = getattr(m, name)
        if (lin.in_features, lin.out_features) != (h, h):
            out.append(f"{name} is Linear({lin.in_features}, {lin.out_features}), expected Linear({h}, {h})")
    width = m.qkv.in_features
    if m.qkv.out_features != 3 * width or width % h:
        out.append(f"qkv is Linear({width}, {m.qkv.out_features}), expected Linear(C, 3 C) with C a "
                   f"multiple of num_heads={h}")  # fmt: skip
    return out


def _tokens(proj: str) -> Callable[[nn.Module], tuple]:
    """Check inputs: (2, 5, width of the ``proj`` projection) tokens."""
    return lambda m: (random_input((2, 5, input_width(getattr(m, proj))), m),)


def _builder(
    known: frozenset[str],
    mixin: type[FusedModule],
    layout: Layout,
    problems: Callable[[nn.Module], list[str]],
    inputs: Callable[[nn.Module], tuple],
) -> Callable[[nn.Module], Plan | str]:
    def build(module: nn.Module) -> Plan | str:
        absent = missing(module, layout)
        if absent:
            return "not the attention layout the fused module expects: " + ", ".join(absent)
        wrong = problems(module)
        if wrong:
            return "not the attention layout the fused module expects: " + "; ".join(wrong)
        return plan_for(module, known, mixin, None, inputs)

    return build


def _known_rule(name: str, classes: frozenset[str], mixin, layout, problems, inputs) -> None:
    register_rule(Rule(name=name, op=_OP, matches=subclass_of(*classes),
                       build=_builder(classes, mixin, layout, problems, inputs)))  # fmt: skip


_known_rule(
    "vit-pytorch cait.Attention (talking heads)",
    frozenset({"vit_pytorch.cait.Attention", f"{_ZOO}.cait.Attention"}),
    FusedCaiTAttention,
    {"heads": int, "scale": NUM, "norm": nn.Module, "to_q": nn.Linear, "to_kv": nn.Linear,
     "dropout": nn.Dropout, "mix_heads_pre_attn": torch.Tensor, "mix_heads_post_attn": torch.Tensor,
     "to_out": nn.Module},
    _cait_problems,
    _tokens("to_q"),
)  # fmt: skip

_known_rule(
    "vit-pytorch deepvit.Attention (re-attention)",
    frozenset({"vit_pytorch.deepvit.Attention", f"{_ZOO}.deepvit.Attention"}),
    FusedDeepViTAttention,
    {"heads": int, "scale": NUM, "norm": nn.Module, "to_qkv": nn.Linear, "dropout": nn.Dropout,
     "reattn_weights": torch.Tensor, "reattn_norm": nn.Sequential, "to_out": nn.Module},
    _deepvit_problems,
    _tokens("to_qkv"),
)  # fmt: skip

_known_rule(
    "timm cait.TalkingHeadAttn",
    frozenset({"timm.models.cait.TalkingHeadAttn"}),
    FusedTalkingHeadAttn,
    {"num_heads": int, "scale": NUM, "qkv": nn.Linear, "attn_drop": nn.Dropout, "proj": nn.Module,
     "proj_drop": nn.Module, "proj_l": nn.Linear, "proj_w": nn.Linear},
    _timm_problems,
    _tokens("qkv"),
)  # fmt: skip
