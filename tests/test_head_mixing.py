"""head_mixing_attention: the torch and triton backends against the float64 reference.

Without a GPU the Triton kernels run in the interpreter (TRITON_INTERPRET=1 on CPU
tensors), float32 and float16 only (the interpreter's bfloat16 arithmetic is wrong:
bfloat16 is tested in test_head_mixing_gpu.py). Inputs are fresh random tensors,
and every buffer the Triton launchers allocate starts as NaN, so an element a
kernel fails to write fails the test. The interpreter is slow (a forward at N=196
takes seconds): the large token counts appear in a few cases only.
"""


from __future__ import annotations

import math

import pytest
import torch
from _head_mixing_common import (
    BACKENDS,
    CASES,
    GRAD_TOL,
    KINDS,
    TOL,
    TORCH_CASES,
    _inputs,
    _leaves,
    _map_params,
    check_grads,
    make,
    make_params,
    poisoned_fixture,  # noqa: F401 (the fixture "poisoned")
    ref64,
    tk,
)
from _numerics import assert_close

import vitkernels
from vitkernels import BackendNotSupportedError
from vitkernels.ops import head_mixing as ops
from vitkernels.ops._dispatch import select

FORWARD = [
    (case, dtype)
    for case in CASES
    for dtype in (torch.float32, torch.float16)
    if dtype == torch.float32 or CASES[case][2] < 196
]


@pytest.mark.parametrize(
    "case, dtype", FORWARD, ids=[f"{c}-{'f32' if d == torch.float32 else 'f16'}" for c, d in FORWARD]
)
@pytest.mark.parametrize("backend", BACKENDS)
def test_forward_matches_float64_reference(backend, case, dtype, poisoned):
    kind = KINDS[list(CASES).index(case) % 4]  # the families' combinations, spread over cases
    H = CASES[case][1]
    q, k, v = make(CASES[case], dtype)
    params = make_params(H, kind, dtype)
    out = vitkernels.head_mixing_attention(q, k, v, **params, backend=backend)
    assert out.dtype == dtype and out.shape == (*q.shape[:3], v.shape[-1])
    assert_close(out, ref64(q, k, v, params)[0], TOL[dtype], f"{backend} {case} {kind}")


@pytest.mark.parametrize("case", list(TORCH_CASES), ids=list(TORCH_CASES))
def test_torch_backend_beyond_the_kernels(case):
    kind = KINDS[list(TORCH_CASES).index(case) % 4]
    q, k, v = make(TORCH_CASES[case])
    params = make_params(TORCH_CASES[case][1], kind)
    out = vitkernels.head_mixing_attention(q, k, v, **params, backend="torch")
    assert_close(out, ref64(q, k, v, params)[0], TOL[torch.float32], f"{case} {kind}")


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("backend", BACKENDS)
def test_every_combination_of_stages(backend, kind, poisoned):
    case = (2, 3, 20, 33, 16, 24)
    q, k, v = make(case)
    params = make_params(3, kind)
    out = vitkernels.head_mixing_attention(q, k, v, **params, backend=backend)
    assert_close(out, ref64(q, k, v, params)[0], TOL[torch.float32], kind)


