"""PiT (Heo et al. 2021) in the layout of lucidrains vit-pytorch 1.26.x ``pit.py``.

Constructor signatures and parameter names are those of vit-pytorch, so a
vit-pytorch ``PiT.state_dict()`` loads here with ``strict=True`` and gives the
same outputs. Overlapping patches (kernel ``patch_size``, stride
``patch_size // 2``) are embedded by one Linear; stages of transformer blocks
are separated by pooling layers that halve the token grid (depthwise 3x3
stride-2 conv, then a 1x1 conv) and double the width (the class token goes
through a Linear).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from math import isqrt
from typing import Any

import torch
from einops import rearrange
from einops.layers.torch import Rearrange
from torch import nn

from .vit import (
    Attention,
    ResidualStack,
    check_divisible,
    check_images,
    check_int,
    check_ints,
    check_prob,
    check_square_size,
    embed_tokens,
    named_config,
    pair,
)

__all__ = ["CONFIGS", "PiT", "Pool"]


def conv_output_size(image_size: int, kernel_size: int, stride: int, padding: int = 0) -> int:
    """Side of a convolution's output."""
    return (image_size - kernel_size + 2 * padding) // stride + 1


class Transformer(ResidualStack):
    """``depth`` residual (Attention, FeedForward) pairs; no final norm."""

    attention_cls = Attention

