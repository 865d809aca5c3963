"""relpos_attention: the torch and triton backends against the float64 reference.

Without a GPU the Triton kernels run in the interpreter (TRITON_INTERPRET=1 on CPU
tensors), float32 and float16 only (the interpreter's bfloat16 arithmetic is wrong:
bfloat16 is tested in test_relpos_gpu.py). Inputs are fresh random tensors, and
every buffer the Triton launchers allocate starts as NaN, so an element a kernel
fails to write fails the test.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest
import torch
from _numerics import GRAD_TOL, TOL, assert_close

import vitkernels
from vitkernels import BackendNotSupportedError
from vitkernels.backends import reference
from vitkernels.ops import relpos as ops

tk = pytest.importorskip("vitkernels.triton.relpos")

BACKENDS = ["torch", "triton"]
# the table gradient sums Nq * Nk rounded products per entry: float16 gets more room
GRAD_TOL = {**GRAD_TOL, torch.float16: 1.5e-2}

# id: (B, H, R, C, q_stride, Dk, Dv)
CASES = {
    "A1 N196": (2, 2, 14, 14, 1, 32, 64),
    "A2 N49": (2, 3, 7, 7, 1, 32, 64),
    "A3 N16": (3, 2, 4, 4, 1, 32, 64),
    "A4 shrink 14to7": (1, 2, 14, 14, 2, 32, 64),
    "A4 Dv128": (1, 2, 14, 14, 2, 32, 128),  # the workload: dQ takes 2-row query blocks
    "A5 Dk16 Dv32": (1, 2, 14, 14, 1, 16, 32),
    "shrink 7to4": (2, 2, 7, 7, 2, 16, 32),
    # the key-blocked dQ kernel (a grid over 256 key slots): 2-row query blocks and
    # 1-row key blocks of 32 column slots (22 used), as LeViT's 448px 28 x 28 grid takes;
    # 198 tokens: 16-row tails in the forward and dK/dV (test_key_blocked_dq_case)
    "key-blocked 9x22": (1, 1, 9, 22, 1, 16, 16),
    "rect 5x9": (2, 2, 5, 9, 1, 16, 24),
    "rect 6x3 stride2": (1, 2, 6, 3, 2, 32, 16),
    "row 1x7": (2, 1, 1, 7, 1, 16, 16),
    "column 9x1 stride2": (1, 2, 9, 1, 2, 16, 16),
    "stride3 7x8": (1, 1, 7, 8, 3, 16, 16),
    "Dk64 Dv128": (1, 2, 4, 4, 1, 64, 128),
    "Dk64 Dv16": (1, 2, 5, 5, 1, 64, 16),
    "Dk20 Dv40": (1, 2, 4, 5, 1, 20, 40),
    "grid 1x1": (2, 2, 1, 1, 1, 16, 16),
    # the forward's key blocks: 2 full blocks and no tail; 1 full block and a 64-key tail
    "keys 8x16": (1, 1, 8, 16, 1, 16, 16),
    "keys 10x10": (1, 1, 10, 10, 1, 16, 16),
}
GRAD_CASES = [
    "A1 N196",
    "A2 N49",
    "A3 N16",
    "A4 shrink 14to7",
    "A4 Dv128",
    "shrink 7to4",
    "rect 5x9",
    "rect 6x3 stride2",
    "column 9x1 stride2",
    "stride3 7x8",
    "Dk64 Dv16",
    "Dk64 Dv128",
    "Dk20 Dv40",
    "key-blocked 9x22",
    "grid 1x1",
    "keys 8x16",  # dK/dV: 4 full query blocks, no tail
]


@pytest.fixture
def poisoned(monkeypatch):
    """Every buffer the Triton launchers allocate starts as NaN: unwritten elements fail."""

    def alloc(shape, dtype, device):
        return torch.full(shape, float("nan"), dtype=dtype, device=device)

    monkeypatch.setattr(tk, "_alloc", alloc)


def make(
    case: tuple[int, ...],
    dtype: torch.dtype = torch.float32,
    *,
    layout: str = "hn",
    view: str = "contiguous",
    table_dtype: torch.dtype | None = None,
    qk_scale: float = 1.0,
    bias_std: float = 1.0,
):
    """Fresh q, k, v, table for a case; ``view`` picks how q, k, v sit in memory.

    contiguous: (B, H, N, D) tensors; conv: views of 1x1-conv outputs (B, H*D, R, C)
    ('b (h d) x y -> b h (x y) d', as LeViT's vit-pytorch layout); tokens: views of
    a fused (B, N, H, Dk+Dk+Dv) projection split per head (timm's linear layout).
    """
    B, H, R, C, s, Dk, Dv = case
    Rq, Cq = -(-R // s), -(-C // s)
    Nq, Nk = Rq * Cq, R * C
    if view == "contiguous":
        q = torch.randn(B, H, Nq, Dk) * qk_scale
        k = torch.randn(B, H, Nk, Dk) * qk_scale
        v = torch.randn(B, H, Nk, Dv)
    elif view == "conv":
        q = (torch.randn(B, H * Dk, Rq, Cq) * qk_scale).view(B, H, Dk, Nq).transpose(-1, -2)
        k = (torch.randn(B, H * Dk, R, C) * qk_scale).view(B, H, Dk, Nk).transpose(-1, -2)
        v = torch.randn(B, H * Dv, R, C).view(B, H, Dv, Nk).transpose(-1, -2)
    elif view == "tokens":
        kv = torch.randn(B, Nk, H, Dk + Dv)
        k, v = (t.permute(0, 2, 1, 3) for t in kv.split([Dk, Dv], dim=3))
        k = k * qk_scale
        q = (torch.randn(B, Nq, H, Dk + 3) * qk_scale)[..., 1 : Dk + 1].permute(0, 2, 1, 3)
    else:
        raise AssertionError(view)
    q, k, v = (t.to(dtype) for t in (q, k, v))
    table = torch.randn(H, Nk) * bias_std
    if layout == "nh":
        table = table.t().contiguous()
    return q, k, v, table.to(table_dtype or dtype)


def kwargs_of(case, layout="hn", bias_scale=0.7):
    B, H, R, C, s, Dk, Dv = case
    return dict(fmap_size=(R, C), q_stride=s, bias_scale=bias_scale, table_layout=layout)


def ref64(q, k, v, table, *, fmap_size, q_stride=1, scale=None, bias_scale=1.0, table_layout="hn"):
    """The spec on float64 copies (with autograd for the gradient tests)."""
    q, k, v, table = (t.detach().double().requires_grad_() for t in (q, k, v, table))
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    out = reference.relpos_attention(
        q, k, v, table, fmap_size=fmap_size, q_stride=q_stride, scale=scale,
        bias_scale=bias_scale, table_layout=table_layout,
    )  # fmt: skip
    return out, (q, k, v, table)



def check_grads(backend, q, k, v, table, kw, tol, what=""):
    leaves = [t.detach().requires_grad_() for t in (q, k, v, table)]
    out = vitkernels.relpos_attention(*leaves, **kw, backend=backend)
    expected, ref_leaves = ref64(q, k, v, table, **kw)
    grad = torch.randn_like(expected)
    expected.backward(grad)
    grads = torch.autograd.grad(out, leaves, grad.to(out.dtype))
    for name, g, r in zip(("dq", "dk", "dv", "dtable"), grads, ref_leaves, strict=True):
        # floor: a gradient that is exactly 0 (dq and dtable with a single key) is
        # matched to the rounding of the O(1) terms it is made of
        assert_close(g, r.grad, tol, f"{what} {name}", floor=1.0)


# ----------------------------------------------------------------------------
# forward


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["f32", "f16"])
@pytest.mark.parametrize("case", list(CASES), ids=list(CASES))
@pytest.mark.parametrize("backend", BACKENDS)
def test_forward_matches_float64_reference(backend, case, dtype, poisoned):
    q, k, v, table = make(CASES[case], dtype)
    kw = kwargs_of(CASES[case])
    out = vitkernels.relpos_attention(q, k, v, table, **kw, backend=backend)
    assert out.dtype == dtype and out.shape == (*q.shape[:3], v.shape[-1])
    assert_close(out, ref64(q, k, v, table, **kw)[0], TOL[dtype], f"{backend} {case}")


@pytest.mark.parametrize("view", ["conv", "tokens"])
@pytest.mark.parametrize("layout", ["hn", "nh"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_strided_views_and_layouts(backend, layout, view, poisoned):
    for case in (CASES["A4 shrink 14to7"], CASES["rect 5x9"]):
        q, k, v, table = make(case, layout=layout, view=view)
        assert not q.is_contiguous() and not k.is_contiguous() and not v.is_contiguous()
        kw = kwargs_of(case, layout)
        out = vitkernels.relpos_attention(q, k, v, table, **kw, backend=backend)
        assert_close(out, ref64(q, k, v, table, **kw)[0], TOL[torch.float32], f"{view} {layout}")


def test_strided_views_take_no_copy(monkeypatch):
    """The triton launcher gets the conv-output views themselves, not copies."""
    seen = {}
    real = tk.relpos_attention_fwd

    def spy(q, k, v, table, *args):
        seen.update(q=q.data_ptr(), k=k.data_ptr(), v=v.data_ptr(), t=table.data_ptr())
        seen.update(qs=q.stride(), ts=table.stride())
        return real(q, k, v, table, *args)

    monkeypatch.setattr(tk, "relpos_attention_fwd", spy)
    q, k, v, table = make(CASES["shrink 7to4"], layout="nh", view="conv")
    vitkernels.relpos_attention(q, k, v, table, **kwargs_of(CASES["shrink 7to4"], "nh"), backend="triton")
    assert (seen["q"], seen["k"], seen["v"], seen["t"]) == (
        q.data_ptr(), k.data_ptr(), v.data_ptr(), table.data_ptr(),
    )  # fmt: skip
    assert seen["qs"] == q.stride() and seen["ts"] == (1, table.shape[1])  # (H, R*C) view of (R*C, H)


@pytest.mark.parametrize("table_dtype", [torch.float32, torch.float16], ids=["table_f32", "table_f16"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_half_inputs_with_float32_or_half_table(backend, table_dtype, poisoned):
    case = CASES["A2 N49"]
    q, k, v, table = make(case, torch.float16, table_dtype=table_dtype, layout="nh")
    kw = kwargs_of(case, "nh")
    out = vitkernels.relpos_attention(q, k, v, table, **kw, backend=backend)
    assert out.dtype == torch.float16
    assert_close(out, ref64(q, k, v, table, **kw)[0], TOL[torch.float16])


@pytest.mark.parametrize("backend", BACKENDS)
def test_default_scale_and_explicit_scale(backend, poisoned):
    case = CASES["rect 5x9"]
    q, k, v, table = make(case)
    kw = kwargs_of(case)
    out = vitkernels.relpos_attention(q, k, v, table, **kw, backend=backend)
    assert_close(out, ref64(q, k, v, table, **kw, scale=16**-0.5)[0], TOL[torch.float32])
    out = vitkernels.relpos_attention(q, k, v, table, **kw, scale=0.37, backend=backend)
    assert_close(out, ref64(q, k, v, table, **kw, scale=0.37)[0], TOL[torch.float32])


@pytest.mark.parametrize("scale", [-0.3, 0.0, 1e-5, -1e-5])
@pytest.mark.parametrize("backend", BACKENDS)
def test_negative_zero_and_tiny_scales(backend, scale, poisoned):
    """The triton forward divides the bias by scale * log2(e) and needs it positive: a
    negative scale negates q, one near 0 is folded into q. Both the expanded-bias
    kernel (100 keys: a full block and a tail) and the gathering one (16 keys). Logits
    spread over ~10^2 (q, k of std 6 at scale 0.3): a max taken the wrong way round
    would overflow exp2."""
    for case in (CASES["keys 10x10"], CASES["A3 N16"]):
        q, k, v, table = make(case, qk_scale=6.0)
        kw = kwargs_of(case)
        out = vitkernels.relpos_attention(q, k, v, table, **kw, scale=scale, backend=backend)
        # logits of magnitude ~300 carry float32 rounding of ~300 * 2**-24 into exp()
        tol = TOL[torch.float32] + 20 * 300 * 2**-24
        assert_close(out, ref64(q, k, v, table, **kw, scale=scale)[0], tol, f"scale {scale}")


def test_negative_scale_gradients_triton(poisoned):
    """The backward takes the forward's lse: with q negated in the forward it must still
    be the logsumexp of the logits."""
    case = CASES["A3 N16"]
    q, k, v, table = make(case)
    check_grads("triton", q, k, v, table, {**kwargs_of(case), "scale": -0.4}, GRAD_TOL[torch.float32])


def test_forward_without_the_bias_in_the_accumulator(monkeypatch, poisoned):
    """For sm_80 (mma.sync) the forward adds the bias after the QK^T dot instead of
    starting the dot's accumulator at it; the interpreter takes the sm_90 path unless
    told otherwise. A full key block and a tail, and a single gathered block."""
    monkeypatch.setattr(tk, "target_arch", lambda device: 80)
    for case in (CASES["keys 10x10"], CASES["A3 N16"]):
        q, k, v, table = make(case)
        kw = kwargs_of(case)
        out = vitkernels.relpos_attention(q, k, v, table, **kw, backend="triton")
        assert_close(out, ref64(q, k, v, table, **kw)[0], TOL[torch.float32], "sm_80")


def test_forward_bias_tiles_of_every_block_size(monkeypatch, poisoned):
    """The forward's bias is stored tile by tile in a permuted order and permuted back
    in registers (``_tile_bias_store`` / ``_bias_tile``); the row and column bits
    depend on the tile's size: query blocks of 16, 32 and 64 rows, each with a full key
    tile of 64 and a tail of 16, 32 or 64 keys, on the sm_90 and the sm_80 path."""
    # (query block, key tail): case
    cases = {(16, 16): (1, 2, 9, 8, 3, 16, 16), (32, 32): (1, 2, 9, 9, 2, 16, 16), (64, 64): CASES["keys 10x10"]}
    for (block_m, tail_n), case in cases.items():
        B, H, R, C, s, Dk, Dv = case
        cfg = tk._fwd_cfg((-(-R // s)) * (-(-C // s)), R * C, Dk, Dv)
        blocks = (cfg.constexprs["BLOCK_M"], cfg.constexprs["BLOCK_N"], cfg.full, cfg.constexprs["TAIL_N"])
        assert blocks == (block_m, 64, 64, tail_n)
        q, k, v, table = make(case)
        kw = kwargs_of(case)
        for arch in (90, 80):
            monkeypatch.setattr(tk, "target_arch", lambda device, arch=arch: arch)
            out = vitkernels.relpos_attention(q, k, v, table, **kw, backend="triton")
            assert_close(out, ref64(q, k, v, table, **kw)[0], TOL[torch.float32], f"{block_m} rows, sm_{arch}")


@pytest.mark.parametrize("batch", [4, 6])
def test_forward_batch_groups(batch, monkeypatch, poisoned):
    """Where every key fits one block, a forward program gathers its bias once and takes
    a group of batch entries (4 of 4, 2 of 6 here: a divisor of the batch)."""
    monkeypatch.setattr(tk, "_FWD_MIN_PROGRAMS", 1)
    assert tk._fwd_group(batch, 1) == (4 if batch == 4 else 2)
    for case in (CASES["A3 N16"], CASES["A2 N49"]):
        q, k, v, table = make((batch, *case[1:]))
        kw = kwargs_of(case)
        out = vitkernels.relpos_attention(q, k, v, table, **kw, backend="triton")
        assert_close(out, ref64(q, k, v, table, **kw)[0], TOL[torch.float32], f"batch {batch}")


@pytest.mark.parametrize("backend", BACKENDS)
def test_empty_batch(backend, poisoned):
    q, k, v, table = make((0, 2, 4, 4, 1, 16, 8))
    out = vitkernels.relpos_attention(q, k, v, table, fmap_size=4, backend=backend)
    assert out.shape == (0, 2, 16, 8)


# ----------------------------------------------------------------------------
# large values: the online softmax keeps everything finite


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["f32", "f16"])
@pytest.mark.parametrize(
    "kind, qk_scale, bias_std",
    [("large logits", 12.0, 1.0), ("large bias", 1.0, 3e3), ("both", 8.0, 1e3)],
)
@pytest.mark.parametrize("backend", BACKENDS)
def test_large_values_stay_finite(backend, kind, qk_scale, bias_std, dtype, poisoned):
    case = CASES["A4 shrink 14to7"]
    q, k, v, table = make(case, dtype, qk_scale=qk_scale, bias_std=bias_std, table_dtype=torch.float32)
    kw = kwargs_of(case, bias_scale=1.0)
    # SDPA takes the bias in q's dtype (as the reference's math does); the kernels
    # add the float32 table in float32
    expected, _ = ref64(q, k, v, table.to(dtype) if backend == "torch" else table, **kw)
    assert torch.isfinite(expected).all()
    out = vitkernels.relpos_attention(q, k, v, table, **kw, backend=backend)
    # logits of magnitude L carry float32 rounding of ~L * 2**-24 into exp()
    logit = (qk_scale**2 * math.sqrt(case[5]) * 4 + 4 * bias_std) * 2**-24
    assert_close(out, expected, TOL[dtype] + 20 * logit, kind)


@pytest.mark.parametrize("backend", BACKENDS)
def test_large_values_gradients_stay_finite(backend, poisoned):
    case = CASES["shrink 7to4"]
    q, k, v, table = make(case, qk_scale=10.0, bias_std=1e3)
    leaves = [t.requires_grad_() for t in (q, k, v, table)]
    out = vitkernels.relpos_attention(*leaves, **kwargs_of(case), backend=backend)
    out.backward(torch.randn_like(out))
    for t in leaves:
        assert torch.isfinite(t.grad).all()


# ----------------------------------------------------------------------------
# gradients


@pytest.mark.parametrize("case", GRAD_CASES, ids=GRAD_CASES)
@pytest.mark.parametrize("backend", BACKENDS)
def test_gradients_float32(backend, case, poisoned):
    q, k, v, table = make(CASES[case], layout="nh" if "rect" in case else "hn")
    kw = kwargs_of(CASES[case], "nh" if "rect" in case else "hn")
    check_grads(backend, q, k, v, table, kw, GRAD_TOL[torch.float32], case)


# a wide head (Dk + Dv > 96) on a grid of at most 64 key slots (5 x 5: 8 x 8 slots)
_F32_WIDE_SMALL = (1, 1, 5, 5, 1, 16, 96)


@pytest.mark.parametrize("case", ["keys 10x10", "shrink 7to4", "rect 6x3 stride2", "wide 5x5"])
def test_float32_tiles(case, poisoned, monkeypatch):
    """float32 on a GPU takes tiles of its own (``_f32_tiles``: 32-key forward blocks,
    16 x 16 key-blocked dQ on 8 warps, on sm_90a (the interpreter's arch) with CUDA-core
    (ieee) dots on grids of more than 64 key slots except for wide heads, which take every
    key of a grid of <= 64 key slots in one block; 16 x 16 dK/dV blocks
    on 8 warps, every query block masked in the loop; no all-keys dQ); the interpreter's
    float32 tests run the 16-bit tiles instead. These run float32's tiles (forward and
    gradients) against float64."""
    monkeypatch.setattr(tk, "_F32_TILES_ON_CPU", True)
    ran = []
    monkeypatch.setattr(tk, "launch", lambda la: (ran.append(la), la.run()))
    shape = _F32_WIDE_SMALL if case == "wide 5x5" else CASES[case]
    q, k, v, table = make(shape)
    check_grads("triton", q, k, v, table, kwargs_of(shape), GRAD_TOL[torch.float32], case)
    by_name = {la.name.split("[")[0]: la for la in ran}
    assert by_name["relpos_fwd"].constexprs["BLOCK_N"] == 32  # 16-bit inputs: 64 (10 x 10, 7 x 7)
    dq, dkdv = by_name["relpos_dq"], by_name["relpos_dkdv"]
    assert dq.kernel is tk._bwd_dq_blocked_kernel
    wide = case == "wide 5x5"
    # ieee dots on grids of more than 64 key slots (10 x 10: 16 x 16 slots), else tf32x3
    assert dq.constexprs["PREC"] == ("ieee" if case == "keys 10x10" else "tf32x3")
    if wide:  # every key row in one block (16-bit inputs and triton 3.6: 2 rows of 8 slots)
        assert dq.constexprs["KR"] * dq.constexprs["CP"] == (16 if tk._TRITON_36 else 64)
    assert dkdv.constexprs["BLOCK_N"] == 16 and dkdv.num_warps == 8
    nq = q.shape[2]
    assert dkdv.constexprs["BLOCK_M"] == 16 and dkdv.constexprs["LOOP_MASKED"] == (nq > 16)


@pytest.mark.parametrize("case", ["A1 N196", "A4 shrink 14to7", "rect 6x3 stride2"])
def test_gradients_float16_triton(case, poisoned):
    q, k, v, table = make(CASES[case], torch.float16, table_dtype=torch.float32)
    check_grads("triton", q, k, v, table, kwargs_of(CASES[case]), GRAD_TOL[torch.float16], case)


def test_dkdv_bias_tiles_of_every_block_size(poisoned):
    """The dK/dV kernel reads its bias as (keys, queries) tiles stored in a permuted
    order by its bias launch (``_tile_bias_kernel`` with KEY_ROWS); the row and column
    bits depend on the tile's size: 64 keys x 32 queries with a tail of 16 or 32 queries,
    64 x 64 where there are more than 64 queries (with a 32-query tail; the dQ kernel of
    this small-head grid writes delta, ``test_which_dq_kernel_writes_delta``), 32 x 16
    with every query block in the loop (wide heads, no tail; A4's 64 x 16 is a gradient
    case above), and 16 x 16 (wide heads with misaligned rows), each against float64."""
    # (keys, queries, loop extent, query tail): (case, view)
    cases = {
        (64, 32, 32, 16): ((1, 2, 6, 6, 1, 16, 16), "contiguous"),
        (64, 32, 32, 32): ((1, 1, 7, 7, 1, 16, 16), "contiguous"),
        (64, 64, 64, 32): ((2, 1, 9, 9, 1, 16, 32), "contiguous"),
        (32, 16, 32, 0): ((1, 1, 5, 5, 1, 32, 128), "contiguous"),
        (16, 16, 32, 0): ((1, 1, 5, 5, 1, 32, 128), "conv"),
    }
    for blocks, (case, view) in cases.items():
        B, H, R, C, s, Dk, Dv = case
        q, k, v, table = make(case, view=view)
        cfg = tk._dkdv_cfg(R * C, R * C, Dk, Dv, tk._vector_loads(q, k, v))
        assert (cfg.constexprs["BLOCK_N"], cfg.constexprs["BLOCK_M"], cfg.full, cfg.constexprs["TAIL_M"]) == blocks
        check_grads("triton", q, k, v, table, kwargs_of(case), GRAD_TOL[torch.float32], f"{blocks}")


def test_which_dq_kernel_writes_delta():
    """rowsum(dO * O) is written by the all-keys dQ kernel on 8 warps and on 4 warps with
    16-query blocks (small heads on a 256-key-slot grid: the 9 x 9 case above; A5 now
    takes the fused backward, ``test_fused_backward_launches``), and
    the dK/dV kernel then reads it; the 4-warp config with 64-query blocks (LeViT-128S's
    7 x 7 layers, where the store spilled) and the key-blocked kernel leave it to dK/dV,
    which computes it from O."""
    from vitkernels.triton._aot import record_workload
    from vitkernels.workloads import RelposShape

    def flags(shape, batch):
        launches = record_workload(shape, "bwd", torch.bfloat16, batch=batch).launches
        dq = next(la for la in launches if la.name.startswith("relpos_dq["))
        dkdv = next(la for la in launches if la.name.startswith("relpos_dkdv["))
        return dq.num_warps, dq.constexprs.get("STORE_DELTA"), dkdv.constexprs["DELTA_FROM_O"]

    assert flags(RelposShape(1, 9, 1, 16, 32), 2) == (4, True, False)
    assert flags(RelposShape(4, 14, 1, 32, 64), 256) == (8, True, False)  # A1
    assert flags(RelposShape(6, 7, 1, 16, 32), 256) == (4, False, True)  # LeViT-128S 7 x 7
    assert flags(RelposShape(1, 28, 1, 16, 16), 1) == (8, None, True)  # key-blocked


@pytest.mark.parametrize(("arch", "scale"), [(90, -0.4), (90, 0.0), (90, 1e-5), (80, 0.3)])
def test_dkdv_bias_after_the_dot(arch, scale, monkeypatch, poisoned):
    """The dK/dV kernel starts its K Q^T dot's accumulator at the bias divided by scale *
    log2(e) on sm_90a (the path every other gradient test takes); for sm_80, and for a
    negative scale or one near 0 (no division by it), it adds the bias in log2 units
    after the dot. 6 x 6 keys: a bias launch, a full query block and a tail."""
    monkeypatch.setattr(tk, "target_arch", lambda device: arch)
    case = (1, 2, 6, 6, 1, 16, 16)
    q, k, v, table = make(case)
    kw = {**kwargs_of(case), "scale": scale}
    check_grads("triton", q, k, v, table, kw, GRAD_TOL[torch.float32], f"sm_{arch}, scale {scale}")


@pytest.mark.parametrize("view", ["conv", "tokens"])
def test_gradients_through_strided_views(view, poisoned):
    case = CASES["A4 shrink 14to7"]
    q, k, v, table = make(case, view=view, layout="nh")
    check_grads("triton", q, k, v, table, kwargs_of(case, "nh"), GRAD_TOL[torch.float32], view)


def test_gradient_of_a_non_contiguous_output_grad(poisoned):
    """grad_out arrives with the strides of whatever consumed the output."""
    case = CASES["shrink 7to4"]
    q, k, v, table = make(case)
    leaves = [t.requires_grad_() for t in (q, k, v, table)]
    out = vitkernels.relpos_attention(*leaves, **kwargs_of(case), backend="triton")
    g = torch.randn(out.shape[0], out.shape[1], out.shape[3], out.shape[2]).transpose(-1, -2)
    out.backward(g)
    expected, ref_leaves = ref64(q, k, v, table, **kwargs_of(case))
    expected.backward(g.double())
    for t, r in zip(leaves, ref_leaves, strict=True):
        assert_close(t.grad, r.grad, GRAD_TOL[torch.float32])


def test_only_table_requires_grad(poisoned):
    case = CASES["A3 N16"]
    q, k, v, table = make(case)
    table.requires_grad_()
    out = vitkernels.relpos_attention(q, k, v, table, **kwargs_of(case), backend="triton")
    (dt,) = torch.autograd.grad(out.sum(), table)
    expected, ref_leaves = ref64(q, k, v, table, **kwargs_of(case))
    expected.sum().backward()
    assert_close(dt, ref_leaves[3].grad, GRAD_TOL[torch.float32])
    assert q.grad is None


def test_table_gradient_is_deterministic(poisoned):
    """Two backward calls give the same bits, and neither leaves a poisoned element.
    The interpreter runs programs one at a time, so only a GPU can break the order of
    the reductions (test_relpos_gpu.py); here the small case of the two-launch backward
    (A1's launches: the dQ kernel's table partials folded by the dK/dV kernel) does."""
    B, H, R, C, s, Dk, Dv = TWO_LAUNCHES
    q, k, v, table = make(TWO_LAUNCHES)
    args = (R, C, s, Dk**-0.5, 0.7)
    out, lse = tk.relpos_attention_fwd(q, k, v, table, *args)
    g = torch.randn_like(out)
    first = tk.relpos_attention_bwd(g, q, k, v, table, out, lse, *args)
    second = tk.relpos_attention_bwd(g, q, k, v, table, out, lse, *args)
    for a, b in zip(first, second, strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize("backend", ["reference", "torch"])
def test_gradcheck_float64(backend):
    case = (1, 2, 3, 4, 2, 5, 3)
    q, k, v, table = (t.double().requires_grad_() for t in make(case, layout="nh"))
    kw = kwargs_of(case, "nh", bias_scale=1.3)

    def f(q, k, v, table):
        return vitkernels.relpos_attention(q, k, v, table, **kw, backend=backend)

    assert torch.autograd.gradcheck(f, (q, k, v, table))


def test_table_gradient_compiles_to_the_sources_dots(tmp_path):
    """The interpreter runs the table-gradient sums as written; the compiler rewrote
    a one-hot product summed over an axis into a tensor-core dot of its own (TF32,
    and doubled where the summed axis was 4 long: A4's table gradient came out 2x on
    an H200). Compile the dQ/table kernel as A4 launches it (2-row query blocks, the
    doubled case) for sm_90a: every dot must be one the source wrote
    (vitkernels.triton._aot.compiler_made_dots; test_compile_budget checks every
    launch of every kernel)."""
    out = tmp_path / "aot.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    cmd = [sys.executable, "-m", "vitkernels.triton._aot", "--arch", "90", "--json", str(out),
           "--only", "relpos_dq[f16,Nq49,Nk196,Dk32,Dv128,S2]"]  # fmt: skip
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    reports = json.loads(out.read_text())
    assert len(reports) == 1, sorted(reports)
    for key, rep in reports.items():
        assert "error" not in rep, f"{key}: {rep['error'][:2000]}"
        assert rep["compiler_dots"] == [], f"{key}: dots no tl.dot wrote: {rep['compiler_dots']}"


# ----------------------------------------------------------------------------
# torch.library: custom ops, fake impls, autograd, compile


def test_opcheck_custom_ops():
    case = CASES["shrink 7to4"]
    q, k, v, table = make(case)
    args = (q, k, v, table, 7, 7, 2, 0.25, 0.7, "triton")
    torch.library.opcheck(ops.relpos_attention_fwd, args)
    out, lse = ops.relpos_attention_fwd(*args)
    bwd_args = (torch.randn_like(out), q, k, v, table, out, lse, 7, 7, 2, 0.25, 0.7, "triton")
    torch.library.opcheck(ops.relpos_attention_bwd, bwd_args)


def test_compile_fullgraph_forward_and_backward(poisoned):
    case = CASES["shrink 7to4"]
    q, k, v, table = make(case, layout="nh")
    kw = kwargs_of(case, "nh")

    def f(q, k, v, table):
        return vitkernels.relpos_attention(q, k, v, table, **kw, backend="triton")

    leaves = [t.requires_grad_() for t in (q, k, v, table)]
    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    out = compiled(*leaves)
    expected, ref_leaves = ref64(q, k, v, table, **kw)
    assert_close(out, expected, TOL[torch.float32])
    g = torch.randn_like(expected)
    out.backward(g.float())
    expected.backward(g)
    for t, r in zip(leaves, ref_leaves, strict=True):
        assert_close(t.grad, r.grad, GRAD_TOL[torch.float32])


# ----------------------------------------------------------------------------
# dispatch


def test_cpu_tensors_go_to_torch_automatically():
    case = CASES["A3 N16"]
    q, k, v, table = make(case)
    chosen, verdicts = ops.which_backend(q, k, v, table, **kwargs_of(case))
    assert chosen == "torch", verdicts


def test_forced_triton_refuses_float64():
    case = CASES["A3 N16"]
    q, k, v, table = (t.double() for t in make(case))
    with pytest.raises(BackendNotSupportedError, match="triton.*q, k, v, bias_table have dtype float64"):
        vitkernels.relpos_attention(q, k, v, table, fmap_size=4, backend="triton")
    with vitkernels.use_backend("triton"), pytest.raises(BackendNotSupportedError, match="float64"):
        vitkernels.relpos_attention(q, k, v, table, fmap_size=4)


@pytest.fixture
def extension_on_sm90(monkeypatch):
    """The CUDA extension 'loaded', every GPU an sm_90 (no GPU here: fake tensors) and
    the speed evidence putting cuda first (tests/test_evidence.py tests that part)."""
    from vitkernels import evidence

    monkeypatch.setattr(evidence, "passed_over", lambda *args: "")
    monkeypatch.setattr(ops._cuda, "unavailable_reason", lambda: None)
    monkeypatch.setattr(ops._cuda, "has_op", lambda name: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))


def _fake_cuda(*tensors: torch.Tensor) -> list[torch.Tensor]:
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        return [torch.empty(t.shape, dtype=t.dtype, device="cuda") for t in tensors]


def test_forced_cuda_refuses_float32(extension_on_sm90):
    """With the extension present, float32 is refused by name (the kernels are f16/bf16)."""
    case = CASES["A3 N16"]
    q, k, v, table = _fake_cuda(*make(case))
    chosen, verdicts = ops.which_backend(q, k, v, table, **kwargs_of(case))
    assert chosen == "triton" and any("q, k, v have dtype float32" in r for r in dict(verdicts)["cuda"])
    with pytest.raises(BackendNotSupportedError, match="backend .cuda.*q, k, v have dtype float32"):
        vitkernels.relpos_attention(q, k, v, table, **kwargs_of(case), backend="cuda")


def test_cuda_table_gradient_is_taken_under_deterministic_algorithms(extension_on_sm90):
    """The CUDA kernels sum the table gradient in a fixed order (no atomics; the
    emulated test_relpos_emulated_backward_is_deterministic checks the bits): with
    torch.use_deterministic_algorithms(True) and a table that needs a gradient the
    cuda backend stays eligible."""
    case = CASES["A3 N16"]
    q, k, v, table = _fake_cuda(*make(case, torch.float16))
    table.requires_grad_()
    kw = kwargs_of(case)
    was = torch.are_deterministic_algorithms_enabled()
    try:
        torch.use_deterministic_algorithms(True)
        chosen, verdicts = ops.which_backend(q, k, v, table, **kw)
        assert chosen == "cuda", dict(verdicts)["cuda"]
    finally:
        torch.use_deterministic_algorithms(was)


def test_triton_size_limits_are_reasons():
    q, k, v, table = make((1, 1, 1, 65, 1, 16, 16))
    _, verdicts = ops.which_backend(q, k, v, table, fmap_size=(1, 65), backend="triton")
    assert "max(R, C)=65 is above the kernels' limit of 64" in dict(verdicts)["triton"]
    q, k, v, table = make((1, 1, 2, 2, 1, 160, 16))
    _, verdicts = ops.which_backend(q, k, v, table, fmap_size=(2, 2), backend="triton")
    assert "Dk=160 is above the kernels' limit of 128" in dict(verdicts)["triton"]


# ----------------------------------------------------------------------------
# bad inputs


def _bad(**change):
    q, k, v, table = make((2, 3, 4, 5, 2, 16, 8))
    args = dict(q=q, k=k, v=v, bias_table=table)
    kw = dict(fmap_size=(4, 5), q_stride=2)
    for key, value in change.items():
        (args if key in args else kw)[key] = value(args) if callable(value) else value
    return args, kw


BAD = [
    ("k heads", dict(k=lambda a: torch.randn(2, 4, 20, 16)), ValueError, r"k has shape \(2, 4, 20, 16\); expected \(B, H, Nk, Dk\) = \(2, 3, Nk, 16\)"),
    ("k Dk", dict(k=lambda a: torch.randn(2, 3, 20, 8)), ValueError, r"k has shape \(2, 3, 20, 8\)"),
    ("v keys", dict(v=lambda a: torch.randn(2, 3, 19, 8)), ValueError, r"v has shape \(2, 3, 19, 8\); expected \(B, H, Nk, Dv\) = \(2, 3, 20, Dv\)"),
    ("q ndim", dict(q=lambda a: torch.randn(2, 6, 16)), ValueError, r"q has shape \(2, 6, 16\); expected \(B, H, Nq, Dk\)"),
    ("table heads", dict(bias_table=lambda a: torch.randn(4, 20)), ValueError, r"bias_table has shape \(4, 20\); expected \(3, 20\) \(H=3 heads, R\*C=20 offsets\) for table_layout='hn'"),
    ("table size", dict(bias_table=lambda a: torch.randn(3, 16)), ValueError, r"bias_table has shape \(3, 16\); expected \(3, 20\)"),
    ("table layout nh", dict(table_layout="nh"), ValueError, r"bias_table has shape \(3, 20\); expected \(20, 3\)"),
    ("grid vs Nk", dict(fmap_size=(5, 5)), ValueError, r"k has Nk=20 keys but fmap_size=\(5, 5\) has R\*C=25"),
    ("grid vs Nq", dict(q_stride=1), ValueError, r"q has Nq=6 queries; expected ceil\(R/s\)\*ceil\(C/s\) = 4\*5 = 20"),
    ("layout name", dict(table_layout="hw"), ValueError, r"table_layout='hw'; expected 'hn'"),
    ("fmap type", dict(fmap_size="4x5"), TypeError, r"fmap_size='4x5'"),
    ("fmap zero", dict(fmap_size=(0, 5)), ValueError, r"fmap_size=\(0, 5\); expected positive"),
    ("stride zero", dict(q_stride=0), ValueError, r"q_stride=0; expected an int >= 1"),
    ("stride float", dict(q_stride=2.0), TypeError, r"q_stride must be an int, got 2.0"),
    ("scale nan", dict(scale=float("nan")), ValueError, r"scale=nan; expected a finite float"),
    ("bias_scale str", dict(bias_scale="1"), TypeError, r"bias_scale must be a float"),
    ("k dtype", dict(k=lambda a: a["k"].half()), TypeError, r"k has dtype torch.float16 but q has torch.float32"),
    ("int table", dict(bias_table=lambda a: torch.zeros(3, 20, dtype=torch.long)), TypeError, r"bias_table has dtype torch.int64; expected a floating-point"),
    ("not a tensor", dict(v=lambda a: a["v"].tolist()), TypeError, r"v must be a torch.Tensor, got list"),
    ("meta device", dict(bias_table=lambda a: a["bias_table"].to("meta")), ValueError, r"different devices \(cpu, cpu, cpu, meta\)"),
]  # fmt: skip


@pytest.mark.parametrize("change, exc, match", [b[1:] for b in BAD], ids=[b[0] for b in BAD])
def test_bad_inputs_say_what_was_given_and_expected(change, exc, match):
    args, kw = _bad(**change)
    with pytest.raises(exc, match=match):
        vitkernels.relpos_attention(**args, **kw)


# ----------------------------------------------------------------------------
# the torch backend's caches (index per grid, gathered bias where no grad is needed)


class _Levit(torch.nn.Module):
    def __init__(self, H=2, side=7):
        super().__init__()
        self.table = torch.nn.Parameter(torch.randn(H, side * side))
        self.side = side

    def forward(self, q, k, v):
        return vitkernels.relpos_attention(
            q, k, v, self.table, fmap_size=(self.side, self.side), q_stride=1, scale=0.25,
            bias_scale=0.5, table_layout="hn", backend="torch",
        )


def test_torch_export_twice_after_eager_calls():
    """torch.export must not leave traced (fake) tensors in the caches: a second
    export of the same grid, and eager calls around them, still work."""
    m = _Levit()
    q, k, v = (torch.randn(2, 2, 49, 16) for _ in range(3))
    with torch.no_grad():
        want = m(q, k, v)
    for _ in range(2):
        ep = torch.export.export(m, (q, k, v))
        torch.testing.assert_close(ep.module()(q, k, v), want)
    with torch.no_grad():
        torch.testing.assert_close(m(q, k, v), want)
    expected, _ = ref64(q, k, v, m.table, fmap_size=(7, 7), scale=0.25, bias_scale=0.5)
    assert_close(want, expected, TOL[torch.float32])


def test_bias_follows_table_updates():
    """In-place updates of the table (optimizer step, load_state_dict) show in the
    next output (fused optimizers and .data writes: test_relpos_fresh.py)."""
    m = _Levit()
    q, k, v = (torch.randn(2, 2, 49, 16) for _ in range(3))
    with torch.no_grad():
        for step in range(2):
            out = m(q, k, v)
            expected, _ = ref64(q, k, v, m.table, fmap_size=(7, 7), scale=0.25, bias_scale=0.5)
            assert_close(out, expected, TOL[torch.float32], f"after {step} updates")
            m.table.add_(torch.randn_like(m.table))
        m.load_state_dict({"table": torch.randn(2, 49)})
        expected, _ = ref64(q, k, v, m.table, fmap_size=(7, 7), scale=0.25, bias_scale=0.5)
        assert_close(m(q, k, v), expected, TOL[torch.float32], "after load_state_dict")
    # with grad: gathered afresh, and the table gets its gradient
    out = m(q, k, v)
    out.sum().backward()
    assert m.table.grad is not None and m.table.grad.abs().sum() > 0


# ----------------------------------------------------------------------------
# the reference itself stays finite wherever the exact value is


@pytest.mark.parametrize("backend", ["reference", "torch"])
def test_float16_logits_beyond_float16_range(backend):
    """q, k of size ~150 in float16: q.k ~ 1e5 overflows float16 (max 65504) before it
    is scaled, while the scaled logits and the result are finite."""
    case = (1, 2, 4, 4, 1, 16, 16)
    q, k, v, table = make(case, torch.float16)
    q, k = (t * 150 for t in (q, k))
    kw = kwargs_of(case)
    assert (q[..., None, :].double() * k[..., None, :, :].double()).sum(-1).abs().max() > 65504
    out = vitkernels.relpos_attention(q, k, v, table, **kw, backend=backend)
    expected, _ = ref64(q, k, v, table, **kw)
    assert_close(out, expected.detach(), TOL[torch.float16], backend)


def test_torch_backend_trains_after_an_inference_mode_call():
    """A grid first seen under torch.inference_mode (an eval pass) must not leave an
    inference tensor in the torch backend's index cache: training on that grid
    afterwards saved it for backward and failed."""
    case = (1, 2, 3, 7, 2, 8, 8)  # a grid no other test uses
    q, k, v, table = make(case)
    kw = kwargs_of(case)
    with torch.inference_mode():
        vitkernels.relpos_attention(q, k, v, table, **kw, backend="torch")
    check_grads("torch", q, k, v, table, kw, GRAD_TOL[torch.float32], "after inference_mode")


def test_small_grid_backward_takes_dk_dv_in_the_dq_kernel():
    """Where one dQ program holds every query and every key of a small grid (A3's 4 x 4),
    it writes dK and dV as well: the backward is that kernel and the table fold. Larger
    grids (A2's 7 x 7: 64 keys spilled there) keep their dK/dV launch, which folds the
    table gradient itself (``test_backward_of_two_launches``). The gradient tests
    above check the values of both paths against float64 (A3 N16, A2 N49)."""
    from vitkernels.triton._aot import record_workload
    from vitkernels.workloads import WORKLOADS

    def names(w):
        return [la.name.split("[")[0] for la in record_workload(WORKLOADS[w].shape, "bwd").launches]

    assert names("A3") == ["relpos_dq", "relpos_fold"]
    assert names("A2") == ["relpos_dq", "relpos_dkdv"]
    dq = next(la for la in record_workload(WORKLOADS["A3"].shape, "bwd").launches if la.name.startswith("relpos_dq"))
    assert dq.constexprs["DKDV"] is True


def test_key_blocked_dq_case():
    """The "key-blocked 9x22" gradient case takes the kernels, blocks and tails of
    LeViT's 28 x 28 grid (448px) at a fraction of its interpreter time: its float64
    checks above cover that path."""
    from vitkernels.triton._common import recording

    def launches(rows, cols):
        H, Dk, Dv, n = 1, 16, 16, rows * cols
        q, k, v = (torch.empty(1, H, n, d, device="meta") for d in (Dk, Dk, Dv))
        table, lse = torch.empty(H, n, device="meta"), torch.empty(1, H, n, device="meta")
        args = (rows, cols, 1, Dk**-0.5, 0.7)
        with recording() as rec:
            tk.relpos_attention_fwd(q, k, v, table, *args)
            tk.relpos_attention_bwd(v, q, k, v, table, v, lse, *args)
        return [(la.name.split("[")[0], la.kernel, la.num_warps, la.constexprs) for la in rec.launches]

    same = ("KEY_ROWS", "BLOCK_M", "BLOCK_N", "TAIL_N", "TAIL_M", "FULL", "GATHER", "BIAS_ACC", "FOLD_ONE",
            "QR", "CQP", "KR", "CP", "E", "BLOCK_C", "TAIL_C", "DELTA_FROM_O")  # fmt: skip
    case, n784 = launches(*CASES["key-blocked 9x22"][2:4]), launches(28, 28)
    assert [c[:3] for c in case] == [c[:3] for c in n784]
    assert "relpos_dq" in [c[0] for c in case] and tk._bwd_dq_blocked_kernel in [c[1] for c in case]
    for (name, _, _, cx), (_, _, _, cx784) in zip(case, n784, strict=True):
        assert {k: cx[k] for k in same if k in cx} == {k: cx784[k] for k in same if k in cx784}, name


# the backward of two launches: the dQ kernel writes the dK/dV kernel's bias tiles, the
# dK/dV kernel folds the table gradient; B, H, R, C, s, Dk, Dv (6 x 6: a full query
# block and a tail in dK/dV; 5 batch entries: 5 table-gradient partials)
TWO_LAUNCHES = (5, 2, 6, 6, 1, 32, 16)


def _backward_launches(case, batch=None):
    from vitkernels.triton._aot import record_workload
    from vitkernels.workloads import RelposShape

    B, H, R, C, s, Dk, Dv = case
    assert R == C
    return record_workload(RelposShape(H, R, s, Dk, Dv), "bwd", torch.bfloat16, batch=batch or B).launches


def test_backward_of_two_launches():
    """Where the dQ kernel takes every key and the dK/dV kernel loops over query blocks
    (A1, A2, A4 and the case the gradient tests below run), the backward is those
    two launches: the dQ kernel writes the dK/dV kernel's bias tiles (a chunk a
    program, from this call's table) and the dK/dV kernel folds the table gradient
    out of the dQ kernel's partials (an entry per program, the rest round-robin)."""
    from vitkernels.triton._aot import record_workload
    from vitkernels.workloads import WORKLOADS

    for launches in [record_workload(WORKLOADS["A1"].shape, "bwd").launches, _backward_launches(TWO_LAUNCHES)]:
        assert [la.name.split("[")[0] for la in launches] == ["relpos_dq", "relpos_dkdv"]
        assert launches[0].constexprs["TILES"] is True
    a1 = record_workload(WORKLOADS["A1"].shape, "bwd").launches
    assert a1[0].constexprs["TILE_CHUNK"] == 256  # one float a thread (8 warps)
    assert a1[1].constexprs["FOLD_ONE"] is True  # every partial in one tile


@pytest.mark.parametrize("chunk", [None, 1], ids=["one chunk", "chunk loop"])
def test_two_launch_backward_after_an_in_place_table_change(chunk, monkeypatch, poisoned):
    """The dK/dV bias tiles the dQ kernel writes and the folded table gradient come from
    the table of each call: a second training call after the table changed in place
    (as an optimizer step does) matches float64 on the new values. "chunk loop": the
    fold sums the partials a few at a time (what a large batch takes)."""
    if chunk is not None:
        monkeypatch.setattr(tk, "_FOLD_CHUNK_PER_WARP", chunk)
        launches = _backward_launches(TWO_LAUNCHES)
        assert launches[1].constexprs["FOLD_ONE"] is False
    q, k, v, table = make(TWO_LAUNCHES)
    kw = kwargs_of(TWO_LAUNCHES)
    check_grads("triton", q, k, v, table, kw, GRAD_TOL[torch.float32], "first call")
    with torch.no_grad():
        table.mul_(-1.5).add_(0.25)
    check_grads("triton", q, k, v, table, kw, GRAD_TOL[torch.float32], "after the change")


def test_fold_launch_chunk_loop(monkeypatch, poisoned):
    """Where the dQ kernel writes dK and dV itself (A3's 4 x 4), the fold is its own
    launch; with few partials a program at a time it loops over them."""
    monkeypatch.setattr(tk, "_FOLD_CHUNK_PER_WARP", 1)
    case = CASES["A3 N16"]
    launches = _backward_launches(case)
    assert [la.name.split("[")[0] for la in launches] == ["relpos_dq", "relpos_fold"]
    assert launches[1].constexprs["ONE_CHUNK"] is False
    q, k, v, table = make(case)
    check_grads("triton", q, k, v, table, kwargs_of(case), GRAD_TOL[torch.float32], "A3, chunk loop")


# the fused backward (``_bwd_fused_kernel``, A5's path) at grids the interpreter takes
# quickly: the key count it starts from lowered. B, H, R, C, s, Dk, Dv: 6 x 6 in two
# 4-grid-row query blocks (the second half empty), 3 batch entries (program groups of
# 2 and 1); 5 x 5 with Dk 8, Dv 24 (padded head dims; a second block of one grid row);
# 9 x 9 with q_stride 2 (a 5 x 5 query grid in two blocks of 4 x 8 slots)
FUSED = {"6x6": (3, 2, 6, 6, 1, 16, 32), "5x5 Dk8 Dv24": (2, 2, 5, 5, 1, 8, 24), "9x9 stride2": (2, 2, 9, 9, 2, 16, 32)}
FUSED_NAMES = ["relpos_bwd_bias", "relpos_bwd_fused", "relpos_fold"]


def test_fused_backward_launches():
    """A5 (LeViT-128S stage 1) takes the fused backward: its bias launch, one launch
    recomputing P once for dQ, dK, dV and the table partials, and the fold (8 warps,
    32-query blocks, batch groups of 4, of 2 where 4 would leave < 132 programs); A1 (wider heads) and the 9 x 9 small-head grid
    (below the key count) keep the dQ and dK/dV launches, and so do sm_80 and float32."""
    from vitkernels.triton._aot import record_workload
    from vitkernels.workloads import WORKLOADS, RelposShape

    def launches(shape, arch=90, batch=256):
        return record_workload(shape, "bwd", torch.bfloat16, batch=batch, arch=arch).launches

    a5 = launches(WORKLOADS["A5"].shape)
    assert [la.name.split("[")[0] for la in a5] == FUSED_NAMES
    fused = a5[1]
    assert (fused.num_warps, fused.constexprs["QR"], fused.constexprs["CQP"], fused.programs) == (8, 2, 16, 256)
    # groups of 4 where >= 132 programs remain, else 2 (batch 64: 64 programs)
    assert launches(WORKLOADS["A5"].shape, batch=64)[1].programs == 128
    assert fused.constexprs["TERM_F16"] is False
    assert fused.constexprs["KT_RELOAD"] is tk._TRITON_36
    for shape in (WORKLOADS["A1"].shape, RelposShape(1, 9, 1, 16, 32)):
        assert [la.name.split("[")[0] for la in launches(shape)] == ["relpos_dq", "relpos_dkdv"]
    assert [la.name.split("[")[0] for la in launches(WORKLOADS["A5"].shape, arch=80)] == ["relpos_dq", "relpos_dkdv"]
    # float32 (spilled: not taken) has tiles of its own: a key-blocked dQ, so dK/dV's bias has a launch
    f32 = record_workload(WORKLOADS["A5"].shape, "bwd", torch.float32).launches
    assert [la.name.split("[")[0] for la in f32] == ["relpos_dq", "relpos_dkdv_bias", "relpos_dkdv"]


@pytest.mark.parametrize(
    ("case", "dtype", "view", "reload"),
    [("6x6", torch.float32, "contiguous", False), ("6x6", torch.float16, "heads last", False),
     ("5x5 Dk8 Dv24", torch.float32, "heads last", False), ("5x5 Dk8 Dv24", torch.float16, "contiguous", False),
     ("6x6", torch.float32, "heads last", True), ("9x9 stride2", torch.float32, "contiguous", False)],
    ids=["6x6-f32", "6x6-f16-strided", "5x5-f32-strided", "5x5-f16", "6x6-f32-strided-kt-reload", "9x9-stride2-f32"],
)  # fmt: skip
def test_fused_backward(case, dtype, view, reload, monkeypatch, poisoned):
    """The fused backward's dq, dk, dv and dtable against float64 (every buffer NaN
    first), in float16 and (taken only here: on a GPU it spilled) float32, on
    contiguous inputs and on (B, N, H, D) buffers viewed as (B, H, N, D) (strided,
    rows still 16-byte aligned: the all-keys path), K^T kept or (as triton 3.6 runs
    it) loaded per block; a spy checks the path ran."""
    monkeypatch.setattr(tk, "_FUSED_MIN_KEYS", 16)
    monkeypatch.setattr(tk, "_FUSED_FLOAT32", True)
    monkeypatch.setattr(tk, "_TRITON_36", reload)
    B, H, R, C, s, Dk, Dv = FUSED[case]
    if view == "contiguous":
        q, k, v, table = make(FUSED[case], dtype)
    else:
        n = R * C
        assert s == 1
        q, k, v = (torch.randn(B, n, H, d).to(dtype).permute(0, 2, 1, 3) for d in (Dk, Dk, Dv))
        table = torch.randn(H, n).to(dtype)
        assert not q.is_contiguous() and tk._vector_loads(q, k, v)
    names = []
    real_launch = tk.launch

    def spy(spec):
        names.append(spec.name.split("[")[0])
        real_launch(spec)

    monkeypatch.setattr(tk, "launch", spy)
    check_grads("triton", q, k, v, table, kwargs_of(FUSED[case]), GRAD_TOL[dtype], f"{case} {view}")
    assert names[-3:] == FUSED_NAMES


def test_faulting_dq_names_exactly_the_launches_of_that_configuration():
    """``faulting_dq`` (what dispatch refuses for training on a GPU) says yes exactly
    where the recorded backward launches ``_bwd_dq_kernel`` at one block of 64 query
    slots against 64 key slots with Dk blocks of 32 or more in 16-bit (the
    configuration that faulted on an H200): over grids, strides, head sizes and both
    architectures, the helper and the launchers agree."""
    from vitkernels.triton._common import recording

    def recorded(R, C, s, dk, dv, dtype, arch):
        nq, nk = -(-R // s) * -(-C // s), R * C
        q, k = torch.empty(2, 2, nq, dk, device="meta", dtype=dtype), torch.empty(2, 2, nk, dk, device="meta", dtype=dtype)
        v, table = torch.empty(2, 2, nk, dv, device="meta", dtype=dtype), torch.empty(2, nk, device="meta")
        with recording(arch) as rec:
            out, lse = tk.relpos_attention_fwd(q, k, v, table, R, C, s, dk**-0.5, 0.8)
            tk.relpos_attention_bwd(out, q, k, v, table, out, lse, R, C, s, dk**-0.5, 0.8)
        for la in rec.launches:
            if la.kernel is tk._bwd_dq_kernel:
                cx = la.constexprs
                return cx["QR"] * cx["CQP"] == 64 and cx["TRP"] * cx["CP"] == 64 and cx["BLOCK_DK"] >= 32
        return False

    seen = set()
    for R, C, s in ((7, 7, 1), (8, 8, 1), (5, 8, 1), (7, 7, 2), (14, 14, 1), (14, 14, 2), (4, 4, 1), (6, 5, 1),
                    (8, 7, 1), (1, 1, 1), (7, 8, 3), (16, 16, 2)):  # fmt: skip
        for dk, dv in ((16, 32), (16, 64), (32, 64), (32, 128), (64, 64), (20, 40)):
            for dtype in (torch.float16, torch.bfloat16):
                for arch in (80, 90):
                    got = tk.faulting_dq(R, C, s, dk, dv, dtype, arch, dk**-0.5, dk % 8 == 0 and dv % 8 == 0)
                    assert got == recorded(R, C, s, dk, dv, dtype, arch), (R, C, s, dk, dv, dtype, arch)
                    seen.add(got)
    assert seen == {True, False}
    assert not tk.faulting_dq(7, 7, 1, 32, 64, torch.float32, 90, 32**-0.5)
    assert tk.faulting_dq(7, 7, 1, 32, 64, torch.float16, 90, 32**-0.5)  # LeViT-256's 7 x 7 stage (A2)
