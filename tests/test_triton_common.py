"""vitkernels/triton/_common.py: launches run on their tensors' device."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

from vitkernels.triton import _common  # noqa: E402


class _Kernel:
    def __init__(self, seen):
        self.seen = seen

    def __getitem__(self, grid):
        return lambda *args, **kw: self.seen.append(("launch", grid, kw["num_warps"]))


def test_launch_runs_inside_the_device_guard_of_its_tensors(monkeypatch):
    seen = []

    class Guard:
        def __init__(self, *tensors):
            self.tensors = tensors

        def __enter__(self):
            seen.append(("enter", self.tensors[0]))

        def __exit__(self, *exc):
            seen.append(("exit",))

    monkeypatch.setattr(_common, "device_guard", Guard)
    t = torch.empty(2)
    _common.launch(_common.Launch("k", _Kernel(seen), (3,), [t, 1], {}, 4, 1))
    assert seen == [("enter", t), ("launch", (3,), 4), ("exit",)]


def test_device_guard_is_a_no_op_without_cuda_tensors():
    with _common.device_guard(torch.empty(1), 3, None):
        pass
    assert type(_common.device_guard(torch.empty(1, device="meta"))) is type(_common.device_guard())


@pytest.mark.gpu
def test_device_guard_is_skipped_for_the_current_device():
    """A launch on the current device enters no torch.cuda.device guard (host time per
    launch); one on another device still does (the two-GPU test below runs them)."""
    t = torch.empty(1, device="cuda")
    assert type(_common.device_guard(3, t)) is type(_common.device_guard())
    other = torch.device("cuda", (torch.cuda.current_device() + 1) % max(2, torch.cuda.device_count()))
    if torch.cuda.device_count() > 1:
        assert isinstance(_common.device_guard(torch.empty(1, device=other)), torch.cuda.device)


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA GPUs (a non-current device)")
@pytest.mark.parametrize(
    "op", ["relpos_attention", "performer_attention", "patch_embed", "head_mixing_attention"]
)
def test_ops_on_a_non_current_device(op):
    """Tensors on cuda:1 while cuda:0 is current: the kernels must run on cuda:1."""
    import vitkernels

    dev = torch.device("cuda", 1)

    def t(*shape):
        return torch.randn(*shape, device=dev, dtype=torch.bfloat16)

    fn = getattr(vitkernels, op)
    args, kw = {
        "relpos_attention": ((t(2, 2, 16, 16), t(2, 2, 16, 16), t(2, 2, 16, 32), t(2, 16)), {"fmap_size": 4}),
        "performer_attention": ((t(2, 40, 16), t(2, 40, 16), t(2, 40, 16), t(8, 16)), {}),
        "patch_embed": ((t(2, 3, 16, 16), t(32, 3, 4, 4), t(32)), {"kernel_size": 4}),
        "head_mixing_attention": (
            (t(2, 4, 16, 32), t(2, 4, 16, 32), t(2, 4, 16, 32)),
            {"pre": (t(4, 4), t(4)), "post": (t(4, 4), None)},
        ),
    }[op]
    def dbl(x):
        if isinstance(x, tuple):
            return tuple(dbl(y) for y in x)
        return x.double() if isinstance(x, torch.Tensor) else x

    torch.cuda.set_device(0)
    want = fn(*dbl(args), **{k: dbl(a) for k, a in kw.items()}, backend="reference")
    out = fn(*args, **kw, backend="triton")
    torch.cuda.synchronize(dev)
    assert out.device == dev
    err = (out.double() - want).abs().max().item()
    assert err <= 3e-2 * want.abs().max().item(), f"{op} on cuda:1: max error {err:.3e}"
