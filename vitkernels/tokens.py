"""The token protocol: patch tokens, class token and position embedding.

What every model of this package's zoo does after its patch embedding::

    x = to_patch_embedding(img)                  # (b, n, d)
    x = cat(prefix repeated over b, x)           # prefix (k, d) or (1, k, d); None: none
    x = x + pos_embedding[first k + n rows]      # (t, d) or (1, t, d)

A patch embedding that can do all of it in one pass offers a method
``embed_tokens(img, prefix, pos_embedding)`` with exactly this meaning (the
fused patch embeddings ``vitkernels.optimize`` installs do), and models that
call ``embed_tokens(to_patch_embedding, img, prefix, pos_embedding)`` get it:
the class token and the position embedding stay the model's parameters, so the
state_dict does not change.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn.modules import module as _module

__all__ = ["add_tokens", "embed_tokens"]


def _has_hooks(m: nn.Module) -> bool:
    """Hooks on ``m`` or on every module: a call must go through __call__."""
    return bool(
        m._forward_hooks
        or m._forward_pre_hooks
        or m._backward_hooks
        or m._backward_pre_hooks
        or _module._global_forward_hooks
        or _module._global_forward_pre_hooks
        or _module._global_backward_hooks
        or _module._global_backward_pre_hooks
    )


def embed_tokens(
    to_patch_embedding: nn.Module,
    img: torch.Tensor,
    prefix: torch.Tensor | None,
    pos_embedding: torch.Tensor,
) -> torch.Tensor:
    """Patch tokens of ``img`` with ``prefix`` tokens prepended and positions added.

    Calls ``to_patch_embedding.embed_tokens(img, prefix, pos_embedding)`` where the
    module has that method (and no forward hooks, which only a module call fires),
    else ``add_tokens(to_patch_embedding(img), prefix, pos_embedding)``.
    """
    fused = getattr(to_patch_embedding, "embed_tokens", None)
    if fused is not None and not _has_hooks(to_patch_embedding):
        return fused(img, prefix, pos_embedding)
    return add_tokens(to_patch_embedding(img), prefix, pos_embedding)


def add_tokens(
    x: torch.Tensor, prefix: torch.Tensor | None, pos_embedding: torch.Tensor
) -> torch.Tensor:
    """``cat(prefix repeated over b, x) + pos_embedding[first k + n rows]`` for (b, n, d)
    patch tokens (see ``embed_tokens``)."""
    b, _, d = x.shape
    if prefix is not None and prefix.numel():
        x = torch.cat((prefix.reshape(1, -1, d).expand(b, -1, -1), x), dim=1)
    return x + pos_embedding.reshape(-1, d)[: x.shape[1]]
