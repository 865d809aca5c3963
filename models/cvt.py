"""CvT (Wu et al. 2021) in the layout of lucidrains vit-pytorch 1.26.x ``cvt.py``.

Constructor signatures and parameter names are those of vit-pytorch, so a
vit-pytorch ``CvT.state_dict()`` loads here with ``strict=True`` and gives the
same outputs. Three stages, each a convolutional token embedding (strided conv
+ channel LayerNorm) and a Transformer whose q/k/v projections are depthwise
separable convolutions (keys and values on a grid subsampled by
``kv_proj_stride``). The model works on (B, C, H, W) maps throughout.

Named configurations (``CONFIGS``) are the paper's CvT-13 and CvT-21 (Table 2):
embedding kernels 7/3/3 with strides 4/2/2, widths 64/192/384, heads 1/3/6
(64 dims per head), MLP ratio 4, depths 1/2/10 and 1/4/16. vit-pytorch's
architecture differs from the paper (and the official code) in ways the
configurations cannot change:

* embedding convolutions pad ``kernel // 2`` (3 for the 7x7 stem; paper: 2),
  so the stage-1 grid is 56 at 224 either way but the borders differ;
* no cls token in stage 3: the classifier is average pooling + Linear (paper:
  cls token, final LayerNorm, Linear);
* the q/k/v projections are depthwise conv + BatchNorm + pointwise conv
  without bias (the paper's depthwise conv + BN followed by a Linear);
* no stochastic depth.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from einops import rearrange
from einops.layers.torch import Rearrange
from torch import nn

__all__ = ["CONFIGS", "Attention", "CvT", "DepthWiseConv2d", "FeedForward", "LayerNorm"]


class LayerNorm(nn.Module):
    """LayerNorm over the channel dim of a (B, C, H, W) map (biased variance).

    Args:
        dim: channels C.
        eps: added to the variance.
    """

    def __init__(self, dim: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.eps = eps
        self.g = nn.Parameter(torch.ones(1, dim, 1, 1))
        self.b = nn.Parameter(torch.zeros(1, dim, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        var = torch.var(x, dim=1, unbiased=False, keepdim=True)
        mean = torch.mean(x, dim=1, keepdim=True)
        return (x - mean) / (var + self.eps).sqrt() * self.g + self.b


class FeedForward(nn.Module):
    """Pre-norm MLP on maps: channel LayerNorm, 1x1 conv, GELU, 1x1 conv.

    Args:
        dim: channels in and out.
        mult: hidden channels = dim * mult.
        dropout: dropout after the activation and after the output conv.
    """

    def __init__(self, dim: int, mult: int = 4, dropout: float = 0.0) -> None:
        super().__init__()
        self.net = nn.Sequential(
            LayerNorm(dim),
            nn.Conv2d(dim, dim * mult, 1),
            nn.GELU(),
            nn.Dropout(dropout),
            nn.Conv2d(dim * mult, dim, 1),
            nn.Dropout(dropout),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class DepthWiseConv2d(nn.Module):
    """Depthwise conv, BatchNorm, pointwise conv.

    Args:
        dim_in: input channels (the depthwise conv keeps them).
        dim_out: output channels of the pointwise conv.
        kernel_size, padding, stride: of the depthwise conv.
        bias: bias on both convolutions.
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
                dim_in,
                kernel_size=kernel_size,
                padding=padding,
                groups=dim_in,
                stride=stride,
                bias=bias,
            ),
            nn.BatchNorm2d(dim_in),
            nn.Conv2d(dim_in, dim_out, kernel_size=1, bias=bias),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class Attention(nn.Module):
    """Convolutional-projection attention: queries on the full grid, keys and
    values on the grid subsampled by ``kv_proj_stride``.

    Args:
        dim: channels in and out.
        proj_kernel: depthwise kernel of the q/k/v projections (padding kernel // 2).
        kv_proj_stride: stride of the k/v projection.
        heads: number of heads.
        dim_head: per-head dim.
        dropout: dropout on the attention matrix and the output.
    """

    def __init__(
        self,
        dim: int,
        proj_kernel: int,
        kv_proj_stride: int,
        heads: int = 8,
        dim_head: int = 64,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        inner_dim = dim_head * heads
        padding = proj_kernel // 2
        self.heads = heads
        self.scale = dim_head**-0.5

        self.norm = LayerNorm(dim)
        self.attend = nn.Softmax(dim=-1)
        self.dropout = nn.Dropout(dropout)

        self.to_q = DepthWiseConv2d(
            dim, inner_dim, proj_kernel, padding=padding, stride=1, bias=False
        )
        self.to_kv = DepthWiseConv2d(
            dim, inner_dim * 2, proj_kernel, padding=padding, stride=kv_proj_stride, bias=False
        )
        self.to_out = nn.Sequential(nn.Conv2d(inner_dim, dim, 1), nn.Dropout(dropout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        side = x.shape[-1]
        x = self.norm(x)
        q, k, v = (self.to_q(x), *self.to_kv(x).chunk(2, dim=1))
        q, k, v = (rearrange(t, "b (h d) x y -> (b h) (x y) d", h=self.heads) for t in (q, k, v))
        dots = torch.einsum("b i d, b j d -> b i j", q, k) * self.scale
        attn = self.dropout(self.attend(dots))
        out = torch.einsum("b i j, b j d -> b i d", attn, v)
        out = rearrange(out, "(b h) (x y) d -> b (h d) x y", h=self.heads, y=side)
        return self.to_out(out)


class Transformer(nn.Module):
    """``depth`` pre-norm blocks of (attention, feed-forward), both residual.

    Args:
        dim: channels.
        proj_kernel, kv_proj_stride: attention projections (see ``Attention``).
        depth: number of blocks.
        heads, dim_head: attention shape.
        mlp_mult: feed-forward hidden multiple.
        dropout: dropout inside attention and feed-forward.
    """

    def __init__(
        self,
        dim: int,
        proj_kernel: int,
        kv_proj_stride: int,
        depth: int,
        heads: int,
        dim_head: int = 64,
        mlp_mult: int = 4,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        self.layers = nn.ModuleList(
            nn.ModuleList(
                [
                    Attention(
                        dim,
                        proj_kernel=proj_kernel,
                        kv_proj_stride=kv_proj_stride,
                        heads=heads,
                        dim_head=dim_head,
                        dropout=dropout,
                    ),
                    FeedForward(dim, mlp_mult, dropout=dropout),
                ]
            )
            for _ in range(depth)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for attn, ff in self.layers:
            x = attn(x) + x
            x = ff(x) + x
        return x


_STAGE_KEYS = (
    "emb_dim",
    "emb_kernel",
    "emb_stride",
    "proj_kernel",
    "kv_proj_stride",
    "heads",
    "depth",
    "mlp_mult",
)


class CvT(nn.Module):
    """CvT image classifier (vit-pytorch layout).

    Args:
        num_classes: classifier outputs.
        s{i}_emb_dim: channels of stage i.
        s{i}_emb_kernel, s{i}_emb_stride: token-embedding conv of stage i
            (padding kernel // 2).
        s{i}_proj_kernel: depthwise kernel of stage i's q/k/v projections.
        s{i}_kv_proj_stride: stride of stage i's k/v projection.
        s{i}_heads: attention heads of stage i (64 dims per head).
        s{i}_depth: blocks in stage i.
        s{i}_mlp_mult: feed-forward hidden multiple of stage i.
        dropout: dropout inside the Transformers.
        channels: input image channels.

    Input: (B, channels, H, W), any H, W the strides allow. Output: (B, num_classes).
    The defaults are CvT-13.
    """

    def __init__(
        self,
        *,
        num_classes: int,
        s1_emb_dim: int = 64,
        s1_emb_kernel: int = 7,
        s1_emb_stride: int = 4,
        s1_proj_kernel: int = 3,
        s1_kv_proj_stride: int = 2,
        s1_heads: int = 1,
        s1_depth: int = 1,
        s1_mlp_mult: int = 4,
        s2_emb_dim: int = 192,
        s2_emb_kernel: int = 3,
        s2_emb_stride: int = 2,
        s2_proj_kernel: int = 3,
        s2_kv_proj_stride: int = 2,
        s2_heads: int = 3,
        s2_depth: int = 2,
        s2_mlp_mult: int = 4,
        s3_emb_dim: int = 384,
        s3_emb_kernel: int = 3,
        s3_emb_stride: int = 2,
        s3_proj_kernel: int = 3,
        s3_kv_proj_stride: int = 2,
        s3_heads: int = 6,
        s3_depth: int = 10,
        s3_mlp_mult: int = 4,
        dropout: float = 0.0,
        channels: int = 3,
    ) -> None:
        args = dict(locals())
        super().__init__()
        if channels < 1:
            raise ValueError(f"CvT: channels={channels}; expected a positive int")
        self.channels = channels

        dim = channels
        layers = []
        for prefix in ("s1", "s2", "s3"):
            cfg = {key: args[f"{prefix}_{key}"] for key in _STAGE_KEYS}
            for key in ("emb_dim", "emb_kernel", "emb_stride", "proj_kernel", "kv_proj_stride"):
                if cfg[key] < 1:
                    raise ValueError(f"CvT: {prefix}_{key}={cfg[key]}; expected a positive int")
            layers.append(
                nn.Sequential(
                    nn.Conv2d(
                        dim,
                        cfg["emb_dim"],
                        kernel_size=cfg["emb_kernel"],
                        padding=cfg["emb_kernel"] // 2,
                        stride=cfg["emb_stride"],
                    ),
                    LayerNorm(cfg["emb_dim"]),
                    Transformer(
                        dim=cfg["emb_dim"],
                        proj_kernel=cfg["proj_kernel"],
                        kv_proj_stride=cfg["kv_proj_stride"],
                        depth=cfg["depth"],
                        heads=cfg["heads"],
                        mlp_mult=cfg["mlp_mult"],
                        dropout=dropout,
                    ),
                )
            )
            dim = cfg["emb_dim"]
        self.layers = nn.Sequential(*layers)

        self.to_logits = nn.Sequential(
            nn.AdaptiveAvgPool2d(1), Rearrange("b c 1 1 -> b c"), nn.Linear(dim, num_classes)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim != 4 or x.shape[1] != self.channels:
            raise ValueError(
                f"CvT: input has shape {tuple(x.shape)}; expected (batch, channels="
                f"{self.channels}, height, width)"
            )
        return self.to_logits(self.layers(x))  # (B, C, H, W) -> (B, num_classes)


def _factory(s1_depth: int, s2_depth: int, s3_depth: int):
    def build(**overrides: Any) -> CvT:
        kwargs: dict[str, Any] = dict(
            num_classes=1000, s1_depth=s1_depth, s2_depth=s2_depth, s3_depth=s3_depth
        )
        kwargs.update(overrides)
        return CvT(**kwargs)

    return build


CONFIGS: dict[str, Callable[..., nn.Module]] = {
    "cvt_13": _factory(1, 2, 10),
    "cvt_21": _factory(1, 4, 16),
}
