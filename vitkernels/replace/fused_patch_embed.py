"""Fused patch-embedding modules: each forward is one ``vitkernels.patch_embed``.

* ``FusedPatchSequential`` replaces an ``nn.Sequential`` that is exactly one
  patch embedding: vit-pytorch's ``to_patch_embedding`` (Rearrange to
  ``(p1 p2 c)`` patches, optional LayerNorm, Linear, optional LayerNorm: patch
  order "pqc") or an unfold one (``nn.Unfold``, ``Rearrange('b c n -> b n c')``,
  optional LayerNorm, Linear, optional LayerNorm: order "cpq"; PiT). It keeps the
  Sequential's children "0", "1", ... so the state_dict is unchanged, and it
  still indexes and iterates like the Sequential.
* ``FusedTimmPatchEmbed`` replaces timm's ``PatchEmbed`` (Conv2d, flatten,
  optional norm).
* ``FusedImageEmbedder`` replaces CrossViT's ``ImageEmbedder`` (vit-pytorch's and
  this repo's): the class token and the position embedding go into the same call.

``soft_split_linear`` is the T2T soft split (nn.Unfold) followed by an optional
LayerNorm and a Linear as one call, for fused T2T modules to use.

Where an unfold or a Conv2d would silently drop the last rows or columns of an
image (the patch grid does not reach them), the fused modules crop the image to
the grid first (a view): the same result, where ``patch_embed`` itself refuses
such an image.
"""

from __future__ import annotations

import dataclasses
import math

import torch
from torch import nn

from vitkernels.models.vit import add_tokens
from vitkernels.ops.patch_embed import patch_embed, patch_grid
from vitkernels.replace import FusedModule

__all__ = [
    "FusedImageEmbedder",
    "FusedPatchSequential",
    "FusedT2TModule",
    "FusedTimmPatchEmbed",
    "PatchSpec",
    "layer_norm_args",
    "parse_patch_sequential",
    "prefix_and_positions",
    "soft_split_linear",
]

PATCHIFY = "b c (h p1) (w p2) -> b (h w) (p1 p2 c)"  # vit-pytorch's patch Rearrange
TOKENS = "b c n -> b n c"  # after nn.Unfold


# ----------------------------------------------------------------------------
# recognising the layers


def _pair(v) -> tuple[int, int]:
    return (v, v) if isinstance(v, int) else (int(v[0]), int(v[1]))


def _qualname(m: nn.Module) -> str:
    return f"{type(m).__module__}.{type(m).__qualname__}"


def is_layer_norm(m: nn.Module) -> bool:
    """torch's LayerNorm or timm's (same math); not other subclasses with their own forward."""
    return type(m) is nn.LayerNorm or _qualname(m) == "timm.layers.norm.LayerNorm"


def is_rearrange(m: nn.Module, pattern: str) -> bool:
    return _qualname(m) == "einops.layers.torch.Rearrange" and " ".join(
        str(getattr(m, "pattern", "")).split()
    ) == pattern


def layer_norm_args(m: nn.Module | None, size: int) -> tuple | str | None:
    """(weight, bias, eps) of a LayerNorm over the last dim of ``size``, or why not."""
    if m is None:
        return None
    if tuple(m.normalized_shape) != (size,):
        return f"LayerNorm over {tuple(m.normalized_shape)}, expected ({size},)"
    return (m.weight, m.bias, m.eps)


def unfold_geometry(m: nn.Unfold) -> tuple[tuple[int, int], tuple[int, int], tuple[int, int]] | str:
    """(kernel_size, stride, padding) of an nn.Unfold, or why it is not supported."""
    if _pair(m.dilation) != (1, 1):
        return f"nn.Unfold with dilation {m.dilation} (only 1 is supported)"
    return _pair(m.kernel_size), _pair(m.stride), _pair(m.padding)


@dataclasses.dataclass(frozen=True)
class PatchSpec:
    """One patch embedding found in a Sequential: geometry and child names."""

    kernel_size: tuple[int, int]
    stride: tuple[int, int]
    padding: tuple[int, int]
    patch_order: str
    linear: str
    in_norm: str | None
    out_norm: str | None
    unfold: bool  # the nn.Unfold form (drops uncovered rows) rather than Rearrange
    head: tuple[str, ...] = ()  # children run as they are before the patch embedding (T2T)


