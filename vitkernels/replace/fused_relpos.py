"""Fused modules for LeViT attention: ``vitkernels.relpos_attention`` in place of the
eager bias gather + softmax + two matrix products.

Each module keeps the original's math around the attention product (the 1x1
conv / linear projections with their norms, head split and merge, the output
projection) as the original writes it, and hands q, k, v to the op as strided
views of the projections' outputs (no copies).

* ``LeViTAttention``: lucidrains vit-pytorch ``levit.Attention`` and this repo's
  ``models.levit.Attention`` (same structure and names): feature maps
  (B, C, R, C'), an ``nn.Embedding`` bias table (R*C', heads) added as
  ``bias / scale`` (layout "nh", bias_scale = 1/scale), ``downsample`` as a
  stride-2 query conv. Attention dropout in training mode runs the original's
  eager math (the fused op has no dropout on the probabilities).
* ``TimmLevitAttention`` / ``TimmLevitAttentionDownsample``: timm's
  ``levit.Attention`` and ``AttentionDownsample`` (use_conv False: tokens
  (B, N, C); True: maps (B, C, H, W)); ``attention_biases`` (heads, N) added
  unscaled (layout "hn", bias_scale = 1), the official LeViT convention. The
  fused modules read ``attention_biases`` directly, never timm's eval-time
  ``attention_bias_cache``, which ``to_original`` clears so that a restored
  module does not serve a bias cached before the fused one was trained.
"""

from __future__ import annotations

import torch
from torch import nn

from vitkernels.ops.relpos import relpos_attention
from vitkernels.replace import FusedModule

__all__ = ["LeViTAttention", "TimmLevitAttention", "TimmLevitAttentionDownsample"]


def _check_grid(module: str, got: tuple[int, ...], want: tuple[int, int]) -> None:
    if tuple(got) != tuple(want):
        raise ValueError(
            f"{module}: input grid {tuple(got)}; expected {tuple(want)}, the grid its "
            "position-bias table was built for"
        )