@pytest.mark.parametrize("view", ["timm", "vit-pytorch"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_views_of_a_fused_qkv_projection(backend, view, poisoned):
    kind = "timm talking heads" if view == "timm" else "re-attention"
    case = (2, 4, 49, 49, 32, 32)
    q, k, v = make(case, view=view)
    assert not q.is_contiguous() and not k.is_contiguous() and not v.is_contiguous()
    params = make_params(4, kind)
    out = vitkernels.head_mixing_attention(q, k, v, **params, backend=backend)
    assert_close(out, ref64(q, k, v, params)[0], TOL[torch.float32], view)


def test_views_take_no_copy(monkeypatch):
    """The triton launcher gets the qkv views and the transposed mixing matrix themselves."""
    seen = {}
    real = tk.head_mixing_attention_fwd

    def spy(q, k, v, pre_w, post_w, *args):
        seen.update(ptrs=[t.data_ptr() for t in (q, k, v, post_w)], strides=[q.stride(), post_w.stride()])
        return real(q, k, v, pre_w, post_w, *args)

    monkeypatch.setattr(tk, "head_mixing_attention_fwd", spy)
    q, k, v = make((1, 3, 9, 9, 16, 16), view="vit-pytorch")
    params = make_params(3, "re-attention")
    vitkernels.head_mixing_attention(q, k, v, **params, backend="triton")
    post_w = params["post"][0]
    assert seen["ptrs"] == [t.data_ptr() for t in (q, k, v, post_w)]
    assert seen["strides"] == [q.stride(), post_w.stride()] and post_w.stride() == (1, 3)


@pytest.mark.parametrize("backend", BACKENDS)
def test_default_and_explicit_scale(backend, poisoned):
    case = (1, 3, 10, 12, 16, 16)
    q, k, v = make(case)
    params = make_params(3, "all")
    out = vitkernels.head_mixing_attention(q, k, v, **params, backend=backend)
    assert_close(out, ref64(q, k, v, params, scale=0.25)[0], TOL[torch.float32])
    out = vitkernels.head_mixing_attention(q, k, v, **params, scale=0.37, backend=backend)
    assert_close(out, ref64(q, k, v, params, scale=0.37)[0], TOL[torch.float32])


@pytest.mark.parametrize("backend", BACKENDS)
def test_half_inputs_with_float32_parameters(backend, poisoned):
    """AMP: float16 activations, float32 parameters (the kernels mix in float32)."""
    case = (2, 4, 30, 30, 32, 32)
    q, k, v = make(case, torch.float16)
    params = make_params(4, "all", torch.float32)
    out = vitkernels.head_mixing_attention(q, k, v, **params, backend=backend)
    assert out.dtype == torch.float16
    assert_close(out, ref64(q, k, v, params)[0], TOL[torch.float16])


@pytest.mark.parametrize("backend", ["reference", "torch", "triton"])
def test_pre_mix_bias_does_not_change_the_output(backend, poisoned):
    q, k, v = make((1, 4, 9, 11, 16, 16))
    params = make_params(4, "timm talking heads")
    no_bias = dict(params, pre=(params["pre"][0], None))
    with_bias = vitkernels.head_mixing_attention(q, k, v, **params, backend=backend)
    without = vitkernels.head_mixing_attention(q, k, v, **no_bias, backend=backend)
    assert_close(with_bias, without, TOL[torch.float32])


@pytest.mark.parametrize("backend", BACKENDS)
def test_empty_batch(backend, poisoned):
    q, k, v = make((0, 3, 4, 5, 16, 8))
    params = make_params(3, "all")
    leaves = [t.requires_grad_() for t in (q, k, v, *_leaves(params))]
    out = vitkernels.head_mixing_attention(q, k, v, **params, backend=backend)
    assert out.shape == (0, 3, 4, 8)
    grads = torch.autograd.grad(out.sum(), leaves, allow_unused=True)
    for t, g in zip(leaves[3:], grads[3:], strict=True):
        assert g is None or (g.shape == t.shape and not g.any())


# ----------------------------------------------------------------------------
# large values stay finite


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["f32", "f16"])
@pytest.mark.parametrize("kind", ["vit-pytorch talking heads", "re-attention"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_large_logits_stay_finite(backend, kind, dtype, poisoned):
    """q.k of ~1e3 (and pre-mixing weights of ~8): softmax of huge logits, no inf/NaN."""
    case = (1, 4, 40, 40, 32, 32)
    q, k, v = make(case, dtype, qk_scale=6.0)
    params = make_params(4, kind, weight_scale=8.0)
    expected, _, _ = ref64(q, k, v, params)
    assert torch.isfinite(expected).all()
    out = vitkernels.head_mixing_attention(q, k, v, **params, backend=backend)
    # logits of magnitude L carry float32 rounding of ~L * 2**-24 into exp()
    logit = 6.0**2 * 8.0 * math.sqrt(32) * 4 * 4 * 2**-24
    assert_close(out, expected, TOL[dtype] + 20 * logit, kind)


def test_very_negative_logits_give_a_finite_forward_with_padded_keys(poisoned):
    """Every real logit near -2800: a padded key (k = 0, logit 0 unless masked) would
    get p = exp(2800) = inf, and inf * 0 in the product with v NaN. 37 keys: the
    forward's unmasked full blocks (32 keys in pass 1, 16 in pass 2), then its masked
    rest with 11 padded keys; K = 48 as 32 + 16, Dv = 40 as 32 + 16 (8 padded)."""
    q, k, v = make((1, 4, 20, 37, 48, 40))
    q, k = q * 0.1 + 20.0, -(k * 0.1 + 20.0)
    params = dict(pre=(torch.eye(4), None), post=(torch.randn(4, 4), None))
    expected, _, _ = ref64(q, k, v, params)
    out = vitkernels.head_mixing_attention(q, k, v, **params, backend="triton")
    assert torch.isfinite(out).all()
    # logits of ~2800 carry float32 rounding of ~2800 * 2**-24 into exp()
    assert_close(out, expected, TOL[torch.float32] + 20 * 2800 * 2**-24, "very negative logits")


def test_large_logits_gradients_stay_finite(poisoned):
    q, k, v = make((1, 4, 20, 20, 16, 16), qk_scale=10.0)
    params = make_params(4, "all", weight_scale=8.0)
    leaves = [t.requires_grad_() for t in (q, k, v, *_leaves(params))]
    out = vitkernels.head_mixing_attention(q, k, v, **params, backend="triton")
    for g in torch.autograd.grad(out, leaves, torch.randn_like(out)):
        assert torch.isfinite(g).all()


# ----------------------------------------------------------------------------
# gradients


def test_very_negative_logits_give_finite_dq_with_padded_keys(poisoned):
    """Every real logit near -1600 (lse too): a padded key (k = 0, logit 0 unless masked)
    would get p = exp(1600) = inf, and inf * 0 in dq's product NaN; its -inf logit bias
    keeps p = 0 there (dq on 16 queries x 64 keys, 21 keys)."""
    q, k, v = make((1, 4, 20, 21, 16, 16))
    q, k = q * 0.1 + 20.0, -(k * 0.1 + 20.0)
    pre, post = (torch.eye(4), None), (torch.randn(4, 4), None)
    leaves = [t.requires_grad_() for t in (q, k, v)]
    out = vitkernels.head_mixing_attention(q, k, v, pre=pre, post=post, backend="triton")
    for g in torch.autograd.grad(out, leaves, torch.randn_like(out)):
        assert torch.isfinite(g).all()


@pytest.mark.parametrize("kind", ["timm talking heads", "re-attention"])
def test_gradients_float16_triton(kind, poisoned):
    case = (1, 4, 17, 20, 32, 32)
    q, k, v = make(case, torch.float16)
    params = make_params(4, kind, torch.float32)
    check_grads("triton", q, k, v, params, GRAD_TOL[torch.float16], kind)


@pytest.mark.parametrize("kind", ["pre", "norm", "plain"])
def test_gradients_of_single_stages(kind, poisoned):
    q, k, v = make((1, 3, 12, 17, 16, 16))
    check_grads("triton", q, k, v, make_params(3, kind), GRAD_TOL[torch.float32], kind)


@pytest.mark.parametrize("view", ["timm", "vit-pytorch"])
def test_gradients_through_views(view, poisoned):
    q, k, v = make((2, 3, 20, 20, 16, 16), view=view)
    check_grads("triton", q, k, v, make_params(3, "all"), GRAD_TOL[torch.float32], view)


@pytest.mark.parametrize("layout", ["heads transposed", "last dim strided"])
def test_gradient_of_a_non_contiguous_output_grad(layout, poisoned):
    """grad_out arrives with the strides of whatever consumed the output (one whose
    rows cannot be read as aligned vectors is copied first)."""
    q, k, v = make((1, 3, 10, 12, 16, 16))
    params = _map_params(make_params(3, "all"), lambda t: t.requires_grad_())
    leaves = [t.requires_grad_() for t in (q, k, v)] + _leaves(params)
    out = vitkernels.head_mixing_attention(q, k, v, **params, backend="triton")
    B, H, N, D = out.shape
    if layout == "heads transposed":
        g = torch.randn(B, N, H, D).transpose(1, 2)
    else:
        g = torch.randn(B, H, D, N).transpose(-1, -2)
    grads = torch.autograd.grad(out, leaves, g)
    expected, ref_qkv, p64 = ref64(q, k, v, params)
    expected.backward(g.double())
    for mine, r in zip(grads, [*ref_qkv, *_leaves(p64)], strict=True):
        assert_close(mine, r.grad, GRAD_TOL[torch.float32], floor=1.0)


def test_pre_mix_bias_gets_an_exact_zero_gradient(poisoned):
    q, k, v = make((1, 4, 9, 11, 16, 16))
    params = _map_params(make_params(4, "timm talking heads"), lambda t: t.requires_grad_())
    out = vitkernels.head_mixing_attention(q, k, v, **params, backend="triton")
    (g,) = torch.autograd.grad(out, [params["pre"][1]], torch.randn_like(out))
    assert g.shape == (4,) and torch.equal(g, torch.zeros(4))


def test_only_parameters_require_grad(poisoned):
    q, k, v = make((1, 3, 10, 10, 16, 16))
    params = _map_params(make_params(3, "re-attention"), lambda t: t.requires_grad_())
    out = vitkernels.head_mixing_attention(q, k, v, **params, backend="triton")
    grads = torch.autograd.grad(out.sum(), _leaves(params))
    expected, _, p64 = ref64(q, k, v, params)
    expected.sum().backward()
    for g, r in zip(grads, _leaves(p64), strict=True):
        assert_close(g, r.grad, GRAD_TOL[torch.float32])


def test_parameter_gradients_are_deterministic(poisoned):
    q, k, v = make((1, 3, 9, 20, 16, 16))
    params = make_params(3, "all")
    pre_w, post_w, post_b = params["pre"][0], *params["post"]
    norm_w, norm_b, eps = params["head_norm"]
    out, lse = tk.head_mixing_attention_fwd(q, k, v, pre_w, post_w, post_b, norm_w, norm_b, 0.25, eps, True)
    g = torch.randn_like(out)
    args = (g, q, k, v, pre_w, post_w, post_b, norm_w, norm_b, lse, 0.25, eps, True)
    first, second = tk.head_mixing_attention_bwd(*args), tk.head_mixing_attention_bwd(*args)
    for a, b in zip(first, second, strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize("backend", ["reference", "torch"])
def test_gradcheck_float64(backend):
    q, k, v = (t.double().requires_grad_() for t in make((1, 2, 3, 4, 3, 2)))
    params = _map_params(make_params(2, "all", torch.float64), lambda t: t.requires_grad_())
    leaves = _leaves(params)

    def f(q, k, v, *flat):
        pre, post = (flat[0], flat[1]), (flat[2], flat[3])
        norm = (flat[4], flat[5], params["head_norm"][2])
        return vitkernels.head_mixing_attention(q, k, v, pre=pre, post=post, head_norm=norm, backend=backend)

    assert torch.autograd.gradcheck(f, (q, k, v, *leaves))


# ----------------------------------------------------------------------------
# attention dropout: reference and torch backends; the kernels refuse it


@pytest.mark.parametrize("site", ["probs", "mixed"])
def test_dropout_torch_matches_reference_under_one_seed(site):
    q, k, v = make((2, 4, 10, 10, 16, 16))
    params = make_params(4, "all")
    outs = []
    for backend in ("reference", "torch"):
        torch.manual_seed(123)
        outs.append(vitkernels.head_mixing_attention(
            q, k, v, **params, dropout_p=0.3, dropout_site=site, backend=backend
        ))  # fmt: skip
    assert_close(outs[1], outs[0], TOL[torch.float32])
    plain = vitkernels.head_mixing_attention(q, k, v, **params, backend="torch")
    assert (outs[1] - plain).abs().max() > 1e-3  # dropout did something


def test_dropout_everything_at_the_mixed_site_gives_zeros():
    q, k, v = make((1, 3, 5, 6, 16, 16))
    out = vitkernels.head_mixing_attention(
        q, k, v, **make_params(3, "all"), dropout_p=1.0, dropout_site="mixed", backend="torch"
    )
    assert torch.equal(out, torch.zeros_like(out))


def test_dropout_goes_to_torch_and_forced_triton_says_why():
    q, k, v = make((1, 3, 5, 6, 16, 16))
    params = make_params(3, "re-attention")
    reasons = ops.TritonBackend().not_supported_reasons(_inputs(q, k, v, params, dropout_p=0.1))
    assert any("dropout_p=0.1" in r and "no attention dropout" in r for r in reasons), reasons
    with pytest.raises(BackendNotSupportedError, match=r"backend 'triton' cannot run.*dropout_p=0.1"):
        vitkernels.head_mixing_attention(q, k, v, **params, dropout_p=0.1, backend="triton")


# ----------------------------------------------------------------------------
# torch.library: custom ops, fake impls, autograd, compile, export


def _kernel_args(kind="all", case=(1, 2, 5, 6, 16, 16), dtype=torch.float32):
    q, k, v = make(case, dtype)
    params = make_params(case[1], kind, dtype)
    pre_w, pre_b, post_w, post_b, norm_w, norm_b, eps = ops._unpack(
        params.get("pre"), params.get("post"), params.get("head_norm")
    )
    return (q, k, v, pre_w, pre_b, post_w, post_b, norm_w, norm_b, 0.25, eps, "head_norm" in params)


@pytest.mark.parametrize(
    "kind, case, dtype",
    [
        ("all", (1, 2, 5, 6, 16, 16), torch.float32),
        ("plain", (1, 2, 5, 6, 16, 16), torch.float32),
        # 6 heads of 33: the forward returns the padded k / v copies the backward reads
        ("re-attention", (1, 6, 5, 7, 33, 33), torch.float16),
        ("all", (2, 6, 4, 5, 33, 16), torch.float16),
    ],
    ids=["all", "plain", "re-attention H6 D33 copies", "all H6 Dk33 Dv16 copies"],
)
def test_opcheck_custom_ops(kind, case, dtype):
    args = _kernel_args(kind, case, dtype)
    torch.library.opcheck(ops.head_mixing_attention_fwd, (*args, "triton"))
    out, lse, k_copy, v_copy = ops.head_mixing_attention_fwd(*args, "triton")
    q, k, v, *rest = args
    bwd_args = (torch.randn_like(out), q, k, v, *rest[:6], lse, k_copy, v_copy, *rest[6:], "triton")
    torch.library.opcheck(ops.head_mixing_attention_bwd, bwd_args)


class _ReAttention(torch.nn.Module):
    """DeepViT's re-attention core as a module (parameters as vit-pytorch names them)."""

    def __init__(self, H=3):
        super().__init__()
        self.reattn_weights = torch.nn.Parameter(torch.randn(H, H))
        self.norm = torch.nn.LayerNorm(H)
        with torch.no_grad():
            self.norm.weight.add_(0.3 * torch.randn(H))
            self.norm.bias.add_(0.3 * torch.randn(H))

    def forward(self, q, k, v):
        return vitkernels.head_mixing_attention(
            q, k, v, post=(self.reattn_weights.t(), None),
            head_norm=(self.norm.weight, self.norm.bias, self.norm.eps), backend="triton",
        )  # fmt: skip


def test_compile_fullgraph_forward_and_backward(poisoned):
    m = _ReAttention()
    q, k, v = (t.requires_grad_() for t in make((2, 3, 9, 12, 16, 16)))
    compiled = torch.compile(m, fullgraph=True, backend="aot_eager")
    out = compiled(q, k, v)
    params = dict(post=(m.reattn_weights.t(), None), head_norm=(m.norm.weight, m.norm.bias, m.norm.eps))
    expected, ref_qkv, p64 = ref64(q, k, v, params)
    assert_close(out, expected, TOL[torch.float32])
    g = torch.randn_like(expected)
    out.backward(g.float())
    expected.backward(g)
    mine = [q, k, v, m.reattn_weights, m.norm.weight, m.norm.bias]
    theirs = [r.grad for r in (*ref_qkv, *p64["head_norm"][:2])]
    theirs.insert(3, p64["post"][0].grad.t())  # the module holds reattn_weights untransposed
    for t, want in zip(mine, theirs, strict=True):
        assert_close(t.grad, want, GRAD_TOL[torch.float32], floor=1.0)


def test_torch_export(poisoned):
    m = _ReAttention()
    q, k, v = make((2, 3, 9, 12, 16, 16))
    ep = torch.export.export(m, (q, k, v))
    assert any("head_mixing_attention_fwd" in str(n.target) for n in ep.graph.nodes)
    with torch.no_grad():
        want = m(q, k, v)
    torch.testing.assert_close(ep.module()(q, k, v), want)


# ----------------------------------------------------------------------------
# dispatch


def test_cpu_tensors_go_to_torch_automatically():
    q, k, v = make((1, 3, 5, 6, 16, 16))
    params = make_params(3, "all")
    assert select(ops.BACKENDS, _inputs(q, k, v, params)).name == "torch"
    chosen, verdicts = ops.which_backend(q, k, v, **params)
    assert chosen == "torch"
    assert dict(verdicts)["triton"] == ["not chosen automatically for CPU tensors (force it to use it)"]
    chosen, verdicts = ops.which_backend(q, k, v, **params, backend="triton")
    assert chosen == "triton" and dict(verdicts)["triton"] == []


def test_use_backend_and_environment_force_the_backend(monkeypatch, poisoned):
    q, k, v = make((1, 3, 5, 6, 16, 16))
    params = make_params(3, "all")
    calls = []
    real = tk.head_mixing_attention_fwd
    monkeypatch.setattr(tk, "head_mixing_attention_fwd", lambda *a: calls.append(1) or real(*a))
    with vitkernels.use_backend("triton"):
        vitkernels.head_mixing_attention(q, k, v, **params)
    monkeypatch.setenv("VITKERNELS_BACKEND", "triton")
    vitkernels.head_mixing_attention(q, k, v, **params)
    assert len(calls) == 2


def test_forced_triton_refuses_float64():
    q, k, v = (t.double() for t in make((1, 3, 5, 6, 16, 16)))
    with pytest.raises(BackendNotSupportedError, match="triton.*q, k, v have dtype float64"):
        vitkernels.head_mixing_attention(q, k, v, backend="triton")
    with vitkernels.use_backend("triton"), pytest.raises(BackendNotSupportedError, match="float64"):
        vitkernels.head_mixing_attention(q, k, v)


def test_triton_limits_are_reasons():
    q, k, v = make((1, 12, 2, 2, 33, 33))  # DeepViT-S's heads (float32: refused by dtype only)
    reasons = ops.TritonBackend().not_supported_reasons(_inputs(q, k, v, {}))
    assert any("H=12: with more than 4 heads the kernels (the head mixing on tensor cores) take float16 and "
               "bfloat16 inputs; q has dtype float32" in r for r in reasons), reasons
    assert not any("16-byte aligned" in r for r in reasons), reasons  # 5-16 heads: masked loads
    q, k, v = make((1, 4, 2, 2, 33, 33))  # 4 heads of 33: the register kernels need aligned rows
    reasons = ops.TritonBackend().not_supported_reasons(_inputs(q, k, v, {}))
    assert any("q (shape (1, 4, 2, 33)" in r and "16-byte aligned rows" in r for r in reasons), reasons
    q, k, v = make((1, 2, 2, 2, 128, 16))
    reasons = ops.TritonBackend().not_supported_reasons(_inputs(q, k, v, {}))
    assert any("Dk=128 is above the kernels' limit of 64" in r for r in reasons), reasons
    q, k, v = make((1, 2, 2, 2, 16, 16))
    params = make_params(2, "all", torch.float64)
    reasons = ops.TritonBackend().not_supported_reasons(_inputs(q, k, v, params))
    assert any("pre weight, pre bias, post weight" in r and "have dtype float64" in r for r in reasons), reasons


def test_misaligned_views_are_refused_with_the_reason():
    """A view one element into a buffer cannot be read as aligned vectors: refused by
    name (the kernels' tiles would not fit the registers), the torch backend runs it."""
    x = torch.randn(1, 2, 9, 17)
    q, k, v = (x[..., 1:] for _ in range(3))
    with pytest.raises(BackendNotSupportedError, match=r"triton.*q \(shape \(1, 2, 9, 16\).*16-byte aligned"):
        vitkernels.head_mixing_attention(q, k, v, backend="triton")
    out = vitkernels.head_mixing_attention(q, k, v, backend="torch")
    assert_close(out, ref64(q, k, v, {})[0], TOL[torch.float32])


def test_reference_and_torch_run_any_head_count():
    q, k, v = make((1, 20, 3, 4, 8, 8))
    params = make_params(20, "all")
    out = vitkernels.head_mixing_attention(q, k, v, **params)
    assert_close(out, ref64(q, k, v, params)[0], TOL[torch.float32])


# ----------------------------------------------------------------------------
# bad inputs


def _bad(**change):
    q, k, v = make((2, 4, 6, 7, 16, 8))
    args = dict(q=q, k=k, v=v)
    kw = dict(pre=(torch.randn(4, 4), None), post=(torch.randn(4, 4), torch.randn(4)),
              head_norm=(torch.ones(4), torch.zeros(4), 1e-5))  # fmt: skip
    for key, value in change.items():
        (args if key in args else kw)[key] = value(args) if callable(value) else value
    return args, kw


BAD = [
    ("k heads", dict(k=lambda a: torch.randn(2, 3, 7, 16)), ValueError, r"k has shape \(2, 3, 7, 16\); expected \(B, H, Nk, Dk\) = \(2, 4, Nk, 16\)"),
    ("k Dk", dict(k=lambda a: torch.randn(2, 4, 7, 8)), ValueError, r"k has shape \(2, 4, 7, 8\)"),
    ("v heads", dict(v=lambda a: torch.randn(2, 5, 7, 8)), ValueError, r"v has shape \(2, 5, 7, 8\); expected \(B, H, Nk, Dv\) = \(2, 4, 7, Dv\)"),
    ("v keys", dict(v=lambda a: torch.randn(2, 4, 6, 8)), ValueError, r"v has shape \(2, 4, 6, 8\)"),
    ("q ndim", dict(q=lambda a: torch.randn(2, 6, 16)), ValueError, r"q has shape \(2, 6, 16\); expected \(B, H, Nq, Dk\)"),
    ("pre not H x H", dict(pre=(torch.randn(4, 3), None)), ValueError, r"pre weight has shape \(4, 3\); expected \(H, H\) = \(4, 4\) for q with H=4 heads"),
    ("post for other heads", dict(post=(torch.randn(3, 3), None)), ValueError, r"post weight has shape \(3, 3\); expected \(H, H\) = \(4, 4\)"),
    ("post bias size", dict(post=(torch.randn(4, 4), torch.randn(3))), ValueError, r"post bias has shape \(3,\); expected \(H,\) = \(4,\)"),
    ("pre not a pair", dict(pre=torch.randn(4, 4)), TypeError, r"pre=Tensor; expected a \(weight, bias\) pair"),
    ("norm weight size", dict(head_norm=(torch.ones(5), None, 1e-5)), ValueError, r"head_norm weight has shape \(5,\); expected \(H,\) = \(4,\)"),
    ("norm bias size", dict(head_norm=(None, torch.zeros(2), 1e-5)), ValueError, r"head_norm bias has shape \(2,\); expected \(H,\) = \(4,\)"),
    ("norm not a triple", dict(head_norm=(torch.ones(4), torch.zeros(4))), TypeError, r"expected a \(weight, bias, eps\) triple"),
    ("norm eps negative", dict(head_norm=(None, None, -1.0)), ValueError, r"head_norm eps=-1.0; expected eps >= 0"),
    ("scale nan", dict(scale=float("nan")), ValueError, r"scale=nan; expected a finite float"),
    ("dropout above 1", dict(dropout_p=1.5), ValueError, r"dropout_p=1.5; expected 0 <= dropout_p <= 1"),
    ("dropout site", dict(dropout_site="logits"), ValueError, r"dropout_site='logits'; expected 'probs'"),
    ("k dtype", dict(k=lambda a: a["k"].half()), TypeError, r"k has dtype torch.float16 but q has torch.float32"),
    ("int weight", dict(pre=(torch.zeros(4, 4, dtype=torch.long), None)), TypeError, r"pre weight has dtype torch.int64; expected a floating-point"),
    ("not a tensor", dict(v=lambda a: a["v"].tolist()), TypeError, r"v must be a torch.Tensor, got list"),
    ("meta weight", dict(post=(torch.randn(4, 4, device="meta"), None)), ValueError, r"post weight is on meta but q is on cpu"),
]  # fmt: skip


@pytest.mark.parametrize("change, exc, match", [b[1:] for b in BAD], ids=[b[0] for b in BAD])
def test_bad_inputs_say_what_was_given_and_expected(change, exc, match):
    args, kw = _bad(**change)
    with pytest.raises(exc, match=match):
        vitkernels.head_mixing_attention(**args, **kw)


# ----------------------------------------------------------------------------
# 5-16 heads: the tensor-core forward and backward (vitkernels/triton/head_mixing_tc.py),
# float16 in the interpreter

# id: (B, H, Nq, Nk, Dk, Dv), stages, view
