"""performer_attention on CUDA: the triton backend (and cuda, when the extension is
built) against the float64 reference, float16 / bfloat16 / float32, at the
WORKLOADS shapes (T1: T 3136, T2: T 784; E 64, M 32) and odd ones, with gradients,
large-norm inputs, determinism, torch.compile and an optimized T2T-ViT-14.
"""

from __future__ import annotations

import math

import pytest
import torch
from _numerics import GRAD_TOL, TOL, assert_close

import vitkernels
from vitkernels import cuda as vk_cuda
from vitkernels.backends import reference
from vitkernels.ops import performer as performer_ops

pytestmark = pytest.mark.gpu

tk = pytest.importorskip("vitkernels.triton.performer")

DEV = "cuda"
KERNELS = ["triton"] + (["cuda"] if vk_cuda.has_op("performer_attention_fwd") else [])
DTYPES = {"f16": torch.float16, "bf16": torch.bfloat16, "f32": torch.float32}
SHAPES = [  # B, T, E, M
    (4, 3136, 64, 32),  # T1
    (8, 784, 64, 32),  # T2
    (3, 1, 48, 24),
    (2, 17, 48, 24),
    (2, 1000, 20, 5),
    (3, 3137, 64, 32),
    (1, 4096, 33, 17),
    (1, 4096, 40, 17),
]


def kernel_dtypes(backend: str) -> list[str]:
    return ["f16", "bf16"] if backend == "cuda" else list(DTYPES)


def features(M: int, E: int, norm: float | None = None) -> torch.Tensor:
    w = torch.nn.init.orthogonal_(torch.empty(M, E, device=DEV))
    return w * (math.sqrt(M) if norm is None else norm)


def kqv_views(B, T, E, dtype, scale=2.0):
    kqv = (torch.randn(B, T, 3 * E, device=DEV) * scale / math.sqrt(E)).to(dtype)
    k, q, v = kqv.split(E, dim=-1)
    return q, k, v



@pytest.fixture
def poisoned(monkeypatch):
    def alloc(shape, dtype, device):
        return torch.full(shape, float("nan"), dtype=dtype, device=device)

    monkeypatch.setattr(tk, "_alloc", alloc)


# the triton 16-bit forward at B1 T4096 M17 came out wrong on an H200 at E 33, 34 and 40
# (relative error 0.7-0.9, 2026-12-04, bench/NOTES.md; float32 right), so the backend
# refuses those E on a GPU (performer_ops.gpu_wrong_e). The kernels have since changed
# there (TRANS_LOAD: the dots' transposed operands loaded from memory); the test runs
# them with the refusal lifted and expects them right, which no GPU has shown yet
WRONG_ON_GPU: set = set()


def cases():
    for backend in KERNELS:
        for dt in kernel_dtypes(backend):
            for shape in SHAPES:
                marks = ([pytest.mark.xfail(strict=True, reason="wrong on an H200, 2026-12-04")]
                         if (backend, dt, shape) in WRONG_ON_GPU else [])  # fmt: skip
                yield pytest.param(backend, dt, shape, id=f"{backend}-{dt}-B{shape[0]}T{shape[1]}"
                                   f"E{shape[2]}M{shape[3]}", marks=marks)


