"""DeiT-style knowledge distillation in the layout of lucidrains vit-pytorch 1.26.x ``distill.py``.

``DistillableViT`` and ``DistillableT2TViT`` are ViT / T2TViT whose ``forward``
optionally takes a distillation token: it is appended after the (position
embedded) class and patch tokens, goes through the transformer with them, and
comes back as a second output. ``DistillWrapper`` owns that token and the head
on it, and turns (images, labels) into the DeiT loss against a frozen teacher:
soft (KL divergence at a temperature) or hard (cross-entropy with the teacher's
argmax). Parameter names are vit-pytorch's, so checkpoints load with
``strict=True`` both ways.

vit-pytorch's own ``DistillableT2TViT`` fails on every call, distillation or
not: its shared forward was written for ViT's newer 2-D ``cls_token`` (n, d)
and repeats it with ``'n d -> b n d'``, but T2TViT keeps a 3-D (1, 1, d) class
token (and a (1, n, d) positional embedding), so einops raises. Here the mixin
owns no embedding code: it calls the model's own ``_embed``, ``_attend`` and
``_head`` steps, which ViT and T2TViT both provide with their own layouts.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from einops import repeat
from torch import nn

from .t2t import T2TViT
from .vit import ViT, named_config

__all__ = ["CONFIGS", "DistillMixin", "DistillWrapper", "DistillableT2TViT", "DistillableViT"]


class DistillMixin:
    """Adds an optional distillation token to a model with ``_embed``/``_attend``/``_head``.

    The model is built from keyword arguments only (kept in ``self.kwargs``);
    ``dim`` and ``num_classes`` are kept as attributes for ``DistillWrapper``.
    Subclasses set ``plain_class``, the model class ``to_vit`` converts to.
    """

    plain_class: type[nn.Module]

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.kwargs = kwargs
        self.dim: int = kwargs["dim"]
        self.num_classes: int = kwargs["num_classes"]

    def forward(
        self, img: torch.Tensor, distill_token: torch.Tensor | None = None
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Logits, or (logits, distilled token (b, dim)) when ``distill_token`` is given.

        Args:
            img: (b, channels, H, W) images.
            distill_token: one token of width ``dim``, any shape with ``dim``
                elements (DistillWrapper passes (1, dim)).
        """
        x = self._embed(img)  # b n d
        if distill_token is None:
            return self._head(self._attend(x))

        dim = x.shape[-1]
        if distill_token.numel() != dim:
            raise ValueError(
                f"{type(self).__name__}: distill_token of shape {tuple(distill_token.shape)}; "
                f"expected one token of width dim={dim}, e.g. shape (1, {dim})"
            )
        distill_tokens = repeat(distill_token.reshape(1, dim), "1 d -> b 1 d", b=x.shape[0])
        x = self._attend(torch.cat((x, distill_tokens), dim=1))  # b (n + 1) d
        x, distill_tokens = x[:, :-1], x[:, -1]
        return self._head(x), distill_tokens

    def to_vit(self) -> nn.Module:
        """The same weights in a ``plain_class`` model (no distillation token)."""
        model = self.plain_class(**copy.deepcopy(self.kwargs))
        model.load_state_dict(self.state_dict())
        return model


class DistillableViT(DistillMixin, ViT):
    """ViT with an optional distillation token; takes ViT's keyword arguments."""

    plain_class = ViT


class DistillableT2TViT(DistillMixin, T2TViT):
    """T2TViT with an optional distillation token; takes T2TViT's keyword arguments."""

    plain_class = T2TViT


