"""Fused mixins for plain multi-head attention: softmax(q k^T * scale) v as
``F.scaled_dot_product_attention``.

Each mixin replaces one attention layout's forward and keeps the original's
math around the attention product (pre-norm, projections, head split and merge,
output projection) by calling the original's submodules. Dropout on the
attention probabilities becomes SDPA's ``dropout_p`` in training mode (the same
distribution, not the same random draws as the original's ``nn.Dropout``).

The "attention" op has two backends, chosen on every call:

* ``torch``: ``F.scaled_dot_product_attention``, which itself picks FlashAttention,
  memory-efficient or its CPU flash kernel. Every backend but "reference" maps
  here (there is no Triton or CUDA kernel of our own for plain attention:
  SDPA's are the fast path), and the optimize report says "torch". One
  exception: training with dropout on CPU runs the explicit product, because
  SDPA has no fused CPU kernel with dropout and its math path is slower.
* ``reference``: the literal math, with the probabilities' dropout drawn exactly
  as ``nn.Dropout`` draws it, so a seeded training step matches the original.
  Chosen by ``optimize(backend="reference")``, ``use_backend("reference")`` or
  ``VITKERNELS_BACKEND=reference``, as for the other ops.
"""

from __future__ import annotations

import torch
import torch.fx
import torch.nn.functional as F

from vitkernels.ops._dispatch import forced_backend
from vitkernels.replace import FusedModule

