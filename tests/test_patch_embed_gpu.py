"""patch_embed on CUDA: the triton backend (and cuda when the extension is built)
against the float64 reference, float16 / bfloat16 / float32, the WORKLOADS.md
shapes (batch reduced) and the odd configurations of test_patch_embed.py, with
gradients; every buffer the launchers allocate starts as NaN.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
from _numerics import assert_close

import vitkernels
from vitkernels import cuda as vk_cuda

pytestmark = pytest.mark.gpu

from test_patch_embed import (  # noqa: E402  (same directory; the CPU test's cases)
    CASES,
    GRAD_CASES,
    Case,
    _grads,
    make_inputs,
    reference64,
    spy_launches,
)

DTYPES = {"f16": torch.float16, "bf16": torch.bfloat16, "f32": torch.float32}
# relative to max(the reference's largest magnitude, 1) (tests/_numerics.py): the
# GPU kernels' bounds, wider than the interpreter's (float32 products are TF32)
TOL = {torch.float16: 4e-2, torch.bfloat16: 1e-1, torch.float32: 4e-4}
GRAD_TOL = {torch.float16: 1.1e-1, torch.bfloat16: 1.1e-1, torch.float32: 2e-3}


def _backends() -> list[str]:
    out = ["triton"]
    if vk_cuda.has_op("patch_embed_fwd"):
        out.append("cuda")
    return out


# WORKLOADS.md shapes at batch 4 (the kernels' tiles do not depend on the batch)
WORKLOADS = {
    "P1": Case(B=4, H=224, W=224, k=16, D=768, cls=1, pos="all", conv_weight=True),
    "P2": Case(B=4, H=224, W=224, k=16, D=768, order="pqc", in_norm="affine",
               out_norm="affine", cls=1, pos="all"),
    "P3": Case(B=4, H=224, W=224, k=7, s=4, p=2, D=192, in_norm="affine"),
    "P2_channels_last": Case(B=2, H=224, W=224, k=16, D=768, order="pqc", in_norm="affine",
                             out_norm="affine", cls=1, pos="all", layout="channels_last"),
    "crossvit_240_p12": Case(B=2, H=240, W=240, k=12, D=192, order="pqc", in_norm="affine",
                             out_norm="affine", cls=1, pos="all"),
    "pit_224_p14": Case(B=2, H=224, W=224, k=14, s=7, D=144, cls=1, pos="all"),
    "vit_s_384": Case(B=2, H=224, W=224, k=16, D=384, cls=1, pos="all"),
    "odd_rows": Case(B=3, H=223, W=221, k=7, s=4, p=2, D=192, in_norm="affine"),
}


def _cuda(inputs: dict) -> dict:
    out = {}
    for k, v in inputs.items():
        if isinstance(v, torch.Tensor):
            out[k] = v.cuda()
        elif isinstance(v, tuple):
            out[k] = tuple(x.cuda() if isinstance(x, torch.Tensor) else x for x in v)
        else:
            out[k] = v
    return out


def _make(case: Case, dtype: torch.dtype) -> dict:
    """make_inputs on CUDA, with the image layout made there (.cuda() would densify a view)."""
    inputs = _cuda(make_inputs(dataclasses.replace(case, layout="nchw"), dtype))
    x = inputs["images"]
    if case.layout == "channels_last":
        inputs["images"] = x.contiguous(memory_format=torch.channels_last)
    elif case.layout == "view":  # every other column of a wider image, one row off
        wide = torch.zeros(x.shape[0], x.shape[1], x.shape[2] + 1, 2 * x.shape[3], device="cuda",
                           dtype=dtype)
        wide[:, :, 1:, ::2] = x
        inputs["images"] = wide[:, :, 1:, ::2]
    return inputs


@pytest.fixture(autouse=True)
def poison(monkeypatch):
    tp = pytest.importorskip("vitkernels.triton.patch_embed")

    def new(shape, device, dtype):
        return torch.full(shape, float("nan"), device=device, dtype=dtype)

    monkeypatch.setattr(tp, "_new", new)


@pytest.mark.parametrize("backend", _backends())
@pytest.mark.parametrize("dtype_name", list(DTYPES))
@pytest.mark.parametrize("name", list(WORKLOADS) + list(CASES))
def test_forward(name, dtype_name, backend):
    dtype = DTYPES[dtype_name]
    if backend == "cuda" and dtype == torch.float32:
        pytest.skip("the cuda backend takes float16 and bfloat16")
    case = WORKLOADS.get(name) or CASES[name]
    inputs = _make(case, dtype)
    out = vitkernels.patch_embed(**inputs, backend=backend)
    assert_close(out, reference64(inputs), TOL[dtype], name, floor=1.0, dtype=dtype)


@pytest.mark.parametrize("backend", _backends())
@pytest.mark.parametrize("dtype_name", list(DTYPES))
@pytest.mark.parametrize("name", ["P1", "P2", "P3", "P2_channels_last", *GRAD_CASES])
def test_gradients(name, dtype_name, backend):
    dtype = DTYPES[dtype_name]
    if backend == "cuda" and dtype == torch.float32:
        pytest.skip("the cuda backend takes float16 and bfloat16")
    case = WORKLOADS.get(name) or CASES[name]
    inputs = _make(case, dtype)
    grad = torch.randn_like(reference64(inputs))
    got = _grads(inputs, backend, dtype, grad)
    want = _grads(inputs, None, torch.float64, grad)
    assert got.keys() == want.keys()
    for key in want:
        assert_close(got[key], want[key], GRAD_TOL[dtype], f"{name} d{key}", floor=1.0, dtype=dtype)


@pytest.mark.parametrize("dtype_name", ["f16", "bf16"])
def test_gradients_of_an_unaligned_output_grad(dtype_name, monkeypatch):
    """P3 with grad_out one element into its buffer (rows not 16-byte aligned): the
    triton backward runs dW and dxn as their own kernels there, not the fused one
    (test_patch_embed.py's test_fused_backward_only_on_aligned_16bit_rows), and every
    gradient matches float64."""
    names = spy_launches(monkeypatch)
    dtype = DTYPES[dtype_name]
    inputs = _make(WORKLOADS["P3"], dtype)
    grad = torch.randn_like(reference64(inputs)).to(dtype).double()
    got = _grads(inputs, "triton", dtype, grad, unaligned_grad=True)
    assert names[-3:] == ["patch_embed_dw", "patch_embed_dxn", "patch_embed_fold"], names
    want = _grads(inputs, None, torch.float64, grad)
    assert got.keys() == want.keys()
    for key in want:
        assert_close(got[key], want[key], GRAD_TOL[dtype], f"P3 unaligned d{key}", floor=1.0, dtype=dtype)


@pytest.mark.skipif(not vk_cuda.has_op("patch_embed_fwd_saving"), reason="the CUDA extension is not built")
@pytest.mark.parametrize("name", ["P2", "P3", "P2_channels_last", "t2t_channels_last"])
def test_cuda_saving_forward_writes_what_triton_saves(name):
    """The extension's saving forward writes, into NaN-filled buffers laid out by Triton's
    saved_layout, what Triton's saving forward writes (the pre-norm tokens and the
    statistics to rounding, w_plain exactly); a buffer of the wrong layout is refused."""
    from vitkernels.ops import patch_embed as pe_op
    from vitkernels.triton import patch_embed as tp

    case = WORKLOADS.get(name) or CASES[name]
    inputs = _make(case, torch.float16)
    v = pe_op._validate(**inputs)
    iw, ib, ie = v["in_norm"] or (None, None, 0.0)
    ow, ob, oe = v["out_norm"] or (None, None, 0.0)
    args = (v["images"], v["weight"], v["bias"], iw, ib, ow, ob, v["pos_embed"], v["cls_token"],
            list(v["kernel_size"]), list(v["stride"]), list(v["padding"]), v["patch_order"],
            float(ie), float(oe), v["in_norm"] is not None, v["out_norm"] is not None)  # fmt: skip
    saved = pe_op._saved_buffers(args)
    for t in saved:
        torch.as_strided(t, (t.untyped_storage().nbytes() // t.element_size(),), (1,)).fill_(float("nan"))
    out = vk_cuda.op("patch_embed_fwd_saving")(*args, *saved)
    tri_out, *tri_saved = tp.patch_embed_fwd_saving(*args)
    assert_close(out, tri_out.double(), TOL[torch.float16], name, floor=1.0, dtype=torch.float16)
    for key, got, tri in zip(("y", "stats", "ostats", "w_plain"), saved, tri_saved, strict=True):
        assert (got.shape, got.stride(), got.dtype) == (tri.shape, tri.stride(), tri.dtype), key
        if key == "w_plain":
            torch.testing.assert_close(got, tri, rtol=0, atol=0)
        elif got.numel():
            assert_close(got, tri.double(), TOL[torch.float16], f"{name} {key}", floor=1.0, dtype=torch.float16)
    if saved[1].numel():
        with pytest.raises(ValueError, match="stats"):
            vk_cuda.op("patch_embed_fwd_saving")(*args, saved[0], saved[1][:-1], saved[2], saved[3])


def _auto_kernel(inputs: dict) -> str:
    """cuda where it is built and the speed evidence (vitkernels/evidence.py) puts it
    at least as fast as triton for this GPU and pass, else triton."""
    from vitkernels import evidence

    if not vk_cuda.has_op("patch_embed_fwd"):
        return "triton"
    training = any(isinstance(t, torch.Tensor) and t.requires_grad for t in inputs.values())
    v = evidence.verdict("patch_embed", "cuda", "triton", torch.cuda.get_device_capability(),
                         "fwd+bwd" if training else "fwd")  # fmt: skip
    return "cuda" if v.take else "triton"


def test_automatic_dispatch_on_cuda_takes_a_kernel():
    inputs = _make(WORKLOADS["P1"], torch.bfloat16)
    from vitkernels.ops import patch_embed as pe_op

    chosen, verdicts = pe_op.which_backend(**inputs)
    assert chosen == _auto_kernel(inputs), verdicts
    # the kernel backends give the images' gradient too (T2T's later soft splits)
    inputs["images"].requires_grad_()
    assert pe_op.which_backend(**inputs)[0] == _auto_kernel(inputs)


def test_optimize_vit_b16_bf16_matches_eager():
    from vitkernels.models.vit import ViT

    model = ViT(image_size=224, patch_size=16, num_classes=10, dim=768, depth=1, heads=12,
                mlp_dim=1024, dim_head=64).cuda().to(torch.bfloat16).eval()
    x = torch.randn(4, 3, 224, 224, device="cuda", dtype=torch.bfloat16)
    with torch.no_grad():
        want = model(x).float()
        report = vitkernels.optimize(model, ops=("patch_embed",), backend="triton")
        assert report.count("patch_embed") == 1
        got = model(x).float()
    assert_close(got, want, 0.15, "bfloat16 logits", floor=1.0)


def test_compile_fullgraph_on_cuda():
    inputs = _make(WORKLOADS["P2"], torch.bfloat16)

    def f(images):
        return vitkernels.patch_embed(**{**inputs, "images": images}, backend="triton")

    want = f(inputs["images"])
    got = torch.compile(f, fullgraph=True)(inputs["images"])
    torch.testing.assert_close(got, want, atol=0, rtol=0)


def test_optimize_t2t_vit_14_bf16_matches_float32_eager_and_trains():
    """The fused T2T module (three soft splits as patch_embed calls, the first two
    with the Token_performers' norm1 + kqv, the last with class token and
    positions) and the Performers on the kernels, bfloat16, against float32 eager."""
    import copy

    from vitkernels.models import create

    model = create("t2t_vit_14", num_classes=10).cuda().eval()
    fused = copy.deepcopy(model).to(torch.bfloat16)
    report = vitkernels.optimize(fused, backend="triton")
    assert report.count("patch_embed") == 1 and report.count("performer_attention") == 2
    x = torch.randn(4, 3, 224, 224, device="cuda")
    with torch.no_grad():
        want = model(x)
        got = fused(x.to(torch.bfloat16)).float()
    assert_close(got, want, 0.1, "bfloat16 logits against float32", floor=1.0)
    fused.train()
    fused(x.to(torch.bfloat16)).float().square().mean().backward()
    for name, p in fused.named_parameters():
        if p.requires_grad:
            assert p.grad is not None and torch.isfinite(p.grad).all(), name
