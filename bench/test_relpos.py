"""relpos_attention: WORKLOADS.md A1-A5, bfloat16, batch 256, forward and forward+backward.

Implementations side by side in one process, all computing the same attention
(one bias table, shared):

    eager       vit-pytorch levit.Attention's math: einsum, nn.Embedding bias / scale,
                softmax, einsum
    eager_timm  timm levit.Attention's math: q @ k^T * scale + attention_biases[:, idxs]
                (the gathered bias cached as timm caches it in eval mode; gathered
                every step in training, i.e. forward+backward)
    torch       vitkernels' torch backend: SDPA with the gathered, materialised bias
    flex        FlexAttention with a score_mod that reads the table, torch.compile'd
    compiled    torch.compile(mode=VITKERNELS_BENCH_COMPILE_MODE) of the eager module
    triton      this package's Triton kernels
    cuda        this package's CUDA extension (when built)

Each row (benchmark.extra_info, for bench/make_results.py): workload ("A1" forward,
"A1 fwd+bwd"), impl, dtype, batch, time_us (median of CUDA-event timed runs after
warm-up; input sets rotated when one set fits in L2), TFLOP/s, GB/s and the
fraction of the floor. Shapes, flops and bytes: vitkernels/workloads.py (bench/
WORKLOADS.md), through roofline.reference.

    pytest bench/test_relpos.py --benchmark-json=bench/results/<gpu>-<yyyy-mm-dd>.json
"""

from __future__ import annotations

import math
import os
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from roofline import Workload, cuda_time, reference  # noqa: E402

import vitkernels  # noqa: E402
from vitkernels import cuda as vk_cuda  # noqa: E402
from vitkernels.backends.reference import relpos_bias_index  # noqa: E402
from vitkernels.workloads import WORKLOADS as SHARED  # noqa: E402

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]

BATCH = int(os.environ.get("VITKERNELS_BENCH_BATCH", "256"))
DTYPE = torch.bfloat16
COMPILE_MODE = os.environ.get("VITKERNELS_BENCH_COMPILE_MODE", "max-autotune-no-cudagraphs")
L2_BYTES = 50 * 2**20  # H100

# id: (heads, fmap side, q_stride, Dk, Dv)
WORKLOADS = {
    wid: (s.heads, s.side, s.q_stride, s.dk, s.dv)
    for wid, w in SHARED.items()
    if w.op == "relpos_attention"
    for s in [w.shape]
}
IMPLS = ("eager", "eager_timm", "torch", "flex", "compiled", "triton", "cuda")
MODES = ("fwd", "fwd+bwd")


