"""performer_attention: the torch and triton backends against the reference on float64.

Without a GPU the Triton kernels run in the interpreter (TRITON_INTERPRET=1 on CPU
tensors), float32 and float16 only (the interpreter's bfloat16 arithmetic is wrong:
bfloat16 is tested in test_performer_gpu.py). Inputs are fresh random tensors; q, k, v
are the k, q, v views of one kqv projection output, as Token_performer makes them.
"""

from __future__ import annotations

import math

import pytest
import torch
from _numerics import GRAD_TOL, TOL, assert_close

import vitkernels
from vitkernels import BackendNotSupportedError
from vitkernels.backends import reference
from vitkernels.ops import performer as ops

tk = pytest.importorskip("vitkernels.triton.performer")

BACKENDS = ["torch", "triton"]


def features(M: int, E: int, norm: float | None = None) -> torch.Tensor:
    """The official w: orthonormal rows (M <= E) scaled to norm sqrt(M), or to ``norm``."""
    w = torch.nn.init.orthogonal_(torch.empty(M, E))
    return w * (math.sqrt(M) if norm is None else norm)


def kqv_views(B: int, T: int, E: int, dtype: torch.dtype, scale: float = 1.0):
    """q, k, v as the official single_attn splits kqv(x): k, q, v = kqv.split(E, -1)."""
    kqv = (torch.randn(B, T, 3 * E) * scale / math.sqrt(E)).to(dtype)
    k, q, v = kqv.split(E, dim=-1)
    return q, k, v


def ref64(q, k, v, w, eps=1e-8) -> torch.Tensor:
    return reference.performer_attention(q.double(), k.double(), v.double(), w.double(), eps=eps)



@pytest.fixture
def poisoned(monkeypatch):
    """Every buffer the Triton launchers allocate starts as NaN: unwritten elements fail."""

    def alloc(shape, dtype, device):
        return torch.full(shape, float("nan"), dtype=dtype, device=device)

    monkeypatch.setattr(tk, "_alloc", alloc)


# ----------------------------------------------------------------------------
# forward


SHAPES = [  # B, T, E, M
    (1, 1, 48, 24),
    (2, 17, 48, 24),
    (2, 100, 64, 32),
    (3, 65, 20, 5),
    (1, 130, 16, 1),
    (2, 9, 33, 17),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["f32", "f16"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "B{}T{}E{}M{}".format(*s))
@pytest.mark.parametrize("backend", BACKENDS)
def test_forward_matches_float64_reference(backend, shape, dtype, poisoned):
    B, T, E, M = shape
    q, k, v = kqv_views(B, T, E, dtype, scale=2.0)
    w = features(M, E) if M <= E else torch.randn(M, E)
    y = vitkernels.performer_attention(q, k, v, w, backend=backend)
    assert y.dtype == dtype
    assert_close(y, ref64(q, k, v, w), TOL[dtype], f"{backend} y")


def test_forward_t3136_workload_shape(poisoned):
    """T1's sequence length and widths (batch 1): many chunks of one tile each."""
    q, k, v = kqv_views(1, 3136, 64, torch.float16, scale=2.0)
    w = features(32, 64)
    assert tk.launch_config(1, 3136, 64, 32, torch.float16).n_chunks == 49
    y = vitkernels.performer_attention(q, k, v, w, backend="triton")
    assert_close(y, ref64(q, k, v, w), TOL[torch.float16], "y")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["f32", "f16"])
def test_chunks_of_several_tiles_merge(dtype, monkeypatch, poisoned):
    """Fewer programs than tiles: every chunk loops over several tiles and the chunks'
    statistics are merged (forward and backward)."""
    monkeypatch.setattr(tk, "TARGET_PROGRAMS", 6)
    B, T, E, M = 2, 300, 48, 24
    for backward in (False, True):
        cfg = tk.launch_config(B, T, E, M, dtype, backward)
        tiles = cfg.chunk_len // max(cfg.block_t_kv, cfg.block_t_q)
        assert cfg.n_chunks == 3 and tiles >= 2, cfg
    q, k, v = kqv_views(B, T, E, dtype, scale=2.0)
    w = features(M, E)
    check_gradients("triton", q, k, v, w, dtype)


@pytest.mark.parametrize("w_dtype", [torch.float32, torch.float16], ids=["wf32", "wf16"])
def test_half_inputs_with_float32_or_half_w(w_dtype, poisoned):
    q, k, v = kqv_views(2, 50, 64, torch.float16, scale=3.0)
    w = features(32, 64).to(w_dtype)
    y = vitkernels.performer_attention(q, k, v, w, backend="triton")
    assert_close(y, ref64(q, k, v, w), TOL[torch.float16], "y")


