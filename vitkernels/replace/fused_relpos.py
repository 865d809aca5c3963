"""Fused mixins for LeViT attention: ``vitkernels.relpos_attention`` in place of the
eager bias gather + softmax + two matrix products.

Each forward keeps the original's math around the attention product (the
projections with their norms, head split and merge, the output projection) by
calling the original's submodules, and hands q, k, v to the op as strided views
of the projections' outputs (no copies). Where the fused path does not apply
(an input on another grid than the bias table's, attention dropout in training)
the original forward runs.

* ``FusedLeViTAttention``: lucidrains vit-pytorch ``levit.Attention`` and this
  repo's ``models.levit.Attention``: feature maps (B, C, R, C'), an
  ``nn.Embedding`` bias table (R*C', heads) added as ``bias / scale`` (layout
  "nh", bias_scale = 1/scale), ``downsample`` as a stride-2 query conv.
* ``FusedAttentionBiases``: the official LeViT convention, ``attention_biases``
  (heads, N) added unscaled (layout "hn", bias_scale = 1), in four layouts:
  timm ``levit.Attention`` / ``AttentionDownsample`` (``use_conv`` False: tokens
  (B, N, C); True: maps (B, C, H, W)) and the official facebookresearch/LeViT
  ``Attention`` / ``AttentionSubsample`` of ``levit.py`` (tokens) and
  ``levit_c.py`` (maps). It reads ``attention_biases`` on every call, never the
  originals' eval-time bias caches (timm's ``attention_bias_cache``, the
  official ``ab``), which ``restore`` rebuilds or clears.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.fx

from vitkernels.ops.relpos import relpos_attention
from vitkernels.replace import FusedModule

__all__ = ["FusedAttentionBiases", "FusedLeViTAttention", "RelposSpec"]

# torch.fx.symbolic_trace records the op as one call (a leaf) instead of tracing
# its argument checks
torch.fx.wrap("relpos_attention")


@dataclasses.dataclass(frozen=True)
class RelposSpec:
    """What the fused forward needs beyond the module's own attributes."""

    grid: tuple[int, int]  # the key grid (R, C) the bias table was built for
    q_stride: int  # 2 (or more) for shrink attention, else 1
    heads: int = 0
    key_dim: int = 0
    val_dim: int = 0
    conv: bool = False  # feature maps (B, C, H, W) rather than tokens (B, N, C)
    down: bool = False  # separate q and kv projections (shrink attention)

    @property
    def query_grid(self) -> tuple[int, int]:
        s = self.q_stride
        return (self.grid[0] - 1) // s + 1, (self.grid[1] - 1) // s + 1


def _concrete(x: torch.Tensor) -> bool:
    """False while torch.fx traces (shapes are proxies: the op checks them at run time)."""
    return not isinstance(x, torch.fx.Proxy)


class FusedLeViTAttention(FusedModule):
    """vit-pytorch / this repo's LeViT ``Attention`` on ``relpos_attention``."""

    _vk_op = "relpos_attention"
    _vk_skips = ("attend", "dropout", "pos_bias")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.jit.is_scripting():
            return self._vk_base_forward(x)
        return self._vk_forward(x)

    @torch.jit.unused
    def _vk_forward(self, x: torch.Tensor) -> torch.Tensor:
        spec: RelposSpec = self._vk.spec
        if _concrete(x) and (
            x.ndim != 4
            or tuple(x.shape[-2:]) != spec.grid
            or (self.training and self.dropout.p > 0)  # dropout on the probabilities
            or self._vk_hooked()
        ):
            return self._vk_base_forward(x)
        q = self.to_q(x)  # (B, h*Dk, Rq, Cq)
        k = self.to_k(x)  # (B, h*Dk, R, C)
        v = self.to_v(x)  # (B, h*Dv, R, C)
        B, h = x.shape[0], self.heads
        Rq, Cq = spec.query_grid
        # 'b (h d) x y -> b h (x y) d' as views of the conv outputs
        q = q.reshape(B, h, -1, Rq * Cq).transpose(-1, -2)
        k = k.reshape(B, h, -1, spec.grid[0] * spec.grid[1]).transpose(-1, -2)
        v = v.reshape(B, h, -1, spec.grid[0] * spec.grid[1]).transpose(-1, -2)
        out = relpos_attention(
            q, k, v, self.pos_bias.weight, fmap_size=spec.grid, q_stride=spec.q_stride,
            scale=self.scale, bias_scale=1.0 / self.scale, table_layout="nh",
            backend=self._vk.backend,
        )  # (B, h, Nq, Dv)  # fmt: skip
        out = out.transpose(-1, -2).reshape(B, -1, Rq, Cq)  # 'b h (x y) d -> b (h d) x y'
        return self.to_out(out)


