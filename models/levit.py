"""LeViT (Graham et al. 2021) in the layout of lucidrains vit-pytorch 1.26.x ``levit.py``.

Constructor signatures and parameter names are those of vit-pytorch, so a
vit-pytorch ``LeViT.state_dict()`` loads here with ``strict=True`` and gives the
same outputs. The model works on (B, C, H, W) feature maps throughout: 1x1
convolutions stand in for the linear layers and BatchNorm2d for their norms.

Named configurations (``CONFIGS``) follow the paper's Table 1 / timm's
``model_cfgs``: stage widths, heads, depths, key dim D = 16 (128S, 128) or 32
(192, 256, 384), value dim 2D (attention ratio 2) and MLP ratio 2. Where
vit-pytorch's architecture cannot express the paper, it keeps vit-pytorch's
choice (so checkpoints stay interchangeable with vit-pytorch, not with timm):

* stem: four plain stride-2 3x3 convolutions 3->32->64->128->dim[0] (the paper
  puts BatchNorm and Hardswish between them);
* attention: GELU before the output projection (paper: Hardswish); the bias
  table is an ``nn.Embedding`` (R*C, heads) added as ``bias / scale`` to the
  scaled logits (the paper adds it directly: a reparametrisation);
* feed-forward: 1x1 conv with bias, Hardswish, 1x1 conv with bias (paper:
  linear + BatchNorm pairs);
* shrink attention between stages: ``2 * heads`` heads of value dim
  ``dim_value`` (paper: ``in_dim // D`` heads of value dim 4D), so levit_128
  and levit_192 get 8 and 6 heads where the paper has 8/16 and 6/9, and every
  shrink block has half the paper's value width; no residual around it;
* head: one Linear on the average-pooled last stage (paper: BatchNorm + Linear)
  and no distillation head unless ``num_distill_classes`` is given.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from math import ceil
from typing import Any

import torch
from einops import rearrange
from einops.layers.torch import Rearrange
from torch import nn

__all__ = ["CONFIGS", "Attention", "FeedForward", "LeViT", "Transformer"]


def _per_stage(name: str, value: int | Sequence[int], stages: int) -> tuple[int, ...]:
    """An int or a sequence of ints, padded with its last entry to ``stages`` entries."""
    vals = tuple(value) if isinstance(value, Sequence) else (value,)
    if not vals or len(vals) > stages:
        raise ValueError(
            f"LeViT: {name}={value!r} gives {len(vals)} values; expected an int or "
            f"1 to stages={stages} values (one per stage)"
        )
    return vals + (vals[-1],) * (stages - len(vals))


class FeedForward(nn.Module):
    """LeViT MLP on feature maps: 1x1 conv, Hardswish, 1x1 conv.

    Args:
        dim: channels in and out.
        mult: hidden channels = dim * mult.
        dropout: dropout after the activation and after the output conv.
    """

    def __init__(self, dim: int, mult: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(dim, dim * mult, 1),
            nn.Hardswish(),
            nn.Dropout(dropout),
            nn.Conv2d(dim * mult, dim, 1),
            nn.Dropout(dropout),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class Attention(nn.Module):
    """LeViT attention with a learned bias per head and relative offset (|dr|, |dc|).

    Args:
        dim: input channels.
        fmap_size: side of the square input feature map (keys sit on this grid).
        heads: number of heads.
        dim_key: per-head query/key dim.
        dim_value: per-head value dim.
        dropout: dropout on the attention matrix and the output.
        dim_out: output channels (default: dim).
        downsample: shrink attention: queries on the grid subsampled by 2
            (a stride-2 1x1 conv), output ceil(fmap_size / 2) on a side.
    """

    def __init__(
        self,
        dim: int,
        fmap_size: int,
        heads: int = 8,
        dim_key: int = 32,
        dim_value: int = 64,
        dropout: float = 0.0,
        dim_out: int | None = None,
        downsample: bool = False,
    ) -> None:
        super().__init__()
        inner_key, inner_value = dim_key * heads, dim_value * heads
        dim_out = dim if dim_out is None else dim_out
        q_stride = 2 if downsample else 1

        self.heads = heads
        self.scale = dim_key**-0.5
        self.fmap_size = fmap_size
        self.q_stride = q_stride

        self.to_q = nn.Sequential(
            nn.Conv2d(dim, inner_key, 1, stride=q_stride, bias=False), nn.BatchNorm2d(inner_key)
        )
        self.to_k = nn.Sequential(
            nn.Conv2d(dim, inner_key, 1, bias=False), nn.BatchNorm2d(inner_key)
        )
        self.to_v = nn.Sequential(
            nn.Conv2d(dim, inner_value, 1, bias=False), nn.BatchNorm2d(inner_value)
        )

        self.attend = nn.Softmax(dim=-1)
        self.dropout = nn.Dropout(dropout)

        out_norm = nn.BatchNorm2d(dim_out)
        nn.init.zeros_(out_norm.weight)  # each block starts as the identity
        self.to_out = nn.Sequential(
            nn.GELU(), nn.Conv2d(inner_value, dim_out, 1), out_norm, nn.Dropout(dropout)
        )

        # bias table (R*C, heads), indexed by |dr| * C + |dc| between query and key
        self.pos_bias = nn.Embedding(fmap_size * fmap_size, heads)
        q_axis = torch.arange(0, fmap_size, step=q_stride)
        k_axis = torch.arange(fmap_size)
        q_pos = torch.stack(torch.meshgrid(q_axis, q_axis, indexing="ij"), dim=-1)
        k_pos = torch.stack(torch.meshgrid(k_axis, k_axis, indexing="ij"), dim=-1)
        q_pos = rearrange(q_pos, "i j c -> (i j) c")
        k_pos = rearrange(k_pos, "i j c -> (i j) c")
        d_row, d_col = (q_pos[:, None, :] - k_pos[None, :, :]).abs().unbind(dim=-1)
        self.register_buffer("pos_indices", d_row * fmap_size + d_col)  # (Nq, Nk)

    def apply_pos_bias(self, dots: torch.Tensor) -> torch.Tensor:
        """Add the relative-position bias to logits (B, H, Nq, Nk)."""
        bias = rearrange(self.pos_bias(self.pos_indices), "i j h -> 1 h i j")
        return dots + bias / self.scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q = self.to_q(x)
        q_side = q.shape[-1]
        q, k, v = (
            rearrange(t, "b (h d) x y -> b h (x y) d", h=self.heads)
            for t in (q, self.to_k(x), self.to_v(x))
        )
        dots = torch.einsum("b h i d, b h j d -> b h i j", q, k) * self.scale
        attn = self.dropout(self.attend(self.apply_pos_bias(dots)))
        out = torch.einsum("b h i j, b h j d -> b h i d", attn, v)
        out = rearrange(out, "b h (x y) d -> b (h d) x y", y=q_side)
        return self.to_out(out)


class Transformer(nn.Module):
    """A LeViT stage: ``depth`` blocks of (attention, feed-forward) on one grid.

    Args:
        dim: input channels.
        fmap_size: side of the square feature map.
        depth: number of blocks.
        heads, dim_key, dim_value: attention shape (see ``Attention``).
        mlp_mult: feed-forward hidden multiple.
        dropout: dropout inside attention and feed-forward.
        dim_out: output channels (default: dim).
        downsample: shrink attention (see ``Attention``).

    The attention residual is used only when the shape is kept (no downsample,
    dim_out == dim); the feed-forward always has one.
    """

    def __init__(
        self,
        dim: int,
        fmap_size: int,
        depth: int,
        heads: int,
        dim_key: int,
        dim_value: int,
        mlp_mult: int = 2,
        dropout: float = 0.0,
        dim_out: int | None = None,
        downsample: bool = False,
    ) -> None:
        super().__init__()
        dim_out = dim if dim_out is None else dim_out
        self.attn_residual = not downsample and dim == dim_out
        self.layers = nn.ModuleList(
            nn.ModuleList(
                [
                    Attention(
                        dim,
                        fmap_size=fmap_size,
                        heads=heads,
                        dim_key=dim_key,
                        dim_value=dim_value,
                        dropout=dropout,
                        dim_out=dim_out,
                        downsample=downsample,
                    ),
                    FeedForward(dim_out, mlp_mult, dropout=dropout),
                ]
            )
            for _ in range(depth)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for attn, ff in self.layers:
            x = attn(x) + x if self.attn_residual else attn(x)
            x = ff(x) + x
        return x


class LeViT(nn.Module):
    """LeViT image classifier (vit-pytorch layout).

    Args:
        image_size: side of the square input image; a multiple of 16 (the stem
            divides it by 16).
        num_classes: classifier outputs.
        dim: channels per stage (int or one per stage).
        depth: blocks per stage (int or one per stage).
        heads: attention heads per stage (int or one per stage); each shrink
            block between stages uses twice its stage's heads.
        mlp_mult: feed-forward hidden multiple inside the stages (shrink blocks
            use 2).
        stages: number of stages.
        dim_key: per-head query/key dim, all stages.
        dim_value: per-head value dim, all stages.
        dropout: dropout inside the stages.
        num_distill_classes: if given, a second Linear head; forward then
            returns (logits, distill_logits).

    Input: (B, 3, image_size, image_size). Output: (B, num_classes).
    """

    def __init__(
        self,
        *,
        image_size: int,
        num_classes: int,
        dim: int | Sequence[int],
        depth: int | Sequence[int],
        heads: int | Sequence[int],
        mlp_mult: int,
        stages: int = 3,
        dim_key: int = 32,
        dim_value: int = 64,
        dropout: float = 0.0,
        num_distill_classes: int | None = None,
    ) -> None:
        super().__init__()
        if stages < 1:
            raise ValueError(f"LeViT: stages={stages}; expected a positive int")
        if image_size < 16 or image_size % 16:
            raise ValueError(
                f"LeViT: image_size={image_size}; expected a positive multiple of 16 "
                "(the stem has four stride-2 convolutions)"
            )
        dims = _per_stage("dim", dim, stages)
        depths = _per_stage("depth", depth, stages)
        stage_heads = _per_stage("heads", heads, stages)
        self.image_size = image_size

        self.conv_embedding = nn.Sequential(  # (B, 3, S, S) -> (B, dims[0], S/16, S/16)
            nn.Conv2d(3, 32, 3, stride=2, padding=1),
            nn.Conv2d(32, 64, 3, stride=2, padding=1),
            nn.Conv2d(64, 128, 3, stride=2, padding=1),
            nn.Conv2d(128, dims[0], 3, stride=2, padding=1),
        )

        fmap_size = image_size // 16
        layers: list[nn.Module] = []
        for i, (stage_dim, stage_depth, h) in enumerate(
            zip(dims, depths, stage_heads, strict=True)
        ):
            layers.append(
                Transformer(
                    stage_dim, fmap_size, stage_depth, h, dim_key, dim_value, mlp_mult, dropout
                )
            )
            if i < stages - 1:
                layers.append(
                    Transformer(
                        stage_dim,
                        fmap_size,
                        1,
                        h * 2,
                        dim_key,
                        dim_value,
                        dim_out=dims[i + 1],
                        downsample=True,
                    )
                )
                fmap_size = ceil(fmap_size / 2)
        self.backbone = nn.Sequential(*layers)

        self.pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), Rearrange("b c 1 1 -> b c"))
        self.distill_head = (
            nn.Linear(dims[-1], num_distill_classes) if num_distill_classes is not None else None
        )
        self.mlp_head = nn.Linear(dims[-1], num_classes)

    def forward(self, img: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        if img.ndim != 4 or img.shape[1] != 3:
            raise ValueError(
                f"LeViT: img has shape {tuple(img.shape)}; expected (batch, 3, "
                f"{self.image_size}, {self.image_size}) (the stem takes 3 channels)"
            )
        if img.shape[-2:] != (self.image_size, self.image_size):
            raise ValueError(
                f"LeViT: img has size {tuple(img.shape[-2:])}; expected image_size="
                f"{self.image_size} ({self.image_size}, {self.image_size}): the position "
                "biases are built for that grid"
            )
        x = self.conv_embedding(img)
        x = self.pool(self.backbone(x))  # (B, dims[-1])
        out = self.mlp_head(x)
        if self.distill_head is not None:
            return out, self.distill_head(x)
        return out


# (dims, heads, depths, key dim) per model, from the paper's Table 1 / timm model_cfgs
_PAPER = {
    "levit_128s": ((128, 256, 384), (4, 6, 8), (2, 3, 4), 16),
    "levit_128": ((128, 256, 384), (4, 8, 12), (4, 4, 4), 16),
    "levit_192": ((192, 288, 384), (3, 5, 6), (4, 4, 4), 32),
    "levit_256": ((256, 384, 512), (4, 6, 8), (4, 4, 4), 32),
    "levit_384": ((384, 512, 768), (6, 9, 12), (4, 4, 4), 32),
}


def _factory(dims: tuple[int, ...], heads: tuple[int, ...], depths: tuple[int, ...], key: int):
    def build(**overrides: Any) -> LeViT:
        kwargs: dict[str, Any] = dict(
            image_size=224,
            num_classes=1000,
            dim=dims,
            depth=depths,
            heads=heads,
            mlp_mult=2,
            stages=3,
            dim_key=key,
            dim_value=2 * key,
        )
        kwargs.update(overrides)
        return LeViT(**kwargs)

    return build


CONFIGS: dict[str, Callable[..., nn.Module]] = {
    name: _factory(*cfg) for name, cfg in _PAPER.items()
}
