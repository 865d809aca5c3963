"""patch_embed benchmarks: workloads P1-P3 of WORKLOADS.md, batch 256, forward.

    P1  ViT-B/16 at 224, + class token + positions: timm's Conv2d, flatten, cat, add
    P2  the same with vit-pytorch's dual patchnorm: Rearrange, LayerNorm, Linear,
        LayerNorm (its to_patch_embedding), then cat and add as its ViT does
    P3  T2T soft split 7/4/2 + LayerNorm(147) + kqv Linear(147 -> 192)

Implementations side by side in one process: eager (the modules as timm /
vit-pytorch / T2T write them), compiled (torch.compile of eager, mode from
VITKERNELS_BENCH_COMPILE_MODE, default "max-autotune-no-cudagraphs"), torch (this
package's stock composite), triton, cuda (when the extension is built). Each row
(benchmark.extra_info) has the workload, impl, dtype, median time from CUDA
events after warm-up, TFLOP/s, GB/s and the fraction of the floor (roofline.py:
H200 ceilings 4.3 TB/s, 788 TFLOP/s). The images (77 MB) do not fit in L2, so the
inputs are not rotated.

    pytest bench/test_patch_embed.py --benchmark-json=bench/results/<gpu>-<date>.json

Targets (H100, bfloat16, P1): >= 1.5x eager, >= 1.1x compiled, >= 60% of the floor.
"""

from __future__ import annotations

import functools
import os

import pytest
import torch
from roofline import Workload, cuda_time, reference
from torch import nn

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]

BATCH = int(os.environ.get("VITKERNELS_BENCH_BATCH", "256"))
DTYPES = {"bf16": torch.bfloat16, "f16": torch.float16}
COMPILE_MODE = os.environ.get("VITKERNELS_BENCH_COMPILE_MODE", "max-autotune-no-cudagraphs")
IMPLS = ("eager", "compiled", "torch", "triton", "cuda")


class TimmStyle(nn.Module):
    """timm PatchEmbed + VisionTransformer._pos_embed: Conv2d, flatten, cat, add."""

    def __init__(self, dim: int = 768, patch: int = 16, num_patches: int = 196) -> None:
        super().__init__()
        self.proj = nn.Conv2d(3, dim, patch, stride=patch)
        self.cls_token = nn.Parameter(torch.randn(1, 1, dim) * 0.02)
        self.pos_embed = nn.Parameter(torch.randn(1, num_patches + 1, dim) * 0.02)

    def forward(self, img: torch.Tensor) -> torch.Tensor:
        x = self.proj(img).flatten(2).transpose(1, 2)  # (B, D, h, w) -> (B, L, D)
        x = torch.cat((self.cls_token.expand(x.shape[0], -1, -1), x), dim=1)
        return x + self.pos_embed

    def fused(self, img: torch.Tensor, backend: str) -> torch.Tensor:
        import vitkernels

        return vitkernels.patch_embed(
            img, self.proj.weight, self.proj.bias, kernel_size=16, pos_embed=self.pos_embed,
            cls_token=self.cls_token, backend=backend,
        )


class VitPytorchStyle(nn.Module):
    """vit-pytorch ViT: to_patch_embedding (dual patchnorm), cat class token, add positions."""

    def __init__(self, dim: int = 768, patch: int = 16, num_patches: int = 196) -> None:
        super().__init__()
        from einops.layers.torch import Rearrange

        patch_dim = 3 * patch * patch
        self.to_patch_embedding = nn.Sequential(
            Rearrange("b c (h p1) (w p2) -> b (h w) (p1 p2 c)", p1=patch, p2=patch),
            nn.LayerNorm(patch_dim),
            nn.Linear(patch_dim, dim),
            nn.LayerNorm(dim),
        )
        self.cls_token = nn.Parameter(torch.randn(1, dim))
        self.pos_embedding = nn.Parameter(torch.randn(num_patches + 1, dim))

    def forward(self, img: torch.Tensor) -> torch.Tensor:
        x = self.to_patch_embedding(img)
        x = torch.cat((self.cls_token.expand(x.shape[0], -1, -1), x), dim=1)
        return x + self.pos_embedding[: x.shape[1]]

    def fused(self, img: torch.Tensor, backend: str) -> torch.Tensor:
        import vitkernels

        _, ln_in, lin, ln_out = self.to_patch_embedding
        return vitkernels.patch_embed(
            img, lin.weight, lin.bias, kernel_size=16, patch_order="pqc",
            in_norm=(ln_in.weight, ln_in.bias, ln_in.eps),
            out_norm=(ln_out.weight, ln_out.bias, ln_out.eps),
            pos_embed=self.pos_embedding, cls_token=self.cls_token, backend=backend,
        )


