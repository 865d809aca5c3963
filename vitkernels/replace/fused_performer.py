"""Fused module for T2T-ViT's Token_performer (official layout): the Performer
single attention as one ``vitkernels.performer_attention`` call.

The original ``single_attn`` projects x to kqv, splits it into k, q, v, builds the
random features phi(k), phi(q) as (B, T, M) float32 tensors and contracts them with
four einsums. The fused one passes the three strided views of the kqv output
straight to the op (no copies; the kernels read them in place and never store
phi) and keeps the rest as the original writes it: ``v + dp(proj(y))``, with the
original's dropout module, so train/eval behave the same.

``forward`` is the original class's own forward, run on this module, so whatever
surrounds ``single_attn`` (norm1, mlp, norm2, drop paths) is kept unchanged.
"""

from __future__ import annotations

import torch
from torch import nn

from vitkernels.ops.performer import performer_attention
from vitkernels.replace import FusedModule

__all__ = ["FusedTokenPerformer"]


class FusedTokenPerformer(FusedModule):
    """Token_performer whose ``single_attn`` runs ``performer_attention``.

    Args:
        original: a module in the official Token_performer layout: ``kqv``
            (Linear to 3 * emb, split k, q, v), ``w`` (M, emb) random features,
            ``epsilon``, ``proj``, ``dp`` and a forward that calls ``single_attn``.
        backend: force the op's backend; None dispatches on every call.
    """

    op = "performer_attention"

    def __init__(self, original: nn.Module, backend: str | None = None) -> None:
        super().__init__(original, backend)
        self.__dict__["_vk_forward"] = type(original).forward

    def single_attn(self, x: torch.Tensor) -> torch.Tensor:
        """(B, T, dim) normalised tokens -> v + dp(proj(performer(q, k, v))): (B, T, emb)."""
        k, q, v = torch.split(self.kqv(x), self.emb, dim=-1)  # (B, T, emb) strided views
        y = performer_attention(q, k, v, self.w, eps=self.epsilon, backend=self.backend)
        return v + self.dp(self.proj(y.to(v.dtype)))  # v is the skip connection

    def forward(self, *args, **kwargs):
        return self.__dict__["_vk_forward"](self, *args, **kwargs)
