"""CaiT (Touvron et al. 2021) in the layout of lucidrains vit-pytorch 1.26.x ``cait.py``.

Constructor signatures and parameter names are those of vit-pytorch, so a
vit-pytorch ``CaiT.state_dict()`` loads here with ``strict=True`` and gives the
same outputs in eval mode. Two stages: a patch transformer (self-attention over
the patches, no class token) and a class transformer in which the class token
attends to itself and the patch tokens. Every residual branch is scaled by a
learned per-channel LayerScale; attention uses talking heads (learned head
mixing before and after the softmax), so ``vitkernels.optimize`` leaves it
alone.

One deliberate deviation: vit-pytorch drops whole layers (``layer_dropout``)
in eval mode too; here layers are dropped in training only.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from einops import rearrange, repeat
from einops.layers.torch import Rearrange
from torch import einsum, nn

from .vit import (
    FeedForward,
    check_divisible,
    check_images,
    check_ints,
    check_probs,
    check_square_size,
    embed_tokens,
    named_config,
    pair,
)

__all__ = ["CONFIGS", "Attention", "CaiT", "LayerScale"]


class LayerScale(nn.Module):
    """``fn(x) * scale`` with a learned per-channel scale.

    Args:
        dim: channels.
        fn: the residual branch.
        depth: 1-based index of the block; sets the initial scale as in the
            CaiT paper (0.1 up to 18, 1e-5 up to 24, 1e-6 beyond).
    """

    def __init__(self, dim: int, fn: nn.Module, depth: int) -> None:
        super().__init__()
        init_eps = 0.1 if depth <= 18 else 1e-5 if depth <= 24 else 1e-6
        self.scale = nn.Parameter(torch.full((1, 1, dim), init_eps))
        self.fn = fn

    def forward(self, x: torch.Tensor, **kwargs: torch.Tensor | None) -> torch.Tensor:
        return self.fn(x, **kwargs) * self.scale


class Attention(nn.Module):
    """Pre-norm attention with talking heads; keys/values optionally extended by a context.

    Args:
        dim: token width in and out.
        heads: number of heads.
        dim_head: per-head width.
        dropout: dropout on the attention matrix and after the output projection.

    ``forward(x, context)`` attends from ``x`` to ``cat(norm(x), context)``;
    the context is not normalised.
    """

    def __init__(self, dim: int, heads: int = 8, dim_head: int = 64, dropout: float = 0.0) -> None:
        super().__init__()
        inner_dim = heads * dim_head
        self.heads = heads
        self.scale = dim_head**-0.5

        self.norm = nn.LayerNorm(dim)
        self.to_q = nn.Linear(dim, inner_dim, bias=False)
        self.to_kv = nn.Linear(dim, inner_dim * 2, bias=False)

        self.attend = nn.Softmax(dim=-1)
        self.dropout = nn.Dropout(dropout)

        self.mix_heads_pre_attn = nn.Parameter(torch.randn(heads, heads))
        self.mix_heads_post_attn = nn.Parameter(torch.randn(heads, heads))

        self.to_out = nn.Sequential(nn.Linear(inner_dim, dim), nn.Dropout(dropout))

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        x = self.norm(x)
        context = x if context is None else torch.cat((x, context), dim=1)  # b m d

        q, k, v = (
            rearrange(t, "b n (h d) -> b h n d", h=self.heads)
            for t in (self.to_q(x), *self.to_kv(context).chunk(2, dim=-1))
        )
        dots = einsum("b h i d, b h j d -> b h i j", q, k) * self.scale
        dots = einsum("b h i j, h g -> b g i j", dots, self.mix_heads_pre_attn)
        attn = self.dropout(self.attend(dots))
        attn = einsum("b h i j, h g -> b g i j", attn, self.mix_heads_post_attn)
        out = einsum("b h i j, b h j d -> b h i d", attn, v)
        return self.to_out(rearrange(out, "b h n d -> b n (h d)"))


class Transformer(nn.Module):
    """``depth`` LayerScaled residual (attention, feed-forward) pairs; no final norm.

    Args:
        dim: token width.
        depth: number of blocks.
        heads: attention heads per block.
        dim_head: per-head width.
        mlp_dim: feed-forward hidden width.
        dropout: dropout inside the blocks.
        layer_dropout: in training, the probability of skipping each block
            (at least one block always runs).
    """

    def __init__(
        self,
        dim: int,
        depth: int,
        heads: int,
        dim_head: int,
        mlp_dim: int,
        dropout: float = 0.0,
        layer_dropout: float = 0.0,
    ) -> None:
        super().__init__()
        self.layer_dropout = layer_dropout
        self.layers = nn.ModuleList(
            nn.ModuleList(
                [
                    LayerScale(dim, Attention(dim, heads, dim_head, dropout), ind + 1),
                    LayerScale(dim, FeedForward(dim, mlp_dim, dropout), ind + 1),
                ]
            )
            for ind in range(depth)
        )

    def _kept_layers(self) -> list[nn.Module]:
        if not self.training or self.layer_dropout == 0:
            return list(self.layers)
        drop = torch.rand(len(self.layers)) < self.layer_dropout
        if bool(drop.all()):
            drop[torch.randint(len(self.layers), ())] = False
        kept = zip(self.layers, drop.tolist(), strict=True)
        return [layer for layer, dropped in kept if not dropped]

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        for attn, ff in self._kept_layers():
            x = attn(x, context=context) + x
            x = ff(x) + x
        return x


class CaiT(nn.Module):
    """Class-attention image transformer (RGB images only, as in vit-pytorch).

    Args:
        image_size: image side (square images only).
        patch_size: patch side; must divide image_size.
        num_classes: classes of the head (LayerNorm + Linear).
        dim: token width.
        depth: blocks of the patch transformer.
        cls_depth: blocks of the class transformer.
        heads: attention heads.
        mlp_dim: feed-forward hidden width.
        dim_head: per-head width.
        dropout: dropout inside the transformers.
        emb_dropout: dropout on the embedded patches.
        layer_dropout: in training, the probability of skipping each block.
    """

    channels = 3  # vit-pytorch's CaiT has no `channels` argument

    def __init__(
        self,
        *,
        image_size: int,
        patch_size: int,
        num_classes: int,
        dim: int,
        depth: int,
        cls_depth: int,
        heads: int,
        mlp_dim: int,
        dim_head: int = 64,
        dropout: float = 0.0,
        emb_dropout: float = 0.0,
        layer_dropout: float = 0.0,
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
            cls_depth=cls_depth,
            heads=heads,
            mlp_dim=mlp_dim,
            dim_head=dim_head,
        )
        check_probs(name, dropout=dropout, emb_dropout=emb_dropout, layer_dropout=layer_dropout)

        num_patches = (image_size // patch_size) ** 2
        patch_dim = self.channels * patch_size**2
        self.patch_size = patch_size

        self.to_patch_embedding = nn.Sequential(
            Rearrange("b c (h p1) (w p2) -> b (h w) (p1 p2 c)", p1=patch_size, p2=patch_size),
            nn.LayerNorm(patch_dim),
            nn.Linear(patch_dim, dim),
            nn.LayerNorm(dim),
        )
        self.pos_embedding = nn.Parameter(torch.randn(1, num_patches, dim))  # no class token
        self.cls_token = nn.Parameter(torch.randn(1, 1, dim))
        self.dropout = nn.Dropout(emb_dropout)

        self.patch_transformer = Transformer(
            dim, depth, heads, dim_head, mlp_dim, dropout, layer_dropout
        )
        self.cls_transformer = Transformer(
            dim, cls_depth, heads, dim_head, mlp_dim, dropout, layer_dropout
        )
        self.mlp_head = nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, num_classes))

    def forward(self, img: torch.Tensor) -> torch.Tensor:
        check_images(
            type(self).__name__,
            img,
            channels=self.channels,
            patch_size=pair(self.patch_size),
            max_patches=self.pos_embedding.shape[1],
        )
        x = embed_tokens(self.to_patch_embedding, img, None, self.pos_embedding)  # b n d
        x = self.patch_transformer(self.dropout(x))

        cls_tokens = repeat(self.cls_token, "1 n d -> b n d", b=x.shape[0])
        cls_tokens = self.cls_transformer(cls_tokens, context=x)  # b 1 d
        return self.mlp_head(cls_tokens[:, 0])


def _cait(**kw: int) -> dict[str, int]:
    return dict(image_size=224, patch_size=16, num_classes=1000, dim_head=48, **kw)


CONFIGS: dict[str, Callable[..., nn.Module]] = {
    "cait_xxs24": named_config(
        CaiT,
        "CaiT-XXS-24 (Touvron et al. 2021): 24 + 2 blocks of width 192, 4 heads of width 48, "
        "MLP 768. vit-pytorch's layout adds LayerNorms around the patch projection.",
        **_cait(dim=192, depth=24, cls_depth=2, heads=4, mlp_dim=768),
    ),
    "cait_s24": named_config(
        CaiT,
        "CaiT-S-24 (Touvron et al. 2021): 24 + 2 blocks of width 384, 8 heads of width 48, "
        "MLP 1536. vit-pytorch's layout adds LayerNorms around the patch projection.",
        **_cait(dim=384, depth=24, cls_depth=2, heads=8, mlp_dim=1536),
    ),
}
