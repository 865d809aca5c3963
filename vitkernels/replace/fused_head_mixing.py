"""Fused mixins for attention that mixes heads around the softmax:
``vitkernels.head_mixing_attention`` in place of the eager logits, mixing einsums,
softmax (and head norm) on materialised (B, H, Nq, Nk) maps.

Each forward keeps the original's math around the attention (pre-norm, the
projections, head split and merge, the output projection) by calling the
original's submodules, and hands q, k, v to the op as strided views of the
projections' outputs (no copies) and the mixing parameters as they are (the
vit-pytorch ones transposed views: the op takes nn.Linear's weight[out, in]).
Attention dropout in training becomes the op's ``dropout_p`` at the original's
place (the same distribution; on the reference and torch backends the same draws
as the original's ``nn.Dropout`` from the same seed, which the Triton kernels
refuse: dispatch then runs the torch backend).

* ``FusedCaiTAttention``: vit-pytorch ``cait.Attention`` and this repo's
  ``models.cait.Attention`` (talking heads; ``forward(x, context)`` with keys and
  values over ``cat(norm(x), context)``; dropout on the probabilities).
* ``FusedDeepViTAttention``: vit-pytorch ``deepvit.Attention`` and this repo's
  ``models.deepvit.Attention`` (re-attention: reattn_weights, then a LayerNorm
  over the heads; dropout on the probabilities before the mixing).
* ``FusedTalkingHeadAttn``: timm ``cait.TalkingHeadAttn`` (one qkv projection,
  nn.Linear ``proj_l`` / ``proj_w`` mixing with biases; dropout after ``proj_w``).
"""

from __future__ import annotations

import torch
import torch.fx
from torch import nn

from vitkernels.ops.head_mixing import head_mixing_attention
from vitkernels.replace import FusedModule

__all__ = ["FusedCaiTAttention", "FusedDeepViTAttention", "FusedHeadMixing", "FusedTalkingHeadAttn"]

# torch.fx.symbolic_trace records the op as one call (a leaf) instead of tracing
# its argument checks
torch.fx.wrap("head_mixing_attention")


def _applies(x: torch.Tensor) -> bool:
    """Tokens (B, N, C), or torch.fx tracing (shapes are proxies: the op checks them)."""
    return isinstance(x, torch.fx.Proxy) or x.ndim == 3


class FusedHeadMixing(FusedModule):
    """Base of the head-mixing mixins: ``_vk_attend`` runs the op."""

    _vk_op = "head_mixing_attention"

    def _vk_attend(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        *,
        scale: float,
        pre: tuple[torch.Tensor, torch.Tensor | None] | None = None,
        post: tuple[torch.Tensor, torch.Tensor | None] | None = None,
        head_norm: tuple[torch.Tensor | None, torch.Tensor | None, float] | None = None,
        dropout: torch.nn.Module,
        site: str,
    ) -> torch.Tensor:
        """(B, H, Nq, Dk), (B, H, Nk, Dk), (B, H, Nk, Dv) -> (B, H, Nq, Dv)."""
        p = float(dropout.p) if self.training else 0.0
        return head_mixing_attention(
            q, k, v, scale=scale, pre=pre, post=post, head_norm=head_norm, dropout_p=p,
            dropout_site=site, backend=self._vk.backend,
        )  # fmt: skip


