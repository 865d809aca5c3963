"""Rule for the "performer_attention" op: T2T-ViT's Token_performer.

Recognised by layout, not by class, so the official T2T-ViT module
(``models/token_performer.py``), this repo's ``vitkernels.models.t2t.Token_performer``
and any module with the same parts are taken: a ``single_attn`` method, a
``kqv`` Linear and a ``w`` parameter. The fused module (fused_performer.py) then
needs ``emb``, ``kqv`` out_features == 3 * emb, ``w`` of shape (M, emb), ``proj``
taking emb features, ``dp`` and a non-negative ``epsilon``; a recognised module
missing any of these is reported as left, with what is missing.
"""

from __future__ import annotations

import numbers

from torch import nn

from vitkernels.replace import Rule, register_rule
from vitkernels.replace.fused_performer import FusedTokenPerformer


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


def _build(module: nn.Module, backend: str | None) -> nn.Module | str:
    problems = _problems(module)
    if problems:
        return "not the official Token_performer layout: " + "; ".join(problems)
    return FusedTokenPerformer(module, backend)


register_rule(
    Rule(
        name="T2T-ViT Token_performer (official layout)",
        op="performer_attention",
        matches=_matches,
        build=_build,
    )
)
