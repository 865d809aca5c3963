"""The CUDA extension on a GPU (marker gpu; skipped elsewhere).

Every op of torch.ops.vitkernels_C against the reference backend on float64
copies, at the WORKLOADS.md shapes (batch 8, and 256 once per op family) and at
odd ones, float16 and bfloat16, strided views; the results' shapes, dtypes and
layout as the Triton launchers return them (the op modules call both the same
way); gradients through the public ops with backend="cuda".

Outputs the ops allocate are poisoned: before each call the caching allocator's
free blocks are filled with NaN, so an element a kernel never writes shows up.

On the GPU machine: ``python -m vitkernels build && python -m pytest tests/test_cuda_gpu.py``
(the module fixture builds the extension just in time when it is not built).
"""

from __future__ import annotations

import math

import pytest
import torch
from _numerics import assert_close

import vitkernels
from vitkernels import cuda
from vitkernels.backends import reference as ref

pytestmark = pytest.mark.gpu

DTYPES = (torch.float16, torch.bfloat16)
# relative to the reference's largest magnitude (tests/_numerics.py), one per dtype for
# values and gradients alike (the elementwise tol * (scale + |want|) these tests had,
# 3e-3 and 2e-2, never allows more than twice that against the largest magnitude)
TOL = {torch.float16: 6e-3, torch.bfloat16: 4e-2}


@pytest.fixture(scope="module")
def C():
    """torch.ops.vitkernels_C, built just in time when needed."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    if not cuda.is_built():
        try:
            cuda.build()
        except cuda.BuildError as exc:
            if "no CUDA toolkit" in str(exc):
                pytest.skip(str(exc))
            raise
    reason = cuda.unavailable_reason()
    assert reason is None, reason
    for name in cuda.OPS:
        assert cuda.has_op(name), f"the extension lacks {name}"
    return torch.ops.vitkernels_C


def poison() -> None:
    """Fill the caching allocator's free memory with NaN (large and small pools)."""
    torch.cuda.synchronize()
    big = torch.empty(256 * 2**20, dtype=torch.uint8, device="cuda").fill_(0xFF)
    small = [torch.empty(2**19, dtype=torch.uint8, device="cuda").fill_(0xFF) for _ in range(32)]
    del big, small


def check(
    name: str, got: torch.Tensor, want: torch.Tensor, dtype: torch.dtype, floor: float = 1e-2
) -> None:
    """got against the float64 reference (tests/_numerics.py) at the tolerance of the
    inputs' dtype; NaN fails.

    floor: the smallest scale errors are measured against (a reference that is
    exactly zero, e.g. the gradient of a softmax over one key, still allows rounding).
    """
    assert_close(got, want.detach(), TOL[dtype], name, floor=floor)


def contract(t: torch.Tensor, shape, dtype) -> None:
    assert tuple(t.shape) == tuple(shape) and t.dtype == dtype and t.is_contiguous(), (
        f"got {tuple(t.shape)} {t.dtype} contiguous={t.is_contiguous()}; expected {tuple(shape)} {dtype}"
    )


def d64(t: torch.Tensor | None, grad: bool = False) -> torch.Tensor | None:
    if t is None:
        return None
    return t.detach().double().requires_grad_(grad)


# ----------------------------------------------------------------------------
# relpos_attention

# id: (H, R, C, q_stride, Dk, Dv) -- WORKLOADS A1-A5, then odd shapes
RELPOS = {
    "A1": (4, 14, 14, 1, 32, 64),
    "A2": (6, 7, 7, 1, 32, 64),
    "A3": (8, 4, 4, 1, 32, 64),
    "A4": (8, 14, 14, 2, 32, 128),
    "A5": (4, 14, 14, 1, 16, 32),
    "odd_9x5_s3": (3, 9, 5, 3, 20, 40),
    "odd_1x1": (2, 1, 1, 1, 16, 16),
    "odd_24x24_dk64": (2, 24, 24, 1, 64, 96),
    "odd_dk128": (1, 6, 11, 2, 128, 128),
}