def test_torch_backend_bfloat16():
    q, k, v = kqv_views(2, 40, 48, torch.bfloat16, scale=2.0)
    w = features(24, 48)
    y = vitkernels.performer_attention(q, k, v, w, backend="torch")
    assert y.dtype == torch.bfloat16
    assert_close(y, ref64(q, k, v, w), TOL[torch.bfloat16], "y")


@pytest.mark.parametrize("eps", [0.0, 1e-8, 0.5])
@pytest.mark.parametrize("backend", BACKENDS)
def test_eps(backend, eps, poisoned):
    # scale 6: phi(q) . sum phi(k) spans values around 0.5, so eps = 0.5 matters
    q, k, v = kqv_views(2, 30, 48, torch.float32, scale=6.0)
    w = features(24, 48)
    y = vitkernels.performer_attention(q, k, v, w, eps=eps, backend=backend)
    assert_close(y, ref64(q, k, v, w, eps=eps), 1e-4, "y")


@pytest.mark.parametrize("backend", BACKENDS)
def test_any_strides(backend, poisoned):
    """q with a non-unit innermost stride, k and v from one kqv tensor, w transposed."""
    B, T, E, M = 2, 40, 48, 24
    q = (torch.randn(B, E, T) / 3).transpose(1, 2)  # stride (E*T, 1, T)
    _, k, v = kqv_views(B, T, E, torch.float32, scale=2.0)
    w = features(M, E).t().contiguous().t()  # stride (1, M)
    assert q.stride(-1) != 1 and w.stride(-1) != 1
    y = vitkernels.performer_attention(q, k, v, w, backend=backend)
    assert_close(y, ref64(q, k, v, w), TOL[torch.float32], "y")


def test_deterministic(poisoned):
    q, k, v = kqv_views(2, 100, 48, torch.float32, scale=2.0)
    w = features(24, 48).requires_grad_()
    q, k, v = (t.detach().requires_grad_() for t in (q, k, v))
    g = torch.randn(2, 100, 48)
    outs = []
    for _ in range(2):
        y = vitkernels.performer_attention(q, k, v, w, backend="triton")
        outs.append((y, *torch.autograd.grad(y, (q, k, v, w), g)))
    for a, b in zip(*outs, strict=True):
        assert torch.equal(a, b)


def test_empty_batch():
    q, k, v = kqv_views(0, 5, 16, torch.float32)
    w = features(8, 16)
    for backend in ("reference", "torch", "triton"):
        y = vitkernels.performer_attention(q, k, v, w, backend=backend)
        assert y.shape == (0, 5, 16)


# ----------------------------------------------------------------------------
# gradients


def check_gradients(backend, q, k, v, w, dtype, *, w_grad=True, eps=1e-8, g=None, clone=True):
    leaves = [(t.detach().clone() if clone else t.detach()).requires_grad_() for t in (q, k, v)]
    wl = w.detach().clone().requires_grad_(w_grad)
    y = vitkernels.performer_attention(*leaves, wl, eps=eps, backend=backend)
    if g is None:
        g = torch.randn_like(y, dtype=torch.float32).to(y.dtype)
    grads = torch.autograd.grad(y, [*leaves, wl] if w_grad else leaves, g)

    leaves64 = [t.detach().double().requires_grad_() for t in (q, k, v)]
    w64 = w.detach().double().requires_grad_(w_grad)
    y64 = reference.performer_attention(*leaves64, w64, eps=eps)
    grads64 = torch.autograd.grad(y64, [*leaves64, w64] if w_grad else leaves64, g.double())

    assert_close(y, y64, TOL[dtype], f"{backend} y")
    # a gradient that is ~0 (dq for T = 1: y = v whatever q) is compared on the
    # scale of the others
    floor = 0.1 * max(b.abs().max().item() for b in grads64)
    for name, a, b in zip("qkvw"[: len(grads)], grads, grads64, strict=True):
        assert a.dtype == (w.dtype if name == "w" else dtype)
        assert_close(a, b, GRAD_TOL[dtype], f"{backend} d{name}", floor=floor)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["f32", "f16"])
