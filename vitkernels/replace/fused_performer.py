"""Fused mixin for T2T-ViT's Token_performer (official layout): the Performer
single attention as one ``vitkernels.performer_attention`` call.

The original ``single_attn`` projects x to kqv, splits it into k, q, v, builds the
random features phi(k), phi(q) as (B, T, M) float32 tensors and contracts them with
four einsums. The fused one passes the three strided views of the kqv output
straight to the op (no copies; the kernels read them in place and never store
phi) and keeps the rest as the original writes it: ``v + dp(proj(y))``, with the
original's dropout module, so train/eval behave the same.

Only ``single_attn`` is replaced: the module's own ``forward`` (whatever
surrounds ``single_attn``: norm1, mlp, norm2, drop paths) runs as it is. Where
the rule has established that the forward is the official one
(``PerformerSpec.takes_kqv``), a fused T2T module may hand the block
``kqv(norm1(x))`` computed in its own patch_embed call (``_vk_forward_from_kqv``).
"""

from __future__ import annotations

import dataclasses

import torch
import torch.fx

from vitkernels.ops.performer import performer_attention
from vitkernels.replace import FusedModule

__all__ = ["FusedTokenPerformer", "PerformerSpec"]

torch.fx.wrap("performer_attention")  # one node under torch.fx.symbolic_trace


@dataclasses.dataclass(frozen=True)
class PerformerSpec:
    # forward(x) == y + mlp(norm2(y)) with y = single_attn(norm1(x)), norm1 a
    # LayerNorm and kqv a Linear: a T2T module may fuse norm1 and kqv into its soft split
    takes_kqv: bool


class FusedTokenPerformer(FusedModule):
    """Token_performer whose ``single_attn`` runs ``performer_attention``."""

    _vk_op = "performer_attention"

    def single_attn(self, x: torch.Tensor) -> torch.Tensor:
        """(B, T, dim) normalised tokens -> v + dp(proj(performer(q, k, v))): (B, T, emb)."""
        if torch.jit.is_scripting():
            return self._vk_base_single_attn(x)
        return self._vk_attend_kqv(self.kqv(x))

    @torch.jit.unused
    def _vk_attend_kqv(self, kqv: torch.Tensor) -> torch.Tensor:
        """(B, T, 3 * emb) projected tokens (k, q, v) -> v + dp(proj(performer(q, k, v)))."""
        k, q, v = torch.split(kqv, self.emb, dim=-1)  # (B, T, emb) strided views
        y = performer_attention(q, k, v, self.w, eps=self.epsilon, backend=self._vk.backend)
        return v + self.dp(self.proj(y.to(v.dtype)))  # v is the skip connection

    def _vk_forward_from_kqv(self, kqv: torch.Tensor) -> torch.Tensor:
        """The official forward given ``kqv = self.kqv(self.norm1(x))`` (only where
        ``PerformerSpec.takes_kqv``)."""
        y = self._vk_attend_kqv(kqv)
        return y + self.mlp(self.norm2(y))
