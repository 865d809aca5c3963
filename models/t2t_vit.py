"""Tokens-to-Token ViT (Yuan et al. 2021), official layout.

``T2T_ViT``, ``T2T_module``, ``Token_performer``: the official T2T-ViT
(yitu-opensource/T2T-ViT, ``models/t2t_vit.py``, ``token_performer.py``,
``transformer_block.py``) with the Performer tokens-to-token module, under the
official attribute names so that official checkpoints map key for key
(``tokens_to_token.attention1.kqv.weight``, ``blocks.0.attn.qkv.weight``, ...).
The released checkpoints were trained with ``qk_scale=embed_dim**-0.5`` (the
official ``pretrained=True`` path sets it): pass that override to
``create("t2t_vit_14", qk_scale=384**-0.5)`` before loading them.

Deviations from the official code: only ``tokens_type="performer"`` is built
(the T2T-ViT-t "transformer" variants and the "convolution" ablation are not);
``Token_performer.single_attn`` returns its result in the input dtype (the
official code returns float32 whatever the input, which breaks half-precision
models); the constructors are keyword-only.

lucidrains vit-pytorch's ``T2TViT`` is in ``t2t.py``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from einops import rearrange
from torch import nn

from .vit import check_int, embed_tokens

__all__ = [
    "CONFIGS",
    "Block",
    "DropPath",
    "Mlp",
    "T2T_ViT",
    "T2T_module",
    "Token_performer",
    "get_sinusoid_encoding",
]


def conv_output_size(image_size: int, kernel_size: int, stride: int, padding: int) -> int:
    """Side of an unfold/conv output grid."""
    return (image_size - kernel_size + 2 * padding) // stride + 1




class Token_performer(nn.Module):  # noqa: N801 (official name)
    """Tokens-to-token block with single-head Performer attention (official layout).

    ``x -> y = single_attn(norm1(x)); y + mlp(norm2(y))`` where ``single_attn``
    projects to k, q, v (in that order) of width ``emb``, runs linear attention
    with positive random features and keeps ``v`` as the skip connection (the
    input width ``dim`` differs from ``emb``, so x cannot be).

    Args:
        dim: input token width (the unfolded patch width).
        in_dim: per-head output width; emb = in_dim * head_cnt.
        head_cnt: kept for the official signature; the attention is one head
            of width emb whatever its value.
        kernel_ratio: random features m = int(emb * kernel_ratio).
        dp1: dropout after the attention projection.
        dp2: dropout at the end of the MLP.
    """

    def __init__(
        self,
        *,
        dim: int,
        in_dim: int,
        head_cnt: int = 1,
        kernel_ratio: float = 0.5,
        dp1: float = 0.1,
        dp2: float = 0.1,
    ) -> None:
        super().__init__()
        check_int("Token_performer", "dim", dim)
        check_int("Token_performer", "in_dim", in_dim)
        check_int("Token_performer", "head_cnt", head_cnt)
        self.emb = in_dim * head_cnt
        self.head_cnt = head_cnt
        self.m = int(self.emb * kernel_ratio)
        if self.m < 1:
            raise ValueError(
                f"Token_performer: kernel_ratio={kernel_ratio} gives m=int({self.emb} * "
                f"{kernel_ratio})={self.m} random features; expected m >= 1"
            )
        self.epsilon = 1e-8  # keeps the normalising division finite

        self.kqv = nn.Linear(dim, 3 * self.emb)
        self.dp = nn.Dropout(dp1)
        self.proj = nn.Linear(self.emb, self.emb)
        self.norm1 = nn.LayerNorm(dim)
        self.norm2 = nn.LayerNorm(self.emb)
        self.mlp = nn.Sequential(
            nn.Linear(self.emb, self.emb),
            nn.GELU(),
            nn.Linear(self.emb, self.emb),
            nn.Dropout(dp2),
        )
        # fixed random features (m, emb): orthonormal rows scaled to norm sqrt(m);
        # a Parameter (not trained) so that it is saved in and loaded from checkpoints
        w = nn.init.orthogonal_(torch.empty(self.m, self.emb)) * math.sqrt(self.m)
        self.w = nn.Parameter(w, requires_grad=False)

    def prm_exp(self, x: torch.Tensor) -> torch.Tensor:
        """Positive random features phi(x) = exp(x w^T - |x|^2 / 2) / sqrt(m): (B, T, m), float32."""
        x = x.float()
        half_sq_norm = (x * x).sum(dim=-1, keepdim=True) / 2  # (B, T, 1)
        wtx = torch.einsum("b t e, m e -> b t m", x, self.w.float())
        return torch.exp(wtx - half_sq_norm) / math.sqrt(self.m)

    def single_attn(self, x: torch.Tensor) -> torch.Tensor:
        """k, q, v = kqv(x); v + dp(proj(phi(q) (phi(k)^T v) / (phi(q) sum_t phi(k) + eps))).

        x: (B, T, dim), already normalised. Returns (B, T, emb).
        """
        k, q, v = torch.split(self.kqv(x), self.emb, dim=-1)
        kp, qp = self.prm_exp(k), self.prm_exp(q)  # (B, T, m)
        denom = torch.einsum("b t m, b m -> b t", qp, kp.sum(dim=1)).unsqueeze(-1)  # (B, T, 1)
        kptv = torch.einsum("b t e, b t m -> b e m", v.float(), kp)  # (B, emb, m)
        y = torch.einsum("b t m, b e m -> b t e", qp, kptv) / (denom + self.epsilon)
        return v + self.dp(self.proj(y.to(v.dtype)))  # v is the skip connection

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.single_attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class T2T_module(nn.Module):  # noqa: N801 (official name)
    """Tokens-to-token embedding with Performer blocks (official layout).

    Soft split 7/4/2, Token_performer, soft split 3/2/1, Token_performer, soft
    split 3/2/1, Linear: (B, in_chans, S, S) -> (B, (S/16)**2, embed_dim).

    Args:
        img_size: side of the square input image.
        tokens_type: only ``"performer"`` is built.
        in_chans: image channels.
        embed_dim: output token width.
        token_dim: width of the tokens between the soft splits.
    """

    def __init__(
        self,
        *,
        img_size: int = 224,
        tokens_type: str = "performer",
        in_chans: int = 3,
        embed_dim: int = 768,
        token_dim: int = 64,
    ) -> None:
        super().__init__()
        if tokens_type != "performer":
            raise ValueError(
                f"T2T_module: tokens_type={tokens_type!r}; expected 'performer' (the "
                "'transformer' and 'convolution' variants of the official code are not built)"
            )
        for arg, value in (
            ("img_size", img_size),
            ("in_chans", in_chans),
            ("embed_dim", embed_dim),
            ("token_dim", token_dim),
        ):
            check_int("T2T_module", arg, value)
        self.soft_split0 = nn.Unfold(kernel_size=(7, 7), stride=(4, 4), padding=(2, 2))
        self.soft_split1 = nn.Unfold(kernel_size=(3, 3), stride=(2, 2), padding=(1, 1))
        self.soft_split2 = nn.Unfold(kernel_size=(3, 3), stride=(2, 2), padding=(1, 1))
        self.attention1 = Token_performer(dim=in_chans * 7 * 7, in_dim=token_dim, kernel_ratio=0.5)
        self.attention2 = Token_performer(dim=token_dim * 3 * 3, in_dim=token_dim, kernel_ratio=0.5)
        self.project = nn.Linear(token_dim * 3 * 3, embed_dim)
        self.num_patches = (img_size // 16) ** 2  # strides 4, 2, 2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.soft_split0(x).transpose(1, 2)  # (B, C*49, N0) -> (B, N0, C*49)
        x = self.attention1(x)  # (B, N0, token_dim)
        x = rearrange(x, "b (h w) c -> b c h w", h=math.isqrt(x.shape[1]))
        x = self.soft_split1(x).transpose(1, 2)  # (B, N1, token_dim*9)
        x = self.attention2(x)
        x = rearrange(x, "b (h w) c -> b c h w", h=math.isqrt(x.shape[1]))
        x = self.soft_split2(x).transpose(1, 2)  # (B, N2, token_dim*9)
        return self.project(x)  # (B, N2, embed_dim)


class Mlp(nn.Module):
    """fc1, act, drop, fc2, drop (official / timm layout).

    Args:
        in_features: input width.
        hidden_features: hidden width (default: in_features).
        out_features: output width (default: in_features).
        act_layer: activation class.
        drop: dropout after the activation and after fc2.
    """

    def __init__(
        self,
        in_features: int,
        hidden_features: int | None = None,
        out_features: int | None = None,
        act_layer: type[nn.Module] = nn.GELU,
        drop: float = 0.0,
    ) -> None:
        super().__init__()
        out_features = out_features or in_features
        hidden_features = hidden_features or in_features
        self.fc1 = nn.Linear(in_features, hidden_features)
        self.act = act_layer()
        self.fc2 = nn.Linear(hidden_features, out_features)
        self.drop = nn.Dropout(drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(self.fc2(self.drop(self.act(self.fc1(x)))))


class Attention(nn.Module):
    """Multi-head self-attention with a fused qkv projection (official / timm layout).

    Args:
        dim: token width in and out.
        num_heads: heads; head width dim // num_heads.
        qkv_bias: bias on the qkv projection.
        qk_scale: logit scale (default head_dim**-0.5).
        attn_drop: dropout on the attention matrix.
        proj_drop: dropout after the output projection.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int = 8,
        qkv_bias: bool = False,
        qk_scale: float | None = None,
        attn_drop: float = 0.0,
        proj_drop: float = 0.0,
    ) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.scale = qk_scale or (dim // num_heads) ** -0.5
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.attn_drop = nn.Dropout(attn_drop)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        qkv = rearrange(self.qkv(x), "b n (three h d) -> three b h n d", three=3, h=self.num_heads)
        q, k, v = qkv.unbind(0)
        attn = (q @ k.transpose(-2, -1) * self.scale).softmax(dim=-1)  # (B, H, N, N)
        x = rearrange(self.attn_drop(attn) @ v, "b h n d -> b n (h d)")
        return self.proj_drop(self.proj(x))


class DropPath(nn.Module):
    """Stochastic depth: zero whole samples of a residual branch with probability p.

    Args:
        drop_prob: probability p of dropping a sample's branch in training.
    """

    def __init__(self, drop_prob: float = 0.0) -> None:
        super().__init__()
        self.drop_prob = drop_prob

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.drop_prob == 0.0 or not self.training:
            return x
        keep = 1.0 - self.drop_prob
        mask = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep)
        return x * mask / keep