class FusedCaiTAttention(FusedHeadMixing):
    """vit-pytorch's / this repo's CaiT talking-heads ``Attention``: norm, to_q,
    to_kv, mix_heads_pre_attn / mix_heads_post_attn (used as einsum('b h i j, h g'),
    i.e. weight[in, out]), dropout on the probabilities, to_out."""

    _vk_skips = ("attend", "dropout")

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        if torch.jit.is_scripting():
            return self._vk_base_forward(x, context)
        return self._vk_forward(x, context)

    @torch.jit.unused
    def _vk_forward(self, x: torch.Tensor, context: torch.Tensor | None) -> torch.Tensor:
        if not _applies(x) or self._vk_hooked():
            return self._vk_base_forward(x, context)
        B, N = x.shape[0], x.shape[1]
        h = self.heads
        x = self.norm(x)
        context = x if context is None else torch.cat((x, context), dim=1)  # (B, M, C)
        M = context.shape[1]
        q = self.to_q(x).view(B, N, h, -1).transpose(1, 2)  # 'b n (h d) -> b h n d'
        # to_kv(context).chunk(2) + 'b m (h d) -> b h m d', as views
        k, v = self.to_kv(context).view(B, M, 2, h, -1).permute(2, 0, 3, 1, 4).unbind(0)
        out = self._vk_attend(
            q, k, v, scale=self.scale, pre=(self.mix_heads_pre_attn.t(), None),
            post=(self.mix_heads_post_attn.t(), None), dropout=self.dropout, site="probs",
        )  # (B, h, N, d)  # fmt: skip
        return self.to_out(out.transpose(1, 2).reshape(B, N, -1))  # 'b h n d -> b n (h d)'


class FusedDeepViTAttention(FusedHeadMixing):
    """vit-pytorch's / this repo's DeepViT re-attention ``Attention``: norm, to_qkv,
    softmax, dropout, reattn_weights (weight[in, out]), reattn_norm (a LayerNorm over
    the heads between two Rearranges), to_out."""

    _vk_skips = ("dropout", "reattn_norm")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.jit.is_scripting():
            return self._vk_base_forward(x)
        return self._vk_forward(x)

    @torch.jit.unused
    def _vk_forward(self, x: torch.Tensor) -> torch.Tensor:
        if not _applies(x) or self._vk_hooked():
            return self._vk_base_forward(x)
        B, N = x.shape[0], x.shape[1]
        x = self.norm(x)
        # to_qkv(x).chunk(3) + 'b n (h d) -> b h n d', as views
        q, k, v = self.to_qkv(x).view(B, N, 3, self.heads, -1).permute(2, 0, 3, 1, 4).unbind(0)
        ln = self.reattn_norm[1]
        out = self._vk_attend(
            q, k, v, scale=self.scale, post=(self.reattn_weights.t(), None),
            head_norm=(ln.weight, ln.bias, ln.eps), dropout=self.dropout, site="probs",
        )  # (B, h, N, d)  # fmt: skip
        return self.to_out(out.transpose(1, 2).reshape(B, N, -1))  # 'b h n d -> b n (h d)'


class FusedTalkingHeadAttn(FusedHeadMixing):
    """timm's ``cait.TalkingHeadAttn``: qkv, proj_l (logits) and proj_w
    (probabilities) nn.Linear(H, H) mixings, attn_drop after proj_w, proj, proj_drop.
    proj_l's bias shifts whole rows of the logits, which the softmax ignores."""

    _vk_skips = ("proj_l", "proj_w", "attn_drop")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.jit.is_scripting():
            return self._vk_base_forward(x)
        return self._vk_forward(x)

    @torch.jit.unused
    def _vk_forward(self, x: torch.Tensor) -> torch.Tensor:
        if (
            not _applies(x)
            or type(self.proj_l) is not nn.Linear
            or type(self.proj_w) is not nn.Linear
            or self._vk_hooked()
        ):
            # (the mixings quantized or replaced since optimize: timm's forward runs them)
            return self._vk_base_forward(x)
        B, N, C = x.shape[0], x.shape[1], x.shape[2]
        h = self.num_heads
        # 'b n (three h d) -> three b h n d', as views
        q, k, v = self.qkv(x).view(B, N, 3, h, C // h).permute(2, 0, 3, 1, 4).unbind(0)
        out = self._vk_attend(
            q, k, v, scale=self.scale, pre=(self.proj_l.weight, self.proj_l.bias),
            post=(self.proj_w.weight, self.proj_w.bias), dropout=self.attn_drop, site="mixed",
        )  # (B, h, N, d)  # fmt: skip
        return self.proj_drop(self.proj(out.transpose(1, 2).reshape(B, N, C)))
