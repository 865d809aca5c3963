"""T2T-ViT's tokens-to-token module on ``vitkernels.patch_embed``.

``soft_split_linear`` is the T2T soft split (nn.Unfold) followed by an optional
LayerNorm and a Linear as one call. ``FusedT2TModule`` is the mixin for the
official ``T2T_module`` layout (soft splits ``soft_split0/1/2``, blocks
``attention1/2``, Linear ``project``): each soft split becomes one patch_embed
call, with the next block's ``norm1`` and ``kqv`` projection for the first two
(where that block is a fused Token_performer whose forward is the official one)
and the ``project`` Linear for the last. The (B, C*49, 3136) unfolded image of a
224-pixel input is never written. ``embed_tokens`` also folds T2T-ViT's class
token and position embedding into the last call.
"""

from __future__ import annotations

import math

import torch
import torch.fx
from torch import nn

from vitkernels.ops.patch_embed import patch_embed, patch_grid
from vitkernels.replace import FusedModule, is_fused
from vitkernels.replace.fused_patch_embed import (
    crop_to_grid,
    folds_as_planned,
    layer_norm_args,
    prefix_and_positions,
    takes_images,
    unfold_geometry,
)
from vitkernels.replace.fused_performer import FusedTokenPerformer
from vitkernels.tokens import _has_hooks, add_tokens

__all__ = ["FusedT2TModule", "soft_split_linear"]

def soft_split_linear(
    x: torch.Tensor,
    unfold: nn.Unfold,
    linear: nn.Linear,
    norm: nn.LayerNorm | None = None,
    *,
    prefix: torch.Tensor | None = None,
    pos_embedding: torch.Tensor | None = None,
    backend: str | None = None,
) -> torch.Tensor:
    """``linear(norm(unfold(x).transpose(1, 2)))`` in one patch_embed call.

    T2T-ViT's soft split (nn.Unfold 7/4/2 or 3/2/1 on a (B, C, H, W) image or
    token map, any strides) followed by a LayerNorm (e.g. the first
    Token_performer's ``norm1``) and a Linear (its ``kqv``, or the final
    ``project``), without the unfolded (B, L, C*k*k) tensor in memory.
    Returns (B, L, linear.out_features). Images the unfold would cut are
    cropped to its grid first (the same result as nn.Unfold). With ``prefix``
    (class) tokens and a ``pos_embedding`` table, returns ``cat(prefix, tokens) +
    pos_embedding[:P + L]`` from the same call (the T2T-ViT embedding).
    """
    geometry = unfold_geometry(unfold)
    if isinstance(geometry, str):
        raise ValueError(f"soft_split_linear: {geometry}")
    ks, st, pad = geometry
    in_norm = None
    if norm is not None:
        in_norm = layer_norm_args(norm, linear.in_features)
        if isinstance(in_norm, str):
            raise ValueError(f"soft_split_linear: {in_norm}")
    if x.ndim == 4:
        cropped = crop_to_grid(x, ks, st, pad)
        x = x if cropped is None else cropped
    cls = pos = None
    if pos_embedding is not None:
        cls, pos = prefix_and_positions(
            prefix, pos_embedding, linear.out_features, patch_grid(x.shape[-2:], ks, st, pad), x
        )
        if pos is None:  # added as the model adds it: the table does not fit (its error), or autocast
            return add_tokens(soft_split_linear(x, unfold, linear, norm, backend=backend), prefix, pos_embedding)
    elif prefix is not None:
        raise ValueError("soft_split_linear: prefix tokens given without a pos_embedding")
    return patch_embed(
        x, linear.weight, linear.bias, kernel_size=ks, stride=st, padding=pad,
        patch_order="cpq", in_norm=in_norm, pos_embed=pos, cls_token=cls, backend=backend,
    )  # fmt: skip


def _called_directly(*modules: nn.Module) -> bool:
    """Whether skipping these modules' __call__ is invisible: no hooks on them and no
    global module hooks (``register_module_forward_hook``: profilers, loggers)."""
    return not any(_has_hooks(m) for m in modules)


class FusedT2TModule(FusedModule):
    """The official ``T2T_module`` with each soft split as one patch_embed call."""

    _vk_op = "patch_embed"
    _vk_visit_children = True
    _vk_skips = ("soft_split2", "project")  # the stages check theirs (``_called_directly``)

    def _vk_stage(self, x: torch.Tensor, unfold: nn.Unfold, attention: nn.Module) -> torch.Tensor:
        """(B, C, H, W) map -> (B, N, token_dim) tokens of the next block."""
        if (
            isinstance(attention, FusedTokenPerformer)
            and is_fused(attention)
            and attention._vk.spec.takes_kqv
            and _called_directly(unfold, attention, attention.norm1, attention.kqv)
            and folds_as_planned(attention.kqv, attention.norm1)
        ):
            kqv = soft_split_linear(x, unfold, attention.kqv, attention.norm1, backend=self._vk.backend)
            return attention._vk_forward_from_kqv(kqv)
        return attention(unfold(x).transpose(1, 2))

    @staticmethod
    def _vk_tokens_to_image(x: torch.Tensor) -> torch.Tensor:
        side = math.isqrt(x.shape[1])  # (B, side*side, C) -> (B, C, side, side), a view
        return x.transpose(1, 2).unflatten(2, (side, side))

    def _vk_last_input(self, x: torch.Tensor) -> torch.Tensor:
        x = self._vk_tokens_to_image(self._vk_stage(x, self.soft_split0, self.attention1))
        return self._vk_tokens_to_image(self._vk_stage(x, self.soft_split1, self.attention2))

    def _vk_applies(self, x: torch.Tensor) -> bool:
        """A batch of square images (the official forward reshapes to squares), and
        ``project`` still the nn.Linear optimize found."""
        return (
            not isinstance(x, torch.fx.Proxy)
            and x.ndim == 4
            and x.shape[-1] == x.shape[-2]
            and folds_as_planned(self.project)
            and takes_images(x, self.project.weight, x.shape[-3])  # uint8, float64: the original's error
            and not self._vk_hooked()
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.jit.is_scripting():
            return self._vk_base_forward(x)
        return self._vk_forward(x)

    @torch.jit.unused
    def _vk_forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self._vk_applies(x):
            return self._vk_base_forward(x)
        return soft_split_linear(
            self._vk_last_input(x), self.soft_split2, self.project, backend=self._vk.backend
        )

    @torch.jit.unused
    def embed_tokens(
        self, img: torch.Tensor, prefix: torch.Tensor | None, pos_embedding: torch.Tensor
    ) -> torch.Tensor:
        """``cat(prefix, self(img)) + pos_embedding[:P + L]``, the last two in the
        last soft split's call (``vitkernels.tokens.embed_tokens``)."""
        if not self._vk_applies(img):
            return add_tokens(self._vk_base_forward(img), prefix, pos_embedding)
        return soft_split_linear(
            self._vk_last_input(img), self.soft_split2, self.project,
            prefix=prefix, pos_embedding=pos_embedding, backend=self._vk.backend,
        )  # fmt: skip
