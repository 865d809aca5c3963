"""Fused modules for plain multi-head attention: softmax(q k^T * scale) v as
``F.scaled_dot_product_attention``.

Each module replaces one attention layout and keeps the original's math around
the attention product (pre-norm, projections, head split and merge, output
projection) exactly as the original writes it. Dropout on the attention
probabilities becomes SDPA's ``dropout_p`` in training mode (the same
distribution, not the same random draws as the original's ``nn.Dropout``).

The "attention" op has two backends:

* ``torch``: ``F.scaled_dot_product_attention``, which itself picks FlashAttention,
  memory-efficient or its CPU flash kernel. Every backend but "reference" maps
  here (there is no Triton or CUDA kernel of our own for plain attention:
  SDPA's are the fast path), and the optimize report says "torch". One
  exception: training with dropout on CPU runs the explicit product, because
  SDPA has no fused CPU kernel with dropout and its math path is slower.
* ``reference``: the literal math, with the probabilities' dropout drawn exactly
  as ``nn.Dropout`` draws it, so a seeded training step matches the original.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from vitkernels.replace import FusedModule

__all__ = [
    "FusedAttention",
    "QkvProjAttention",
    "TimmCrossAttention",
    "TimmFusedAttnToggle",
    "VitPytorchAttention",
    "VitPytorchConvAttention",
    "VitPytorchCrossAttention",
    "attention_reference",
]


def attention_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    scale: float,
    dropout_p: float = 0.0,
    training: bool = False,
) -> torch.Tensor:
    """dropout(softmax(scale * q k^T)) v, literally. q (..., Nq, D), k (..., Nk, D), v (..., Nk, Dv)."""
    attn = (q @ k.transpose(-1, -2)) * scale  # (..., Nq, Nk)
    attn = F.dropout(attn.softmax(dim=-1), dropout_p, training=training)
    return attn @ v  # (..., Nq, Dv)


class FusedAttention(FusedModule):
    """Base of the attention replacements: ``_attend`` runs the chosen backend.

    Args:
        original: the attention module to replace (its tensors are adopted).
        backend: "reference" for the literal math; anything else runs SDPA.
    """

    op = "attention"

    def __init__(self, original: nn.Module, backend: str | None = None) -> None:
        literal = backend == "reference"
        super().__init__(original, "reference" if literal else "torch")
        self.literal = literal

    def _attend(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, dropout_p: float
    ) -> torch.Tensor:
        """(B, H, Nq, D), (B, H, Nk, D), (B, H, Nk, Dv) -> (B, H, Nq, Dv)."""
        p = dropout_p if self.training else 0.0
        if self.literal or (p > 0.0 and q.device.type == "cpu"):
            # on CPU, SDPA with dropout has no fused kernel and its math path is
            # slower than the explicit product (which is the original's math)
            return attention_reference(q, k, v, scale=scale, dropout_p=p, training=self.training)
        return F.scaled_dot_product_attention(q, k, v, dropout_p=p, scale=scale)


class VitPytorchAttention(FusedAttention):
    """vit-pytorch's self-attention with a fused qkv projection (vit.py, pit.py and
    this repo's models that keep that layout): norm, to_qkv, attend, dropout, to_out."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, N, _ = x.shape
        x = self.norm(x)
        # (B, N, (3 h d)) -> 3 x (B, h, N, d): the chunk(3) + 'b n (h d) -> b h n d' of the original
        q, k, v = self.to_qkv(x).view(B, N, 3, self.heads, -1).permute(2, 0, 3, 1, 4).unbind(0)
        out = self._attend(q, k, v, self.scale, self.dropout.p)
        out = out.transpose(1, 2).reshape(B, N, -1)  # 'b h n d -> b n (h d)'
        return self.to_out(out)


