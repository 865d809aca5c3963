"""The one numerics check the tests share: a result against a float64 reference.

    error = max |actual - expected| / max(max |expected|, floor)

is the error relative to the reference's max norm; it must stay within ``tol``.
Any NaN or inf, in the result or in the reference, fails (a test whose reference
is not finite checks nothing; test NaN propagation with explicit masks instead).

Tolerances are per dtype of the result (``TOL`` for values, ``GRAD_TOL`` for
gradients, which sum products of rounded intermediates); a test whose op rounds
more (a kernel's TF32 products on a GPU, a bias table summed in half precision)
passes its own ``tol`` and says why. The floor is dtype-aware:
by default the dtype's smallest normal number, below which values lose relative
precision; a caller whose reference can be near zero by cancellation of O(1) terms
(a softmax gradient over a single key) passes the scale of those terms instead.
"""

from __future__ import annotations

import torch

__all__ = ["FLOOR", "GRAD_TOL", "TOL", "assert_close", "rel_err"]

TOL = {torch.float64: 1e-10, torch.float32: 2e-5, torch.float16: 4e-3, torch.bfloat16: 2e-2}
GRAD_TOL = {torch.float64: 1e-9, torch.float32: 5e-5, torch.float16: 1e-2, torch.bfloat16: 5e-2}
FLOOR = {dtype: torch.finfo(dtype).tiny for dtype in TOL}


def rel_err(actual: torch.Tensor, expected: torch.Tensor, floor: float = 0.0) -> float:
    """max |actual - expected| / max(max |expected|, floor), in float64; inf when either
    side has a NaN or inf."""
    a, e = actual.detach().double(), expected.detach().double()
    if not (bool(torch.isfinite(a).all()) and bool(torch.isfinite(e).all())):
        return float("inf")
    if a.numel() == 0:
        return 0.0
    scale = max(e.abs().max().item(), floor)
    err = (a - e).abs().max().item()
    return err / scale if scale > 0 else (0.0 if err == 0 else float("inf"))


def assert_close(
    actual: torch.Tensor,
    expected: torch.Tensor,
    tol: float | None = None,
    what: str = "",
    *,
    floor: float | None = None,
    grad: bool = False,
    dtype: torch.dtype | None = None,
) -> None:
    """Assert ``actual`` matches the reference ``expected`` (float64 where it matters).

    Args:
        tol: the largest relative error allowed; default ``TOL`` (``GRAD_TOL`` with
            grad=True) of actual's dtype.
        what: names the value in the failure message.
        floor: the smallest reference scale errors are measured against; default
            ``FLOOR`` of actual's dtype.
        grad: take the gradient tolerance by default.
        dtype: when given, actual must have this dtype.
    """
    label = f"{what}: " if what else ""
    assert tuple(actual.shape) == tuple(expected.shape), (
        f"{label}shape {tuple(actual.shape)}, expected {tuple(expected.shape)}"
    )
    if dtype is not None:
        assert actual.dtype == dtype, f"{label}dtype {actual.dtype}, expected {dtype}"
    if tol is None:
        tol = (GRAD_TOL if grad else TOL)[actual.dtype]
    if floor is None:
        floor = FLOOR.get(actual.dtype, 0.0)
    a_bad = int((~torch.isfinite(actual.detach())).sum())
    e_bad = int((~torch.isfinite(expected.detach())).sum())
    assert a_bad == 0, f"{label}{a_bad} of {actual.numel()} values are NaN or inf"
    assert e_bad == 0, f"{label}the reference has {e_bad} NaN or inf values: it checks nothing"
    err = rel_err(actual, expected, floor)
    scale = max(expected.detach().abs().max().item(), floor) if expected.numel() else floor
    assert err <= tol, (
        f"{label}max error {err * scale:.3e} is {err:.3e} of the reference scale {scale:.3e}; "
        f"allowed {tol:.1e}"
    )