def relpos_inputs(case, B, dtype, *, layout="hn", table_dtype=None, views=False):
    H, R, C, s, Dk, Dv = case
    Nq, Nk = -(-R // s) * -(-C // s), R * C
    dev = "cuda"
    if views:  # 1x1-conv outputs 'b (h d) x y -> b h (x y) d', q subsampled
        qc = torch.randn(B, H * Dk, R, C, device=dev).to(dtype)[:, :, ::s, ::s]
        q = qc.flatten(2).unflatten(1, (H, Dk)).transpose(2, 3)
        kv = torch.randn(B, H * (Dk + Dv), R, C, device=dev).to(dtype)
        k = kv[:, : H * Dk].flatten(2).unflatten(1, (H, Dk)).transpose(2, 3)
        v = kv[:, H * Dk :].flatten(2).unflatten(1, (H, Dv)).transpose(2, 3)
    else:
        q = torch.randn(B, H, Nq, Dk, device=dev).to(dtype)
        k = torch.randn(B, H, Nk, Dk, device=dev).to(dtype)
        v = torch.randn(B, H, Nk, Dv, device=dev).to(dtype)
    td = table_dtype or dtype
    stored = (
        torch.randn(H, Nk, device=dev) if layout == "hn" else torch.randn(Nk, H, device=dev)
    ).to(td)
    return q, k, v, stored, (stored if layout == "hn" else stored.t())


def relpos_ref(q, k, v, stored, case, scale, bias_scale, layout):
    H, R, C, s, Dk, Dv = case
    return ref.relpos_attention(
        q, k, v, stored, fmap_size=(R, C), q_stride=s, scale=scale, bias_scale=bias_scale,
        table_layout=layout,
    )  # fmt: skip


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("name", list(RELPOS))
def test_relpos_ops_match_reference(C, name, dtype):
    case = RELPOS[name]
    H, R, Cc, s, Dk, Dv = case
    B, scale, bias_scale = 8, Dk**-0.5, 0.7
    q, k, v, stored, table = relpos_inputs(case, B, dtype, table_dtype=torch.float32)
    Nq, Nk = q.shape[2], k.shape[2]
    poison()
    out, lse = C.relpos_attention_fwd(q, k, v, table, R, Cc, s, scale, bias_scale)
    contract(out, (B, H, Nq, Dv), dtype)
    contract(lse, (B, H, Nq), torch.float32)
    qd, kd, vd, sd = (d64(t, True) for t in (q, k, v, stored))
    want = relpos_ref(qd, kd, vd, sd, case, scale, bias_scale, "hn")
    check("out", out, want, dtype)
    logits = torch.einsum("bhid,bhjd->bhij", qd, kd) * scale
    logits = logits + bias_scale * sd[:, ref.relpos_bias_index((R, Cc), s, device="cuda")]
    check("lse", lse, logits.logsumexp(-1), torch.float16)

    dout = torch.randn_like(out)
    want.backward(dout.double())
    poison()
    dq, dk, dv, dtable = C.relpos_attention_bwd(
        dout, q, k, v, table, out, lse, R, Cc, s, scale, bias_scale
    )
    contract(dq, (B, H, Nq, Dk), dtype)
    contract(dk, (B, H, Nk, Dk), dtype)
    contract(dv, (B, H, Nk, Dv), dtype)
    contract(dtable, (H, R * Cc), torch.float32)
    for n, got, g in (
        ("dq", dq, qd.grad),
        ("dk", dk, kd.grad),
        ("dv", dv, vd.grad),
        ("dtable", dtable, sd.grad),
    ):
        check(n, got, g, dtype)


def test_relpos_full_batch_a1_and_a4(C):
    for name in ("A1", "A4"):
        case = RELPOS[name]
        H, R, Cc, s, Dk, Dv = case
        q, k, v, stored, table = relpos_inputs(case, 256, torch.bfloat16)
        poison()
        out, lse = C.relpos_attention_fwd(q, k, v, table, R, Cc, s, Dk**-0.5, 1.0)
        want = relpos_ref(d64(q), d64(k), d64(v), d64(stored), case, Dk**-0.5, 1.0, "hn")
        check(f"{name} out", out, want, torch.bfloat16)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_relpos_views_nh_layout_and_triton_parity(C, dtype):
    case = RELPOS["A4"]
    H, R, Cc, s, Dk, Dv = case
    q, k, v, stored, table = relpos_inputs(case, 4, dtype, layout="nh", views=True)
    assert not q.is_contiguous() and not table.is_contiguous()
    scale, bias_scale = Dk**-0.5, 1 / Dk**-0.5  # vit-pytorch: an embedding scaled by 1/scale
    poison()
    out, lse = C.relpos_attention_fwd(q, k, v, table, R, Cc, s, scale, bias_scale)
    want = relpos_ref(d64(q), d64(k), d64(v), d64(stored), case, scale, bias_scale, "nh")
    check("out", out, want, dtype)
    pytest.importorskip("triton")
    from vitkernels.triton import relpos as tk

    t_out, t_lse = tk.relpos_attention_fwd(q, k, v, table, R, Cc, s, scale, bias_scale)
    check("out vs triton", out, t_out, dtype)
    check("lse vs triton", lse, t_lse, torch.float16)
    dout = torch.randn_like(out)
    grads = C.relpos_attention_bwd(dout, q, k, v, table, out, lse, R, Cc, s, scale, bias_scale)
    t_grads = tk.relpos_attention_bwd(
        dout, q, k, v, table, t_out, t_lse, R, Cc, s, scale, bias_scale
    )
    for n, a, b in zip(("dq", "dk", "dv", "dtable"), grads, t_grads, strict=True):
        assert a.shape == b.shape and a.dtype == b.dtype, n
        check(f"{n} vs triton", a, b, dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("name", ["A1", "A4", "odd_9x5_s3"])
def test_relpos_public_op_gradients_on_cuda(C, name, dtype):
    case = RELPOS[name]
    H, R, Cc, s, Dk, Dv = case
    q, k, v, stored, table = relpos_inputs(case, 2, dtype)
    leaves = [t.detach().requires_grad_() for t in (q, k, v, stored)]
    out = vitkernels.relpos_attention(*leaves, fmap_size=(R, Cc), q_stride=s, backend="cuda")
    dout = torch.randn_like(out)
    out.backward(dout)
    d = [d64(t, True) for t in (q, k, v, stored)]
    want = relpos_ref(*d, case, Dk**-0.5, 1.0, "hn")
    want.backward(dout.double())
    check("out", out, want, dtype)
    for n, a, b in zip(("q", "k", "v", "table"), leaves, d, strict=True):
        check(f"d{n}", a.grad, b.grad, dtype)


def test_relpos_errors_name_the_argument(C):
    q, k, v, stored, table = relpos_inputs(RELPOS["A2"], 1, torch.float16)
    with pytest.raises(TypeError, match="q has dtype Float.*float16 or bfloat16"):
        C.relpos_attention_fwd(q.float(), k, v, table, 7, 7, 1, 0.1, 1.0)
    with pytest.raises(ValueError, match="k has 49 keys but fmap_size \\(7, 6\\)"):
        C.relpos_attention_fwd(q, k, v, table, 7, 6, 1, 0.1, 1.0)
    with pytest.raises(ValueError, match="table has shape"):
        C.relpos_attention_fwd(q, k, v, table[:, :10], 7, 7, 1, 0.1, 1.0)


def test_relpos_runs_on_the_current_stream(C):
    case = RELPOS["A2"]
    q, k, v, stored, table = relpos_inputs(case, 8, torch.float16)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        out, _ = C.relpos_attention_fwd(q, k, v, table, 7, 7, 1, 32**-0.5, 1.0)
    torch.cuda.current_stream().wait_stream(stream)
    want = relpos_ref(d64(q), d64(k), d64(v), d64(stored), case, 32**-0.5, 1.0, "hn")
    check("out", out, want, torch.float16)


# ----------------------------------------------------------------------------
# performer_attention

# id: (T, E, M) -- WORKLOADS T1, T2, then odd shapes
PERFORMER = {
    "T1": (3136, 64, 32),
    "T2": (784, 64, 32),
    "odd_T1": (1, 64, 32),
    "odd_T65_E40_M20": (65, 40, 20),
    "odd_E56": (300, 56, 32),
}


def performer_inputs(case, B, dtype, w_dtype, views=False):
    T, E, M = case
    kqv = torch.randn(B, T, 3 * E, device="cuda")
    kqv[..., : 2 * E] *= (64 / E) ** 0.5  # |q|^2, |k|^2 ~ 64 as in the workloads
    kqv = kqv.to(dtype)
    if views:  # T2T's kqv projection: one (B, T, 3E) tensor
        k, q, v = kqv.split(E, dim=-1)
    else:
        k, q, v = (t.contiguous() for t in kqv.split(E, dim=-1))
    w = (torch.nn.init.orthogonal_(torch.empty(M, E, device="cuda")) * math.sqrt(M)).to(w_dtype)
    return q, k, v, w


@pytest.mark.parametrize("w_dtype", ["same", torch.float32], ids=["w_same", "w_f32"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("name", list(PERFORMER))
def test_performer_ops_match_reference(C, name, dtype, w_dtype):
    T, E, M = PERFORMER[name]
    w_dtype = dtype if w_dtype == "same" else w_dtype
    B, eps = 8, 0.0 if T == 1 else 1e-8  # one token and eps 0: y is exactly v
    q, k, v, w = performer_inputs(PERFORMER[name], B, dtype, w_dtype, views=name == "T2")
    poison()
    y, lks, vbar = C.performer_attention_fwd(q, k, v, w, eps)
    contract(y, (B, T, E), dtype)
    contract(lks, (B, M), torch.float32)
    contract(vbar, (B, M, E), torch.float32)
    qd, kd, vd, wd = (d64(t, True) for t in (q, k, v, w))
    want = ref.performer_attention(qd, kd, vd, wd, eps=eps)
    check("y", y, want, dtype)
    ak = (kd @ wd.t() - (kd * kd).sum(-1, keepdim=True) / 2).detach()
    check("lks", lks, ak.logsumexp(1), torch.float16)
    check("vbar", vbar, torch.einsum("btm,bte->bme", ak.softmax(1), vd.detach()), torch.float16)

    dy = torch.randn_like(y)
    want.backward(dy.double())
    for w_grad in (True, False):
        poison()
        dq, dk, dv, dw = C.performer_attention_bwd(dy, q, k, v, w, lks, vbar, eps, w_grad)
        for t in (dq, dk, dv):
            contract(t, (B, T, E), dtype)
        contract(dw, (M, E), w_dtype)
        check("dq", dq, qd.grad, dtype)
        check("dk", dk, kd.grad, dtype)
        check("dv", dv, vd.grad, dtype)
        if w_grad:
            check("dw", dw, wd.grad, dtype)
        else:
            assert bool((dw == 0).all())


def test_performer_full_batch_t1_and_triton_parity(C):
    q, k, v, w = performer_inputs(PERFORMER["T1"], 256, torch.bfloat16, torch.bfloat16, views=True)
    poison()
    y, lks, vbar = C.performer_attention_fwd(q, k, v, w, 1e-8)
    want = ref.performer_attention(d64(q), d64(k), d64(v), d64(w), eps=1e-8)
    check("y", y, want, torch.bfloat16)
    pytest.importorskip("triton")
    from vitkernels.triton import performer as tk

    ty, tl, tv = tk.performer_attention_fwd(q, k, v, w, 1e-8)
    check("y vs triton", y, ty, torch.bfloat16)
    check("lks vs triton", lks, tl, torch.float16)
    check("vbar vs triton", vbar, tv, torch.float16)
    dy = torch.randn_like(y)
    ours = C.performer_attention_bwd(dy, q, k, v, w, lks, vbar, 1e-8, True)
    theirs = tk.performer_attention_bwd(dy, q, k, v, w, tl, tv, 1e-8, True)
    for n, a, b in zip(("dq", "dk", "dv", "dw"), ours, theirs, strict=True):
        assert a.shape == b.shape and a.dtype == b.dtype, n
        check(f"{n} vs triton", a, b, torch.bfloat16)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_performer_public_op_gradients_on_cuda(C, dtype):
    q, k, v, w = performer_inputs(PERFORMER["T2"], 2, dtype, dtype)
    leaves = [t.detach().requires_grad_() for t in (q, k, v)]
    y = vitkernels.performer_attention(*leaves, w, backend="cuda")
    dy = torch.randn_like(y)
    y.backward(dy)
    d = [d64(t, True) for t in (q, k, v)]
    want = ref.performer_attention(*d, d64(w), eps=1e-8)
    want.backward(dy.double())
    check("y", y, want, dtype)
    for n, a, b in zip("qkv", leaves, d, strict=True):
        check(f"d{n}", a.grad, b.grad, dtype)


def test_performer_large_norms_stay_finite(C):
    q, k, v, w = performer_inputs(PERFORMER["T2"], 2, torch.float16, torch.float32)
    q, k = (q * 4).half(), (k * 4).half()  # exp() of the reference's features overflows float32
    y, lks, vbar = C.performer_attention_fwd(q, k, v, w, 1e-8)
    assert bool(y.isfinite().all() and lks.isfinite().all() and vbar.isfinite().all())
    want = ref.performer_attention(d64(q), d64(k), d64(v), d64(w), eps=1e-8)
    if bool(want.isfinite().all()) and want.abs().max() > 1e-3:
        check("y", y, want, torch.float16)


def test_performer_errors_name_the_argument(C):
    q, k, v, w = performer_inputs(PERFORMER["T2"], 1, torch.float16, torch.float16)
    with pytest.raises(TypeError, match="k has dtype BFloat16 but q has Half"):
        C.performer_attention_fwd(q, k.bfloat16(), v, w, 1e-8)
    with pytest.raises(ValueError, match="w has shape"):
        C.performer_attention_fwd(q, k, v, w[:, :10], 1e-8)
    with pytest.raises(ValueError, match="M <= 32"):
        C.performer_attention_fwd(q, k, v, torch.randn(48, 64, device="cuda").half(), 1e-8)


# ----------------------------------------------------------------------------
# patch_embed (forward only: the extension has no patch_embed_bwd)


def _pair(x):
    return (x, x) if isinstance(x, int) else tuple(x)


# id: (C, H, W, kernel, stride, padding, D, order, in_norm, out_norm, pos, P, bias)
PATCH = {
    "P1": (3, 224, 224, 16, 16, 0, 768, "cpq", False, False, "all", 1, True),
    "P2": (3, 224, 224, 16, 16, 0, 768, "pqc", True, True, "all", 1, True),
    "P3": (3, 224, 224, 7, 4, 2, 192, "cpq", True, False, None, 0, True),
    "odd_pqc_pad": (4, 30, 26, (3, 5), (2, 3), (1, 2), 130, "pqc", False, True, "patch", 2, False),
    "odd_pit": (3, 40, 40, 8, 4, 0, 72, "cpq", False, False, "all", 1, True),
}


def patch_inputs(case, B, dtype, *, channels_last=False, weight_view=False):
    Cin, H, W, ks, st, pad, D, order, in_norm, out_norm, pos, P, bias = case
    (kh, kw), (sh, sw), (ph, pw) = _pair(ks), _pair(st), _pair(pad)
    Ho, Wo = (H + 2 * ph - kh) // sh + 1, (W + 2 * pw - kw) // sw + 1
    L, K = Ho * Wo, Cin * kh * kw
    dev = "cuda"
    images = torch.randn(B, Cin, H, W, device=dev)
    if channels_last:
        images = images.to(memory_format=torch.channels_last)
    images = images.to(dtype)
    if weight_view:
        weight = (torch.randn(K, D, device=dev) / math.sqrt(K)).to(dtype).t()
    else:
        weight = (torch.randn(D, K, device=dev) / math.sqrt(K)).to(dtype)

    def r(*shape, mean=0.0, std=1.0):
        return (mean + std * torch.randn(*shape, device=dev)).to(dtype)

    t = {
        "bias": r(D) if bias else None,
        "in_weight": r(K, mean=1, std=0.2) if in_norm else None,
        "in_bias": r(K, std=0.1) if in_norm else None,
        "out_weight": r(D, mean=1, std=0.2) if out_norm else None,
        "out_bias": r(D, std=0.1) if out_norm else None,
        "pos_embed": r({"all": P + L, "patch": L}[pos], D) if pos else None,
        "cls_token": r(P, D) if P else None,
    }
    geo = {"kernel_size": [kh, kw], "stride": [sh, sw], "padding": [ph, pw], "patch_order": order}
    return images, weight, t, geo, (in_norm, out_norm), (B, P + L, D)


def patch_args(images, weight, t, geo, norms):
    return (
        images, weight, t["bias"], t["in_weight"], t["in_bias"], t["out_weight"], t["out_bias"],
        t["pos_embed"], t["cls_token"], geo["kernel_size"], geo["stride"], geo["padding"],
        geo["patch_order"], 1e-5, 1e-6, norms[0], norms[1],
    )  # fmt: skip


def patch_ref(images, weight, t, geo, norms):
    return ref.patch_embed(
        d64(images), d64(weight), d64(t["bias"]), kernel_size=geo["kernel_size"],
        stride=geo["stride"], padding=geo["padding"], patch_order=geo["patch_order"],
        in_norm=(d64(t["in_weight"]), d64(t["in_bias"]), 1e-5) if norms[0] else None,
        out_norm=(d64(t["out_weight"]), d64(t["out_bias"]), 1e-6) if norms[1] else None,
        pos_embed=d64(t["pos_embed"]), cls_token=d64(t["cls_token"]),
    )  # fmt: skip


@pytest.mark.parametrize("layout", ["contiguous", "channels_last_weight_view"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("name", list(PATCH))
def test_patch_embed_op_matches_reference(C, name, dtype, layout):
    odd = layout != "contiguous"
    images, weight, t, geo, norms, shape = patch_inputs(
        PATCH[name], 8, dtype, channels_last=odd, weight_view=odd
    )
    poison()
    out = C.patch_embed_fwd(*patch_args(images, weight, t, geo, norms))
    contract(out, shape, dtype)
    check("tokens", out, patch_ref(images, weight, t, geo, norms), dtype)


def test_patch_embed_full_batch_p1_and_triton_parity(C):
    images, weight, t, geo, norms, shape = patch_inputs(PATCH["P1"], 256, torch.bfloat16)
    poison()
    out = C.patch_embed_fwd(*patch_args(images, weight, t, geo, norms))
    check("tokens", out, patch_ref(images, weight, t, geo, norms), torch.bfloat16)
    pytest.importorskip("triton")
    from vitkernels.triton import patch_embed as tk

    theirs = tk.patch_embed_fwd(*patch_args(images, weight, t, geo, norms))
    assert theirs.shape == out.shape and theirs.dtype == out.dtype
    check("tokens vs triton", out, theirs, torch.bfloat16)


def test_patch_embed_public_op_on_cuda(C):
    images, weight, t, geo, norms, shape = patch_inputs(PATCH["P2"], 2, torch.float16)
    kw = dict(
        kernel_size=geo["kernel_size"], stride=geo["stride"], padding=geo["padding"],
        patch_order=geo["patch_order"], in_norm=(t["in_weight"], t["in_bias"], 1e-5),
        out_norm=(t["out_weight"], t["out_bias"], 1e-6), pos_embed=t["pos_embed"],
        cls_token=t["cls_token"],
    )  # fmt: skip
    try:
        with torch.no_grad():
            out = vitkernels.patch_embed(images, weight, t["bias"], backend="cuda", **kw)
    except vitkernels.BackendNotSupportedError as exc:
        pytest.skip(f"the op module does not run patch_embed on the cuda backend: {exc}")
    check("tokens", out, patch_ref(images, weight, t, geo, norms), torch.float16)


def test_patch_embed_errors_name_the_argument(C):
    images, weight, t, geo, norms, shape = patch_inputs(PATCH["odd_pit"], 1, torch.float16)
    args = list(patch_args(images, weight, t, geo, norms))
    bad = list(args)
    bad[1] = weight[:, :10]
    with pytest.raises(ValueError, match="weight has shape"):
        C.patch_embed_fwd(*bad)
    bad = list(args)
    bad[12] = "qpc"
    with pytest.raises(ValueError, match="patch_order is 'qpc'"):
        C.patch_embed_fwd(*bad)
    bad = list(args)
    bad[2] = t["bias"].float()
    with pytest.raises(TypeError, match="bias has dtype Float"):
        C.patch_embed_fwd(*bad)