@pytest.mark.parametrize(
    "shape", [(2, 70, 48, 24), (1, 1, 16, 8), (2, 33, 64, 32), (2, 20, 20, 5)],
    ids=lambda s: "B{}T{}E{}M{}".format(*s),
)
@pytest.mark.parametrize("backend", BACKENDS)
def test_gradients(backend, shape, dtype, poisoned):
    B, T, E, M = shape
    q, k, v = kqv_views(B, T, E, dtype, scale=2.0)
    check_gradients(backend, q, k, v, features(M, E), dtype)


@pytest.mark.parametrize("backend", BACKENDS)
def test_gradients_without_w_grad(backend, poisoned):
    q, k, v = kqv_views(2, 40, 48, torch.float32, scale=2.0)
    check_gradients(backend, q, k, v, features(24, 48), torch.float32, w_grad=False)


def test_float16_gradients_under_loss_scaling(poisoned):
    """dy ~ 4096 (a float16 loss scale) of one sign: the backward's per-feature sums
    over 600 tokens reach ~3e5, beyond float16, while the gradients stay in range;
    the kernels scale those intermediates by powers of two before rounding them."""
    B, T, E, M = 1, 600, 48, 8
    q, k, v = kqv_views(B, T, E, torch.float16, scale=2.0)
    g = (4096 * (1 + 0.1 * torch.randn(B, T, E))).half()
    check_gradients("triton", q, k, v, features(M, E), torch.float16, g=g)


def test_gradients_through_kqv_views_and_expanded_grad(poisoned):
    """Autograd through the split of one kqv tensor; y.sum() gives a stride-0 dy."""
    B, T, E, M = 2, 30, 48, 24
    kqv = (torch.randn(B, T, 3 * E) / 3).requires_grad_()
    w = features(M, E)
    k, q, v = kqv.split(E, dim=-1)
    (g,) = torch.autograd.grad(vitkernels.performer_attention(q, k, v, w, backend="triton").sum(), kqv)
    kqv64 = kqv.detach().double().requires_grad_()
    k6, q6, v6 = kqv64.split(E, dim=-1)
    (g64,) = torch.autograd.grad(reference.performer_attention(q6, k6, v6, w.double()).sum(), kqv64)
    assert_close(g, g64, GRAD_TOL[torch.float32], "dkqv")


# ----------------------------------------------------------------------------
# large norms: the naive float32 formula overflows or underflows, float64 does not


def large_norm_case(kind: str):
    """q, k, v, w (float32) whose logits a = x.w - |x|^2/2 leave float32's exp() range.

    overflow: w rows of norm 14 and q, k near them: a up to ~98 > 88.7.
    mixed: q far beyond its feature (a_q ~ -106 < -103.9, exp underflows to 0)
        while k sits on its feature (a_k ~ +98): the reference's phi(q) phi(k)
        products are ~ e^-8, finite in float64 and well above eps.
    eps: a_q ~ +98 while a_k ~ -116: phi(q) . sum phi(k) ~ eps, so eps matters.
    """
    B, T, E, M = 2, 24, 48, 24
    R = 14.0
    w = features(M, E, norm=R)
    idx_q = torch.randint(0, M, (B, T))
    idx_k = (torch.arange(T) % M).expand(B, T)  # every feature has a key on it

    def near(idx, alpha, noise):  # alpha * w[idx] + small noise
        return alpha * w[idx] + noise * torch.randn(B, T, E) / math.sqrt(E)

    # a = alpha R^2 - alpha^2 R^2 / 2 - ...: alpha = 1 -> R^2/2 = 98
    a_far = 1.0 + math.sqrt(1.0 + 2 * 106 / R**2)  # a = -106
    a_eps = 1.0 + math.sqrt(1.0 + 2 * 116 / R**2)  # a = -116
    if kind == "overflow":
        q, k = near(idx_q, 1.0, 0.5), near(idx_k, 1.0, 0.5)
    elif kind == "mixed":
        q, k = near(idx_q, a_far, 0.1), near(idx_k, 1.0, 0.1)
    elif kind == "eps":
        q, k = near(idx_q, 1.0, 0.1), near(idx_k, a_eps, 0.1)
    else:
        raise AssertionError(kind)
    v = torch.randn(B, T, E)
    return q, k, v, w


