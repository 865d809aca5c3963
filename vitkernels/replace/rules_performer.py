"""Rule for the "performer_attention" op: T2T-ViT's Token_performer.

Recognised by layout, so the official T2T-ViT module (``models/token_performer.py``,
copied under any module path), this repo's Token_performer and any module with
the same parts are taken: a ``single_attn`` method, a ``kqv`` Linear and a ``w``
parameter. The fused mixin (fused_performer.py) then needs ``emb``, ``kqv``
out_features == 3 * emb, ``w`` of shape (M, emb), ``proj`` taking emb features,
``dp`` and a non-negative ``epsilon``; a recognised module missing any of these
is reported as left, with what is missing.

This repo's Token_performer as written is replaced outright; any other class
(the official one, a subclass overriding ``prm_exp``, a user's module with the
layout) only when the optimize-time check shows that the fused ``single_attn``
gives the module's function. Separately, a fused T2T module may feed the block
``kqv(norm1(x))`` from its own soft-split call: only when the block's forward is
the official one (this repo's class as written, or checked the same way).
"""

from __future__ import annotations

import numbers

from torch import nn

from vitkernels.replace import Plan, Rule, register_rule
from vitkernels.replace._match import (
    known_class,
    overridden,
    plan_for,
    random_input,
    same_function,
)
from vitkernels.replace.fused_performer import FusedTokenPerformer, PerformerSpec

_KNOWN = frozenset({"vitkernels.models.t2t*.Token_performer"})  # however t2t is split


def _matches(module: nn.Module) -> bool:
    return (
        callable(getattr(type(module), "single_attn", None))
        and isinstance(module._modules.get("kqv"), nn.Linear)
        and module._parameters.get("w") is not None
    )


def _problems(module: nn.Module) -> list[str]:
    emb = getattr(module, "emb", None)
    if not isinstance(emb, int) or isinstance(emb, bool) or emb < 1:
        return [f"emb is {emb!r}, expected a positive int"]
    out = []
    kqv, proj, w = module._modules["kqv"], module._modules.get("proj"), module._parameters["w"]
    if kqv.out_features != 3 * emb:
        out.append(f"kqv has {kqv.out_features} outputs, expected 3 * emb = {3 * emb}")
    if w.ndim != 2 or w.shape[1] != emb:
        out.append(f"w has shape {tuple(w.shape)}, expected (M, emb={emb})")
    m = getattr(module, "m", None)
    if m is not None and w.ndim == 2 and m != w.shape[0]:
        out.append(f"m={m} but w has {w.shape[0]} rows")
    if not isinstance(proj, nn.Linear) or proj.in_features != emb:
        out.append(f"proj is {type(proj).__name__}, expected a Linear taking emb={emb} features")
    if not isinstance(module._modules.get("dp"), nn.Module):
        out.append("no dp (dropout) module")
    eps = getattr(module, "epsilon", None)
    if isinstance(eps, bool) or not isinstance(eps, numbers.Real) or not eps >= 0:
        out.append(f"epsilon is {eps!r}, expected a float >= 0")
    return out


def _tokens(m: nn.Module) -> tuple:
    return (random_input((2, 7, m.kqv.in_features), m),)


def _takes_kqv(module: nn.Module) -> bool:
    """Whether forward(x) is ``y + mlp(norm2(y))``, y = single_attn(norm1(x)), with a
    plain LayerNorm norm1 (a fused T2T module folds it into its soft split)."""
    if type(module._modules.get("norm1")) is not nn.LayerNorm or not all(
        isinstance(module._modules.get(name), nn.Module) for name in ("norm2", "mlp")
    ):
        return False
    base = known_class(module, _KNOWN)
    if base is not None and not overridden(module, base):
        return True
    why = same_function(
        module, FusedTokenPerformer, PerformerSpec(takes_kqv=True), _tokens,
        call=lambda m, args: m._vk_forward_from_kqv(m.kqv(m.norm1(args[0])))
        if hasattr(m, "_vk_forward_from_kqv") else m(*args),
    )  # fmt: skip
    return why is None


def _build(module: nn.Module) -> Plan | str:
    problems = _problems(module)
    if problems:
        return "not the official Token_performer layout: " + "; ".join(problems)
    return plan_for(module, _KNOWN, FusedTokenPerformer, PerformerSpec(_takes_kqv(module)), _tokens)


register_rule(
    Rule(
        name="T2T-ViT Token_performer (official layout)",
        op="performer_attention",
        matches=_matches,
        build=_build,
    )
)
