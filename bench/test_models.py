"""Whole-model throughput: the WORKLOADS.md model list, batch 256, bfloat16.

For each model and source (timm where timm has it, this repo's zoo in the
vit-pytorch layout, the official T2T layout for T2T-ViT) four implementations
side by side in one process:

    eager               the model as its source writes it
    optimized           vitkernels.optimize(model) (automatic backends)
    compiled            torch.compile(eager)
    compiled_optimized  torch.compile(optimized)

Rows in extra_info (for bench/make_results.py): workload, impl, dtype,
time_us (median forward, CUDA events), images_per_s, and the GPU and versions.

    pytest bench/test_models.py --benchmark-json=bench/results/<gpu>-<yyyy-mm-dd>.json

VITKERNELS_BENCH_COMPILE_MODE sets torch.compile's mode (default
"max-autotune-no-cudagraphs", as WORKLOADS.md asks; "default" compiles faster).
VITKERNELS_BENCH_BATCH overrides the batch of 256.
"""

from __future__ import annotations

import copy
import functools
import os
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from roofline import cuda_time  # noqa: E402

from vitkernels.compare import build_model, check_agreement  # noqa: E402

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]

BATCH = int(os.environ.get("VITKERNELS_BENCH_BATCH", "256"))
DTYPE = torch.bfloat16
COMPILE_MODE = os.environ.get("VITKERNELS_BENCH_COMPILE_MODE", "max-autotune-no-cudagraphs")
IMPLS = ("eager", "optimized", "compiled", "compiled_optimized")

# (WORKLOADS.md name, source, model spec for vitkernels.compare.build_model, image side)
MODELS = [
    ("ViT-B/16", "timm", "timm:vit_base_patch16_224", 224),
    ("ViT-B/16", "zoo", "vit_b16", 224),
    ("DeiT-S distilled", "timm", "timm:deit_small_distilled_patch16_224", 224),
    ("DeiT-S distilled", "zoo", "deit_s", 224),
    ("CaiT-XXS24", "timm", "timm:cait_xxs24_224", 224),
    ("CaiT-XXS24", "zoo", "cait_xxs24", 224),
    ("DeepViT", "zoo", "deepvit_s", 224),
    ("CrossViT-S", "timm", "timm:crossvit_small_240", 240),
    ("CrossViT-S", "zoo", "crossvit_s", 240),
    ("PiT-S", "timm", "timm:pit_s_224", 224),
    ("PiT-S", "zoo", "pit_s", 224),
    ("LeViT-128S", "timm", "timm:levit_128s", 224),
    ("LeViT-128S", "zoo", "levit_128s", 224),
    ("LeViT-256", "timm", "timm:levit_256", 224),
    ("LeViT-256", "zoo", "levit_256", 224),
    ("T2T-ViT-14", "zoo", "t2t_vit_14", 224),
    ("CvT-13", "zoo", "cvt_13", 224),
]


def _env() -> dict[str, str]:
    import triton

    return {
        "gpu": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "triton": triton.__version__,
        "cuda": str(torch.version.cuda),
    }


@functools.lru_cache(maxsize=1)  # one model on the GPU at a time; tests are ordered by model
def _models(spec: str, side: int):
    torch._dynamo.reset()  # drop the previous model's compiled graphs
    torch.manual_seed(0)
    eager, _ = build_model(spec, image_size=side)
    eager = eager.to(device="cuda", dtype=DTYPE).eval()
    optimized = copy.deepcopy(eager)
    import vitkernels

    report = vitkernels.optimize(optimized)
    x = torch.randn(BATCH, 3, side, side, device="cuda", dtype=DTYPE)
    agreement = check_agreement(eager, optimized, x[:8])
    assert agreement.ok, f"{spec}: optimized disagrees with eager: {agreement.describe()}"
    compiled = {
        "compiled": torch.compile(eager, mode=COMPILE_MODE),
        "compiled_optimized": torch.compile(optimized, mode=COMPILE_MODE),
    }
    return {"eager": eager, "optimized": optimized, **compiled}, x, report


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize(
    "name, source, spec, side", MODELS, ids=[f"{n} [{s}]" for n, s, _, _ in MODELS]
)
def test_model_throughput(benchmark, name, source, spec, side, impl):
    models, x, report = _models(spec, side)
    model = models[impl]

    def run():
        with torch.inference_mode():
            model(x)

    seconds = cuda_time(run, warmup=5, rep=30)
    benchmark.extra_info.update(
        workload=f"{name} [{source}]",
        impl=impl,
        dtype=str(DTYPE).removeprefix("torch."),
        batch=BATCH,
        image_size=side,
        time_us=seconds * 1e6,
        images_per_s=BATCH / seconds,
        tflops=None,
        gbps=None,
        fraction_of_floor=None,
        model=spec,
        replaced=report.count() if "optimized" in impl else 0,
        **_env(),
    )

    def timed():
        run()
        torch.cuda.synchronize()

    benchmark.pedantic(timed, rounds=5, iterations=1)
