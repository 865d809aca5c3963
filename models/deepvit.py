"""DeepViT (Zhou et al. 2021) in the layout of lucidrains vit-pytorch 1.26.x ``deepvit.py``.

Constructor signatures and parameter names are those of vit-pytorch, so a
vit-pytorch ``DeepViT.state_dict()`` loads here with ``strict=True`` and gives
the same outputs. Re-attention mixes the heads' attention maps after the
softmax with a learned (heads x heads) matrix and a LayerNorm over heads, in
every block. The attention probabilities are needed explicitly, so
``vitkernels.optimize`` leaves this attention alone.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from einops import rearrange
from einops.layers.torch import Rearrange
from torch import einsum, nn

from .vit import (
    ResidualStack,
    check_divisible,
    check_images,
    check_ints,
    check_pool,
    check_prob,
    check_square_size,
    embed_tokens,
    named_config,
    pair,
)

__all__ = ["CONFIGS", "Attention", "DeepViT"]


class Attention(nn.Module):
    """Pre-norm multi-head self-attention followed by re-attention across heads.

    Args:
        dim: token width in and out.
        heads: number of heads.
        dim_head: per-head width.
        dropout: dropout on the attention matrix and after the output projection.
    """

    def __init__(self, dim: int, heads: int = 8, dim_head: int = 64, dropout: float = 0.0) -> None:
        super().__init__()
        inner_dim = heads * dim_head
        self.heads = heads
        self.scale = dim_head**-0.5

        self.norm = nn.LayerNorm(dim)
        self.to_qkv = nn.Linear(dim, inner_dim * 3, bias=False)
        self.dropout = nn.Dropout(dropout)

        self.reattn_weights = nn.Parameter(torch.randn(heads, heads))
        self.reattn_norm = nn.Sequential(  # LayerNorm over the head axis
            Rearrange("b h i j -> b i j h"),
            nn.LayerNorm(heads),
            Rearrange("b i j h -> b h i j"),
        )
        self.to_out = nn.Sequential(nn.Linear(inner_dim, dim), nn.Dropout(dropout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.norm(x)
        q, k, v = (
            rearrange(t, "b n (h d) -> b h n d", h=self.heads)
            for t in self.to_qkv(x).chunk(3, dim=-1)
        )
        attn = (einsum("b h i d, b h j d -> b h i j", q, k) * self.scale).softmax(dim=-1)
        attn = self.dropout(attn)
        attn = einsum("b h i j, h g -> b g i j", attn, self.reattn_weights)  # mix heads
        attn = self.reattn_norm(attn)
        out = einsum("b h i j, b h j d -> b h i d", attn, v)
        return self.to_out(rearrange(out, "b h n d -> b n (h d)"))


class Transformer(ResidualStack):
    """``depth`` residual (Attention, FeedForward) pairs; no final norm."""

    attention_cls = Attention

class DeepViT(nn.Module):
    """DeepViT: a ViT whose blocks use re-attention.

    Args:
        image_size: image side (square images only).
        patch_size: patch side; must divide image_size.
        num_classes: classes of the head (LayerNorm + Linear).
        dim: token width.
        depth: transformer blocks.
        heads: attention heads.
        mlp_dim: feed-forward hidden width.
        pool: ``'cls'`` (classify the class token) or ``'mean'`` (mean of all
            tokens, class token included).
        channels: image channels.
        dim_head: per-head width.
        dropout: dropout inside the transformer.
        emb_dropout: dropout on the embedded tokens.
    """

    def __init__(
        self,
        *,
        image_size: int,
        patch_size: int,
        num_classes: int,
        dim: int,
        depth: int,
        heads: int,
        mlp_dim: int,
        pool: str = "cls",
        channels: int = 3,
        dim_head: int = 64,
        dropout: float = 0.0,
        emb_dropout: float = 0.0,
    ) -> None:
        super().__init__()
        name = type(self).__name__
        image_size = check_square_size(name, "image_size", image_size)
        patch_size = check_square_size(name, "patch_size", patch_size)
        check_divisible(name, pair(image_size), pair(patch_size))
        check_ints(
            name,
            num_classes=num_classes,
            dim=dim,
            depth=depth,
            heads=heads,
            mlp_dim=mlp_dim,
            channels=channels,
            dim_head=dim_head,
        )
        check_pool(name, pool)
        check_prob(name, "dropout", dropout)
        check_prob(name, "emb_dropout", emb_dropout)

        num_patches = (image_size // patch_size) ** 2
        patch_dim = channels * patch_size**2
        self.channels = channels
        self.patch_size = patch_size

        self.to_patch_embedding = nn.Sequential(
            Rearrange("b c (h p1) (w p2) -> b (h w) (p1 p2 c)", p1=patch_size, p2=patch_size),
            nn.LayerNorm(patch_dim),
            nn.Linear(patch_dim, dim),
            nn.LayerNorm(dim),
        )
        self.pos_embedding = nn.Parameter(torch.randn(1, num_patches + 1, dim))
        self.cls_token = nn.Parameter(torch.randn(1, 1, dim))
        self.dropout = nn.Dropout(emb_dropout)

        self.transformer = Transformer(dim, depth, heads, dim_head, mlp_dim, dropout)

        self.pool = pool
        self.to_latent = nn.Identity()
        self.mlp_head = nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, num_classes))

    def forward(self, img: torch.Tensor) -> torch.Tensor:
        check_images(
            type(self).__name__,
            img,
            channels=self.channels,
            patch_size=(self.patch_size, self.patch_size),
            max_patches=self.pos_embedding.shape[1] - 1,
        )
        x = embed_tokens(self.to_patch_embedding, img, self.cls_token, self.pos_embedding)
        x = self.transformer(self.dropout(x))
        x = x.mean(dim=1) if self.pool == "mean" else x[:, 0]
        return self.mlp_head(self.to_latent(x))


CONFIGS: dict[str, Callable[..., nn.Module]] = {
    "deepvit_s": named_config(
        DeepViT,
        "DeepViT-S (Zhou et al. 2021; official repo's deepvit_S): patch 16, 16 blocks of width "
        "396, 12 heads of width 33, MLP ratio 3 (1188). Deviations forced by vit-pytorch's "
        "layout: re-attention in all 16 blocks (the paper: the last 5 only), a linear patch "
        "embedding (the paper: a small conv stem) and no re-attention scale adjustment.",
        image_size=224,
        patch_size=16,
        num_classes=1000,
        dim=396,
        depth=16,
        heads=12,
        dim_head=33,
        mlp_dim=1188,
    ),
}
