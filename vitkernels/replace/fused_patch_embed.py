"""Fused patch-embedding mixins: each forward is one ``vitkernels.patch_embed``.

* ``FusedPatchSequential`` (on an ``nn.Sequential`` that is exactly one patch
  embedding): vit-pytorch's ``to_patch_embedding`` (Rearrange to ``(p1 p2 c)``
  patches, optional LayerNorm, Linear, optional LayerNorm: patch order "pqc")
  or an unfold one (``nn.Unfold``, ``Rearrange('b c n -> b n c')``, optional
  LayerNorm, Linear, optional LayerNorm: order "cpq"; PiT, vit-pytorch's T2T).
* ``FusedConvPatchEmbed`` (a Conv2d patchify, flattened to tokens or kept as a
  map): timm's ``PatchEmbed`` (with its optional LayerNorm), timm CrossViT's
  ``PatchEmbed`` and timm PiT's ``ConvEmbedding`` (a (B, D, H', W') map: a
  view of the tokens).
* ``FusedImageEmbedder``: CrossViT's ``ImageEmbedder`` (vit-pytorch's and this
  repo's): the class token and the position embedding go into the same call.

The patch embeddings of this repo's models also fold the model's class token
and position embedding into their call (``embed_tokens``, the protocol of
``vitkernels.tokens``), except under torch.autocast where the model's own cat and
add would promote autocast's bfloat16 patch tokens to its float32 class token and
positions: there those two are added as the model adds them, after the fused
projection, so that the token stream stays float32 as in eager
(``widens_under_autocast``). Likewise where autocast runs LayerNorm in float32 (on
CUDA; not on CPU): an output norm then runs after the fused projection, as eager
runs it, so its float32 tokens stay float32. Where an unfold or a Conv2d would silently drop the last
rows or columns of an image (the patch grid does not reach them), the fused
forward crops the image to the grid first (a view): the same result, where
``patch_embed`` itself refuses such an image. Where the fused path does not
apply (an image of another size than a strict model's, an unbatched input) the
original forward runs, so callers get its result or its exception.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.fx
from torch import nn

from vitkernels.ops.patch_embed import _autocast_dtype, _cast, patch_embed, patch_grid
from vitkernels.replace import FusedModule
from vitkernels.replace._match import qualname
from vitkernels.tokens import add_tokens

__all__ = [
    "FusedConvPatchEmbed",
    "FusedImageEmbedder",
    "FusedPatchSequential",
    "PatchSpec",
    "crop_to_grid",
    "folds_as_planned",
    "is_layer_norm",
    "layer_norm_args",
    "pair",
    "prefix_and_positions",
    "takes_images",
    "autocast_norm_dtype",
    "norm_widens_under_autocast",
    "unfold_geometry",
    "widens_under_autocast",
]

torch.fx.wrap("patch_embed")  # one node under torch.fx.symbolic_trace


def pair(v: int | tuple[int, ...] | list[int]) -> tuple[int, int]:
    return (v, v) if isinstance(v, int) else (int(v[0]), int(v[1]))


def is_layer_norm(m: nn.Module | None) -> bool:
    """torch's LayerNorm or timm's (same math); not other subclasses with their own forward."""
    return m is not None and (
        type(m) is nn.LayerNorm or qualname(type(m)) == "timm.layers.norm.LayerNorm"
    )


def folds_as_planned(linear: nn.Module | None, *norms: nn.Module | None) -> bool:
    """Whether the layers a fused op reads the tensors of are still the stock ones its
    rule accepted: ``linear`` an nn.Linear exactly, each norm a LayerNorm. A layer
    quantized (torch.ao's quantize_dynamic), wrapped or replaced since optimize is
    run as it is instead, through the original forward."""
    return type(linear) is nn.Linear and all(is_layer_norm(n) for n in norms)


def layer_norm_args(m: nn.Module | None, size: int) -> tuple | str | None:
    """(weight, bias, eps) of a LayerNorm over the last dim of ``size``, or why not."""
    if m is None:
        return None
    if tuple(m.normalized_shape) != (size,):
        return f"LayerNorm over {tuple(m.normalized_shape)}, expected ({size},)"
    return (m.weight, m.bias, m.eps)


def unfold_geometry(m: nn.Unfold) -> tuple[tuple[int, int], tuple[int, int], tuple[int, int]] | str:
    """(kernel_size, stride, padding) of an nn.Unfold, or why it is not supported."""
    if pair(m.dilation) != (1, 1):
        return f"nn.Unfold with dilation {m.dilation} (only 1 is supported)"
    return pair(m.kernel_size), pair(m.stride), pair(m.padding)


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


_NORM_DTYPE: dict[tuple[str, torch.dtype], torch.dtype] = {}


def autocast_norm_dtype(images: torch.Tensor) -> torch.dtype | None:
    """The dtype the autocast now on for the images' device gives a LayerNorm of its own
    dtype's tokens (float32 on CUDA, where layer_norm is on autocast's float32 list;
    autocast's dtype on CPU); None without autocast. Found by running one tiny
    layer_norm, once per device type and dtype."""
    cast = _autocast_dtype(images)
    if cast is None:
        return None
    key = (images.device.type, cast)
    if key not in _NORM_DTYPE:
        probe = torch.ones(1, 2, device=images.device, dtype=cast)
        _NORM_DTYPE[key] = torch.nn.functional.layer_norm(probe, (2,)).dtype
    return _NORM_DTYPE[key]


def norm_widens_under_autocast(images: torch.Tensor) -> bool:
    """Whether autocast runs an output LayerNorm wider than its own dtype here
    (``autocast_norm_dtype``): eager's tokens are then float32 after the norm, where
    patch_embed gives autocast's dtype."""
    dt = autocast_norm_dtype(images)
    return dt is not None and dt != _autocast_dtype(images)


def widens_under_autocast(
    images: torch.Tensor, *tensors: torch.Tensor | None, out_norm: bool = False
) -> bool:
    """Whether, under torch.autocast, eager's tokens would be wider than patch_embed's
    result (autocast's dtype, as the Linear or Conv2d it replaces gives): the model's
    own ``cat`` and ``+`` of these (its class token, its position table) promote to
    float32 parameters, and with ``out_norm`` a LayerNorm may run in float32
    (``norm_widens_under_autocast``). The model's token stream then stays float32."""
    cast = _autocast_dtype(images)
    if cast is None:
        return False
    if out_norm and norm_widens_under_autocast(images):
        return True
    return any(
        t is not None and t.numel() and t.is_floating_point() and torch.promote_types(cast, t.dtype) != cast
        for t in tensors
    )


def _projection(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, in_norm: tuple | None,
    out_norm: tuple | None, backend: str | None, **kw,
) -> torch.Tensor:
    """patch_embed(x, ...) with eager's dtype: where autocast runs the output norm in
    float32 (``norm_widens_under_autocast``), the norm runs after the call as eager
    runs it (F.layer_norm under the same autocast). No prefix or positions then."""
    if out_norm is not None and norm_widens_under_autocast(x):
        if kw.get("pos_embed") is not None or kw.get("cls_token") is not None:
            raise AssertionError("positions folded into a call whose output norm runs after it")
        y = patch_embed(x, weight, bias, in_norm=in_norm, backend=backend, **kw)
        dt = autocast_norm_dtype(x)  # autocast would cast all three to it: done here
        w, b, eps = (t.to(dt) if isinstance(t, torch.Tensor) else t for t in out_norm)
        return torch.nn.functional.layer_norm(y.to(dt), (y.shape[-1],), w, b, eps)
    return patch_embed(x, weight, bias, in_norm=in_norm, out_norm=out_norm, backend=backend, **kw)


def prefix_and_positions(
    prefix: torch.Tensor | None, pos_embedding: torch.Tensor, D: int, grid: tuple[int, int],
    images: torch.Tensor | None = None, out_norm: bool = False,
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """patch_embed's (cls_token, pos_embed) for ``prefix`` tokens and the first P + L
    rows of a ((1,) T, D) position table, L = grid[0] * grid[1]. pos_embed is None
    where the table does not hold P + L rows of width D, or where under autocast
    eager's tokens would be wider than the call's (``widens_under_autocast`` for
    ``images`` and an ``out_norm``): the caller then adds them as the model does
    (``add_tokens``), with the model's dtype, or its own error."""
    if prefix is not None and prefix.numel() == 0:
        prefix = None  # e.g. ViT with pool="mean": a (0, D) class token
    if images is not None and widens_under_autocast(images, prefix, pos_embedding, out_norm=out_norm):
        return prefix, None
    P = 0 if prefix is None else prefix.numel() // max(prefix.shape[-1], 1)
    rows = P + grid[0] * grid[1]
    if pos_embedding.shape[-1] != D or pos_embedding.numel() // D < rows:
        return prefix, None
    return prefix, pos_embedding.reshape(-1, D)[:rows]


def _norm(module: nn.Module, name: str | None) -> tuple | None:
    if name is None:
        return None
    m = module._modules[name]
    return (m.weight, m.bias, m.eps)


def _traced(x: torch.Tensor) -> bool:
    return isinstance(x, torch.fx.Proxy)


def takes_images(x: torch.Tensor, weight: torch.Tensor, channels: int) -> bool:
    """Whether the layers a fused patch embedding replaces take these images: floating
    point, of the projection weight's dtype (or both cast to autocast's), with
    ``channels`` channels. Other images (uint8 ones, float64 into a float32 model, one
    channel into an RGB one) go to the original forward: its error, not patch_embed's."""
    if _traced(x):
        return True
    if not x.is_floating_point() or x.ndim < 3 or x.shape[-3] != channels:
        return False
    cast = _autocast_dtype(x)
    if cast is not None:
        return _cast(x, cast).dtype == _cast(weight, cast).dtype
    return x.dtype == weight.dtype


def _tiles(x: torch.Tensor, kernel_size: tuple[int, int]) -> bool:
    """Whether the patches tile the image exactly, as vit-pytorch's patch Rearrange
    requires (it raises einops' error otherwise, which the original forward gives)."""
    return x.shape[-2] % kernel_size[0] == 0 and x.shape[-1] % kernel_size[1] == 0


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

    def folds_in(self, seq: nn.Module) -> bool:
        """Whether ``seq``'s linear and norm children are still the layers this spec's
        rule accepted (``folds_as_planned``)."""
        norms = (seq._modules.get(n) for n in (self.in_norm, self.out_norm) if n is not None)
        return folds_as_planned(seq._modules.get(self.linear), *norms)


class FusedPatchSequential(FusedModule):
    """An nn.Sequential patch embedding as one patch_embed call.

    Children named in ``spec.head`` (vit-pytorch T2T's soft splits and Transformer
    blocks before its last soft split) run as they are; ``optimize`` visits them
    too, so their attention is replaced by its own rules.
    """

    _vk_op = "patch_embed"
    _vk_visit_children = True

    def _vk_run_head(self, x: torch.Tensor) -> torch.Tensor:
        for name in self._vk.spec.head:
            x = self._modules[name](x)
        return x

    def _vk_run_tail(self, x: torch.Tensor) -> torch.Tensor:
        head = set(self._vk.spec.head)
        for name, m in self._modules.items():
            if m is not None and name not in head:
                x = m(x)
        return x

    def _vk_skipped(self) -> list[nn.Module]:
        head = set(self._vk.spec.head)  # the head's children are called
        return [m for name, m in self._modules.items() if m is not None and name not in head]

    def _vk_fusable(self, x: torch.Tensor) -> torch.Tensor | None:
        """x cropped to the patch grid, or None where the layers must run as they are."""
        s: PatchSpec = self._vk.spec
        if not s.folds_in(self) or self._vk_hooked():
            return None  # a layer changed since optimize, or hooks on one: run the layers
        if _traced(x):
            return x
        if x.ndim != 4:  # unbatched input: the original layers handle (or refuse) it
            return None
        lin = self._modules[s.linear]
        if not takes_images(x, lin.weight, lin.in_features // (s.kernel_size[0] * s.kernel_size[1])):
            return None
        if s.unfold:
            return crop_to_grid(x, s.kernel_size, s.stride, s.padding)
        return x if _tiles(x, s.kernel_size) else None  # else the Rearrange's own error

    def _vk_call(self, x: torch.Tensor, **tokens: torch.Tensor | None) -> torch.Tensor:
        s: PatchSpec = self._vk.spec
        lin = self._modules[s.linear]
        return _projection(
            x, lin.weight, lin.bias, _norm(self, s.in_norm), _norm(self, s.out_norm), self._vk.backend,
            kernel_size=s.kernel_size, stride=s.stride, padding=s.padding, patch_order=s.patch_order, **tokens,
        )  # fmt: skip

    def forward(self, input: torch.Tensor) -> torch.Tensor:  # noqa: A002 (nn.Sequential's name)
        if torch.jit.is_scripting():
            return self._vk_base_forward(input)
        return self._vk_forward(input)

    @torch.jit.unused
    def _vk_forward(self, input: torch.Tensor) -> torch.Tensor:  # noqa: A002
        x = self._vk_run_head(input)
        fusable = self._vk_fusable(x)
        return self._vk_run_tail(x) if fusable is None else self._vk_call(fusable)

    @torch.jit.unused
    def embed_tokens(
        self, img: torch.Tensor, prefix: torch.Tensor | None, pos_embedding: torch.Tensor
    ) -> torch.Tensor:
        """``cat(prefix, self(img)) + pos_embedding[:P + L]`` with the prefix and the
        positions in the same patch_embed call (``vitkernels.tokens.embed_tokens``).
        ``prefix`` is the model's class token ((P, D) or (1, P, D); None or P = 0: none)."""
        s: PatchSpec = self._vk.spec
        x = self._vk_run_head(img)
        fusable = self._vk_fusable(x)
        if fusable is None:
            return add_tokens(self._vk_run_tail(x), prefix, pos_embedding)
        if _traced(x):  # torch.fx: the grid is not known while tracing
            return add_tokens(self._vk_call(x), prefix, pos_embedding)
        cls, pos = prefix_and_positions(
            prefix, pos_embedding, self._modules[s.linear].out_features,
            patch_grid(fusable.shape[-2:], s.kernel_size, s.stride, s.padding), fusable, s.out_norm is not None,
        )  # fmt: skip
        if pos is None:
            return add_tokens(self._vk_call(fusable), prefix, pos_embedding)
        return self._vk_call(fusable, pos_embed=pos, cls_token=cls)


@dataclasses.dataclass(frozen=True)
class ConvPatchSpec:
    """How a Conv2d patch embedding is laid out around its conv."""

    conv: str  # the Conv2d's attribute name ("proj", "conv")
    tokens: bool  # (B, L, D) tokens; False: the (B, D, H', W') map
    norm: bool  # a LayerNorm named ``norm`` after the conv (timm PatchEmbed)
    size_check: str  # "strict": the image must be img_size; "divisible": by patch_size; ""


class FusedConvPatchEmbed(FusedModule):
    """A Conv2d patchify (timm PatchEmbed, CrossViT PatchEmbed, PiT ConvEmbedding) as
    one patch_embed call; images the original refuses or pads go to its forward."""

    _vk_op = "patch_embed"

    def _vk_skipped(self) -> list[nn.Module]:
        s: ConvPatchSpec = self._vk.spec
        names = (s.conv, "norm") if s.norm else (s.conv,)
        return [m for m in map(self._modules.get, names) if m is not None]

    def _vk_applies(self, x: torch.Tensor) -> bool:
        s: ConvPatchSpec = self._vk.spec
        if self._vk_hooked():
            return False  # hooks on the conv or the norm: the original forward calls them
        if _traced(x):
            return True
        conv = self._modules[s.conv]
        if x.ndim != 4 or type(conv) is not nn.Conv2d or not takes_images(x, conv.weight, conv.in_channels):
            return False
        size = tuple(x.shape[-2:])
        if s.size_check == "strict" and getattr(self, "img_size", None) is not None:
            return size == tuple(self.img_size)
        if s.size_check == "divisible" and getattr(self, "img_size", None) is not None:
            ph, pw = self.patch_size
            return size[0] % ph == 0 and size[1] % pw == 0
        return True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.jit.is_scripting():
            return self._vk_base_forward(x)
        return self._vk_forward(x)

    @torch.jit.unused
    def _vk_forward(self, x: torch.Tensor) -> torch.Tensor:
        s: ConvPatchSpec = self._vk.spec
        if not self._vk_applies(x):
            return self._vk_base_forward(x)
        conv = self._modules[s.conv]
        ks, st, pad = pair(conv.kernel_size), pair(conv.stride), pair(conv.padding)
        cropped = x if _traced(x) else crop_to_grid(x, ks, st, pad)
        if cropped is None:
            return self._vk_base_forward(x)
        norm = _norm(self, "norm") if s.norm and type(self.norm) is not nn.Identity else None
        tokens = _projection(
            cropped, conv.weight, conv.bias, None, norm, self._vk.backend,
            kernel_size=ks, stride=st, padding=pad, patch_order="cpq",
        )  # (B, L, D)  # fmt: skip
        if s.tokens:
            return tokens
        # the conv's output grid, in arithmetic torch.fx can trace
        rows = (x.shape[-2] + 2 * pad[0] - ks[0]) // st[0] + 1
        cols = (x.shape[-1] + 2 * pad[1] - ks[1]) // st[1] + 1
        return tokens.transpose(1, 2).unflatten(2, (rows, cols))  # (B, D, H', W'), a view


class FusedImageEmbedder(FusedModule):
    """CrossViT's ImageEmbedder: patches (Rearrange, LayerNorm, Linear, LayerNorm),
    class token prepended, position embedding added, dropout: the first three as
    one patch_embed call."""

    _vk_op = "patch_embed"
    _vk_skips = ("to_patch_embedding",)

    def forward(self, img: torch.Tensor) -> torch.Tensor:
        if torch.jit.is_scripting():
            return self._vk_base_forward(img)
        return self._vk_forward(img)

    @torch.jit.unused
    def _vk_forward(self, img: torch.Tensor) -> torch.Tensor:
        s: PatchSpec = self._vk.spec
        seq = self.to_patch_embedding
        lin = seq._modules[s.linear]
        if not s.folds_in(seq):
            return self._vk_base_forward(img)  # a layer changed since optimize
        if self._vk_hooked() or (
            not _traced(img)
            and (
                img.ndim != 4
                or not _tiles(img, s.kernel_size)
                or not takes_images(img, lin.weight, lin.in_features // (s.kernel_size[0] * s.kernel_size[1]))
            )
        ):
            return self._vk_base_forward(img)  # hooks, unbatched, or the layers' own error
        grid = patch_grid(img.shape[-2:], s.kernel_size, s.stride, s.padding)
        D = self.pos_embedding.shape[-1]
        if self.pos_embedding.numel() // D < grid[0] * grid[1] + 1:
            return self._vk_base_forward(img)  # the table is too short: the original's error
        pos = self.pos_embedding.reshape(-1, D)[: grid[0] * grid[1] + 1]
        if widens_under_autocast(img, self.cls_token, self.pos_embedding, out_norm=s.out_norm is not None):
            # float32 tokens in eager (its cat and add promote, or its norm runs in
            # float32): the cat and add as it does them
            if self.cls_token.dtype != self.pos_embedding.dtype:
                return self._vk_base_forward(img)  # in-place or not would differ: the original
            x = _projection(
                img, lin.weight, lin.bias, _norm(seq, s.in_norm), _norm(seq, s.out_norm), self._vk.backend,
                kernel_size=s.kernel_size, stride=s.stride, padding=s.padding, patch_order=s.patch_order,
            )  # fmt: skip
            return self.dropout(add_tokens(x, self.cls_token, pos))
        x = patch_embed(
            img, lin.weight, lin.bias, kernel_size=s.kernel_size, stride=s.stride,
            padding=s.padding, patch_order=s.patch_order,
            in_norm=_norm(seq, s.in_norm), out_norm=_norm(seq, s.out_norm),
            pos_embed=pos, cls_token=self.cls_token, backend=self._vk.backend,
        )  # fmt: skip
        return self.dropout(x)