class DepthWiseConv2d(nn.Module):
    """Depthwise conv (``groups=dim_in``) followed by a pointwise 1x1 conv.

    Args:
        dim_in: input channels.
        dim_out: output channels (a multiple of dim_in).
        kernel_size: depthwise kernel.
        padding: depthwise padding.
        stride: depthwise stride.
        bias: biases on both convs.
    """

    def __init__(
        self,
        dim_in: int,
        dim_out: int,
        kernel_size: int,
        padding: int,
        stride: int,
        bias: bool = True,
    ) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(
                dim_in,
                dim_out,
                kernel_size=kernel_size,
                padding=padding,
                groups=dim_in,
                stride=stride,
                bias=bias,
            ),
            nn.Conv2d(dim_out, dim_out, kernel_size=1, bias=bias),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class Pool(nn.Module):
    """Halve the (square) token grid and double the width; the class token goes through a Linear.

    Args:
        dim: input width; the output width is ``2 * dim``.
    """

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.downsample = DepthWiseConv2d(dim, dim * 2, kernel_size=3, stride=2, padding=1)
        self.cls_ff = nn.Linear(dim, dim * 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        cls_token, tokens = x[:, :1], x[:, 1:]
        side = isqrt(tokens.shape[1])
        tokens = rearrange(tokens, "b (h w) c -> b c h w", h=side)
        tokens = rearrange(self.downsample(tokens), "b c h w -> b (h w) c")
        return torch.cat((self.cls_ff(cls_token), tokens), dim=1)


class PiT(nn.Module):
    """Pooling-based vision transformer.

    Args:
        image_size: image side (square images only); must be a multiple of patch_size.
        patch_size: patch side; patches overlap with stride ``patch_size // 2``.
        num_classes: classes of the head (LayerNorm + Linear).
        dim: width of the first stage; doubles at every pooling.
        depth: blocks per stage, a tuple (one stage per entry).
        heads: attention heads, one int for every stage or one per stage.
        mlp_dim: feed-forward hidden width, the same in every stage.
        dim_head: per-head width, the same in every stage.
        dropout: dropout inside the transformers.
        emb_dropout: dropout on the embedded tokens.
        channels: image channels.
    """

    def __init__(
        self,
        *,
        image_size: int,
        patch_size: int,
        num_classes: int,
        dim: int,
        depth: tuple[int, ...],
        heads: int | tuple[int, ...],
        mlp_dim: int,
        dim_head: int = 64,
        dropout: float = 0.0,
        emb_dropout: float = 0.0,
        channels: int = 3,
    ) -> None:
        super().__init__()
        name = type(self).__name__
        image_size = check_square_size(name, "image_size", image_size)
        patch_size = check_square_size(name, "patch_size", patch_size)
        check_divisible(name, pair(image_size), pair(patch_size))
        if patch_size < 2:
            raise ValueError(f"{name}: patch_size={patch_size}; expected >= 2 (stride is half)")
        if not isinstance(depth, Sequence) or not depth:
            raise ValueError(
                f"{name}: depth={depth!r}; expected a non-empty tuple of blocks per stage, "
                f"e.g. (2, 6, 4)"
            )
        for stage, stage_depth in enumerate(depth):
            check_int(name, f"depth[{stage}]", stage_depth)
        heads = tuple(heads) if isinstance(heads, Sequence) else (heads,) * len(depth)
        if len(heads) != len(depth):
            raise ValueError(
                f"{name}: heads={heads!r} has {len(heads)} entries but depth={tuple(depth)!r} has "
                f"{len(depth)} stages; expected one int or one entry per stage"
            )
        for stage, stage_heads in enumerate(heads):
            check_int(name, f"heads[{stage}]", stage_heads)
        check_ints(
            name,
            num_classes=num_classes,
            dim=dim,
            mlp_dim=mlp_dim,
            dim_head=dim_head,
            channels=channels,
        )
        check_prob(name, "dropout", dropout)
        check_prob(name, "emb_dropout", emb_dropout)

        patch_dim = channels * patch_size**2
        self.channels = channels
        self.patch_size = patch_size

        self.to_patch_embedding = nn.Sequential(
            nn.Unfold(kernel_size=patch_size, stride=patch_size // 2),  # b (c p1 p2) n
            Rearrange("b c n -> b n c"),
            nn.Linear(patch_dim, dim),
        )
        output_size = conv_output_size(image_size, patch_size, patch_size // 2)
        self.pos_embedding = nn.Parameter(torch.randn(1, output_size**2 + 1, dim))
        self.cls_token = nn.Parameter(torch.randn(1, 1, dim))
        self.dropout = nn.Dropout(emb_dropout)

        layers: list[nn.Module] = []
        for stage, (stage_depth, stage_heads) in enumerate(zip(depth, heads, strict=True)):
            layers.append(Transformer(dim, stage_depth, stage_heads, dim_head, mlp_dim, dropout))
            if stage < len(depth) - 1:
                layers.append(Pool(dim))
                dim *= 2
        self.layers = nn.Sequential(*layers)

        self.mlp_head = nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, num_classes))

    def forward(self, img: torch.Tensor) -> torch.Tensor:
        check_images(
            type(self).__name__,
            img,
            channels=self.channels,
            patch_size=pair(self.patch_size),
            stride=pair(self.patch_size // 2),
            max_patches=self.pos_embedding.shape[1] - 1,
            square=True,
        )
        x = embed_tokens(self.to_patch_embedding, img, self.cls_token, self.pos_embedding)
        x = self.layers(self.dropout(x))
        return self.mlp_head(x[:, 0])


def _pit(**kw: Any) -> dict[str, Any]:
    return dict(image_size=224, num_classes=1000, **kw)


_PIT_NOTE = (
    "Stage widths, heads and head width as in the paper. Deviations forced by vit-pytorch's "
    "layout: one MLP width for all stages, set to 4x the middle stage's width (the paper: 4x "
    "each stage's width, so the first stage's MLP is twice and the last stage's half the "
    "paper's); this keeps the multiply-adds within ~5% of the paper's at 224 px while the "
    "parameters come to ~81% of them (4x the last stage's width would match parameters but "
    "cost ~30% more compute). Pooling adds a 1x1 conv after the depthwise 3x3 conv (the "
    "paper: depthwise only); no qkv bias; no distillation token."
)

CONFIGS: dict[str, Callable[..., nn.Module]] = {
    "pit_ti": named_config(
        PiT,
        f"PiT-Ti (Heo et al. 2021): patch 16 (stride 8), depths (2, 6, 4), widths 64/128/256, "
        f"heads (2, 4, 8) of width 32. {_PIT_NOTE}",
        **_pit(patch_size=16, dim=64, depth=(2, 6, 4), heads=(2, 4, 8), dim_head=32, mlp_dim=512),
    ),
    "pit_s": named_config(
        PiT,
        f"PiT-S (Heo et al. 2021): patch 16 (stride 8), depths (2, 6, 4), widths 144/288/576, "
        f"heads (3, 6, 12) of width 48. {_PIT_NOTE}",
        **_pit(
            patch_size=16, dim=144, depth=(2, 6, 4), heads=(3, 6, 12), dim_head=48, mlp_dim=1152
        ),
    ),
    "pit_b": named_config(
        PiT,
        f"PiT-B (Heo et al. 2021): patch 14 (stride 7), depths (3, 6, 4), widths 256/512/1024, "
        f"heads (4, 8, 16) of width 64, as in the paper (not patch 16 and depths (2, 6, 4) like "
        f"the smaller models). {_PIT_NOTE}",
        **_pit(
            patch_size=14, dim=256, depth=(3, 6, 4), heads=(4, 8, 16), dim_head=64, mlp_dim=2048
        ),
    ),
}