@pytest.mark.parametrize("kind", ["overflow", "mixed", "eps"])
@pytest.mark.parametrize("backend", [*BACKENDS, "reference"])
def test_large_norms_stay_finite_and_exact(backend, kind, poisoned):
    q, k, v, w = large_norm_case(kind)
    expected = ref64(q, k, v, w)
    # the regime really is the one described: float64 finite, not 0/0, with a
    # denominator that is not negligible against the numerator ...
    qp = torch.exp(q.double() @ w.double().t() - 0.5 * (q.double() ** 2).sum(-1, keepdim=True))
    kp = torch.exp(k.double() @ w.double().t() - 0.5 * (k.double() ** 2).sum(-1, keepdim=True))
    denom = (qp * kp.sum(1, keepdim=True)).sum(-1) / w.shape[0]
    assert torch.isfinite(expected).all() and (denom > 0).all()
    if kind == "eps":
        assert ((denom > 1e-10) & (denom < 1e-6)).float().mean() > 0.5  # eps is felt
    else:
        assert (denom > 1e-6).all()
    # ... where the formula computed as written, in float32, fails
    qp32 = torch.exp(q @ w.t() - 0.5 * (q * q).sum(-1, keepdim=True)) / math.sqrt(w.shape[0])
    kp32 = torch.exp(k @ w.t() - 0.5 * (k * k).sum(-1, keepdim=True)) / math.sqrt(w.shape[0])
    naive = (qp32 @ (kp32.transpose(1, 2) @ v)) / ((qp32 * kp32.sum(1, keepdim=True)).sum(-1, keepdim=True) + 1e-8)
    assert not torch.isfinite(naive).all() or (naive.double() - expected).abs().max() > 0.1
    y = vitkernels.performer_attention(q, k, v, w, backend=backend)
    assert_close(y, expected, 2e-3, f"{backend} y")


