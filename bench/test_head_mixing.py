"""head_mixing_attention: CaiT-XXS24's talking heads and DeepViT-S's re-attention,
bfloat16, batch 256, forward and forward+backward.

Workloads (heads mixed around the softmax; floors by WORKLOADS.md's rules):

    M1  CaiT-XXS24 talking heads (vit-pytorch/this repo: mixing weights, no biases)
        H4, N196, D48
    M2  DeepViT-S re-attention as models/deepvit.py configures it: post-mix and
        LayerNorm over heads, H12, N197, D33

Flops and bytes are vitkernels/workloads.py's (bench/WORKLOADS.md); M3 (CaiT's
class attention, one query) is estimated, not benchmarked here.

Implementations side by side in one process, all computing the same attention:

    eager        the module as vit-pytorch writes it (einsum, einsum('b h i j, h g ->
                 b g i j') mixing, softmax, LayerNorm over a rearranged head axis)
    eager_timm   timm's TalkingHeadAttn math (M1 only): q * scale @ k^T, nn.Linear
                 proj_l / proj_w on the permuted head axis
    compiled     torch.compile(mode=VITKERNELS_BENCH_COMPILE_MODE) of the eager module
    torch        vitkernels' torch backend (bmm mixing on materialised maps)
    triton       this package's Triton kernels (refused, with the reason recorded as
                 the skip message, where the shape is outside their envelope; M1 and
                 M2 are inside it in both modes: M2's 12 heads take the tensor-core
                 forward and backward of head_mixing_tc.py)

Each row (benchmark.extra_info, for bench/make_results.py): workload ("M1" forward,
"M1 fwd+bwd"), impl, dtype, batch, time_us (median of CUDA-event timed runs after
warm-up), TFLOP/s, GB/s and the fraction of the floor.

    pytest bench/test_head_mixing.py --benchmark-json=bench/results/<gpu>-<yyyy-mm-dd>.json
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch
from einops.layers.torch import Rearrange
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from roofline import Workload, cuda_time, reference  # noqa: E402

import vitkernels  # noqa: E402
from vitkernels.ops import head_mixing as ops  # noqa: E402
from vitkernels.workloads import WORKLOADS as WORKLOAD_SHAPES  # noqa: E402
from vitkernels.workloads import HeadMixingShape  # noqa: E402

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]

BATCH = int(os.environ.get("VITKERNELS_BENCH_BATCH", "256"))
DTYPE = torch.bfloat16
COMPILE_MODE = os.environ.get("VITKERNELS_BENCH_COMPILE_MODE", "max-autotune-no-cudagraphs")

# id: (heads, tokens, head dim, kind)
WORKLOADS = {
    "M1": (4, 196, 48, "talking heads"),  # CaiT-XXS24
    "M2": (12, 197, 33, "re-attention"),  # DeepViT-S (models/deepvit.py)
}
IMPLS = ("eager", "eager_timm", "compiled", "torch", "triton")
MODES = ("fwd", "fwd+bwd")


def workload(wid: str, mode: str) -> Workload:
    """The workload's flops and bytes (vitkernels/workloads.py, as every benchmark)."""
    return reference(wid, mode)


# ----------------------------------------------------------------------------
# the eager modules, as vit-pytorch and timm write the attention core


class VitPytorchTalkingHeads(nn.Module):
    """vit-pytorch cait.Attention after the projections."""

    def __init__(self, heads: int, dim_head: int) -> None:
        super().__init__()
        self.scale = dim_head**-0.5
        self.mix_heads_pre_attn = nn.Parameter(torch.randn(heads, heads))
        self.mix_heads_post_attn = nn.Parameter(torch.randn(heads, heads))

    def forward(self, q, k, v):
        dots = torch.einsum("b h i d, b h j d -> b h i j", q, k) * self.scale
        dots = torch.einsum("b h i j, h g -> b g i j", dots, self.mix_heads_pre_attn)
        attn = dots.softmax(dim=-1)
        attn = torch.einsum("b h i j, h g -> b g i j", attn, self.mix_heads_post_attn)
        return torch.einsum("b h i j, b h j d -> b h i d", attn, v)

    def kernel_args(self) -> dict:
        return dict(pre=(self.mix_heads_pre_attn.t(), None), post=(self.mix_heads_post_attn.t(), None))