@pytest.mark.parametrize("backend,dt,shape", list(cases()))
def test_forward_and_gradients(backend, dt, shape, poisoned, monkeypatch):
    dtype = DTYPES[dt]
    B, T, E, M = shape
    if backend == "triton" and performer_ops.gpu_wrong_e(E):
        q, k, v = kqv_views(1, 4, E, dtype)
        with pytest.raises(vitkernels.BackendNotSupportedError, match=f"E={E}: on a GPU"):
            vitkernels.performer_attention(q, k, v, features(M, E), backend="triton")
        monkeypatch.setattr(performer_ops, "REFUSE_WRONG_E_ON_GPU", False)
        performer_ops._DECISIONS.clear()
    q, k, v = kqv_views(B, T, E, dtype)
    w = features(M, E).requires_grad_()
    leaves = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    y = vitkernels.performer_attention(*leaves, w, backend=backend)
    assert y.dtype == dtype
    g = torch.randn_like(y)
    grads = torch.autograd.grad(y, [*leaves, w], g)

    leaves64 = [t.detach().double().requires_grad_() for t in (q, k, v)]
    w64 = w.detach().double().requires_grad_()
    y64 = reference.performer_attention(*leaves64, w64)
    grads64 = torch.autograd.grad(y64, [*leaves64, w64], g.double())
    assert_close(y, y64, TOL[dtype], "y")
    floor = 0.1 * max(b.abs().max().item() for b in grads64)
    for name, a, b in zip("qkvw", grads, grads64, strict=True):
        assert_close(a, b, GRAD_TOL[dtype], f"d{name}", floor=floor)


@pytest.mark.parametrize("backend", KERNELS)
def test_gradients_with_nearly_equal_feature_means(backend, poisoned):
    """v = 4 + 0.05 noise, small q and k: every vbar[m] is ~4 with a far smaller
    spread, which is all dl = r (dy . vbar[m] - dy . y) sees; vbar rounded to 10 bits
    there put dq and dk off by 1.6-3.6% of their scales (the CUDA kernel, emulated),
    hence the hi + lo split of vbar in both kernels."""
    B, T, E, M = 4, 100, 56, 20
    q, k = ((torch.randn(B, T, E, device=DEV) * 0.3).half().requires_grad_() for _ in range(2))
    v = (4.0 + 0.05 * torch.randn(B, T, E, device=DEV)).half().requires_grad_()
    w = torch.randn(M, E, device=DEV)
    y = vitkernels.performer_attention(q, k, v, w, backend=backend)
    g = torch.randn_like(y)
    grads = torch.autograd.grad(y, [q, k, v], g)
    leaves64 = [t.detach().double().requires_grad_() for t in (q, k, v)]
    y64 = reference.performer_attention(*leaves64, w.double())
    grads64 = torch.autograd.grad(y64, leaves64, g.double())
    assert_close(y, y64, TOL[torch.float16], "y")
    for name, a, b in zip("qkv", grads, grads64, strict=True):
        assert_close(a, b, GRAD_TOL[torch.float16], f"d{name}", floor=1e-2)


@pytest.mark.parametrize("backend", KERNELS)
@pytest.mark.parametrize("dt", ["f16", "bf16"])
def test_half_inputs_with_half_w(backend, dt, poisoned):
    dtype = DTYPES[dt]
    q, k, v = kqv_views(4, 784, 64, dtype)
    w = features(32, 64).to(dtype)
    y = vitkernels.performer_attention(q, k, v, w, backend=backend)
    expected = reference.performer_attention(q.double(), k.double(), v.double(), w.double())
    assert_close(y, expected, TOL[dtype], "y")


@pytest.mark.parametrize("backend", KERNELS)
def test_full_batch_t1_forward(backend, poisoned):
    """T1 as benchmarked: batch 256, bfloat16, every program of the real grid."""
    q, k, v = kqv_views(256, 3136, 64, torch.bfloat16)
    w = features(32, 64)
    y = vitkernels.performer_attention(q, k, v, w, backend=backend)
    expected = torch.cat([
        reference.performer_attention(q[i:i + 32].double(), k[i:i + 32].double(),
                                      v[i:i + 32].double(), w.double())
        for i in range(0, 256, 32)
    ])
    assert_close(y, expected, TOL[torch.bfloat16], "y")