__all__ = [
    "FusedAttention",
    "QkvProjAttention",
    "TimmCrossAttention",
    "TimmFusedAttnToggle",
    "TokenTransformerAttention",
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


def _literal(backend: str | None) -> bool:
    """The reference backend is forced (argument, use_backend or VITKERNELS_BACKEND)."""
    return forced_backend(backend) == "reference"


class FusedAttention(FusedModule):
    """Base of the attention mixins: ``_vk_attend`` runs the chosen backend."""

    _vk_op = "attention"

    @classmethod
    def _vk_runs(cls, backend: str | None) -> str:
        return "reference" if backend == "reference" else "torch"

    def _vk_attend(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, dropout_p: float
    ) -> torch.Tensor:
        """(B, H, Nq, D), (B, H, Nk, D), (B, H, Nk, Dv) -> (B, H, Nq, Dv)."""
        p = dropout_p if self.training else 0.0
        traced = isinstance(q, torch.fx.Proxy)
        if _literal(self._vk.backend) or (p > 0.0 and not traced and q.device.type == "cpu"):
            # on CPU, SDPA with dropout has no fused kernel and its math path is
            # slower than the explicit product (which is the original's math)
            return attention_reference(q, k, v, scale=scale, dropout_p=p, training=self.training)
        return F.scaled_dot_product_attention(q, k, v, dropout_p=p, scale=scale)


def _applies(x: torch.Tensor, ndim: int) -> bool:
    return isinstance(x, torch.fx.Proxy) or x.ndim == ndim


def _dropout_p(module: torch.nn.Module) -> float:
    drop = getattr(module, "dropout", None)  # SimpleViT's attention has none
    return float(drop.p) if drop is not None else 0.0


class VitPytorchAttention(FusedAttention):
    """vit-pytorch's self-attention with a fused qkv projection (vit.py, pit.py,
    simple_vit.py and this repo's models that keep that layout): norm, to_qkv,
    attend, [dropout], to_out."""

    _vk_skips = ("attend", "dropout")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.jit.is_scripting():
            return self._vk_base_forward(x)
        return self._vk_forward(x)

    @torch.jit.unused
    def _vk_forward(self, x: torch.Tensor) -> torch.Tensor:
        if not _applies(x, 3) or self._vk_hooked():
            return self._vk_base_forward(x)
        B, N = x.shape[0], x.shape[1]
        x = self.norm(x)
        # (B, N, (3 h d)) -> 3 x (B, h, N, d): the chunk(3) + 'b n (h d) -> b h n d' of the original
        q, k, v = self.to_qkv(x).view(B, N, 3, self.heads, -1).permute(2, 0, 3, 1, 4).unbind(0)
        out = self._vk_attend(q, k, v, self.scale, _dropout_p(self))
        out = out.transpose(1, 2).reshape(B, N, -1)  # 'b h n d -> b n (h d)'
        return self.to_out(out)


class VitPytorchCrossAttention(FusedAttention):
    """vit-pytorch's cross_vit.Attention: queries from x, keys and values from the
    context (x itself by default, with x prepended when kv_include_self)."""

    _vk_skips = ("attend", "dropout")

    def forward(
        self, x: torch.Tensor, context: torch.Tensor | None = None, kv_include_self: bool = False
    ) -> torch.Tensor:
        if torch.jit.is_scripting():
            return self._vk_base_forward(x, context, kv_include_self)
        return self._vk_forward(x, context, kv_include_self)

    @torch.jit.unused
    def _vk_forward(
        self, x: torch.Tensor, context: torch.Tensor | None, kv_include_self: bool
    ) -> torch.Tensor:
        if not _applies(x, 3) or self._vk_hooked():
            return self._vk_base_forward(x, context, kv_include_self)
        B, N = x.shape[0], x.shape[1]
        x = self.norm(x)
        if context is None:
            context = x
        if kv_include_self:
            context = torch.cat((x, context), dim=1)
        M = context.shape[1]
        q = self.to_q(x).view(B, N, self.heads, -1).transpose(1, 2)  # (B, h, N, d)
        k, v = self.to_kv(context).view(B, M, 2, self.heads, -1).permute(2, 0, 3, 1, 4).unbind(0)
        out = self._vk_attend(q, k, v, self.scale, self.dropout.p)
        out = out.transpose(1, 2).reshape(B, N, -1)  # 'b h n d -> b n (h d)'
        return self.to_out(out)


class VitPytorchConvAttention(FusedAttention):
    """vit-pytorch's cvt.Attention on feature maps: depthwise-conv projections,
    keys and values on a subsampled grid, 1x1-conv output projection."""

    _vk_skips = ("attend", "dropout")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.jit.is_scripting():
            return self._vk_base_forward(x)
        return self._vk_forward(x)

    @torch.jit.unused
    def _vk_forward(self, x: torch.Tensor) -> torch.Tensor:
        if not _applies(x, 4) or self._vk_hooked():
            return self._vk_base_forward(x)
        B, X, Y = x.shape[0], x.shape[2], x.shape[3]
        x = self.norm(x)
        q = self.to_q(x)  # (B, (h d), X, Y)
        kv = self.to_kv(x)  # (B, (2 h d), X', Y')
        h = self.heads
        # 'b (h d) x y -> b h (x y) d', contiguous: SDPA's fused kernels (CPU flash
        # included) need the head dim at stride 1, else it falls back to the math path
        q = q.reshape(B, h, -1, X * Y).transpose(-1, -2).contiguous()
        kv = kv.reshape(B, 2, h, -1, kv.shape[-2] * kv.shape[-1]).transpose(-1, -2).contiguous()
        k, v = kv.unbind(1)
        out = self._vk_attend(q, k, v, self.scale, self.dropout.p)  # (B, h, X*Y, d)
        out = out.transpose(-1, -2).reshape(B, -1, X, Y)  # 'b h (x y) d -> b (h d) x y'
        return self.to_out(out)


class QkvProjAttention(FusedAttention):
    """The official T2T-ViT backbone Attention (timm's layout before its fused_attn
    switch): qkv, num_heads, scale, attn_drop, proj, proj_drop."""

    _vk_skips = ("attn_drop",)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.jit.is_scripting():
            return self._vk_base_forward(x)
        return self._vk_forward(x)

    @torch.jit.unused
    def _vk_forward(self, x: torch.Tensor) -> torch.Tensor:
        if not _applies(x, 3) or self._vk_hooked():
            return self._vk_base_forward(x)
        B, N = x.shape[0], x.shape[1]
        # 'b n (three h d) -> three b h n d'
        q, k, v = self.qkv(x).view(B, N, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4).unbind(0)
        out = self._vk_attend(q, k, v, self.scale, self.attn_drop.p)
        out = out.transpose(1, 2).reshape(B, N, -1)  # 'b h n d -> b n (h d)'
        return self.proj_drop(self.proj(out))


class TokenTransformerAttention(FusedAttention):
    """The official T2T-ViT-t Token_transformer's Attention: qkv to ``in_dim`` per
    head, and v (one head) as the skip connection: ``v + proj_drop(proj(attn))``."""

    _vk_skips = ("attn_drop",)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.jit.is_scripting():
            return self._vk_base_forward(x)
        return self._vk_forward(x)

    @torch.jit.unused
    def _vk_forward(self, x: torch.Tensor) -> torch.Tensor:
        if not _applies(x, 3) or self._vk_hooked():
            return self._vk_base_forward(x)
        B, N = x.shape[0], x.shape[1]
        # 'b n (three h d) -> three b h n d', d = in_dim
        qkv = self.qkv(x).view(B, N, 3, self.num_heads, self.in_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        out = self._vk_attend(q, k, v, self.scale, self.attn_drop.p)
        out = self.proj_drop(self.proj(out.transpose(1, 2).reshape(B, N, self.in_dim)))
        return v.squeeze(1) + out  # (B, 1, N, in_dim) -> (B, N, in_dim): the skip connection


class TimmCrossAttention(FusedAttention):
    """timm's crossvit.CrossAttention: the class token of x attends to all of x."""

    _vk_skips = ("attn_drop",)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.jit.is_scripting():
            return self._vk_base_forward(x)
        return self._vk_forward(x)

    @torch.jit.unused
    def _vk_forward(self, x: torch.Tensor) -> torch.Tensor:
        if not _applies(x, 3) or self._vk_hooked():
            return self._vk_base_forward(x)
        B, N, C = x.shape[0], x.shape[1], x.shape[2]
        h = self.num_heads
        q = self.wq(x[:, 0:1]).view(B, 1, h, C // h).transpose(1, 2)  # (B, h, 1, C/h)
        k = self.wk(x).view(B, N, h, C // h).transpose(1, 2)  # (B, h, N, C/h)
        v = self.wv(x).view(B, N, h, C // h).transpose(1, 2)
        out = self._vk_attend(q, k, v, self.scale, self.attn_drop.p)  # (B, h, 1, C/h)
        out = out.transpose(1, 2).reshape(B, 1, C)
        return self.proj_drop(self.proj(out))


class TimmFusedAttnToggle(FusedAttention):
    """A timm attention module with a ``fused_attn`` switch (layers.Attention,
    cait.ClassAttn) that was built with it off: timm's own forward runs, with the
    switch read as on (its SDPA branch) unless the reference backend is forced.
    The module's own value stays as it was (``restore`` finds it unchanged);
    TorchScript compiles timm's forward with that value."""

    _vk_jit_unused = ("fused_attn",)
    _vk_skips = ("attn_drop",)  # timm's SDPA branch does not call it: a hook on it reads False

    @property
    def fused_attn(self) -> bool:
        return not _literal(self._vk.backend) and not self._vk_hooked()

    @fused_attn.setter
    def fused_attn(self, value: bool) -> None:
        self.__dict__["fused_attn"] = value
