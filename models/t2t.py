"""Tokens-to-Token ViT (Yuan et al. 2021), lucidrains vit-pytorch layout.

``T2TViT``: vit-pytorch 1.26.x ``t2t.py``. Constructor signature and parameter
names are vit-pytorch's, so its ``state_dict()`` loads here with ``strict=True``.
The tokens-to-token steps are soft splits (unfold) each followed by a one-block,
one-head ViT ``Transformer``.

The official T2T-ViT layout (``T2T_ViT``, ``T2T_module``, ``Token_performer``) is
in ``t2t_vit.py``; its names are re-exported here, so imports from
``vitkernels.models.t2t`` keep working.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from einops import rearrange
from einops.layers.torch import Rearrange
from torch import nn

from .t2t_vit import (
    Attention,
    Block,
    DropPath,
    Mlp,
    T2T_module,
    T2T_ViT,
    Token_performer,
    conv_output_size,
    get_sinusoid_encoding,
)
from .vit import Transformer, check_int, check_pool, check_prob, embed_tokens

__all__ = [
    "RearrangeImage",
    "T2TViT",
    # the official layout, defined in t2t_vit.py (its CONFIGS are registered from there)
    "Attention",
    "Block",
    "DropPath",
    "Mlp",
    "T2T_ViT",
    "T2T_module",
    "Token_performer",
    "get_sinusoid_encoding",
]




class RearrangeImage(nn.Module):
    """(B, N, C) tokens of a square grid -> (B, C, sqrt(N), sqrt(N)) map."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rearrange(x, "b (h w) c -> b c h w", h=math.isqrt(x.shape[1]))


class T2TViT(nn.Module):
    """T2T-ViT classifier, vit-pytorch layout.

    Args:
        image_size: side of the square input image.
        num_classes: classifier outputs.
        dim: token width of the backbone.
        depth, heads, mlp_dim: backbone ViT ``Transformer`` shape; required
            unless ``transformer`` is given.
        pool: ``'cls'`` (classify the cls token) or ``'mean'`` (mean of tokens).
        channels: image channels.
        dim_head: per-head width of the backbone.
        dropout: dropout inside the transformers.
        emb_dropout: dropout on the embedded tokens.
        transformer: a ready backbone module taking (B, N, dim) tokens.
        t2t_layers: (kernel, stride) per soft split; padding is stride // 2.
            Every split but the last is followed by a one-head Transformer
            block of width channels * prod(kernel**2 so far).

    Input: (B, channels, S, S) with S <= image_size. Output: (B, num_classes).
    """

    def __init__(
        self,
        *,
        image_size: int,
        num_classes: int,
        dim: int,
        depth: int | None = None,
        heads: int | None = None,
        mlp_dim: int | None = None,
        pool: str = "cls",
        channels: int = 3,
        dim_head: int = 64,
        dropout: float = 0.0,
        emb_dropout: float = 0.0,
        transformer: nn.Module | None = None,
        t2t_layers: Sequence[tuple[int, int]] = ((7, 4), (3, 2), (3, 2)),
    ) -> None:
        super().__init__()
        name = type(self).__name__
        check_pool(name, pool)
        for arg, value in (("image_size", image_size), ("dim", dim), ("channels", channels)):
            check_int(name, arg, value)
        check_prob(name, "dropout", dropout)
        check_prob(name, "emb_dropout", emb_dropout)
        if transformer is None:
            missing = [
                k
                for k, v in (("depth", depth), ("heads", heads), ("mlp_dim", mlp_dim))
                if v is None
            ]
            if missing:
                raise ValueError(
                    f"{name}: {', '.join(missing)} not given; expected depth, heads and mlp_dim "
                    "(or a ready transformer=)"
                )
        if not t2t_layers:
            raise ValueError(
                f"{name}: t2t_layers={t2t_layers!r}; expected at least one (kernel, stride)"
            )

        self.image_size = image_size
        self.channels = channels
        self.t2t_layers = tuple(tuple(layer) for layer in t2t_layers)

        layers: list[nn.Module] = []
        layer_dim = channels
        side = image_size
        for i, (kernel_size, stride) in enumerate(self.t2t_layers):
            check_int(name, f"t2t_layers[{i}] kernel", kernel_size)
            check_int(name, f"t2t_layers[{i}] stride", stride)
            layer_dim *= kernel_size**2
            side = conv_output_size(side, kernel_size, stride, stride // 2)
            if side < 1:
                raise ValueError(
                    f"{name}: image_size={image_size} leaves no tokens after t2t_layers[{i}]="
                    f"{(kernel_size, stride)}; expected a larger image_size"
                )
            is_last = i == len(self.t2t_layers) - 1
            layers += [
                RearrangeImage() if i > 0 else nn.Identity(),
                nn.Unfold(kernel_size=kernel_size, stride=stride, padding=stride // 2),
                Rearrange("b c n -> b n c"),
                nn.Identity()
                if is_last
                else Transformer(
                    dim=layer_dim,
                    heads=1,
                    depth=1,
                    dim_head=layer_dim,
                    mlp_dim=layer_dim,
                    dropout=dropout,
                ),
            ]
        layers.append(nn.Linear(layer_dim, dim))
        self.to_patch_embedding = nn.Sequential(*layers)  # (B, C, S, S) -> (B, side**2, dim)

        self.pos_embedding = nn.Parameter(torch.randn(1, side**2 + 1, dim))
        self.cls_token = nn.Parameter(torch.randn(1, 1, dim))
        self.dropout = nn.Dropout(emb_dropout)

        if transformer is None:
            transformer = Transformer(dim, depth, heads, dim_head, mlp_dim, dropout)
        self.transformer = transformer

        self.pool = pool
        self.to_latent = nn.Identity()
        self.mlp_head = nn.Linear(dim, num_classes)

    def check_images(self, img: torch.Tensor) -> None:
        """Raise ValueError unless ``img`` is (B, channels, S, S) with 1 <= S <= image_size."""
        name = type(self).__name__
        if img.ndim != 4 or img.shape[1] != self.channels:
            raise ValueError(
                f"{name}: images of shape {tuple(img.shape)}; expected (batch, channels="
                f"{self.channels}, {self.image_size}, {self.image_size})"
            )
        h, w = img.shape[-2:]
        if h != w or h > self.image_size:
            raise ValueError(
                f"{name}: image size {h}x{w}; expected a square image no larger than "
                f"image_size={self.image_size} (the positional embedding covers that grid)"
            )
        side = h
        for i, (kernel_size, stride) in enumerate(self.t2t_layers):
            side = conv_output_size(side, kernel_size, stride, stride // 2)
            if side < 1:
                raise ValueError(
                    f"{name}: image size {h}x{w} leaves no tokens after t2t_layers[{i}]; "
                    f"expected images close to image_size={self.image_size}"
                )

    # forward in three steps, as ViT, so that a distillation token can go in between

    def _embed(self, img: torch.Tensor) -> torch.Tensor:
        """(B, C, S, S) images -> (B, 1 + n, dim) tokens with positions added."""
        self.check_images(img)
        return embed_tokens(self.to_patch_embedding, img, self.cls_token, self.pos_embedding)

    def _attend(self, x: torch.Tensor) -> torch.Tensor:
        return self.transformer(self.dropout(x))

    def _head(self, x: torch.Tensor) -> torch.Tensor:
        """(B, n, dim) tokens -> (B, num_classes) logits."""
        x = x.mean(dim=1) if self.pool == "mean" else x[:, 0]
        return self.mlp_head(self.to_latent(x))

    def forward(self, img: torch.Tensor) -> torch.Tensor:
        return self._head(self._attend(self._embed(img)))
