"""performer_attention benchmarks: workloads T1 and T2 of WORKLOADS.md, batch 256.

    T1  T2T-ViT-14 layer 1 (attention1): T 3136, E 64, M 32
    T2  T2T-ViT-14 layer 2 (attention2): T 784, E 64, M 32

q, k, v are the k, q, v views of one (B, T, 3E) kqv projection output, as
Token_performer.single_attn makes them; w is the module's float32 parameter.
Implementations side by side in one process: eager (the official einsum code of
Token_performer.prm_exp / single_attn, its float32 result cast to the input dtype
as the model's next Linear does), compiled (torch.compile of eager, mode from
VITKERNELS_BENCH_COMPILE_MODE, default "max-autotune-no-cudagraphs"), torch (this
package's stock composite), triton, cuda (when the extension is built).
Directions: forward, and forward+backward (gradients of the kqv tensor for a fixed
dy). Each row (benchmark.extra_info) has the workload, impl, direction, dtype,
median time from CUDA events after warm-up, TFLOP/s, GB/s and the fraction of the
floor (roofline.py: H200 ceilings 4.3 TB/s, 788 TFLOP/s). The inputs (308 MB of
kqv at T1, 77 MB at T2) do not fit in the 50 MB L2, so they are not rotated.

Counting (each input read once, each output written once):
    forward: q, k, v read, y written: 4 B T E elements; 4 products of
        (T x E x M) per batch element: 8 B T E M flops.
    forward+backward: also dy read and dq, dk, dv written: 8 B T E elements;
        backward = 2 x forward flops (two products per forward product).

    pytest bench/test_performer.py --benchmark-json=bench/results/<gpu>-<date>.json

Targets (H100, bfloat16, T1 forward): >= 3x eager, >= 1.5x compiled, >= 60% of the floor.
"""

from __future__ import annotations

import functools
import math
import os

import pytest
import torch
from roofline import Workload, cuda_time
from roofline import reference as reference_workload

from vitkernels.backends import reference

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]

BATCH = int(os.environ.get("VITKERNELS_BENCH_BATCH", "256"))
DTYPES = {"bf16": torch.bfloat16, "f16": torch.float16}
COMPILE_MODE = os.environ.get("VITKERNELS_BENCH_COMPILE_MODE", "max-autotune-no-cudagraphs")
IMPLS = ("eager", "compiled", "torch", "triton", "cuda")
SHAPES = {"T1": (3136, 64, 32), "T2": (784, 64, 32)}  # T, E, M (vitkernels/workloads.py)
EPS = 1e-8


def official(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """Token_performer.single_attn's attention as the official T2T-ViT code writes it."""
    m, emb = w.shape

    def prm_exp(x):
        xd = ((x * x).sum(dim=-1, keepdim=True)).repeat(1, 1, m) / 2
        wtx = torch.einsum("bti,mi->btm", x.float(), w)
        return torch.exp(wtx - xd) / math.sqrt(m)

    kp, qp = prm_exp(k), prm_exp(q)
    D = torch.einsum("bti,bi->bt", qp, kp.sum(dim=1)).unsqueeze(dim=2)
    kptv = torch.einsum("bin,bim->bnm", v.float(), kp)
    y = torch.einsum("bti,bni->btn", qp, kptv) / (D.repeat(1, 1, emb) + EPS)
    return y.to(q.dtype)


def _workload(wid: str, dtype: torch.dtype, direction: str) -> Workload:
    # make_results.py groups rows by workload id: the two directions get their own
    return reference_workload(wid, direction)


@functools.lru_cache(maxsize=1)
def _setup(wid: str, dtype_name: str):
    torch._dynamo.reset()
    torch.manual_seed(0)
    T, E, M = SHAPES[wid]
    dtype = DTYPES[dtype_name]
    # kqv as a LayerNorm'd input through a Linear gives it: entries ~ N(0, 1/3)
    kqv = (torch.randn(BATCH, T, 3 * E, device="cuda") * 0.6).to(dtype)
    w = torch.nn.init.orthogonal_(torch.empty(M, E, device="cuda")) * math.sqrt(M)
    dy = torch.randn(BATCH, T, E, device="cuda", dtype=dtype)
    compiled = torch.compile(official, mode=COMPILE_MODE)
    return kqv, w, dy, compiled


def _env() -> dict[str, str]:
    import triton

    return {
        "gpu": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "triton": triton.__version__,
        "cuda": str(torch.version.cuda),
    }


def _attention(impl: str, compiled):
    import vitkernels

    if impl == "eager":
        return official
    if impl == "compiled":
        return compiled
    return lambda q, k, v, w: vitkernels.performer_attention(q, k, v, w, eps=EPS, backend=impl)


@pytest.mark.parametrize("direction", ["fwd", "fwd+bwd"])
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype_name", list(DTYPES))
@pytest.mark.parametrize("wid", list(SHAPES))
def test_performer(benchmark, wid, dtype_name, impl, direction):
    from vitkernels import cuda

    if impl == "cuda" and not cuda.has_op("performer_attention_fwd"):
        pytest.skip(cuda.unavailable_reason() or "the CUDA extension has no performer_attention_fwd")
    kqv, w, dy, compiled = _setup(wid, dtype_name)
    E = SHAPES[wid][1]
    attend = _attention(impl, compiled)

    if direction == "fwd":

        def fn():
            with torch.inference_mode():
                k, q, v = kqv.split(E, dim=-1)
                return attend(q, k, v, w)

    else:
        leaf = kqv.detach().requires_grad_()

        def fn():
            k, q, v = leaf.split(E, dim=-1)
            return torch.autograd.grad(attend(q, k, v, w), leaf, dy)[0]

    # every implementation (eager included: it sums |x|^2 in the input dtype, ~2% off
    # in bfloat16) agrees with the float64 reference on 8 batch elements before it is timed
    got = fn()[:8].double()
    small = kqv[:8].detach().double().requires_grad_(direction != "fwd")
    k, q, v = small.split(E, dim=-1)
    want = reference.performer_attention(q, k, v, w.double(), eps=EPS)
    if direction != "fwd":
        want = torch.autograd.grad(want, small, dy[:8].double())[0]
    torch.testing.assert_close(got, want, atol=0.05 * want.abs().max().item(), rtol=0.05)

    seconds = cuda_time(fn)
    dtype = DTYPES[dtype_name]
    row = _workload(wid, dtype, direction).row(
        impl, seconds, direction=direction, dtype=str(dtype).removeprefix("torch."), batch=BATCH,
        **_env(),
    )
    benchmark.extra_info.update(row)

    def timed():
        fn()
        torch.cuda.synchronize()

    benchmark.pedantic(timed, rounds=5, iterations=1)
