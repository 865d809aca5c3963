"""CrossViT (Chen et al. 2021) in the layout of lucidrains vit-pytorch 1.26.x ``cross_vit.py``.

Constructor signatures and parameter names are those of vit-pytorch, so a
vit-pytorch ``CrossViT.state_dict()`` loads here with ``strict=True`` and gives
the same outputs in eval mode. Two branches embed the same image with small
(sm) and large (lg) patches; each multi-scale block runs a transformer per
branch, then lets each branch's class token attend to the other branch's patch
tokens (and itself), projected into the other branch's width and back.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from einops import rearrange, repeat
from einops.layers.torch import Rearrange
from torch import einsum, nn

from .vit import (
    FeedForward,
    check_divisible,
    check_images,
    check_ints,
    check_prob,
    check_square_size,
    named_config,
    pair,
)

__all__ = ["Attention", "CONFIGS", "CrossTransformer", "CrossViT", "ImageEmbedder"]


class Attention(nn.Module):
    """Pre-norm multi-head attention with separate query and key/value projections.

    Args:
        dim: token width in and out.
        heads: number of heads.
        dim_head: per-head width.
        dropout: dropout on the attention matrix and after the output projection.

    ``forward(x, context, kv_include_self)`` attends from ``x`` to ``context``
    (default: ``x`` itself); with ``kv_include_self`` the normalised ``x`` is
    prepended to the keys and values. The context is not normalised.
    """

    def __init__(self, dim: int, heads: int = 8, dim_head: int = 64, dropout: float = 0.0) -> None:
        super().__init__()
        inner_dim = heads * dim_head
        self.heads = heads
        self.scale = dim_head**-0.5

        self.norm = nn.LayerNorm(dim)
        self.attend = nn.Softmax(dim=-1)
        self.dropout = nn.Dropout(dropout)

        self.to_q = nn.Linear(dim, inner_dim, bias=False)
        self.to_kv = nn.Linear(dim, inner_dim * 2, bias=False)
        self.to_out = nn.Sequential(nn.Linear(inner_dim, dim), nn.Dropout(dropout))

    def forward(
        self,
        x: torch.Tensor,
        context: torch.Tensor | None = None,
        kv_include_self: bool = False,
    ) -> torch.Tensor:
        x = self.norm(x)
        context = x if context is None else context
        if kv_include_self:
            context = torch.cat((x, context), dim=1)  # the class token also attends to itself

        q, k, v = (
            rearrange(t, "b n (h d) -> b h n d", h=self.heads)
            for t in (self.to_q(x), *self.to_kv(context).chunk(2, dim=-1))
        )
        attn = self.attend(einsum("b h i d, b h j d -> b h i j", q, k) * self.scale)
        out = einsum("b h i j, b h j d -> b h i d", self.dropout(attn), v)
        return self.to_out(rearrange(out, "b h n d -> b n (h d)"))


class Transformer(nn.Module):
    """``depth`` residual (Attention, FeedForward) pairs followed by a LayerNorm.

    Args:
        dim: token width.
        depth: number of blocks.
        heads: attention heads per block.
        dim_head: per-head width.
        mlp_dim: feed-forward hidden width.
        dropout: dropout inside the blocks.
    """

    def __init__(
        self, dim: int, depth: int, heads: int, dim_head: int, mlp_dim: int, dropout: float = 0.0
    ) -> None:
        super().__init__()
        self.layers = nn.ModuleList(
            nn.ModuleList(
                [
                    Attention(dim, heads=heads, dim_head=dim_head, dropout=dropout),
                    FeedForward(dim, mlp_dim, dropout=dropout),
                ]
            )
            for _ in range(depth)
        )
        self.norm = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for attn, ff in self.layers:
            x = attn(x) + x
            x = ff(x) + x
        return self.norm(x)


class ProjectInOut(nn.Module):
    """Run ``fn`` in another width: Linear in, ``fn``, Linear back (Identity when equal).

    Args:
        dim_in: width of the input and output.
        dim_out: width ``fn`` works in.
        fn: the wrapped module.
    """

    def __init__(self, dim_in: int, dim_out: int, fn: nn.Module) -> None:
        super().__init__()
        self.fn = fn
        need_projection = dim_in != dim_out
        self.project_in = nn.Linear(dim_in, dim_out) if need_projection else nn.Identity()
        self.project_out = nn.Linear(dim_out, dim_in) if need_projection else nn.Identity()

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        return self.project_out(self.fn(self.project_in(x), *args, **kwargs))


class CrossTransformer(nn.Module):
    """``depth`` rounds of class-token cross-attention between the two branches.

    Args:
        sm_dim: width of the small-patch branch.
        lg_dim: width of the large-patch branch.
        depth: rounds.
        heads: attention heads.
        dim_head: per-head width.
        dropout: dropout inside the attention.
    """

    def __init__(
        self, sm_dim: int, lg_dim: int, depth: int, heads: int, dim_head: int, dropout: float
    ) -> None:
        super().__init__()
        self.layers = nn.ModuleList(
            nn.ModuleList(
                [
                    # the small branch's class token attends in the large branch's width
                    ProjectInOut(sm_dim, lg_dim, Attention(lg_dim, heads, dim_head, dropout)),
                    ProjectInOut(lg_dim, sm_dim, Attention(sm_dim, heads, dim_head, dropout)),
                ]
            )
            for _ in range(depth)
        )

    def forward(
        self, sm_tokens: torch.Tensor, lg_tokens: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        sm_cls, sm_patches = sm_tokens[:, :1], sm_tokens[:, 1:]
        lg_cls, lg_patches = lg_tokens[:, :1], lg_tokens[:, 1:]
        for sm_attend_lg, lg_attend_sm in self.layers:
            sm_cls = sm_attend_lg(sm_cls, context=lg_patches, kv_include_self=True) + sm_cls
            lg_cls = lg_attend_sm(lg_cls, context=sm_patches, kv_include_self=True) + lg_cls
        return torch.cat((sm_cls, sm_patches), dim=1), torch.cat((lg_cls, lg_patches), dim=1)


class MultiScaleEncoder(nn.Module):
    """``depth`` blocks of (small-branch transformer, large-branch transformer, cross-attention).

    Args:
        depth: number of multi-scale blocks.
        sm_dim: width of the small-patch branch.
        lg_dim: width of the large-patch branch.
        sm_enc_params: ``depth``, ``heads``, ``mlp_dim``, ``dim_head`` of the
            small-branch transformer.
        lg_enc_params: the same for the large branch.
        cross_attn_heads: heads of the cross-attention.
        cross_attn_depth: cross-attention rounds per block.
        cross_attn_dim_head: per-head width of the cross-attention.
        dropout: dropout inside the blocks.
    """

    def __init__(
        self,
        *,
        depth: int,
        sm_dim: int,
        lg_dim: int,
        sm_enc_params: dict[str, int],
        lg_enc_params: dict[str, int],
        cross_attn_heads: int,
        cross_attn_depth: int,
        cross_attn_dim_head: int = 64,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        self.layers = nn.ModuleList(
            nn.ModuleList(
                [
                    Transformer(dim=sm_dim, dropout=dropout, **sm_enc_params),
                    Transformer(dim=lg_dim, dropout=dropout, **lg_enc_params),
                    CrossTransformer(
                        sm_dim=sm_dim,
                        lg_dim=lg_dim,
                        depth=cross_attn_depth,
                        heads=cross_attn_heads,
                        dim_head=cross_attn_dim_head,
                        dropout=dropout,
                    ),
                ]
            )
            for _ in range(depth)
        )

    def forward(
        self, sm_tokens: torch.Tensor, lg_tokens: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        for sm_enc, lg_enc, cross_attend in self.layers:
            sm_tokens, lg_tokens = cross_attend(sm_enc(sm_tokens), lg_enc(lg_tokens))
        return sm_tokens, lg_tokens


class ImageEmbedder(nn.Module):
    """Patches -> LayerNorm, Linear, LayerNorm; class token prepended, positions added.

    Args:
        dim: token width.
        image_size: image side (square).
        patch_size: patch side; must divide image_size.
        dropout: dropout on the embedded tokens.
        channels: image channels.
    """

    def __init__(
        self, *, dim: int, image_size: int, patch_size: int, dropout: float = 0.0, channels: int = 3
    ) -> None:
        super().__init__()
        num_patches = (image_size // patch_size) ** 2
        patch_dim = channels * patch_size**2

        self.to_patch_embedding = nn.Sequential(
            Rearrange("b c (h p1) (w p2) -> b (h w) (p1 p2 c)", p1=patch_size, p2=patch_size),
            nn.LayerNorm(patch_dim),
            nn.Linear(patch_dim, dim),
            nn.LayerNorm(dim),
        )
        self.pos_embedding = nn.Parameter(torch.randn(1, num_patches + 1, dim))
        self.cls_token = nn.Parameter(torch.randn(1, 1, dim))
        self.dropout = nn.Dropout(dropout)

    def forward(self, img: torch.Tensor) -> torch.Tensor:
        x = self.to_patch_embedding(img)  # b n d
        cls_tokens = repeat(self.cls_token, "1 n d -> b n d", b=x.shape[0])
        x = torch.cat((cls_tokens, x), dim=1)
        return self.dropout(x + self.pos_embedding[:, : x.shape[1]])


class CrossViT(nn.Module):
    """Dual-branch (small and large patch) vision transformer; the two heads' logits are summed.

    Args:
        image_size: image side (square images only).
        num_classes: classes of each head (LayerNorm + Linear).
        sm_dim: width of the small-patch branch.
        lg_dim: width of the large-patch branch.
        sm_patch_size: small patch side; must divide image_size.
        sm_enc_depth: small-branch transformer blocks per multi-scale block.
        sm_enc_heads: small-branch attention heads.
        sm_enc_mlp_dim: small-branch feed-forward hidden width.
        sm_enc_dim_head: small-branch per-head width.
        lg_patch_size: large patch side; must divide image_size.
        lg_enc_depth: large-branch transformer blocks per multi-scale block.
        lg_enc_heads: large-branch attention heads.
        lg_enc_mlp_dim: large-branch feed-forward hidden width.
        lg_enc_dim_head: large-branch per-head width.
        cross_attn_depth: cross-attention rounds per multi-scale block.
        cross_attn_heads: cross-attention heads.
        cross_attn_dim_head: cross-attention per-head width.
        depth: multi-scale blocks.
        dropout: dropout inside the transformers.
        emb_dropout: dropout on the embedded tokens.
        channels: image channels.
    """

    def __init__(
        self,
        *,
        image_size: int,
        num_classes: int,
        sm_dim: int,
        lg_dim: int,
        sm_patch_size: int = 12,
        sm_enc_depth: int = 1,
        sm_enc_heads: int = 8,
        sm_enc_mlp_dim: int = 2048,
        sm_enc_dim_head: int = 64,
        lg_patch_size: int = 16,
        lg_enc_depth: int = 4,
        lg_enc_heads: int = 8,
        lg_enc_mlp_dim: int = 2048,
        lg_enc_dim_head: int = 64,
        cross_attn_depth: int = 2,
        cross_attn_heads: int = 8,
        cross_attn_dim_head: int = 64,
        depth: int = 3,
        dropout: float = 0.1,
        emb_dropout: float = 0.1,
        channels: int = 3,
    ) -> None:
        super().__init__()
        name = type(self).__name__
        image_size = check_square_size(name, "image_size", image_size)
        sm_patch_size = check_square_size(name, "sm_patch_size", sm_patch_size)
        lg_patch_size = check_square_size(name, "lg_patch_size", lg_patch_size)
        for patch_name, patch in (
            ("sm_patch_size", sm_patch_size),
            ("lg_patch_size", lg_patch_size),
        ):
            check_divisible(name, pair(image_size), pair(patch), patch_name=patch_name)
        check_ints(
            name,
            num_classes=num_classes,
            sm_dim=sm_dim,
            lg_dim=lg_dim,
            sm_enc_depth=sm_enc_depth,
            sm_enc_heads=sm_enc_heads,
            sm_enc_mlp_dim=sm_enc_mlp_dim,
            sm_enc_dim_head=sm_enc_dim_head,
            lg_enc_depth=lg_enc_depth,
            lg_enc_heads=lg_enc_heads,
            lg_enc_mlp_dim=lg_enc_mlp_dim,
            lg_enc_dim_head=lg_enc_dim_head,
            cross_attn_depth=cross_attn_depth,
            cross_attn_heads=cross_attn_heads,
            cross_attn_dim_head=cross_attn_dim_head,
            depth=depth,
            channels=channels,
        )
        check_prob(name, "dropout", dropout)
        check_prob(name, "emb_dropout", emb_dropout)
        self.channels = channels
        self.patch_sizes = (sm_patch_size, lg_patch_size)

        self.sm_image_embedder = ImageEmbedder(
            dim=sm_dim,
            channels=channels,
            image_size=image_size,
            patch_size=sm_patch_size,
            dropout=emb_dropout,
        )
        self.lg_image_embedder = ImageEmbedder(
            dim=lg_dim,
            channels=channels,
            image_size=image_size,
            patch_size=lg_patch_size,
            dropout=emb_dropout,
        )
        self.multi_scale_encoder = MultiScaleEncoder(
            depth=depth,
            sm_dim=sm_dim,
            lg_dim=lg_dim,
            cross_attn_heads=cross_attn_heads,
            cross_attn_dim_head=cross_attn_dim_head,
            cross_attn_depth=cross_attn_depth,
            sm_enc_params=dict(
                depth=sm_enc_depth,
                heads=sm_enc_heads,
                mlp_dim=sm_enc_mlp_dim,
                dim_head=sm_enc_dim_head,
            ),
            lg_enc_params=dict(
                depth=lg_enc_depth,
                heads=lg_enc_heads,
                mlp_dim=lg_enc_mlp_dim,
                dim_head=lg_enc_dim_head,
            ),
            dropout=dropout,
        )
        self.sm_mlp_head = nn.Sequential(nn.LayerNorm(sm_dim), nn.Linear(sm_dim, num_classes))
        self.lg_mlp_head = nn.Sequential(nn.LayerNorm(lg_dim), nn.Linear(lg_dim, num_classes))

    def forward(self, img: torch.Tensor) -> torch.Tensor:
        name = type(self).__name__
        branches = (
            ("sm_patch_size", self.patch_sizes[0], self.sm_image_embedder),
            ("lg_patch_size", self.patch_sizes[1], self.lg_image_embedder),
        )
        for patch_name, patch, embedder in branches:
            check_images(
                name,
                img,
                channels=self.channels,
                patch_size=pair(patch),
                patch_name=patch_name,
                max_patches=embedder.pos_embedding.shape[1] - 1,
            )
        sm_tokens, lg_tokens = self.multi_scale_encoder(
            self.sm_image_embedder(img), self.lg_image_embedder(img)
        )
        return self.sm_mlp_head(sm_tokens[:, 0]) + self.lg_mlp_head(lg_tokens[:, 0])


def _crossvit(sm_dim: int, lg_dim: int, heads: int) -> dict[str, Any]:
    return dict(
        image_size=240,
        num_classes=1000,
        sm_dim=sm_dim,
        lg_dim=lg_dim,
        sm_patch_size=12,
        sm_enc_depth=1,
        sm_enc_heads=heads,
        sm_enc_mlp_dim=4 * sm_dim,
        sm_enc_dim_head=sm_dim // heads,
        lg_patch_size=16,
        lg_enc_depth=4,
        lg_enc_heads=heads,
        lg_enc_mlp_dim=4 * lg_dim,
        lg_enc_dim_head=lg_dim // heads,
        cross_attn_depth=1,
        cross_attn_heads=heads,
        cross_attn_dim_head=lg_dim // heads,
        depth=3,
        dropout=0.0,
        emb_dropout=0.0,
    )


_CROSSVIT_NOTE = (
    "Three multi-scale blocks of (1 small-branch block, 4 large-branch blocks, 1 cross-attention), "
    "MLP ratio 4, image 240 with patches 12 and 16, no dropout (the paper uses drop-path). "
    "Deviations forced by vit-pytorch's layout: one image size for both branches (the paper "
    "resizes to 224 for the large branch: 15x15 instead of 14x14 large patches here); one "
    "cross-attention head width for both directions, taken as lg_dim // heads (the paper's "
    "small-width cross-attention uses sm_dim // heads); plain Linear class-token projections "
    "(the paper: LayerNorm, GELU, Linear); LayerNorms around the patch projection."
)

CONFIGS: dict[str, Callable[..., nn.Module]] = {
    "crossvit_ti": named_config(
        CrossViT,
        f"CrossViT-Ti (Chen et al. 2021): widths 96 / 192, 3 heads. {_CROSSVIT_NOTE}",
        **_crossvit(96, 192, 3),
    ),
    "crossvit_s": named_config(
        CrossViT,
        f"CrossViT-S (Chen et al. 2021): widths 192 / 384, 6 heads. {_CROSSVIT_NOTE}",
        **_crossvit(192, 384, 6),
    ),
    "crossvit_b": named_config(
        CrossViT,
        f"CrossViT-B (Chen et al. 2021): widths 384 / 768, 12 heads. {_CROSSVIT_NOTE}",
        **_crossvit(384, 768, 12),
    ),
}
