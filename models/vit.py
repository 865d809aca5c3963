"""ViT (Dosovitskiy et al. 2021) in the layout of lucidrains vit-pytorch 1.26.x ``vit.py``.

Constructor signatures and parameter names are those of vit-pytorch, so a
vit-pytorch ``ViT.state_dict()`` loads here with ``strict=True`` and gives the
same outputs. Every block is pre-norm: the LayerNorm sits inside ``Attention``
and ``FeedForward``; the patch embedding is LayerNorm, Linear, LayerNorm on
patches flattened in (p1 p2 c) order; the transformer ends in a LayerNorm.

This module also holds the argument checks and the factory helper that the
other families of this file set (deepvit, cait, crossvit, pit, distill) share.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from einops import rearrange
from einops.layers.torch import Rearrange
from torch import nn

from vitkernels.tokens import embed_tokens

__all__ = ["CONFIGS", "Attention", "FeedForward", "Transformer", "ViT"]


# ----------------------------------------------------------------------------
# argument checks shared by the families of this file set


def pair(value: int | tuple[int, int]) -> tuple[int, int]:
    """``7 -> (7, 7)``; a pair is returned as it is."""
    return value if isinstance(value, tuple) else (value, value)


def check_int(model: str, name: str, value: Any, *, minimum: int = 1) -> None:
    """Raise ValueError unless ``value`` is an int >= ``minimum``."""
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{model}: {name}={value!r}; expected an int >= {minimum}")


def check_ints(model: str, **values: Any) -> None:
    """``check_int`` for every keyword: ``check_ints("ViT", dim=dim, depth=depth)``."""
    for name, value in values.items():
        check_int(model, name, value)


def check_size(model: str, name: str, value: Any) -> tuple[int, int]:
    """An image or patch size: a positive int or a pair of positive ints."""
    size = pair(value)
    if len(size) != 2 or any(isinstance(s, bool) or not isinstance(s, int) or s < 1 for s in size):
        raise ValueError(
            f"{model}: {name}={value!r}; expected a positive int or a pair of positive ints"
        )
    return size


def check_square_size(model: str, name: str, value: Any) -> int:
    """An image or patch size for a model that only handles squares: a positive int."""
    if isinstance(value, tuple) and len(value) == 2 and value[0] == value[1]:
        value = value[0]
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(
            f"{model}: {name}={value!r}; expected a positive int (this model is square only)"
        )
    return value


def check_divisible(
    model: str,
    image_size: tuple[int, int],
    patch_size: tuple[int, int],
    *,
    image_name: str = "image_size",
    patch_name: str = "patch_size",
) -> None:
    """Raise ValueError unless both image sides are multiples of the patch sides."""
    if image_size[0] % patch_size[0] or image_size[1] % patch_size[1]:
        raise ValueError(
            f"{model}: {image_name}={_fmt(image_size)} is not divisible by "
            f"{patch_name}={_fmt(patch_size)}; expected each image side to be a multiple of "
            f"the patch side (e.g. {image_name}={_fmt(_round_up(image_size, patch_size))})"
        )


def check_pool(model: str, pool: Any) -> None:
    if pool not in ("cls", "mean"):
        raise ValueError(f"{model}: pool={pool!r}; expected 'cls' or 'mean'")


def check_prob(model: str, name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= 1:
        raise ValueError(f"{model}: {name}={value!r}; expected a probability in [0, 1]")


def check_probs(model: str, **values: Any) -> None:
    """``check_prob`` for every keyword."""
    for name, value in values.items():
        check_prob(model, name, value)


def check_images(
    model: str,
    img: torch.Tensor,
    *,
    channels: int,
    patch_size: tuple[int, int],
    max_patches: int,
    stride: tuple[int, int] | None = None,
    square: bool = False,
    patch_name: str = "patch_size",
) -> None:
    """Check a batch of images before it is cut into patches.

    Accepts what the model computes sensibly: ``channels`` channels, sides that
    are multiples of the patch sides (for non-overlapping patches, ``stride``
    None) or at least a patch (overlapping patches), and no more patches than
    the positional embedding covers (vit-pytorch uses the first entries for
    smaller images).
    """
    if img.ndim != 4:
        raise ValueError(
            f"{model}: images of shape {tuple(img.shape)}; expected (batch, {channels}, height, "
            f"width)"
        )
    c, h, w = img.shape[1:]
    if c != channels:
        raise ValueError(
            f"{model}: images with {c} channels (shape {tuple(img.shape)}); expected "
            f"channels={channels} as configured (build the model with channels={c} or convert "
            f"the images)"
        )
    if square and h != w:
        raise ValueError(f"{model}: image size {h}x{w}; expected a square image")
    if stride is None:
        if h % patch_size[0] or w % patch_size[1]:
            raise ValueError(
                f"{model}: image size {h}x{w} is not divisible by "
                f"{patch_name}={_fmt(patch_size)}; "
                f"expected each side to be a multiple of the patch side (resize or pad the images)"
            )
        grid = (h // patch_size[0], w // patch_size[1])
    else:
        if h < patch_size[0] or w < patch_size[1]:
            raise ValueError(
                f"{model}: image size {h}x{w} is smaller than {patch_name}={_fmt(patch_size)}; "
                f"expected at least one patch"
            )
        grid = ((h - patch_size[0]) // stride[0] + 1, (w - patch_size[1]) // stride[1] + 1)
    n = grid[0] * grid[1]
    if n > max_patches:
        raise ValueError(
            f"{model}: image size {h}x{w} gives {n} patches but the positional embedding "
            f"covers {max_patches}; expected images no larger than the configured image_size"
        )


def _fmt(size: tuple[int, int]) -> str:
    return str(size[0]) if size[0] == size[1] else f"{size[0]}x{size[1]}"


def _round_up(size: tuple[int, int], mult: tuple[int, int]) -> tuple[int, int]:
    return (-(-size[0] // mult[0]) * mult[0], -(-size[1] // mult[1]) * mult[1])


def named_config(
    cls: Callable[..., nn.Module], doc: str, **defaults: Any
) -> Callable[..., nn.Module]:
    """A factory ``(**overrides) -> cls(**{**defaults, **overrides})`` with a docstring."""

    def factory(**overrides: Any) -> nn.Module:
        return cls(**{**defaults, **overrides})

    factory.__doc__ = f"{doc}\n\nDefaults: {defaults}"
    return factory


# ----------------------------------------------------------------------------
# blocks


class FeedForward(nn.Module):
    """Pre-norm MLP: LayerNorm, Linear, GELU, Dropout, Linear, Dropout.

    Args:
        dim: token width in and out.
        hidden_dim: hidden width.
        dropout: dropout after the activation and after the output projection.
    """

    def __init__(self, dim: int, hidden_dim: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.LayerNorm(dim),
            nn.Linear(dim, hidden_dim),
            nn.GELU(),
            nn.Dropout(dropout),
            nn.Linear(hidden_dim, dim),
            nn.Dropout(dropout),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class Attention(nn.Module):
    """Pre-norm multi-head self-attention with a fused, bias-free qkv projection.

    Args:
        dim: token width in and out.
        heads: number of heads.
        dim_head: per-head width; the inner width is ``heads * dim_head``.
        dropout: dropout on the attention matrix and after the output projection.

    With one head of width ``dim`` the output projection is left out (Identity),
    as in vit-pytorch.
    """

    def __init__(self, dim: int, heads: int = 8, dim_head: int = 64, dropout: float = 0.0) -> None:
        super().__init__()
        inner_dim = heads * dim_head
        project_out = not (heads == 1 and dim_head == dim)

        self.heads = heads
        self.scale = dim_head**-0.5

        self.norm = nn.LayerNorm(dim)
        self.attend = nn.Softmax(dim=-1)
        self.dropout = nn.Dropout(dropout)
        self.to_qkv = nn.Linear(dim, inner_dim * 3, bias=False)
        self.to_out = (
            nn.Sequential(nn.Linear(inner_dim, dim), nn.Dropout(dropout))
            if project_out
            else nn.Identity()
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.norm(x)
        q, k, v = (
            rearrange(t, "b n (h d) -> b h n d", h=self.heads)
            for t in self.to_qkv(x).chunk(3, dim=-1)
        )
        attn = self.attend(torch.matmul(q, k.transpose(-1, -2)) * self.scale)  # b h n n
        out = torch.matmul(self.dropout(attn), v)
        return self.to_out(rearrange(out, "b h n d -> b n (h d)"))


class ResidualStack(nn.Module):
    """``depth`` residual (attention, FeedForward) pairs, no final norm; the attention
    class is ``attention_cls`` (subclasses set it: DeepViT re-attention, PiT plain).

    Args:
        dim: token width.
        depth: number of blocks.
        heads: attention heads per block.
        dim_head: per-head width.
        mlp_dim: feed-forward hidden width.
        dropout: dropout inside the blocks.
    """

    attention_cls: type[nn.Module]

    def __init__(
        self, dim: int, depth: int, heads: int, dim_head: int, mlp_dim: int, dropout: float = 0.0
    ) -> None:
        super().__init__()
        self.layers = nn.ModuleList(
            nn.ModuleList(
                [
                    self.attention_cls(dim, heads=heads, dim_head=dim_head, dropout=dropout),
                    FeedForward(dim, mlp_dim, dropout=dropout),
                ]
            )
            for _ in range(depth)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for attn, ff in self.layers:
            x = attn(x) + x
            x = ff(x) + x
        return x


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
        self.norm = nn.LayerNorm(dim)
        self.layers = nn.ModuleList(
            nn.ModuleList(
                [
                    Attention(dim, heads=heads, dim_head=dim_head, dropout=dropout),
                    FeedForward(dim, mlp_dim, dropout=dropout),
                ]
            )
            for _ in range(depth)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for attn, ff in self.layers:
            x = attn(x) + x
            x = ff(x) + x
        return self.norm(x)


# ----------------------------------------------------------------------------
# model


class ViT(nn.Module):
    """Vision Transformer.

    Args:
        image_size: image side, or (height, width).
        patch_size: patch side, or (height, width); must divide image_size.
        num_classes: classes of the linear head; 0 leaves the head out and
            ``forward`` returns all tokens (b, n, dim).
        dim: token width.
        depth: transformer blocks.
        heads: attention heads.
        mlp_dim: feed-forward hidden width.
        pool: ``'cls'`` (classify the class token) or ``'mean'`` (mean of all
            tokens; no class token is made).
        channels: image channels.
        dim_head: per-head width.
        dropout: dropout inside the transformer.
        emb_dropout: dropout on the embedded tokens.
    """

    def __init__(
        self,
        *,
        image_size: int | tuple[int, int],
        patch_size: int | tuple[int, int],
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
        image_height, image_width = check_size(name, "image_size", image_size)
        self.patch_size = patch_height, patch_width = check_size(name, "patch_size", patch_size)
        check_divisible(name, (image_height, image_width), self.patch_size)
        check_ints(
            name,
            dim=dim,
            depth=depth,
            heads=heads,
            mlp_dim=mlp_dim,
            channels=channels,
            dim_head=dim_head,
        )
        check_int(name, "num_classes", num_classes, minimum=0)
        check_pool(name, pool)
        check_prob(name, "dropout", dropout)
        check_prob(name, "emb_dropout", emb_dropout)

        num_patches = (image_height // patch_height) * (image_width // patch_width)
        patch_dim = channels * patch_height * patch_width
        num_cls_tokens = 1 if pool == "cls" else 0
        self.channels = channels

        self.to_patch_embedding = nn.Sequential(
            Rearrange("b c (h p1) (w p2) -> b (h w) (p1 p2 c)", p1=patch_height, p2=patch_width),
            nn.LayerNorm(patch_dim),
            nn.Linear(patch_dim, dim),
            nn.LayerNorm(dim),
        )
        self.cls_token = nn.Parameter(torch.randn(num_cls_tokens, dim))  # 1 or 0 tokens
        self.pos_embedding = nn.Parameter(torch.randn(num_patches + num_cls_tokens, dim))
        self.dropout = nn.Dropout(emb_dropout)

        self.transformer = Transformer(dim, depth, heads, dim_head, mlp_dim, dropout)

        self.pool = pool
        self.to_latent = nn.Identity()
        self.mlp_head = nn.Linear(dim, num_classes) if num_classes > 0 else None

    # forward in three steps, so that DistillMixin can put a token in between

    def _embed(self, img: torch.Tensor) -> torch.Tensor:
        """(b, c, H, W) images -> (b, cls + n, dim) tokens with positions added."""
        num_cls = self.cls_token.shape[0]
        check_images(
            type(self).__name__,
            img,
            channels=self.channels,
            patch_size=self.patch_size,
            max_patches=self.pos_embedding.shape[0] - num_cls,
        )
        return embed_tokens(self.to_patch_embedding, img, self.cls_token, self.pos_embedding)

    def _attend(self, x: torch.Tensor) -> torch.Tensor:
        return self.transformer(self.dropout(x))

    def _head(self, x: torch.Tensor) -> torch.Tensor:
        """(b, n, dim) tokens -> (b, num_classes) logits, or the tokens without a head."""
        if self.mlp_head is None:
            return x
        x = x.mean(dim=1) if self.pool == "mean" else x[:, 0]
        return self.mlp_head(self.to_latent(x))

    def forward(self, img: torch.Tensor) -> torch.Tensor:
        return self._head(self._attend(self._embed(img)))


def _vit(**kw: Any) -> dict[str, Any]:
    return dict(image_size=224, patch_size=16, num_classes=1000, dim_head=64, **kw)


CONFIGS: dict[str, Callable[..., nn.Module]] = {
    "vit_b16": named_config(
        ViT,
        "ViT-B/16 (Dosovitskiy et al. 2021): 12 blocks of width 768, 12 heads, MLP 3072.",
        **_vit(dim=768, depth=12, heads=12, mlp_dim=3072),
    ),
}
