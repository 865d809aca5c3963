"""Rule for the official T2T-ViT tokens-to-token module (op "patch_embed"; the
fused mixin is in fused_t2t.py).

Recognised by class name and layout (``T2T_module`` with ``soft_split0/1/2``
nn.Unfold, blocks ``attention1/2`` and a Linear ``project``), so the official
code under any module path and this repo's copy are both taken: this repo's
class as written outright, any other only when the optimize-time check shows the
fused soft splits give its function. Its blocks (Token_performer or T2T-ViT-t's
Token_transformer) are visited by their own rules afterwards. The official
``tokens_type="convolution"`` variant (Conv2d soft splits) is left with one
sentence.
"""

from __future__ import annotations

from torch import nn

from vitkernels.replace import Plan, Rule, register_rule
from vitkernels.replace._match import input_width, plan_for, random_input
from vitkernels.replace.fused_patch_embed import unfold_geometry
from vitkernels.replace.fused_t2t import FusedT2TModule

_KNOWN = frozenset({"vitkernels.models.t2t*.T2T_module"})  # however t2t is split
# the smallest square image all three soft splits (strides 4, 2, 2) take
_CHECK_SIDE = 32


def _build(module: nn.Module) -> Plan | str:
    mods = module._modules
    if type(mods.get("soft_split0")) is nn.Conv2d and "soft_split2" not in mods:
        return (
            "built with tokens_type='convolution' (Conv2d soft splits, no soft_split2): "
            "the official forward only runs the unfold-based variants"
        )
    problems = []
    for name in ("soft_split0", "soft_split1", "soft_split2"):
        m = mods.get(name)
        why = unfold_geometry(m) if type(m) is nn.Unfold else f"{type(m).__name__}, not nn.Unfold"
        if isinstance(why, str):
            problems.append(f"{name}: {why}")
    for name in ("attention1", "attention2"):
        if not isinstance(mods.get(name), nn.Module):
            problems.append(f"no {name} module")
    if type(mods.get("project")) is not nn.Linear:
        problems.append(f"project is {type(mods.get('project')).__name__}, not nn.Linear")
    if problems:
        return "not the official T2T_module layout: " + "; ".join(problems)
    k = unfold_geometry(mods["soft_split0"])[0]
    width = input_width(mods["attention1"])  # the first block's token width: C * k * k
    if not width or width % (k[0] * k[1]):
        return f"attention1 takes {width} features, not channels * {k[0]} * {k[1]}"
    image = (2, width // (k[0] * k[1]), _CHECK_SIDE, _CHECK_SIDE)
    return plan_for(module, _KNOWN, FusedT2TModule, None, lambda m: (random_input(image, m),))


register_rule(
    Rule(
        name="T2T-ViT T2T_module (official layout)",
        op="patch_embed",
        matches=lambda m: any(k.__name__ == "T2T_module" for k in type(m).__mro__),
        build=_build,
    )
)