class DistillWrapper(nn.Module):
    """Training wrapper: student loss against labels plus distillation loss against a teacher.

    Args:
        teacher: any model mapping images to (b, num_classes) logits; run
            under ``torch.no_grad`` (put it in eval mode yourself).
        student: a DistillableViT or DistillableT2TViT with ``num_classes > 0``.
        temperature: softmax temperature of the soft distillation loss.
        alpha: weight of the distillation loss; the label loss gets ``1 - alpha``.
        hard: hard distillation (cross-entropy with the teacher's argmax)
            instead of soft (KL divergence at ``temperature``, times T^2).
        mlp_layernorm: put a LayerNorm before the distillation head's Linear.
    """

    def __init__(
        self,
        *,
        teacher: nn.Module,
        student: DistillMixin,
        temperature: float = 1.0,
        alpha: float = 0.5,
        hard: bool = False,
        mlp_layernorm: bool = False,
    ) -> None:
        super().__init__()
        name = type(self).__name__
        if not isinstance(student, DistillMixin):
            raise TypeError(
                f"{name}: student is a {type(student).__name__}; expected a model with a "
                f"distillation token (DistillableViT or DistillableT2TViT)"
            )
        if student.num_classes < 1:
            raise ValueError(
                f"{name}: student has num_classes={student.num_classes}; expected a classifier "
                f"(num_classes >= 1)"
            )
        if not temperature > 0:
            raise ValueError(f"{name}: temperature={temperature!r}; expected a positive number")
        if not 0 <= alpha <= 1:
            raise ValueError(f"{name}: alpha={alpha!r}; expected a weight in [0, 1]")

        self.teacher = teacher
        self.student = student

        dim = student.dim
        num_classes = student.num_classes
        self.temperature = temperature
        self.alpha = alpha
        self.hard = hard

        self.distillation_token = nn.Parameter(torch.randn(1, dim))
        self.distill_mlp = nn.Sequential(
            nn.LayerNorm(dim) if mlp_layernorm else nn.Identity(),
            nn.Linear(dim, num_classes),
        )

    def forward(
        self,
        img: torch.Tensor,
        labels: torch.Tensor,
        temperature: float | None = None,
        alpha: float | None = None,
        **kwargs: Any,
    ) -> torch.Tensor:
        """The scalar training loss.

        Args:
            img: (b, channels, H, W) images.
            labels: (b,) class indices.
            temperature: overrides the constructor's temperature for this call.
            alpha: overrides the constructor's alpha for this call.
            **kwargs: passed on to the student.
        """
        alpha = self.alpha if alpha is None else alpha
        T = self.temperature if temperature is None else temperature

        with torch.no_grad():
            teacher_logits = self.teacher(img)

        student_logits, distill_tokens = self.student(
            img, distill_token=self.distillation_token, **kwargs
        )
        if teacher_logits.shape != student_logits.shape:
            raise ValueError(
                f"{type(self).__name__}: teacher logits of shape {tuple(teacher_logits.shape)}; "
                f"expected the student's shape {tuple(student_logits.shape)} (same classes)"
            )
        distill_logits = self.distill_mlp(distill_tokens)  # b num_classes

        loss = F.cross_entropy(student_logits, labels)
        if self.hard:
            distill_loss = F.cross_entropy(distill_logits, teacher_logits.argmax(dim=-1))
        else:
            distill_loss = F.kl_div(
                F.log_softmax(distill_logits / T, dim=-1),
                F.softmax(teacher_logits / T, dim=-1),
                reduction="batchmean",
            ) * (T**2)
        return loss * (1 - alpha) + distill_loss * alpha


def _deit(dim: int, heads: int) -> dict[str, Any]:
    return dict(
        image_size=224,
        patch_size=16,
        num_classes=1000,
        dim=dim,
        depth=12,
        heads=heads,
        dim_head=64,
        mlp_dim=4 * dim,
    )


_DEIT_NOTE = (
    "Train it with DistillWrapper. Deviations forced by vit-pytorch's layout: LayerNorms around "
    "the patch projection, bias-free qkv, and the distillation head lives in DistillWrapper, so "
    "inference uses the class-token head alone (DeiT averages both heads)."
)

CONFIGS: dict[str, Callable[..., nn.Module]] = {
    "deit_ti": named_config(
        DistillableViT,
        f"DeiT-Ti (Touvron et al. 2021): 12 blocks of width 192, 3 heads of width 64, MLP 768. "
        f"{_DEIT_NOTE}",
        **_deit(192, 3),
    ),
    "deit_s": named_config(
        DistillableViT,
        f"DeiT-S (Touvron et al. 2021): 12 blocks of width 384, 6 heads of width 64, MLP 1536. "
        f"{_DEIT_NOTE}",
        **_deit(384, 6),
    ),
    "deit_b": named_config(
        DistillableViT,
        f"DeiT-B (Touvron et al. 2021): 12 blocks of width 768, 12 heads of width 64, MLP 3072. "
        f"{_DEIT_NOTE}",
        **_deit(768, 12),
    ),
}