class VitPytorchCrossAttention(FusedAttention):
    """vit-pytorch's cross_vit.Attention: queries from x, keys and values from the
    context (x itself by default, with x prepended when kv_include_self)."""

    def forward(
        self, x: torch.Tensor, context: torch.Tensor | None = None, kv_include_self: bool = False
    ) -> torch.Tensor:
        B, N, _ = x.shape
        x = self.norm(x)
        if context is None:
            context = x
        if kv_include_self:
            context = torch.cat((x, context), dim=1)
        M = context.shape[1]
        q = self.to_q(x).view(B, N, self.heads, -1).transpose(1, 2)  # (B, h, N, d)
        k, v = self.to_kv(context).view(B, M, 2, self.heads, -1).permute(2, 0, 3, 1, 4).unbind(0)
        out = self._attend(q, k, v, self.scale, self.dropout.p)
        out = out.transpose(1, 2).reshape(B, N, -1)  # 'b h n d -> b n (h d)'
        return self.to_out(out)


class VitPytorchConvAttention(FusedAttention):
    """vit-pytorch's cvt.Attention on feature maps: depthwise-conv projections,
    keys and values on a subsampled grid, 1x1-conv output projection."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, _, X, Y = x.shape
        x = self.norm(x)
        q = self.to_q(x)  # (B, (h d), X, Y)
        kv = self.to_kv(x)  # (B, (2 h d), X', Y')
        h = self.heads
        # 'b (h d) x y -> b h (x y) d', contiguous: SDPA's fused kernels (CPU flash
        # included) need the head dim at stride 1, else it falls back to the math path
        q = q.reshape(B, h, -1, X * Y).transpose(-1, -2).contiguous()
        kv = kv.reshape(B, 2, h, -1, kv.shape[-2] * kv.shape[-1]).transpose(-1, -2).contiguous()
        k, v = kv.unbind(1)
        out = self._attend(q, k, v, self.scale, self.dropout.p)  # (B, h, X*Y, d)
        out = out.transpose(-1, -2).reshape(B, -1, X, Y)  # 'b h (x y) d -> b (h d) x y'
        return self.to_out(out)


class QkvProjAttention(FusedAttention):
    """The official T2T-ViT Attention (timm's layout before its fused_attn switch):
    qkv, num_heads, scale, attn_drop, proj, proj_drop."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, N, _ = x.shape
        # 'b n (three h d) -> three b h n d'
        q, k, v = self.qkv(x).view(B, N, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4).unbind(0)
        out = self._attend(q, k, v, self.scale, self.attn_drop.p)
        out = out.transpose(1, 2).reshape(B, N, -1)  # 'b h n d -> b n (h d)'
        return self.proj_drop(self.proj(out))


class TimmCrossAttention(FusedAttention):
    """timm's crossvit.CrossAttention: the class token of x attends to all of x."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, N, C = x.shape
        h = self.num_heads
        q = self.wq(x[:, 0:1]).view(B, 1, h, C // h).transpose(1, 2)  # (B, h, 1, C/h)
        k = self.wk(x).view(B, N, h, C // h).transpose(1, 2)  # (B, h, N, C/h)
        v = self.wv(x).view(B, N, h, C // h).transpose(1, 2)
        out = self._attend(q, k, v, self.scale, self.attn_drop.p)  # (B, h, 1, C/h)
        out = out.transpose(1, 2).reshape(B, 1, C)
        return self.proj_drop(self.proj(out))


class TimmFusedAttnToggle(FusedAttention):
    """A timm attention module with a ``fused_attn`` switch (layers.Attention,
    cait.ClassAttn) that was built with it off: runs timm's own forward with the
    switch on (its SDPA branch), or off for the reference backend."""

    def __init__(self, original: nn.Module, backend: str | None = None) -> None:
        super().__init__(original, backend)
        self.fused_attn = not self.literal
        self.timm_forward = type(original).forward

    def forward(self, *args, **kwargs):  # the original's signature, whatever timm version
        return self.timm_forward(self, *args, **kwargs)