def parse_patch_sequential(seq: nn.Module) -> PatchSpec | str | None:
    """A PatchSpec if ``seq`` is a patch embedding; a sentence saying why not if it
    starts like one (a Rearrange to patches or an nn.Unfold) but is not; None if it
    does not look like one at all.

    The Sequential may hold more before its last patchify (vit-pytorch's T2T
    ``to_patch_embedding``: soft splits with Transformer blocks between them, the
    last soft split followed by the Linear): those children become the spec's
    ``head``, run as they are, and only the last patch embedding is fused.
    """
    if type(seq) is not nn.Sequential:
        return None
    items = [(k, m) for k, m in seq._modules.items() if m is not None]
    i = 0
    while i < len(items) and type(items[i][1]) is nn.Identity:
        i += 1
    if i == len(items) or not _is_patchify(items[i][1]):
        return None
    last = max(j for j, (_, m) in enumerate(items) if _is_patchify(m))
    spec = _parse_patch_tail(seq, items[last:])
    if isinstance(spec, PatchSpec) and last > i:
        spec = dataclasses.replace(spec, head=tuple(k for k, _ in items[i:last]))
    return spec


def _is_patchify(m: nn.Module) -> bool:
    return is_rearrange(m, PATCHIFY) or type(m) is nn.Unfold


def _parse_patch_tail(seq: nn.Sequential, items: list[tuple[str, nn.Module]]) -> PatchSpec | str:
    """The patch embedding that ``items`` (starting at a patchify) are, or why not."""
    i = 0
    name, first = items[i]
    if is_rearrange(first, PATCHIFY):
        lengths = getattr(first, "axes_lengths", {}) or {}
        if set(lengths) != {"p1", "p2"}:
            return f"patch Rearrange with axis lengths {dict(lengths)}, expected p1 and p2"
        ks = (int(lengths["p1"]), int(lengths["p2"]))
        geometry, order, unfold, i = (ks, ks, (0, 0)), "pqc", False, i + 1
    else:
        geometry = unfold_geometry(first)
        if isinstance(geometry, str):
            return geometry
        if i + 1 >= len(items) or not is_rearrange(items[i + 1][1], TOKENS):
            return "nn.Unfold not followed by Rearrange('b c n -> b n c')"
        order, unfold, i = "cpq", True, i + 2
    rest = [(k, m) for k, m in items[i:] if type(m) is not nn.Identity]
    in_norm = out_norm = None
    if rest and is_layer_norm(rest[0][1]):
        in_norm, rest = rest[0][0], rest[1:]
    if not rest or type(rest[0][1]) is not nn.Linear:
        found = type(rest[0][1]).__name__ if rest else "nothing"
        return (
            f"the patches go to {found} (and {max(len(rest) - 1, 0)} more modules), not to "
            "[LayerNorm,] Linear[, LayerNorm]"
        )
    linear, rest = rest[0][0], rest[1:]
    if rest and is_layer_norm(rest[0][1]):
        out_norm, rest = rest[0][0], rest[1:]
    if rest:
        return (
            "the Sequential goes on after the patch embedding with "
            + ", ".join(type(m).__name__ for _, m in rest)
        )
    ks, st, pad = geometry
    K = seq._modules[linear].in_features
    if K % (ks[0] * ks[1]):
        return f"Linear in_features={K} is not channels * {ks[0]} * {ks[1]}"
    D = seq._modules[linear].out_features
    for nname, size in ((in_norm, K), (out_norm, D)):
        if nname is not None:
            why = layer_norm_args(seq._modules[nname], size)
            if isinstance(why, str):
                return why
    return PatchSpec(ks, st, pad, order, linear, in_norm, out_norm, unfold)


def crop_to_grid(
    x: torch.Tensor, kernel_size: tuple[int, int], stride: tuple[int, int], padding: tuple[int, int]
) -> torch.Tensor | None:
    """x[..., :Hc, :Wc]: the part of the image Conv2d / nn.Unfold patches reach
    (x itself when they reach all of it); None when cropping would change the
    patch grid (padding >= stride) or no patch fits."""
    sizes = []
    for n, k, s, p in zip(x.shape[-2:], kernel_size, stride, padding, strict=True):
        if n + 2 * p < k:
            return None
        reach = ((n + 2 * p - k) // s) * s + k - p
        if reach >= n:
            sizes.append(n)
        elif p < s:
            sizes.append(reach)
        else:
            return None
    if tuple(sizes) == tuple(x.shape[-2:]):
        return x
    return x[..., : sizes[0], : sizes[1]]


# ----------------------------------------------------------------------------
# the T2T soft split


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
            prefix, pos_embedding, linear.out_features, patch_grid(x.shape[-2:], ks, st, pad)
        )
    elif prefix is not None:
        raise ValueError("soft_split_linear: prefix tokens given without a pos_embedding")
    return patch_embed(
        x, linear.weight, linear.bias, kernel_size=ks, stride=st, padding=pad,
        patch_order="cpq", in_norm=in_norm, pos_embed=pos, cls_token=cls, backend=backend,
    )