class LeViTAttention(FusedModule):
    """vit-pytorch / this repo's LeViT ``Attention`` on ``relpos_attention``.

    Args:
        original: the attention module (its tensors are adopted).
        backend: forced backend for the op, or None for automatic dispatch.
        fmap_size: the key grid (R, C) the bias table was built for.
        q_stride: 2 for shrink attention (``downsample``), else 1.
    """

    op = "relpos_attention"

    def __init__(
        self,
        original: nn.Module,
        backend: str | None = None,
        *,
        fmap_size: tuple[int, int],
        q_stride: int,
    ) -> None:
        super().__init__(original, backend)
        self.vk_fmap_size = tuple(fmap_size)
        self.vk_q_stride = q_stride

    def _eager(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """The original's math (with its attention dropout): (B, H, N, D) -> (B, H, Nq, Dv)."""
        dots = torch.einsum("b h i d, b h j d -> b h i j", q, k) * self.scale
        bias = self.pos_bias(self.pos_indices).permute(2, 0, 1).unsqueeze(0)  # (1, h, i, j)
        attn = self.dropout(self.attend(dots + bias / self.scale))
        return torch.einsum("b h i j, b h j d -> b h i d", attn, v)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _check_grid(type(self.original).__name__, x.shape[-2:], self.vk_fmap_size)
        q = self.to_q(x)  # (B, h*Dk, Rq, Cq)
        k = self.to_k(x)  # (B, h*Dk, R, C)
        v = self.to_v(x)  # (B, h*Dv, R, C)
        B, _, Rq, Cq = q.shape
        h = self.heads
        # 'b (h d) x y -> b h (x y) d' as views of the conv outputs
        q = q.reshape(B, h, -1, Rq * Cq).transpose(-1, -2)
        k = k.reshape(B, h, -1, k.shape[-2] * k.shape[-1]).transpose(-1, -2)
        v = v.reshape(B, h, -1, v.shape[-2] * v.shape[-1]).transpose(-1, -2)
        if self.training and self.dropout.p > 0:
            out = self._eager(q, k, v)
        else:
            out = relpos_attention(
                q,
                k,
                v,
                self.pos_bias.weight,
                fmap_size=self.vk_fmap_size,
                q_stride=self.vk_q_stride,
                scale=self.scale,
                bias_scale=1.0 / self.scale,
                table_layout="nh",
                backend=self.backend,
            )  # (B, h, Nq, Dv)
        out = out.transpose(-1, -2).reshape(B, -1, Rq, Cq)  # 'b h (x y) d -> b (h d) x y'
        return self.to_out(out)


class _TimmLevit(FusedModule):
    op = "relpos_attention"
    q_stride = 1

    def _attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return relpos_attention(
            q,
            k,
            v,
            self.attention_biases,
            fmap_size=tuple(self.resolution),
            q_stride=self.q_stride,
            scale=self.scale,
            bias_scale=1.0,
            table_layout="hn",
            backend=self.backend,
        )  # (B, h, Nq, Dv)

    def to_original(self) -> nn.Module:
        orig = super().to_original()
        orig.attention_bias_cache = {}  # computed from tensors the fused module may have changed
        return orig


class TimmLevitAttention(_TimmLevit):
    """timm ``levit.Attention`` on ``relpos_attention`` (see the module docstring)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        name = type(self.original).__name__
        R, C = self.resolution
        h, dk, dv = self.num_heads, self.key_dim, self.val_dim
        if self.use_conv:
            B, _, H, W = x.shape
            _check_grid(name, (H, W), (R, C))
            qkv = self.qkv(x).view(B, h, -1, H * W)  # (B, h, 2*Dk+Dv, N)
            q, k, v = (t.transpose(-1, -2) for t in qkv.split([dk, dk, dv], dim=2))
            out = self._attend(q, k, v)  # (B, h, N, Dv)
            x = out.transpose(-1, -2).reshape(B, -1, H, W)
        else:
            B, N, _ = x.shape
            _check_grid(name, (N,), (R * C,))
            qkv = self.qkv(x).view(B, N, h, -1)  # (B, N, h, 2*Dk+Dv)
            q, k, v = (t.permute(0, 2, 1, 3) for t in qkv.split([dk, dk, dv], dim=3))
            out = self._attend(q, k, v)  # (B, h, N, Dv)
            x = out.transpose(1, 2).reshape(B, N, self.val_attn_dim)
        return self.proj(x)


class TimmLevitAttentionDownsample(_TimmLevit):
    """timm ``levit.AttentionDownsample`` (shrink attention) on ``relpos_attention``."""

    @property
    def q_stride(self) -> int:  # type: ignore[override]
        return self.stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        name = type(self.original).__name__
        R, C = self.resolution
        h, dk, dv = self.num_heads, self.key_dim, self.val_dim
        if self.use_conv:
            B, _, H, W = x.shape
            _check_grid(name, (H, W), (R, C))
            HH, WW = (H - 1) // self.stride + 1, (W - 1) // self.stride + 1
            kv = self.kv(x).view(B, h, -1, H * W)  # (B, h, Dk+Dv, N)
            k, v = (t.transpose(-1, -2) for t in kv.split([dk, dv], dim=2))
            q = self.q(x).view(B, h, dk, -1).transpose(-1, -2)  # (B, h, Nq, Dk)
            out = self._attend(q, k, v)  # (B, h, Nq, Dv)
            x = out.transpose(-1, -2).reshape(B, self.val_attn_dim, HH, WW)
        else:
            B, N, _ = x.shape
            _check_grid(name, (N,), (R * C,))
            kv = self.kv(x).view(B, N, h, -1)  # (B, N, h, Dk+Dv)
            k, v = (t.permute(0, 2, 1, 3) for t in kv.split([dk, dv], dim=3))
            q = self.q(x).view(B, -1, h, dk).permute(0, 2, 1, 3)  # (B, h, Nq, Dk)
            out = self._attend(q, k, v)  # (B, h, Nq, Dv)
            x = out.transpose(1, 2).reshape(B, -1, self.val_attn_dim)
        return self.proj(x)
