"""Input checks the attention ops share."""

from __future__ import annotations

import torch

__all__ = ["check_qkv"]


def _shape(t: torch.Tensor) -> str:
    return str(tuple(t.shape))


def check_qkv(op: str, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
    """k (B, H, Nk, Dk) and v (B, H, Nk, Dv) match q (B, H, Nq, Dk) (q.ndim already
    checked), every size is at least 1, and q, k, v share a dtype; else an error that
    names the op, what was given and what was expected."""
    B, H, Nq, Dk = q.shape
    if k.ndim != 4 or k.shape[0] != B or k.shape[1] != H or k.shape[3] != Dk:
        raise ValueError(
            f"{op}: k has shape {_shape(k)}; expected (B, H, Nk, Dk) = "
            f"({B}, {H}, Nk, {Dk}) to match q {_shape(q)}"
        )
    Nk = k.shape[2]
    if v.ndim != 4 or v.shape[0] != B or v.shape[1] != H or v.shape[2] != Nk:
        raise ValueError(
            f"{op}: v has shape {_shape(v)}; expected (B, H, Nk, Dv) = "
            f"({B}, {H}, {Nk}, Dv) to match q {_shape(q)} and k {_shape(k)}"
        )
    if H < 1 or Nq < 1 or Nk < 1 or Dk < 1 or v.shape[3] < 1:
        raise ValueError(
            f"{op}: q {_shape(q)}, k {_shape(k)}, v {_shape(v)}; expected H, Nq, Nk, Dk and Dv >= 1"
        )
    for name, t in (("k", k), ("v", v)):
        if t.dtype != q.dtype:
            raise TypeError(
                f"{op}: {name} has dtype {t.dtype} but q has {q.dtype}; expected q, k, v of one dtype"
            )