@pytest.mark.parametrize("backend", KERNELS)
@pytest.mark.parametrize("kind", ["overflow", "mixed", "eps"])
def test_large_norms(backend, kind, poisoned):
    from test_performer import large_norm_case

    q, k, v, w = (t.to(DEV) for t in large_norm_case(kind))
    for dtype in ([torch.float32] if backend == "triton" else []) + [torch.float16]:
        # the cases' norms fit float16; bfloat16 rounds q too coarsely to keep a_q
        qd, kd, vd, wd = q.to(dtype), k.to(dtype), v.to(dtype), w
        leaves = [t.clone().requires_grad_() for t in (qd, kd, vd)]
        y = vitkernels.performer_attention(*leaves, wd, backend=backend)
        leaves64 = [t.double().requires_grad_() for t in (qd, kd, vd)]
        y64 = reference.performer_attention(*leaves64, wd.double())
        assert torch.isfinite(y64).all()
        tol = 2e-3 if dtype == torch.float32 else 2e-2
        assert_close(y, y64, tol, f"{dtype} y")
        g = torch.randn_like(y)
        grads = torch.autograd.grad(y, leaves, g)
        grads64 = torch.autograd.grad(y64, leaves64, g.double())
        floor = 0.1 * max(b.abs().max().item() for b in grads64)
        for name, a, b in zip("qkv", grads, grads64, strict=True):
            assert_close(a, b, 5 * tol, f"{dtype} d{name}", floor=floor)


@pytest.mark.parametrize("backend", KERNELS)
def test_deterministic(backend):
    q, k, v = kqv_views(16, 3136, 64, torch.bfloat16)
    w = features(32, 64).requires_grad_()
    leaves = [t.detach().requires_grad_() for t in (q, k, v)]
    g = torch.randn(16, 3136, 64, device=DEV, dtype=torch.bfloat16)
    runs = []
    for _ in range(3):
        y = vitkernels.performer_attention(*leaves, w, backend=backend)
        runs.append((y, *torch.autograd.grad(y, [*leaves, w], g)))
    for other in runs[1:]:
        for a, b in zip(runs[0], other, strict=True):
            assert torch.equal(a, b)


@pytest.mark.parametrize("backend", KERNELS)
def test_torch_compile_fullgraph(backend):
    q, k, v = kqv_views(4, 784, 64, torch.bfloat16)
    w = features(32, 64)
    leaves = [t.detach().requires_grad_() for t in (q, k, v)]

    def f(q, k, v):
        return vitkernels.performer_attention(q, k, v, w, backend=backend).float().square().sum()

    grads = torch.autograd.grad(torch.compile(f, fullgraph=True)(*leaves), leaves)
    leaves64 = [t.detach().double().requires_grad_() for t in (q, k, v)]
    want = torch.autograd.grad(
        reference.performer_attention(*leaves64, w.double()).square().sum(), leaves64
    )
    for a, b in zip(grads, want, strict=True):
        assert_close(a, b, GRAD_TOL[torch.bfloat16])


def test_automatic_dispatch_on_cuda_is_a_kernel():
    from vitkernels import evidence
    from vitkernels.ops import performer as ops

    q, k, v = kqv_views(2, 64, 64, torch.bfloat16)
    chosen, verdicts = ops.which_backend(q, k, v, features(32, 64))
    # cuda where it is built and the speed evidence puts it at least as fast as triton
    faster = evidence.verdict("performer_attention", "cuda", "triton", torch.cuda.get_device_capability()).take
    assert chosen == ("cuda" if KERNELS[-1] == "cuda" and faster else "triton"), verdicts
    q64 = q.double()
    chosen, verdicts = ops.which_backend(q64, q64, q64, features(32, 64))
    assert chosen == "torch", verdicts


@pytest.mark.parametrize("backend", KERNELS)
def test_t2t_vit_14_optimized(backend):
    from vitkernels.models import create

    torch.manual_seed(0)
    model = create("t2t_vit_14").to(DEV).eval()
    x = torch.randn(4, 3, 224, 224, device=DEV)
    with torch.no_grad():
        expected = model(x)
        report = vitkernels.optimize(model, backend=backend, ops=("performer_attention",))
        assert report.count() == 2
        if backend == "triton":  # float32 kernels
            assert_close(model(x), expected, 1e-4, "fp32 logits")
        with torch.autocast("cuda", dtype=torch.bfloat16):
            got = model(x)
    assert_close(got.float(), expected, 0.1, "bf16 autocast logits")