class Block(nn.Module):
    """Pre-norm transformer block (official / timm layout).

    Args:
        dim: token width.
        num_heads: attention heads.
        mlp_ratio: MLP hidden width = int(dim * mlp_ratio).
        qkv_bias, qk_scale: see ``Attention``.
        drop: dropout after the projections.
        attn_drop: dropout on the attention matrix.
        drop_path: stochastic depth probability.
        act_layer: MLP activation class.
        norm_layer: norm class.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = False,
        qk_scale: float | None = None,
        drop: float = 0.0,
        attn_drop: float = 0.0,
        drop_path: float = 0.0,
        act_layer: type[nn.Module] = nn.GELU,
        norm_layer: type[nn.Module] = nn.LayerNorm,
    ) -> None:
        super().__init__()
        self.norm1 = norm_layer(dim)
        self.attn = Attention(
            dim,
            num_heads=num_heads,
            qkv_bias=qkv_bias,
            qk_scale=qk_scale,
            attn_drop=attn_drop,
            proj_drop=drop,
        )
        self.drop_path = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()
        self.norm2 = norm_layer(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), act_layer=act_layer, drop=drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.drop_path(self.attn(self.norm1(x)))
        return x + self.drop_path(self.mlp(self.norm2(x)))


def get_sinusoid_encoding(n_position: int, d_hid: int) -> torch.Tensor:
    """Sinusoid position table (1, n_position, d_hid), float32: sin on even, cos on odd dims."""
    pos = torch.arange(n_position, dtype=torch.float64)[:, None]
    j = torch.arange(d_hid)
    angle = pos / torch.pow(10000.0, (2 * (j // 2)).double() / d_hid)[None, :]
    table = torch.where(j % 2 == 0, torch.sin(angle), torch.cos(angle))
    return table.float().unsqueeze(0)


class T2T_ViT(nn.Module):  # noqa: N801 (official name)
    """T2T-ViT classifier, official layout (Performer tokens-to-token).

    Args:
        img_size: side of the square input image; the tokens-to-token grid must
            come out as img_size // 16 (true for multiples of 16).
        tokens_type: only ``"performer"``.
        in_chans: image channels.
        num_classes: classifier outputs; 0 leaves the head out (Identity).
        embed_dim: backbone token width.
        depth: backbone blocks.
        num_heads: backbone attention heads.
        mlp_ratio: backbone MLP hidden multiple.
        qkv_bias: bias on the backbone qkv projections.
        qk_scale: backbone logit scale (default head_dim**-0.5; the released
            checkpoints need embed_dim**-0.5).
        drop_rate: dropout after embeddings and projections.
        attn_drop_rate: dropout on attention matrices.
        drop_path_rate: stochastic depth, rising linearly to this over blocks.
        norm_layer: norm class of the backbone.
        token_dim: width of the tokens-to-token tokens.

    Input: (B, in_chans, img_size, img_size). Output: (B, num_classes).
    """

    def __init__(
        self,
        *,
        img_size: int = 224,
        tokens_type: str = "performer",
        in_chans: int = 3,
        num_classes: int = 1000,
        embed_dim: int = 768,
        depth: int = 12,
        num_heads: int = 12,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = False,
        qk_scale: float | None = None,
        drop_rate: float = 0.0,
        attn_drop_rate: float = 0.0,
        drop_path_rate: float = 0.0,
        norm_layer: type[nn.Module] = nn.LayerNorm,
        token_dim: int = 64,
    ) -> None:
        super().__init__()
        check_int("T2T_ViT", "img_size", img_size)
        check_int("T2T_ViT", "depth", depth)
        check_int("T2T_ViT", "num_heads", num_heads)
        check_int("T2T_ViT", "num_classes", num_classes, minimum=0)
        if embed_dim % num_heads:
            raise ValueError(
                f"T2T_ViT: embed_dim={embed_dim} is not divisible by num_heads={num_heads}; "
                "expected embed_dim to be a multiple of num_heads"
            )
        side = img_size
        for kernel, stride, pad in ((7, 4, 2), (3, 2, 1), (3, 2, 1)):
            side = conv_output_size(side, kernel, stride, pad)
        if side != img_size // 16 or side < 1:
            raise ValueError(
                f"T2T_ViT: img_size={img_size} gives a {side}x{side} token grid but the "
                f"positional table is built for img_size // 16 = {img_size // 16}; expected "
                "a positive multiple of 16 (e.g. 224)"
            )
        self.img_size = img_size
        self.in_chans = in_chans
        self.num_classes = num_classes
        self.num_features = self.embed_dim = embed_dim

        self.tokens_to_token = T2T_module(
            img_size=img_size,
            tokens_type=tokens_type,
            in_chans=in_chans,
            embed_dim=embed_dim,
            token_dim=token_dim,
        )
        num_patches = self.tokens_to_token.num_patches

        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(
            get_sinusoid_encoding(num_patches + 1, embed_dim), requires_grad=False
        )
        self.pos_drop = nn.Dropout(p=drop_rate)

        dpr = torch.linspace(0, drop_path_rate, depth).tolist()  # stochastic depth per block
        self.blocks = nn.ModuleList(
            Block(
                dim=embed_dim,
                num_heads=num_heads,
                mlp_ratio=mlp_ratio,
                qkv_bias=qkv_bias,
                qk_scale=qk_scale,
                drop=drop_rate,
                attn_drop=attn_drop_rate,
                drop_path=dpr[i],
                norm_layer=norm_layer,
            )
            for i in range(depth)
        )
        self.norm = norm_layer(embed_dim)
        self.head = nn.Linear(embed_dim, num_classes) if num_classes > 0 else nn.Identity()

        nn.init.trunc_normal_(self.cls_token, std=0.02)
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(m: nn.Module) -> None:
        if isinstance(m, nn.Linear):
            nn.init.trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, S, S) images -> (B, embed_dim) normalised cls token."""
        if x.ndim != 4 or x.shape[1] != self.in_chans:
            raise ValueError(
                f"T2T_ViT: images of shape {tuple(x.shape)}; expected (batch, in_chans="
                f"{self.in_chans}, {self.img_size}, {self.img_size})"
            )
        if x.shape[-2:] != (self.img_size, self.img_size):
            raise ValueError(
                f"T2T_ViT: image size {x.shape[-2]}x{x.shape[-1]}; expected img_size="
                f"{self.img_size} ({self.img_size}x{self.img_size}), which the positional "
                "table is built for"
            )
        # tokens_to_token(x), class token prepended, positions added
        x = self.pos_drop(embed_tokens(self.tokens_to_token, x, self.cls_token, self.pos_embed))
        for blk in self.blocks:
            x = blk(x)
        return self.norm(x)[:, 0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.forward_features(x))


def _official(embed_dim: int, depth: int, num_heads: int) -> Callable[..., nn.Module]:
    def build(**overrides: Any) -> T2T_ViT:
        kwargs: dict[str, Any] = dict(
            tokens_type="performer",
            embed_dim=embed_dim,
            depth=depth,
            num_heads=num_heads,
            mlp_ratio=3.0,
            token_dim=64,
        )
        kwargs.update(overrides)
        return T2T_ViT(**kwargs)

    build.__doc__ = (
        f"T2T-ViT-{depth} (official layout, Performer T2T): embed_dim {embed_dim}, depth "
        f"{depth}, {num_heads} heads, MLP ratio 3, token_dim 64, 224x224."
    )
    return build


CONFIGS: dict[str, Callable[..., nn.Module]] = {
    "t2t_vit_14": _official(384, 14, 6),
    "t2t_vit_19": _official(448, 19, 7),
    "t2t_vit_24": _official(512, 24, 8),
}