class T2TStyle(nn.Module):
    """Official T2T-ViT: soft_split0 (Unfold 7/4/2), attention1.norm1, attention1.kqv."""

    def __init__(self, token_dim: int = 64) -> None:
        super().__init__()
        self.soft_split0 = nn.Unfold(kernel_size=7, stride=4, padding=2)
        self.norm1 = nn.LayerNorm(3 * 7 * 7)
        self.kqv = nn.Linear(3 * 7 * 7, 3 * token_dim)

    def forward(self, img: torch.Tensor) -> torch.Tensor:
        return self.kqv(self.norm1(self.soft_split0(img).transpose(1, 2)))

    def fused(self, img: torch.Tensor, backend: str) -> torch.Tensor:
        from vitkernels.replace.fused_t2t import soft_split_linear

        return soft_split_linear(img, self.soft_split0, self.kqv, self.norm1, backend=backend)


def _workload(wid: str, dtype: torch.dtype) -> Workload:
    return reference(wid, "fwd")


BUILDERS = {"P1": TimmStyle, "P2": VitPytorchStyle, "P3": T2TStyle}


@functools.lru_cache(maxsize=1)
def _setup(wid: str, dtype_name: str):
    torch._dynamo.reset()
    torch.manual_seed(0)
    dtype = DTYPES[dtype_name]
    module = BUILDERS[wid]().to(device="cuda", dtype=dtype).eval()
    img = torch.randn(BATCH, 3, 224, 224, device="cuda", dtype=dtype)
    compiled = torch.compile(module, mode=COMPILE_MODE)
    return module, compiled, img


def _env() -> dict[str, str]:
    import triton

    return {
        "gpu": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "triton": triton.__version__,
        "cuda": str(torch.version.cuda),
    }


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype_name", list(DTYPES))
@pytest.mark.parametrize("wid", list(BUILDERS))
def test_patch_embed(benchmark, wid, dtype_name, impl):
    from vitkernels import cuda

    if impl == "cuda" and not cuda.has_op("patch_embed_fwd"):
        pytest.skip(cuda.unavailable_reason() or "the CUDA extension has no patch_embed_fwd")
    module, compiled, img = _setup(wid, dtype_name)
    if impl == "eager":
        fn = lambda: module(img)  # noqa: E731
    elif impl == "compiled":
        fn = lambda: compiled(img)  # noqa: E731
    else:
        fn = lambda: module.fused(img, impl)  # noqa: E731
    with torch.inference_mode():
        if impl != "eager":  # every implementation agrees with eager before it is timed
            want, got = module(img[:8]).float(), (compiled(img) if impl == "compiled" else fn())
            torch.testing.assert_close(got[:8].float(), want, atol=0.1, rtol=0.05)
        seconds = cuda_time(fn)
    dtype = DTYPES[dtype_name]
    row = _workload(wid, dtype).row(impl, seconds, dtype=str(dtype).removeprefix("torch."),
                                    batch=BATCH, **_env())
    benchmark.extra_info.update(row)

    def timed():
        with torch.inference_mode():
            fn()
        torch.cuda.synchronize()

    benchmark.pedantic(timed, rounds=5, iterations=1)