def shapes(wid: str) -> tuple[int, int, int, int, int, int, int, int]:
    H, side, s, Dk, Dv = WORKLOADS[wid]
    nq = (-(-side // s)) ** 2
    return BATCH, H, side, s, Dk, Dv, nq, side * side


def workload(wid: str, mode: str) -> Workload:
    return reference(wid, mode)


# ----------------------------------------------------------------------------
# the eager modules, as vit-pytorch and timm write the attention


class VitPytorchMath(nn.Module):
    """softmax(q k^T * scale + pos_bias(pos_indices) / scale) v, vit-pytorch's levit.Attention."""

    def __init__(self, table_hn: torch.Tensor, side: int, q_stride: int, scale: float) -> None:
        super().__init__()
        self.scale = scale
        self.pos_bias = nn.Embedding(side * side, table_hn.shape[0])
        with torch.no_grad():
            self.pos_bias.weight.copy_(table_hn.t() * scale)  # so that bias / scale = table
        self.register_buffer("pos_indices", relpos_bias_index((side, side), q_stride))

    def forward(self, q, k, v):
        dots = torch.einsum("b h i d, b h j d -> b h i j", q, k) * self.scale
        bias = self.pos_bias(self.pos_indices).permute(2, 0, 1).unsqueeze(0)  # '() h i j'
        attn = (dots + bias / self.scale).softmax(dim=-1)
        return torch.einsum("b h i j, b h j d -> b h i d", attn, v)


class TimmMath(nn.Module):
    """softmax(q @ k^T * scale + attention_biases[:, idxs]) @ v, timm's levit.Attention."""

    def __init__(self, table_hn: torch.Tensor, side: int, q_stride: int, scale: float) -> None:
        super().__init__()
        self.scale = scale
        self.attention_biases = nn.Parameter(table_hn.clone())
        self.register_buffer("attention_bias_idxs", relpos_bias_index((side, side), q_stride))
        self.cache: torch.Tensor | None = None

    def forward(self, q, k, v):
        if self.training or self.cache is None:
            ab = self.attention_biases[:, self.attention_bias_idxs]
            if not self.training:
                self.cache = ab
        else:
            ab = self.cache
        attn = (q @ k.transpose(-2, -1) * self.scale + ab).softmax(dim=-1)
        return attn @ v


def flex_fn(table_hn: torch.Tensor, side: int, q_stride: int, scale: float):
    from torch.nn.attention.flex_attention import flex_attention

    cq = -(-side // q_stride)
    compiled = torch.compile(flex_attention, dynamic=False)

    def score_mod(score, b, h, q_idx, kv_idx):
        dr = ((q_idx // cq) * q_stride - kv_idx // side).abs()
        dc = ((q_idx % cq) * q_stride - kv_idx % side).abs()
        return score + table_hn[h, dr * side + dc]

    return lambda q, k, v: compiled(q, k, v, score_mod=score_mod, scale=scale)


def implementation(impl: str, table: torch.Tensor, side: int, q_stride: int, scale: float, train: bool):
    """fn(q, k, v) -> out for one implementation, or a string saying why it cannot run."""
    if impl in ("eager", "eager_timm", "compiled"):
        cls = TimmMath if impl == "eager_timm" else VitPytorchMath
        module = cls(table, side, q_stride, scale).cuda().to(DTYPE).train(train)
        if impl == "compiled":
            return torch.compile(module, mode=COMPILE_MODE)
        return module
    if impl == "flex":
        return flex_fn(table, side, q_stride, scale)
    if impl == "cuda" and not vk_cuda.has_op("relpos_attention_fwd"):
        return vk_cuda.unavailable_reason() or "the CUDA extension has no relpos_attention ops"
    return lambda q, k, v: vitkernels.relpos_attention(
        q, k, v, table, fmap_size=side, q_stride=q_stride, scale=scale, backend=impl
    )


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("wid", list(WORKLOADS))
def test_relpos_attention(benchmark, wid, mode, impl):
    B, H, side, s, Dk, Dv, nq, nk = shapes(wid)
    train = mode == "fwd+bwd"
    torch.manual_seed(0)
    table = torch.randn(H, nk, device="cuda", dtype=DTYPE, requires_grad=train)
    scale = Dk**-0.5
    fn = implementation(impl, table, side, s, scale, train)
    if isinstance(fn, str):
        pytest.skip(fn)

    wl = workload(wid, mode)
    per_set = sum(B * H * n * d * 2 for n, d in ((nq, Dk), (nk, Dk), (nk, Dv)))
    sets = []
    for _ in range(max(1, min(8, math.ceil(2 * L2_BYTES / per_set)))):
        q, k, v = (
            torch.randn(B, H, n, d, device="cuda", dtype=DTYPE, requires_grad=train)
            for n, d in ((nq, Dk), (nk, Dk), (nk, Dv))
        )
        sets.append((q, k, v, torch.randn(B, H, nq, Dv, device="cuda", dtype=DTYPE)))

    kernel_path = impl in ("torch", "flex", "triton", "cuda")
    params = [table] if kernel_path else list(fn.parameters())
    step = [0]

    def run():
        q, k, v, g = sets[step[0] % len(sets)]
        step[0] += 1
        if train:
            torch.autograd.grad(fn(q, k, v), [q, k, v, *params], g)
        else:
            with torch.no_grad():
                fn(q, k, v)

    # one step, and the same attention as the float32 reference math, before timing
    q, k, v, _ = sets[0]
    try:
        run()
        with torch.no_grad():
            out = fn(q, k, v)
    except Exception as exc:
        if impl != "flex":
            raise
        pytest.skip(f"FlexAttention cannot run {wid} {mode}: {type(exc).__name__}: {exc}")
    want = vitkernels.relpos_attention(
        q.float(), k.float(), v.float(), table.float(), fmap_size=side, q_stride=s, scale=scale,
        backend="reference",
    )  # fmt: skip
    err = (out.float() - want).abs().max().item()
    assert err <= 3e-2 * want.abs().max().item(), f"{impl} {wid}: max error {err:.3e}"

    seconds = cuda_time(run)
    benchmark.extra_info.update(
        wl.row(impl, seconds, dtype=str(DTYPE).removeprefix("torch."), batch=BATCH, mode=mode,
               gpu=torch.cuda.get_device_name())
    )  # fmt: skip

    def timed():
        run()
        torch.cuda.synchronize()

    benchmark.pedantic(timed, rounds=5, iterations=1)