@pytest.mark.parametrize("kind", ["overflow", "mixed", "eps"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_large_norms_gradients(backend, kind, poisoned):
    q, k, v, w = large_norm_case(kind)
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    y = vitkernels.performer_attention(*leaves, w, backend=backend)
    g = torch.randn_like(y)
    grads = torch.autograd.grad(y, leaves, g)
    leaves64 = [t.double().requires_grad_() for t in (q, k, v)]
    grads64 = torch.autograd.grad(reference.performer_attention(*leaves64, w.double()), leaves64,
                                  g.double())
    floor = 0.1 * max(b.abs().max().item() for b in grads64)  # see check_gradients
    for name, a, b in zip("qkv", grads, grads64, strict=True):
        assert torch.isfinite(b).all()
        assert_close(a, b, 5e-3, f"{backend} d{name}", floor=floor)


# ----------------------------------------------------------------------------
# torch.library registration


def test_opcheck_custom_ops():
    q, k, v = kqv_views(2, 20, 16, torch.float32, scale=2.0)
    w = features(8, 16)
    q, k, v = (t.detach().clone().requires_grad_() for t in (q, k, v))
    torch.library.opcheck(torch.ops.vitkernels.performer_attention_fwd, (q, k, v, w, 1e-8, "triton"))
    y, lks, vbar = torch.ops.vitkernels.performer_attention_fwd(q, k, v, w, 1e-8, "triton")
    dy = torch.randn_like(y)
    args = (dy, q.detach(), k.detach(), v.detach(), w, lks, vbar, 1e-8, True, "triton")
    torch.library.opcheck(torch.ops.vitkernels.performer_attention_bwd, args)


def test_compile_fullgraph():
    q, k, v = kqv_views(2, 20, 16, torch.float32, scale=2.0)
    w = features(8, 16)
    leaves = [t.detach().clone().requires_grad_() for t in (q, k, v)]

    def f(q, k, v):
        return vitkernels.performer_attention(q, k, v, w, backend="triton").square().sum()

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    grads = torch.autograd.grad(compiled(*leaves), leaves)
    leaves64 = [t.detach().double().requires_grad_() for t in (q, k, v)]
    expected = torch.autograd.grad(
        reference.performer_attention(*leaves64, w.double()).square().sum(), leaves64
    )
    for a, b in zip(grads, expected, strict=True):
        assert_close(a, b, GRAD_TOL[torch.float32])


# ----------------------------------------------------------------------------
# dispatch and errors


def test_automatic_dispatch_on_cpu_is_torch():
    q, k, v = kqv_views(1, 4, 16, torch.float32)
    w = features(8, 16)
    chosen, verdicts = ops.which_backend(q, k, v, w)
    assert chosen == "torch", verdicts


def _good():
    q, k, v = kqv_views(2, 5, 16, torch.float32)
    return dict(q=q, k=k, v=v, w=features(8, 16))


BAD = [
    ("q", lambda a: a["q"].tolist(), TypeError, "q must be a torch.Tensor"),
    ("q", lambda a: a["q"][0], ValueError, "q has shape (5, 16); expected (B, T, E)"),
    ("k", lambda a: a["k"][:, :4], ValueError, "k has shape (2, 4, 16); expected q's shape"),
    ("v", lambda a: a["v"][..., :8], ValueError, "v has shape (2, 5, 8)"),
    ("w", lambda a: a["w"][:, :8], ValueError, "w has shape (8, 8); expected (M, E) with E=16"),
    ("w", lambda a: a["w"][0], ValueError, "w has shape (16,)"),
    ("w", lambda a: a["w"][:0], ValueError, "M=0"),
    ("q", lambda a: a["q"][:, :0], ValueError, "k has shape"),
    ("q", lambda a: a["q"].long(), TypeError, "q has dtype torch.int64"),
    ("v", lambda a: a["v"].half(), TypeError, "v has dtype torch.float16 but q has torch.float32"),
    ("w", lambda a: a["w"].to("meta"), ValueError, "different devices"),
]


@pytest.mark.parametrize("name,make,exc,msg", BAD, ids=[f"{b[0]}-{i}" for i, b in enumerate(BAD)])
def test_bad_inputs(name, make, exc, msg):
    args = _good()
    args[name] = make(args)
    with pytest.raises(exc) as info:
        vitkernels.performer_attention(args["q"], args["k"], args["v"], args["w"])
    assert msg in str(info.value)


def test_empty_sequence_is_refused():
    q, k, v = kqv_views(2, 0, 16, torch.float32)
    with pytest.raises(ValueError, match="T=0"):
        vitkernels.performer_attention(q, k, v, features(8, 16))


@pytest.mark.parametrize(
    "eps,exc,msg",
    [(-1e-8, ValueError, "eps=-1e-08"), (float("nan"), ValueError, "eps=nan"),
     (float("inf"), ValueError, "eps=inf"), (True, TypeError, "eps must be a float, got bool"),
     ("1e-8", TypeError, "got str"), (torch.tensor(1e-8), TypeError, "got Tensor")],
)
def test_bad_eps(eps, exc, msg):
    a = _good()
    with pytest.raises(exc, match=msg.replace("(", r"\(")):
        vitkernels.performer_attention(a["q"], a["k"], a["v"], a["w"], eps=eps)


def test_forced_backends_that_cannot_run_say_why(monkeypatch):
    a = _good()
    with pytest.raises(BackendNotSupportedError, match="backend 'cuda' cannot run"):
        vitkernels.performer_attention(**a, backend="cuda")
    a64 = {n: t.double() for n, t in a.items()}
    with pytest.raises(BackendNotSupportedError, match="q, k, v, w have dtype float64; supported: float16"):
        vitkernels.performer_attention(**a64, backend="triton")
    q, k, v = kqv_views(1, 3, 80, torch.float32)
    with pytest.raises(BackendNotSupportedError, match="E=80 is above the kernels' limit of 64"):
        vitkernels.performer_attention(q, k, v, features(8, 80), backend="triton")
    with pytest.raises(BackendNotSupportedError, match="M=40 is above the kernels. limit of 32"):
        vitkernels.performer_attention(q, k, v, features(40, 80)[:, :80], backend="triton")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(BackendNotSupportedError, match="needs CUDA tensors, got device cpu"):
        vitkernels.performer_attention(**a, backend="triton")
    with vitkernels.use_backend("reference"):
        y = vitkernels.performer_attention(**a)
    assert_close(y, ref64(**a), TOL[torch.float32])


# ----------------------------------------------------------------------------
# the reference itself stays finite wherever the exact value is


def _attention_form64(q, k, v, w) -> torch.Tensor:
    """An independent float64 oracle for eps=0: y_t = sum_j A_tj v_j / sum_j A_tj with
    A_tj = sum_m phi(q_t)_m phi(k_j)_m, every product kept as a logarithm."""
    q, k, v, w = (t.double() for t in (q, k, v, w))
    aq = q @ w.t() - 0.5 * (q * q).sum(-1, keepdim=True)  # (B, T, M)
    ak = k @ w.t() - 0.5 * (k * k).sum(-1, keepdim=True)
    log_a = torch.logsumexp(aq[:, :, None, :] + ak[:, None, :, :], dim=-1)  # (B, Tq, Tk)
    return torch.softmax(log_a, dim=-1) @ v


def _rows_of_norm(B: int, T: int, E: int, norm: float) -> torch.Tensor:
    x = torch.randn(B, T, E)
    return x / x.norm(dim=-1, keepdim=True) * norm * (1 + 0.05 * torch.rand(B, T, 1))


@pytest.mark.parametrize(
    "backend, dtype, norm",
    [("reference", torch.float32, 15.0), ("torch", torch.float32, 15.0),
     ("triton", torch.float32, 15.0), ("reference", torch.float64, 1e3),
     ("torch", torch.float64, 1e3)],
)  # fmt: skip
def test_large_row_norms_with_eps_zero_stay_finite(backend, dtype, norm, poisoned):
    """Row norms 15 (exp(-|x|^2/2) underflows in float32) and 1e3 (in float64 too) with
    eps=0: the literal phi(q) phi(k) products vanish, the exact result does not."""
    B, T, E, M = 2, 12, 16, 8
    q, k = _rows_of_norm(B, T, E, norm), _rows_of_norm(B, T, E, norm)
    v, w = torch.randn(B, T, E), features(M, E)
    expected = _attention_form64(q, k, v, w)
    q, k, v, w = (t.to(dtype) for t in (q, k, v, w))
    y = vitkernels.performer_attention(q, k, v, w, eps=0.0, backend=backend)
    # float32 logits of size |x|^2/2 ~ 112 carry absolute rounding ~1e-5
    assert_close(y, expected, 1e-3 if dtype == torch.float32 else 1e-8, f"{backend} y")


@pytest.mark.parametrize("case", ["E40", "E33", "E64 unaligned"])
def test_transposed_loads_of_unaligned_rows(case, poisoned, monkeypatch):
    """Where 16-bit rows cannot be copied to shared memory asynchronously (E not a
    multiple of 16, or a data pointer off 16 bytes), the kernels load the dots' first
    operands transposed from memory (TRANS_LOAD; on an H200 the ``tl.trans`` form was
    wrong there: bench/NOTES.md, 2026-12-04). Every launch of the forward and the
    backward (with dw) takes that path here, and its results match float64."""
    B, T, E, M = {"E40": (2, 70, 40, 17), "E33": (1, 65, 33, 17), "E64 unaligned": (2, 70, 64, 32)}[case]
    dtype = torch.float16
    if case.endswith("unaligned"):  # each tensor one element into its buffer
        def off(t):
            buf = torch.empty(t.numel() + 1, dtype=t.dtype)
            view = buf[1:].view(t.shape)
            view.copy_(t)
            return view
        q, k, v = (off(t.contiguous()) for t in kqv_views(B, T, E, dtype, scale=2.0))
        assert q.data_ptr() % 16
    else:
        q, k, v = kqv_views(B, T, E, dtype, scale=2.0)
    taken = {}
    inner = tk.launch

    def spy(spec):
        taken[spec.name.split("[")[0]] = spec.constexprs.get("TRANS_LOAD")
        inner(spec)

    monkeypatch.setattr(tk, "launch", spy)
    check_gradients("triton", q, k, v, features(M, E), dtype, clone=False)
    assert taken == {"performer_fwd_kv": True, "performer_fwd_q": None, "performer_bwd_q": True,
                     "performer_bwd_kv": True}, taken  # fmt: skip


def test_transposed_loads_only_where_rows_are_unaligned():
    """16-bit, 64-wide tiles: TRANS_LOAD exactly where E % 16 or a pointer or row
    stride is off; never for float32 nor for tiles of E <= 32 (mma.sync)."""
    cfg = tk.launch_config(2, 64, 64, 32, torch.float16)
    t = torch.empty(2, 64, 64, dtype=torch.float16)
    assert not tk._trans_loads(cfg, torch.float16, 64, t, t)
    assert tk._trans_loads(cfg, torch.float16, 64, t, torch.empty(2 * 64 * 64 + 1, dtype=torch.float16)[1:].view(2, 64, 64))
    assert tk._trans_loads(cfg, torch.float16, 64, t, torch.empty(2, 64, 72, dtype=torch.float16)[..., :64])
    assert tk._trans_loads(tk.launch_config(2, 64, 40, 32, torch.float16), torch.bfloat16, 40, t, t)
    assert not tk._trans_loads(tk.launch_config(2, 64, 64, 32, torch.float32), torch.float32, 64, t.float(), t.float())
    assert not tk._trans_loads(tk.launch_config(2, 64, 20, 5, torch.float16), torch.float16, 20, t, t)