class FusedAttentionBiases(FusedModule):
    """timm's and the official LeViT's attention (``attention_biases`` (heads, N),
    ``attention_bias_idxs``) on ``relpos_attention``; see the module docstring."""

    _vk_op = "relpos_attention"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.jit.is_scripting():
            return self._vk_base_forward(x)
        return self._vk_forward(x)

    @torch.jit.unused
    def _vk_forward(self, x: torch.Tensor) -> torch.Tensor:
        s: RelposSpec = self._vk.spec
        R, C = s.grid
        if _concrete(x) and (
            x.ndim != (4 if s.conv else 3)
            or (tuple(x.shape[-2:]) != s.grid if s.conv else x.shape[1] != R * C)
        ):
            return self._vk_base_forward(x)
        B, h, dk, dv = x.shape[0], s.heads, s.key_dim, s.val_dim
        Rq, Cq = s.query_grid
        if s.conv:
            if s.down:
                kv = self.kv(x).view(B, h, dk + dv, R * C)
                k, v = kv.split([dk, dv], dim=2)
                q = self.q(x).view(B, h, dk, Rq * Cq).transpose(-1, -2)  # (B, h, Nq, Dk)
            else:
                qkv = self.qkv(x).view(B, h, 2 * dk + dv, R * C)
                q, k, v = qkv.split([dk, dk, dv], dim=2)
                q = q.transpose(-1, -2)
            k, v = k.transpose(-1, -2), v.transpose(-1, -2)  # (B, h, N, D) views
        else:
            if s.down:
                kv = self.kv(x).view(B, R * C, h, dk + dv)
                k, v = kv.split([dk, dv], dim=3)
                q = self.q(x).view(B, Rq * Cq, h, dk).permute(0, 2, 1, 3)  # (B, h, Nq, Dk)
            else:
                qkv = self.qkv(x).view(B, R * C, h, 2 * dk + dv)
                q, k, v = qkv.split([dk, dk, dv], dim=3)
                q = q.permute(0, 2, 1, 3)
            k, v = k.permute(0, 2, 1, 3), v.permute(0, 2, 1, 3)  # (B, h, N, D) views
        out = relpos_attention(
            q, k, v, self.attention_biases, fmap_size=s.grid, q_stride=s.q_stride,
            scale=self.scale, bias_scale=1.0, table_layout="hn", backend=self._vk.backend,
        )  # (B, h, Nq, Dv)  # fmt: skip
        if s.conv:
            out = out.transpose(-1, -2).reshape(B, h * dv, Rq, Cq)  # 'b h (x y) d -> b (h d) x y'
        else:
            out = out.transpose(1, 2).reshape(B, Rq * Cq, h * dv)  # 'b h n d -> b n (h d)'
        return self.proj(out)

    def _vk_restore(self) -> None:
        # the originals' eval-time caches were computed from tables the fused
        # module may have trained: timm's is rebuilt on its next call, the
        # official one (``ab``, set by its train()) is rebuilt here
        if isinstance(self.__dict__.get("attention_bias_cache"), dict):
            self.attention_bias_cache = {}
        if isinstance(self.__dict__.get("ab"), torch.Tensor):
            with torch.no_grad():
                self.ab = self.attention_biases[:, self.attention_bias_idxs]