class TimmTalkingHeads(nn.Module):
    """timm cait.TalkingHeadAttn after the qkv projection."""

    def __init__(self, heads: int, dim_head: int) -> None:
        super().__init__()
        self.scale = dim_head**-0.5
        self.proj_l = nn.Linear(heads, heads)
        self.proj_w = nn.Linear(heads, heads)

    def forward(self, q, k, v):
        attn = (q * self.scale) @ k.transpose(-2, -1)
        attn = self.proj_l(attn.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
        attn = attn.softmax(dim=-1)
        attn = self.proj_w(attn.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
        return attn @ v

    def kernel_args(self) -> dict:
        return dict(pre=(self.proj_l.weight, self.proj_l.bias), post=(self.proj_w.weight, self.proj_w.bias))


class VitPytorchReAttention(nn.Module):
    """vit-pytorch deepvit.Attention after the projections."""

    def __init__(self, heads: int, dim_head: int) -> None:
        super().__init__()
        self.scale = dim_head**-0.5
        self.reattn_weights = nn.Parameter(torch.randn(heads, heads))
        self.reattn_norm = nn.Sequential(
            Rearrange("b h i j -> b i j h"), nn.LayerNorm(heads), Rearrange("b i j h -> b h i j")
        )

    def forward(self, q, k, v):
        attn = (torch.einsum("b h i d, b h j d -> b h i j", q, k) * self.scale).softmax(dim=-1)
        attn = torch.einsum("b h i j, h g -> b g i j", attn, self.reattn_weights)
        attn = self.reattn_norm(attn)
        return torch.einsum("b h i j, b h j d -> b h i d", attn, v)

    def kernel_args(self) -> dict:
        ln = self.reattn_norm[1]
        return dict(post=(self.reattn_weights.t(), None), head_norm=(ln.weight, ln.bias, ln.eps))


def eager_module_for(shape: HeadMixingShape, impl: str) -> nn.Module:
    """The eager module of a head-mixing shape (vitkernels/workloads.py) for one peer."""
    if shape.norm:
        return VitPytorchReAttention(shape.heads, shape.head_dim)
    if impl == "eager_timm":
        return TimmTalkingHeads(shape.heads, shape.head_dim)
    return VitPytorchTalkingHeads(shape.heads, shape.head_dim)


def implementation_for(impl: str, module: nn.Module, q, k, v, compile_mode: str = COMPILE_MODE):
    """fn(q, k, v) -> out for one implementation, or a string saying why it cannot run."""
    if impl in ("eager", "eager_timm"):
        return module
    if impl == "compiled":
        return torch.compile(module, mode=compile_mode)
    kw = module.kernel_args()
    if impl == "triton":
        # as the run calls it: the forward under no_grad, fwd+bwd with gradients
        with torch.set_grad_enabled(module.training):
            reasons = ops.TritonBackend().not_supported_reasons(ops._inputs(q, k, v, scale=module.scale, **kw))
        if reasons:
            return "triton backend: " + "; ".join(reasons)
    return lambda q, k, v: vitkernels.head_mixing_attention(q, k, v, scale=module.scale, **kw, backend=impl)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("wid", list(WORKLOADS))
def test_head_mixing_attention(benchmark, wid, mode, impl):
    H, N, D, kind = WORKLOADS[wid]
    if impl == "eager_timm" and kind != "talking heads":
        pytest.skip("timm has no re-attention module")
    train = mode == "fwd+bwd"
    torch.manual_seed(0)
    module = eager_module_for(WORKLOAD_SHAPES[wid].shape, impl).cuda().to(DTYPE).train(train)
    # as the layers hand them over: views of one (B, N, 3*H*D) projection
    qkv = torch.randn(BATCH, N, 3 * H * D, device="cuda", dtype=DTYPE)
    q, k, v = (t.unflatten(-1, (H, D)).transpose(1, 2).detach().requires_grad_(train) for t in qkv.chunk(3, -1))
    fn = implementation_for(impl, module, q, k, v)
    if isinstance(fn, str):
        pytest.skip(fn)
    params = list(module.parameters())
    g = torch.randn(BATCH, H, N, D, device="cuda", dtype=DTYPE)

    def run():
        if train:
            torch.autograd.grad(fn(q, k, v), [q, k, v, *params], g)
        else:
            with torch.no_grad():
                fn(q, k, v)

    # one step, and the same attention as the float32 reference math, before timing
    run()
    with torch.no_grad():
        out = fn(q, k, v)
        kw = module.kernel_args()
        f32 = {key: tuple(t.float() if isinstance(t, torch.Tensor) else t for t in val) for key, val in kw.items()}
        want = vitkernels.head_mixing_attention(
            q.float(), k.float(), v.float(), scale=module.scale, **f32, backend="reference"
        )
    err = (out.float() - want).abs().max().item()
    assert err <= 5e-2 * want.abs().max().item(), f"{impl} {wid}: max error {err:.3e}"

    wl = workload(wid, mode)
    seconds = cuda_time(run)
    benchmark.extra_info.update(
        wl.row(impl, seconds, dtype=str(DTYPE).removeprefix("torch."), batch=BATCH, mode=mode,
               gpu=torch.cuda.get_device_name())
    )  # fmt: skip

    def timed():
        run()
        torch.cuda.synchronize()

    benchmark.pedantic(timed, rounds=5, iterations=1)