# ----------------------------------------------------------------------------
# fused modules


class FusedPatchSequential(FusedModule, nn.Sequential):
    """An nn.Sequential patch embedding as one patch_embed call.

    Children named in ``spec.head`` (vit-pytorch T2T's soft splits and Transformer
    blocks before its last soft split) run as they are; ``optimize`` visits them
    too, so their attention is replaced by its own rules.

    Args:
        original: the Sequential (its children are adopted under their names).
        backend: the patch_embed backend; None dispatches on every call.
        spec: what ``parse_patch_sequential(original)`` found.
    """

    op = "patch_embed"
    visit_children = True

    def __init__(self, original: nn.Sequential, backend: str | None, spec: PatchSpec) -> None:
        super().__init__(original, backend)
        self.__dict__["_vk_spec"] = spec

    def _run_head(self, x: torch.Tensor) -> torch.Tensor:
        for name in self.__dict__["_vk_spec"].head:
            x = self._modules[name](x)
        return x

    def _run_tail(self, x: torch.Tensor) -> torch.Tensor:
        head = set(self.__dict__["_vk_spec"].head)
        for name, m in self._modules.items():
            if m is not None and name not in head:
                x = m(x)
        return x

    def _fusable(self, x: torch.Tensor) -> torch.Tensor | None:
        """x cropped to the patch grid, or None where the layers must run as they are."""
        s: PatchSpec = self.__dict__["_vk_spec"]
        if x.ndim != 4:  # unbatched input: the original layers handle (or refuse) it
            return None
        return crop_to_grid(x, s.kernel_size, s.stride, s.padding) if s.unfold else x

    def _call(self, x: torch.Tensor, **tokens) -> torch.Tensor:
        s: PatchSpec = self.__dict__["_vk_spec"]
        lin = self._modules[s.linear]
        return patch_embed(
            x, lin.weight, lin.bias, kernel_size=s.kernel_size, stride=s.stride,
            padding=s.padding, patch_order=s.patch_order,
            in_norm=_norm(self, s.in_norm), out_norm=_norm(self, s.out_norm),
            backend=self.backend, **tokens,
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self._run_head(x)
        fusable = self._fusable(x)
        return self._run_tail(x) if fusable is None else self._call(fusable)

    def embed_tokens(
        self, img: torch.Tensor, prefix: torch.Tensor | None, pos_embedding: torch.Tensor
    ) -> torch.Tensor:
        """``cat(prefix, self(img)) + pos_embedding[:P + L]`` with the prefix and the
        positions in the same patch_embed call: the token protocol of this repo's
        models (``vitkernels.models.vit.embed_tokens``). ``prefix`` is the model's
        class token ((P, D) or (1, P, D); None or P = 0: none)."""
        s: PatchSpec = self.__dict__["_vk_spec"]
        x = self._run_head(img)
        fusable = self._fusable(x)
        if fusable is None:
            return add_tokens(self._run_tail(x), prefix, pos_embedding)
        cls, pos = prefix_and_positions(
            prefix, pos_embedding, self._modules[s.linear].out_features,
            patch_grid(fusable.shape[-2:], s.kernel_size, s.stride, s.padding),
        )
        return self._call(fusable, pos_embed=pos, cls_token=cls)


def prefix_and_positions(
    prefix: torch.Tensor | None, pos_embedding: torch.Tensor, D: int, grid: tuple[int, int]
) -> tuple[torch.Tensor | None, torch.Tensor]:
    """patch_embed's (cls_token, pos_embed) for ``prefix`` tokens and the first P + L
    rows of a ((1,) T, D) position table, L = grid[0] * grid[1]."""
    if prefix is not None and prefix.numel() == 0:
        prefix = None  # e.g. ViT with pool="mean": a (0, D) class token
    P = 0 if prefix is None else prefix.numel() // max(prefix.shape[-1], 1)
    if pos_embedding.shape[-1] == D:  # otherwise patch_embed says what is wrong
        pos_embedding = pos_embedding.reshape(-1, D)[: P + grid[0] * grid[1]]
    return prefix, pos_embedding


def _norm(module: nn.Module, name: str | None) -> tuple | None:
    if name is None:
        return None
    m = module._modules[name]
    return (m.weight, m.bias, m.eps)


class FusedTimmPatchEmbed(FusedModule):
    """timm's PatchEmbed (Conv2d patchify, flatten to tokens, optional LayerNorm)
    as one patch_embed call; image-size checks as timm makes them."""

    op = "patch_embed"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, C, H, W = x.shape
        ph, pw = self.patch_size
        if self.img_size is not None:
            if self.strict_img_size:
                if (H, W) != tuple(self.img_size):
                    raise ValueError(
                        f"PatchEmbed: input size ({H}, {W}) does not match the model's "
                        f"img_size {tuple(self.img_size)}"
                    )
            elif H % ph or W % pw:
                raise ValueError(
                    f"PatchEmbed: input size ({H}, {W}) is not divisible by the patch size ({ph}, {pw})"
                )
        proj = self.proj
        ks, st, pad = _pair(proj.kernel_size), _pair(proj.stride), _pair(proj.padding)
        cropped = crop_to_grid(x, ks, st, pad)
        if cropped is None:  # let the original layers handle (or refuse) it
            x = proj(x).flatten(2).transpose(1, 2)
            return self.norm(x)
        norm = None if type(self.norm) is nn.Identity else _norm(self, "norm")
        return patch_embed(
            cropped, proj.weight, proj.bias, kernel_size=ks, stride=st, padding=pad,
            patch_order="cpq", out_norm=norm, backend=self.backend,
        )


class FusedImageEmbedder(FusedModule):
    """CrossViT's ImageEmbedder: patches (Rearrange, LayerNorm, Linear, LayerNorm),
    class token prepended, position embedding added, dropout: the first three as
    one patch_embed call. Keeps ``to_patch_embedding``, ``cls_token``,
    ``pos_embedding`` and ``dropout`` under their names."""

    op = "patch_embed"

    def __init__(self, original: nn.Module, backend: str | None, spec: PatchSpec) -> None:
        super().__init__(original, backend)
        self.__dict__["_vk_spec"] = spec

    def forward(self, img: torch.Tensor) -> torch.Tensor:
        s: PatchSpec = self.__dict__["_vk_spec"]
        seq = self.to_patch_embedding
        lin = seq._modules[s.linear]
        H, W = img.shape[-2:]
        n = (H // s.kernel_size[0]) * (W // s.kernel_size[1])
        pos = self.pos_embedding.reshape(-1, self.pos_embedding.shape[-1])[: n + 1]
        x = patch_embed(
            img, lin.weight, lin.bias, kernel_size=s.kernel_size, stride=s.stride,
            padding=s.padding, patch_order=s.patch_order,
            in_norm=_norm(seq, s.in_norm), out_norm=_norm(seq, s.out_norm),
            pos_embed=pos, cls_token=self.cls_token, backend=self.backend,
        )
        return self.dropout(x)


class FusedT2TModule(FusedModule):
    """T2T-ViT's tokens-to-token module (official ``T2T_module`` layout: soft splits
    ``soft_split0/1/2``, Token_performers ``attention1/2``, Linear ``project``).

    Each soft split becomes one patch_embed call: the unfolded patches, the next
    Token_performer's ``norm1`` and its ``kqv`` projection for the first two (when
    that Token_performer has been replaced by a ``FusedTokenPerformer``: optimize
    visits this module's children after replacing it), the ``project`` Linear for
    the last. The (B, C*49, 3136) unfolded image of a 224-pixel input is never
    written. ``embed_tokens`` also folds T2T-ViT's class token and position
    embedding into the last call.
    """

    op = "patch_embed"
    visit_children = True

    def _stage(self, x: torch.Tensor, unfold: nn.Unfold, attention: nn.Module) -> torch.Tensor:
        if getattr(attention, "takes_kqv", False):
            kqv = soft_split_linear(x, unfold, attention.kqv, attention.norm1, backend=self.backend)
            return attention.forward_from_kqv(kqv)
        return attention(unfold(x).transpose(1, 2))

    def _tokens_to_image(self, x: torch.Tensor) -> torch.Tensor:
        side = math.isqrt(x.shape[1])  # (B, side*side, C) -> (B, C, side, side), a view
        return x.transpose(1, 2).unflatten(2, (side, side))

    def _last_input(self, x: torch.Tensor) -> torch.Tensor:
        x = self._tokens_to_image(self._stage(x, self.soft_split0, self.attention1))
        return self._tokens_to_image(self._stage(x, self.soft_split1, self.attention2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return soft_split_linear(
            self._last_input(x), self.soft_split2, self.project, backend=self.backend
        )

    def embed_tokens(
        self, img: torch.Tensor, prefix: torch.Tensor | None, pos_embedding: torch.Tensor
    ) -> torch.Tensor:
        """``cat(prefix, self(img)) + pos_embedding[:P + L]``, the last two in the
        last soft split's call (``vitkernels.models.vit.embed_tokens``)."""
        return soft_split_linear(
            self._last_input(img), self.soft_split2, self.project,
            prefix=prefix, pos_embedding=pos_embedding, backend=self.backend,
        )
