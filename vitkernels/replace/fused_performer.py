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
        # the official Token_performer's forward is ``y = single_attn(norm1(x));
        # y + mlp(norm2(y))``: a fused T2T module may then hand it kqv(norm1(x))
        # computed in its own patch_embed call (forward_from_kqv)
        self.__dict__["_vk_takes_kqv"] = type(original).__name__ == "Token_performer" and all(
            isinstance(self._modules.get(name), nn.Module) for name in ("norm1", "norm2", "mlp")
        )

    @property
    def takes_kqv(self) -> bool:
        """Whether ``forward_from_kqv`` applies (the official Token_performer layout)."""
        return self.__dict__["_vk_takes_kqv"]

    def attend_kqv(self, kqv: torch.Tensor) -> torch.Tensor:
        """(B, T, 3 * emb) projected tokens (k, q, v) -> v + dp(proj(performer(q, k, v)))."""
        k, q, v = torch.split(kqv, self.emb, dim=-1)  # (B, T, emb) strided views
        y = performer_attention(q, k, v, self.w, eps=self.epsilon, backend=self.backend)
        return v + self.dp(self.proj(y.to(v.dtype)))  # v is the skip connection

    def single_attn(self, x: torch.Tensor) -> torch.Tensor:
        """(B, T, dim) normalised tokens -> v + dp(proj(performer(q, k, v))): (B, T, emb)."""
        return self.attend_kqv(self.kqv(x))

    def forward_from_kqv(self, kqv: torch.Tensor) -> torch.Tensor:
        """The official forward given ``kqv = self.kqv(self.norm1(x))``."""
        if not self.takes_kqv:
            raise TypeError(
                f"FusedTokenPerformer: forward_from_kqv needs the official Token_performer "
                f"forward; this one replaces {type(self.original).__name__}"
            )
        y = self.attend_kqv(kqv)
        return y + self.mlp(self.norm2(y))

    def forward(self, *args, **kwargs):
        return self.__dict__["_vk_forward"](self, *args, **kwargs)
